"""``ctp2mri phantom`` and ``ctp2mri preprocess``: the commands that write case folders,
wrappers of `ctp2mri.phantom` and `ctp2mri.preprocessing.preprocess`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ctp2mri.cli.options import COUNT, FRAMES, SEED


def _cmd_phantom(args: argparse.Namespace) -> int:
    from ctp2mri.casefolder import read_case
    from ctp2mri.phantom import generate_dataset
    from ctp2mri.progress import tqdm_progress

    progress, close = tqdm_progress("phantom cases", unit="case")
    try:
        splits_path = generate_dataset(args.out, n_cases=args.cases, seed=args.seed,
                                       profile=args.profile, n_frames=args.frames,
                                       overwrite=args.overwrite, progress=progress, workers=args.workers)
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
    p.add_argument("--cases", type=COUNT, default=4, help="number of cases (default 4)")
    p.add_argument("--seed", type=SEED, default=0, help="random seed (default 0)")
    p.add_argument("--profile", choices=["demo", "paper"], default="demo",
                   help="model grid: demo 2×2×5 mm 96×112, paper 1×1×5 mm 192×224")
    p.add_argument("--frames", type=FRAMES, default=15, help="CTP time points (default 15)")
    p.add_argument("--overwrite", action="store_true", help="replace existing case folders")
    p.add_argument("--workers", type=COUNT, default=1,
                   help="processes generating cases side by side (same cases for any number; default 1)")
    p.add_argument("--no-figure", action="store_true", help="skip overview.png")
    p.set_defaults(func=_cmd_phantom)


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
    p.add_argument("--frames", type=FRAMES, default=15, help="frames after temporal resampling")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_preprocess)


def add_cases(sub: argparse._SubParsersAction) -> None:
    """Register ``phantom`` and ``preprocess``."""
    _add_phantom(sub)
    _add_preprocess(sub)
