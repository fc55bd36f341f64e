"""Several inputs for ``ctp2mri synthesize`` and ``ctp2mri perfusion``: the CLI side of `ctp2mri.synthesis.cohort`.

``with_cohorts(single, cohort)`` is what both commands register: one CTP (file, DICOM folder)
runs the command as before; several inputs, a CSV list or a folder of case folders run the
cohort, with one progress bar over the cases, a line per case and ``OUT/summary.csv``. The exit
status is 0 when no case failed and 1 otherwise (2, as always, for an error before the first
case: bad options, a CSV without a column of paths).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from ctp2mri.errors import InputError

Command = Callable[[argparse.Namespace], int]


def with_cohorts(single: Command, cohort: Command) -> Command:
    """The command's function: ``cohort`` for cohort inputs, else ``single`` with ``args.ctp`` one path."""
    def run(args: argparse.Namespace) -> int:
        from ctp2mri.synthesis.cohort import is_cohort

        if is_cohort(args.ctp):
            return cohort(args)
        args.ctp = args.ctp[0]
        return single(args)

    return run


_PER_CASE = {
    "mask": ("--mask", "give each case's brain mask in the CSV's 'mask' column or as mask.nii.gz in its case folder"),
    "ground_truth": ("--ground-truth", "give each case's lesion in the CSV's 'lesion' column or as lesion.nii.gz "
                     "in its case folder"),
    "aif_mask": ("--aif-mask", "a cohort selects each case's AIF automatically; run the case alone to place it"),
    "series_uid": ("--series-uid", "give each case's DICOM folder holding one series"),
}


def _refuse_single_options(args: argparse.Namespace, dests: tuple[str, ...]) -> None:
    for dest in dests:
        if getattr(args, dest, None) is not None:
            flag, hint = _PER_CASE[dest]
            raise InputError(f"{flag} applies to one CTP, not to a cohort of several; {hint}")


def _line(outcome) -> str:
    seconds = "" if outcome.seconds is None else f"{outcome.seconds:.1f} s"
    figures = "  ".join(f"{k} {v}" for k, v in outcome.figures.items() if v not in (None, ""))
    text = outcome.message if outcome.status != "ok" else figures
    return f"{outcome.case:<20} {outcome.status:<8} {seconds:>8}  {text}".rstrip()


def _run(name: str, args: argparse.Namespace, start: Callable[..., object]) -> int:
    from tqdm.auto import tqdm

    from ctp2mri.synthesis.cohort import collect_cases
    from ctp2mri.synthesis.cohort_runner import SUMMARY_FILE
    from ctp2mri.progress import tqdm_progress

    cases, notes = collect_cases(args.ctp)
    for note in notes:
        print(f"note: {note}")
    print(f"{name}: {len(cases)} cases into {args.out}")
    progress, close = tqdm_progress(f"{name} cohort", unit="case")
    try:
        result = start(cases, progress=progress, on_case=lambda outcome: tqdm.write(_line(outcome)))
    except KeyboardInterrupt:  # the CLI then says the current case kept nothing
        print(f"ctp2mri {name}: the cases finished so far are kept in {args.out} ({SUMMARY_FILE} lists them); "
              "run the same command again to do the rest", file=sys.stderr)
        raise
    finally:
        close()
    counts = {s: result.count(s) for s in ("ok", "skipped", "failed")}
    print(f"{name}: {len(result.outcomes)} cases, {counts['ok']} ok, {counts['skipped']} skipped "
          f"(finished earlier), {counts['failed']} failed in {result.seconds:.1f} s; summary: {result.summary}")
    for outcome in result.failed:
        print(f"ctp2mri {name}: {outcome.case} failed: {outcome.message}", file=sys.stderr)
    return 1 if counts["failed"] else 0


def synthesize_cohort_command(args: argparse.Namespace) -> int:
    """``ctp2mri synthesize`` over several inputs (`ctp2mri.synthesis.cohort.synthesize_cohort`)."""
    from ctp2mri.cli.options import sample_settings
    from ctp2mri.devices import resolve_device_with_notice
    from ctp2mri.synthesis.cohort import synthesize_cohort

    _refuse_single_options(args, ("mask", "ground_truth", "series_uid"))
    settings = sample_settings(args)  # a bad setting fails before any case is listed
    _, notice = resolve_device_with_notice(args.device)
    if notice:
        print(f"ctp2mri synthesize: {notice}")

    def start(cases, **hooks):
        return synthesize_cohort(cases, args.model, args.out, settings, device=args.device,
                                 overwrite=args.overwrite, **hooks)

    return _run("synthesize", args, start)


def perfusion_cohort_command(args: argparse.Namespace) -> int:
    """``ctp2mri perfusion`` over several inputs (`ctp2mri.synthesis.cohort.perfusion_cohort`)."""
    from ctp2mri.synthesis.cohort import perfusion_cohort

    _refuse_single_options(args, ("mask", "aif_mask", "series_uid"))

    def start(cases, **hooks):
        return perfusion_cohort(cases, args.out, overwrite=args.overwrite, figure=not args.no_figure,
                                smoothing_mm=args.smoothing_mm, method=args.method, core_rcbf=args.core_rcbf,
                                hypoperfusion_tmax_s=args.tmax_threshold, min_island_ml=args.min_island_ml,
                                **hooks)

    return _run("perfusion", args, start)
