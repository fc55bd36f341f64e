"""Which voxels of the model grid the inputs' fields of view cover.

A grid voxel outside the CTP has no measurement (its brain voxels are cut from the mask), and an
MRI that covers too little of the CTP's brain is most likely another head.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ctp2mri.errors import InputError
from ctp2mri.io.volume import Volume
from ctp2mri.preprocessing.resample import transform_matrix

__all__ = ["MIN_MRI_COVERAGE", "check_mri_coverage", "inside_field_of_view"]

MIN_MRI_COVERAGE = 0.5  # share of the CTP's brain the MRI must cover (else: not the same head)


def check_mri_coverage(ctp: Volume, mri: Volume, name: str, grid: tuple[np.ndarray, tuple[int, int, int]],
                       brain: np.ndarray, registered: bool, notices: list[str]) -> float:
    """Share of the model grid's brain inside the MRI's field of view; refuses one too small.

    Without registration an MRI that does not overlap the CTP (another patient, another
    session, world coordinates from another scanner) would be resampled to zeros and written
    as an all-black training target.
    """
    coverage = float((brain & inside_field_of_view(mri, grid, None)).sum() / brain.sum())
    if coverage < MIN_MRI_COVERAGE:
        gap = float(np.linalg.norm(_fov_centre(ctp) - _fov_centre(mri)))
        fix = ("registration did not align them: check that both show the same head" if registered else
               "check that both show the same head, or pass --register rigid to align the CTP to the DWI")
        raise InputError(f"the {name} covers only {100 * coverage:.0f} % of the CTP's brain (their fields of "
                         f"view are centred {gap:.0f} mm apart; at least {100 * MIN_MRI_COVERAGE:.0f} % is "
                         f"needed): {fix}")
    if registered:
        notices.append(f"after registration the {name} covers {100 * coverage:.0f} % of the CTP's brain")
    return round(coverage, 4)


def _fov_centre(volume: Volume) -> np.ndarray:
    return (volume.affine @ np.append((np.asarray(volume.spatial_shape) - 1) / 2.0, 1.0))[:3]


def inside_field_of_view(volume: Volume, grid: tuple[np.ndarray, tuple[int, int, int]],
                         transform: sitk.Transform | None) -> np.ndarray:
    """Model-grid voxels whose centre falls inside ``volume`` (through ``transform``, if given)."""
    affine, shape = grid
    to_volume = np.linalg.inv(volume.affine) @ transform_matrix(transform) @ affine
    ijk = np.indices(shape, dtype=np.float32).reshape(3, -1)
    idx = to_volume[:3, :3].astype(np.float32) @ ijk + to_volume[:3, 3:].astype(np.float32)
    limit = np.asarray(volume.spatial_shape, dtype=np.float32)[:, None] - 0.5
    return np.all((idx >= -0.5) & (idx <= limit), axis=0).reshape(shape)
