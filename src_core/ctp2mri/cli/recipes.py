"""``ctp2mri demo`` and ``ctp2mri train-demo``: the command-line wrappers of the end-to-end recipes
in `ctp2mri.recipes` (the bundled model's demo; training the demo or the paper's models)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ctp2mri.checks import cli_number, cli_whole
from ctp2mri.cli.options import COUNT, POSITIVE, SEED, STEPS_HELP, add_device_argument
from ctp2mri.errors import InputError
from ctp2mri.settings import DEFAULT_SAMPLER, SAMPLER_STEPS


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
    from ctp2mri.recipes.paper_recipe import PAPER_RECIPES

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
    from ctp2mri.recipes.paper_plan import format_plan, plan, torchrun_commands
    from ctp2mri.recipes.paper_recipe import check_paper_data
    from ctp2mri.recipes.train_paper import train_paper

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


def add_recipes(sub: argparse._SubParsersAction) -> None:
    """Register ``demo`` and ``train-demo``."""
    p = sub.add_parser("demo", help="synthesise a phantom stroke case with the bundled model (≈1 min, CPU)",
                       description="Generates a held-out phantom stroke case, synthesises DWI/ADC with the "
                       "bundled lesion-aware post-trained cLDM and DPM-Solver++, writes NIfTI outputs, a "
                       "figure (demo.png) and the comparison metrics, and prints them.")
    p.add_argument("--out", type=Path, default=Path("ctp2mri_demo"), help="output folder (default ctp2mri_demo)")
    p.add_argument("--model", default="demo",
                   help="bundled model name (demo, demo-base) or a cLDM checkpoint folder (default demo)")
    p.add_argument("--sampler", choices=list(SAMPLER_STEPS), default=DEFAULT_SAMPLER)
    p.add_argument("--steps", type=COUNT, help=STEPS_HELP)
    p.add_argument("--seed", type=SEED, default=0, help="sampling seed")
    p.add_argument("--case-seed", type=SEED, default=5, help="phantom case seed (default 5: left MCA stroke)")
    add_device_argument(p)
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
    t.add_argument("--recipe", choices=["demo", "demo-v8", "demo-v7", "demo-v6", "demo-v5", "demo-dwi-anchor",
                                        "demo-paper",
                                        "demo-v3", "demo-v2", "smoke", "paper", "paper-smoke"],
                   default="demo",
                   help="demo (the bundled models' recipe, v9), demo-v8 / demo-v7 / demo-v6 / demo-v5 (the previous "
                   "bundles'), "
                   "demo-dwi-anchor (v8's with DWI scaled to normal tissue, REPORT.md §D10), "
                   "demo-paper (v4's data and steps with the paper's condition and objective), demo-v3 / "
                   "demo-v2 (earlier bundles), smoke (seconds, useless models); paper (your --data, the paper's "
                   "networks and hyper-parameters, GPU) or paper-smoke (the same pipeline on your --data with small networks "
                   "and 2 steps per stage, CPU)")
    t.add_argument("--data", type=Path, metavar="CASES",
                   help="paper recipes: case folders on the paper grid with splits.json (train and test cases)")
    t.add_argument("--device", help="training device (default: cpu for the demo recipes, cuda for paper)")
    t.add_argument("--plan", action="store_true",
                   help="paper recipes: print the stages, their FLOP-based time estimates and (with --data and "
                   "--out) the per-stage commands, then stop")
    t.add_argument("--gpus", type=COUNT, default=1,
                   help="with --plan: GPUs to plan for; the commands it prints launch torchrun with this many")
    t.add_argument("--steps-scale", type=POSITIVE, default=1.0, metavar="F",
                   help="paper recipes: multiply every step count by F (e.g. 0.01 for a first try)")
    t.add_argument("--peak-tflops", type=POSITIVE,
                   help="the GPU's dense bf16 peak for the estimate (default: detected, else an H100's 989)")
    t.add_argument("--utilization", type=cli_number(above=0.0, maximum=1.0), default=0.35,
                   help="assumed sustained share of that peak (default 0.35)")
    t.add_argument("--threads", type=cli_whole(minimum=0), default=0,
                   help="torch CPU threads (0: torch's default; 1 is faster on a machine busy with other work)")
    t.add_argument("--no-evaluate", action="store_true", help="skip the test-split evaluation")
    t.set_defaults(func=_cmd_train_demo)
