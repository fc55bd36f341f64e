"""Time curves of a CT perfusion: working grid, bolus arrival, baseline, enhancement, smoothing.

Perfusion maps do not need a clinical series' 0.47 mm voxels (clinical software computes them
on 2–5 mm), and deconvolving 80 M voxels would neither fit the memory nor the time budget. The
series is therefore block-averaged frame by frame onto a *working grid* of about 2 mm in-plane
(never finer than the input; the model grid of the demo profile is already there), the maps
are computed there and resampled back onto the CT's own grid for output.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ctp2mri.errors import InputError
from ctp2mri.io.volume import Volume
from ctp2mri.progress import CancelToken, ProgressCallback

MIN_FRAMES = 6  # a baseline, an arterial peak and a tissue curve need at least this many frames
WORKING_SPACING_MM = (2.0, 2.0, 4.0)  # target voxel of the working grid (never finer than the input)


@dataclass
class WorkingSeries:
    """The CT perfusion on the working grid.

    Attributes
    ----------
    hu
        (nx, ny, nz, T) float32 HU.
    affine
        RAS affine of the working grid.
    times
        (T,) frame times in s.
    factors
        Integer block factors from the CT's grid (1, 1, 1: the CT's own grid).
    """

    hu: np.ndarray
    affine: np.ndarray
    times: np.ndarray
    factors: tuple[int, int, int]

    @property
    def spacing(self) -> np.ndarray:
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0


def frame_times_of(ctp: Volume) -> np.ndarray:
    """The CT's frame times (s), checked: finite, strictly increasing; refuses too few frames."""
    if ctp.array.ndim != 4:
        raise InputError(f"a CT perfusion needs 4 dimensions (x, y, z, time); this image has {ctp.array.ndim}")
    n = ctp.n_frames
    if n < MIN_FRAMES:
        raise InputError(f"the CT perfusion has {n} time points; perfusion analysis needs at least {MIN_FRAMES} "
                         "(a baseline before the bolus, its arrival, peak and wash-out)")
    times = ctp.frame_times
    if times is None:
        raise InputError("the CT perfusion carries no frame times; give a series whose time points are known "
                         "(a NIfTI with pixdim[4], or DICOM with acquisition times)")
    times = np.asarray(times, dtype=np.float64)
    if not np.all(np.isfinite(times)) or np.any(np.diff(times) <= 0):
        raise InputError("the CT perfusion's frame times must be finite and strictly increasing; got "
                         f"{np.round(times, 3).tolist()}")
    return times - times[0]


def working_series(ctp: Volume, spacing_mm: tuple[float, float, float] = WORKING_SPACING_MM,
                   progress: ProgressCallback | None = None, cancel: CancelToken | None = None) -> WorkingSeries:
    """Block-average the CT perfusion onto the working grid, one frame at a time (float32)."""
    from ctp2mri.preprocessing.resample import _BlockMean, _FrameReader

    times = frame_times_of(ctp)
    in_spacing = np.asarray(ctp.spacing)
    factors = np.maximum(1, np.floor(np.asarray(spacing_mm) / in_spacing + 0.25)).astype(int)
    factors = tuple(int(f) if n >= f else 1 for f, n in zip(factors, ctp.spatial_shape))
    block_mean = _BlockMean(factors)
    read = _FrameReader(ctp)
    frames = []
    for t in range(ctp.n_frames):
        if cancel is not None:
            cancel.raise_if_cancelled()
        # a copy: the reader and the block mean reuse their buffers from frame to frame
        frame = np.array(block_mean(read(t)), dtype=np.float32, copy=True)
        if not np.all(np.isfinite(frame)):  # e.g. float64 HU beyond float32's range
            raise InputError(f"frame {t + 1} of {ctp.n_frames} of the CT perfusion holds values that are NaN, "
                             "infinite or beyond the float32 range; fix or mask them before the perfusion analysis")
        frames.append(frame)
        if progress is not None:
            progress(t + 1, ctp.n_frames, {"stage": "reading frames"})
    block = np.eye(4)
    block[:3, :3] = np.diag(factors)
    block[:3, 3] = (np.asarray(factors) - 1) / 2.0
    return WorkingSeries(np.stack(frames, axis=-1), ctp.affine @ block, times, factors)


def bolus_arrival(hu: np.ndarray, region: np.ndarray, times: np.ndarray) -> tuple[int, float]:
    """Frame index and time (s) at which the bolus arrives in the head.

    The vessels carry the bolus first and strongest: the voxels of ``region`` whose enhancement
    above the first frame ever exceeds max(100 HU, 8 σ) (σ: the noise of a frame difference, by
    the median absolute deviation of the first two frames). Their mean curve is nearly free of
    noise (σ/√n); the bolus arrives at the first frame where it rises above both 6 σ/√n and 2 %
    of its peak (most vessel voxels are veins, so the arteries' first rise is a small share of
    that mean), and the frames before it are the baseline (at least one).

    Raises
    ------
    InputError
        No bolus: fewer than 10 voxels enhance like a vessel (flat curves).
    """
    curves = hu[region]
    rise = curves - curves[:, :1]
    sigma = 1.4826 * float(np.median(np.abs(rise[:, 1] - np.median(rise[:, 1]))))
    threshold = max(100.0, 8.0 * sigma)
    vessels = rise.max(axis=1) > threshold
    if vessels.sum() < 10:
        strongest = float(np.percentile(rise.max(axis=1), 99.9))
        raise InputError(f"no contrast bolus found in the CT perfusion: fewer than 10 voxels enhance by over "
                         f"{threshold:.0f} HU (the strongest 0.1 %: {strongest:.0f} HU; frame noise {sigma:.0f} HU). "
                         "Is this a perfusion series (contrast injected, several frames over ~40 s)?")
    mean_curve = rise[vessels].mean(axis=0)
    level = max(6.0 * sigma / np.sqrt(vessels.sum()), 0.02 * float(mean_curve.max()))
    index = max(int(np.argmax(mean_curve > level)), 1)
    return index, float(times[index])


def baseline_and_enhancement(hu: np.ndarray, n_baseline: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-voxel unenhanced HU (mean of the first ``n_baseline`` frames) and ΔHU(t) above it."""
    baseline = hu[..., :n_baseline].mean(axis=-1)
    return baseline, hu - baseline[..., None]


def smooth_in_region(values: np.ndarray, region: np.ndarray, sigma_mm: float, spacing: np.ndarray) -> np.ndarray:
    """In-plane Gaussian of σ mm over ``region`` only (normalised convolution: the edge keeps its level).

    ``values`` is (nx, ny, nz[, T]); voxels outside the region come back 0.
    """
    if sigma_mm <= 0:
        return np.where(region[..., None] if values.ndim == 4 else region, values, 0.0).astype(np.float32)
    sigma = [sigma_mm / spacing[0], sigma_mm / spacing[1], 0.0] + ([0.0] if values.ndim == 4 else [])
    weight = ndimage.gaussian_filter(region.astype(np.float32), sigma[:3], mode="constant")
    masked = np.where(region[..., None] if values.ndim == 4 else region, values, 0.0).astype(np.float32)
    smooth = ndimage.gaussian_filter(masked, sigma, mode="constant")
    denominator = np.maximum(weight, 1e-3)
    out = smooth / (denominator[..., None] if values.ndim == 4 else denominator)
    return np.where(region[..., None] if values.ndim == 4 else region, out, 0.0).astype(np.float32)
