"""Training the conditional LDM (paper §2.1, Eq. 2 and 4; official configs/latent-diffusion/ldm.yaml).

Each step, as CompVis ``LatentDiffusion.p_losses`` with the frozen first stage:

    z_0 = E(x)                      (unquantised, ``VQModelInterface.encode``)
    t ~ U{0, …, T−1},  ε ~ N(0, I)
    z_t = √ᾱ_t z_0 + √(1 − ᾱ_t) ε   (Eq. 2, `NoiseSchedule.q_sample`)
    L = ‖ε − ε_θ(z_t, t, F(c))‖²    (Eq. 4, `ctp2mri.losses.latent_loss`)

AdamW over the UNet and the spatial rescaler F, lr = accumulation × processes × batch ×
2·10⁻⁶ (CompVis ``scale_lr``), EMA of the weights (``LitEma``, decay 0.9999) after every step.

`diffuse` (the Eq. 2 draw), `optimise` (the step loop) and `restore_run` (exact resume) are
shared with lesion-aware post-training (`ctp2mri.training.post_train`), which adds loss terms.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from ctp2mri.checkpoints import load_checkpoint, read_config
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
from ctp2mri.settings import EMA_DECAY
from ctp2mri.training import loop
from ctp2mri.training.distributed import init_distributed, shutdown
from ctp2mri.training.ema import EMA

__all__ = ["LDM_BASE_LR", "diffuse", "latent_scale_factor", "objective_terms", "optimise", "restore_run",
           "train_latent_model", "train_ldm"]

LDM_BASE_LR = 2e-6  # base_learning_rate of the official ldm.yaml (and the paper)
LOG_COLUMNS = ("step", "epoch", "loss", "lesion_latent_loss", "condition_loss", "condition_latent", "condition_lesion",
               "condition_bce", "lr", "seconds")


def train_ldm(
    data: Any,
    autoencoder: str | os.PathLike,
    out: str | os.PathLike,
    steps: int = 1000,
    batch_size: int = 16,
    lr: float | None = None,
    base_lr: float = LDM_BASE_LR,
    scale_lr: bool = True,
    grad_accum: int = 1,
    weight_decay: float = 0.01,
    ema_decay: float = EMA_DECAY,
    grad_clip: float | None = None,
    device: str = "auto",
    precision: str = "fp32",
    resume: bool = False,
    seed: int = 0,
    num_workers: int = 1,
    checkpoint_every: int = 500,
    log_every: int = 10,
    cldm_config: dict[str, Any] | None = None,
    schedule: NoiseSchedule | None = None,
    scale_factor: float | str | None = None,
    lesion_oversample: float | None = None,
    condition: str | None = None,
    loss_weighting: str = "uniform",
    snr_gamma: float = 5.0,
    condition_loss_weight: float = 0.0,
    parameterization: str = "eps",
    lesion_latent_weight: float = 0.0,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
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
    steps
        Total optimiser steps of the run (a resumed run continues to this count).
    batch_size, grad_accum
        Slices per forward and process; forwards accumulated per optimiser step.
    lr, base_lr, scale_lr
        Learning rate ``lr``; when None, ``grad_accum × processes × batch_size × base_lr``
        (CompVis ``scale_lr``), or ``base_lr`` alone with ``scale_lr=False``. The paper's
        2·10⁻⁶ is tuned for hundreds of thousands of GPU steps; a short CPU demo run needs a
        larger ``lr`` (e.g. 1e-4 … 2e-4).
    weight_decay
        AdamW weight decay (torch's default 0.01, which CompVis uses).
    ema_decay
        Decay of the weight EMA (0.9999 upstream; lower it for short runs).
    grad_clip
        Clip the gradient norm to this (off by default, as upstream).
    device, precision
        `ctp2mri.devices.resolve_device` spec; ``fp32``, or ``bf16``/``fp16`` autocast on CUDA.
    resume
        Continue the run in ``out`` exactly (weights, optimiser, EMA, data position, RNGs);
        refused if a setting that changes the computation differs.
    seed
        Seed of initialisation, data order, augmentation, timesteps and noise.
    num_workers
        DataLoader worker processes per training process.
    checkpoint_every, log_every
        Steps between checkpoints (and at the end) and between log.csv appends.
    cldm_config
        `ConditionalLDM` constructor arguments overriding the profile's (tiny models in tests).
    schedule
        Noise schedule (default: the paper's, T = 1000, linear 0.0015 → 0.0195).
    scale_factor
        Latent scale (`ConditionalLDM`): a number, ``"auto"`` for 1 / std of the training
        latents (`latent_scale_factor`), or None for the network config's (1.0 in the
        profiles, the official VQ-f4 setting).
    lesion_oversample
        Draw slices with lesion this many times as often as the others (`loop.lesion_sampling`);
        None (default) draws uniformly, as the paper. The objective stays Eq. 4.
    condition
        Condition encoder: ``"rescaler"`` (the paper's F), ``"perfusion"`` (the learned
        full-resolution `ctp2mri.models.conditioning.PerfusionEncoder`, with a z_0 head when
        ``condition_loss_weight > 0``), or None for the network config's.
    loss_weighting, snr_gamma
        ``"uniform"``: Eq. 4 as the paper; ``"min-snr"``: each sample's ε-loss weighted by
        min(SNR_t, γ) / SNR_t (`ctp2mri.losses.min_snr_weights`).
    condition_loss_weight
        Weight of the auxiliary condition loss (`ctp2mri.losses.condition_loss`: the encoder's
        ẑ_0 and lesion heads against z_0 and the lesion mask; needs the perfusion encoder, which
        then gets the heads); 0: off, as the paper.
    parameterization
        ``"eps"`` (the paper) or ``"z0-residual"``: the UNet refines the perfusion encoder's own
        estimate of z_0 (`ctp2mri.models.ConditionalLDM`); the loss stays the ε-loss (Eq. 4,
        optionally min-SNR weighted), computed from the ε̂ that estimate implies.
    lesion_latent_weight
        Weight of `ctp2mri.losses.lesion_latent_loss`, ‖M ⊙ (z_0 − ẑ_0)‖² with ẑ_0 from Eq. 5,
        added to the base objective (0: off, as the paper, which uses the lesion only in
        post-training).
    progress, cancel
        ``progress(step, steps, {"loss", "lr", …})`` after each step; a cancel saves a
        resumable checkpoint, then raises `ctp2mri.errors.Cancelled`.

    Returns
    -------
    Path of the run folder / checkpoint.
    """
    loop.check_run_numbers(steps=steps, batch_size=batch_size, seed=seed, num_workers=num_workers,
                           checkpoint_every=checkpoint_every, log_every=log_every, lr=lr, grad_accum=grad_accum,
                           ema_decay=ema_decay, weight_decay=weight_decay, grad_clip=grad_clip)
    objective = latent_objective(loss_weighting, snr_gamma, condition_loss_weight, parameterization,
                                 lesion_latent_weight)
    info = init_distributed(device)
    try:
        return _train(info, data, Path(autoencoder), Path(out), int(steps), int(batch_size), lr, base_lr, scale_lr,
                      int(grad_accum), float(weight_decay), float(ema_decay), grad_clip, precision, resume,
                      int(seed), int(num_workers), int(checkpoint_every), int(log_every), cldm_config,
                      schedule or NoiseSchedule(), _scale_setting(scale_factor),
                      loop.check_lesion_oversample(lesion_oversample), progress, cancel,
                      objective=objective, condition=condition)
    finally:
        shutdown(info)


