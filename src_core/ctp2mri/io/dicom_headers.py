"""Per-file DICOM header fields that decide where a file's pixels belong (SimpleITK)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from ctp2mri.errors import InputError
from ctp2mri.io.dicom_tags import (
    TAG_ACQUISITION_TIME,
    TAG_CONTENT_TIME,
    TAG_IMAGE_ORIENTATION,
    TAG_IMAGE_POSITION,
    TAG_INSTANCE_NUMBER,
    TAG_RESCALE_INTERCEPT,
    TAG_RESCALE_SLOPE,
    TAG_TEMPORAL_POSITION,
    TAG_TRIGGER_TIME,
)

__all__ = ["SliceHeader", "dicom_time", "last_line", "number", "numbers", "read_header",
           "slice_header", "slice_normal", "tag_value"]


def last_line(exc: BaseException) -> str:
    """The informative last line of an ITK exception message."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(exc).__name__


@dataclass
class SliceHeader:
    """The header fields of one file that decide where its pixels belong."""

    path: str
    position: np.ndarray  # ImagePositionPatient, LPS mm
    orientation: np.ndarray  # ImageOrientationPatient, 6 cosines
    size: tuple[int, int]  # columns, rows
    pixel_spacing: np.ndarray
    depth: int  # frames inside the file (multi-frame objects)
    instance: int | None
    temporal_id: str | None
    times: dict[str, float | None] = field(default_factory=dict)
    rescale: tuple[float, float] = (1.0, 0.0)  # slope, intercept



def read_header(path: str) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"cannot read DICOM header of {path}: {last_line(exc)}") from None
    return reader


def tag_value(reader: sitk.ImageFileReader, key: str) -> str | None:
    """A tag's value, stripped; None when absent, empty or not decodable."""
    if not reader.HasMetaDataKey(key):
        return None
    try:
        value = reader.GetMetaData(key).strip().strip("\x00").strip()
    except (RuntimeError, UnicodeDecodeError):
        return None
    return value or None


def numbers(text: str | None) -> np.ndarray | None:
    if text is None:
        return None
    try:
        return np.array([float(v) for v in text.split("\\")], dtype=np.float64)
    except ValueError:
        return None


def number(text: str | None) -> float | None:
    values = numbers(text)
    return float(values[0]) if values is not None and values.size else None


def dicom_time(text: str | None) -> float | None:
    """Seconds since midnight of a DICOM TM value (``HHMMSS.FFFFFF``, also ``HH:MM:SS``)."""
    if text is None:
        return None
    main, _, frac = text.replace(":", "").partition(".")
    if not main.isdigit() or len(main) not in (2, 4, 6) or (frac and not frac.isdigit()):
        return None
    hh, mm, ss = int(main[0:2]), int(main[2:4] or 0), int(main[4:6] or 0)
    return hh * 3600.0 + mm * 60.0 + ss + (float("0." + frac) if frac else 0.0)


def slice_header(path: str) -> SliceHeader:
    reader = read_header(path)
    position = numbers(tag_value(reader, TAG_IMAGE_POSITION))
    orientation = numbers(tag_value(reader, TAG_IMAGE_ORIENTATION))
    if position is None or position.size != 3 or orientation is None or orientation.size != 6:
        raise InputError(
            f"{path} has no valid Image Position/Orientation (Patient); without them the slices "
            "cannot be placed in space. Export the series as standard CT/MR images."
        )
    size = reader.GetSize()
    instance = number(tag_value(reader, TAG_INSTANCE_NUMBER))
    return SliceHeader(
        path=path,
        position=position,
        orientation=orientation,
        size=(int(size[0]), int(size[1])),
        pixel_spacing=np.asarray(reader.GetSpacing()[:2], dtype=np.float64),
        depth=int(size[2]) if len(size) > 2 else 1,
        instance=int(instance) if instance is not None else None,
        temporal_id=tag_value(reader, TAG_TEMPORAL_POSITION),
        times={
            "Trigger Time": number(tag_value(reader, TAG_TRIGGER_TIME)),
            "Acquisition Time": dicom_time(tag_value(reader, TAG_ACQUISITION_TIME)),
            "Content Time": dicom_time(tag_value(reader, TAG_CONTENT_TIME)),
        },
        rescale=(
            number(tag_value(reader, TAG_RESCALE_SLOPE)) or 1.0,
            number(tag_value(reader, TAG_RESCALE_INTERCEPT)) or 0.0,
        ),
    )


def slice_normal(s: SliceHeader) -> np.ndarray:
    normal = np.cross(s.orientation[:3], s.orientation[3:])
    length = np.linalg.norm(normal)
    if length < 0.5:
        raise InputError(f"{s.path} has a degenerate Image Orientation (Patient) {s.orientation.tolist()}")
    return normal / length
