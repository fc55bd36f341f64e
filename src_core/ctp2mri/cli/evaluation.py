"""``ctp2mri evaluate``: the command-line wrapper of `ctp2mri.evaluation.evaluate` (and, for an
autoencoder checkpoint, `ctp2mri.evaluation.autoencoder`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ctp2mri.cli.options import COUNT, FRACTION, SEED, STEPS_HELP, add_device_argument
from ctp2mri.errors import InputError
from ctp2mri.settings import SAMPLER_STEPS


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ctp2mri.checkpoints import read_config
    from ctp2mri.devices import resolve_device_with_notice

    if len(args.model) == 1 and Path(args.model[0]).exists() \
            and read_config(args.model[0]).get("kind") == "autoencoder":
        from ctp2mri.evaluation.autoencoder import evaluate_autoencoder, format_autoencoder_report

        # its metrics are pooled over slices: there is no per-case table to write
        ignored = [flag for flag, value in (("--out", args.out), ("--table", args.table),
                                            ("--max-cases", args.max_cases)) if value is not None]
        if ignored:
            raise InputError(f"{', '.join(ignored)} appl{'ies' if len(ignored) == 1 else 'y'} to diffusion models "
                             f"and baselines; an autoencoder's evaluation prints pooled metrics (and --figure)")
        print(format_autoencoder_report(evaluate_autoencoder(
            args.model[0], args.data, split=None if args.split == "all" else args.split, batch_size=args.batch_size,
            device=args.device, figure=args.figure)))
        if args.figure:
            print(f"figure: {args.figure}")
        return 0
    from ctp2mri.evaluation.evaluate import evaluate, fid_status, named_models
    from ctp2mri.evaluation.report import comparison_paths, format_report, write_comparison
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
        rows, summary = evaluate(models, args.data, split=None if args.split == "all" else args.split,
                                 n_steps=args.steps, eta=args.eta, seed=args.seed, batch_size=args.batch_size,
                                 device=args.device, out_csv=args.out, progress=progress,
                                 max_cases=args.max_cases, figure=args.figure,
                                 use_ema=not args.no_ema, fid_weights=args.fid_weights,
                                 sampler=args.sampler, perfusion=not args.no_perfusion, samples=args.samples)
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


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    """Register the ``evaluate`` subcommand."""
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
    p.add_argument("--steps", type=COUNT, help=STEPS_HELP)
    p.add_argument("--sampler", choices=list(SAMPLER_STEPS), default="ddim",
                   help="ddim (the paper's, default) or dpm++2m (DPM-Solver++(2M), ~20 steps)")
    p.add_argument("--eta", type=FRACTION, default=0.0,
                   help="DDIM and bridge-sampler eta (default 0: deterministic; BBDM's configs use 1)")
    p.add_argument("--seed", type=SEED, nargs="+", default=[0],
                   help="sampling seed (default 0); several sample every case once per seed and "
                   "average over cases and seeds (one CSV row per case and seed)")
    p.add_argument("--samples", type=COUNT, default=1, metavar="K",
                   help="score each cLDM's mean of K samples per slice, as synthesize --samples K outputs "
                   "it (default 1: one sample, as the paper)")
    p.add_argument("--batch-size", type=COUNT, default=16, help="slices per batch (default 16)")
    add_device_argument(p)
    p.add_argument("--out", type=Path, help="per-case CSV to write")
    p.add_argument("--table", type=Path,
                   help="Markdown file for the Table-1-shaped comparison (a .csv of it is written beside)")
    p.add_argument("--figure", type=Path, help="PNG of a few test slices (CTP, true/synthetic DWI, ADC; "
                   "an autoencoder's reconstruction)")
    p.add_argument("--max-cases", type=COUNT, help="evaluate only the first N cases")
    p.add_argument("--no-ema", action="store_true", help="sample with the raw, not the EMA, weights")
    p.add_argument("--fid-weights", type=Path,
                   help=f"local Inception-v3 weights for FID (or ${FID_WEIGHTS_ENV}); never downloaded")
    p.set_defaults(func=_cmd_evaluate)
