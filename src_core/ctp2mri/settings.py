"""The project's defaults, each defined once: the CLI, the widgets, the recipes and the
training and evaluation code read them from here.

Numbers that come from the paper or from clinical practice say so; the others are this
project's choices for the demo profile.
"""

from __future__ import annotations

__all__ = ["ADC_WINDOW", "AE_BASE_LR", "CORE_ADC_THRESHOLD", "CORE_TERM_WIDTH", "DEFAULT_SAMPLER", "DWI_HI_MEDIAN",
           "EMA_DECAY", "LAMBDA_IMAGE", "LAMBDA_LESION", "LDM_BASE_LR", "MIN_CORE_COMPONENT_ML",
           "PRECISIONS", "SAMPLER_STEPS", "SNR_GAMMA", "WEIGHT_DECAY", "sampler_steps"]

#: Infarct core: ADC below this (10⁻⁶ mm²/s), the usual clinical threshold.
CORE_ADC_THRESHOLD = 620.0
#: Core components smaller than this (ml) are dropped as noise specks.
MIN_CORE_COMPONENT_ML = 0.2
#: Width (10⁻⁶ mm²/s) of the soft core threshold of post-training's core term
#: (`ctp2mri.losses.core_loss`): an ADC this far under the threshold counts as core with
#: probability σ(1) ≈ 0.73, 3 widths (120) under it as certain core.
CORE_TERM_WIDTH = 40.0
#: ADC (10⁻⁶ mm²/s) mapped to −1 and 1 for every case: ADC is a physical quantity, so the
#: models learn it on one fixed scale on which the core threshold means the same in every
#: case. A per-case percentile window (as DWI keeps) ends near the core's own values in a
#: case with a large lesion and near normal white matter in a case without one, so "−1" meant
#: ~400 in one case and ~600 in another and the synthetic core could not be read off in units.
#: 200 keeps every infarct core (≈ 300–600) inside; 2600 keeps tissue and most CSF.
ADC_WINDOW = (200.0, 2600.0)
#: DWI's upper bound as a multiple of the case's brain median, for a model trained with the DWI
#: anchor (``dwi_hi_median``; the lower bound stays the 0.5 % brain quantile). The default DWI
#: scale, up to the 99.5 % brain quantile, sits on the lesion itself when the lesion is large:
#: normal tissue lands at +0.5 in one case and −0.1 in another, a level a model must guess from
#: the lesion's size, and the lesion is clipped (held-out rDWI 1.45 unclipped, 1.29 clipped).
#: Anchored, normal tissue lands near 0 everywhere and 1.6 clips only the brightest lesion
#: voxels. Opt-in: the demo recipe trained with it lost core Dice (REPORT.md §D10).
DWI_HI_MEDIAN = 1.6

#: λ_image and λ_lesion of Eq. 8, the paper's best pair (Table 2) and its official code's.
LAMBDA_IMAGE = 0.01
LAMBDA_LESION = 0.02

#: Decay of the weights' exponential moving average (CompVis LDM's ``LitEma``).
EMA_DECAY = 0.9999

#: Base learning rates, scaled by accumulation × processes × batch (CompVis ``scale_lr``):
#: the official VQGAN.yaml's, and the official ldm.yaml's (the paper's "2 × 10⁻⁶"), which the
#: cBBDM and post-training use too.
AE_BASE_LR = 4.5e-6
LDM_BASE_LR = 2e-6
#: AdamW weight decay of the latent models (torch's default, which CompVis uses).
WEIGHT_DECAY = 0.01
#: γ of min-SNR loss weighting, min(SNR_t, γ) / SNR_t (Hang et al. 2023's choice).
SNR_GAMMA = 5.0

#: Autocast precisions of training and sampling (CPU always computes in fp32).
PRECISIONS = ("fp32", "bf16", "fp16")

#: Denoising steps when none are given: DPM-Solver++(2M) converges in about 20; DDIM at
#: the paper's 200.
SAMPLER_STEPS = {"dpm++2m": 20, "ddim": 200}
DEFAULT_SAMPLER = "dpm++2m"


def sampler_steps(sampler: str, steps: int | None = None) -> int:
    """``steps``, or the sampler's default (`SAMPLER_STEPS`) when None."""
    return int(steps) if steps is not None else SAMPLER_STEPS[sampler]
