"""Training the VQGAN first stage (paper §2.1; official configs/autoencoder/VQGAN.yaml).

Each step, as the official ``VQModel.training_step`` with its two optimisers:

1. autoencoder: x̂, L_codebook = AE(x); L = |x − x̂|₁ + λ_adapt·f(step)·(−E[D(x̂)]) + L_codebook
   (`ctp2mri.losses.autoencoder_loss`), Adam(β = 0.5, 0.9);
2. discriminator, from ``disc_start`` on: f(step)·hinge(D(x), D(sg(x̂))), its own Adam.

Before ``disc_start`` both adversarial terms are multiplied by 0 upstream; here they are not
computed at all (same gradients, half the cost).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from ctp2mri.checkpoints import load_checkpoint
from ctp2mri.errors import InputError
from ctp2mri.losses import autoencoder_loss, discriminator_factor, hinge_discriminator_loss
from ctp2mri.models import PatchGANDiscriminator, VQAutoencoder, model_config
from ctp2mri.progress import CancelToken, ProgressCallback
from ctp2mri.settings import AE_BASE_LR
from ctp2mri.training import loop
from ctp2mri.training.batches import BatchStream, data_identity, load_dataset
from ctp2mri.training.distributed import barrier, init_distributed, shutdown
from ctp2mri.training.rng import noise_generator, rng_restore, rng_snapshot, seed_everything
from ctp2mri.training.sampling import check_lesion_oversample, lesion_sampling, sampling_setting

__all__ = ["train_autoencoder"]

LOG_COLUMNS = ("step", "epoch", "loss", "rec_loss", "lesion_rec_loss", "codebook_loss", "g_loss", "d_weight", "d_loss",
               "codes_restarted", "lr", "seconds")


def train_autoencoder(
    data: Any,
    out: str | os.PathLike,
    profile: str = "demo",
    steps: int = 1000,
    batch_size: int = 16,
    lr: float | None = None,
    base_lr: float = AE_BASE_LR,
    scale_lr: bool = True,
    disc_start: int = 30001,
    disc_weight: float = 0.2,
    codebook_weight: float = 1.0,
    grad_clip: float | None = None,
    codebook_restart: int = 0,
    lesion_oversample: float | None = None,
    lesion_weight: float = 0.0,
    device: str = "auto",
    precision: str = "fp32",
    resume: bool = False,
    seed: int = 0,
    num_workers: int = 1,
    checkpoint_every: int = 500,
    log_every: int = 10,
    autoencoder_config: dict[str, Any] | None = None,
    discriminator_config: dict[str, Any] | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    dwi_hi_median: float | None = None,
) -> Path:
    """Train (or resume training) the VQGAN autoencoder; the run folder ``out`` is its checkpoint.

    Parameters
    ----------
    data
        Data folder with ``splits.json`` (its ``train`` split is used) or a `SliceDataset`.
    out
        Run folder: new or empty, or (``resume``) a run saved before. It ends up holding the
        checkpoint (``kind="autoencoder"``, networks ``model`` and ``discriminator``) and log.csv.
    profile
        Model grid and default network sizes (`ctp2mri.models.model_config`).
    steps
        Total optimiser steps of the run (a resumed run continues to this count).
    batch_size
        Slices per step and process.
    lr, base_lr, scale_lr
        Learning rate ``lr``; when None, ``base_lr × batch_size × processes`` (taming's scaling)
        or ``base_lr`` alone with ``scale_lr=False``.
    disc_start, disc_weight, codebook_weight
        The official loss settings: adversarial terms from step ``disc_start`` (30001 in the
        paper; a short demo run needs it lower), adaptive-weight factor, codebook loss weight.
    grad_clip
        Clip each network's gradient norm to this (off by default, as upstream).
    codebook_restart
        Every this many steps (and after the first), move codes no slice used since the last
        restart onto current encoder outputs (`VectorQuantizer.restart_dead_codes`). 0 (default)
        is the official training; short CPU runs need it, or the codebook collapses.
    lesion_oversample
        Draw slices with lesion this many times as often as the others (`ctp2mri.training.sampling`):
        lesions are a tiny share of the pixels, and an autoencoder that has seldom seen one blurs
        it away, which no latent model can undo. None (default): uniform, as upstream.
    device, precision
        `ctp2mri.devices.resolve_device` spec; ``fp32``, or ``bf16``/``fp16`` autocast on CUDA.
    resume
        Continue the run in ``out`` exactly (weights, optimisers, data position, RNGs); refused if
        a setting that changes the computation differs.
    lesion_weight
        Weight of `ctp2mri.losses.lesion_reconstruction_loss`, the L1 over lesion voxels added to
        the reconstruction (0: off, as the official VQGAN); a resume-checked setting.
    seed
        Seed of initialisation, data order and augmentation.
    num_workers
        DataLoader worker processes per training process.
    checkpoint_every, log_every
        Steps between checkpoints (and at the end) and between log.csv appends.
    autoencoder_config, discriminator_config
        Network constructor arguments overriding the profile's (e.g. tiny networks for tests).
    progress, cancel
        ``progress(step, steps, {"loss", …})`` after each step; a cancel saves a resumable
        checkpoint, then raises `ctp2mri.errors.Cancelled`.
    dwi_hi_median
        DWI's upper bound × the brain median (the DWI anchor, `ctp2mri.case_slices.normalise_case`);
        None (default): the 99.5 % quantile. The latent models trained on this autoencoder
        read it from its checkpoint.

    Returns
    -------
    Path of the run folder / checkpoint.
    """
    loop.check_run_numbers(steps=steps, batch_size=batch_size, seed=seed, num_workers=num_workers,
                           checkpoint_every=checkpoint_every, log_every=log_every, lr=lr, grad_clip=grad_clip)
    info = init_distributed(device)
    try:
        return _train(info, data, Path(out), profile, int(steps), int(batch_size), lr, base_lr, scale_lr,
                      int(disc_start), float(disc_weight), float(codebook_weight), grad_clip,
                      int(codebook_restart), check_lesion_oversample(lesion_oversample), precision, resume,
                      int(seed), int(num_workers), int(checkpoint_every), int(log_every), autoencoder_config,
                      discriminator_config, progress, cancel, lesion_weight=_lesion_weight(lesion_weight),
                      dwi_hi_median=dwi_hi_median)
    finally:
        shutdown(info)


def _train(info, data, out, profile, steps, batch_size, lr, base_lr, scale_lr, disc_start, disc_weight,
           codebook_weight, grad_clip, codebook_restart, lesion_oversample, precision, resume, seed, num_workers,
           checkpoint_every, log_every, ae_config, d_config, progress, cancel, *, lesion_weight: float = 0.0,
           dwi_hi_median: float | None = None) -> Path:
    dev = info.device
    precision = loop.check_precision(precision, dev)
    out = loop.prepare_out_dir(out, resume) if info.is_main else out
    barrier(info)
    dataset = load_dataset(data, profile, seed, progress=progress if info.is_main else None, cancel=cancel,
                           dwi_hi_median=dwi_hi_median)
    weights, sampling = lesion_sampling(dataset, lesion_oversample, info)
    ae_config = dict(ae_config or model_config(profile, "autoencoder"))
    d_config = dict(d_config or model_config(profile, "discriminator"))
    lr_value = loop.effective_lr(base_lr, batch_size, info.world_size, 1, scale_lr, lr)
    settings = {
        "profile": profile, "steps": steps, "batch_size": batch_size, "world_size": info.world_size,
        "base_lr": base_lr, "scale_lr": scale_lr, "lr": lr_value, "optimizer": "Adam", "betas": [0.5, 0.9],
        "disc_start": disc_start, "disc_weight": disc_weight, "codebook_weight": codebook_weight,
        "disc_loss": "hinge", "perceptual_weight": 0.0, "reconstruction": "l1", "grad_clip": grad_clip,
        "codebook_restart": codebook_restart, **sampling_setting(lesion_oversample),
        **({"lesion_weight": lesion_weight} if lesion_weight else {}),
        "precision": precision, "seed": seed, "num_workers": num_workers, "device": str(dev),
        "checkpoint_every": checkpoint_every, "log_every": log_every, "data": data_identity(dataset),
        "autoencoder": ae_config, "discriminator": d_config,
    }

    seed_everything(seed)
    ae = VQAutoencoder(**ae_config).to(dev)
    disc = PatchGANDiscriminator(**d_config).to(dev)
    opt_ae = torch.optim.Adam(ae.parameters(), lr=lr_value, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=lr_value, betas=(0.5, 0.9))
    scaler = loop.make_grad_scaler(precision)
    generator = noise_generator(seed, info)  # unused by the AE step; kept for a uniform state
    step, position, log = 0, {"epoch": 0, "batch_in_epoch": 0}, loop.RunLog(LOG_COLUMNS)
    usage = torch.zeros(ae.quantizer.num_embeddings, dtype=torch.int64)
    if resume:
        _, state = loop.resume_state(out, settings)
        nets, _ = load_checkpoint(out, names=["model", "discriminator"], build=False, map_location=dev)
        ae.load_state_dict(nets["model"])
        disc.load_state_dict(nets["discriminator"])
        opt_ae.load_state_dict(state["optimizers"]["autoencoder"])
        opt_d.load_state_dict(state["optimizers"]["discriminator"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, position, log = int(state["step"]), state["position"], loop.RunLog.from_state(state["log"])
        if codebook_restart:
            usage = state["codebook_usage"].to(torch.int64).cpu()
        rng_restore(state["rng"], info, generator)
    if step >= steps:
        raise InputError(f"the run in {out} has already trained {step} steps (≥ --steps {steps}); "
                         "give a larger --steps to continue it")

    ae_train = DDP(ae, device_ids=[dev] if dev.type == "cuda" else None) if info.distributed else ae
    d_train = DDP(disc, device_ids=[dev] if dev.type == "cuda" else None) if info.distributed else disc
    stream = BatchStream(dataset, batch_size, info, seed, num_workers, weights=weights, **position)
    run = loop.Run(out, info, steps, log, checkpoint_every, log_every, progress, cancel)
    ae.train()
    disc.train()

    def save() -> None:
        config = loop.base_config("autoencoder", profile, settings, dataset, step, data, {"sampling": sampling})
        state = {"step": step, "position": stream.position(),
                 "optimizers": {"autoencoder": opt_ae.state_dict(), "discriminator": opt_d.state_dict()},
                 "scaler": scaler.state_dict() if scaler is not None else None}
        if codebook_restart:
            state["codebook_usage"] = usage.clone()
        run.save({"model": ae, "discriminator": disc}, config, state, rng_snapshot(generator))

    batches = iter(stream)
    while step < steps:
        batch = next(batches)
        x = batch["target"].to(dev, non_blocking=True)
        # Lightning's global_step: the index of this step, starting at 0.
        use_gan = discriminator_factor(step, disc_start) > 0
        with loop.autocast(precision, dev):
            x_rec, codebook, z, indices = ae_train(x, return_codes=True)
            logits_fake = None
            if use_gan:
                # D scores x̂ for the generator; its own weights get no gradient from this term.
                disc.requires_grad_(False)
                logits_fake = disc(x_rec)
                disc.requires_grad_(True)
        loss, parts = autoencoder_loss(x, x_rec, codebook, logits_fake, ae.last_layer, step, disc_start,
                                       disc_weight, codebook_weight, batch["lesion"].to(dev, non_blocking=True),
                                       lesion_weight)
        _optimise(opt_ae, loss, ae, scaler, grad_clip)
        values = {"loss": float(loss.detach()), "epoch": stream.epoch, "lr": lr_value, **parts}
        if use_gan:
            with loop.autocast(precision, dev):
                # Real and reconstructed slices in one forward: DDP allows one forward per backward.
                logits = d_train(torch.cat([x, x_rec.detach()]))
            logits_real, logits_rec = logits.split(x.shape[0])
            d_loss = discriminator_factor(step, disc_start) * hinge_discriminator_loss(logits_real, logits_rec)
            _optimise(opt_d, d_loss, disc, scaler, grad_clip)
            values["d_loss"] = float(d_loss.detach())
        if scaler is not None:
            scaler.update()
        step += 1
        if codebook_restart:
            usage += torch.bincount(indices.flatten().cpu(), minlength=usage.numel())
            if step == 1 or step % codebook_restart == 0:
                values["codes_restarted"] = _restart_codes(ae, opt_ae, usage, z, info)
                usage.zero_()
        cancelled = run.end_step(step, values)
        run.finish_step(step, cancelled, save)
    return out


def _lesion_weight(value: float) -> float:
    try:
        weight = float(value)
    except (TypeError, ValueError):
        raise InputError(f"the lesion weight must be a number ≥ 0, got {value!r}") from None
    if not (weight >= 0 and weight < float("inf")):
        raise InputError(f"the lesion weight must be a finite number ≥ 0, got {value!r}")
    return weight


def _restart_codes(ae: VQAutoencoder, opt: torch.optim.Optimizer, usage: torch.Tensor, z: torch.Tensor,
                   info: Any) -> int:
    """Restart the codes unused since the last restart, the same on every rank; their count."""
    quantizer = ae.quantizer
    if info.distributed:
        import torch.distributed as dist

        summed = usage.to(info.device)
        dist.all_reduce(summed)
        usage.copy_(summed.cpu())
    dead = quantizer.restart_dead_codes(usage, z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]))
    if info.distributed:
        dist.broadcast(quantizer.embedding.weight.data, src=0)  # rank 0's choice of encoder outputs
    # Adam's moments of a moved code belong to its old position; start them afresh.
    moments = opt.state.get(quantizer.embedding.weight, {})
    for key in ("exp_avg", "exp_avg_sq"):
        if key in moments:
            moments[key][dead.to(moments[key].device)] = 0
    return int(dead.numel())


def _optimise(opt: torch.optim.Optimizer, loss: torch.Tensor, net: torch.nn.Module,
              scaler: torch.amp.GradScaler | None, grad_clip: float | None) -> None:
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
        opt.step()
        return
    scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    scaler.step(opt)


