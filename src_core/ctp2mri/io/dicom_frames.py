"""How the files of one DICOM series make up time frames, and the checks that they do.

Files are grouped into frames (Temporal Position Identifier, else a time tag, else the k-th
repetition of each slice position in Instance Number order); every frame must then hold the
same complete, evenly spaced, aligned stack on one slice grid. Used by
`ctp2mri.io.dicom.load_dicom_series`.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ctp2mri.errors import InputError
from ctp2mri.io.dicom_headers import SliceHeader, number

__all__ = ["check_grids", "check_positions", "cluster_positions", "folder_name", "frame_label",
           "frame_times", "group_frames"]

# Slices closer than this along the normal are the same position (DS strings carry ~1e-6 mm).
_SAME_POSITION_MM = 0.01
# Relative deviation from the median slice gap that counts as a missing slice.
_GAP_TOLERANCE = 0.01
# Orientation cosines / pixel spacing that differ by more than this are a different grid.
_GRID_TOLERANCE = 1e-4
# A clock that runs backwards by more than half a day crossed midnight.
_HALF_DAY_S = 43_200.0


def cluster_positions(along: np.ndarray) -> np.ndarray:
    """Label each slice with the index of its position along the normal (ascending)."""
    order = np.argsort(along, kind="stable")
    new_position = np.diff(along[order]) > _SAME_POSITION_MM
    labels = np.empty(along.size, dtype=np.int64)
    labels[order] = np.concatenate([[0], np.cumsum(new_position)])
    return labels


def group_frames(slices: list[SliceHeader], position_id: np.ndarray) -> tuple[list[list[int]], str]:
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


def frame_label(t: int, frames: list[list[int]], grouping: str) -> str:
    """Frame ``t`` as messages name it ("the series" when there is only one)."""
    if len(frames) == 1:
        return "the series"
    return f"frame {t} (of {len(frames)}, grouped by {grouping})"


def check_grids(slices: list[SliceHeader], frames: list[list[int]], grouping: str) -> None:
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
                where = frame_label(t, frames, grouping)
                raise InputError(
                    f"{where} is not on the slice grid of the rest: {Path(s.path).name} has "
                    f"{'; '.join(problems)}. All slices (and all CTP frames) must share one grid; "
                    "export the series again or pick the series that has them all."
                )


def check_positions(
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
                f"{frame_label(t, frames, grouping)} is not on the slice grid of frame {ref_t}: it "
                f"has a slice at {place(min(here - reference))}, which frame {ref_t} lacks. All CTP "
                "frames must cover the same slice positions; export the perfusion series again."
            )
        if reference - here:
            missing = sorted(reference - here)
            raise InputError(
                f"{frame_label(t, frames, grouping)} has {len(here)} slices but frame {ref_t} has "
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
                f"the slices of {folder_name(slices)} are not evenly spaced: the gap between "
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
                f"the slices of {folder_name(slices)} are shifted in-plane against each other by up "
                f"to {shift.max():.3f} mm (gantry tilt or a sheared stack); ctp2mri needs a "
                "rectilinear stack. Reconstruct without tilt or correct it first (dcm2niix does)."
            )
        worst = int(np.argmax(shift))
        t = next(t for t, frame in enumerate(frames) if worst in frame)
        raise InputError(
            f"{frame_label(t, frames, grouping)} is shifted in-plane by {shift.max():.3f} mm against "
            f"frame {ref_t}; all CTP frames must share one grid. Register or resample the frames first."
        )
    return ordered


def folder_name(slices: list[SliceHeader]) -> str:
    """The folder of the series, for messages."""
    return str(Path(slices[0].path).parent)


def frame_times(slices: list[SliceHeader], frames: list[list[int]]) -> tuple[np.ndarray, bool]:
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

