"""Training objectives, one function per equation or term.

Latent diffusion (paper §2.1)
    `latent_loss` — Eq. 4.

Post-training (paper §2.2, Eq. 6–8)
    `image_loss` — Eq. 6, `lesion_loss` — Eq. 7, `total_loss` — Eq. 8. The decoded one-step
    estimate x̂ = D(ẑ_0) comes from Eq. 5, `ctp2mri.diffusion.NoiseSchedule.predict_z0`.
    Both image-space terms are squared errors summed over the image channels (DWI, ADC) and
    divided by the number of mask voxels in the batch, as the official ``ddpm_ft.p_losses``
    (``sum / mask.sum()`` and ``sum / lesion.sum()``), whose λ values (Table 2) assume that
    scale. Unlike upstream, a batch without lesion voxel gives a lesion loss of exactly 0
    (upstream divides 0 by 0), and the image term counts only brain voxels (the normalised
    images are 0 outside the brain, and synthesis masks its output with the brain).
    `core_loss` is not in the paper: a soft Dice between the lesion mask and the voxels the
    estimate's ADC draws under the core threshold, which `total_loss` adds with λ_core.

VQGAN first stage (Esser et al. 2021; the official ``VQLPIPSWithDiscriminator`` with the
paper's configs/autoencoder/VQGAN.yaml: ``perceptual_weight: 0.0``, ``codebook_weight: 1.0``,
``disc_weight: 0.2``, ``disc_start: 30001``, hinge loss)
    `reconstruction_loss` (L1; with the perceptual weight 0 no LPIPS/VGG term exists),
    `hinge_discriminator_loss`, `generator_adversarial_loss`, `adaptive_gan_weight`,
    `discriminator_factor` (the adversarial terms switched on after ``disc_start``) and
    `autoencoder_loss`, which assembles them as the official code does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ctp2mri.settings import LAMBDA_IMAGE, LAMBDA_LESION, SNR_GAMMA

__all__ = [
    "adaptive_gan_weight", "autoencoder_loss", "discriminator_factor",
    "generator_adversarial_loss", "condition_loss", "core_loss", "hinge_discriminator_loss",
    "image_loss", "lesion_latent_loss", "lesion_reconstruction_loss", "latent_loss", "lesion_loss",
    "masked_squared_error", "min_snr_weights", "reconstruction_loss", "total_loss",
    "weighted_latent_loss",
]


# latent diffusion ------------------------------------------------------------------------------
def latent_loss(eps: torch.Tensor, eps_hat: torch.Tensor) -> torch.Tensor:
    """L_latent = E‖ε − ε_θ(z_t, t, c̃)‖² (paper Eq. 4), the ε-prediction objective.

    The mean over every element (batch, channel, pixel), as CompVis LDM's ``loss_simple``
    with ``loss_type: l2`` (``l_simple_weight`` 1, ``original_elbo_weight`` 0). Computed in
    float32 even under autocast.
    """
    return F.mse_loss(eps_hat.float(), eps.float())


def min_snr_weights(alphas_cumprod_t: torch.Tensor, gamma: float = SNR_GAMMA) -> torch.Tensor:
    """Per-sample weights min(SNR_t, γ) / SNR_t of the ε-loss (Min-SNR-γ, Hang et al. 2023).

    SNR_t = ᾱ_t / (1 − ᾱ_t). Not in the paper: the ε-objective weights the error in z_0 by
    SNR_t, so the steps where z_t is nearly clean (high SNR, where the condition hardly
    matters) dominate training; the weight caps their share at γ. With γ = ∞ every weight is 1.
    """
    snr = alphas_cumprod_t.float() / (1.0 - alphas_cumprod_t.float())
    return torch.clamp(snr, max=float(gamma)) / snr


def weighted_latent_loss(eps: torch.Tensor, eps_hat: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Eq. 4 with a weight per sample: mean over samples of w_b · mean over the sample's elements."""
    per_sample = (eps_hat.float() - eps.float()).square().flatten(1).mean(dim=1)
    return (weights.float() * per_sample).mean()


