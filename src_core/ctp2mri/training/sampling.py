"""Lesion over-sampling: drawing the slices that hold lesion more often than the others.

Lesion slices are ~11 % of the paper's data and the lesion a tiny share of their pixels, so
a uniform draw rarely shows a network the one structure that matters. ``--lesion-oversample F``
draws each lesion slice F times as often (`BatchStream` weights); None keeps the paper's
uniform draw.
"""

from __future__ import annotations

import logging
import math
from typing import Any, NamedTuple

import torch

from ctp2mri.errors import InputError
from ctp2mri.training.distributed import DistInfo

__all__ = ["LesionWeights", "check_lesion_oversample", "lesion_sampling", "lesion_slice_weights",
           "sampling_setting"]

_log = logging.getLogger(__name__)


def check_lesion_oversample(factor: float | None) -> float | None:
    """``--lesion-oversample``: None (uniform draws, the paper's) or a finite factor > 0."""
    if factor is None:
        return None
    try:
        value = float(factor)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise InputError(f"--lesion-oversample must be a positive factor, got {factor}")
    return value


class LesionWeights(NamedTuple):
    """Per-sample weights for ``torch.utils.data.WeightedRandomSampler``.

    ``lesion_fraction`` is the share of lesion slices in the dataset, ``effective_fraction``
    their expected share of the drawn samples.
    """

    weights: torch.Tensor
    lesion_fraction: float
    effective_fraction: float


def lesion_slice_weights(dataset: Any, factor: float) -> LesionWeights:
    """Weights that draw the lesion slices of a `ctp2mri.data.SliceDataset` ``factor`` times as
    often as the others.

    With ``p`` the lesion-slice fraction the drawn share becomes ``factor·p / (factor·p + 1 − p)``,
    reported as ``effective_fraction``.
    """
    factor = float(factor)
    if not math.isfinite(factor) or factor <= 0:
        raise InputError(f"the lesion over-sampling factor must be a positive number, got {factor}")
    lesion = dataset.has_lesion.to(torch.float64)
    weights = 1.0 + (factor - 1.0) * lesion
    n = max(len(lesion), 1)
    return LesionWeights(weights, float(lesion.sum()) / n, float((weights * lesion).sum() / weights.sum()))


def lesion_sampling(dataset: Any, factor: float | None, info: DistInfo) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """`BatchStream` weights that draw lesion slices ``factor`` times as often, and what to record.

    Returns ``(weights, sampling)``: ``weights`` None for ``factor`` None (uniform, the paper's
    draw); ``sampling`` the lesion-slice share of the data and, when over-sampling, of the draws.
    """
    sampling: dict[str, Any] = {"lesion_oversample": factor,
                                "lesion_slice_fraction": dataset.summary()["lesion_slice_fraction"]}
    if factor is None:
        return None, sampling
    lw = lesion_slice_weights(dataset, factor)
    sampling["effective_lesion_slice_fraction"] = lw.effective_fraction
    if info.is_main:
        _log.warning("lesion over-sampling ×%g: lesion slices are %.1f %% of the data and %.1f %% of the "
                     "drawn slices", factor, 100 * lw.lesion_fraction, 100 * lw.effective_fraction)
    return lw.weights, sampling


def sampling_setting(factor: float | None) -> dict[str, Any]:
    """Lesion over-sampling as a resume-checked setting: nothing for uniform draws, so that runs
    saved before the option existed resume unchanged."""
    return {} if factor is None else {"lesion_oversample": factor}
