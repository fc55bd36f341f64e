"""`ctp2mri` command line: a thin wrapper, one subcommand per core function.

Errors the user can fix (`InputError`) are printed as one line without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ctp2mri.errors import Cancelled, InputError


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
        from ctp2mri.figures import case_overview

        shown = cases[: min(4, len(cases))]
        png = case_overview(shown, Path(args.out) / "overview.png")
        print(f"overview figure: {png}")
    return 0


def _add_phantom(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("phantom", help="write digital stroke phantom case folders",
                       description="Generate paired CTP / DWI / ADC / lesion case folders from the "
                       "built-in physics-based stroke phantom (deterministic given --seed).")
    p.add_argument("--out", required=True, type=Path, help="output folder (case_000, …, splits.json)")
    p.add_argument("--cases", type=int, default=4, help="number of cases (default 4)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--profile", choices=["demo", "paper"], default="demo",
                   help="model grid: demo 2×2×5 mm 96×112, paper 1×1×5 mm 192×224")
    p.add_argument("--frames", type=int, default=15, help="CTP time points (default 15)")
    p.add_argument("--overwrite", action="store_true", help="replace existing case folders")
    p.add_argument("--no-figure", action="store_true", help="skip overview.png")
    p.set_defaults(func=_cmd_phantom)


# preprocess ------------------------------------------------------------------------------
def _cmd_preprocess(args: argparse.Namespace) -> int:
    from ctp2mri.preprocess import preprocess_case
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
    p.add_argument("--frames", type=int, default=15, help="frames after temporal resampling")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_preprocess)


# bench -----------------------------------------------------------------------------------
def _cmd_bench_preprocess(args: argparse.Namespace) -> int:
    from ctp2mri.bench import bench_preprocess, format_bench

    result = bench_preprocess(shape=tuple(args.shape), spacing=tuple(args.spacing),
                              frames=args.frames, profile=args.profile, workdir=args.workdir)
    print(format_bench(result))
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="speed and memory benchmarks")
    bench = p.add_subparsers(dest="bench", required=True)
    b = bench.add_parser("preprocess", help="load → brain mask → resample a clinical-size CTP",
                         description="Builds a synthetic clinical-size CTP (default 512×512×320 at "
                         "0.47×0.47×1 mm, 15 frames, int16) and times load, mask and resampling "
                         "to the model grid; reports wall time and peak memory.")
    b.add_argument("--shape", type=int, nargs=3, default=[512, 512, 320])
    b.add_argument("--spacing", type=float, nargs=3, default=[0.47, 0.47, 1.0])
    b.add_argument("--frames", type=int, default=15)
    b.add_argument("--profile", choices=["demo", "paper"], default="paper")
    b.add_argument("--workdir", type=Path, help="where to write the synthetic input (default: temp)")
    b.set_defaults(func=_cmd_bench_preprocess)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctp2mri",
        description="Synthesise diffusion MRI (DWI, ADC) from CT perfusion with a lesion-aware "
        "latent diffusion model.")
    from ctp2mri import __version__

    parser.add_argument("--version", action="version", version=f"ctp2mri {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_phantom, _add_preprocess, _add_bench):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except InputError as exc:
        print(f"ctp2mri {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (Cancelled, KeyboardInterrupt):
        print(f"ctp2mri {args.command}: cancelled; no partial output was kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
