"""Small volumes and grids shared by the I/O tests (not a conftest: that file is the lead's)."""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

from ctp2mri.io.volume import Volume

SHAPE_3D = (16, 12, 6)
N_FRAMES = 5


def _f32(affine: np.ndarray) -> np.ndarray:
    """Round to float32: NIfTI-1 stores the sform in float32, so only such affines can be exact."""
    return affine.astype(np.float32).astype(np.float64)


def make_affine(kind: str) -> np.ndarray:
    """A 4×4 RAS+ affine of a named orientation (entries exactly representable in float32).

    ``ras``: 1 mm identity-like; ``lps``: axes run right→left and anterior→posterior;
    ``oblique``: rotated about all three axes; ``aniso``: 0.7 × 0.9 × 5 mm, shifted origin.
    """
    affine = np.eye(4)
    if kind == "ras":
        affine[:3, 3] = [-8.0, -6.0, -3.0]
    elif kind == "lps":
        affine[:3, :3] = np.diag([-1.0, -1.0, 2.0])
        affine[:3, 3] = [8.0, 6.0, -6.0]
    elif kind == "oblique":
        rotation = Rotation.from_euler("xyz", [12.0, -25.0, 33.0], degrees=True).as_matrix()
        affine[:3, :3] = rotation @ np.diag([0.8, 0.9, 2.5])
        affine[:3, 3] = [-40.125, 12.5, 33.25]
    elif kind == "aniso":
        affine[:3, :3] = np.diag([0.7, 0.9, 5.0])
        affine[:3, 3] = [-5.6, -5.4, -15.0]
    else:
        raise ValueError(kind)
    return _f32(affine)


ORIENTATIONS = ("ras", "lps", "oblique", "aniso")


def ctp_volume(kind: str = "oblique", shape=SHAPE_3D, n_frames: int = N_FRAMES, seed: int = 0) -> Volume:
    """A random int16 HU 4-D volume with frame times 0, 1.5, 3, ... s."""
    rng = np.random.default_rng(seed)
    array = rng.integers(-1024, 3072, size=(*shape, n_frames)).astype(np.int16)
    return Volume(array, make_affine(kind), frame_times=1.5 * np.arange(n_frames))


def volume_3d(kind: str = "oblique", dtype=np.int16, shape=SHAPE_3D, seed: int = 0) -> Volume:
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.floating):
        array = rng.normal(100.0, 50.0, size=shape).astype(dtype)
    else:
        info = np.iinfo(dtype)
        array = rng.integers(max(info.min, -1024), min(info.max, 3072), size=shape, endpoint=True).astype(dtype)
    return Volume(array, make_affine(kind))


def world(affine: np.ndarray, ijk) -> np.ndarray:
    """RAS+ mm of voxel index ``ijk``."""
    return (affine @ np.append(np.asarray(ijk, dtype=np.float64), 1.0))[:3]
