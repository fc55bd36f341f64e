"""``ctp2mri perfusion``: the command-line wrapper of `ctp2mri.perfusion`."""

from __future__ import annotations

import argparse
from pathlib import Path

from ctp2mri.cli.cohort import perfusion_cohort_command, with_cohorts


def _cmd_perfusion(args: argparse.Namespace) -> int:
    from ctp2mri.perfusion.output import run_perfusion
    from ctp2mri.progress import tqdm_progress

    progress, close = tqdm_progress("perfusion")
    try:
        result = run_perfusion(args.ctp, args.out, mask=args.mask, aif_mask=args.aif_mask, series_uid=args.series_uid,
                               overwrite=args.overwrite, figure=not args.no_figure, progress=progress,
                               smoothing_mm=args.smoothing_mm, method=args.method, core_rcbf=args.core_rcbf,
                               hypoperfusion_tmax_s=args.tmax_threshold, min_island_ml=args.min_island_ml)
    finally:
        close()
    r = result.regions
    ratio = f"{r.mismatch_ratio:.2f}" if r.core_ml > 0 else "∞ (no core)"
    print(f"core (rCBF < {r.settings.core_rcbf:g}) {r.core_ml:.1f} ml, hypoperfusion (Tmax > "
          f"{r.settings.hypoperfusion_tmax_s:g} s) {r.hypoperfusion_ml:.1f} ml, mismatch {r.mismatch_ml:.1f} ml, "
          f"ratio {ratio}")
    print(f"AIF: {len(result.aif.voxels)} voxels, peak {result.aif.peak_hu:.0f} HU at {result.aif.time_to_peak_s:.1f} s"
          + (f", scaled ×{result.aif.scale:.2f} by the VOF" if result.vof is not None else ", no VOF found"))
    for note in result.notes:
        print(f"note: {note}")
    print(f"wrote {args.out}: cbf, cbv, mtt, tmax, ttp, core, hypoperfusion, aif, vof, report.json"
          + ("" if args.no_figure else ", perfusion.png"))
    return 0


def add_perfusion(sub: argparse._SubParsersAction) -> None:
    """Register the ``perfusion`` subcommand."""
    p = sub.add_parser("perfusion", help="CBF, CBV, MTT, Tmax, TTP maps and the core/penumbra from a CTP",
                       description="Perfusion analysis of a CT-perfusion series: automatic arterial input and "
                       "venous output functions (or --aif-mask), delay-insensitive deconvolution, the maps on "
                       "the CTP's own grid, the ischaemic core (rCBF below 30 %% of the healthy hemisphere), "
                       "the hypoperfused tissue (Tmax > 6 s) and their mismatch, report.json and perfusion.png.")
    p.add_argument("ctp", type=Path, nargs="+",
                   help="4-D CTP: NIfTI, NRRD, MHA or a DICOM series folder; several, a folder of case "
                   "folders or a CSV list run a cohort into OUT/<case>/ with OUT/summary.csv (docs/cohorts.md)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--mask", type=Path, help="brain mask on the CTP grid (default: derived from the CTP)")
    p.add_argument("--aif-mask", type=Path, help="region on the CTP grid holding the artery to read the AIF from "
                   "(default: selected automatically)")
    p.add_argument("--core-rcbf", type=float, default=0.30, help="core: CBF below this fraction of the healthy "
                   "hemisphere's (default 0.30)")
    p.add_argument("--tmax-threshold", type=float, default=6.0, help="hypoperfusion: Tmax above this, s (default 6)")
    p.add_argument("--min-island-ml", type=float, default=0.5,
                   help="remove connected pieces of core/hypoperfusion smaller than this, ml (default 0.5)")
    p.add_argument("--smoothing-mm", type=float, default=4.0, help="in-plane Gaussian σ of the tissue curves, mm (default 4)")
    p.add_argument("--method", choices=["osvd", "tikhonov"], default="osvd", help="deconvolution (default osvd)")
    p.add_argument("--series-uid", help="pick one series from a DICOM folder holding several")
    p.add_argument("--no-figure", action="store_true", help="skip perfusion.png")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=with_cohorts(_cmd_perfusion, perfusion_cohort_command))
