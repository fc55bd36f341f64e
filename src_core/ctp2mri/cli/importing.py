"""``ctp2mri import-isles24`` (alias ``import-bids``): the command-line wrapper of `ctp2mri.importing.isles24`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ctp2mri.checks import cli_whole

COMMANDS = ("import-isles24", "import-bids")

_DESCRIPTION = """\
Turn a BIDS stroke dataset (ISLES'24, or any with CTP + DWI/ADC + lesion mask) into case folders
for training: for each subject, find the files by their BIDS names, register the MRI to the CTP
(rigid) where it is not already in the CTP's space, derive the brain mask from the CTP, resample to
the profile's model grid and 15 frames, and write OUT/sub-XXXX/ with case.json (source files,
registration and its error estimate, time between the scans), then OUT/splits.json and
OUT/import_summary.csv. Finished subjects are skipped on a rerun; a subject that fails is named with
its reason and the others go on (exit status 2 when any failed).

THE LESION IS THE FINAL INFARCT, NOT THE ACUTE CORE: in ISLES'24 the DWI, ADC and lesion mask come from
the follow-up MRI 2-9 days after the CTP, whereas the paper paired the CTP with a DWI taken within the
hour. A model trained on these cases learns the follow-up DWI/ADC; each case.json says so.

Accepted names (case-insensitive; .nii or .nii.gz; any subject/session labels, e.g. sub-stroke0001 or
sub-strokecase0001, ses-01 or ses-0001; files in the session folder or in ct/, dwi/, anat/,
perfusion-maps/ …; under rawdata/, raw_data/ or derivatives/[pipeline/]):
  CTP     *_ctp          (4-D; e.g. sub-stroke0001_ses-01_ctp.nii.gz, *_space-ncct_ctp.nii.gz)
  DWI     *_dwi, *_trace (3-D b=1000 trace; a 4-D series with a .bval is reduced to it)
  ADC     *_adc          (10^-6 mm2/s; mm2/s and 10^-3 mm2/s are rescaled; computed from b0 when missing)
  lesion  *_lesion-msk, *_msk, *_lesion_mask, *_label-lesion_mask, *_desc-lesion_mask
  shown in napari only: *_cbf, *_cbv, *_mtt, *_tmax, *_ttp, *_ncct, *_cta, other *_msk/*_mask
--space derivatives prefers the space-* files (ISLES'24: co-registered to the NCCT), --space raw the
native scans; a file missing in that space is taken from the other and registered."""


def _cmd_import(args: argparse.Namespace) -> int:
    from ctp2mri.importing.isles24 import format_summary, import_dataset
    from ctp2mri.progress import tqdm_progress

    def report(row: dict) -> None:
        if row["status"] == "failed":
            print(f"{row['case']}: failed: {row['reason']}", file=sys.stderr, flush=True)
        else:
            print(f"{row['case']}: {row['status']} ({row['seconds']:.0f} s)", flush=True)

    progress, close = tqdm_progress(args.command, unit="subject")
    try:
        result = import_dataset(args.root, args.out, profile=args.profile, space=args.space, register=args.register,
                                subjects=args.subjects, n_frames=args.frames, overwrite=args.overwrite,
                                progress=progress, cancel=args.cancel, on_subject=report)
    finally:
        close()
    print(format_summary(result.rows))
    print(f"summary: {result.summary_csv}\nsplits: {result.splits}")
    print("note: the lesion masks are the FINAL infarct on the follow-up MRI, not the acute core")
    failed = result.failed
    if failed:
        print(f"ctp2mri {args.command}: {len(failed)} of {len(result.rows)} subjects failed "
              f"({', '.join(r['case'] for r in failed)}); the others were imported", file=sys.stderr)
        return 2
    return 0


def add_import(sub: argparse._SubParsersAction) -> None:
    """Register ``import-isles24`` and its alias ``import-bids``."""
    p = sub.add_parser(COMMANDS[0], aliases=list(COMMANDS[1:]),
                       help="BIDS stroke data (ISLES'24) → case folders (lesion = final infarct)",
                       description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path, help="dataset root (holding rawdata/ or raw_data/ and derivatives/)")
    p.add_argument("--out", required=True, type=Path, help="folder for the case folders, splits.json and "
                   "import_summary.csv")
    p.add_argument("--profile", choices=["paper", "demo"], default="paper",
                   help="model grid: paper 1×1×5 mm 192×224 (default), demo 2×2×5 mm 96×112")
    p.add_argument("--space", choices=["derivatives", "raw"], default="derivatives",
                   help="prefer the co-registered space-* files (default) or the native scans")
    p.add_argument("--register", choices=["auto", "always", "never"], default="auto",
                   help="auto (default): register the MRI rigidly to the CTP unless it is on its grid or in its "
                   "space-*; always; never (trust the world coordinates)")
    p.add_argument("--subjects", nargs="+", metavar="SUB", help="import only these subjects (sub-XXXX or XXXX)")
    p.add_argument("--frames", type=cli_whole(minimum=2), default=15, help="CTP frames after temporal "
                   "resampling (default 15, the model's)")
    p.add_argument("--overwrite", action="store_true", help="import finished subjects again")
    p.set_defaults(func=_cmd_import)
