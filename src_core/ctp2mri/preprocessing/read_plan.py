"""Which part of an input frame a target grid sees, and how it is reduced before resampling.

`resample_to_grid` reads only the crop of each frame that the target can see (plus a margin),
averages integer blocks of voxels for the integer part of the spacing ratio and leaves a small
Gaussian for the fractional rest (`ctp2mri.preprocessing.resample` explains why); the plan
made here fixes the three once per grid pair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["ReadPlan", "box_corners", "plan_reading"]

_MIN_SIGMA_VOXELS = 0.2  # below this a residual Gaussian changes nothing measurable


def box_corners(shape: tuple[int, ...], lo: tuple[int, ...] | np.ndarray = (0, 0, 0)) -> np.ndarray:
    """4 × 8 homogeneous index coordinates of the outer voxel *edges* of a box."""
    lo = np.asarray(lo, dtype=np.float64) - 0.5
    hi = lo + np.asarray(shape[:3], dtype=np.float64)
    grid = np.array(np.meshgrid(*zip(lo, hi), indexing="ij")).reshape(3, -1)
    return np.vstack([grid, np.ones((1, 8))])


@dataclass
class ReadPlan:
    """How one frame is read: the crop that the output can see, block factors, residual blur."""

    crop: tuple[slice, slice, slice]
    factors: tuple[int, int, int]
    affine: np.ndarray  # grid of the cropped, block-averaged frame
    variance: tuple[float, float, float] | None  # residual Gaussian, mm² per axis


def _fit_span(lo: int, hi: int, n: int, f: int) -> tuple[int, int, int]:
    """Widen [lo, hi) within [0, n) to a multiple of f; shrink f if the axis is too short."""
    length = math.ceil((hi - lo) / f) * f
    if lo + length > n:
        lo = max(0, n - length)
    length = min(length, ((n - lo) // f) * f)
    if length < f:  # fewer voxels than one block: don't average along this axis
        return lo, hi, 1
    return lo, lo + length, f


def plan_reading(in_affine: np.ndarray, in_shape: tuple[int, int, int], out_affine: np.ndarray,
                 out_shape: tuple[int, int, int], smooth: bool,
                 to_input: np.ndarray) -> ReadPlan | None:
    """Plan reading of input frames for one output grid; None when the grids do not overlap.

    Parameters
    ----------
    in_affine, in_shape
        The input's RAS affine and spatial shape.
    out_affine, out_shape
        The output grid's.
    smooth
        Block-average and blur where the output is coarser; else read the crop as it is.
    to_input
        4 × 4 RAS matrix from output to input world points (`transform_matrix`).
    """
    in_spacing = np.linalg.norm(in_affine[:3, :3], axis=0)
    out_to_in = np.linalg.inv(in_affine) @ to_input @ out_affine
    corners = (out_to_in @ box_corners(out_shape))[:3]
    # Output sampling steps seen along each input axis: exact for axis permutations/flips,
    # a fair measure for oblique grids.
    in_dirs = in_affine[:3, :3] / in_spacing
    out_steps = to_input[:3, :3] @ out_affine[:3, :3]
    ratio = np.linalg.norm(in_dirs.T @ out_steps, axis=1) / in_spacing
    factors = np.maximum(1, np.floor(ratio + 0.25)).astype(int) if smooth else np.ones(3, int)
    sigma = np.maximum(0.0, (ratio / factors - 1.0) / 2.0) if smooth else np.zeros(3)
    sigma[sigma < _MIN_SIGMA_VOXELS] = 0.0
    margin = 2 * factors + np.ceil(3 * sigma * factors).astype(int) + 3  # + B-spline support
    lo = np.floor(corners.min(axis=1)).astype(int) - margin
    hi = np.ceil(corners.max(axis=1)).astype(int) + 1 + margin
    lo, hi = np.maximum(lo, 0), np.minimum(hi, in_shape)
    if np.any(hi <= lo):
        return None
    spans = [_fit_span(int(a), int(b), int(n), int(f))
             for a, b, n, f in zip(lo, hi, in_shape, factors)]
    factors = np.array([s[2] for s in spans])
    if smooth:  # factors may have shrunk on axes shorter than one block
        sigma = np.maximum(0.0, (ratio / factors - 1.0) / 2.0)
        sigma[sigma < _MIN_SIGMA_VOXELS] = 0.0
    start = np.array([s[0] for s in spans], dtype=np.float64)
    block = np.eye(4)
    block[:3, :3] = np.diag(factors)
    block[:3, 3] = start + (factors - 1) / 2.0  # a block's centre in input index units
    variance = None
    if sigma.any():
        variance = tuple(float(v) for v in (sigma * factors * in_spacing) ** 2)
    return ReadPlan(tuple(slice(s[0], s[1]) for s in spans), tuple(int(f) for f in factors),
                    in_affine @ block, variance)
