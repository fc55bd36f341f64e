"""``ctp2mri doctor``: what to know about this machine's torch and GPUs before a long run.

`diagnose` gathers it (torch and its CUDA/cuDNN build, CUDA and Apple MPS availability, every
CUDA device with its free and total memory and bf16 support, the NVIDIA driver as ``nvidia-smi``
sees it, the device ``--device auto`` takes and why) and lists the problems found, the first of
them the most common one: the CPU build of torch installed on a machine with an NVIDIA GPU, which
makes every run silently compute on the CPU. `format_doctor` writes it for people.

Reading the machine never fails: each part that cannot be read says why instead.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["BF16_PEAK_TFLOPS", "bf16_peak_tflops", "diagnose", "format_doctor"]

#: Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s, by a part of the
#: device name; the first match wins, so longer names come first. For ``bench synthesize
#: --peak-tflops``: the fraction of the peak a run reaches.
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A30", 165.0),
    ("A10", 125.0), ("RTX 6000 Ada", 364.0), ("A6000", 155.0), ("4090", 165.0), ("3090", 71.0),
)
_BF16_CAPABILITY = (8, 0)  # Ampere and newer run bf16 on tensor cores
_LOW_FREE = 0.25  # a GPU with less than this fraction free is busy with other work
_TORCH_INDEX = "https://download.pytorch.org/whl"


def bf16_peak_tflops(name: str) -> float | None:
    """The datasheet dense bf16 peak of a CUDA device by its name, or None when unknown."""
    lowered = name.lower()
    return next((peak for part, peak in BF16_PEAK_TFLOPS if part.lower() in lowered), None)


def _gib(n: float | None) -> str:
    return "?" if n is None else f"{n / 1024**3:.1f} GiB"


def _nvidia_smi(which: Callable[[str], str | None], run: Callable[..., Any]) -> dict[str, Any]:
    """The NVIDIA driver as ``nvidia-smi`` reports it (path None when there is no such program)."""
    path = which("nvidia-smi")
    info: dict[str, Any] = {"path": path, "driver": None, "cuda": None, "gpus": [], "error": None}
    if path is None:
        if os.path.exists("/proc/driver/nvidia/version"):
            info["error"] = "nvidia-smi is not on PATH, but an NVIDIA kernel driver is loaded"
        return info
    try:
        query = run([path, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                    capture_output=True, text=True, timeout=20)
        plain = run([path], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        info["error"] = f"nvidia-smi did not answer ({exc})"
        return info
    if query.returncode != 0:
        info["error"] = " ".join((query.stderr or query.stdout or f"exit status {query.returncode}").split())
    for line in (query.stdout or "").splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 2 and parts[0]:
            info["gpus"].append(parts[0] + (f" ({parts[2]})" if len(parts) > 2 else ""))
            info["driver"] = info["driver"] or parts[1]
    match = re.search(r"CUDA Version:\s*([0-9.]+)", plain.stdout or "")
    info["cuda"] = match.group(1) if match else None
    return info


def _cuda_devices(torch: Any) -> tuple[list[dict[str, Any]], str | None]:
    devices: list[dict[str, Any]] = []
    try:
        count = torch.cuda.device_count()
    except Exception as exc:  # a broken driver raises here
        return devices, f"{type(exc).__name__}: {exc}"
    error = None
    for i in range(count):
        entry: dict[str, Any] = {"index": i, "device": f"cuda:{i}"}
        try:
            props = torch.cuda.get_device_properties(i)
            entry.update(name=str(props.name), capability=f"{props.major}.{props.minor}",
                         total_bytes=int(props.total_memory),
                         multiprocessors=int(getattr(props, "multi_processor_count", 0)) or None,
                         bf16=(props.major, props.minor) >= _BF16_CAPABILITY,
                         bf16_peak_tflops=bf16_peak_tflops(str(props.name)))
            free, total = torch.cuda.mem_get_info(i)
            entry.update(free_bytes=int(free), total_bytes=int(total))
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"
            error = error or entry["error"]
        devices.append(entry)
    return devices, error


def _cuda_init_error(torch: Any) -> str | None:
    """Why CUDA is not available, as torch says it (None when it gives no reason)."""
    try:
        torch.cuda.init()
    except Exception as exc:
        return " ".join(str(exc).split()) or type(exc).__name__
    return None


def _version_tuple(text: str | None) -> tuple[int, ...] | None:
    try:
        return tuple(int(x) for x in str(text).split(".")[:2])
    except ValueError:
        return None


def _wheel_tag(driver_cuda: str | None) -> str:
    v = _version_tuple(driver_cuda)
    return f"cu{v[0]}{v[1]}" if v and len(v) == 2 else "cu126"


def _problems(r: dict[str, Any]) -> list[str]:
    """What stands between this machine and a GPU run, each with what to do."""
    out = []
    t, cuda, smi = r["torch"], r["cuda"], r["nvidia_smi"]
    has_nvidia = smi["path"] is not None or bool(smi.get("error"))
    base = t["version"].split("+")[0]
    if t["cuda_build"] is None and t.get("hip") is None and has_nvidia:
        driver = f" (driver {smi['driver']}, CUDA {smi['cuda']})" if smi.get("driver") else ""
        tag = _wheel_tag(smi.get("cuda"))
        out.append(f"you installed the CPU build of torch ({t['version']}) but this machine has an NVIDIA GPU"
                   f"{driver}: every run computes on the CPU. Reinstall torch with a CUDA build, e.g. "
                   f"`{sys.executable} -m pip install --force-reinstall torch=={base} --index-url "
                   f"{_TORCH_INDEX}/{tag}` (a cuXYZ no newer than the driver's CUDA; "
                   "https://pytorch.org/get-started/locally/ lists them)")
    elif t["cuda_build"] is not None and not cuda["available"]:
        hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
        if hidden is not None and hidden.strip() in ("", "-1"):
            out.append(f"CUDA_VISIBLE_DEVICES={hidden!r} hides every GPU; unset it or name the GPUs to use")
        elif not has_nvidia:
            out.append(f"torch is a CUDA {t['cuda_build']} build but no NVIDIA driver answers (no nvidia-smi): "
                       "install the NVIDIA driver, or in a container pass the GPU in (docker run --gpus all); "
                       "on a machine without an NVIDIA GPU this is harmless (runs use the CPU)")
        else:
            build, driver = _version_tuple(t["cuda_build"]), _version_tuple(smi.get("cuda"))
            if build and driver and driver < build:
                out.append(f"torch's CUDA {t['cuda_build']} needs a newer NVIDIA driver than this one "
                           f"(supports CUDA {smi['cuda']}): update the driver, or install a torch build for "
                           f"CUDA ≤ {smi['cuda']} (--index-url {_TORCH_INDEX}/{_wheel_tag(smi['cuda'])})")
            else:
                why = cuda.get("error") or "torch gives no reason"
                out.append(f"an NVIDIA driver is present but torch cannot use CUDA ({why}); check `nvidia-smi`")
    for dev in cuda["devices"]:
        if "error" in dev:
            out.append(f"{dev['device']} could not be read ({dev['error']})")
            continue
        if not dev["bf16"]:
            out.append(f"{dev['device']} ({dev['name']}, compute capability {dev['capability']}) has no bf16 "
                       "tensor cores (they need ≥ 8.0): use --precision fp16 or fp32")
        if dev.get("free_bytes") is not None and dev["free_bytes"] < _LOW_FREE * dev["total_bytes"]:
            out.append(f"{dev['device']} has only {_gib(dev['free_bytes'])} free of {_gib(dev['total_bytes'])}: "
                       "other processes hold its memory (nvidia-smi lists them)")
    return out


def diagnose(which: Callable[[str], str | None] | None = None,
             run: Callable[..., Any] | None = None) -> dict[str, Any]:
    """This machine's torch, devices and problems as a JSON-ready dict (see the module docstring).

    ``which`` and ``run`` find and run ``nvidia-smi`` (default `shutil.which`, `subprocess.run`).
    """
    import torch

    which = shutil.which if which is None else which
    run = subprocess.run if run is None else run

    from ctp2mri import __version__
    from ctp2mri.devices import resolve_device_with_notice

    try:
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception:  # pragma: no cover - a broken cuDNN install
        cudnn = None
    report: dict[str, Any] = {
        "ctp2mri": __version__, "python": platform.python_version(), "platform": platform.platform(),
        "torch": {"version": torch.__version__, "cuda_build": torch.version.cuda,
                  "hip": getattr(torch.version, "hip", None), "cudnn": cudnn},
    }
    try:
        import psutil

        memory = psutil.virtual_memory()
        ram = {"total_bytes": int(memory.total), "available_bytes": int(memory.available)}
    except Exception:  # pragma: no cover - psutil is a dependency
        ram = {"total_bytes": None, "available_bytes": None}
    report["cpu"] = {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), **ram}
    available = bool(torch.cuda.is_available())
    devices, error = _cuda_devices(torch) if available else ([], None)
    report["cuda"] = {"available": available, "device_count": len(devices), "devices": devices,
                      "error": error if available else (_cuda_init_error(torch) if torch.version.cuda else None)}
    mps = getattr(torch.backends, "mps", None)
    report["mps"] = {"built": bool(mps is not None and mps.is_built()),
                     "available": bool(mps is not None and mps.is_available())}
    report["nvidia_smi"] = _nvidia_smi(which, run)
    try:
        device, notice = resolve_device_with_notice("auto")
        if device.type == "cuda":
            name = next((d.get("name") for d in devices if d["index"] == device.index), None)
            why = (f"CUDA is available: auto takes the current CUDA device, {device}"
                   + (f" ({name})" if name else ""))
            if len(devices) > 1:
                why += (f"; {len(devices)} GPUs: pick one with --device cuda:N, or train on all of them under "
                        f"torchrun --nproc_per_node {len(devices)}")
        elif device.type == "mps":
            why = "no CUDA GPU; Apple's MPS is available: auto takes it"
        else:
            why = notice or "no accelerator"
        report["auto"] = {"device": str(device), "why": why}
    except Exception as exc:
        report["auto"] = {"device": None, "why": f"could not be resolved ({type(exc).__name__}: {exc})"}
    report["problems"] = _problems(report)
    return report


def format_doctor(r: dict[str, Any]) -> str:
    """`diagnose`'s report as text for the terminal."""
    t, cuda, smi = r["torch"], r["cuda"], r["nvidia_smi"]
    build = (f"CUDA {t['cuda_build']}" if t["cuda_build"] else f"ROCm {t['hip']}" if t.get("hip") else "CPU-only")
    lines = [f"ctp2mri {r['ctp2mri']}, Python {r['python']}, {r['platform']}",
             f"torch {t['version']} ({build} build" + (f", cuDNN {t['cudnn']})" if t.get("cudnn") else ")"),
             f"CPU: {r['cpu']['cores']} cores, torch uses {r['cpu']['torch_threads']} thread(s); memory "
             f"{_gib(r['cpu']['available_bytes'])} available of {_gib(r['cpu']['total_bytes'])}"]
    if smi["path"]:
        lines.append(f"NVIDIA driver: {smi['driver'] or '?'} (CUDA {smi['cuda'] or '?'}), nvidia-smi lists "
                     + (", ".join(smi["gpus"]) or "no GPU") + (f" — {smi['error']}" if smi.get("error") else ""))
    else:
        lines.append("NVIDIA driver: none (no nvidia-smi)" + (f" — {smi['error']}" if smi.get("error") else ""))
    if cuda["available"]:
        lines.append(f"CUDA: available, {cuda['device_count']} device(s)")
        for d in cuda["devices"]:
            if "error" in d:
                lines.append(f"  {d['device']}: could not be read ({d['error']})")
                continue
            peak = f", datasheet bf16 peak {d['bf16_peak_tflops']:g} TFLOP/s" if d.get("bf16_peak_tflops") else ""
            lines.append(f"  {d['device']}: {d['name']}, compute capability {d['capability']}, "
                         f"{_gib(d.get('free_bytes'))} free of {_gib(d['total_bytes'])}, "
                         f"bf16 {'yes' if d['bf16'] else 'no'}{peak}")
    else:
        lines.append("CUDA: not available" + (f" ({cuda['error']})" if cuda.get("error") else ""))
    lines.append(f"MPS (Apple GPU): {'available' if r['mps']['available'] else 'not available'}")
    if cuda["available"]:
        bf16 = [d["device"] for d in cuda["devices"] if d.get("bf16")]
        lines.append("bf16: " + (f"supported on {', '.join(bf16)} (--precision bf16)" if bf16 else
                                 "not supported on these GPUs (use --precision fp16 or fp32)"))
    else:
        lines.append("bf16: not used here (autocast applies on CUDA GPUs only; runs compute in fp32)")
    lines.append(f"--device auto → {r['auto']['device']}: {r['auto']['why']}")
    if r["problems"]:
        lines.append("problems:")
        lines += [f"  - {p}" for p in r["problems"]]
    else:
        lines.append("problems: none found")
    return "\n".join(lines)
