"""Which torch device to compute on: ``auto``, ``cpu``, ``cuda``, ``cuda:i`` or ``mps``.

One resolver for the CLI (``--device``), training, synthesis and the napari widgets, so a
machine without the requested accelerator gets the same clear message everywhere.
"""

from __future__ import annotations

import re

import torch

from ctp2mri.errors import InputError

__all__ = ["available_devices", "resolve_device", "resolve_device_with_notice"]

_CUDA = re.compile(r"^cuda(?::(\d+))?$")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def available_devices() -> list[str]:
    """Devices usable here, e.g. ``["cpu", "cuda:0", "cuda:1"]``."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        out.append("mps")
    return out


def resolve_device_with_notice(spec: str | torch.device | None = "auto") -> tuple[torch.device, str | None]:
    """The device for ``spec`` and, when ``auto`` had to fall back to the CPU, a notice saying so.

    Parameters
    ----------
    spec
        ``auto`` (CUDA if present, else Apple MPS, else CPU), ``cpu``, ``cuda``, ``cuda:i`` or
        ``mps``; case and surrounding spaces are ignored. None means ``auto``.

    Returns
    -------
    (device, notice)
        ``notice`` is None unless ``auto`` found no accelerator and chose the CPU.

    Raises
    ------
    InputError
        An unknown spec, or an accelerator that this machine does not have (the message lists
        the devices that exist and suggests ``--device cpu`` or ``--device auto``).
    """
    text = "auto" if spec is None else str(spec).strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device()), None
        if _mps_available():
            return torch.device("mps"), None
        return torch.device("cpu"), ("no CUDA or MPS GPU found: computing on the CPU "
                                     "(much slower for the paper-size model)")
    if text == "cpu":
        return torch.device("cpu"), None
    exists = ", ".join(available_devices())
    match = _CUDA.match(text)
    if match:
        if not torch.cuda.is_available():
            raise InputError(f"device {spec!r} was requested but this machine has no usable CUDA GPU "
                             f"(available: {exists}); use --device cpu, or --device auto to take "
                             "whatever is there")
        index = int(match.group(1) or torch.cuda.current_device())
        if index >= torch.cuda.device_count():
            raise InputError(f"device {spec!r} was requested but this machine has only "
                             f"{torch.cuda.device_count()} CUDA GPU(s) (available: {exists}); pick one "
                             "of those, or --device auto")
        return torch.device("cuda", index), None
    if text == "mps":
        if not _mps_available():
            raise InputError(f"device 'mps' (Apple GPU) was requested but is not available here "
                             f"(available: {exists}); use --device cpu or --device auto")
        return torch.device("mps"), None
    raise InputError(f"unknown device {spec!r}; use auto, cpu, cuda, cuda:N or mps")


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The torch device for ``spec`` (see `resolve_device_with_notice`, whose notice is dropped)."""
    return resolve_device_with_notice(spec)[0]
