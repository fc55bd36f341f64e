"""Infarct core from a synthetic ADC: threshold inside the brain, its volume, and its agreement
with a ground-truth lesion mask when one is given.

The engine calls `estimate_core` on the ADC it writes (on the input's grid), so the core in
``core.nii.gz`` is exactly ``adc.nii.gz < threshold`` inside ``brain.nii.gz`` with small
components removed: a reader can reproduce it from the files.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ctp2mri.io.volume import Volume
from ctp2mri.evaluation.lesion_metrics import core_comparison, core_mask_from_adc, volume_ml
from ctp2mri.settings import CORE_ADC_THRESHOLD, MIN_CORE_COMPONENT_ML

__all__ = ["CORE_THRESHOLD", "estimate_core"]

CORE_THRESHOLD = CORE_ADC_THRESHOLD  # the name the engine and cohorts use


def estimate_core(adc: Volume, brain: Volume, threshold: float = CORE_THRESHOLD,
                  min_component_ml: float = MIN_CORE_COMPONENT_ML, ground_truth: Volume | None = None,
                  ) -> tuple[Volume, dict[str, Any]]:
    """Core mask (uint8, on the ADC's grid) and a summary: volume, threshold, comparison.

    Parameters
    ----------
    adc
        3-D ADC in 10⁻⁶ mm²/s.
    brain
        Brain mask on the ADC's grid.
    threshold, min_component_ml
        See `ctp2mri.evaluation.metrics.core_mask_from_adc`.
    ground_truth
        Optional lesion (core) mask on the same grid; adds Dice and volume differences
        (`ctp2mri.evaluation.metrics.core_comparison`, the truth taken inside the brain).

    Raises
    ------
    InputError
        Grids differ, or the ADC is not in 10⁻⁶ mm²/s.
    """
    adc.require_3d("ADC").require_same_grid(brain, "ADC", "brain mask")
    inside = np.asarray(brain.array) != 0
    core = core_mask_from_adc(adc.array, inside, spacing=adc.spacing, threshold=float(threshold),
                              min_component_ml=float(min_component_ml))
    summary: dict[str, Any] = {"threshold_1e-6_mm2_s": float(threshold),
                               "min_component_ml": float(min_component_ml),
                               "volume_ml": volume_ml(core, adc.spacing)}
    if ground_truth is not None:
        ground_truth.require_3d("ground-truth lesion").require_same_grid(adc, "ground-truth lesion",
                                                                         "CTP")
        truth = (np.asarray(ground_truth.array) != 0) & inside
        summary["ground_truth"] = core_comparison(core, truth, adc.spacing)
    return Volume(core.astype(np.uint8), adc.affine.copy(), meta={"modality": "core"}), summary
