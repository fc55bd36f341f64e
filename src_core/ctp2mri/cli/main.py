"""`ctp2mri` command line: a thin wrapper, one subcommand per core function.

Every failure the user can act on, a usage error included, is printed as one line without a
traceback (`ctp2mri.errors.user_message`); Ctrl-C and SIGTERM end a command cleanly (see
`main`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
from pathlib import Path
from typing import NoReturn

from ctp2mri.checks import cli_number, cli_whole
from ctp2mri.cli.cohort import synthesize_cohort_command, with_cohorts
from ctp2mri.cli.doctor import add_doctor
from ctp2mri.cli.importing import add_import
from ctp2mri.cli.perfusion import add_perfusion
from ctp2mri.errors import Cancelled, InputError, user_message
from ctp2mri.interrupts import exit_code, handle_interrupts
from ctp2mri.progress import CancelToken
from ctp2mri.settings import (
    CORE_ADC_THRESHOLD,
    DEFAULT_SAMPLER,
    EMA_DECAY,
    LAMBDA_IMAGE,
    LAMBDA_LESION,
    SAMPLER_STEPS,
    sampler_steps,
)

_STEPS_HELP = "denoising steps (default: " + ", ".join(f"{k} {v}" for k, v in SAMPLER_STEPS.items()) + ")"

# Option types: every number is checked (finite, in range) before a command starts.
_COUNT = cli_whole(minimum=1)
_SEED = cli_whole(minimum=0, maximum=2**63 - 1)
_FRAMES = cli_whole(minimum=2)
_POSITIVE = cli_number(above=0.0)
_NONNEGATIVE = cli_number(minimum=0.0)
_FRACTION = cli_number(minimum=0.0, maximum=1.0)


# phantom ---------------------------------------------------------------------------------
def _cmd_phantom(args: argparse.Namespace) -> int:
    import json

    from ctp2mri.casefolder import read_case
    from ctp2mri.phantom import generate_dataset
    from ctp2mri.progress import tqdm_progress

    progress, close = tqdm_progress("phantom cases", unit="case")
    try:
        splits_path = generate_dataset(args.out, n_cases=args.cases, seed=args.seed,
                                       profile=args.profile, n_frames=args.frames,
                                       overwrite=args.overwrite, progress=progress)
    finally:
        close()
    splits = json.loads(Path(splits_path).read_text())
    print(f"wrote {args.cases} cases to {args.out} (splits: {splits_path})")
    print(f"{'case':<10}{'split':<7}{'core ml':>9}{'penumbra ml':>13}  territory")
    split_of = {c: s for s in ("train", "val", "test") for c in splits.get(s, [])}
    cases = []
    for folder in sorted(Path(args.out).glob("case_*")):
        case = read_case(folder)
        info = case.info
        print(f"{folder.name:<10}{split_of.get(folder.name, '?'):<7}{info.get('core_ml', 0):>9.1f}"
              f"{info.get('penumbra_ml', 0):>13.1f}  {info.get('territory', '-')}")
        cases.append(case)
    if not args.no_figure:
        from ctp2mri.evaluation.figures import case_overview

        shown = cases[: min(4, len(cases))]
        png = case_overview(shown, Path(args.out) / "overview.png")
        print(f"overview figure: {png}")
    return 0


def _add_phantom(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("phantom", help="write digital stroke phantom case folders",
                       description="Generate paired CTP / DWI / ADC / lesion case folders from the "
                       "built-in physics-based stroke phantom (deterministic given --seed).")
    p.add_argument("--out", required=True, type=Path, help="output folder (case_000, …, splits.json)")
    p.add_argument("--cases", type=_COUNT, default=4, help="number of cases (default 4)")
    p.add_argument("--seed", type=_SEED, default=0, help="random seed (default 0)")
    p.add_argument("--profile", choices=["demo", "paper"], default="demo",
                   help="model grid: demo 2×2×5 mm 96×112, paper 1×1×5 mm 192×224")
    p.add_argument("--frames", type=_FRAMES, default=15, help="CTP time points (default 15)")
    p.add_argument("--overwrite", action="store_true", help="replace existing case folders")
    p.add_argument("--no-figure", action="store_true", help="skip overview.png")
    p.set_defaults(func=_cmd_phantom)


# preprocess ------------------------------------------------------------------------------
def _cmd_preprocess(args: argparse.Namespace) -> int:
    from ctp2mri.preprocessing.preprocess import preprocess_case
    from ctp2mri.progress import tqdm_progress

    progress, close = tqdm_progress("preprocess")
    try:
        out = preprocess_case(args.ctp, args.out, profile=args.profile, dwi=args.dwi, adc=args.adc,
                              lesion=args.lesion, mask=args.mask,
                              register=args.register != "none",
                              transform=args.register if args.register != "none" else "rigid",
                              n_frames=args.frames, overwrite=args.overwrite, progress=progress)
    finally:
        close()
    for notice in json.loads((Path(out) / "case.json").read_text())["preprocess"].get("notices", []):
        print(f"note: {notice}")
    print(f"wrote case folder {out}")
    return 0


def _add_preprocess(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("preprocess", help="bring a CTP (and MRI) onto the model grid as a case folder",
                       description="Brain mask, registration of CTP to DWI (optional), resampling to the "
                       "profile's model grid and to the model's frame count; writes a case folder.")
    p.add_argument("ctp", type=Path, help="4-D CTP: NIfTI, NRRD, MHA or a DICOM series folder")
    p.add_argument("--out", required=True, type=Path, help="case folder to write")
    p.add_argument("--profile", choices=["demo", "paper"], default="paper")
    p.add_argument("--dwi", type=Path, help="DWI b1000 (3-D) defining the MRI space")
    p.add_argument("--adc", type=Path, help="ADC map on the DWI grid (10⁻⁶ mm²/s)")
    p.add_argument("--lesion", type=Path, help="lesion (core) mask on the DWI grid")
    p.add_argument("--mask", type=Path, help="brain mask (default: derived from the CTP)")
    p.add_argument("--register", choices=["none", "rigid", "affine"], default="none",
                   help="register CTP to the DWI with mutual information (needs --dwi)")
    p.add_argument("--frames", type=_FRAMES, default=15, help="frames after temporal resampling")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_preprocess)


# training --------------------------------------------------------------------------------
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
    from ctp2mri.training import train_bbdm, train_ldm

    train = train_bbdm if args.model_type == "cbbdm" else train_ldm
    if args.model_type == "cbbdm" and args.scale_factor is not None:
        raise InputError("--scale-factor applies to the cLDM only; the cBBDM bridges the CTP's own latent")
    extra: dict = {} if args.scale_factor is None else {"scale_factor": args.scale_factor}
    if args.model_type == "cldm":
        extra.update(condition=args.condition, loss_weighting=args.loss_weighting,
                     condition_loss_weight=args.condition_loss, parameterization=args.parameterization,
                     lesion_latent_weight=args.lesion_latent_weight)
    elif (args.condition not in (None, "rescaler") or args.loss_weighting != "uniform" or args.condition_loss
          or args.parameterization != "eps" or args.lesion_latent_weight):
        raise InputError("--condition, --loss-weighting, --condition-loss, --parameterization and "
                         "--lesion-latent-weight apply to the cLDM only")
    progress, close = _rank0_progress("train-ldm")
    try:
        out = train(args.data, args.autoencoder, args.out, steps=args.steps,
                    batch_size=args.batch_size, lr=args.lr, ema_decay=args.ema_decay,
                    grad_accum=args.grad_accum, device=args.device, precision=args.precision,
                    resume=args.resume, seed=args.seed, num_workers=args.num_workers,
                    checkpoint_every=args.checkpoint_every, lesion_oversample=args.lesion_oversample,
                    progress=progress, cancel=args.cancel, **extra)
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
    from ctp2mri.training import post_train
    from ctp2mri.training.post_train import PostTrainSettings

    settings = PostTrainSettings(
        lambda_image=args.lambda_image, lambda_lesion=args.lambda_lesion, target=args.target,
        latent_objective=args.latent_objective, init=args.init, steps=args.steps, batch_size=args.batch_size,
        lr=args.lr, grad_accum=args.grad_accum, ema_decay=args.ema_decay, lesion_oversample=args.lesion_oversample,
        gradient_checkpointing=args.gradient_checkpointing, precision=args.precision, seed=args.seed,
        num_workers=args.num_workers, checkpoint_every=args.checkpoint_every)
    progress, close = _rank0_progress("post-train")
    try:
        out = post_train(args.data, args.from_, args.out, settings, device=args.device, resume=args.resume,
                         progress=progress, cancel=args.cancel)
    finally:
        close()
    print(f"post-trained checkpoint: {out}")
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
    p.add_argument("--steps", type=_COUNT, default=1000, help="optimiser steps in total (default 1000)")
    p.add_argument("--batch-size", type=_COUNT, default=16, help="slices per process (default 16)")
    p.add_argument("--lr", type=_POSITIVE,
                   help="learning rate (default: the official base lr × batch × processes, CompVis scaling)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="autocast on CUDA (default fp32)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    p.add_argument("--seed", type=_SEED, default=0)
    p.add_argument("--num-workers", type=cli_whole(minimum=0), default=1, help="DataLoader workers (default 1)")
    p.add_argument("--checkpoint-every", type=_COUNT, default=500, help="steps between checkpoints")


def _lesion_oversample_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lesion-oversample", type=_POSITIVE, metavar="F",
                   help="draw lesion-containing slices F times as often as the others (default: uniform, "
                   "as the paper)")


def _add_training(sub: argparse._SubParsersAction) -> None:
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
    ae.add_argument("--lesion-weight", type=_NONNEGATIVE, default=0.0, metavar="W",
                    help="add W × the L1 over lesion voxels to the reconstruction loss (0: off, the official VQGAN)")
    ae.set_defaults(func=_cmd_train_autoencoder)

    ldm = sub.add_parser("train-ldm", help="train the conditional latent diffusion model (Eq. 4)",
                         description="cLDM on the frozen autoencoder's latents conditioned on the 15 CTP "
                         "frames (spatial rescaler, concatenation); ε-prediction, T = 1000, EMA. "
                         "Runs under torchrun --nproc_per_node N for DDP.")
    _training_arguments(ldm)
    ldm.add_argument("--autoencoder", required=True, type=Path, help="trained autoencoder checkpoint")
    ldm.add_argument("--ema-decay", type=_FRACTION, default=EMA_DECAY, help=f"EMA decay (default {EMA_DECAY})")
    ldm.add_argument("--grad-accum", type=_COUNT, default=1, help="gradient accumulation steps")
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
    ldm.add_argument("--condition-loss", type=_NONNEGATIVE, default=0.0, metavar="W",
                     help="weight of the perfusion encoder's auxiliary z0 and lesion heads (0: off, the paper)")
    ldm.add_argument("--parameterization", choices=["eps", "z0-residual"], default="eps",
                     help="eps: the UNet predicts the noise (the paper); z0-residual: it refines the perfusion "
                     "encoder's own estimate of the latent (predict and refine)")
    ldm.add_argument("--lesion-latent-weight", type=_NONNEGATIVE, default=0.0, metavar="W",
                     help="add W × ‖M⊙(z0 − ẑ0)‖², Eq. 7 in latent space, to the base objective (0: off, the paper)")
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
    pt.add_argument("--lambda-image", type=_NONNEGATIVE, default=LAMBDA_IMAGE,
                    help=f"λ_image (paper's best {LAMBDA_IMAGE})")
    pt.add_argument("--lambda-lesion", type=_NONNEGATIVE, default=LAMBDA_LESION,
                    help=f"λ_lesion (paper's best {LAMBDA_LESION})")
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
    pt.add_argument("--ema-decay", type=_FRACTION, default=EMA_DECAY, help=f"EMA decay (default {EMA_DECAY})")
    pt.add_argument("--grad-accum", type=_COUNT, default=1)
    pt.set_defaults(func=_cmd_post_train)

    p2p = sub.add_parser("train-pix2pix", help="train the Pix2Pix baseline (U-Net + PatchGAN)",
                         description="Image-space baseline on the same slices: U-Net generator CTP → DWI/ADC "
                         "and conditional PatchGAN, L1 (λ 100) + adversarial loss, Adam 2e-4. The run "
                         "folder is a checkpoint that `ctp2mri evaluate` scores like the latent models.")
    _training_arguments(p2p)
    p2p.add_argument("--profile", choices=["demo", "paper"], default="demo")
    p2p.add_argument("--lambda-l1", type=_NONNEGATIVE, default=100.0, help="weight of the L1 term (Pix2Pix's 100)")
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
    a.add_argument("--steps", type=_COUNT, default=1000, help="post-training steps per pair")
    a.add_argument("--target", choices=["input", "reconstruction"], default="input")
    a.add_argument("--batch-size", type=_COUNT, default=16)
    a.add_argument("--eval-steps", type=_COUNT, default=200, help="DDIM steps of the evaluation")
    a.add_argument("--split", default="test")
    a.add_argument("--max-cases", type=_COUNT)
    a.add_argument("--seed", type=_SEED, default=0)
    a.add_argument("--device", default="auto")
    a.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    a.add_argument("--lr", type=_POSITIVE, help="post-training learning rate (default: the official scaling)")
    a.add_argument("--ema-decay", type=_FRACTION, help=f"EMA decay of each post-training run (default {EMA_DECAY})")
    a.add_argument("--post-train-base", action="store_true",
                   help="post-train the 0:0 pair with Eq. 4 alone instead of reusing the base")
    a.set_defaults(func=_cmd_ablate)


# synthesize ------------------------------------------------------------------------------
def _cmd_synthesize(args: argparse.Namespace) -> int:
    from ctp2mri.progress import tqdm_progress
    from ctp2mri.synthesis.synthesize import run_synthesize

    progress, close = tqdm_progress("synthesize")
    try:
        result = run_synthesize(args.ctp, args.model, args.out, series_uid=args.series_uid,
                                mask=args.mask, ground_truth_lesion=args.ground_truth,
                                overwrite=args.overwrite, progress=progress,
                                sampler=args.sampler, steps=args.steps, eta=args.eta,
                                samples=args.samples, seed=args.seed, batch_size=args.batch_size,
                                device=args.device, precision=args.precision,
                                core_threshold=args.core_threshold)
    finally:
        close()
    report = result.report
    for notice in report.get("notices", []):
        print(f"note: {notice}")
    print(f"wrote {args.out}: dwi, adc, core ({report.get('core_volume_ml', float('nan')):.1f} ml)"
          + (", uncertainty" if result.uncertainty else "") + ", report.json")
    return 0


def _add_synthesize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synthesize", help="CTP in, synthetic DWI/ADC (+ core estimate) out",
                       description="Synthesise DWI and ADC from a CT-perfusion series with a trained "
                       "cLDM, on the CTP's own grid; writes dwi, adc, core (ADC < threshold) and, with "
                       "--samples > 1, per-voxel uncertainty, plus report.json.")
    p.add_argument("ctp", type=Path, nargs="+",
                   help="4-D CTP: NIfTI, NRRD, MHA or a DICOM series folder; several, a folder of case "
                   "folders or a CSV list run a cohort into OUT/<case>/ with OUT/summary.csv (docs/cohorts.md)")
    p.add_argument("--model", required=True, type=Path, help="cLDM checkpoint folder")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--sampler", choices=list(SAMPLER_STEPS), default=DEFAULT_SAMPLER,
                   help="DDIM (the paper's) or DPM-Solver++(2M) (default, fewer steps)")
    p.add_argument("--steps", type=_COUNT, help=_STEPS_HELP)
    p.add_argument("--eta", type=_FRACTION, default=0.0, help="DDIM eta, 0–1 (default 0)")
    p.add_argument("--samples", type=_COUNT, default=1, help="samples per slice; >1 adds uncertainty maps")
    p.add_argument("--seed", type=_SEED, default=0)
    p.add_argument("--batch-size", type=_COUNT, help="slices per network call (default: from free memory)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="autocast precision on GPU (CPU always runs fp32)")
    p.add_argument("--core-threshold", type=cli_number(above=0.0, maximum=10000.0), default=CORE_ADC_THRESHOLD,
                   help=f"core = ADC below this (10⁻⁶ mm²/s) inside the brain (default {CORE_ADC_THRESHOLD:g})")
    p.add_argument("--mask", type=Path, help="brain mask on the CTP grid (default: derived)")
    p.add_argument("--ground-truth", type=Path, help="lesion mask to score the core estimate against")
    p.add_argument("--series-uid", help="pick one series from a DICOM folder holding several")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=with_cohorts(_cmd_synthesize, synthesize_cohort_command))


# bench -----------------------------------------------------------------------------------
def _cmd_bench_preprocess(args: argparse.Namespace) -> int:
    from ctp2mri.bench import bench_preprocess, format_bench

    result = bench_preprocess(shape=tuple(args.shape), spacing=tuple(args.spacing),
                              frames=args.frames, profile=args.profile, workdir=args.workdir)
    print(format_bench(result))
    return 0


def _cmd_bench_perfusion(args: argparse.Namespace) -> int:
    from ctp2mri.bench.perfusion import bench_perfusion, format_bench

    print(format_bench(bench_perfusion(repeats=args.repeats, clinical=not args.no_clinical,
                                       shape=tuple(args.shape), spacing=tuple(args.spacing), workdir=args.workdir)))
    return 0


def _cmd_bench_train(args: argparse.Namespace) -> int:
    from ctp2mri.bench import bench_train, format_bench_train

    print(format_bench_train(bench_train(profile=args.profile, kind=args.kind,
                                         batch_size=args.batch_size, steps=args.steps,
                                         device=args.device, precision=args.precision)))
    return 0


def _cmd_bench_post_train(args: argparse.Namespace) -> int:
    from ctp2mri.bench import bench_post_train, format_bench_post_train

    print(format_bench_post_train(bench_post_train(
        profile=args.profile, batch_size=args.batch_size, steps=args.steps, device=args.device,
        precision=args.precision, targets=tuple(args.targets),
        gradient_checkpointing=args.gradient_checkpointing)))
    return 0


def _cmd_bench_synthesize(args: argparse.Namespace) -> int:
    from ctp2mri.bench import bench_synthesize, format_bench_synthesize

    print(format_bench_synthesize(bench_synthesize(
        model=args.model, profile=args.profile, steps=tuple(args.steps),
        samplers=tuple(args.samplers), device=args.device, precision=args.precision,
        naive=not args.no_naive, peak_tflops=args.peak_tflops, threads=args.threads)))
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="speed and memory benchmarks")
    bench = p.add_subparsers(dest="bench", required=True)
    b = bench.add_parser("preprocess", help="load → brain mask → resample a clinical-size CTP",
                         description="Builds a synthetic clinical-size CTP (default 512×512×320 at "
                         "0.47×0.47×1 mm, 15 frames, int16) and times load, mask and resampling "
                         "to the model grid; reports wall time and peak memory.")
    b.add_argument("--shape", type=_COUNT, nargs=3, default=[512, 512, 320])
    b.add_argument("--spacing", type=_POSITIVE, nargs=3, default=[0.47, 0.47, 1.0])
    b.add_argument("--frames", type=_FRAMES, default=15)
    b.add_argument("--profile", choices=["demo", "paper"], default="paper")
    b.add_argument("--workdir", type=Path, help="where to write the synthetic input (default: temp)")
    b.set_defaults(func=_cmd_bench_preprocess)
    t = bench.add_parser("train", help="training steps/s and peak memory",
                         description="Times optimiser steps of the profile's networks on random slices "
                         "(no data needed).")
    t.add_argument("--profile", choices=["demo", "paper"], default="demo")
    t.add_argument("--kind", choices=["ldm", "autoencoder"], default="ldm")
    t.add_argument("--batch-size", type=_COUNT, default=16)
    t.add_argument("--steps", type=_COUNT, default=10, help="timed steps (after 2 warm-up steps)")
    t.add_argument("--device", default="auto")
    t.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto: bf16 on CUDA, fp32 elsewhere")
    t.set_defaults(func=_cmd_bench_train)
    q = bench.add_parser("post-train", help="post-training steps/s and peak memory per target",
                         description="Times lesion-aware post-training steps (target x and D(z0)) and "
                         "the plain Eq. 4 step on random slices (no data needed).")
    q.add_argument("--profile", choices=["demo", "paper"], default="demo")
    q.add_argument("--batch-size", type=_COUNT, default=16)
    q.add_argument("--steps", type=_COUNT, default=10, help="timed steps per variant (after 2 warm-up)")
    q.add_argument("--device", default="auto")
    q.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto: bf16 on CUDA, fp32 elsewhere")
    q.add_argument("--targets", nargs="+", choices=["input", "reconstruction"],
                   default=["input", "reconstruction"])
    q.add_argument("--gradient-checkpointing", action="store_true")
    q.set_defaults(func=_cmd_bench_post_train)
    s = bench.add_parser("synthesize", help="seconds per volume and slices/s of synthesis",
                         description="Times synthesis of one phantom volume per (sampler, steps) pair, "
                         "batched and one slice at a time (same network and steps), with peak memory. "
                         "Without --model a randomly initialised model of the profile is used: "
                         "timings do not depend on the weights.")
    s.add_argument("--model", type=Path, help="cLDM checkpoint (default: random weights)")
    s.add_argument("--profile", choices=["demo", "paper"], default="demo")
    s.add_argument("--samplers", nargs="+", default=["ddim", "dpm++2m"], choices=["ddim", "dpm++2m"])
    s.add_argument("--steps", type=_COUNT, nargs="+", default=[50, 20], help="steps for each sampler")
    s.add_argument("--device", default="auto")
    s.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    s.add_argument("--no-naive", action="store_true", help="skip the one-slice-at-a-time loop")
    s.add_argument("--peak-tflops", type=_POSITIVE, help="device peak, to report the achieved fraction")
    s.add_argument("--threads", type=_COUNT, help="torch CPU threads")
    s.set_defaults(func=_cmd_bench_synthesize)
    f = bench.add_parser("perfusion", help="perfusion analysis: a model-grid case and a clinical-size series",
                         description="Times `ctp2mri perfusion` on a phantom case on the model grid and on a "
                         "clinical-size series (default 512×512×320 at 0.47×0.47×1 mm, 15 frames, int16, "
                         "memory-mapped) end to end, with peak memory.")
    f.add_argument("--repeats", type=_COUNT, default=3, help="model-grid runs (median reported)")
    f.add_argument("--shape", type=_COUNT, nargs=3, default=[512, 512, 320])
    f.add_argument("--spacing", type=_POSITIVE, nargs=3, default=[0.47, 0.47, 1.0])
    f.add_argument("--no-clinical", action="store_true", help="only the model-grid case")
    f.add_argument("--workdir", type=Path, help="where to write the clinical-size input (default: temp)")
    f.set_defaults(func=_cmd_bench_perfusion)


# evaluate --------------------------------------------------------------------------------
def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    from ctp2mri.evaluation.evaluate import FID_WEIGHTS_ENV

    p = sub.add_parser("evaluate", help="score trained models on a split (Table 1 metrics)",
                       description="Synthesise DWI/ADC for every case of a split with DDIM and report "
                       "MAE, lesion MAE, PSNR and MS-SSIM per channel inside the brain (normalised "
                       "space, as the paper's Table 1) and the infarct-core Dice; one CSV row per case. "
                       "Repeat --model to compare models (cLDM, cBBDM, Pix2Pix checkpoints) on the same "
                       "cases with the same steps and seeds; --table writes the comparison.")
    p.add_argument("--model", required=True, action="append", metavar="[NAME=]PATH",
                   help="checkpoint folder of a cLDM, cBBDM or Pix2Pix model, optionally named (default "
                   "name from the checkpoint: cLDM, cLDM-PT, cBBDM, cBBDM-PT, Pix2Pix); repeat to compare; "
                   "a single autoencoder checkpoint gives reconstruction metrics")
    p.add_argument("--data", required=True, type=Path, help="data folder with case folders and splits.json")
    p.add_argument("--split", default="test", help="split of splits.json (default test), or all: every case folder")
    p.add_argument("--no-perfusion", action="store_true",
                   help="skip the CTP perfusion core (rCBF < 30 %%) scored beside the models' cores")
    p.add_argument("--steps", type=_COUNT, help=_STEPS_HELP)
    p.add_argument("--sampler", choices=list(SAMPLER_STEPS), default="ddim",
                   help="ddim (the paper's, default) or dpm++2m (DPM-Solver++(2M), ~20 steps)")
    p.add_argument("--eta", type=_FRACTION, default=0.0,
                   help="DDIM and bridge-sampler eta (default 0: deterministic; BBDM's configs use 1)")
    p.add_argument("--seed", type=_SEED, nargs="+", default=[0],
                   help="sampling seed (default 0); several sample every case once per seed and "
                   "average over cases and seeds (one CSV row per case and seed)")
    p.add_argument("--batch-size", type=_COUNT, default=16, help="slices per batch (default 16)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--out", type=Path, help="per-case CSV to write")
    p.add_argument("--table", type=Path,
                   help="Markdown file for the Table-1-shaped comparison (a .csv of it is written beside)")
    p.add_argument("--figure", type=Path, help="PNG of a few test slices (CTP, true/synthetic DWI, ADC; "
                   "an autoencoder's reconstruction)")
    p.add_argument("--max-cases", type=_COUNT, help="evaluate only the first N cases")
    p.add_argument("--no-ema", action="store_true", help="sample with the raw, not the EMA, weights")
    p.add_argument("--fid-weights", type=Path,
                   help=f"local Inception-v3 weights for FID (or ${FID_WEIGHTS_ENV}); never downloaded")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ctp2mri.checkpoints import read_config
    from ctp2mri.devices import resolve_device_with_notice

    if len(args.model) == 1 and Path(args.model[0]).exists() \
            and read_config(args.model[0]).get("kind") == "autoencoder":
        from ctp2mri.evaluation.autoencoder import evaluate_autoencoder, format_autoencoder_report

        print(format_autoencoder_report(evaluate_autoencoder(
            args.model[0], args.data, split=None if args.split == "all" else args.split, batch_size=args.batch_size,
            device=args.device,
            figure=args.figure)))
        if args.figure:
            print(f"figure: {args.figure}")
        return 0
    from ctp2mri.evaluation.evaluate import evaluate, fid_status, format_report, named_models, write_comparison
    from ctp2mri.evaluation.report import comparison_paths
    from ctp2mri.progress import tqdm_progress

    models = named_models(args.model)
    if args.out and args.table and Path(args.out).resolve() in {p.resolve() for p in comparison_paths(args.table)}:
        raise InputError(f"--out {args.out} is a file that --table {args.table} writes too (the comparison is "
                         f"written as {' and '.join(map(str, comparison_paths(args.table)))}); give --out another "
                         "name, so that neither overwrites the other")

    _, notice = resolve_device_with_notice(args.device)
    if notice:
        print(f"ctp2mri evaluate: {notice}")
    fid_message = fid_status(args.fid_weights)
    progress, close = tqdm_progress("evaluate", unit="slice-step")
    try:
        rows, summary = evaluate(None, args.data, split=None if args.split == "all" else args.split, n_steps=args.steps,
                                 eta=args.eta, seed=args.seed, batch_size=args.batch_size,
                                 device=args.device, out_csv=args.out, progress=progress,
                                 max_cases=args.max_cases, figure=args.figure,
                                 use_ema=not args.no_ema, fid_weights=args.fid_weights,
                                 sampler=args.sampler, models=models, perfusion=not args.no_perfusion)
    finally:
        close()
    print(format_report(summary, rows, n_steps=args.steps, eta=args.eta, seed=args.seed,
                        split=args.split, fid_message=fid_message))
    if args.table:
        md, table_csv = write_comparison(summary, rows, args.table, n_steps=args.steps, eta=args.eta, seed=args.seed,
                                         split=args.split, checkpoints=models, fid_message=fid_message)
        print(f"comparison: {md} and {table_csv}")
    if args.out:
        print(f"per-case results: {args.out}")
    if args.figure:
        print(f"figure: {args.figure}")
    return 0


# demo ------------------------------------------------------------------------------------------
def _cmd_demo(args: argparse.Namespace) -> int:
    import time

    from ctp2mri.recipes.demo import metrics_line, run_demo
    from ctp2mri.devices import resolve_device_with_notice
    from ctp2mri.progress import tqdm_progress

    _, notice = resolve_device_with_notice(args.device)
    if notice:
        print(f"ctp2mri demo: {notice}")
    start = time.perf_counter()
    progress, close = tqdm_progress("demo: synthesis", unit="step")
    try:
        result = run_demo(args.out, args.model, case_seed=args.case_seed, sampler=args.sampler,
                          steps=args.steps, seed=args.seed, device=args.device, progress=progress)
    finally:
        close()
    for line in result["report"].get("notices", []):
        print(f"note: {line}")
    m = result["metrics"]
    print(f"model {args.model}, {args.sampler} {args.steps} steps, seed {args.seed}; phantom case seed {args.case_seed}")
    print("whole-volume metrics (normalised [-1, 1] space inside the brain, as Table 1):")
    for ch in ("DWI", "ADC"):
        print(f"  {ch}: MAE {m[f'{ch}_mae']:.4f}  lesion MAE {m[f'{ch}_lesion_mae']:.4f}  "
              f"PSNR {m[f'{ch}_psnr']:.2f} dB  MS-SSIM {m[f'{ch}_ms_ssim']:.4f}")
    print("  " + metrics_line(m))
    for key, path in result["files"].items():
        print(f"{key}: {path}")
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0


def _cmd_train_demo(args: argparse.Namespace) -> int:
    import torch

    from ctp2mri.progress import tqdm_progress
    from ctp2mri.recipes.train_demo import train_demo
    from ctp2mri.recipes.train_paper import PAPER_RECIPES

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.recipe in PAPER_RECIPES:
        return _train_paper(args)
    for flag, given in (("--data", args.data), ("--plan", args.plan), ("--steps-scale", args.steps_scale != 1)):
        if given:
            raise InputError(f"{flag} is for the paper recipes (--recipe paper or paper-smoke); the {args.recipe} "
                             "recipe trains on phantom data it generates")
    if args.out is None:
        raise InputError("--out WORK is required (the work folder of the recipe)")
    progress, close = tqdm_progress("train-demo")
    try:
        result = train_demo(args.out, args.recipe, bundle=args.bundle, device=args.device or "cpu",
                            evaluate_models=not args.no_evaluate, progress=progress, cancel=args.cancel,
                            on_stage=lambda text: print(text, flush=True))
    finally:
        close()
    print("wall time per stage (s):", json.dumps(result["timings_s"]))
    if args.bundle:
        print(f"bundled models: {args.bundle}")
    return 0


def _train_paper(args: argparse.Namespace) -> int:
    from ctp2mri.progress import tqdm_progress
    from ctp2mri.recipes.train_paper import check_paper_data, format_plan, plan, torchrun_commands, train_paper

    if args.plan:
        info = check_paper_data(args.data, need_test=not args.no_evaluate) if args.data is not None else None
        print(format_plan(plan(args.recipe, info, steps_scale=args.steps_scale, gpus=args.gpus,
                               peak_tflops=args.peak_tflops, utilization=args.utilization,
                               evaluate_models=not args.no_evaluate)))
        if args.data is not None and args.out is not None:
            print(f"commands per stage ({args.gpus} GPU{'s' if args.gpus > 1 else ''}; add --resume to continue a "
                  "stage; the last one evaluates):")
            for line in torchrun_commands(args.recipe, args.data, args.out, args.gpus, args.steps_scale):
                print(f"  {line}")
        return 0
    if args.gpus != 1:
        raise InputError("--gpus is for --plan: train-demo trains on one GPU; run the torchrun commands "
                         "`--plan --gpus N --data CASES --out WORK` prints for several")
    if args.out is None:
        raise InputError("--out WORK is required (the work folder of the recipe)")
    progress, close = tqdm_progress("train-demo")
    try:
        result = train_paper(args.out, args.data, args.recipe, device=args.device, steps_scale=args.steps_scale,
                             bundle=args.bundle, evaluate_models=not args.no_evaluate,
                             peak_tflops=args.peak_tflops, utilization=args.utilization, progress=progress,
                             cancel=args.cancel, on_stage=lambda text: print(text, flush=True))
    finally:
        close()
    print("wall time per stage (s):", json.dumps(result["timings_s"]))
    if args.bundle:
        print(f"bundled models: {args.bundle}")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="synthesise a phantom stroke case with the bundled model (≈1 min, CPU)",
                       description="Generates a held-out phantom stroke case, synthesises DWI/ADC with the "
                       "bundled lesion-aware post-trained cLDM and DPM-Solver++, writes NIfTI outputs, a "
                       "figure (demo.png) and the comparison metrics, and prints them.")
    p.add_argument("--out", type=Path, default=Path("ctp2mri_demo"), help="output folder (default ctp2mri_demo)")
    p.add_argument("--model", default="demo",
                   help="bundled model name (demo, demo-base) or a cLDM checkpoint folder (default demo)")
    p.add_argument("--sampler", choices=list(SAMPLER_STEPS), default=DEFAULT_SAMPLER)
    p.add_argument("--steps", type=_COUNT, help=_STEPS_HELP)
    p.add_argument("--seed", type=_SEED, default=0, help="sampling seed")
    p.add_argument("--case-seed", type=_SEED, default=5, help="phantom case seed (default 5: left MCA stroke)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.set_defaults(func=_cmd_demo)

    t = sub.add_parser("train-demo", help="reproduce the bundled demo models (≈ 75 min alone on a 2-core CPU), or "
                       "train the paper's recipe on your cases (--recipe paper --data CASES)",
                       description="Phantom data → autoencoder → base cLDM (beside it, the L1 reference U-Net) → "
                       "lesion-aware post-training → bundle → evaluation of base, post-trained and reference on "
                       "the test split. Each stage is a resumable run in --out; re-running continues an "
                       "interrupted recipe. --recipe paper trains the same stages on your case folders (--data, "
                       "on the paper grid, with splits.json) with the paper's networks and hyper-parameters "
                       "on a GPU (bf16), printing each stage's expected time from its FLOP count first; "
                       "paper-smoke runs it in seconds on a CPU with small networks. train-demo runs in one "
                       "process and refuses torchrun: for several GPUs, --plan --gpus N --data CASES --out WORK "
                       "prints one torchrun command per stage (docs/real-data.md).")
    t.add_argument("--out", type=Path, help="work folder (data, runs, evaluation); required unless --plan")
    t.add_argument("--bundle", type=Path, help="copy the shippable weights here (e.g. resources/models/demo)")
    t.add_argument("--recipe", choices=["demo", "demo-paper", "demo-v3", "demo-v2", "smoke", "paper", "paper-smoke"],
                   default="demo",
                   help="demo (the bundled models' recipe, v4), demo-paper (v4's data and steps with the paper's "
                   "condition and objective), demo-v3 / demo-v2 (earlier bundles), smoke (seconds, useless models); "
                   "paper (your --data, the paper's networks and hyper-parameters, GPU) or paper-smoke (the same "
                   "pipeline on your --data with small networks and 2 steps per stage, CPU)")
    t.add_argument("--data", type=Path, metavar="CASES",
                   help="paper recipes: case folders on the paper grid with splits.json (train and test cases)")
    t.add_argument("--device", help="training device (default: cpu for the demo recipes, cuda for paper)")
    t.add_argument("--plan", action="store_true",
                   help="paper recipes: print the stages, their FLOP-based time estimates and (with --data and "
                   "--out) the per-stage commands, then stop")
    t.add_argument("--gpus", type=_COUNT, default=1,
                   help="with --plan: GPUs to plan for; the commands it prints launch torchrun with this many")
    t.add_argument("--steps-scale", type=_POSITIVE, default=1.0, metavar="F",
                   help="paper recipes: multiply every step count by F (e.g. 0.01 for a first try)")
    t.add_argument("--peak-tflops", type=_POSITIVE,
                   help="the GPU's dense bf16 peak for the estimate (default: detected, else an H100's 989)")
    t.add_argument("--utilization", type=cli_number(above=0.0, maximum=1.0), default=0.35,
                   help="assumed sustained share of that peak (default 0.35)")
    t.add_argument("--threads", type=cli_whole(minimum=0), default=0,
                   help="torch CPU threads (0: torch's default; 1 is faster on a machine busy with other work)")
    t.add_argument("--no-evaluate", action="store_true", help="skip the test-split evaluation")
    t.set_defaults(func=_cmd_train_demo)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error of the CLI (argparse adds the usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ctp2mri",
        description="Synthesise diffusion MRI (DWI, ADC) from CT perfusion with a lesion-aware "
        "latent diffusion model.")
    from ctp2mri import __version__

    parser.add_argument("--version", action="version", version=f"ctp2mri {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_demo, _add_phantom, _add_preprocess, _add_training, _add_synthesize, add_perfusion, add_import,
                _add_evaluate, _add_bench, add_doctor):
        add(sub)
    return parser


# running a command ---------------------------------------------------------------------------
#: Commands whose first Ctrl-C/SIGTERM lets the current training step finish and saves a checkpoint,
#: with the flag that continues them (None: the same command again continues).
_RESUMABLE = {"train-autoencoder": "--resume", "train-ldm": "--resume", "post-train": "--resume",
              "train-pix2pix": "--resume", "ablate": None, "train-demo": None,
              "import-isles24": None, "import-bids": None}


def _claimed_output(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """The command's --out, held for the whole run, so that a second run into the same place is
    refused at once instead of overwriting this one's result. Under torchrun only rank 0 writes."""
    out = getattr(args, "out", None)
    if out is None or getattr(args, "plan", False) or int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext()
    from ctp2mri.io.atomic import claim_output

    return claim_output(out)


