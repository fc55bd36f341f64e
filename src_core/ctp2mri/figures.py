"""Static figures (PNG) for terminals without napari: what `ctp2mri phantom` and `demo` show."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ctp2mri.casefolder import Case
from ctp2mri.io.atomic import atomic_path


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
