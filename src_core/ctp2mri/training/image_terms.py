"""The image-space terms of lesion-aware post-training (paper Eq. 6–7), for any latent model.

Post-training a latent model needs only its one-step estimate of the clean latent — Eq. 5's
ẑ_0 for the cLDM, x̂_0 = x_t − ô for the Brownian bridge — decoded by the frozen decoder:
x̂ = D(ẑ_0). `image_space_terms` does the decode (differentiable in ẑ_0) and returns
L_image and L_lesion, which `ctp2mri.losses.total_loss` (Eq. 8) adds to the model's own
latent objective.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ctp2mri.errors import InputError
from ctp2mri.losses import image_loss, lesion_loss
from ctp2mri.training import loop

__all__ = ["TARGETS", "image_space_terms"]

TARGETS = ("input", "reconstruction")


def image_space_terms(autoencoder: torch.nn.Module, z0_hat: torch.Tensor, z0: torch.Tensor, x: torch.Tensor,
                      brain: torch.Tensor, lesion: torch.Tensor, target: str = "input", precision: str = "fp32",
                      gradient_checkpointing: bool = False, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_image, L_lesion) of Eq. 6 and 7 for the decoded one-step estimate x̂ = D(ẑ_0).

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
    return image_loss(ref, x_hat, brain), lesion_loss(ref, x_hat, lesion)  # Eq. 6, 7