def lesion_latent_loss(z0: torch.Tensor, z0_hat: torch.Tensor, lesion: torch.Tensor) -> torch.Tensor:
    """‖M ⊙ (z_0 − ẑ_0)‖² / (Σ M · C): Eq. 7 in latent space, for the base model.

    ẑ_0 is the one-step estimate of Eq. 5 (`NoiseSchedule.predict_z0`), M the lesion's share of
    each latent pixel (the full-resolution mask averaged over the autoencoder's blocks). Not in
    the paper, whose lesion term acts through the decoder during post-training only; here it
    keeps the base model's refinement from averaging the lesion away, at every noise level
    alike (no decode, so it costs nothing). Best with the ``z0-residual`` parameterization,
    whose ẑ_0 is direct; an ε-model's ẑ_0 divides by √ᾱ_t and is noisy at high t. A batch
    without lesion gives exactly 0.
    """
    factor = lesion.shape[-1] // z0.shape[-1]
    m = F.avg_pool2d(lesion.float(), factor) if factor > 1 else lesion.float()
    squared = (z0_hat.float() - z0.detach().float()).square()
    return (squared * m).sum() / (m.sum() * z0.shape[1]).clamp_min(1.0)


def condition_loss(z0_from_condition: torch.Tensor, z0: torch.Tensor, lesion_logit: torch.Tensor,
                   lesion: torch.Tensor, lesion_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """The auxiliary loss of a condition encoder with heads (not in the paper), and its parts.

    ``‖ẑ_0(c̃) − z_0‖² + w · ‖M ⊙ (ẑ_0(c̃) − z_0)‖² / |M| + BCE(lesion logit, M)``: the
    encoder's ẑ_0 head regresses the (scaled) latent of the target, over every element and,
    with ``lesion_weight`` w, once more over the lesion alone; its lesion head classifies each
    latent pixel, the positives weighted by the negatives-to-positives ratio of the batch (a
    class-balanced BCE). ``lesion`` is the full-resolution mask (B, 1, H, W); its 4 × 4
    average is the soft target M on the latent grid. A batch without lesion gives 0 for the
    lesion-weighted term, never NaN.

    The lesion term divides by the lesion's own size, so each lesion element weighs about
    1 / (lesion share) times a plain one (≈ 50× on the demo data). That teaches the lesion
    fast, but it also moves the regression's optimum for tissue that *might* be core (the
    hypoperfused rim) towards the core's values: the ADC drawn there falls under the core
    threshold (REPORT.md §D6). w = 0 keeps the estimate calibrated and leaves the lesion to the
    BCE head and to post-training.
    """
    factor = lesion.shape[-1] // z0.shape[-1]
    m = F.avg_pool2d(lesion.float(), factor) if factor > 1 else lesion.float()
    squared = (z0_from_condition.float() - z0.detach().float()).square()
    latent = squared.mean()
    lesion_latent = (squared * m).sum() / (m.sum() * z0.shape[1]).clamp_min(1.0)
    share = m.mean().clamp(1e-3, 0.5)
    bce = F.binary_cross_entropy_with_logits(lesion_logit.float(), m, pos_weight=(1.0 - share) / share)
    parts = {"condition_latent": float(latent.detach()), "condition_lesion": float(lesion_latent.detach()),
             "condition_bce": float(bce.detach())}
    return latent + float(lesion_weight) * lesion_latent + bce, parts


# lesion-aware post-training -------------------------------------------------------------------
def masked_squared_error(x: torch.Tensor, x_hat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ M ⊙ (x − x̂)² / Σ M over the batch, channels summed; exactly 0 when M is empty.

    ``x`` and ``x_hat`` are (B, C, H, W); ``mask`` is binary, (B, 1, H, W) (one mask for all
    channels) or (B, C, H, W). The denominator counts mask *voxels* (not voxel × channel),
    as the official code. When the mask holds no voxel the numerator is 0 and the
    denominator is clamped to 1, so the value and its gradient are exactly 0, never NaN.
    Computed in float32.
    """
    if x.shape != x_hat.shape:
        raise ValueError(f"x {tuple(x.shape)} and x̂ {tuple(x_hat.shape)} differ in shape")
    mask = mask.float()
    if mask.ndim != 4 or mask.shape[0] != x.shape[0] or mask.shape[2:] != x.shape[2:] \
            or mask.shape[1] not in (1, x.shape[1]):
        raise ValueError(f"mask {tuple(mask.shape)} does not fit images {tuple(x.shape)}")
    squared = (x.float() - x_hat.float()).square()
    return (squared * mask).sum() / mask.sum().clamp_min(1.0)


def image_loss(x: torch.Tensor, x_hat: torch.Tensor, brain: torch.Tensor) -> torch.Tensor:
    """L_image = ‖x − D(ẑ_0)‖² (paper Eq. 6), inside the brain, per brain voxel.

    Parameters
    ----------
    x
        Target images (B, 2, H, W): the input x (paper) or its reconstruction D(z_0) (the
        official code's target).
    x_hat
        D(ẑ_0), the decoded one-step estimate (Eq. 5), attached to the graph.
    brain
        Brain mask (B, 1, H, W); the sum runs over it and is divided by its voxel count.
    """
    return masked_squared_error(x, x_hat, brain)


def lesion_loss(x: torch.Tensor, x_hat: torch.Tensor, lesion: torch.Tensor) -> torch.Tensor:
    """L_lesion = ‖M_lesion ⊙ (x − D(ẑ_0))‖² (paper Eq. 7), per lesion voxel of the batch.

    ``lesion`` is the binary lesion mask (B, 1, H, W) (inside the brain). A batch without any
    lesion voxel contributes exactly 0 (value and gradient), where upstream's 0/0 is NaN.
    """
    return masked_squared_error(x, x_hat, lesion)


def core_loss(adc_hat: torch.Tensor, lesion: torch.Tensor, brain: torch.Tensor, threshold: float,
              width: float) -> torch.Tensor:
    """L_core = 1 − soft Dice(P, M), P = σ((τ − ADC(x̂)) / w) ⊙ brain (not in the paper).

    The core a reader takes from a synthetic ADC is the voxels under the clinical threshold τ;
    this term scores that read-out against the lesion mask M with a soft threshold of width
    w. Eq. 7 weighs each lesion voxel about (brain / lesion) times a voxel of Eq. 6, so its
    optimum paints every voxel that *might* be core as core and the read-out over-calls;
    Dice counts a false core voxel as much as a missed one. Sums run over the whole batch
    (``(|P| + |M| + 1)``): slices without lesion still penalise what they draw as core, and
    an empty batch gives 1 − 1 / (|P| + 1), never NaN.

    Parameters
    ----------
    adc_hat
        The estimate's ADC channel (B, 1, H, W), in the model's units, on the graph.
    lesion, brain
        Binary masks (B, 1, H, W).
    threshold, width
        τ and w in the same units as ``adc_hat`` (`ctp2mri.training.image_terms.core_threshold`
        maps 620 and 40 × 10⁻⁶ mm²/s onto a model's ADC window); ``width`` > 0.
    """
    if adc_hat.shape != lesion.shape or brain.shape != lesion.shape or adc_hat.shape[1] != 1:
        raise ValueError(f"ADC {tuple(adc_hat.shape)}, lesion {tuple(lesion.shape)} and brain {tuple(brain.shape)} "
                         "must all be (B, 1, H, W)")
    if not width > 0:
        raise ValueError(f"the soft threshold's width must be > 0, got {width}")
    p = torch.sigmoid((threshold - adc_hat.float()) / width) * brain.float()
    m = lesion.float()
    return 1.0 - (2.0 * (p * m).sum() + 1.0) / (p.sum() + m.sum() + 1.0)


def total_loss(latent: torch.Tensor, image: torch.Tensor | None = None, lesion: torch.Tensor | None = None,
               lambda_image: float = LAMBDA_IMAGE, lambda_lesion: float = LAMBDA_LESION,
               core: torch.Tensor | None = None, lambda_core: float = 0.0) -> torch.Tensor:
    """L_total = L_latent + λ_image · L_image + λ_lesion · L_lesion (paper Eq. 8) [+ λ_core · L_core].

    The paper's best weights are λ_image = 0.01, λ_lesion = 0.02 (Table 2); `core_loss` is
    this project's addition, off (λ_core = 0) unless asked for. A term whose λ is 0 is left
    out rather than multiplied by 0 (it may then be None, i.e. not computed), so λ = 0/0
    returns ``latent`` itself: the base model's Eq. 4 objective, bit for bit.
    """
    total = latent
    for weight, term, name in ((lambda_image, image, "image"), (lambda_lesion, lesion, "lesion"),
                               (lambda_core, core, "core")):
        weight = float(weight)
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"λ_{name} must be a finite number ≥ 0, got {weight}")
        if weight == 0:
            continue
        if term is None:
            raise ValueError(f"λ_{name} = {weight} but no {name} loss was given")
        total = total + weight * term
    return total


# VQGAN ---------------------------------------------------------------------------------------
def reconstruction_loss(x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
    """Mean absolute error |x − x̂| over every element: the VQGAN's reconstruction ("nll") term.

    Upstream it is ``|x − x̂| + perceptual_weight · LPIPS(x, x̂)``; the official configuration
    sets ``perceptual_weight: 0.0`` (LPIPS is also meaningless on 2-channel DWI/ADC), leaving L1.
    """
    return (x.float() - x_rec.float()).abs().mean()


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the PatchGAN critic: ½ (E[relu(1 − D(x))] + E[relu(1 + D(x̂))])."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def generator_adversarial_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The autoencoder's adversarial term: −E[D(x̂)] (the generator side of the hinge GAN)."""
    return -logits_fake.float().mean()


def adaptive_gan_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                        disc_weight: float = 0.2, max_weight: float = 1e4) -> torch.Tensor:
    """VQGAN's adaptive weight λ = ‖∇_L rec‖ / (‖∇_L g‖ + 1e-4) · disc_weight (Esser et al., Eq. 7).

    ∇_L are the gradients with respect to the decoder's last layer (``last_layer``), so the
    adversarial term never dominates the reconstruction term whatever their scales. λ is
    clamped to [0, ``max_weight``] before ``disc_weight`` is applied and detached, as upstream.
    Both losses must still have their graphs (they are differentiated with ``retain_graph``).
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = torch.linalg.vector_norm(rec_grad.float()) / (torch.linalg.vector_norm(g_grad.float()) + 1e-4)
    return torch.clamp(weight, 0.0, max_weight).detach() * disc_weight


def discriminator_factor(step: int, disc_start: int, factor: float = 1.0) -> float:
    """The weight of both adversarial terms: 0 before step ``disc_start``, ``factor`` from it on.

    Upstream ``adopt_weight(disc_factor, global_step, threshold=disc_start)``.
    """
    return factor if step >= disc_start else 0.0


def lesion_reconstruction_loss(x: torch.Tensor, x_rec: torch.Tensor, lesion: torch.Tensor) -> torch.Tensor:
    """Mean |x − x̂| over the lesion's voxels and the channels (0 for a batch without lesion).

    Not in the paper: the autoencoder's own lesion-aware term, the L1 counterpart of Eq. 7. The
    lesion is ~1 % of the training pixels; without it a short run reconstructs an infarct at
    nearly the surrounding tissue's intensity, and no latent model on top can draw it.
    """
    m = lesion.float()
    absolute = (x.float() - x_rec.float()).abs()
    return (absolute * m).sum() / (m.sum() * x.shape[1]).clamp_min(1.0)


def autoencoder_loss(x: torch.Tensor, x_rec: torch.Tensor, codebook_loss: torch.Tensor,
                     logits_fake: torch.Tensor | None, last_layer: torch.Tensor | None, step: int,
                     disc_start: int, disc_weight: float = 0.2, codebook_weight: float = 1.0,
                     lesion: torch.Tensor | None = None, lesion_weight: float = 0.0,
                     ) -> tuple[torch.Tensor, dict[str, float]]:
    """The autoencoder's (generator's) total loss and its parts, as the official VQGAN:

    L = |x − x̂|₁ + λ_adapt · f(step) · (−E[D(x̂)]) + codebook_weight · L_codebook
        [+ lesion_weight · `lesion_reconstruction_loss` when a lesion mask is given]

    ``logits_fake`` (D(x̂) with x̂ attached to the autoencoder's graph) and ``last_layer``
    may be None before ``disc_start``, where f(step) = 0 and the term is skipped (the
    official code computes it and multiplies by 0; the gradient is the same).
    """
    rec = reconstruction_loss(x, x_rec)
    total = rec + codebook_weight * codebook_loss.float().mean()
    parts = {"rec_loss": float(rec.detach()), "codebook_loss": float(codebook_loss.detach().float().mean())}
    if lesion_weight and lesion is not None:
        lesion_rec = lesion_reconstruction_loss(x, x_rec, lesion)
        total = total + float(lesion_weight) * lesion_rec
        parts["lesion_rec_loss"] = float(lesion_rec.detach())
    factor = discriminator_factor(step, disc_start)
    if factor > 0 and logits_fake is not None:
        g_loss = generator_adversarial_loss(logits_fake)
        weight = adaptive_gan_weight(rec, g_loss, last_layer, disc_weight)
        total = total + weight * factor * g_loss
        parts.update(g_loss=float(g_loss.detach()), d_weight=float(weight))
    return total, parts
