"""The image-space terms of lesion-aware post-training (paper Eq. 6–7), for any latent model.

Post-training a latent model needs only its one-step estimate of the clean latent — Eq. 5's
ẑ_0 for the cLDM, x̂_0 = x_t − ô for the Brownian bridge — decoded by the frozen decoder:
x̂ = D(ẑ_0). `image_space_terms` does the decode (differentiable in ẑ_0) and returns
L_image and L_lesion, which `ctp2mri.losses.total_loss` (Eq. 8) adds to the model's own
latent objective — and, when asked, the core term (`ctp2mri.losses.core_loss`, not in the
paper) on the estimate's ADC, with the threshold on the model's ADC window (`core_threshold`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

from ctp2mri.case_slices import TARGETS as CHANNELS
from ctp2mri.errors import InputError
from ctp2mri.losses import core_loss, image_loss, lesion_loss, total_loss
from ctp2mri.settings import CORE_ADC_THRESHOLD, CORE_TERM_WIDTH
from ctp2mri.training import loop

__all__ = ["TARGETS", "ImageTerms", "add_image_terms", "core_for", "core_threshold", "image_space_terms"]

TARGETS = ("input", "reconstruction")
ADC = CHANNELS.index("adc")


class ImageTerms(NamedTuple):
    """L_image (Eq. 6), L_lesion (Eq. 7) and L_core (None unless asked for)."""

    image: torch.Tensor
    lesion: torch.Tensor
    core: torch.Tensor | None = None


def core_threshold(adc_window: tuple[float, float] | None, threshold: float = CORE_ADC_THRESHOLD,
                   width: float = CORE_TERM_WIDTH) -> tuple[float, float]:
    """(τ, w) of `ctp2mri.losses.core_loss` in a model's normalised ADC units ([lo, hi] → [−1, 1]).

    Needs the fixed ADC window (``normalisation.adc_window`` of checkpoints trained since it
    exists): on per-case quantiles the threshold has no fixed place.
    """
    if adc_window is None:
        raise InputError("the core term (--lambda-core) needs a model trained on the fixed ADC window "
                         "(its config's normalisation.adc_window); this one reads ADC on per-case quantiles, "
                         "so set --lambda-core 0")
    lo, hi = (float(v) for v in adc_window)
    return -1.0 + 2.0 * (threshold - lo) / (hi - lo), 2.0 * width / (hi - lo)


def image_space_terms(autoencoder: torch.nn.Module, z0_hat: torch.Tensor, z0: torch.Tensor, x: torch.Tensor,
                      brain: torch.Tensor, lesion: torch.Tensor, target: str = "input", precision: str = "fp32",
                      gradient_checkpointing: bool = False, scale: float = 1.0,
                      core: tuple[float, float] | None = None) -> ImageTerms:
    """L_image and L_lesion of Eq. 6 and 7 for the decoded one-step estimate x̂ = D(ẑ_0), and L_core.

    Parameters
    ----------
    autoencoder
        Frozen by the caller (no weight requires a gradient); the decode itself stays on the
        graph, through the straight-through quantiser, so the terms reach ``z0_hat``.
    z0_hat
        The one-step estimate of the clean latent, attached to the model's graph.
    z0
        E(x), the clean latent (used for ``target="reconstruction"``).
    x, brain, lesion
        Target images (B, 2, H, W) and their brain and lesion masks (B, 1, H, W).
    target
        ``"input"``: compare with x (the paper); ``"reconstruction"``: with D(z_0) (the
        official code; one more decode, without gradient).
    precision
        Autocast of the decode (``fp32``, ``bf16``, ``fp16``).
    gradient_checkpointing
        Recompute the decoder's activations in the backward pass.
    scale
        The latent model's scale factor: latents are decoded as D(z / scale).
    core
        (τ, w) of `core_threshold`: also return `ctp2mri.losses.core_loss` of x̂'s ADC against
        ``lesion``; None: ``core`` is None.
    """
    if target not in TARGETS:
        raise InputError(f"unknown post-training target {target!r}; choose one of {', '.join(TARGETS)}")
    dev = z0_hat.device

    def decode(z: torch.Tensor) -> torch.Tensor:
        # straight-through quantiser: ∂x̂/∂ẑ_0 exists
        return autoencoder.decode(z / scale, quantize=True)

    with loop.autocast(precision, dev):
        x_hat = checkpoint(decode, z0_hat, use_reentrant=False) if gradient_checkpointing else decode(z0_hat)
    if target == "reconstruction":
        with torch.no_grad(), loop.autocast(precision, dev):
            ref = decode(z0)
    else:
        ref = x
    core_term = None
    if core is not None:
        core_term = core_loss(x_hat[:, ADC:ADC + 1], lesion, brain, *core)
    return ImageTerms(image_loss(ref, x_hat, brain), lesion_loss(ref, x_hat, lesion), core_term)  # Eq. 6, 7


def core_for(lambda_core: float, core: tuple[float, float] | None) -> tuple[float, float] | None:
    """The ``core`` argument of `image_space_terms`: ``core`` when λ_core > 0 (then required), else None."""
    if not lambda_core:
        return None
    if core is None:
        raise InputError("λ_core > 0 needs the core threshold in the model's units (see core_threshold)")
    return core


def add_image_terms(latent: torch.Tensor, terms: ImageTerms, lambda_image: float, lambda_lesion: float,
                    lambda_core: float, parts: dict[str, float]) -> tuple[torch.Tensor, dict[str, float]]:
    """L_total of Eq. 8 (`ctp2mri.losses.total_loss`, with λ_core · L_core) and ``parts`` with the
    image terms' values added (``image_loss``, ``lesion_loss``, ``core_loss`` if computed)."""
    parts.update(image_loss=float(terms.image.detach()), lesion_loss=float(terms.lesion.detach()))
    if terms.core is not None:
        parts["core_loss"] = float(terms.core.detach())
    return total_loss(latent, terms.image, terms.lesion, lambda_image, lambda_lesion, terms.core, lambda_core), parts
