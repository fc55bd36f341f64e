"""Training the Pix2Pix baseline (Isola et al., CVPR 2017) on the same slices as the cLDM.

Image space, no autoencoder: the U-Net generator G maps the 15 CTP frames to (DWI, ADC)
(`ctp2mri.models.Pix2PixGenerator`); the conditional PatchGAN D scores [c, x] pairs. Each
step, as Pix2Pix's ``optimize_parameters``:

1. x̂ = G(c);
2. discriminator: L_D = ½ [BCE(D(c, x), 1) + BCE(D(c, sg(x̂)), 0)] (`pix2pix_discriminator_loss`);
3. generator: L_G = BCE(D(c, x̂), 1) + λ_L1 · |x − x̂|₁, λ_L1 = 100 (`pix2pix_generator_loss`).

Adam (lr 2·10⁻⁴, β = (0.5, 0.999)) for both, constant learning rate (Pix2Pix decays it
linearly over its second 100 epochs; a step-limited run keeps it constant). The run folder
is a checkpoint with ``kind: "pix2pix"``, networks ``model`` (G) and ``discriminator``, and
the training data's intensity ranges; `ctp2mri evaluate` scores it like the latent models.
Checkpoints, log, exact resume, progress, cancel and DDP are `ctp2mri.training.loop`'s.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from ctp2mri.checkpoints import load_checkpoint
from ctp2mri.errors import InputError
from ctp2mri.models import PatchGANDiscriminator, Pix2PixGenerator, model_config
from ctp2mri.progress import CancelToken, ProgressCallback
from ctp2mri.training import loop
from ctp2mri.training.autoencoder import _optimise as optimiser_step
from ctp2mri.training.batches import BatchStream, data_identity, load_dataset
from ctp2mri.training.distributed import barrier, init_distributed, shutdown
from ctp2mri.training.rng import noise_generator, rng_restore, rng_snapshot, seed_everything
from ctp2mri.training.sampling import check_lesion_oversample, lesion_sampling, sampling_setting

__all__ = ["PIX2PIX_LR", "pix2pix_discriminator_loss", "pix2pix_generator_loss", "train_pix2pix"]

PIX2PIX_LR = 2e-4  # Pix2Pix's Adam learning rate
LOG_COLUMNS = ("step", "epoch", "loss", "l1_loss", "g_gan_loss", "d_loss", "lr", "seconds")


def pix2pix_generator_loss(x: torch.Tensor, x_hat: torch.Tensor, logits_fake: torch.Tensor | None,
                           lambda_l1: float = 100.0) -> tuple[torch.Tensor, dict[str, float]]:
    """L_G = BCE(D(c, x̂), real) + λ_L1 · mean |x − x̂| (Pix2Pix Eq. 4, vanilla GAN loss).

    Without ``logits_fake`` (the L1-only reference regressor) the GAN term is left out.
    """
    l1 = (x.float() - x_hat.float()).abs().mean()
    if logits_fake is None:
        return lambda_l1 * l1, {"l1_loss": float(l1.detach())}
    gan = F.binary_cross_entropy_with_logits(logits_fake.float(), torch.ones_like(logits_fake, dtype=torch.float32))
    return gan + lambda_l1 * l1, {"l1_loss": float(l1.detach()), "g_gan_loss": float(gan.detach())}


def pix2pix_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """L_D = ½ [BCE(D(c, x), real) + BCE(D(c, x̂), fake)]: halved, as Pix2Pix slows D down."""
    real = F.binary_cross_entropy_with_logits(logits_real.float(), torch.ones_like(logits_real, dtype=torch.float32))
    fake = F.binary_cross_entropy_with_logits(logits_fake.float(), torch.zeros_like(logits_fake, dtype=torch.float32))
    return 0.5 * (real + fake)


def train_pix2pix(
    data: Any,
    out: str | os.PathLike,
    profile: str = "demo",
    steps: int = 1000,
    batch_size: int = 16,
    lr: float | None = None,
    lambda_l1: float = 100.0,
    adversarial: bool = True,
    lesion_oversample: float | None = None,
    grad_clip: float | None = None,
    device: str = "auto",
    precision: str = "fp32",
    resume: bool = False,
    seed: int = 0,
    num_workers: int = 1,
    checkpoint_every: int = 500,
    log_every: int = 10,
    generator_config: dict[str, Any] | None = None,
    discriminator_config: dict[str, Any] | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    dwi_hi_median: float | None = None,
) -> Path:
    """Train (or resume training) the Pix2Pix baseline; the run folder ``out`` is its checkpoint.

    Parameters
    ----------
    data
        Data folder with ``splits.json`` (its ``train`` split) or a `SliceDataset`.
    out
        Run folder: new or empty, or (``resume``) a run saved before.
    profile
        Model grid and default network sizes (``pix2pix`` and ``pix2pix_discriminator`` of
        `ctp2mri.models.model_config`).
    steps, batch_size
        Optimiser steps (each one D and one G update) and slices per step and process.
    lr
        Adam learning rate of both networks (default 2·10⁻⁴, Pix2Pix's; not scaled by batch).
    lambda_l1
        Weight of the L1 term (Pix2Pix's 100).
    adversarial
        False trains the generator on the L1 term alone, with no discriminator: the fast
        deterministic reference regressor ("U-Net (L1)") that shows what a non-generative model
        learns in the same CPU budget as the cLDM.
    lesion_oversample
        Draw slices with lesion this many times as often as the others (`ctp2mri.training.sampling`);
        None: uniform, as Pix2Pix.
    dwi_hi_median
        DWI's upper bound × the brain median (the DWI anchor, `ctp2mri.case_slices.normalise_case`);
        None (default): the 99.5 % quantile.
    grad_clip
        Clip each network's gradient norm to this (off by default).
    device, precision, resume, seed, num_workers, checkpoint_every, log_every
        As `ctp2mri.training.train_autoencoder`.
    generator_config, discriminator_config
        Constructor arguments overriding the profile's (tiny networks in tests).
    progress, cancel
        ``progress(step, steps, {"loss", "l1_loss", "d_loss", …})`` after each step; a cancel
        saves a resumable checkpoint, then raises `ctp2mri.errors.Cancelled`.

    Returns
    -------
    Path of the run folder / checkpoint (``kind: "pix2pix"``).
    """
    if not 0 <= float(lambda_l1) < float("inf"):
        raise InputError(f"--lambda-l1 must be a finite number ≥ 0, got {lambda_l1}")
    loop.check_run_numbers(steps=steps, batch_size=batch_size, seed=seed, num_workers=num_workers,
                           checkpoint_every=checkpoint_every, log_every=log_every, lr=lr, grad_clip=grad_clip)
    info = init_distributed(device)
    try:
        return _train(info, data, Path(out), profile, int(steps), int(batch_size), lr, float(lambda_l1), grad_clip,
                      precision, resume, int(seed), int(num_workers), int(checkpoint_every), int(log_every),
                      generator_config, discriminator_config, progress, cancel, adversarial=bool(adversarial),
                      lesion_oversample=check_lesion_oversample(lesion_oversample), dwi_hi_median=dwi_hi_median)
    finally:
        shutdown(info)


def _train(info, data, out, profile, steps, batch_size, lr, lambda_l1, grad_clip, precision, resume, seed,
           num_workers, checkpoint_every, log_every, g_config, d_config, progress, cancel, *, adversarial: bool = True,
           lesion_oversample: float | None = None, dwi_hi_median: float | None = None) -> Path:
    dev = info.device
    precision = loop.check_precision(precision, dev)
    out = loop.prepare_out_dir(out, resume) if info.is_main else out
    barrier(info)
    dataset = load_dataset(data, profile, seed, progress=progress if info.is_main else None, cancel=cancel,
                           dwi_hi_median=dwi_hi_median)
    g_config = dict(g_config or model_config(profile, "pix2pix"))
    d_config = dict(d_config or model_config(profile, "pix2pix_discriminator"))
    if d_config["in_channels"] != g_config["in_channels"] + g_config["out_channels"]:
        raise InputError(f"the Pix2Pix discriminator sees [CTP, DWI/ADC]: it needs "
                         f"{g_config['in_channels'] + g_config['out_channels']} input channels, got "
                         f"{d_config['in_channels']}")
    lr_value = loop.effective_lr(PIX2PIX_LR, batch_size, info.world_size, 1, False, lr)
    settings = {
        "profile": profile, "steps": steps, "batch_size": batch_size, "world_size": info.world_size, "lr": lr_value,
        "optimizer": "Adam", "betas": [0.5, 0.999], "lambda_l1": lambda_l1, "gan_loss": "vanilla (BCE)",
        "grad_clip": grad_clip, "precision": precision, "seed": seed, "num_workers": num_workers, "device": str(dev),
        "checkpoint_every": checkpoint_every, "log_every": log_every, "data": data_identity(dataset),
        "pix2pix": g_config, "discriminator": d_config,
        # recorded only when not the default, so that runs saved before these options resume
        **({} if adversarial else {"adversarial": False}), **sampling_setting(lesion_oversample),
    }
    weights, sampling = lesion_sampling(dataset, lesion_oversample, info)

    seed_everything(seed)
    gen = Pix2PixGenerator(**g_config).to(dev)
    disc = PatchGANDiscriminator(**d_config).to(dev)
    opt_g = torch.optim.Adam(gen.parameters(), lr=lr_value, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=lr_value, betas=(0.5, 0.999))
    scaler = loop.make_grad_scaler(precision)
    generator = noise_generator(seed, info)  # unused by the step; kept for a uniform run state
    step, position, log = 0, {"epoch": 0, "batch_in_epoch": 0}, loop.RunLog(LOG_COLUMNS)
    if resume:
        _, state = loop.resume_state(out, settings)
        nets, _ = load_checkpoint(out, names=["model", "discriminator"], build=False, map_location=dev)
        gen.load_state_dict(nets["model"])
        disc.load_state_dict(nets["discriminator"])
        opt_g.load_state_dict(state["optimizers"]["generator"])
        opt_d.load_state_dict(state["optimizers"]["discriminator"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, position, log = int(state["step"]), state["position"], loop.RunLog.from_state(state["log"])
        rng_restore(state["rng"], info, generator)
    if step >= steps:
        raise InputError(f"the run in {out} has already trained {step} steps (≥ --steps {steps}); "
                         "give a larger --steps to continue it")

    g_train = DDP(gen, device_ids=[dev] if dev.type == "cuda" else None) if info.distributed else gen
    d_train = DDP(disc, device_ids=[dev] if dev.type == "cuda" else None) if info.distributed else disc
    stream = BatchStream(dataset, batch_size, info, seed, num_workers, weights=weights, **position)
    run = loop.Run(out, info, steps, log, checkpoint_every, log_every, progress, cancel)
    gen.train()
    disc.train()

    def save() -> None:
        config = loop.base_config("pix2pix", profile, settings, dataset, step, data,
                                  {"inference_network": "model", "sampling": sampling})
        state = {"step": step, "position": stream.position(),
                 "optimizers": {"generator": opt_g.state_dict(), "discriminator": opt_d.state_dict()},
                 "scaler": scaler.state_dict() if scaler is not None else None}
        run.save({"model": gen, "discriminator": disc}, config, state, rng_snapshot(generator))

    batches = iter(stream)
    while step < steps:
        batch = next(batches)
        c = batch["cond"].to(dev, non_blocking=True)
        x = batch["target"].to(dev, non_blocking=True)
        with loop.autocast(precision, dev):
            x_hat = g_train(c)
        values = {"epoch": stream.epoch, "lr": lr_value}
        logits_fake = None
        if adversarial:
            with loop.autocast(precision, dev):
                # Real and synthetic pairs in one forward: DDP allows one forward per backward.
                logits = d_train(torch.cat([torch.cat([c, x], 1), torch.cat([c, x_hat.detach()], 1)]))
            logits_real, logits_fake = logits.split(x.shape[0])
            d_loss = pix2pix_discriminator_loss(logits_real, logits_fake)
            optimiser_step(opt_d, d_loss, disc, scaler, grad_clip)
            values["d_loss"] = float(d_loss.detach())
            with loop.autocast(precision, dev):
                # D scores x̂ for the generator; its own weights get no gradient from this term.
                disc.requires_grad_(False)
                logits_fake = disc(torch.cat([c, x_hat], 1))
                disc.requires_grad_(True)
        g_loss, parts = pix2pix_generator_loss(x, x_hat, logits_fake, lambda_l1)
        optimiser_step(opt_g, g_loss, gen, scaler, grad_clip)
        if scaler is not None:
            scaler.update()
        step += 1
        values.update(loss=float(g_loss.detach()), **parts)
        cancelled = run.end_step(step, values)
        run.finish_step(step, cancelled, save)
    return out