def _saved_step(folder: Path | None) -> int | None:
    """Step of the resumable checkpoint in ``folder``, or None (read without importing torch)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
        return int(config["provenance"]["steps"]) if "training_state" in config else None
    except (OSError, TypeError, ValueError, KeyError):
        return None


def _again(command: str, argv: list[str]) -> str:
    """The command line that continues an interrupted run."""
    flag = _RESUMABLE[command]
    words = ["ctp2mri", *argv] + ([flag] if flag and flag not in argv else [])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return shlex.join(words) + (f" (under torchrun with {world} processes, as before)" if world > 1 else "")


def _interrupted(args: argparse.Namespace, argv: list[str], exc: BaseException) -> str:
    """What an interrupted command says: what was kept, and for training how to continue."""
    if args.command not in _RESUMABLE:
        return "interrupted; no partial output was kept"
    if isinstance(exc, Cancelled) and exc.checkpoint is not None:
        where, step = exc.checkpoint, exc.step
    else:
        where = getattr(args, "out", None)
        step = _saved_step(where) if _RESUMABLE[args.command] else None
    if step is None and _RESUMABLE[args.command]:
        return "interrupted before the first checkpoint; nothing to resume (run the command again to start over)"
    saved = f"the checkpoint in {where} (step {step}) keeps the run" if step is not None else \
        "finished runs and checkpoints are kept"
    return f"interrupted; {saved}. Continue with: {_again(args.command, argv)}"


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    name = f"ctp2mri {args.command}"
    args.cancel = CancelToken() if args.command in _RESUMABLE else None
    received: list[int] = []

    def finishing(signum: int) -> None:
        received.append(signum)
        print(f"\n{name}: stopping after the current step to save a checkpoint (interrupt again to stop at once, "
              "losing the steps since the last checkpoint)", file=sys.stderr, flush=True)

    try:
        with handle_interrupts(args.cancel, finishing), _claimed_output(args):
            return int(args.func(args) or 0)
    except (Cancelled, KeyboardInterrupt) as exc:
        print(f"{name}: {_interrupted(args, argv, exc)}", file=sys.stderr)
        return exit_code(exc) if isinstance(exc, KeyboardInterrupt) else 128 + (received or [2])[0]
    except Exception as exc:
        message = user_message(exc)
        if message is None:
            raise  # a bug: its traceback is the useful report
        print(f"{name}: error: {message}", file=sys.stderr)
        return 2 if isinstance(exc, InputError) else 1


def main(argv: list[str] | None = None) -> int:
    """Run one ``ctp2mri`` command line; returns the exit status.

    0: done. 2: an error the user can fix (bad input, options or usage); 1: the system refused
    (full disk, no permission, out of memory); both print one line on stderr, no traceback.
    130 (Ctrl-C) or 143 (SIGTERM): interrupted; temporary files are removed, a training run
    first saves a checkpoint and says how to resume it. Any other error is a bug and keeps its
    traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:
        return 130  # Ctrl-C while starting up: nothing ran, nothing to report
    except SystemExit as exc:  # --help, --version, or a usage error already printed as one line
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if getattr(args, "sampler", None) in SAMPLER_STEPS and getattr(args, "steps", 0) is None:
        args.steps = sampler_steps(args.sampler)  # a sampling command without --steps
    try:
        return _run(args, argv)
    except KeyboardInterrupt as exc:  # a second signal while the first was being reported
        return exit_code(exc)

