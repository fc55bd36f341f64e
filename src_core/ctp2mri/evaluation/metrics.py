"""Image-quality metrics of the paper's evaluation (§3.1, Table 1): MAE, lesion MAE, PSNR, MS-SSIM.

Pure functions: numpy arrays or torch tensors in, floats and dicts out; no Qt, no files.
`ctp2mri evaluate`, the autoencoder check and the napari compare widget all call these, so
the numbers agree everywhere. Lesion visibility and the infarct core are measured in
`ctp2mri.evaluation.lesion_metrics`.

Conventions
-----------
* Images are compared in the normalised space of the contract (docs/contracts.md), as the
  model was trained (DWI clipped to the case's 0.5–99.5 % brain quantiles, or to its 0.5 %
  quantile and 1.6 × its brain median for a model with the DWI anchor; ADC on the fixed window)
  mapped to [−1, 1], times the brain mask. The data range is therefore 2, the default of
  `psnr` and `ms_ssim`; MAE is in the same units. (Code that maps to [0, 1] instead reports MAE halved and PSNR 6.02 dB lower.)
* ``x`` is the ground truth, ``y`` the synthetic image; all metrics but lesion MAE (whose
  mask belongs to the ground truth) are symmetric.
* An empty mask gives NaN — a case without a lesion has no lesion MAE — never a
  divide-by-zero warning, so aggregates skip it (`summarise` does, as ``np.nanmean`` would).
* Metrics, not losses: nothing here carries gradients (the losses are in ``losses.py``).
"""

from __future__ import annotations

import math
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics.regression import compute_ssim_and_cs

from ctp2mri.errors import InputError
from ctp2mri.evaluation.arrays import ArrayLike, as_mask, as_numpy

__all__ = [
    "MS_SSIM_WEIGHTS", "METRICS", "mae", "lesion_mae", "psnr", "ms_ssim", "max_ms_ssim_scales",
    "channel_metrics", "flat_metrics",
]

# Wang, Simoncelli & Bovik 2003, finest scale first (MONAI's and torchmetrics' default).
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
METRICS = ("mae", "lesion_mae", "psnr", "ms_ssim")  # per channel, in Table 1's order


