"""The slice dataset's on-disk cache: each case folder's normalised slices in one safetensors
file, ``<case>-<key>.safetensors``.

The key hashes the case files' paths, sizes and modification times, the normalisation settings
and `DATA_VERSION`, so a changed case, or changed code, misses the cache and is read again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ctp2mri.case_slices import CaseSlices
from ctp2mri.casefolder import CASE_FILES, CASE_INFO
from ctp2mri.io.atomic import atomic_path
from ctp2mri.preprocessing.preprocess import CTP_HU_RANGE, MRI_QUANTILES
from ctp2mri.profiles import Profile

__all__ = ["DATA_VERSION", "cache_key", "read_cache", "write_cache"]

# Part of every cache key: bump it whenever normalisation or slice selection changes.
DATA_VERSION = "2"


def cache_key(folder: Path, profile: Profile | None, min_brain_fraction: float, dtype: torch.dtype,
              adc_window: tuple[float, float] | None = None, dwi_hi_median: float | None = None) -> str:
    """The cache key of case ``folder`` normalised with these settings (24 hex digits)."""
    digest = hashlib.sha256()
    settings = {"version": DATA_VERSION, "profile": asdict(profile) if profile else None,
                "min_brain_fraction": min_brain_fraction, "dtype": str(dtype),
                "ctp_hu_range": list(CTP_HU_RANGE), "quantiles": list(MRI_QUANTILES),
                "adc_window": list(adc_window) if adc_window is not None else None, "folder": str(folder.resolve())}
    if dwi_hi_median is not None:  # absent for the default DWI scale: older caches keep their keys
        settings["dwi_hi_median"] = dwi_hi_median
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for filename in sorted((*CASE_FILES.values(), CASE_INFO)):
        path = folder / filename
        if path.is_file():
            stat = path.stat()
            digest.update(f"{filename}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:24]


def write_cache(path: Path, part: CaseSlices) -> None:
    """Store one normalised case in ``path`` (atomically)."""
    tensors = {k: torch.from_numpy(np.ascontiguousarray(getattr(part, k)))
               for k in ("target", "cond", "brain", "lesion", "slices")}
    meta = {"name": part.name, "ranges": part.ranges, "profile": part.profile,
            "has_lesion_mask": part.has_lesion_mask, "data_version": DATA_VERSION}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"case": json.dumps(meta)})


def read_cache(path: Path, name: str) -> CaseSlices | None:
    """A cached case, or None when the file is unreadable (it is then rebuilt and replaced)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["case"])
            t = {k: f.get_tensor(k) for k in ("target", "cond", "brain", "lesion", "slices")}
    except Exception:  # noqa: BLE001 — any damage to a cache file only means a cache miss
        return None
    if meta.get("data_version") != DATA_VERSION:
        return None
    return CaseSlices(name, t["slices"].numpy(), t["target"].numpy(), t["cond"].numpy(), t["brain"].numpy(),
                      t["lesion"].numpy(), {k: tuple(v) for k, v in meta["ranges"].items()}, meta["profile"],
                      bool(meta["has_lesion_mask"]))
