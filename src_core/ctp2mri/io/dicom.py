"""DICOM series (3-D CT/MR, 4-D CT perfusion) with SimpleITK and GDCM.

A CT-perfusion export is one DICOM series whose slice positions repeat once per time point.
Reading groups the files into frames (Temporal Position Identifier, else a time tag, else
the k-th repetition of each position in Instance Number order), checks that every frame
holds the same evenly spaced stack (`ctp2mri.io.dicom_frames`), and lets SimpleITK's
`ImageSeriesReader` read each frame so the geometry and the rescale slope/intercept come from
ITK, not from hand-written code.

Geometry is the one of `ctp2mri.io.itk` (LPS→RAS handled there). Slices are ordered along
the slice normal (row × column cosines), so a volume written with a left-handed affine
(slice axis against the normal) reads back with its k axis reversed: the same image in
world space, on a right-handed grid.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from ctp2mri.errors import InputError
from ctp2mri.io.dicom_frames import (
    check_grids,
    check_positions,
    cluster_positions,
    folder_name,
    frame_label,
    frame_times,
    group_frames,
)
from ctp2mri.io.dicom_headers import (
    SliceHeader,
    last_line,
    read_header,
    slice_header,
    slice_normal,
    tag_value,
)
from ctp2mri.io.dicom_tags import (
    TAG_MODALITY,
    TAG_SERIES_DESCRIPTION,
)
from ctp2mri.io.itk import from_sitk
from ctp2mri.io.volume import Volume
from ctp2mri.progress import CancelToken, ProgressCallback, noop_progress

__all__ = ["DicomSeriesInfo", "list_dicom_series", "load_dicom_series"]


@dataclass(frozen=True)
class DicomSeriesInfo:
    """One series found in a folder: what a user needs to pick it."""

    uid: str
    description: str
    modality: str
    files: tuple[str, ...]

    @property
    def n_files(self) -> int:
        return len(self.files)

    def __str__(self) -> str:
        desc = self.description or "(no description)"
        return f"{self.uid}  {self.modality or '?':<3} {self.n_files:>5} files  {desc}"


# reading ----------------------------------------------------------------------------------
def list_dicom_series(folder: str | os.PathLike) -> list[DicomSeriesInfo]:
    """The DICOM series in ``folder`` (not its sub-folders), with description and file count.

    Raises
    ------
    InputError
        If ``folder`` is not a folder or holds no DICOM image.
    """
    folder = _require_folder(folder)
    uids = _series_ids(folder)
    if not uids:
        subdirs = sorted(p.name for p in folder.iterdir() if p.is_dir())
        image_suffixes = (".nii", ".nii.gz", ".nrrd", ".mha")
        images = sorted(p.name for p in folder.iterdir() if p.name.lower().endswith(image_suffixes))
        if images:
            hint = f" It holds image files ({', '.join(images[:5])}); give one of them as a file instead."
        elif subdirs:
            hint = (
                f" It has sub-folders ({', '.join(subdirs[:5])}{', ...' if len(subdirs) > 5 else ''}); "
                "give the folder that holds the DICOM files themselves."
            )
        else:
            hint = " Give the folder that holds the .dcm files of one series."
        raise InputError(f"no DICOM image files found in {folder}.{hint}")
    series = []
    for uid in uids:
        files = tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
        header = read_header(files[0])
        series.append(
            DicomSeriesInfo(
                uid=uid,
                description=tag_value(header, TAG_SERIES_DESCRIPTION) or "",
                modality=tag_value(header, TAG_MODALITY) or "",
                files=files,
            )
        )
    return series


def load_dicom_series(
    folder: str | os.PathLike,
    series_uid: str | None = None,
    *,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> Volume:
    """Read one DICOM series as a 3-D volume, or as a 4-D volume for CT perfusion.

    Parameters
    ----------
    folder
        Folder holding the series' files (sub-folders are not searched).
    series_uid
        SeriesInstanceUID to read when the folder holds several series.
    progress, cancel
        Progress callback (one step per file header, then one per frame) and cancel token.

    Returns
    -------
    Volume
        RAS+ affine from the DICOM geometry; values with rescale slope/intercept applied
        (HU for CT; int16 when they fit). A series whose slice positions repeat is 4-D
        (x, y, z, t) with ``frame_times`` in seconds: from Trigger Time when set, else from
        Acquisition/Content Time relative to the first frame, else 0, 1, 2, ... with
        ``meta["frame_times_assumed"]``.

    Raises
    ------
    InputError
        Empty folder, several series and no ``series_uid``, a missing slice, frames on
        different slice grids, tilted or misaligned slices.
    """
    progress = progress or noop_progress
    folder = _require_folder(folder)
    series = list_dicom_series(folder)
    chosen = _choose_series(folder, series, series_uid)
    files = chosen.files

    slices = []
    for n, path in enumerate(files):
        if cancel is not None:
            cancel.raise_if_cancelled()
        slices.append(slice_header(path))
        progress(n + 1, len(files), {"stage": "reading DICOM headers"})

    meta = {
        "source": str(folder),
        "format": "dicom",
        "series_uid": chosen.uid,
        "series_description": chosen.description,
        "modality": chosen.modality,
    }
    if len(slices) == 1 or any(s.depth > 1 for s in slices):
        return _load_multiframe(slices, meta)

    normal = slice_normal(slices[0])
    along = np.array([s.position @ normal for s in slices])
    position_id = cluster_positions(along)
    frames, grouping = group_frames(slices, position_id)
    meta["frame_grouping"] = grouping
    check_grids(slices, frames, grouping)
    ordered = check_positions(slices, frames, position_id, along, grouping)

    pixel_type = _output_pixel_type(slices)
    images = []
    for t, frame in enumerate(ordered):
        if cancel is not None:
            cancel.raise_if_cancelled()
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames([slices[i].path for i in frame])
        if pixel_type is not None:
            reader.SetOutputPixelType(pixel_type)
        try:
            images.append(reader.Execute())
        except RuntimeError as exc:
            raise InputError(
                f"cannot read the pixel data of {frame_label(t, frames, grouping)} in {folder}: "
                f"{last_line(exc)}. A file may be damaged or compressed with a codec GDCM lacks."
            ) from None
        progress(t + 1, len(ordered), {"stage": "reading DICOM frames"})

    if len(images) == 1:
        volume = from_sitk(images[0], meta=meta)
    else:
        times, assumed = frame_times(slices, ordered)
        if assumed:
            meta["frame_times_assumed"] = True
        volume = from_sitk(images, frame_times=times, meta=meta)
    return volume.with_array(_compact_integers(volume.array))


def _series_ids(folder: Path) -> tuple[str, ...]:
    """GDCM's series UIDs, without ITK's console warning for a folder that has none."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.GlobalWarningDisplayOff()
    try:
        return tuple(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _require_folder(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"DICOM folder {folder} does not exist or is not a folder")
    return folder


def _choose_series(
    folder: Path, series: Sequence[DicomSeriesInfo], series_uid: str | None
) -> DicomSeriesInfo:
    listing = "\n  ".join(str(s) for s in series)
    if series_uid is not None:
        for s in series:
            if s.uid == series_uid.strip():
                return s
        raise InputError(
            f"{folder} has no series with UID {series_uid}; it holds:\n  {listing}"
        )
    if len(series) > 1:
        raise InputError(
            f"{folder} holds {len(series)} DICOM series; say which one to read with "
            f"series_uid=... (CLI: --series-uid UID), or give a folder with one series:\n  {listing}"
        )
    return series[0]


def _output_pixel_type(slices: list[SliceHeader]) -> int | None:
    """Float output when the rescale is fractional or varies between files, else ITK's choice."""
    rescales = {s.rescale for s in slices}
    integral = all(float(m).is_integer() and float(b).is_integer() for m, b in rescales)
    return None if integral and len(rescales) == 1 else sitk.sitkFloat32


def _compact_integers(array: np.ndarray) -> np.ndarray:
    """Integer data (HU after an integer intercept) as int16 when it fits, as scanners store it."""
    if np.issubdtype(array.dtype, np.integer) and array.dtype != np.int16 and array.size:
        if array.min() >= np.iinfo(np.int16).min and array.max() <= np.iinfo(np.int16).max:
            return array.astype(np.int16)
    return array


def _load_multiframe(slices: list[SliceHeader], meta: dict) -> Volume:
    if len(slices) > 1:
        raise InputError(
            f"{folder_name(slices)} holds multi-frame DICOM objects together with other files; "
            "ctp2mri reads one multi-frame file or a series of single-slice files. Convert it "
            "first (e.g. dcm2niix to NIfTI)."
        )
    try:
        image = sitk.ReadImage(slices[0].path)
    except RuntimeError as exc:
        raise InputError(f"cannot read {slices[0].path}: {last_line(exc)}") from None
    volume = from_sitk(image, meta=meta)
    return volume.with_array(_compact_integers(volume.array))
