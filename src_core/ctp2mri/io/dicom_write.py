"""Write 3-D volumes and 4-D CT perfusion as DICOM series (SimpleITK), atomically.

Used to export the phantom and to make DICOM input for tests; the geometry comes from
`ctp2mri.io.itk`, so a series written here reads back through `load_dicom_series` with
the same array and affine.
"""

from __future__ import annotations

import functools
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterable

import numpy as np
import SimpleITK as sitk

from ctp2mri.errors import InputError
from ctp2mri.io.atomic import atomic_dir
from ctp2mri.io.dicom_tags import (
    SECONDARY_CAPTURE,
    SOP_CLASS,
    TAG_ACQUISITION_TIME,
    TAG_CONTENT_TIME,
    TAG_INSTANCE_NUMBER,
    TAG_MODALITY,
    TAG_PATIENT_ID,
    TAG_RESCALE_INTERCEPT,
    TAG_RESCALE_SLOPE,
    TAG_SERIES_DESCRIPTION,
    TAG_SERIES_UID,
    TAG_TEMPORAL_POSITION,
    TAG_TEMPORAL_POSITIONS,
    TAG_TRIGGER_TIME,
)
from ctp2mri.io.itk import frame_to_sitk
from ctp2mri.io.volume import Volume


@functools.cache
def _gdcm_dictionaries_loaded() -> None:
    """Have GDCM read one DICOM file before this process writes any.

    GDCM loads the dictionaries it checks a data set against on its first read. Before that,
    it writes an MR slice that carries a rescale as Enhanced MR Image Storage, whose position
    and orientation sit in per-frame sequences that `ctp2mri.io.dicom` (and many viewers)
    do not place; after it, as the MR Image Storage we ask for. One read of a 1-voxel file
    makes every write the same, whatever the process did before.
    """
    with tempfile.TemporaryDirectory(prefix="ctp2mri-gdcm-") as tmp:
        path = os.path.join(tmp, "init.dcm")
        sitk.WriteImage(sitk.Image([1, 1, 1], sitk.sitkInt16), path)
        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        reader.ReadImageInformation()


def write_dicom_series(
    volume: Volume,
    folder: str | os.PathLike,
    *,
    modality: str = "CT",
    series_description: str | None = None,
    patient_id: str = "PHANTOM",
    frame_times: Iterable[float] | None = None,
    study_uid: str | None = None,
    series_number: int = 1,
    overwrite: bool = False,
) -> Path:
    """Write a 3-D or 4-D volume as a DICOM series, one file per slice and frame.

    Pixels are stored as int16 with a rescale slope/intercept: integer data whose range
    spans at most 65536 values (HU) round-trip exactly; other data are quantised to 65535
    levels between their minimum and maximum.

    Parameters
    ----------
    volume
        3-D or 4-D (x, y, z, t) volume; the affine's i and j axes must be orthogonal (DICOM
        rows and columns). Slices are written along k.
    folder
        Output folder, created atomically (all files appear together, or none).
    modality
        DICOM modality; ``"CT"`` and ``"MR"`` get their image SOP class, others secondary
        capture.
    series_description, patient_id
        Written to the headers (Patient's Name is set to the ID).
    frame_times
        Seconds of each frame for a 4-D volume; default ``volume.frame_times``, else
        0, 1, 2, ... . Written as Trigger Time (ms) and Acquisition Time.
    study_uid, series_number
        Put several exported series (CTP, DWI, ADC) into one study.
    overwrite
        Replace an existing non-empty ``folder``.

    Returns
    -------
    Path
        ``folder``.
    """
    folder = Path(folder)
    volume.require_finite("volume to export as DICOM")
    affine = volume.affine
    _require_dicom_grid(affine)
    n_frames = volume.n_frames
    if volume.is_4d:
        times = np.asarray(
            list(frame_times) if frame_times is not None
            else volume.frame_times if volume.frame_times is not None
            else np.arange(n_frames), dtype=np.float64,
        )
        if times.shape != (n_frames,):
            raise InputError(
                f"frame_times has {times.size} entries for {n_frames} frames; give one per frame"
            )
    else:
        times = None
    stored, slope, intercept = _int16_encoding(volume.array)
    # ITK's writer takes real-world values and applies the inverse rescale itself (with
    # rounding), so hand it the exactly representable values of the stored integers.
    real = stored.astype(np.float64) * slope + intercept

    modality = modality.upper()
    study_uid = study_uid or _new_uid()
    series_uid = _new_uid()
    frame_of_reference = _new_uid()
    today = time.strftime("%Y%m%d")
    description = series_description or ("ctp2mri CT perfusion" if volume.is_4d else "ctp2mri volume")
    common = {
        "0008|0008": "DERIVED\\SECONDARY",
        "0008|0016": SOP_CLASS.get(modality, SECONDARY_CAPTURE),
        "0008|0020": today,
        "0008|0021": today,
        "0008|0022": today,
        "0008|0023": today,
        "0008|0030": "080000.000000",
        TAG_MODALITY: modality,
        TAG_SERIES_DESCRIPTION: description[:64],
        "0010|0010": patient_id[:64],
        TAG_PATIENT_ID: patient_id[:64],
        "0020|000d": study_uid,
        TAG_SERIES_UID: series_uid,
        "0020|0011": str(int(series_number)),
        "0020|0052": frame_of_reference,
        "0018|0050": _ds(volume.spacing[2]),
        "0018|0088": _ds(volume.spacing[2]),
        TAG_RESCALE_INTERCEPT: _ds(intercept),
        TAG_RESCALE_SLOPE: _ds(slope),
        "0028|1054": "HU" if modality == "CT" else "US",
        # The stored type for ITK's inverse rescale of a float buffer: signed 16 bit.
        "0028|0100": "16",
        "0028|0101": "16",
        "0028|0102": "15",
        "0028|0103": "1",
    }
    if volume.is_4d:
        common[TAG_TEMPORAL_POSITIONS] = str(n_frames)
    n_slices = volume.spatial_shape[2]
    normal = affine[:3, 2] / np.linalg.norm(affine[:3, 2])

    _gdcm_dictionaries_loaded()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()  # keep our UIDs: one series, one study, unique SOPs
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        for t in range(n_frames):
            frame = real[..., t] if volume.is_4d else real
            for k in range(n_slices):
                slice_affine = affine.copy()
                slice_affine[:3, 3] = affine[:3, :3] @ np.array([0.0, 0.0, k]) + affine[:3, 3]
                image = frame_to_sitk(frame[:, :, k : k + 1], slice_affine)
                number = t * n_slices + k + 1
                tags = dict(common)
                tags.update({
                    "0008|0018": _new_uid(),
                    TAG_INSTANCE_NUMBER: str(number),
                    "0020|1041": _ds(float(slice_affine[:3, 3] @ normal)),
                })
                if times is not None:
                    clock = _dicom_tm(8 * 3600.0 + times[t])
                    tags.update({
                        TAG_TEMPORAL_POSITION: str(t + 1),
                        TAG_TRIGGER_TIME: _ds(times[t] * 1000.0),
                        TAG_ACQUISITION_TIME: clock,
                        TAG_CONTENT_TIME: clock,
                    })
                for key, value in tags.items():
                    image.SetMetaData(key, value)
                writer.SetFileName(str(tmp / f"IM{number:06d}.dcm"))
                writer.Execute(image)
    return folder


