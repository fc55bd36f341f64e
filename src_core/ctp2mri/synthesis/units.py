"""The model's output in units: [−1, 1] back to DWI units and ADC in 10⁻⁶ mm²/s with the
*model's* stored intensity ranges (step 4 of `ctp2mri.synthesis.synthesize.synthesize`).
"""

from __future__ import annotations

import numpy as np
import torch

from ctp2mri.errors import InputError
from ctp2mri.synthesis.loading import LoadedModel
from ctp2mri.synthesis.regrid import ModelGrid

__all__ = ["TARGETS", "output_ranges", "to_units"]

TARGETS = ("dwi", "adc")  # output channels of the model, in order


def output_ranges(model: LoadedModel) -> dict[str, tuple[float, float]]:
    """The model's stored (lo, hi) per target, mapping [−1, 1] back to units."""
    out = {}
    for what in TARGETS:
        entry = model.normalisation.get(what)
        try:
            lo, hi = float(entry["lo"]), float(entry["hi"])
        except (TypeError, KeyError, ValueError):
            raise InputError(f"the model {model.path or ''} stores no {what.upper()} intensity range "
                             "(config.json 'normalisation'); it cannot map its output to units. "
                             "Use a checkpoint written by ctp2mri train-ldm or post-train.") from None
        if not hi > lo:
            raise InputError(f"the model's {what.upper()} range [{lo:g}, {hi:g}] is empty; the "
                             "checkpoint is damaged")
        out[what] = (lo, hi)
    return out


def to_units(pred: torch.Tensor, grid: ModelGrid, samples: int,
             ranges: dict[str, tuple[float, float]]) -> dict[str, np.ndarray]:
    """Sampled rows → model-grid maps in units: per target the mean over the K samples and,
    for K > 1, their standard deviation (``sd_dwi``, ``sd_adc``); zero in unsampled slices."""
    keep = grid.keep
    height, width = grid.shape[:2]
    pred = pred.numpy().reshape(keep.size, int(samples), len(TARGETS), height, width)
    maps: dict[str, np.ndarray] = {}
    for c, what in enumerate(TARGETS):
        lo, hi = ranges[what]
        units = (pred[:, :, c] + np.float32(1.0)) * np.float32((hi - lo) / 2.0) + np.float32(lo)
        for key, stat in ((what, units.mean(axis=1)),
                          (f"sd_{what}", units.std(axis=1, ddof=1) if samples > 1 else None)):
            if stat is None:
                continue
            full = np.zeros(grid.shape, dtype=np.float32)
            full[:, :, keep] = np.moveaxis(stat, 0, -1)  # (slices, X, Y) → (X, Y, slices)
            maps[key] = full
    return maps
