"""Running a cohort: one case after another into ``OUT/<case>/``, resumable, with a summary.

`run_cohort` runs one case after another into ``OUT/<case>/`` (exactly what the single command
writes), with one progress report per case, and keeps ``OUT/summary.csv`` (case, status,
message, output, seconds, input and the case's key figures) up to date after every case, so an
interrupted cohort still has its summary. A case that fails is recorded with a one-line reason
and the next one starts. The cohort is resumable: a case whose folder already holds a complete
result of the same input (``report.json`` and every file it lists; results are written
atomically, so a folder is complete or absent) is skipped; a rerun only does what is missing.
``OUT/cohort.json`` records the command and the settings that change the result, and a rerun
with other settings is refused unless ``overwrite`` (which redoes every case).

Which cases, and the two commands' cohorts, are `ctp2mri.synthesis.cohort`'s.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctp2mri.errors import Cancelled, InputError, user_message
from ctp2mri.progress import CancelToken, ProgressCallback

if TYPE_CHECKING:
    from ctp2mri.synthesis.cohort import CohortCase

__all__ = ["ERRORS_FILE", "SETTINGS_FILE", "SUMMARY_FILE", "CaseOutcome", "CohortResult", "completed_report",
           "run_cohort"]

SUMMARY_FILE = "summary.csv"
SETTINGS_FILE = "cohort.json"
ERRORS_FILE = "errors.log"  # tracebacks of unexpected errors (bugs), beside the summary
SUMMARY_COLUMNS = ("case", "status", "message", "output", "seconds", "input")


@dataclass
class CaseOutcome:
    """One row of the summary: ``status`` is ``ok``, ``skipped`` (finished earlier) or ``failed``."""

    case: str
    status: str
    message: str
    output: str
    seconds: float | None
    input: str
    figures: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        seconds = "" if self.seconds is None else f"{self.seconds:.2f}"
        return {"case": self.case, "status": self.status, "message": self.message, "output": self.output,
                "seconds": seconds, "input": self.input, **self.figures}


@dataclass
class CohortResult:
    """What `run_cohort` did: one outcome per case, in order, and the summary it wrote."""

    outcomes: list[CaseOutcome]
    summary: Path
    seconds: float
    notes: list[str] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def failed(self) -> list[CaseOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]


def completed_report(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The ``report.json`` of a complete result in ``folder`` (every file it lists present), else None."""
    folder = Path(folder)
    try:
        report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = report.get("files") if isinstance(report, dict) else None
    if not isinstance(files, dict) or not all(isinstance(f, str) and (folder / f).is_file() for f in files.values()):
        return None
    return report


def _reported_input(report: dict[str, Any]) -> str | None:
    source = report.get("input")
    return source.get("path") if isinstance(source, dict) else None


def _one_line(exc: BaseException, errors_log: Path, case: str) -> str:
    """The failed case's reason: the user-facing line, or for a bug its type and message (the
    traceback goes to ``errors.log``)."""
    message = user_message(exc)
    if message is not None:
        return message
    if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch
        return "out of GPU memory; lower --batch-size, or free the GPU of other work"
    try:
        with open(errors_log, "a", encoding="utf-8") as log:
            log.write(f"--- {case} ({time.strftime('%Y-%m-%d %H:%M:%S')})\n")
            log.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        where = f"; traceback in {errors_log}"
    except OSError:
        where = ""
    return " ".join(f"unexpected error ({type(exc).__name__}): {exc}{where}".split())


def _check_settings(out_dir: Path, command: str, settings: dict[str, Any], overwrite: bool) -> None:
    """Refuse to mix two commands' or two settings' results in one cohort folder."""
    from ctp2mri.io.atomic import atomic_path
    from ctp2mri.io.jsonfile import json_ready, strict_json

    wanted = {"command": command, "settings": json_ready(settings)}
    path = out_dir / SETTINGS_FILE
    if path.is_file() and not overwrite:
        try:
            before = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            before = None
        if isinstance(before, dict) and before.get("command") != command:
            raise InputError(f"{out_dir} holds a '{before.get('command')}' cohort; choose another --out for "
                             f"'{command}'")
        old = before.get("settings", {}) if isinstance(before, dict) else {}
        changed = [f"{k} {old.get(k)!r} → {v!r}" for k, v in wanted["settings"].items() if old.get(k) != v]
        if changed:
            raise InputError(f"{out_dir} holds results computed with other settings ({', '.join(changed)}); "
                             "pass --overwrite to redo every case with the new ones, or choose another --out")
        return
    with atomic_path(path) as tmp:
        tmp.write_text(strict_json(wanted), encoding="utf-8")


