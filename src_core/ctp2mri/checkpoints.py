"""Checkpoints: a folder of ``config.json`` + safetensors files. Loading never unpickles.

Layout (docs/contracts.md, "Checkpoint")::

    my-model/
      config.json                   format, version, kind, profile, networks, schedule,
                                    normalisation, provenance, anything else the trainer adds
      model.safetensors             one file per network, named as in config["networks"]
      ema.safetensors               (e.g.) EMA weights of the same architecture
      training_state.safetensors    optional, for exact resume: optimizer moments, RNG states …
      training_state.json           … and the non-tensor rest of that state

``config["networks"]`` maps each weight file's name to ``{"type", "config", "bytes"}``:
the network type (`ctp2mri.models.NETWORK_TYPES`), its constructor arguments exactly
(the network's ``.config``), and the file size, which catches truncated copies early.

Pickle-based ``.ckpt``/``.pt``/``.pth`` files (PyTorch Lightning, ``torch.save``) are
refused: unpickling runs arbitrary code from the file. Everything here goes through
`safetensors.torch.load_file` and `json`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

import ctp2mri
from ctp2mri.errors import InputError
from ctp2mri.io.atomic import atomic_dir
from ctp2mri.provenance import provenance
from ctp2mri.state_tree import decode_tree, encode_tree

FORMAT = "ctp2mri-checkpoint"
VERSION = 1
CONFIG_FILE = "config.json"
TRAINING_STATE = "training_state"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_RESERVED = {"format", "version", "networks", TRAINING_STATE}
_MAX_LISTED = 12  # keys shown in a shape-mismatch message before "… and N more"


# --------------------------------------------------------------------------- saving
_WRAPPERS = (nn.parallel.DistributedDataParallel, torch.optim.swa_utils.AveragedModel)


def _unwrap(module: nn.Module) -> nn.Module:
    """The network inside DistributedDataParallel / AveragedModel / torch.compile wrappers."""
    while True:
        if isinstance(module, _WRAPPERS):
            module = module.module
        elif hasattr(module, "_orig_mod"):  # torch.compile's OptimizedModule
            module = module._orig_mod
        else:
            return module


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


def _tensors_for_file(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors with no two sharing memory (safetensors refuses shared storage).

    Tied weights appear under two names in a state dict; the second copy is cloned, and
    loading copies both back into the one parameter.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[str, int]] = set()
    for name, t in tensors.items():
        t = t.detach()
        if _storage_key(t) in seen:
            t = t.clone(memory_format=torch.contiguous_format)
        elif not t.is_contiguous():
            t = t.contiguous()
        seen.add(_storage_key(t))
        out[name] = t.cpu()
    return out


def _json_default(obj: Any) -> Any:
    """JSON for the numpy scalars and paths that settings computed with numpy tend to hold."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _config_text(config: Mapping[str, Any]) -> str:
    return json.dumps(config, indent=2, allow_nan=False, default=_json_default) + "\n"


def _default_file_mode(folder: Path) -> int:
    """The mode a new file gets in ``folder`` (0666 less the umask), read from a probe file:
    asking ``os.umask`` means setting it, which races with other threads creating files."""
    probe = folder / f".mode-probe-{os.getpid()}"
    probe.touch()
    try:
        return probe.stat().st_mode & 0o777
    finally:
        probe.unlink()


