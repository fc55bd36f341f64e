"""``ctp2mri bench``: the command-line wrapper of the speed and memory benchmarks in `ctp2mri.bench`."""

from __future__ import annotations

import argparse
from pathlib import Path

from ctp2mri.cli.options import COUNT, FRAMES, POSITIVE, add_precision_argument
from ctp2mri.settings import PRECISIONS


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


def add_bench(sub: argparse._SubParsersAction) -> None:
    """Register ``bench`` with its benchmarks: preprocess, train, post-train, synthesize, perfusion."""
    p = sub.add_parser("bench", help="speed and memory benchmarks")
    bench = p.add_subparsers(dest="bench", required=True)
    b = bench.add_parser("preprocess", help="load → brain mask → resample a clinical-size CTP",
                         description="Builds a synthetic clinical-size CTP (default 512×512×320 at "
                         "0.47×0.47×1 mm, 15 frames, int16) and times load, mask and resampling "
                         "to the model grid; reports wall time and peak memory.")
    b.add_argument("--shape", type=COUNT, nargs=3, default=[512, 512, 320])
    b.add_argument("--spacing", type=POSITIVE, nargs=3, default=[0.47, 0.47, 1.0])
    b.add_argument("--frames", type=FRAMES, default=15)
    b.add_argument("--profile", choices=["demo", "paper"], default="paper")
    b.add_argument("--workdir", type=Path, help="where to write the synthetic input (default: temp)")
    b.set_defaults(func=_cmd_bench_preprocess)
    t = bench.add_parser("train", help="training steps/s and peak memory",
                         description="Times optimiser steps of the profile's networks on random slices "
                         "(no data needed).")
    t.add_argument("--profile", choices=["demo", "paper"], default="demo")
    t.add_argument("--kind", choices=["ldm", "autoencoder"], default="ldm")
    t.add_argument("--batch-size", type=COUNT, default=16)
    t.add_argument("--steps", type=COUNT, default=10, help="timed steps (after 2 warm-up steps)")
    t.add_argument("--device", default="auto")
    t.add_argument("--precision", choices=["auto", *PRECISIONS], default="auto",
                   help="auto: bf16 on CUDA, fp32 elsewhere")
    t.set_defaults(func=_cmd_bench_train)
    q = bench.add_parser("post-train", help="post-training steps/s and peak memory per target",
                         description="Times lesion-aware post-training steps (target x and D(z0)) and "
                         "the plain Eq. 4 step on random slices (no data needed).")
    q.add_argument("--profile", choices=["demo", "paper"], default="demo")
    q.add_argument("--batch-size", type=COUNT, default=16)
    q.add_argument("--steps", type=COUNT, default=10, help="timed steps per variant (after 2 warm-up)")
    q.add_argument("--device", default="auto")
    q.add_argument("--precision", choices=["auto", *PRECISIONS], default="auto",
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
    s.add_argument("--steps", type=COUNT, nargs="+", default=[50, 20], help="steps for each sampler")
    s.add_argument("--device", default="auto")
    add_precision_argument(s)
    s.add_argument("--no-naive", action="store_true", help="skip the one-slice-at-a-time loop")
    s.add_argument("--peak-tflops", type=POSITIVE, help="device peak, to report the achieved fraction")
    s.add_argument("--threads", type=COUNT, help="torch CPU threads")
    s.set_defaults(func=_cmd_bench_synthesize)
    f = bench.add_parser("perfusion", help="perfusion analysis: a model-grid case and a clinical-size series",
                         description="Times `ctp2mri perfusion` on a phantom case on the model grid and on a "
                         "clinical-size series (default 512×512×320 at 0.47×0.47×1 mm, 15 frames, int16, "
                         "memory-mapped) end to end, with peak memory.")
    f.add_argument("--repeats", type=COUNT, default=3, help="model-grid runs (median reported)")
    f.add_argument("--shape", type=COUNT, nargs=3, default=[512, 512, 320])
    f.add_argument("--spacing", type=POSITIVE, nargs=3, default=[0.47, 0.47, 1.0])
    f.add_argument("--no-clinical", action="store_true", help="only the model-grid case")
    f.add_argument("--workdir", type=Path, help="where to write the clinical-size input (default: temp)")
    f.set_defaults(func=_cmd_bench_perfusion)
