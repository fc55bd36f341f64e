"""Training the conditional LDM (paper §2.1, Eq. 2 and 4; official configs/latent-diffusion/ldm.yaml).

Each step, as CompVis ``LatentDiffusion.p_losses`` with the frozen first stage:

    z_0 = E(x)                      (unquantised, ``VQModelInterface.encode``)
    t ~ U{0, …, T−1},  ε ~ N(0, I)
    z_t = √ᾱ_t z_0 + √(1 − ᾱ_t) ε   (Eq. 2, `NoiseSchedule.q_sample`)
    L = ‖ε − ε_θ(z_t, t, F(c))‖²    (Eq. 4, `ctp2mri.losses.latent_loss`)

AdamW over the UNet and the spatial rescaler F, lr = accumulation × processes × batch ×
2·10⁻⁶ (CompVis ``scale_lr``), EMA of the weights (``LitEma``, decay 0.9999) after every step:
the run of `ctp2mri.training.latent_run`, as `TrainSettings` ask.

`diffuse` (the Eq. 2 draw) and `objective_terms` (the base objective) are shared with
lesion-aware post-training (`ctp2mri.training.post_train`), which adds loss terms.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch

from ctp2mri.checks import settings_with
from ctp2mri.diffusion import NoiseSchedule
from ctp2mri.errors import InputError
from ctp2mri.losses import (
    condition_loss,
    latent_loss,
    lesion_latent_loss,
    min_snr_weights,
    weighted_latent_loss,
)
from ctp2mri.models import ConditionalLDM, model_config
from ctp2mri.progress import CancelToken, ProgressCallback
from ctp2mri.training import loop
from ctp2mri.training.distributed import init_distributed, shutdown
from ctp2mri.training.latent_run import BatchLoss, LatentModel, train_latent_model
from ctp2mri.training.run_settings import TrainSettings

__all__ = ["DEFAULT_PERFUSION_ENCODER", "base_loss_for", "diffuse", "objective_terms", "train_ldm"]


def train_ldm(
    data: Any,
    autoencoder: str | os.PathLike,
    out: str | os.PathLike,
    settings: TrainSettings | None = None,
    *,
    cldm_config: dict[str, Any] | None = None,
    schedule: NoiseSchedule | None = None,
    device: str = "auto",
    resume: bool = False,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    **options: Any,
) -> Path:
    """Train (or resume training) the conditional LDM on a frozen autoencoder.

    Parameters
    ----------
    data
        Data folder with ``splits.json`` (its ``train`` split) or a `SliceDataset`, on the
        autoencoder's profile.
    autoencoder
        Checkpoint folder of a trained autoencoder (``ctp2mri train-autoencoder``).
    out
        Run folder: new or empty, or (``resume``) a run saved before. It ends up holding the
        cLDM checkpoint — networks ``model``, ``ema`` (use for synthesis) and ``autoencoder``,
        so the one folder synthesises — and log.csv.
    settings, options
        A `TrainSettings` (steps, batch, learning rate, EMA, precision, seed, cadence, lesion
        over-sampling, latent scale, condition encoder, objective: its fields are described
        there), and/or its fields as keywords, which replace the settings' own.
    cldm_config
        `ConditionalLDM` constructor arguments overriding the profile's (tiny models in tests).
    schedule
        Noise schedule (default: the paper's, T = 1000, linear 0.0015 → 0.0195).
    device
        `ctp2mri.devices.resolve_device` spec.
    resume
        Continue the run in ``out`` exactly (weights, optimiser, EMA, data position, RNGs);
        refused if a setting that changes the computation differs.
    progress, cancel
        ``progress(step, steps, {"loss", "lr", …})`` after each step; a cancel saves a
        resumable checkpoint, then raises `ctp2mri.errors.Cancelled`.

    Returns
    -------
    Path of the run folder / checkpoint.
    """
    opts = settings_with(TrainSettings, settings, options, "train_ldm")
    objective = opts.objective()
    overrides: dict[str, Any] = {} if opts.scale_factor is None else {"scale_factor": opts.scale_factor}
    if opts.condition is not None or opts.condition_loss_weight or opts.parameterization != "eps":
        overrides.update(_condition_overrides(opts.condition, cldm_config, objective))
    latent = LatentModel("cldm", ConditionalLDM, cldm_config, overrides, schedule or NoiseSchedule(), objective,
                         functools.partial(base_loss_for, objective=objective))
    info = init_distributed(device)
    try:
        return train_latent_model(info, latent, data, Path(autoencoder), Path(out), opts, resume, progress, cancel)
    finally:
        shutdown(info)


def _condition_overrides(condition: str | None, cldm_config: dict[str, Any] | None,
                         objective: dict[str, Any]) -> dict[str, Any]:
    """Network-config entries for ``condition`` (and a z_0 head when the condition loss is on)."""
    from ctp2mri.models.conditioning import CONDITION_ENCODERS
    from ctp2mri.profiles import PROFILES

    config = cldm_config or model_config(next(iter(PROFILES)), "cldm")
    encoder = condition or config.get("condition_encoder", "rescaler")
    if encoder not in CONDITION_ENCODERS:
        raise InputError(f"unknown condition encoder {encoder!r}; choose one of {', '.join(CONDITION_ENCODERS)}")
    residual = objective["parameterization"] != "eps"
    wants_head = bool(objective.get("condition_loss_weight")) or residual
    if encoder == "rescaler":
        if wants_head:
            raise InputError("the condition loss and the z0-residual parameterization need the perfusion encoder "
                             "(--condition perfusion); the paper's rescaler has no z_0 head")
        return {"condition_encoder": "rescaler"}
    options = dict(config.get("condition_options") or DEFAULT_PERFUSION_ENCODER)
    options["latent_channels"] = int(config.get("latent_channels", 3)) if wants_head else 0
    return {"condition_encoder": "perfusion", "condition_options": options,
            **({"parameterization": objective["parameterization"]} if residual else {})}


#: `PerfusionEncoder` widths of ``--condition perfusion`` when the network config names none.
DEFAULT_PERFUSION_ENCODER: dict[str, Any] = {"out_channels": 32, "hidden_channels": 32, "down_channels": 64,
                                             "sigmas": [1.0, 2.5]}


def base_loss_for(model_train: torch.nn.Module, autoencoder: torch.nn.Module, schedule: NoiseSchedule,
                  generator: torch.Generator, precision: str, *, objective: dict[str, Any]) -> BatchLoss:
    """The cLDM's per-batch loss: Eq. 4, optionally min-SNR weighted, plus the condition loss."""
    dev = schedule.device
    net = getattr(model_train, "module", model_train)
    scale = net.scale_factor
    if float(objective.get("condition_loss_weight") or 0.0) and not net.has_condition_head:
        raise InputError("the condition loss needs a condition encoder with a z_0 head")

    def loss_fn(batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        z0, t, eps, z_t = diffuse(autoencoder, schedule, batch["target"].to(dev, non_blocking=True), generator,
                                  precision, scale)
        loss, parts, _ = objective_terms(model_train, schedule, z0, t, eps, z_t, batch, precision, objective)
        return loss, parts

    return loss_fn


def objective_terms(model_train: torch.nn.Module, schedule: NoiseSchedule, z0: torch.Tensor, t: torch.Tensor,
                    eps: torch.Tensor, z_t: torch.Tensor, batch: dict[str, Any], precision: str,
                    objective: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
    """A cLDM's latent objective on one diffused batch: the loss, its parts, and ε̂.

    Eq. 4 (min-SNR weighted when ``objective`` says so), plus the lesion latent term and the
    condition loss at their weights in ``objective`` (`TrainSettings.objective`'s dict, as a
    checkpoint's ``training`` records it). Base training and post-training share it, so a
    post-trained model keeps optimising what its base was trained on.
    """
    dev = schedule.device
    gamma = objective.get("snr_gamma") if objective.get("loss_weighting") == "min-snr" else None
    weight = float(objective.get("condition_loss_weight") or 0.0)
    lesion_weight = float(objective.get("lesion_latent_weight") or 0.0)
    c = batch["cond"].to(dev, non_blocking=True)
    a_t = schedule.alphas_cumprod[t]
    # each row's case context (`ctp2mri.training.case_context.with_context`), for a model that takes it
    context = batch.get("context")
    extra = {} if context is None else {"context": context.to(dev, non_blocking=True)}
    with loop.autocast(precision, dev):
        out = model_train(z_t, t, c, with_condition_latent=bool(weight), alphas_cumprod_t=a_t, **extra)
    eps_hat, z0_c, lesion_logit = out if weight else (out, None, None)
    snr_weights = None if gamma is None else min_snr_weights(a_t, gamma)
    loss = latent_loss(eps, eps_hat) if gamma is None else weighted_latent_loss(eps, eps_hat, snr_weights)  # Eq. 4
    parts: dict[str, float] = {}
    if lesion_weight:
        z0_hat = schedule.predict_z0(z_t, t, eps_hat.float())  # Eq. 5
        lesion_term = lesion_latent_loss(z0, z0_hat, batch["lesion"].to(dev, non_blocking=True))
        parts["lesion_latent_loss"] = float(lesion_term.detach())
        loss = loss + lesion_weight * lesion_term
    if weight:
        # checkpoints from before the option weighed the condition's lesion term 1
        aux, aux_parts = condition_loss(z0_c, z0, lesion_logit, batch["lesion"].to(dev, non_blocking=True),
                                        float(objective.get("condition_lesion_weight", 1.0)))
        parts.update(aux_parts, condition_loss=float(aux.detach()))
        loss = loss + weight * aux
    return loss, parts, eps_hat


def diffuse(autoencoder: torch.nn.Module, schedule: NoiseSchedule, x: torch.Tensor, generator: torch.Generator,
            precision: str, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z_0, t, ε, z_t) for a batch of target images: z_0 = scale · E(x), t ~ U{0…T−1}, z_t by Eq. 2."""
    with torch.no_grad(), loop.autocast(precision, x.device):
        z0 = autoencoder.encode(x).float() * scale  # unquantised latent, as CompVis
    t = torch.randint(0, schedule.n_timesteps, (z0.shape[0],), generator=generator, device=x.device)
    eps = torch.randn(z0.shape, generator=generator, device=x.device)
    return z0, t, eps, schedule.q_sample(z0, t, eps)
