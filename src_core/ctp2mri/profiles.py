"""Model grids of the two profiles (docs/contracts.md, docs/phantom.md).

``paper``: the paper's 1 × 1 × 5 mm grid with 192 × 224 axial slices.
``demo``: 2 × 2 × 5 mm with 96 × 112 slices, small enough for a 2-core CPU.
The in-plane shape is (x, y) = (left-right, posterior-anterior) in RAS voxel order.
"""

from __future__ import annotations

from dataclasses import dataclass

from ctp2mri.errors import InputError


@dataclass(frozen=True)
class Profile:
    name: str
    spacing: tuple[float, float, float]  # mm along x, y, z
    shape_xy: tuple[int, int]  # axial slice size (x, y)
    n_frames: int = 15  # CTP time points the model expects


PROFILES: dict[str, Profile] = {
    "paper": Profile("paper", (1.0, 1.0, 5.0), (192, 224)),
    "demo": Profile("demo", (2.0, 2.0, 5.0), (96, 112)),
}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise InputError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}") from None
