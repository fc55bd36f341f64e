"""Voxel sizes a head scan can have: the check that catches an affine in the wrong unit."""

from __future__ import annotations

from ctp2mri.errors import InputError
from ctp2mri.io.volume import Volume

__all__ = ["SPACING_RANGE_MM", "check_spacing"]

# Voxel sizes any CT or MRI of a head has (mm). Outside, the affine's unit is wrong (metres,
# micrometres), and a structuring element of "3 mm" in micrometre voxels needs gigabytes.
SPACING_RANGE_MM = (0.05, 50.0)


def check_spacing(volume: Volume, name: str) -> Volume:
    """Refuse voxel sizes no head scan has (`SPACING_RANGE_MM`): a wrong unit in the affine."""
    lo, hi = SPACING_RANGE_MM
    spacing = volume.spacing
    if not all(lo <= s <= hi for s in spacing):
        size = " × ".join(f"{s:.4g}" for s in spacing)
        raise InputError(f"the {name}'s voxels measure {size} mm, impossible for a head scan (expected "
                         f"{lo:g}–{hi:g} mm per axis): its affine is probably in another unit (metres, "
                         "micrometres); fix the header's voxel size")
    return volume
