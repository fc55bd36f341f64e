"""NIfTI (.nii / .nii.gz, 3-D and 4-D, any orientation) with nibabel."""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from ctp2mri.errors import InputError
from ctp2mri.io.atomic import atomic_path
from ctp2mri.io.volume import Volume

_TIME_UNIT_TO_S = {"sec": 1.0, "msec": 1e-3, "usec": 1e-6}


def load_nifti(path: str | os.PathLike, dtype: np.dtype | None = None) -> Volume:
    """Read a NIfTI file into a `Volume`, keeping its affine exactly.

    The affine is nibabel's best affine (sform if set, else qform). For 4-D files the frame
    times come from the header's time step (``pixdim[4]`` with ``xyzt_units``) and
    ``toffset``; a missing step is reported as ``meta["frame_times_assumed"]``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist or is not a file")
    try:
        image = nib.load(str(path))
        array = np.asanyarray(image.dataobj)
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, nib.filebasedimages.ImageFileError, ValueError) as exc:
        raise InputError(
            f"cannot read {path}: the file is truncated or not a valid NIfTI ({exc}). "
            "Re-export or re-copy it."
        ) from None
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    if array.ndim == 5 and array.shape[3] == 1:  # some tools write time as the 5th axis
        array = array[:, :, :, 0, :]
    while array.ndim > 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (3, 4):
        raise InputError(f"{path} has shape {array.shape}; expected a 3-D or 4-D image")
    frame_times = None
    meta: dict = {"source": str(path)}
    if array.ndim == 4:
        header = image.header
        step = float(header["pixdim"][4])
        unit = header.get_xyzt_units()[1]
        if step > 0:
            step *= _TIME_UNIT_TO_S.get(unit, 1.0)
        else:
            step = 1.0
        if float(header["pixdim"][4]) <= 0 or unit not in _TIME_UNIT_TO_S:
            # No time step or no unit: frame times are a guess (seconds assumed).
            meta["frame_times_assumed"] = True
        offset = float(header["toffset"]) if "toffset" in header else 0.0
        frame_times = offset + step * np.arange(array.shape[3])
    return Volume(array, image.affine.copy(), frame_times=frame_times, meta=meta)


def save_nifti(volume: Volume, path: str | os.PathLike, dtype: np.dtype | None = None) -> Path:
    """Write a `Volume` atomically as NIfTI (gzip when the name ends in .gz).

    sform and qform both hold the affine (code 1, scanner), so every reader sees the same
    geometry; 4-D volumes store their frame interval in seconds in ``pixdim[4]``.
    """
    path = Path(path)
    array = volume.array if dtype is None else volume.array.astype(dtype, copy=False)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    image = nib.Nifti1Image(array, volume.affine)
    image.set_sform(volume.affine, code=1)
    image.set_qform(volume.affine, code=1)
    if volume.is_4d and volume.frame_times is not None and volume.n_frames > 1:
        times = volume.frame_times
        zooms = list(image.header.get_zooms()[:3]) + [float(np.median(np.diff(times)))]
        image.header.set_zooms(zooms)
        image.header.set_xyzt_units("mm", "sec")
        image.header["toffset"] = float(times[0])
    else:
        image.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))
    return path