def _write_summary(path: Path, outcomes: list[CaseOutcome], figure_columns: Sequence[str]) -> None:
    from ctp2mri.io.atomic import atomic_path

    extra = list(figure_columns) + [k for o in outcomes for k in o.figures if k not in figure_columns]
    columns = list(SUMMARY_COLUMNS) + list(dict.fromkeys(extra))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", restval="")
    writer.writeheader()
    for outcome in outcomes:
        writer.writerow({k: ("" if v is None else v) for k, v in outcome.row().items()})
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8")


def run_cohort(cases: Sequence[CohortCase], out_dir: str | os.PathLike,
               run_case: Callable[[CohortCase, Path, bool], Any], *, command: str,
               settings: dict[str, Any], describe: Callable[[dict[str, Any]], tuple[dict[str, Any], str]],
               figure_columns: Sequence[str] = (), overwrite: bool = False,
               progress: ProgressCallback | None = None, cancel: CancelToken | None = None,
               on_case: Callable[[CaseOutcome], None] | None = None) -> CohortResult:
    """Run ``run_case(case, OUT/<case.name>, overwrite)`` for every case; see the module docstring.

    Parameters
    ----------
    run_case
        Writes one case's complete result (with ``report.json`` listing its files, and the
        input's path under ``report["input"]["path"]``) into the folder, or raises.
    command, settings
        Recorded in ``OUT/cohort.json``; a rerun with other ones is refused unless ``overwrite``.
    describe
        ``report → (key figures, message)`` for the summary (e.g. the core volume, notices).
    overwrite
        Redo the cases that are finished already (each case's folder is replaced only once its
        new result is complete).
    progress
        ``progress(cases_done, cases_total, info)`` before each case and at the end; ``info``
        holds ``case``, ``ok``, ``skipped`` and ``failed``.
    cancel
        Checked before each case (and by ``run_case`` within it): the cohort stops, the summary
        keeps the cases done.
    on_case
        Called with each case's outcome as soon as it is known.

    Returns
    -------
    CohortResult
    """
    from ctp2mri.io.atomic import claim_output, ensure_writable_dir

    out_dir = Path(out_dir)
    if out_dir.is_file():
        raise InputError(f"output {out_dir} is a file; give a folder for the cohort's results")
    started = time.perf_counter()
    outcomes: list[CaseOutcome] = []
    summary = out_dir / SUMMARY_FILE
    with claim_output(out_dir):
        ensure_writable_dir(out_dir)
        _check_settings(out_dir, command, settings, overwrite)
        total = len(cases)

        def report(done: int, name: str) -> None:
            if progress is not None:
                progress(done, total, {"case": name, "ok": sum(o.status == "ok" for o in outcomes),
                                       "skipped": sum(o.status == "skipped" for o in outcomes),
                                       "failed": sum(o.status == "failed" for o in outcomes)})

        for i, case in enumerate(cases):
            if cancel is not None:
                cancel.raise_if_cancelled()
            report(i, case.name)
            outcomes.append(_one_case(case, out_dir, run_case, describe, overwrite))
            _write_summary(summary, outcomes, figure_columns)  # after every case: an interrupted run keeps it
            if on_case is not None:
                on_case(outcomes[-1])
        report(total, "")
    return CohortResult(outcomes, summary, time.perf_counter() - started)


def _one_case(case: CohortCase, out_dir: Path, run_case: Callable[[CohortCase, Path, bool], Any],
              describe: Callable[[dict[str, Any]], tuple[dict[str, Any], str]], overwrite: bool) -> CaseOutcome:
    folder = out_dir / case.name
    given = str(case.ctp)
    if case.problem is not None:
        return CaseOutcome(case.name, "failed", case.problem, "", None, "")
    earlier = completed_report(folder)
    if earlier is not None and not overwrite:
        source = _reported_input(earlier)
        if source is not None and os.path.abspath(source) != given:
            return CaseOutcome(case.name, "failed", f"{folder} holds the result of another input ({source}); "
                               "pass --overwrite to replace it, or choose another --out", str(folder), None, given)
        figures, _ = describe(earlier)
        return CaseOutcome(case.name, "skipped", "finished earlier; kept", str(folder), None, given, figures)
    clock = time.perf_counter()
    try:
        run_case(case, folder, overwrite)
    except (Cancelled, KeyboardInterrupt):
        raise
    except Exception as exc:  # one bad case must not stop the others
        return CaseOutcome(case.name, "failed", _one_line(exc, out_dir / ERRORS_FILE, case.name), "",
                           time.perf_counter() - clock, given)
    seconds = time.perf_counter() - clock
    written = completed_report(folder)
    if written is None:
        return CaseOutcome(case.name, "failed", f"no complete result in {folder} after the run", "", seconds, given)
    figures, message = describe(written)
    return CaseOutcome(case.name, "ok", message, str(folder), seconds, given, figures)

