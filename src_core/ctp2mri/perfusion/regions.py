"""The clinical reading of the maps: ischaemic core, hypoperfused tissue, their mismatch.

As clinical CTP software (RAPID and its peers) reports them: the core is tissue whose CBF is
below 30 % of the healthy hemisphere's, the hypoperfused tissue has Tmax > 6 s, and the
mismatch is their difference (volume in ml) and ratio. The healthy hemisphere is the one with
less hypoperfused tissue; its reference CBF is the median over its tissue that is not
hypoperfused. Each hemisphere is the brain on one side of the midline, found row by row (the
middle of the brain's extent along the left-right axis), so a head turned in the scanner is
split along its own midline.

Small islands are removed as clinical tools do, by connected components: pieces of the core
or of the hypoperfused region smaller than ``min_island_ml`` (26-connected in 3-D) are noise,
not infarct. The thresholds are all settable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from ctp2mri.errors import InputError


@dataclass(frozen=True)
class RegionSettings:
    """Thresholds of the clinical reading (defaults: the RAPID convention)."""

    core_rcbf: float = 0.30  # core: CBF below this fraction of the healthy hemisphere's
    hypoperfusion_tmax_s: float = 6.0  # hypoperfused: Tmax above this
    core_within_hypoperfusion: bool = True  # a core voxel must also be hypoperfused
    min_island_ml: float = 0.5  # connected pieces smaller than this are removed

    def __post_init__(self) -> None:
        checks = {"core_rcbf": (self.core_rcbf, 0.0, 1.0), "hypoperfusion_tmax_s": (self.hypoperfusion_tmax_s, 0.0, 60.0),
                  "min_island_ml": (self.min_island_ml, 0.0, 1000.0)}
        for name, (value, lo, hi) in checks.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not lo <= value <= hi:
                raise InputError(f"{name} must be a number in [{lo:g}, {hi:g}], got {value!r}")


@dataclass
class Regions:
    """Core and hypoperfusion masks (bool, working grid) and the numbers behind them."""

    core: np.ndarray
    hypoperfusion: np.ndarray
    reference_cbf: float
    healthy_side: str  # "left" or "right"
    right: np.ndarray  # the right hemisphere (RAS +x side of the midline)
    voxel_ml: float
    settings: RegionSettings

    @property
    def core_ml(self) -> float:
        return float(self.core.sum()) * self.voxel_ml

    @property
    def hypoperfusion_ml(self) -> float:
        return float(self.hypoperfusion.sum()) * self.voxel_ml

    @property
    def mismatch_ml(self) -> float:
        return float((self.hypoperfusion & ~self.core).sum()) * self.voxel_ml

    @property
    def mismatch_ratio(self) -> float:
        return self.hypoperfusion_ml / self.core_ml if self.core_ml > 0 else math.inf

    def report(self) -> dict[str, Any]:
        s = self.settings
        ratio = self.mismatch_ratio
        return {
            "core_ml": round(self.core_ml, 3),
            "hypoperfusion_ml": round(self.hypoperfusion_ml, 3),
            "mismatch_ml": round(self.mismatch_ml, 3),
            "mismatch_ratio": round(ratio, 3) if math.isfinite(ratio) else None,
            "reference_cbf": round(self.reference_cbf, 3),
            "healthy_side": self.healthy_side,
            "thresholds": {"core": f"rCBF < {s.core_rcbf:g} of the healthy hemisphere"
                           + (" within the hypoperfused tissue" if s.core_within_hypoperfusion else ""),
                           "hypoperfusion": f"Tmax > {s.hypoperfusion_tmax_s:g} s",
                           "min_island_ml": s.min_island_ml},
        }


def hemispheres(brain: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The right hemisphere (bool): brain voxels on the +x (RAS right) side of the midline.

    The left-right array axis is the one most aligned with world x; along it, each row of the
    brain is split at the middle of its extent.
    """
    axis = int(np.argmax(np.abs(affine[0, :3])))
    moved = np.moveaxis(brain, axis, 0)
    n = moved.shape[0]
    index = np.arange(n).reshape((n,) + (1,) * (moved.ndim - 1))
    present = moved.any(axis=0)
    first = np.where(present, np.argmax(moved, axis=0), 0)
    last = np.where(present, n - 1 - np.argmax(moved[::-1], axis=0), 0)
    middle = 0.5 * (first + last)
    upper = index > middle  # larger index along the axis
    right = upper if affine[0, axis] > 0 else (index < middle)
    return np.moveaxis(right & moved, 0, axis)


def remove_islands(mask: np.ndarray, min_ml: float, voxel_ml: float) -> np.ndarray:
    """Drop 26-connected components smaller than ``min_ml``."""
    if min_ml <= 0 or not mask.any():
        return mask
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1) * voxel_ml
    keep = sizes >= min_ml
    keep[0] = False
    return keep[labels]


def ischaemic_regions(cbf: np.ndarray, tmax: np.ndarray, tissue: np.ndarray, brain: np.ndarray,
                      affine: np.ndarray, settings: RegionSettings | None = None) -> Regions:
    """Core (rCBF below the threshold) and hypoperfusion (Tmax above it) in the tissue."""
    settings = settings or RegionSettings()
    voxel_ml = float(np.prod(np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))) / 1000.0
    right = hemispheres(brain, affine)
    late = tissue & (tmax > settings.hypoperfusion_tmax_s)
    hypo = remove_islands(late, settings.min_island_ml, voxel_ml)
    healthy_right = (hypo & right).sum() <= (hypo & ~right).sum()
    side = right if healthy_right else ~right
    normal = tissue & side & ~late
    if normal.sum() < 10:
        normal = tissue & side
    if not normal.any():
        raise InputError("no tissue in the healthy hemisphere to take the reference CBF from; check the brain mask")
    reference = float(np.median(cbf[normal]))
    if not reference > 0:
        raise InputError("the healthy hemisphere's CBF is 0; the AIF or the series is not usable for perfusion")
    low = tissue & (cbf < settings.core_rcbf * reference)
    if settings.core_within_hypoperfusion:
        low &= late
    core = remove_islands(low, settings.min_island_ml, voxel_ml)
    return Regions(core, hypo, reference, "right" if healthy_right else "left", right, voxel_ml, settings)
