"""``ctp2mri synthesize``: the command-line wrapper of `ctp2mri.synthesis.synthesize`."""

from __future__ import annotations

import argparse
from pathlib import Path

from ctp2mri.checks import cli_number
from ctp2mri.cli.cohort import synthesize_cohort_command, with_cohorts
from ctp2mri.cli.options import (
    COUNT,
    FRACTION,
    SEED,
    STEPS_HELP,
    add_device_argument,
    add_precision_argument,
    sample_settings,
)
from ctp2mri.settings import CORE_ADC_THRESHOLD, DEFAULT_SAMPLER, SAMPLER_STEPS


def _cmd_synthesize(args: argparse.Namespace) -> int:
    from ctp2mri.progress import tqdm_progress
    from ctp2mri.synthesis.synthesize import run_synthesize

    settings = sample_settings(args)
    progress, close = tqdm_progress("synthesize")
    try:
        result = run_synthesize(args.ctp, args.model, args.out, settings, device=args.device,
                                series_uid=args.series_uid, mask=args.mask, ground_truth_lesion=args.ground_truth,
                                overwrite=args.overwrite, progress=progress)
    finally:
        close()
    report = result.report
    for notice in report.get("notices", []):
        print(f"note: {notice}")
    print(f"wrote {args.out}: dwi, adc, core ({report.get('core_volume_ml', float('nan')):.1f} ml)"
          + (", uncertainty" if result.uncertainty else "")
          + (", lesion_probability" if result.lesion_probability is not None else "") + ", report.json")
    return 0


def add_synthesize(sub: argparse._SubParsersAction) -> None:
    """Register the ``synthesize`` subcommand."""
    p = sub.add_parser("synthesize", help="CTP in, synthetic DWI/ADC (+ core estimate) out",
                       description="Synthesise DWI and ADC from a CT-perfusion series with a trained "
                       "cLDM, on the CTP's own grid; writes dwi, adc, core (ADC < threshold), with "
                       "--samples > 1 per-voxel uncertainty, for a model with a lesion head its lesion "
                       "probability, plus report.json.")
    p.add_argument("ctp", type=Path, nargs="+",
                   help="4-D CTP: NIfTI, NRRD, MHA or a DICOM series folder; several, a folder of case "
                   "folders or a CSV list run a cohort into OUT/<case>/ with OUT/summary.csv (docs/cohorts.md)")
    p.add_argument("--model", required=True, type=Path, help="cLDM checkpoint folder")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--sampler", choices=list(SAMPLER_STEPS), default=DEFAULT_SAMPLER,
                   help="DDIM (the paper's) or DPM-Solver++(2M) (default, fewer steps)")
    p.add_argument("--steps", type=COUNT, help=STEPS_HELP)
    p.add_argument("--eta", type=FRACTION, default=0.0, help="DDIM eta, 0–1 (default 0)")
    p.add_argument("--samples", type=COUNT, default=1,
                   help="samples per slice, averaged; >1 adds uncertainty maps and a steadier core (what most "
                   "draws agree on; evaluate --samples scores it)")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--batch-size", type=COUNT, help="slices per network call (default: from free memory)")
    add_device_argument(p)
    add_precision_argument(p, "autocast precision on GPU (CPU always runs fp32)")
    p.add_argument("--core-threshold", type=cli_number(above=0.0, maximum=10000.0), default=CORE_ADC_THRESHOLD,
                   help=f"core = ADC below this (10⁻⁶ mm²/s) inside the brain (default {CORE_ADC_THRESHOLD:g})")
    p.add_argument("--mask", type=Path, help="brain mask on the CTP grid (default: derived)")
    p.add_argument("--ground-truth", type=Path, help="lesion mask to score the core estimate against")
    p.add_argument("--series-uid", help="pick one series from a DICOM folder holding several")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=with_cohorts(_cmd_synthesize, synthesize_cohort_command))
