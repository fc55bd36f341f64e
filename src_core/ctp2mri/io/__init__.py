"""Medical image I/O: every reader returns a `Volume`, every writer is atomic.

`load_volume` picks the reader from the path: a folder is a DICOM series, ``.nii``/``.nii.gz``
go to nibabel, everything else (NRRD, MHA/MHD, ...) to SimpleITK.
"""

from __future__ import annotations

import os
from pathlib import Path

from ctp2mri.errors import InputError
from ctp2mri.io.volume import Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")


def load_volume(path: str | os.PathLike, series_uid: str | None = None) -> Volume:
    """Read a NIfTI file, an NRRD/MHA file or a DICOM series folder as a `Volume`.

    ``series_uid`` picks one series from a DICOM folder that holds several.
    """
    path = Path(path)
    try:
        return _read(path, series_uid)
    except InputError as exc:
        if path.name in str(exc):
            raise
        raise InputError(f"{path}: {exc}") from None  # say which of several inputs is wrong


def _read(path: Path, series_uid: str | None) -> Volume:
    if not path.exists():
        raise InputError(f"{path} does not exist")
    if path.is_dir():
        from ctp2mri.io.dicom import load_dicom_series

        return load_dicom_series(path, series_uid=series_uid)
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        from ctp2mri.io.nifti import load_nifti

        return load_nifti(path)
    if name.endswith(ITK_SUFFIXES):
        from ctp2mri.io.itk import load_itk

        return load_itk(path)
    raise InputError(
        f"don't know how to read {path.name}: give a NIfTI (.nii, .nii.gz), NRRD, MHA file "
        "or a folder holding one DICOM series"
    )


def save_volume(volume: Volume, path: str | os.PathLike) -> Path:
    """Write ``volume`` to ``path`` atomically; the format follows the extension."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        from ctp2mri.io.nifti import save_nifti

        return save_nifti(volume, path)
    if name.endswith(ITK_SUFFIXES):
        from ctp2mri.io.itk import save_itk

        return save_itk(volume, path)
    raise InputError(f"don't know how to write {path.name}: use .nii.gz, .nii, .nrrd or .mha")


__all__ = ["Volume", "load_volume", "save_volume"]
