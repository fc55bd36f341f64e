"""DICOM series (3-D CT/MR, 4-D CT perfusion) with SimpleITK and GDCM.

A CT-perfusion export is one DICOM series whose slice positions repeat once per time point.
Reading groups the files into frames (Temporal Position Identifier, else a time tag, else
the k-th repetition of each position in Instance Number order), checks that every frame
holds the same evenly spaced stack, and lets SimpleITK's `ImageSeriesReader` read each frame
so the geometry and the rescale slope/intercept come from ITK, not from hand-written code.

Geometry is the one of `ctp2mri.io.itk` (LPS→RAS handled there). Slices are ordered along
the slice normal (row × column cosines), so a volume written with a left-handed affine
(slice axis against the normal) reads back with its k axis reversed: the same image in
world space, on a right-handed grid.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk

from ctp2mri.errors import InputError
from ctp2mri.io.dicom_headers import (
    SliceHeader,
    last_line,
    number,
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

# Slices closer than this along the normal are the same position (DS strings carry ~1e-6 mm).
_SAME_POSITION_MM = 0.01
# Relative deviation from the median slice gap that counts as a missing slice.
_GAP_TOLERANCE = 0.01
# Orientation cosines / pixel spacing that differ by more than this are a different grid.
_GRID_TOLERANCE = 1e-4
# A clock that runs backwards by more than half a day crossed midnight.
_HALF_DAY_S = 43_200.0


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
    position_id = _cluster_positions(along)
    frames, grouping = _group_frames(slices, position_id)
    meta["frame_grouping"] = grouping
    _check_grids(slices, frames, grouping)
    ordered = _check_positions(slices, frames, position_id, along, grouping)

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
                f"cannot read the pixel data of {_frame_label(t, frames, grouping)} in {folder}: "
                f"{last_line(exc)}. A file may be damaged or compressed with a codec GDCM lacks."
            ) from None
        progress(t + 1, len(ordered), {"stage": "reading DICOM frames"})

    if len(images) == 1:
        volume = from_sitk(images[0], meta=meta)
    else:
        times, assumed = _frame_times(slices, ordered)
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


def _cluster_positions(along: np.ndarray) -> np.ndarray:
    """Label each slice with the index of its position along the normal (ascending)."""
    order = np.argsort(along, kind="stable")
    new_position = np.diff(along[order]) > _SAME_POSITION_MM
    labels = np.empty(along.size, dtype=np.int64)
    labels[order] = np.concatenate([[0], np.cumsum(new_position)])
    return labels


def _group_frames(slices: list[SliceHeader], position_id: np.ndarray) -> tuple[list[list[int]], str]:
    """Split the files into time frames; returns the frames (file indices) and the rule used."""
    max_repeats = int(np.bincount(position_id).max())

    def by_value(values: Sequence, sort_key: Callable) -> list[list[int]] | None:
        groups: dict = {}
        for i, v in enumerate(values):
            groups.setdefault(v, []).append(i)
        frames = [groups[v] for v in sorted(groups, key=sort_key)]
        if any(len(set(position_id[f])) != len(f) for f in frames):
            return None  # a position twice in one "frame": this tag does not mark frames
        return frames

    # An explicit temporal index is trusted whenever it is consistent.
    ids = [s.temporal_id for s in slices]
    if all(v is not None for v in ids):
        frames = by_value(ids, lambda v: (number(v) is None, number(v) or 0.0, v))
        if frames is not None:
            return frames, "Temporal Position Identifier"
    if max_repeats == 1:
        return [list(range(len(slices)))], "single frame"
    # Times may also differ slice by slice within a frame; only a split into exactly as
    # many groups as positions repeat is taken to mean one time per frame.
    for key in ("Acquisition Time", "Trigger Time", "Content Time"):
        values = [s.times[key] for s in slices]
        if all(v is not None for v in values):
            frames = by_value(values, float)
            if frames is not None and len(frames) == max_repeats:
                return frames, key
    # Fallback: the k-th file of each position (in Instance Number order) is frame k.
    def instance_order(i: int) -> tuple:
        return (slices[i].instance is None, slices[i].instance or 0, slices[i].path)

    order = sorted(range(len(slices)), key=instance_order)
    seen: Counter = Counter()
    frames = [[] for _ in range(max_repeats)]
    for i in order:
        frames[seen[position_id[i]]].append(i)
        seen[position_id[i]] += 1
    return frames, "repeated slice positions"


def _frame_label(t: int, frames: list[list[int]], grouping: str) -> str:
    if len(frames) == 1:
        return "the series"
    return f"frame {t} (of {len(frames)}, grouped by {grouping})"


def _check_grids(slices: list[SliceHeader], frames: list[list[int]], grouping: str) -> None:
    """Every file must have the orientation, matrix and pixel spacing of the first one."""
    ref = slices[frames[0][0]]
    for t, frame in enumerate(frames):
        for i in frame:
            s = slices[i]
            problems = []
            if s.size != ref.size:
                problems.append(f"matrix {s.size[0]}×{s.size[1]} instead of {ref.size[0]}×{ref.size[1]}")
            if np.abs(s.orientation - ref.orientation).max() > _GRID_TOLERANCE:
                problems.append(
                    f"orientation {np.round(s.orientation, 4).tolist()} instead of "
                    f"{np.round(ref.orientation, 4).tolist()}"
                )
            if np.abs(s.pixel_spacing - ref.pixel_spacing).max() > _GRID_TOLERANCE:
                problems.append(
                    f"pixel spacing {s.pixel_spacing.tolist()} mm instead of "
                    f"{ref.pixel_spacing.tolist()} mm"
                )
            if problems:
                where = _frame_label(t, frames, grouping)
                raise InputError(
                    f"{where} is not on the slice grid of the rest: {Path(s.path).name} has "
                    f"{'; '.join(problems)}. All slices (and all CTP frames) must share one grid; "
                    "export the series again or pick the series that has them all."
                )


def _check_positions(
    slices: list[SliceHeader],
    frames: list[list[int]],
    position_id: np.ndarray,
    along: np.ndarray,
    grouping: str,
) -> list[list[int]]:
    """Check that each frame is the same complete, evenly spaced, aligned stack.

    Returns the frames with their files sorted along the slice normal.
    """
    ref_t = max(range(len(frames)), key=lambda t: len(frames[t]))
    reference = set(position_id[frames[ref_t]].tolist())

    def place(pid: int) -> str:
        i = int(np.flatnonzero(position_id == pid)[0])
        ipp = np.round(slices[i].position, 3).tolist()
        return f"{along[i]:.3f} mm along the slice normal (Image Position {ipp})"

    for t, frame in enumerate(frames):
        here = set(position_id[frame].tolist())
        if here - reference:
            raise InputError(
                f"{_frame_label(t, frames, grouping)} is not on the slice grid of frame {ref_t}: it "
                f"has a slice at {place(min(here - reference))}, which frame {ref_t} lacks. All CTP "
                "frames must cover the same slice positions; export the perfusion series again."
            )
        if reference - here:
            missing = sorted(reference - here)
            raise InputError(
                f"{_frame_label(t, frames, grouping)} has {len(here)} slices but frame {ref_t} has "
                f"{len(reference)}: {len(missing)} slice(s) missing, the first at {place(missing[0])}. "
                "Copy the whole series (a file is probably missing)."
            )

    ordered = [sorted(frame, key=lambda i: along[i]) for frame in frames]
    stack = ordered[ref_t]
    gaps = np.diff(along[stack])
    if gaps.size > 1:
        spacing = float(np.median(gaps))
        bad = np.flatnonzero(np.abs(gaps - spacing) > _GAP_TOLERANCE * spacing)
        if bad.size:
            k = int(bad[0])
            raise InputError(
                f"the slices of {_folder_name(slices)} are not evenly spaced: the gap between "
                f"{along[stack[k]]:.3f} and {along[stack[k + 1]]:.3f} mm along the slice normal is "
                f"{gaps[k]:.3f} mm where the others are {spacing:.3f} mm, so "
                f"{'a slice is missing' if gaps[k] > spacing else 'a slice is duplicated or misplaced'} "
                f"there{' (in every frame)' if len(frames) > 1 else ''}. Copy the whole series, or "
                "resample it to even spacing."
            )
    # Slices must lie on one line along the normal: ITK takes the first slice's origin, so
    # in-plane shifts (gantry tilt, a moved frame) would silently distort the volume.
    offsets = np.array([[s.position @ s.orientation[:3], s.position @ s.orientation[3:]] for s in slices])
    shift = np.abs(offsets - offsets[stack[0]]).max(axis=1)
    if shift.max() > _SAME_POSITION_MM:
        if shift[stack].max() > _SAME_POSITION_MM:
            raise InputError(
                f"the slices of {_folder_name(slices)} are shifted in-plane against each other by up "
                f"to {shift.max():.3f} mm (gantry tilt or a sheared stack); ctp2mri needs a "
                "rectilinear stack. Reconstruct without tilt or correct it first (dcm2niix does)."
            )
        worst = int(np.argmax(shift))
        t = next(t for t, frame in enumerate(frames) if worst in frame)
        raise InputError(
            f"{_frame_label(t, frames, grouping)} is shifted in-plane by {shift.max():.3f} mm against "
            f"frame {ref_t}; all CTP frames must share one grid. Register or resample the frames first."
        )
    return ordered


def _folder_name(slices: list[SliceHeader]) -> str:
    return str(Path(slices[0].path).parent)


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


def _frame_times(slices: list[SliceHeader], frames: list[list[int]]) -> tuple[np.ndarray, bool]:
    """Per-frame start times in seconds, and whether they had to be assumed."""
    for key in ("Trigger Time", "Acquisition Time", "Content Time"):
        values = [[slices[i].times[key] for i in frame] for frame in frames]
        if any(v is None for frame in values for v in frame):
            continue
        times = np.array([min(frame) for frame in values], dtype=np.float64)
        if key == "Trigger Time":
            times = times / 1000.0  # ms after the trigger
        else:
            times = np.where(times < times[0] - _HALF_DAY_S, times + 86_400.0, times) - times[0]
        if np.all(np.diff(times) > 0):
            return times, False
    return np.arange(len(frames), dtype=np.float64), True


def _load_multiframe(slices: list[SliceHeader], meta: dict) -> Volume:
    if len(slices) > 1:
        raise InputError(
            f"{_folder_name(slices)} holds multi-frame DICOM objects together with other files; "
            "ctp2mri reads one multi-frame file or a series of single-slice files. Convert it "
            "first (e.g. dcm2niix to NIfTI)."
        )
    try:
        image = sitk.ReadImage(slices[0].path)
    except RuntimeError as exc:
        raise InputError(f"cannot read {slices[0].path}: {last_line(exc)}") from None
    volume = from_sitk(image, meta=meta)
    return volume.with_array(_compact_integers(volume.array))




__all__ = ["DicomSeriesInfo", "list_dicom_series", "load_dicom_series"]