def save_checkpoint(
    path: str | os.PathLike,
    modules: Mapping[str, nn.Module],
    config: Mapping[str, Any],
    training_state: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a checkpoint folder atomically (a crash leaves the old one, never half a new one).

    Parameters
    ----------
    path
        Checkpoint folder to create (or replace, with ``overwrite=True``, e.g. ``latest``).
    modules
        Weight-file name → network, e.g. ``{"model": ldm, "ema": ema_ldm}``. Each network
        must be a `ctp2mri.models` network (it carries ``.config``); DistributedDataParallel,
        ``AveragedModel`` (EMA) and torch.compile wrappers are unwrapped.
    config
        JSON-serialisable settings: ``kind`` and ``profile`` (required), ``schedule``,
        ``normalisation``, ``provenance`` (see `provenance`; missing fields are filled in)
        and anything else.
        The keys ``format``, ``version``, ``networks`` and ``training_state`` are written here.
    training_state
        Optional tree of dicts / lists / tuples / scalars / strings / tensors / numpy arrays
        (optimizer ``state_dict()``s, step, RNG states, …), stored without pickle
        (`ctp2mri.state_tree`).
    overwrite
        Replace an existing non-empty folder.

    Returns
    -------
    Path of the checkpoint folder.
    """
    from ctp2mri.models.configs import network_type  # models import torch/MONAI: only when saving

    clash = _RESERVED & set(config)
    if clash:
        raise ValueError(f"config keys {sorted(clash)} are written by save_checkpoint itself")
    if not modules:
        raise ValueError("a checkpoint needs at least one network")
    if "kind" not in config or "profile" not in config:
        raise ValueError("config needs 'kind' (e.g. 'autoencoder', 'cldm') and 'profile'")
    full: dict[str, Any] = {"format": FORMAT, "version": VERSION, **config, "networks": {}}
    # Caller's provenance (command, data, steps) completed with when/which code.
    full["provenance"] = {**provenance(), **dict(config.get("provenance") or {})}
    files: dict[str, dict[str, torch.Tensor]] = {}
    for name, module in modules.items():
        if not _NAME.match(name) or name == TRAINING_STATE:
            raise ValueError(
                f"bad network name {name!r}: use letters, digits, '_', '-'; not {TRAINING_STATE}"
            )
        net = _unwrap(module)
        full["networks"][name] = {"type": network_type(net), "config": net.config}
        files[name] = _tensors_for_file(net.state_dict())
    _config_text(full)  # fail on a non-JSON setting before writing gigabytes of weights
    state_json = None
    if training_state is not None:
        state_tensors: dict[str, torch.Tensor] = {}
        state_json = encode_tree(training_state, state_tensors)
        files[TRAINING_STATE] = _tensors_for_file(state_tensors)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        mode = _default_file_mode(tmp)
        for name, tensors in files.items():
            save_file(tensors, str(tmp / f"{name}.safetensors"), metadata={"format": FORMAT})
            # safetensors writes 0600: a model folder shared with colleagues would be unreadable
            os.chmod(tmp / f"{name}.safetensors", mode)
            size = (tmp / f"{name}.safetensors").stat().st_size
            if name == TRAINING_STATE:
                (tmp / f"{TRAINING_STATE}.json").write_text(json.dumps(state_json))
                full["training_state"] = {"bytes": size}
            else:
                full["networks"][name]["bytes"] = size
        (tmp / CONFIG_FILE).write_text(_config_text(full))
    return Path(path)


# --------------------------------------------------------------------------- loading


def _refuse_pickle(path: Path) -> InputError:
    # No converter ships with ctp2mri on purpose: converting means unpickling, which only the
    # user can decide to do, with a file whose origin they trust.
    return InputError(
        f"{path} is a pickle-based PyTorch checkpoint ({path.suffix}). ctp2mri never loads "
        "pickles: unpickling can run arbitrary code hidden in the file. If you trust its source, "
        "convert it yourself in Python: load the state dict (torch.load(path, weights_only=True)), "
        "load it into the matching ctp2mri network (ctp2mri.models) and write a checkpoint folder "
        "with ctp2mri.checkpoints.save_checkpoint; then give that folder (config.json + .safetensors)."
    )


def checkpoint_dir(path: str | os.PathLike) -> Path:
    """The checkpoint folder for ``path`` (the folder or its config.json), or an `InputError`."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise _refuse_pickle(path)
    if path.is_file() and path.name == CONFIG_FILE:
        path = path.parent
    if not path.exists():
        raise InputError(f"checkpoint folder {path} does not exist; check the model path given")
    if path.is_file():
        raise InputError(
            f"{path} is a file; a ctp2mri checkpoint is a folder holding {CONFIG_FILE} and "
            ".safetensors weights. Give the folder."
        )
    if not (path / CONFIG_FILE).is_file():
        pickles = sorted(p for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise _refuse_pickle(pickles[0])
        raise InputError(
            f"{path} is not a ctp2mri checkpoint: {CONFIG_FILE} is missing. A checkpoint folder "
            "holds config.json and .safetensors files written by ctp2mri training."
        )
    return path


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """Validated config.json of a checkpoint folder (cheap: no weights are read)."""
    folder = checkpoint_dir(path)
    file = folder / CONFIG_FILE
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{file} is not valid JSON ({exc}); the checkpoint is damaged") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise InputError(f"{file} is not a ctp2mri checkpoint config (no \"format\": \"{FORMAT}\")")
    version = config.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise InputError(f"{file} has no valid format version; the checkpoint is damaged")
    if version > VERSION:
        raise InputError(
            f"{folder} uses checkpoint format version {version}, newer than this ctp2mri "
            f"({ctp2mri.__version__}) reads (version {VERSION}); upgrade napari-ctp2mri."
        )
    if version < 1:
        raise InputError(f"{file} declares unknown checkpoint format version {version}")
    networks = config.get("networks")
    if not isinstance(networks, dict) or not networks:
        raise InputError(f"{file} lists no networks; the checkpoint is damaged")
    for name, entry in networks.items():
        ok = _NAME.match(name) and isinstance(entry, dict) and {"type", "config"} <= set(entry)
        if not ok:
            raise InputError(f"{file}: networks entry {name!r} is malformed; the file is damaged")
    return config


def _read_safetensors(
    file: Path, expected_bytes: int | None, map_location: str
) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise InputError(
            f"checkpoint file {file.name} is missing from {file.parent}; copy the whole "
            "checkpoint folder again."
        )
    size = file.stat().st_size
    if expected_bytes is not None and size != expected_bytes:
        raise InputError(
            f"{file} has {size} bytes but the checkpoint recorded {expected_bytes}: the file is "
            "truncated or was replaced. Copy the checkpoint folder again."
        )
    try:
        return load_file(str(file), device=map_location)
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{file} is not readable safetensors ({exc}); it is damaged") from None


def _check_state_dict(net: nn.Module, state: Mapping[str, torch.Tensor], file: Path) -> None:
    """Raise one `InputError` listing every missing, unexpected or mis-shaped tensor."""
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{k}: file {tuple(state[k].shape)}, model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    problems = (
        [f"shape mismatch {m}" for m in mismatched]
        + [f"missing {k}" for k in missing]
        + [f"unexpected {k}" for k in unexpected]
    )
    if problems:
        shown = problems[:_MAX_LISTED]
        more = len(problems) - len(shown)
        raise InputError(
            f"weights in {file} do not fit the network described in config.json "
            f"({len(mismatched)} shape mismatches, {len(missing)} missing, {len(unexpected)} "
            "unexpected tensors): " + "; ".join(shown) + (f"; … and {more} more" if more else "")
            + ". The folder mixes files from different models; use the files saved together."
        )


def load_checkpoint(
    path: str | os.PathLike,
    names: list[str] | tuple[str, ...] | None = None,
    build: bool = True,
    map_location: str | torch.device = "cpu",
    kind: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a checkpoint folder: networks (or bare state dicts) and its config.

    Parameters
    ----------
    path
        Checkpoint folder (or its config.json).
    names
        Networks to load (default: all in config["networks"]), e.g. ``["ema"]`` for inference.
    build
        Build each network from its recorded constructor arguments and load the weights
        (shapes checked); otherwise return state dicts.
    map_location
        Device for the tensors (and built networks).
    kind
        When given, refuse a checkpoint whose config "kind" differs (e.g. an autoencoder
        checkpoint passed where a cLDM is needed).

    Returns
    -------
    (networks or state dicts by name, config dict)
    """
    from ctp2mri.models.configs import build_network

    folder = checkpoint_dir(path)
    config = read_config(folder)
    if kind is not None and config.get("kind") != kind:
        raise InputError(
            f"{folder} is a {config.get('kind')!r} checkpoint; this needs a {kind!r} checkpoint"
        )
    networks = config["networks"]
    names = list(networks) if names is None else list(names)
    absent = [n for n in names if n not in networks]
    if absent:
        raise InputError(
            f"{folder} has no {', '.join(absent)} weights; it holds: {', '.join(networks)}"
        )
    device = str(torch.device(map_location))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(
            "CUDA was requested but this machine has no usable CUDA GPU; load on the CPU instead"
        )
    out: dict[str, Any] = {}
    for name in names:
        entry = networks[name]
        file = folder / f"{name}.safetensors"
        state = _read_safetensors(file, entry.get("bytes"), device)
        if not build:
            out[name] = state
            continue
        try:
            with torch.device(device):
                net = build_network(entry["type"], entry["config"])
        except (TypeError, ValueError) as exc:
            if isinstance(exc, InputError):
                raise
            raise InputError(
                f"config.json of {folder} describes network {name!r} with settings this ctp2mri "
                f"cannot build ({exc}); it was written by another version."
            ) from None
        _check_state_dict(net, state, file)
        net.load_state_dict(state)
        out[name] = net
    return out, config


def load_training_state(path: str | os.PathLike) -> dict[str, Any] | None:
    """Training state saved with the checkpoint (tensors on CPU), or None if it has none."""
    folder = checkpoint_dir(path)
    config = read_config(folder)
    if "training_state" not in config:
        return None
    tensors = _read_safetensors(
        folder / f"{TRAINING_STATE}.safetensors", config["training_state"].get("bytes"), "cpu"
    )
    file = folder / f"{TRAINING_STATE}.json"
    if not file.is_file():
        raise InputError(
            f"checkpoint file {file.name} is missing from {folder}; copy the whole folder again"
        )
    try:
        tree = json.loads(file.read_text())
        return decode_tree(tree, tensors)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{file} is damaged ({exc}); resume from another checkpoint") from None
