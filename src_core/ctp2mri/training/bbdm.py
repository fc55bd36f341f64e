"""Training the latent Brownian-bridge baseline, BBDM/cBBDM (Li et al. 2023; Kim & Chung 2024).

Each step, on the frozen autoencoder of a `ctp2mri train-autoencoder` run:

    x_0 = E(x)                              (unquantised, as the cLDM)
    y = F(c)                                the CTP's latent, trainable (`BrownianBridgeLDM`)
    t ~ U{1, …, T},  ε ~ N(0, I)
    x_t = (1 − m_t) x_0 + m_t y + √δ_t ε    (`BrownianBridge.q_sample`)
    L = ‖m_t (y − x_0) + √δ_t ε − ô_θ(x_t, t, y)‖₁    (BBDM's "grad" objective, L1)

The run (AdamW, EMA, accumulation, DDP, checkpoints, log, exact resume, cancel) is the
cLDM's (`ctp2mri.training.latent_run`), as a `TrainSettings` asks; the checkpoint has
``kind: "cbbdm"`` with networks ``model``, ``ema`` and ``autoencoder`` and the bridge's
schedule, so `ctp2mri.synthesis.inference.load_model` samples it and `ctp2mri post-train` continues it.

Lesion-aware post-training (paper §2.2, Table 3) of a cBBDM uses `bridge_post_training_loss`:
the one-step estimate x̂_0 = x_t − ô (`BrownianBridge.predict_x0`) decoded by the frozen
decoder, with the Eq. 6–8 terms added to the bridge objective.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from ctp2mri.checks import settings_with
from ctp2mri.diffusion.bridge import BRIDGE_LOSSES, BrownianBridge, bridge_loss
from ctp2mri.errors import InputError
from ctp2mri.models import BrownianBridgeLDM
from ctp2mri.progress import CancelToken, ProgressCallback
from ctp2mri.settings import LAMBDA_IMAGE, LAMBDA_LESION
from ctp2mri.training import loop
from ctp2mri.training.distributed import init_distributed, shutdown
from ctp2mri.training.image_terms import TARGETS, add_image_terms, core_for, image_space_terms
from ctp2mri.training.latent_run import LatentModel, train_latent_model
from ctp2mri.training.run_settings import TrainSettings

__all__ = ["bridge_diffuse", "bridge_post_training_loss", "bridge_training_loss", "train_bbdm"]


def train_bbdm(
    data: Any,
    autoencoder: str | os.PathLike,
    out: str | os.PathLike,
    settings: TrainSettings | None = None,
    *,
    loss_type: str = "l1",
    cbbdm_config: dict[str, Any] | None = None,
    bridge: BrownianBridge | None = None,
    device: str = "auto",
    resume: bool = False,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    **options: Any,
) -> Path:
    """Train (or resume training) a latent Brownian-bridge model on a frozen autoencoder.

    Parameters
    ----------
    data, autoencoder, out, device, resume
        As `ctp2mri.training.train_ldm`.
    settings, options
        A `TrainSettings`, and/or its fields as keywords, as `train_ldm`'s (same optimiser and
        learning-rate rule, so the two latent models are trained alike; BBDM's own configuration
        uses Adam at 1e-4). Its cLDM-only fields (`CLDM_ONLY`) must keep the paper's values.
    loss_type
        ``"l1"`` (BBDM's configuration) or ``"l2"`` on the "grad" objective.
    cbbdm_config
        `BrownianBridgeLDM` constructor arguments overriding the profile's ``cbbdm`` ones
        (``concat_condition=False`` gives plain BBDM; tiny models in tests).
    bridge
        The bridge schedule (default: T = 1000, s = 1, as BBDM).
    progress, cancel
        ``progress(step, steps, {"loss", "lr", …})`` after each step; a cancel saves a
        resumable checkpoint, then raises `ctp2mri.errors.Cancelled`.

    Returns
    -------
    Path of the run folder / checkpoint (``kind: "cbbdm"``).
    """
    opts = settings_with(TrainSettings, settings, options, "train_bbdm")
    if loss_type not in BRIDGE_LOSSES:
        raise InputError(f"unknown bridge loss {loss_type!r}; choose one of {', '.join(BRIDGE_LOSSES)}")
    cldm_only = opts.cldm_only()
    if cldm_only:
        raise InputError(f"{', '.join(cldm_only)} appl{'ies' if len(cldm_only) == 1 else 'y'} to the cLDM only; "
                         "the cBBDM bridges the CTP's own latent with its own objective")

    def loss_for(model_train, autoencoder, bridge, generator, precision):
        return functools.partial(bridge_training_loss, model_train, autoencoder, bridge, generator=generator,
                                 loss_type=loss_type, precision=precision)

    objective = {"parameterization": "grad", "loss_type": loss_type,
                 "loss": f"{loss_type} on m_t(y − x0) + √δ_t ε"}
    latent = LatentModel("cbbdm", BrownianBridgeLDM, cbbdm_config, {}, bridge or BrownianBridge(), objective, loss_for)
    info = init_distributed(device)
    try:
        return train_latent_model(info, latent, data, Path(autoencoder), Path(out), opts, resume, progress, cancel)
    finally:
        shutdown(info)


# one batch -------------------------------------------------------------------------------------
def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DDP) else model


def bridge_diffuse(model: torch.nn.Module, autoencoder: torch.nn.Module, bridge: BrownianBridge, x: torch.Tensor,
                   c: torch.Tensor, generator: torch.Generator, precision: str = "fp32",
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_0, y, t, x_t, objective) for a batch of target images x and CTP slices c.

    x_0 = E(x) without gradient; y = F(c) keeps its graph (F is trained through the endpoint,
    the state and the objective); t ~ U{1…T}; ε ~ N(0, I) from ``generator``.
    """
    with torch.no_grad(), loop.autocast(precision, x.device):
        x0 = autoencoder.encode(x).float()  # unquantised latent, as the cLDM
    with loop.autocast(precision, x.device):
        y = _unwrap(model).encode_condition(c).float()
    t = bridge.random_timesteps(x0.shape[0], generator, x.device)
    noise = torch.randn(x0.shape, generator=generator, device=x.device)
    return x0, y, t, bridge.q_sample(x0, y, t, noise), bridge.objective(x0, y, t, noise)


def bridge_training_loss(model: torch.nn.Module, autoencoder: torch.nn.Module, bridge: BrownianBridge,
                         batch: Mapping[str, Any], generator: torch.Generator, loss_type: str = "l1",
                         precision: str = "fp32") -> tuple[torch.Tensor, dict[str, float]]:
    """The bridge objective ‖m_t(y − x_0) + √δ_t ε − ô_θ(x_t, t, y)‖ of one batch (attached to the graph)."""
    dev = bridge.device
    _, y, t, x_t, objective = bridge_diffuse(model, autoencoder, bridge, batch["target"].to(dev, non_blocking=True),
                                             batch["cond"].to(dev, non_blocking=True), generator, precision)
    with loop.autocast(precision, dev):
        predicted = model(x_t, t, y)
    return bridge_loss(objective, predicted, loss_type), {}


def bridge_post_training_loss(model: torch.nn.Module, autoencoder: torch.nn.Module, bridge: BrownianBridge,
                              batch: Mapping[str, Any], generator: torch.Generator, lambda_image: float = LAMBDA_IMAGE,
                              lambda_lesion: float = LAMBDA_LESION, target: str = "input", precision: str = "fp32",
                              gradient_checkpointing: bool = False, loss_type: str = "l1",
                              lambda_core: float = 0.0, core: tuple[float, float] | None = None,
                              ) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 8 for the Brownian bridge: L = L_bridge + λ_image L_image + λ_lesion L_lesion.

    L_bridge is the model's own latent objective (`bridge_loss`, in place of the cLDM's
    Eq. 4); the image terms (Eq. 6–7, `image_space_terms`) compare x with D(x̂_0), where
    x̂_0 = x_t − ô_θ(x_t, t, y) is the bridge's one-step estimate of the clean latent
    (derived in `BrownianBridge.predict_x0`). ``batch`` holds ``target``, ``cond``,
    ``brain`` and ``lesion``; ``autoencoder`` must be frozen by the caller. A batch
    without lesion voxel gives L_lesion = 0 exactly. Parts are returned as floats, with the
    same names as `ctp2mri.training.post_training_loss`'s, as are ``lambda_core`` and ``core``.
    """
    if target not in TARGETS:
        raise InputError(f"unknown post-training target {target!r}; choose one of {', '.join(TARGETS)}")
    dev = bridge.device
    x = batch["target"].to(dev, non_blocking=True)
    lesion = batch["lesion"].to(dev, non_blocking=True)
    x0, y, t, x_t, objective = bridge_diffuse(model, autoencoder, bridge, x, batch["cond"].to(dev, non_blocking=True),
                                              generator, precision)
    with loop.autocast(precision, dev):
        predicted = model(x_t, t, y)
    latent = bridge_loss(objective, predicted, loss_type)
    parts = {"latent_loss": float(latent.detach()), "lesion_voxels": float(lesion.sum()),
             "lesion_slices": float((lesion.flatten(1).amax(1) > 0).float().mean())}
    if lambda_image == 0 and lambda_lesion == 0 and lambda_core == 0:
        return latent, parts
    x0_hat = bridge.predict_x0(x_t, t, predicted.float())  # x̂_0 = x_t − ô
    terms = image_space_terms(autoencoder, x0_hat, x0, x, batch["brain"].to(dev, non_blocking=True), lesion,
                              target, precision, gradient_checkpointing, core=core_for(lambda_core, core))
    return add_image_terms(latent, terms, lambda_image, lambda_lesion, lambda_core, parts)