# helpers ---------------------------------------------------------------------------------
def _pair(x: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    x, y = as_numpy(x), as_numpy(y)
    if x.shape != y.shape:
        raise InputError(f"cannot compare images of shapes {x.shape} and {y.shape}; "
                         f"resample one onto the other's grid first")
    return x, y


def _masked_mean(values: np.ndarray, mask: np.ndarray | None) -> float:
    """Mean of ``values`` over ``mask``; NaN (without a warning) when the mask is empty."""
    if mask is None:
        return float(values.mean()) if values.size else math.nan
    n = int(np.count_nonzero(mask))
    return float(values[mask].sum() / n) if n else math.nan


# intensity metrics -----------------------------------------------------------------------
def mae(x: ArrayLike, y: ArrayLike, mask: ArrayLike | None = None) -> float:
    """Mean absolute error, over the voxels of ``mask`` when given (inside the brain).

    Returns NaN when ``mask`` is empty.
    """
    x, y = _pair(x, y)
    m = None if mask is None else as_mask(mask, x.shape, "MAE")
    return _masked_mean(np.abs(x - y), m)


def lesion_mae(x: ArrayLike, y: ArrayLike, lesion: ArrayLike) -> float:
    """The paper's lesion MAE, ``Σ M ⊙ |x − x̂| / Σ M``, M the ground truth's lesion mask.

    Returns NaN when ``lesion`` is empty (a case without infarct has no lesion MAE;
    aggregates skip it), without any divide-by-zero warning.
    """
    return mae(x, y, lesion)


def psnr(x: ArrayLike, y: ArrayLike, data_range: float = 2.0,
         mask: ArrayLike | None = None) -> float:
    """Peak signal-to-noise ratio in dB, ``10·log10(R² / MSE)``.

    Parameters
    ----------
    data_range
        R, the span of possible values: 2 for images normalised to [−1, 1] as by the
        contract (use 1 for [0, 1]; that choice shifts PSNR by 20·log10 2 = 6.02 dB).
    mask
        When given, the MSE is taken over the mask's voxels only (inside-brain PSNR).

    Returns
    -------
    float
        ``inf`` for identical images, NaN for an empty mask.
    """
    if not data_range > 0:
        raise InputError(f"data_range must be positive, got {data_range}")
    x, y = _pair(x, y)
    m = None if mask is None else as_mask(mask, x.shape, "PSNR")
    mse = _masked_mean((x - y) ** 2, m)
    if math.isnan(mse):
        return math.nan
    return math.inf if mse == 0 else 10.0 * math.log10(data_range ** 2 / mse)


def max_ms_ssim_scales(shape: Sequence[int], kernel_size: int = 11,
                       max_scales: int = len(MS_SSIM_WEIGHTS)) -> int:
    """How many MS-SSIM scales an image of ``shape`` (…, H, W) supports.

    Scale s works on the image average-pooled 2^(s−1) times per side, and its SSIM window
    (valid convolution, as MONAI computes it) needs ``kernel_size`` pixels: the coarsest
    scale must keep ``min(H, W) // 2^(s−1) ≥ kernel_size``. 96×112 (demo) → 4, 192×224
    (paper) → 5 with 11×11 windows.
    """
    side = min(int(s) for s in shape[-2:])
    n = 0
    while n < max_scales and side // 2 ** n >= kernel_size:
        n += 1
    return n


def ms_ssim(x: ArrayLike, y: ArrayLike, data_range: float = 2.0, scales: int | None = None,
            kernel_size: int = 11, kernel_sigma: float = 1.5,
            reduction: Literal["mean", "none"] = "mean") -> float | np.ndarray:
    """Multi-scale SSIM (Wang et al. 2003) of 2-D slices, with MONAI's Gaussian SSIM.

    Parameters
    ----------
    x, y
        One slice (H, W), a batch (B, H, W) or (B, C, H, W); each channel of each slice is
        one image (channels are never mixed). For brain-masked images (background 0 in both,
        as by the contract) whole-slice MS-SSIM is the usual practice: the background agrees
        exactly and the windows straddling the brain's edge score its outline.
    data_range
        Value span, 2 for the contract's [−1, 1] (it sets SSIM's constants C1, C2).
    scales
        Number of scales, at most 5. ``None`` takes as many of the standard five as the
        image supports (`max_ms_ssim_scales`): 5 on the paper grid (192×224), 4 on the demo
        grid (96×112), where the coarsest of five scales would be 6×7 pixels, smaller than
        the 11×11 window. With fewer than five scales the *finest* are dropped and the
        remaining standard weights renormalised to sum 1: the demo grid is the paper's at
        half the resolution (2 mm vs 1 mm), so its scales 1–4 are, in millimetres, the
        paper's scales 2–5 with the same windows; the dropped scale carries 4.5 % of the
        weight. (Keeping five scales with a 5-pixel window instead would change what every
        scale measures.)
    kernel_size, kernel_sigma
        The Gaussian window, 11 and 1.5 px as in the original and in MONAI.
    reduction
        ``"mean"``: the mean over all images (float); ``"none"``: one value per image.

    Notes
    -----
    With five scales this is exactly MONAI's ``MultiScaleSSIMMetric`` (tested). It is
    assembled from MONAI's ``compute_ssim_and_cs`` because that class's size check uses
    (number of weights − 1)² instead of 2^(scales − 1) as the pooling factor, and so
    refuses four scales on 96-pixel slices, which fit. Runs without gradients on the
    inputs' device.
    """
    if not data_range > 0:
        raise InputError(f"data_range must be positive, got {data_range}")
    xt, yt = (a if isinstance(a, torch.Tensor) else torch.as_tensor(as_numpy(a, np.float32))
              for a in (x, y))
    if xt.shape != yt.shape:
        raise InputError(f"cannot compare images of shapes {tuple(xt.shape)} and "
                         f"{tuple(yt.shape)}")
    if not 2 <= xt.ndim <= 4:
        raise InputError(f"MS-SSIM takes 2-D slices (H, W), (B, H, W) or (B, C, H, W); "
                         f"got shape {tuple(xt.shape)}")
    h, w = xt.shape[-2:]
    xt, yt = (t.detach().float().reshape(-1, 1, h, w) for t in (xt, yt))
    fit = max_ms_ssim_scales((h, w), kernel_size)
    n = max(fit, 1) if scales is None else int(scales)
    if not 1 <= n <= len(MS_SSIM_WEIGHTS):
        raise InputError(f"MS-SSIM scales must be between 1 and {len(MS_SSIM_WEIGHTS)}, "
                         f"got {scales}")
    if n > fit:
        raise InputError(f"a {h}×{w} slice supports at most {fit} MS-SSIM scale(s) with "
                         f"{kernel_size}×{kernel_size} windows (the coarsest scale must keep "
                         f"≥ {kernel_size} pixels per side); asked for {n}: use fewer scales, "
                         f"a smaller kernel_size or larger slices")
    weights = torch.tensor(MS_SSIM_WEIGHTS[len(MS_SSIM_WEIGHTS) - n:], dtype=torch.float64)
    weights = (weights / weights.sum()).to(xt.device)
    window = {"kernel_size": (kernel_size,) * 2, "kernel_sigma": (kernel_sigma,) * 2}
    levels = []
    with torch.no_grad():
        for level in range(n):
            ssim_map, cs_map = compute_ssim_and_cs(xt, yt, spatial_dims=2, data_range=data_range,
                                                   **window)
            # contrast-structure at every scale but the coarsest, which adds luminance (the
            # full SSIM); negative means clamped to 0 as MONAI does, so the powers stay real
            term = cs_map if level < n - 1 else ssim_map
            levels.append(torch.relu(term.flatten(1).mean(1)).double())
            if level < n - 1:
                xt, yt = F.avg_pool2d(xt, 2), F.avg_pool2d(yt, 2)
        values = torch.prod(torch.stack(levels) ** weights[:, None], dim=0).cpu().numpy()
    return float(values.mean()) if reduction == "mean" else values


# per-channel evaluation ------------------------------------------------------------------
def _as_slices(pred: np.ndarray, target: np.ndarray, brain: np.ndarray,
               lesion: np.ndarray | None, n_channels: int, layout: str) -> tuple[Any, ...]:
    """(N, C, H, W) images and (N, H, W) masks from slices or a (C, X, Y, Z) volume."""
    if pred.shape != target.shape:
        raise InputError(f"prediction {pred.shape} and target {target.shape} differ in shape")
    if pred.ndim != 4:
        raise InputError(f"give slices (B, {n_channels}, H, W) or a volume "
                         f"({n_channels}, X, Y, Z); got shape {pred.shape}")
    if brain.ndim == 4 and brain.shape[1] == 1:
        brain = brain[:, 0]
    slices_ok = pred.shape[1] == n_channels and brain.shape == (pred.shape[0],) + pred.shape[2:]
    volume_ok = pred.shape[0] == n_channels and brain.shape == pred.shape[1:]
    if layout == "auto":
        # both fit only for a "volume" 2 voxels wide: read that as a batch of slices
        layout = "slices" if slices_ok else "volume" if volume_ok else "invalid"
    if layout == "slices" and slices_ok:
        def to_slices(a: np.ndarray) -> np.ndarray:
            return a
    elif layout == "volume" and volume_ok:
        def to_slices(a: np.ndarray) -> np.ndarray:
            return np.moveaxis(a, -1, 0)  # axial slices along k, as the model sees them
    else:
        raise InputError(f"images of shape {pred.shape} with a brain mask of shape {brain.shape} "
                         f"are neither slices (B, {n_channels}, H, W) with a (B, H, W) mask nor "
                         f"a volume ({n_channels}, X, Y, Z) with an (X, Y, Z) mask")
    if lesion is not None:
        if lesion.ndim == 4 and lesion.shape[1] == 1:
            lesion = lesion[:, 0]
        if lesion.shape != brain.shape:
            raise InputError(f"the lesion mask has shape {lesion.shape} but the brain mask "
                             f"{brain.shape}; both must lie on the images' grid")
        lesion = to_slices(lesion)
    return to_slices(pred), to_slices(target), to_slices(brain), lesion


def channel_metrics(pred: ArrayLike, target: ArrayLike, brain: ArrayLike,
                    lesion: ArrayLike | None, channel_names: Sequence[str] = ("DWI", "ADC"),
                    data_range: float = 2.0, ssim_scales: int | None = None,
                    kernel_size: int = 11, layout: Literal["auto", "slices", "volume"] = "auto",
                    ) -> dict[str, dict[str, float]]:
    """MAE, lesion MAE, PSNR and MS-SSIM per channel, inside the brain, as in Table 1.

    Parameters
    ----------
    pred, target
        Synthetic and ground-truth images, normalised per the contract: slices
        (B, C, H, W) or one volume (C, X, Y, Z) whose axial slices lie along Z.
    brain, lesion
        Masks (non-zero = inside): (B, H, W) or (B, 1, H, W) for slices, (X, Y, Z) for a
        volume. ``lesion=None`` (or an empty lesion) gives NaN lesion MAE.
    data_range, ssim_scales, kernel_size
        Passed to `psnr` and `ms_ssim` (``ssim_scales=None``: as many as the slices fit).
    layout
        ``"auto"`` tells slices from a volume by the masks' shape.

    Returns
    -------
    dict
        ``{channel: {"mae", "lesion_mae", "psnr", "ms_ssim"}}``. MAE and PSNR pool all brain
        voxels of the input (one value per volume, not a mean of per-slice values); lesion
        MAE pools all lesion voxels; MS-SSIM is the mean over the slices that contain brain
        (slices without any would score a trivial 1), each computed on the brain-masked
        slice: outside set to 0 in both, the contract's background, so a prediction's stray
        background is not scored.
    """
    brain_a = as_numpy(brain, dtype=None) > 0
    lesion_a = None if lesion is None else as_numpy(lesion, dtype=None) > 0
    p, t, b, les = _as_slices(as_numpy(pred), as_numpy(target), brain_a, lesion_a, len(channel_names),
                              layout)
    with_brain = b.any(axis=(1, 2))
    out: dict[str, dict[str, float]] = {}
    for c, name in enumerate(channel_names):
        x, y = t[:, c], p[:, c]
        ssim = math.nan
        if with_brain.any():
            sx, sy = (np.where(b, a, 0.0)[with_brain] for a in (x, y))
            ssim = ms_ssim(sx, sy, data_range, scales=ssim_scales, kernel_size=kernel_size)
        out[name] = {
            "mae": mae(x, y, b),
            "lesion_mae": math.nan if les is None else lesion_mae(x, y, les),
            "psnr": psnr(x, y, data_range, mask=b),
            "ms_ssim": ssim,
        }
    return out


def flat_metrics(nested: dict[str, dict[str, float]], sep: str = "_") -> dict[str, float]:
    """``{"DWI": {"mae": …}}`` → ``{"DWI_mae": …}``: one CSV row's columns, the keys that
    `summarise` and `format_table1` read."""
    return {f"{ch}{sep}{k}": v for ch, metrics in nested.items() for k, v in metrics.items()}
