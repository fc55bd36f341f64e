"""SimpleITK ↔ `Volume` with exact geometry, and NRRD/MHA files.

ITK images live in LPS world coordinates with index order (x, y, z) and NumPy views in
(z, y, x); `Volume` follows nibabel (RAS+, index order (i, j, k)). The conversion flips the
first two world axes and transposes the array, nothing else, so round trips are exact.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ctp2mri.errors import InputError
from ctp2mri.io.atomic import atomic_path
from ctp2mri.io.volume import Volume

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def affine_from_sitk(image: sitk.Image) -> np.ndarray:
    """4×4 RAS+ affine of a 3-D SimpleITK image."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS @ direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = _LPS_TO_RAS @ np.asarray(image.GetOrigin(), dtype=np.float64)
    return affine


def set_sitk_geometry(image: sitk.Image, affine: np.ndarray) -> sitk.Image:
    """Give a 3-D SimpleITK image the geometry of a RAS+ ``affine`` (in place)."""
    affine = np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise InputError(f"affine has a zero-length axis (spacing {spacing}); it is not a valid grid")
    direction = _LPS_TO_RAS @ affine[:3, :3] / spacing
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(d) for d in direction.ravel()])
    image.SetOrigin([float(o) for o in _LPS_TO_RAS @ affine[:3, 3]])
    return image


def frame_to_sitk(array3d: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """A 3-D (i, j, k) array and RAS+ affine as a SimpleITK image (array is copied)."""
    if array3d.ndim != 3:
        raise InputError(f"expected a 3-D array, got shape {array3d.shape}")
    if array3d.dtype == np.bool_:  # SimpleITK has no boolean pixel type
        array3d = array3d.astype(np.uint8)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array3d, (2, 1, 0))))
    return set_sitk_geometry(image, affine)


def to_sitk(volume: Volume) -> sitk.Image | list[sitk.Image]:
    """3-D volume → one image; 4-D volume → one image per frame (ITK has no 4-D resampler)."""
    if volume.is_4d:
        return [frame_to_sitk(volume.array[..., t], volume.affine) for t in range(volume.n_frames)]
    return frame_to_sitk(volume.array, volume.affine)


def from_sitk(image: sitk.Image | list[sitk.Image], frame_times=None, meta=None) -> Volume:
    """One 3-D image, or a list of same-grid frames, as a `Volume`."""
    if isinstance(image, (list, tuple)):
        if not image:
            raise InputError("no frames given")
        affine = affine_from_sitk(image[0])
        arrays = []
        for n, frame in enumerate(image):
            if frame.GetSize() != image[0].GetSize() or not np.allclose(affine_from_sitk(frame), affine, atol=1e-4):
                raise InputError(f"frame {n} is not on the grid of frame 0; all CTP frames must share one grid")
            arrays.append(np.transpose(sitk.GetArrayViewFromImage(frame), (2, 1, 0)))
        return Volume(np.stack(arrays, axis=-1), affine, frame_times=frame_times, meta=dict(meta or {}))
    if image.GetDimension() == 4:
        arr = np.transpose(sitk.GetArrayFromImage(image), (3, 2, 1, 0))
        img3 = sitk.GetImageFromArray(np.zeros((1, 1, 1), np.uint8))
        img3.SetSpacing(image.GetSpacing()[:3])
        img3.SetOrigin(image.GetOrigin()[:3])
        d = np.asarray(image.GetDirection()).reshape(4, 4)[:3, :3]
        img3.SetDirection([float(x) for x in d.ravel()])
        return Volume(arr, affine_from_sitk(img3), frame_times=frame_times, meta=dict(meta or {}))
    if image.GetDimension() != 3:
        raise InputError(f"expected a 3-D or 4-D image, got {image.GetDimension()}-D")
    if image.GetNumberOfComponentsPerPixel() > 1:
        arr = np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0, 3))
    else:
        arr = np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))
    return Volume(arr, affine_from_sitk(image), frame_times=frame_times, meta=dict(meta or {}))


def load_itk(path: str | os.PathLike) -> Volume:
    """Read NRRD, MHA/MHD or any single-file format SimpleITK knows."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist or is not a file")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"cannot read {path}: the file is damaged or not an image SimpleITK knows ({str(exc).strip().splitlines()[-1]})") from None
    frame_times = None
    if image.GetDimension() == 4:
        # save_itk keeps the frame interval and first time on the 4th axis
        step, start = image.GetSpacing()[3], image.GetOrigin()[3]
        frame_times = start + step * np.arange(image.GetSize()[3])
    return from_sitk(image, frame_times=frame_times, meta={"source": str(path)})


def save_itk(volume: Volume, path: str | os.PathLike) -> Path:
    """Write a 3-D or 4-D volume as NRRD/MHA (4-D as a 4-D image, time spacing = frame interval)."""
    path = Path(path)
    if volume.is_4d:
        array = volume.array.astype(np.uint8) if volume.array.dtype == np.bool_ else volume.array
        image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (3, 2, 1, 0))), isVector=False)
        ref = frame_to_sitk(volume.array[..., 0], volume.affine)
        d4 = np.eye(4)
        d4[:3, :3] = np.asarray(ref.GetDirection()).reshape(3, 3)
        # The time axis holds the frame interval and first frame time (as NIfTI's pixdim[4]
        # and toffset), so frame times survive a round trip when they are evenly spaced.
        times = volume.frame_times
        step = float(np.median(np.diff(times))) if times is not None and times.size > 1 else 1.0
        start = float(times[0]) if times is not None else 0.0
        image.SetSpacing(list(ref.GetSpacing()) + [step if step > 0 else 1.0])
        image.SetOrigin(list(ref.GetOrigin()) + [start])
        image.SetDirection([float(x) for x in d4.ravel()])
    else:
        image = frame_to_sitk(volume.array, volume.affine)
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)
    return path
