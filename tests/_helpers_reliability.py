"""Tiny inputs for the reliability and fuzz tests: a head-like CTP small enough to synthesise in
seconds, and NIfTI files with broken headers or contents that the writers would refuse to make."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from ctp2mri.io.nifti import save_nifti
from ctp2mri.io.volume import Volume

SHAPE = (48, 56, 16)
SPACING = (4.0, 4.0, 8.0)
FRAMES = 15


def head_affine(shape=SHAPE, spacing=SPACING, shift=(0.0, 0.0, 0.0)) -> np.ndarray:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(np.array(shape) - 1) / 2 * np.array(spacing) + np.asarray(shift)
    return affine


def _radius(shape, spacing) -> np.ndarray:
    """Normalised ellipsoid radius of each voxel of a 130 × 160 × 110 mm brain centred in the grid."""
    affine = head_affine(shape, spacing)
    xyz = np.indices(shape).reshape(3, -1).T * np.asarray(spacing) + affine[:3, 3]
    return np.sqrt(((xyz / np.array([65.0, 80.0, 55.0])) ** 2).sum(-1)).reshape(shape)


def tiny_head(frames: int = FRAMES, shape=SHAPE, spacing=SPACING, seed: int = 0) -> Volume:
    """A CT perfusion of an ellipsoidal ~1.2 l brain (30 HU, a contrast bolus) in a skull, in air."""
    rng = np.random.default_rng(seed)
    r = _radius(shape, spacing)
    base = np.where(r < 1.0, 30.0, np.where(r < 1.12, 1000.0, -1000.0))
    t = np.arange(frames) * (14.0 / max(frames - 1, 1))
    curve = 40.0 * np.exp(-((t - 5.0) / 2.5) ** 2)
    array = base[..., None] + (r < 1.0)[..., None] * curve + rng.normal(0, 3, (*shape, frames))
    return Volume(array.astype(np.int16), head_affine(shape, spacing), frame_times=t * 1.5)


def brain_of(ctp: Volume) -> Volume:
    return Volume((_radius(ctp.spatial_shape, ctp.spacing) < 1.0).astype(np.uint8), ctp.affine)


def mri_like(ctp: Volume, value: float = 800.0, shift=(0.0, 0.0, 0.0)) -> Volume:
    """A 3-D image on the CTP's grid (optionally moved by ``shift`` mm): brain ``value``, 0 outside."""
    brain = brain_of(ctp).array.astype(np.float32) * value
    return Volume(brain, head_affine(ctp.spatial_shape, ctp.spacing, shift))


def save(volume: Volume, path: Path) -> Path:
    return save_nifti(volume, path)


def save_raw(array: np.ndarray, path: Path, affine: np.ndarray | None = None) -> Path:
    """A NIfTI with whatever array and sform are given (nibabel alone, none of our checks);
    ``path`` must end in ``.nii`` when ``affine`` is given (the header is patched in place)."""
    assert affine is None or str(path).endswith(".nii")
    image = nib.Nifti1Image(np.asarray(array), np.eye(4))
    nib.save(image, str(path))
    if affine is not None:  # the header's sform, written as is: nibabel would refuse a NaN affine
        header = nib.load(str(path)).header.copy()
        header["srow_x"], header["srow_y"], header["srow_z"] = affine[0], affine[1], affine[2]
        header["sform_code"], header["qform_code"] = 1, 0
        data = bytearray(Path(path).read_bytes())
        data[:348] = header.binaryblock
        Path(path).write_bytes(bytes(data))
    return Path(path)


def listing(folder: Path) -> list[str]:
    """Everything under ``folder``, hidden files included, as sorted relative paths."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))
