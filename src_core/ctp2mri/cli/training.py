"""The training commands: ``ctp2mri train-autoencoder``, ``train-ldm``, ``post-train``, ``train-pix2pix``
and ``ablate``, wrappers of `ctp2mri.training` and `ctp2mri.evaluation.ablate`.

Each runs under torchrun as well as alone, and is resumable (see ``_RESUMABLE`` in `ctp2mri.cli.main`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ctp2mri.checks import cli_whole
from ctp2mri.cli.options import (
    COUNT,
    FRACTION,
    NONNEGATIVE,
    POSITIVE,
    SEED,
    add_device_argument,
    add_precision_argument,
)
from ctp2mri.settings import EMA_DECAY, LAMBDA_IMAGE, LAMBDA_LESION


def _rank0_progress(desc: str):
    """tqdm on rank 0 only: under torchrun every process runs this same command."""
    import os

    from ctp2mri.progress import noop_progress, tqdm_progress

    if int(os.environ.get("RANK", "0")) != 0:
        return noop_progress, lambda: None
    return tqdm_progress(desc)


def _cmd_train_autoencoder(args: argparse.Namespace) -> int:
    from ctp2mri.training import train_autoencoder

    progress, close = _rank0_progress("train-autoencoder")
    try:
        out = train_autoencoder(args.data, args.out, profile=args.profile, steps=args.steps,
                                batch_size=args.batch_size, lr=args.lr, disc_start=args.disc_start,
                                codebook_restart=args.codebook_restart, lesion_oversample=args.lesion_oversample,
                                lesion_weight=args.lesion_weight,
                                device=args.device, precision=args.precision, resume=args.resume,
                                seed=args.seed, num_workers=args.num_workers,
                                checkpoint_every=args.checkpoint_every, progress=progress, cancel=args.cancel)
    finally:
        close()
    print(f"autoencoder checkpoint: {out}")
    return 0


def _cmd_train_ldm(args: argparse.Namespace) -> int:
    from ctp2mri.training import TrainSettings, train_bbdm, train_ldm

    # train_bbdm refuses the cLDM-only fields by their flags
    settings = TrainSettings(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, ema_decay=args.ema_decay,
        grad_accum=args.grad_accum, precision=args.precision, seed=args.seed, num_workers=args.num_workers,
        checkpoint_every=args.checkpoint_every, lesion_oversample=args.lesion_oversample,
        scale_factor=args.scale_factor, condition=args.condition, loss_weighting=args.loss_weighting,
        condition_loss_weight=args.condition_loss, parameterization=args.parameterization,
        lesion_latent_weight=args.lesion_latent_weight, condition_lesion_weight=args.condition_lesion_weight)
    train = train_bbdm if args.model_type == "cbbdm" else train_ldm
    progress, close = _rank0_progress("train-ldm")
    try:
        out = train(args.data, args.autoencoder, args.out, settings, device=args.device, resume=args.resume,
                    progress=progress, cancel=args.cancel)
    finally:
        close()
    print(f"{'cBBDM' if args.model_type == 'cbbdm' else 'cLDM'} checkpoint: {out}")
    return 0


def _cmd_train_pix2pix(args: argparse.Namespace) -> int:
    from ctp2mri.training import train_pix2pix

    progress, close = _rank0_progress("train-pix2pix")
    try:
        out = train_pix2pix(args.data, args.out, profile=args.profile, steps=args.steps,
                            batch_size=args.batch_size, lr=args.lr, lambda_l1=args.lambda_l1,
                            adversarial=not args.l1_only, lesion_oversample=args.lesion_oversample,
                            device=args.device, precision=args.precision, resume=args.resume,
                            seed=args.seed, num_workers=args.num_workers,
                            checkpoint_every=args.checkpoint_every, progress=progress, cancel=args.cancel)
    finally:
        close()
    print(f"Pix2Pix checkpoint: {out}")
    return 0


def _cmd_post_train(args: argparse.Namespace) -> int:
    from ctp2mri.training import PostTrainSettings, post_train

    settings = PostTrainSettings(
        lambda_image=args.lambda_image, lambda_lesion=args.lambda_lesion, lambda_core=args.lambda_core,
        target=args.target, latent_objective=args.latent_objective, init=args.init, steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr, grad_accum=args.grad_accum, ema_decay=args.ema_decay, lesion_oversample=args.lesion_oversample,
        gradient_checkpointing=args.gradient_checkpointing, case_context=args.case_context, precision=args.precision,
        seed=args.seed, num_workers=args.num_workers, checkpoint_every=args.checkpoint_every)
    if args.compare:
        return _post_train_and_compare(args, settings)
    progress, close = _rank0_progress("post-train")
    try:
        out = post_train(args.data, args.from_, args.out, settings, device=args.device, resume=args.resume,
                         progress=progress, cancel=args.cancel)
    finally:
        close()
    print(f"post-trained checkpoint: {out}")
    return 0


def _post_train_and_compare(args: argparse.Namespace, settings: Any) -> int:
    from ctp2mri.data import resolve_cases
    from ctp2mri.evaluation.before_after import format_metric_rows, metric_rows
    from ctp2mri.evaluation.post_train_compare import post_train_and_compare
    from ctp2mri.progress import tqdm_progress

    bars: dict[str, tuple] = {}
    titles = {"data": ("reading cases", "case"), "train": ("post-train", "step"), "eval": ("before/after", "‰")}

    def progress(phase: str, step: int, total: int, info: dict) -> None:
        if phase not in bars:
            bars[phase] = tqdm_progress(*titles[phase])
        bars[phase][0](step, total, info)

    sources = resolve_cases(args.data, "train")
    try:
        result = post_train_and_compare(args.from_, args.out, sources, settings,
                                        device=args.device, resume=args.resume, compare_steps=args.compare,
                                        progress=progress, cancel=args.cancel)
    finally:
        for _, close in bars.values():
            close()
    print(f"post-trained checkpoint: {result.out}")
    print(f"base vs post-trained on the {len(sources)} training cases "
          f"(DDIM {args.compare} steps, seed {settings.seed}):")
    print(format_metric_rows(metric_rows(result.rows)) if result.rows else result.note)
    return 0


def _cmd_ablate(args: argparse.Namespace) -> int:
    from ctp2mri.evaluation.ablate import ablate, parse_grid

    progress, close = _rank0_progress("ablate")
    try:
        ablate(args.from_, args.data, args.out, parse_grid(args.grid), args.steps, target=args.target,
               batch_size=args.batch_size, eval_steps=args.eval_steps, split=args.split,
               max_cases=args.max_cases, seed=args.seed, device=args.device,
               precision=args.precision, zero_as_base=not args.post_train_base, progress=progress,
               cancel=args.cancel,
               post_train_options={k: v for k, v in (("lr", args.lr), ("ema_decay", args.ema_decay))
                                   if v is not None})
    finally:
        close()
    print((Path(args.out) / "table2.md").read_text())
    return 0


def _training_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, type=Path, help="data folder (case folders + splits.json)")
    p.add_argument("--out", required=True, type=Path,
                   help="run folder: the checkpoint (config.json + safetensors) and log.csv")
    p.add_argument("--steps", type=COUNT, default=1000, help="optimiser steps in total (default 1000)")
    p.add_argument("--batch-size", type=COUNT, default=16, help="slices per process (default 16)")
    p.add_argument("--lr", type=POSITIVE,
                   help="learning rate (default: the official base lr × batch × processes, CompVis scaling)")
    add_device_argument(p)
    add_precision_argument(p, "autocast on CUDA (default fp32)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--num-workers", type=cli_whole(minimum=0), default=1, help="DataLoader workers (default 1)")
    p.add_argument("--checkpoint-every", type=COUNT, default=500, help="steps between checkpoints")


def _lesion_oversample_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lesion-oversample", type=POSITIVE, metavar="F",
                   help="draw lesion-containing slices F times as often as the others (default: uniform, "
                   "as the paper)")


def add_training(sub: argparse._SubParsersAction) -> None:
    """Register the training commands: train-autoencoder, train-ldm, post-train, train-pix2pix, ablate."""
    ae = sub.add_parser("train-autoencoder", help="train the VQGAN autoencoder on DWI/ADC slices",
                        description="VQGAN (×4, 3 latent channels, codebook): L1 reconstruction + "
                        "codebook loss, PatchGAN hinge loss with adaptive weight from --disc-start. "
                        "Runs under torchrun --nproc_per_node N for DDP.")
    _training_arguments(ae)
    ae.add_argument("--profile", choices=["demo", "paper"], default="demo")
    ae.add_argument("--disc-start", type=cli_whole(minimum=0), default=30001,
                    help="step at which the adversarial loss starts (official 30001)")
    ae.add_argument("--codebook-restart", type=cli_whole(minimum=0), default=0, metavar="N",
                    help="every N steps move unused codes onto encoder outputs (0: off, as the official "
                    "training; short runs need it, e.g. 25, or the codebook collapses)")
    _lesion_oversample_argument(ae)
    ae.add_argument("--lesion-weight", type=NONNEGATIVE, default=0.0, metavar="W",
                    help="add W × the L1 over lesion voxels to the reconstruction loss (0: off, the official VQGAN)")
    ae.set_defaults(func=_cmd_train_autoencoder)

    ldm = sub.add_parser("train-ldm", help="train the conditional latent diffusion model (Eq. 4)",
                         description="cLDM on the frozen autoencoder's latents conditioned on the 15 CTP "
                         "frames (spatial rescaler, concatenation); ε-prediction, T = 1000, EMA. "
                         "Runs under torchrun --nproc_per_node N for DDP.")
    _training_arguments(ldm)
    ldm.add_argument("--autoencoder", required=True, type=Path, help="trained autoencoder checkpoint")
    ldm.add_argument("--ema-decay", type=FRACTION, default=EMA_DECAY, help=f"EMA decay (default {EMA_DECAY})")
    ldm.add_argument("--grad-accum", type=COUNT, default=1, help="gradient accumulation steps")
    ldm.add_argument("--model-type", choices=["cldm", "cbbdm"], default="cldm",
                     help="cldm (the paper's, default) or cbbdm: the conditional Brownian-bridge baseline "
                     "between the MRI latent and the CTP's latent (BBDM grad objective, L1)")
    ldm.add_argument("--scale-factor", metavar="S|auto",
                     help="cLDM latent scale: diffuse S·E(x), decode D(z/S); 'auto' = 1/std of the training "
                     "latents (CompVis scale_by_std). Default 1, the official VQ-f4 setting")
    _lesion_oversample_argument(ldm)
    ldm.add_argument("--condition", choices=["rescaler", "perfusion"],
                     help="condition encoder: the paper's bilinear rescaler (default) or the learned "
                     "full-resolution perfusion encoder")
    ldm.add_argument("--loss-weighting", choices=["uniform", "min-snr"], default="uniform",
                     help="Eq. 4 as the paper (uniform) or min-SNR-γ (γ 5) weighted")
    ldm.add_argument("--condition-loss", type=NONNEGATIVE, default=0.0, metavar="W",
                     help="weight of the perfusion encoder's auxiliary z0 and lesion heads (0: off, the paper)")
    ldm.add_argument("--parameterization", choices=["eps", "z0-residual"], default="eps",
                     help="eps: the UNet predicts the noise (the paper); z0-residual: it refines the perfusion "
                     "encoder's own estimate of the latent (predict and refine)")
    ldm.add_argument("--lesion-latent-weight", type=NONNEGATIVE, default=0.0, metavar="W",
                     help="add W × ‖M⊙(z0 − ẑ0)‖², Eq. 7 in latent space, to the base objective (0: off, the paper)")
    ldm.add_argument("--condition-lesion-weight", type=NONNEGATIVE, default=1.0, metavar="W",
                     help="weight of the condition loss's lesion-only term (default 1; 0 keeps the encoder's "
                          "estimate calibrated, so the tissue around the core is not drawn as core)")
    ldm.set_defaults(func=_cmd_train_ldm)

    pt = sub.add_parser("post-train", help="lesion-aware post-training of a cLDM or cBBDM (Eq. 5–8)",
                        description="Continue a base cLDM with L = L_latent + λ_image·‖x − D(ẑ0)‖² + "
                        "λ_lesion·‖M⊙(x − D(ẑ0))‖² through the frozen decoder (paper Eq. 5–8). "
                        "Writes a new cLDM checkpoint recording the base, λs and target. A cBBDM base "
                        "(train-ldm --model-type cbbdm) is post-trained alike, with its bridge objective "
                        "and one-step estimate x̂0 = x_t − ô (paper Table 3).")
    _training_arguments(pt)
    pt.add_argument("--from", dest="from_", required=True, type=Path,
                    help="base cLDM (or cBBDM) checkpoint folder, or a bundled model's name (demo-base, demo)")
    pt.add_argument("--lambda-image", type=NONNEGATIVE, default=LAMBDA_IMAGE,
                    help=f"λ_image (paper's best {LAMBDA_IMAGE})")
    pt.add_argument("--lambda-lesion", type=NONNEGATIVE, default=LAMBDA_LESION,
                    help=f"λ_lesion (paper's best {LAMBDA_LESION})")
    pt.add_argument("--lambda-core", type=NONNEGATIVE, default=0.0,
                    help="λ_core of the core term, not in the paper (default 0: off): 1 − soft Dice between "
                         "the lesion mask and what the estimate's ADC draws under 620 × 10⁻⁶ mm²/s; holds "
                         "the core that a strong λ_lesion over-draws (the demo recipe: 0.3)")
    pt.add_argument("--case-context", action="store_true",
                    help="not in the paper: also give the network the lesion burden of the whole case, read by "
                         "a frozen copy of the base's perfusion encoder, so slices away from a large lesion draw "
                         "their case's intensity level (needs a base with the perfusion encoder's heads)")
    pt.add_argument("--target", choices=["input", "reconstruction"], default="input",
                    help="x as the paper writes it (input) or D(z0) as the official code does")
    _lesion_oversample_argument(pt)
    pt.add_argument("--gradient-checkpointing", action="store_true",
                    help="recompute decoder activations in backward to save memory")
    pt.add_argument("--init", choices=["model", "ema"], default="model",
                    help="start from the base's raw (official) or EMA weights")
    pt.add_argument("--latent-objective", choices=["base", "eq4"], default="base",
                    help="L_latent of Eq. 8: the base's whole objective (its lesion latent term and "
                         "condition loss, if it was trained with them) or the ε-loss alone")
    pt.add_argument("--ema-decay", type=FRACTION, default=EMA_DECAY, help=f"EMA decay (default {EMA_DECAY})")
    pt.add_argument("--grad-accum", type=COUNT, default=1)
    pt.add_argument("--compare", type=COUNT, default=None, metavar="STEPS",
                    help="then score base vs post-trained on the training cases (DDIM with STEPS steps, "
                    "the same noise for both) and print the table the napari widget shows; single process")
    pt.set_defaults(func=_cmd_post_train)

    p2p = sub.add_parser("train-pix2pix", help="train the Pix2Pix baseline (U-Net + PatchGAN)",
                         description="Image-space baseline on the same slices: U-Net generator CTP → DWI/ADC "
                         "and conditional PatchGAN, L1 (λ 100) + adversarial loss, Adam 2e-4. The run "
                         "folder is a checkpoint that `ctp2mri evaluate` scores like the latent models.")
    _training_arguments(p2p)
    p2p.add_argument("--profile", choices=["demo", "paper"], default="demo")
    p2p.add_argument("--lambda-l1", type=NONNEGATIVE, default=100.0, help="weight of the L1 term (Pix2Pix's 100)")
    p2p.add_argument("--l1-only", action="store_true",
                     help="no discriminator: the deterministic reference regressor 'U-Net (L1)'")
    _lesion_oversample_argument(p2p)
    p2p.set_defaults(func=_cmd_train_pix2pix)

    a = sub.add_parser("ablate", help="post-train and evaluate a λ grid (paper Table 2)",
                       description="Post-trains the base for each (λ_image, λ_lesion) pair and evaluates "
                       "all of them with the same cases, sampler and seeds; writes table2.md/.csv and "
                       "per-case CSV. An interrupted grid resumes where it stopped.")
    a.add_argument("--from", dest="from_", required=True, type=Path, help="base cLDM checkpoint")
    a.add_argument("--data", required=True, type=Path)
    a.add_argument("--out", required=True, type=Path)
    a.add_argument("--grid", default="paper",
                   help="'paper' (Table 2's 11 pairs) or λ_image:λ_lesion pairs, e.g. 0.01:0.02,0.05:0")
    a.add_argument("--steps", type=COUNT, default=1000, help="post-training steps per pair")
    a.add_argument("--target", choices=["input", "reconstruction"], default="input")
    a.add_argument("--batch-size", type=COUNT, default=16)
    a.add_argument("--eval-steps", type=COUNT, default=200, help="DDIM steps of the evaluation")
    a.add_argument("--split", default="test")
    a.add_argument("--max-cases", type=COUNT)
    a.add_argument("--seed", type=SEED, default=0)
    a.add_argument("--device", default="auto")
    add_precision_argument(a)
    a.add_argument("--lr", type=POSITIVE, help="post-training learning rate (default: the official scaling)")
    a.add_argument("--ema-decay", type=FRACTION, help=f"EMA decay of each post-training run (default {EMA_DECAY})")
    a.add_argument("--post-train-base", action="store_true",
                   help="post-train the 0:0 pair with Eq. 4 alone instead of reusing the base")
    a.set_defaults(func=_cmd_ablate)