def _require_dicom_grid(affine: np.ndarray) -> None:
    columns = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    if abs(columns[:, 0] @ columns[:, 1]) > 1e-6:
        raise InputError(
            "the volume's i and j axes are not perpendicular (sheared affine); DICOM rows and "
            "columns must be. Resample the volume onto a rectilinear grid first."
        )


def _int16_encoding(array: np.ndarray) -> tuple[np.ndarray, float, float]:
    """int16 stored values and (slope, intercept) with ``value = stored * slope + intercept``."""
    lo16, hi16 = np.iinfo(np.int16).min, np.iinfo(np.int16).max
    data = array.astype(np.float64) if array.dtype == np.bool_ else array
    lo, hi = float(data.min()), float(data.max())
    integral = np.issubdtype(data.dtype, np.integer) or bool(np.all(data == np.rint(data)))
    if integral and lo >= lo16 and hi <= hi16:
        return data.astype(np.int16), 1.0, 0.0
    if integral and hi - lo <= hi16 - lo16:
        # Shift the range into int16, still exact. The intercept is centred; 32768 is avoided
        # because GDCM then declares uint16 output and ITK refuses to read the file back.
        low_b, high_b = hi - hi16, lo - lo16
        intercept = float(min(max(np.floor((lo + hi) / 2.0), low_b), high_b))
        if intercept == 32768.0:
            intercept = 32769.0 if high_b >= 32769 else 32767.0 if low_b <= 32767 else np.nan
        if np.isfinite(intercept):
            return (data.astype(np.float64) - intercept).astype(np.int16), 1.0, intercept
    # Quantise to 65535 levels; slope and intercept are the values their DS strings hold.
    slope = float(_ds((hi - lo) / 65534.0 * 1.0001)) or 1.0
    intercept = float(_ds((hi + lo) / 2.0))
    stored = np.clip(np.rint((data.astype(np.float64) - intercept) / slope), lo16, hi16)
    return stored.astype(np.int16), slope, intercept


def _ds(value: float) -> str:
    """A decimal string that fits DICOM's 16-character DS field."""
    value = float(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    for digits in range(15, 5, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    return f"{value:.6g}"


def _dicom_tm(seconds: float) -> str:
    """DICOM TM (HHMMSS.FFFFFF) of seconds since midnight, to the microsecond."""
    micro = int(round(seconds * 1e6)) % (86_400 * 10**6)
    whole, frac = divmod(micro, 10**6)
    hh, rest = divmod(whole, 3600)
    mm, ss = divmod(rest, 60)
    return f"{hh:02d}{mm:02d}{ss:02d}.{frac:06d}"


def _new_uid() -> str:
    """A globally unique DICOM UID from a random UUID (the standard's 2.25 root)."""
    return f"2.25.{uuid.uuid4().int}"


__all__ = ["write_dicom_series"]