LOSS_WEIGHTINGS = ("uniform", "min-snr")


def latent_objective(loss_weighting: str = "uniform", snr_gamma: float = 5.0,
                     condition_loss_weight: float = 0.0, parameterization: str = "eps",
                     lesion_latent_weight: float = 0.0) -> dict[str, Any]:
    """The base objective's settings as recorded in a checkpoint (validated)."""
    from ctp2mri.models.cldm import PARAMETERIZATIONS

    if parameterization not in PARAMETERIZATIONS:
        raise InputError(f"unknown parameterization {parameterization!r}; choose one of {', '.join(PARAMETERIZATIONS)}")
    if loss_weighting not in LOSS_WEIGHTINGS:
        raise InputError(f"unknown loss weighting {loss_weighting!r}; choose one of {', '.join(LOSS_WEIGHTINGS)}")
    gamma, weight = _finite(snr_gamma, "the min-SNR γ"), _finite(condition_loss_weight, "the condition loss weight")
    if gamma <= 0:
        raise InputError(f"the min-SNR γ must be positive, got {snr_gamma!r}")
    if weight < 0:
        raise InputError(f"the condition loss weight must be ≥ 0, got {condition_loss_weight!r}")
    objective: dict[str, Any] = {"parameterization": parameterization, "loss": "l2 (Eq. 4)"}
    if loss_weighting != "uniform":
        objective.update(loss_weighting=loss_weighting, snr_gamma=gamma)
    if weight > 0:
        objective["condition_loss_weight"] = weight
    lesion_weight = _finite(lesion_latent_weight, "the lesion latent weight")
    if lesion_weight < 0:
        raise InputError(f"the lesion latent weight must be ≥ 0, got {lesion_latent_weight!r}")
    if lesion_weight > 0:
        objective["lesion_latent_weight"] = lesion_weight
    return objective


