"""npe2 writers: an Image or Labels layer as NIfTI (or NRRD/MHA), geometry restored.

A layer opened by this plugin is written back on its file's own grid: same axis order,
same affine, same frame times, so a read → write round trip changes nothing but the data
the user edited. Other layers get their affine from napari's scale/translate/affine, read in
this plugin's convention (LPS millimetres, axes ``(t,) z, y, x``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ctp2mri.errors import InputError
from ctp2mri.io import ITK_SUFFIXES, NIFTI_SUFFIXES, save_volume
from napari_ctp2mri._layers import layer_to_volume

DEFAULT_SUFFIX = ".nii.gz"


def write_image(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """Write one Image layer; returns the written path (napari's writer contract)."""
    volume = layer_to_volume(data, attributes)
    return [str(save_volume(volume, _with_suffix(path)))]


def write_labels(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """Write one Labels layer with the smallest integer type that holds its labels."""
    volume = layer_to_volume(data, attributes)
    volume = volume.with_array(_compact_labels(volume.array))
    return [str(save_volume(volume, _with_suffix(path)))]


def _with_suffix(path: str) -> Path:
    """Add ``.nii.gz`` when the user typed a bare name; refuse formats we cannot write."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES + ITK_SUFFIXES):
        return path
    if not path.suffix:
        return path.with_name(path.name + DEFAULT_SUFFIX)
    raise InputError(
        f"cannot save {path.name} as a volume: use .nii.gz, .nii, .nrrd or .mha"
    )


def _compact_labels(array: np.ndarray) -> np.ndarray:
    """uint8/uint16/int32 instead of napari's int64 labels (smaller, and every tool reads them)."""
    if array.size == 0:
        return array.astype(np.uint8)
    lo, hi = int(array.min()), int(array.max())
    for dtype in (np.uint8, np.uint16, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return array.astype(dtype, copy=False)
    raise InputError(
        f"labels range from {lo} to {hi}; NIfTI label images here hold at most 32-bit values. "
        "Relabel them with consecutive numbers."
    )
