"""Static figures (PNG) for terminals without napari: what `ctp2mri phantom` and `demo` show."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ctp2mri.casefolder import Case
from ctp2mri.io.atomic import atomic_path
from ctp2mri.settings import CORE_ADC_THRESHOLD


def time_to_peak(ctp: np.ndarray, frame_times: np.ndarray, smooth_voxels: float = 0.0) -> np.ndarray:
    """Time (s) of maximum enhancement per voxel of an (..., t) CTP array.

    CTP is low-SNR (peak tissue enhancement is of the order of the noise), so a spatial
    Gaussian of ``smooth_voxels`` before the arg-max makes the map readable.
    """
    ctp = np.asarray(ctp, dtype=np.float32)
    if smooth_voxels > 0:
        from scipy.ndimage import gaussian_filter

        ctp = gaussian_filter(ctp, sigma=[smooth_voxels] * (ctp.ndim - 1) + [0])
    return np.asarray(frame_times)[np.argmax(ctp, axis=-1)]


def radiological(image: np.ndarray) -> np.ndarray:
    """An axial (x, y) RAS slice as rows/columns in radiological view.

    Anterior at the top, the patient's right on the image's left.
    """
    return np.asarray(image)[::-1, ::-1].T


def _lesion_slice(case: Case) -> int:
    """The axial slice with the most core, else the one with the most brain."""
    for vol in (case.lesion, case.mask):
        if vol is not None and vol.array.any():
            return int(np.argmax(vol.array.sum(axis=(0, 1))))
    return case.ctp.spatial_shape[2] // 2


def case_overview(cases: Sequence[Case], path: str | os.PathLike, titles: Sequence[str] | None = None) -> Path:
    """One row per case: CTP at peak, time-to-peak, DWI, ADC; core contour in red.

    Slices are shown in radiological view (patient's right on the image's left).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ["CTP (peak frame, HU)", "time to peak (s)", "DWI b1000", "ADC (10⁻⁶ mm²/s)"]
    fig, axes = plt.subplots(len(cases), 4, figsize=(11, 3.0 * len(cases)), squeeze=False)
    for row, case in enumerate(cases):
        k = _lesion_slice(case)
        ctp = case.ctp.array[:, :, k, :].astype(np.float32)
        brain = case.mask.array[:, :, k] > 0 if case.mask is not None else np.ones(ctp.shape[:2], bool)
        peak = int(np.argmax(ctp[brain].mean(axis=0))) if brain.any() else ctp.shape[-1] // 2
        ttp = np.where(brain, time_to_peak(ctp, case.ctp.frame_times, smooth_voxels=1.5), np.nan)
        panels = [
            (ctp[..., peak], dict(cmap="gray", vmin=0, vmax=100)),
            (ttp, dict(cmap="jet")),
            (case.dwi.array[:, :, k] if case.dwi is not None else None, dict(cmap="gray")),
            (case.adc.array[:, :, k] if case.adc is not None else None, dict(cmap="gray", vmin=0, vmax=2000)),
        ]
        for col, (image, style) in enumerate(panels):
            ax = axes[row, col]
            ax.axis("off")
            if image is None:
                continue
            shown = ax.imshow(radiological(image), **style)
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
            if case.lesion is not None and case.lesion.array[:, :, k].any():
                ax.contour(radiological(case.lesion.array[:, :, k]), levels=[0.5], colors="r", linewidths=0.8)
            if row == 0:
                ax.set_title(columns[col], fontsize=9)
        label = titles[row] if titles else (case.path.name if case.path else f"case {row}")
        axes[row, 0].text(-0.05, 0.5, f"{label}\nslice {k}", transform=axes[row, 0].transAxes,
                          ha="right", va="center", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
    return Path(path)


@dataclass
class EvaluationSlice:
    """One axial slice of an evaluated case, in physical units, for `evaluation_figure`.

    All images are (x, y) RAS slices of the case grid. ``ctp`` is one CTP frame in HU
    (e.g. the peak of the brain's mean curve); ``dwi_*`` in scanner units and ``adc_*`` in
    10⁻⁶ mm²/s (the synthetic ones mapped back from [−1, 1]); ``lesion`` the true core
    mask, ``pred_core`` the core thresholded from the synthetic ADC; ``dwi_range`` the
    display window of both DWIs (the case's normalisation range).
    """

    name: str
    z: int
    ctp: np.ndarray
    dwi_true: np.ndarray
    adc_true: np.ndarray
    dwi_pred: np.ndarray
    adc_pred: np.ndarray
    lesion: np.ndarray | None = None
    pred_core: np.ndarray | None = None
    dwi_range: tuple[float, float] | None = None
    model: str = ""


def evaluation_figure(slices: Sequence[EvaluationSlice], path: str | os.PathLike,
                      adc_window: tuple[float, float] = (0.0, 2000.0), predicted: str = "synthetic") -> Path:
    """One row per slice: CTP frame, true DWI, synthetic DWI, true ADC, synthetic ADC.

    ``predicted`` names the model's columns ("synthetic"; "reconstruction" for an autoencoder).

    True and synthetic images share one window per channel so their contrast compares
    directly. The true core is outlined in red on every panel; the core thresholded from
    the synthetic ADC in cyan on the synthetic ADC. Radiological view (patient's right on
    the image's left). Written atomically.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not slices:
        raise ValueError("evaluation_figure needs at least one slice")
    columns = ["CTP frame (HU)", "DWI true", f"DWI {predicted}", "ADC true (10⁻⁶ mm²/s)", f"ADC {predicted}"]
    fig, axes = plt.subplots(len(slices), 5, figsize=(13, 2.9 * len(slices)), squeeze=False)
    for row, s in enumerate(slices):
        lo, hi = s.dwi_range if s.dwi_range is not None else (
            float(np.min(s.dwi_true)), float(np.max(s.dwi_true)))
        panels = [
            (s.ctp, {"vmin": 0, "vmax": 100}),
            (s.dwi_true, {"vmin": lo, "vmax": hi}),
            (s.dwi_pred, {"vmin": lo, "vmax": hi}),
            (s.adc_true, {"vmin": adc_window[0], "vmax": adc_window[1]}),
            (s.adc_pred, {"vmin": adc_window[0], "vmax": adc_window[1]}),
        ]
        for col, (image, style) in enumerate(panels):
            ax = axes[row, col]
            ax.axis("off")
            shown = ax.imshow(radiological(image), cmap="gray", **style)
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)  # on all: panels keep one size
            if s.lesion is not None and np.any(s.lesion):
                ax.contour(radiological(s.lesion.astype(np.float32)), levels=[0.5], colors="r",
                           linewidths=0.8)
            if col == 4 and s.pred_core is not None and np.any(s.pred_core):
                ax.contour(radiological(s.pred_core.astype(np.float32)), levels=[0.5], colors="c",
                           linewidths=0.8)
            if row == 0:
                ax.set_title(columns[col], fontsize=9)
        label = f"{s.name}\nslice {s.z}" + (f"\n{s.model}" if s.model else "")
        axes[row, 0].text(-0.05, 0.5, label, transform=axes[row, 0].transAxes, ha="right",
                          va="center", fontsize=8)
    legend = "red: true core (lesion mask)"
    if any(s.pred_core is not None and np.any(s.pred_core) for s in slices):
        legend += f"; cyan: core from the {predicted} ADC (< {CORE_ADC_THRESHOLD:g} × 10⁻⁶ mm²/s)"
    fig.text(0.5, 0.002, legend, ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
    return Path(path)