def _finite(value: Any, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a number, got {value!r}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise InputError(f"{what} must be a finite number, got {value!r}")
    return number


def _train(info, data, ae_dir, out, steps, batch_size, lr, base_lr, scale_lr, grad_accum, weight_decay, ema_decay,
           grad_clip, precision, resume, seed, num_workers, checkpoint_every, log_every, cldm_config, schedule,
           scale_factor, lesion_oversample, progress, cancel, *, objective, condition) -> Path:
    loss_fn_for = functools.partial(base_loss_for, objective=objective)
    overrides: dict[str, Any] = {} if scale_factor is None else {"scale_factor": scale_factor}
    if condition is not None or objective.get("condition_loss_weight") or objective["parameterization"] != "eps":
        overrides.update(_condition_overrides(condition, cldm_config, objective))
    return train_latent_model(
        info, "cldm", ConditionalLDM, data, ae_dir, out, steps, batch_size, lr, base_lr, scale_lr, grad_accum,
        weight_decay, ema_decay, grad_clip, precision, resume, seed, num_workers, checkpoint_every, log_every,
        cldm_config, schedule, objective, loss_fn_for, progress, cancel, overrides,
        lesion_oversample=lesion_oversample)


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
                  generator: torch.Generator, precision: str, *, objective: dict[str, Any]
                  ) -> Callable[[dict[str, Any]], tuple[torch.Tensor, dict[str, float]]]:
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
    condition loss at their weights in ``objective`` (`latent_objective`'s dict, as a
    checkpoint's ``training`` records it). Base training and post-training share it, so a
    post-trained model keeps optimising what its base was trained on.
    """
    dev = schedule.device
    gamma = objective.get("snr_gamma") if objective.get("loss_weighting") == "min-snr" else None
    weight = float(objective.get("condition_loss_weight") or 0.0)
    lesion_weight = float(objective.get("lesion_latent_weight") or 0.0)
    c = batch["cond"].to(dev, non_blocking=True)
    a_t = schedule.alphas_cumprod[t]
    with loop.autocast(precision, dev):
        out = model_train(z_t, t, c, with_condition_latent=bool(weight), alphas_cumprod_t=a_t)
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
        aux, aux_parts = condition_loss(z0_c, z0, lesion_logit, batch["lesion"].to(dev, non_blocking=True))
        parts.update(aux_parts, condition_loss=float(aux.detach()))
        loss = loss + weight * aux
    return loss, parts, eps_hat


def _scale_setting(value: float | str | None) -> float | str | None:
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"the latent scale factor must be a positive number or 'auto', got {value!r}") from None
    if not 0 < number < float("inf"):
        raise InputError(f"the latent scale factor must be a positive number or 'auto', got {value!r}")
    return number


def train_latent_model(info: Any, kind: str, network: type[torch.nn.Module], data: Any, ae_dir: Path, out: Path,
                       steps: int, batch_size: int, lr: float | None, base_lr: float, scale_lr: bool,
                       grad_accum: int, weight_decay: float, ema_decay: float, grad_clip: float | None,
                       precision: str, resume: bool, seed: int, num_workers: int, checkpoint_every: int,
                       log_every: int, net_config: dict[str, Any] | None, schedule: Any,
                       objective: dict[str, Any], loss_for: Callable[..., Callable], progress: Any,
                       cancel: Any, net_overrides: dict[str, Any] | None = None, *,
                       lesion_oversample: float | None = None) -> Path:
    """The run of a latent model on a frozen autoencoder, shared by the cLDM and the cBBDM.

    ``kind`` names the checkpoint kind and the settings key of ``net_config`` (the profile's
    ``model_config(profile, kind)`` when None); ``network`` is its class; ``schedule`` the
    noise schedule or bridge (anything with ``config()`` and ``to(device)``); ``objective``
    extra settings describing the loss; ``loss_for(model_train, autoencoder, schedule,
    generator, precision)`` returns the per-batch loss function given to `optimise`;
    ``net_overrides`` replace entries of the network config (``scale_factor="auto"`` is
    measured on the training set); ``lesion_oversample`` as `train_ldm`'s.
    """
    dev = info.device
    precision = loop.check_precision(precision, dev)
    if grad_accum < 1:
        raise InputError(f"gradient accumulation must be at least 1 forward per step, got {grad_accum}")
    nets, ae_cfg = load_checkpoint(ae_dir, names=["model"], map_location=dev, kind="autoencoder")
    autoencoder = nets["model"].eval().requires_grad_(False)
    profile = ae_cfg["profile"]
    out = loop.prepare_out_dir(out, resume) if info.is_main else out
    loop.barrier(info)
    dataset = loop.load_dataset(data, profile, seed, progress=progress if info.is_main else None, cancel=cancel)
    net_config = {**(net_config or model_config(profile, kind)), **(net_overrides or {})}
    if net_config.get("scale_factor") == "auto":
        # a resumed run keeps the value it measured (a GPU's encode need not repeat bit for bit)
        saved = (read_config(out).get("training") or {}).get(kind, {}) if resume else {}
        net_config["scale_factor"] = saved.get("scale_factor") or latent_scale_factor(autoencoder, dataset, dev)
    if net_config["latent_channels"] != autoencoder.embedding_dim:
        label = {"cldm": "cLDM", "cbbdm": "cBBDM"}.get(kind, kind)
        raise InputError(f"the {label} models {net_config['latent_channels']} latent channels but the autoencoder "
                         f"in {ae_dir} makes {autoencoder.embedding_dim}")
    weights, sampling = loop.lesion_sampling(dataset, lesion_oversample, info)
    lr_value = loop.effective_lr(base_lr, batch_size, info.world_size, grad_accum, scale_lr, lr)
    settings = {
        "profile": profile, "steps": steps, "batch_size": batch_size, "grad_accum": grad_accum,
        "world_size": info.world_size, "base_lr": base_lr, "scale_lr": scale_lr, "lr": lr_value,
        "optimizer": "AdamW", "weight_decay": weight_decay, "ema_decay": ema_decay, "ema_warmup": True,
        "grad_clip": grad_clip, "precision": precision, "seed": seed, "num_workers": num_workers,
        "device": str(dev), "checkpoint_every": checkpoint_every, "log_every": log_every,
        **loop.sampling_setting(lesion_oversample), **objective, "data": loop.data_identity(dataset),
        kind: net_config, "schedule": schedule.config(),
        "autoencoder": {"config": autoencoder.config, "git_commit": ae_cfg.get("provenance", {}).get("git_commit"),
                        "steps": ae_cfg.get("provenance", {}).get("steps")},
    }

    loop.seed_everything(seed)
    model = network(**net_config).to(dev)
    ema = EMA(model, ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=lr_value, weight_decay=weight_decay)
    scaler = loop.make_grad_scaler(precision)
    generator = loop.noise_generator(seed, info)
    step, position, log = 0, {"epoch": 0, "batch_in_epoch": 0}, loop.RunLog(LOG_COLUMNS)
    if resume:
        step, position, log = restore_run(out, settings, model, ema, opt, scaler, generator, info)
    if step >= steps:
        raise InputError(f"the run in {out} has already trained {step} steps (≥ --steps {steps}); "
                         "give a larger --steps to continue it")

    schedule = schedule.to(dev)
    model_train = DDP(model, device_ids=[dev] if dev.type == "cuda" else None) if info.distributed else model
    stream = loop.BatchStream(dataset, batch_size, info, seed, num_workers, weights=weights, **position)
    run = loop.Run(out, info, steps, log, checkpoint_every, log_every, progress, cancel)
    model.train()
    ae_source = {"source": str(ae_dir), "provenance": ae_cfg.get("provenance")}

    def save(step: int) -> None:
        config = loop.base_config(kind, profile, settings, dataset, step, data,
                                  {"schedule": schedule.config(), "autoencoder_source": ae_source,
                                   "inference_network": "ema", "sampling": sampling})
        state = {"step": step, "position": stream.position(), "optimizer": opt.state_dict(),
                 "ema": ema.state(), "scaler": scaler.state_dict() if scaler is not None else None}
        run.save({"model": model, "ema": ema.module, "autoencoder": autoencoder}, config, state,
                 loop.rng_snapshot(generator))

    optimise(info, model, model_train, ema, opt, scaler, stream, run, step, steps, grad_accum, grad_clip,
             lr_value, loss_for(model_train, autoencoder, schedule, generator, precision), save)
    return out


def latent_scale_factor(autoencoder: torch.nn.Module, dataset: Any, device: torch.device,
                        max_slices: int = 256) -> float:
    """1 / std of the unquantised latents E(x) over up to ``max_slices`` evenly spaced
    training slices, un-augmented (CompVis ``scale_by_std``, which uses the first batch).

    Deterministic in the data and the autoencoder, so a resumed run recomputes the same value.
    """
    n = len(dataset)
    if n == 0:
        raise InputError("the training set has no slices to measure the latent scale on")
    index = sorted({round(i * (n - 1) / max(1, min(n, max_slices) - 1)) for i in range(min(n, max_slices))})
    images = dataset.target[index].to(torch.float32)  # the cached slices, before augmentation
    with torch.no_grad():
        z = torch.cat([autoencoder.encode(images[i:i + 32].to(device)).float().cpu()
                       for i in range(0, len(images), 32)])
    std = float(z.std())
    if not std > 0:
        raise InputError("the autoencoder's latents have zero spread on the training set; it cannot be used")
    return round(1.0 / std, 6)


# shared with post-training ---------------------------------------------------------------------
def restore_run(out: Path, settings: dict[str, Any], model: torch.nn.Module, ema: EMA,
                opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, generator: torch.Generator,
                info: Any) -> tuple[int, dict[str, int], loop.RunLog]:
    """Load a saved run's model, EMA, optimiser, scaler and RNGs; (step, data position, log)."""
    _, state = loop.resume_state(out, settings)
    saved, _ = load_checkpoint(out, names=["model", "ema"], build=False, map_location=info.device)
    model.load_state_dict(saved["model"])
    ema.load(saved["ema"], state["ema"])
    opt.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    loop.rng_restore(state["rng"], info, generator)
    return int(state["step"]), state["position"], loop.RunLog.from_state(state["log"])


def diffuse(autoencoder: torch.nn.Module, schedule: NoiseSchedule, x: torch.Tensor, generator: torch.Generator,
            precision: str, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z_0, t, ε, z_t) for a batch of target images: z_0 = scale · E(x), t ~ U{0…T−1}, z_t by Eq. 2."""
    with torch.no_grad(), loop.autocast(precision, x.device):
        z0 = autoencoder.encode(x).float() * scale  # unquantised latent, as CompVis
    t = torch.randint(0, schedule.n_timesteps, (z0.shape[0],), generator=generator, device=x.device)
    eps = torch.randn(z0.shape, generator=generator, device=x.device)
    return z0, t, eps, schedule.q_sample(z0, t, eps)


def optimise(info: Any, model: torch.nn.Module, model_train: torch.nn.Module, ema: EMA,
             opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, stream: loop.BatchStream,
             run: loop.Run, step: int, steps: int, grad_accum: int, grad_clip: float | None, lr_value: float,
             loss_fn: Callable[[dict[str, Any]], tuple[torch.Tensor, dict[str, float]]],
             save: Callable[[int], None]) -> int:
    """The optimisation loop from ``step`` to ``steps``: accumulation, DDP sync, clipping, EMA,
    logging (``loss`` and the parts ``loss_fn`` returns, averaged over micro-batches),
    checkpoints and cancellation. Returns the last step."""
    batches = iter(stream)
    while step < steps:
        opt.zero_grad(set_to_none=True)
        total, parts = 0.0, {}
        for micro in range(grad_accum):
            batch = next(batches)
            # Gradients are all-reduced on the last micro-batch only.
            sync = contextlib.nullcontext() if not info.distributed or micro == grad_accum - 1 \
                else model_train.no_sync()
            with sync:
                loss, extra = loss_fn(batch)
                _backward(loss / grad_accum, scaler)
            total += float(loss.detach()) / grad_accum
            for k, v in extra.items():
                parts[k] = parts.get(k, 0.0) + float(v) / grad_accum
        if scaler is not None:
            if grad_clip:
                scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(opt)
            scaler.update()
        else:
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
        ema.update(model)
        step += 1
        cancelled = run.end_step(step, {"loss": total, **parts, "epoch": stream.epoch, "lr": lr_value})
        run.finish_step(step, cancelled, functools.partial(save, step))
    return step


def _backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
    (scaler.scale(loss) if scaler is not None else loss).backward()

