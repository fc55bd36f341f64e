"""Cohorts: ``ctp2mri synthesize`` and ``ctp2mri perfusion`` over many cases in one run.

The inputs (`collect_cases`) are any mix of

* CTP paths (4-D NIfTI/NRRD/MHA files or DICOM series folders), one case each;
* case folders (docs/contracts.md): the case's ``ctp.nii.gz`` with its ``mask.nii.gz`` (and, for
  synthesis, ``lesion.nii.gz`` to score the core against) when present;
* a folder of case folders (e.g. ``ctp2mri phantom --out DIR``): every case folder in it;
* a CSV file with a column of paths named ``ctp`` (or ``path``, ``input``), optional ``case``
  (the output folder's name), ``mask`` and ``lesion`` columns; relative paths are read from
  the CSV's folder. A CSV of one unnamed column is a plain list of paths.

`run_cohort` runs one case after another into ``OUT/<case>/`` (exactly what the single command
writes), with one progress report per case, and keeps ``OUT/summary.csv`` (case, status,
message, output, seconds, input and the case's key figures) up to date after every case, so an
interrupted cohort still has its summary. A case that fails is recorded with a one-line reason
and the next one starts. The cohort is resumable: a case whose folder already holds a complete
result of the same input (``report.json`` and every file it lists; results are written
atomically, so a folder is complete or absent) is skipped; a rerun only does what is missing.
``OUT/cohort.json`` records the command and the settings that change the result, and a rerun
with other settings is refused unless ``overwrite`` (which redoes every case).

`synthesize_cohort` and `perfusion_cohort` are the two commands' cohorts (the CLI and the napari
synthesis widget call them); the module holds no Qt and no printing.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctp2mri.casefolder import CASE_FILES, is_case_folder
from ctp2mri.errors import Cancelled, InputError, user_message
from ctp2mri.progress import CancelToken, ProgressCallback

__all__ = ["CaseOutcome", "CohortCase", "CohortResult", "SUMMARY_FILE", "collect_cases", "completed_report",
           "is_cohort", "perfusion_cohort", "run_cohort", "synthesize_cohort"]

SUMMARY_FILE = "summary.csv"
SETTINGS_FILE = "cohort.json"
ERRORS_FILE = "errors.log"  # tracebacks of unexpected errors (bugs), beside the summary
SUMMARY_COLUMNS = ("case", "status", "message", "output", "seconds", "input")
_RESERVED = {SUMMARY_FILE, SETTINGS_FILE, ERRORS_FILE}
_PATH_COLUMNS = ("ctp", "path", "input", "ctp_path", "file")
_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


# which cases --------------------------------------------------------------------------------
@dataclass(frozen=True)
class CohortCase:
    """One case of a cohort: its name (the output folder), CTP and optional companions.

    ``problem`` is set when the case cannot run at all (a CSV row without a path): it is then
    reported as failed with that reason, like a case whose input is damaged.
    """

    name: str
    ctp: Path
    mask: Path | None = None
    lesion: Path | None = None
    problem: str | None = None


def _has_case_folders(folder: Path) -> bool:
    try:
        return any(is_case_folder(child) for child in folder.iterdir())
    except OSError:
        return False


def is_cohort(inputs: Sequence[str | os.PathLike]) -> bool:
    """True when ``inputs`` ask for a cohort: several paths, a CSV list, or a folder of case folders
    (one CTP file, one DICOM folder or one case folder is the single command, unchanged)."""
    if len(inputs) != 1:
        return len(inputs) > 1
    path = Path(inputs[0])
    if path.suffix.lower() == ".csv" and not path.is_dir():
        return True
    return path.is_dir() and not is_case_folder(path) and _has_case_folders(path)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in _IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _safe_name(text: str) -> str:
    """A folder name: letters, digits, '.', '_', '-'; never hidden (atomic writes use dot names)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip()).strip("_").lstrip(".")
    name = name or "case"
    return f"{name}_case" if name in _RESERVED else name


def _case_from_path(path: Path, name: str | None = None, mask: Path | None = None,
                    lesion: Path | None = None) -> CohortCase:
    """A case from a CTP path or a case folder (its mask and lesion unless given)."""
    path = Path(os.path.abspath(path))
    if is_case_folder(path):
        own = {key: path / CASE_FILES[key] for key in ("mask", "lesion")}
        return CohortCase(name or path.name, path / CASE_FILES["ctp"],
                          mask or (own["mask"] if own["mask"].is_file() else None),
                          lesion or (own["lesion"] if own["lesion"].is_file() else None))
    own_name = path.parent.name if path.name == CASE_FILES["ctp"] else _stem(path)  # case_x/ctp.nii.gz: case_x
    return CohortCase(name or own_name, path, mask, lesion)


def _read_csv(path: Path) -> list[CohortCase]:
    """The cases a CSV lists (see the module docstring)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"{path} does not exist") from None
    except UnicodeDecodeError:
        raise InputError(f"{path} is not a text CSV file (UTF-8); give a CSV with a column of CTP paths") from None
    rows = [row for row in csv.reader(io.StringIO(text)) if any(cell.strip() for cell in row)]
    if not rows:
        raise InputError(f"{path} lists no cases; give a CSV with a column of CTP paths named 'ctp'")
    header = [cell.strip().lower() for cell in rows[0]]
    column = next((c for c in _PATH_COLUMNS if c in header), None)
    first = 2  # the file's line number of the first case
    if column is None:
        if len(header) == 1:  # a plain list of paths, no header
            header, column, first = ["ctp"], "ctp", 1
        else:
            raise InputError(f"{path} has no column of CTP paths: name one of its columns "
                             f"'ctp' (or 'path'); its columns are {', '.join(map(repr, rows[0]))}")
    else:
        rows = rows[1:]
    if not rows:
        raise InputError(f"{path} lists no cases under its header")
    where = path.parent

    def cell(row: list[str], key: str) -> str:
        i = header.index(key) if key in header else None
        return row[i].strip() if i is not None and i < len(row) else ""

    def resolve(text: str) -> Path | None:
        return None if not text else Path(os.path.abspath(where / Path(text).expanduser()))

    cases = []
    for number, row in enumerate(rows, start=first):
        name = cell(row, "case") or None
        ctp = resolve(cell(row, column))
        if ctp is None:
            label = name or f"row_{number}"
            cases.append(CohortCase(label, where, problem=f"row {number} of {path.name} has no path in its "
                                    f"{column!r} column"))
            continue
        cases.append(_case_from_path(ctp, name, resolve(cell(row, "mask")), resolve(cell(row, "lesion"))))
    return cases


def collect_cases(inputs: Iterable[str | os.PathLike]) -> tuple[list[CohortCase], list[str]]:
    """The cases of a cohort, in the order given (a folder's case folders sorted by name), and
    notes on what was left out (subfolders that are not case folders, inputs listed twice).

    Output names are unique folder names: a case folder's or file's name (``x.nii.gz`` → ``x``),
    a CSV's ``case`` column; names that collide get their parent folder's name in front, then a
    number. A missing path is a case that will fail, not an error of the whole cohort.

    Raises
    ------
    InputError
        A CSV without a column of paths, or no case at all.
    """
    found: list[CohortCase] = []
    notes: list[str] = []
    for given in inputs:
        path = Path(given).expanduser()
        if path.suffix.lower() == ".csv" and not path.is_dir():
            found += _read_csv(path)
        elif path.is_dir() and not is_case_folder(path) and _has_case_folders(path):
            children = sorted(child for child in path.iterdir() if child.is_dir())
            found += [_case_from_path(child) for child in children if is_case_folder(child)]
            others = [child.name for child in children if not is_case_folder(child)]
            if others:
                notes.append(f"{path}: left out {len(others)} subfolder(s) without {CASE_FILES['ctp']}: "
                             + ", ".join(others[:5]) + (", …" if len(others) > 5 else ""))
        else:
            found.append(_case_from_path(path))
    unique: list[CohortCase] = []
    seen: dict[str, str] = {}
    for case in found:
        key = os.path.realpath(case.ctp) if case.problem is None else f"problem:{id(case)}"
        if key in seen:
            notes.append(f"{case.ctp} is listed twice; it runs once, as {seen[key]}")
            continue
        seen[key] = case.name
        unique.append(case)
    if not unique:
        raise InputError("no cases to run: give CTP files, case folders, a folder of case folders or a CSV list")
    return _unique_names(unique), notes


def _unique_names(cases: list[CohortCase]) -> list[CohortCase]:
    names = [_safe_name(c.name) for c in cases]
    clashes = {n for n in names if names.count(n) > 1}  # a/scan.nii.gz, b/scan.nii.gz: a_scan, b_scan
    names = [_safe_name(f"{c.ctp.parent.name}_{n}") if n in clashes and c.problem is None else n
             for c, n in zip(cases, names)]
    used: set[str] = set()
    out = []
    for case, name in zip(cases, names):
        candidate, n = name, 1
        while candidate in used:  # the first keeps its name, the others are numbered
            n += 1
            candidate = f"{name}_{n}"
        used.add(candidate)
        out.append(CohortCase(candidate, case.ctp, case.mask, case.lesion, case.problem))
    return out


# one cohort run -----------------------------------------------------------------------------------
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


# the two commands --------------------------------------------------------------------------------
def _rounded(value: Any, digits: int = 3) -> Any:
    return round(float(value), digits) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


SYNTHESIS_COLUMNS = ("core_ml", "core_dice", "lesion_ml", "slices_sampled", "device")


def _describe_synthesis(report: dict[str, Any]) -> tuple[dict[str, Any], str]:
    truth = (report.get("core") or {}).get("ground_truth") or {}
    figures = {"core_ml": _rounded(report.get("core_volume_ml")), "core_dice": _rounded(truth.get("dice")),
               "lesion_ml": _rounded(truth.get("true_ml")), "slices_sampled": report.get("slices_sampled"),
               "device": report.get("device")}
    return figures, "; ".join(report.get("notices") or [])


def synthesize_cohort(cases: Sequence[CohortCase], model: Any, out_dir: str | os.PathLike, *,
                      overwrite: bool = False, progress: ProgressCallback | None = None,
                      cancel: CancelToken | None = None, on_case: Callable[[CaseOutcome], None] | None = None,
                      **settings: Any) -> CohortResult:
    """`ctp2mri.synthesis.synthesize.run_synthesize` over ``cases`` into ``OUT/<case>/`` (see `run_cohort`).

    ``model`` (a checkpoint folder, a bundled model's name or a `LoadedModel`) is loaded once;
    ``settings`` are `synthesize`'s (sampler, steps, eta, samples, seed, batch_size, device,
    precision, core_threshold) and are checked before the first case. A case folder's
    ``mask.nii.gz`` is its brain mask and its ``lesion.nii.gz`` scores the core estimate.
    """
    from ctp2mri.synthesis.inference import LoadedModel, load_model, sampler_steps
    from ctp2mri.evaluation.core_estimate import CORE_THRESHOLD
    from ctp2mri.synthesis.synthesize import check_settings, run_synthesize

    device = settings.pop("device", "auto")
    sampler, steps, eta = settings.get("sampler", "dpm++2m"), settings.get("steps", 20), settings.get("eta", 0.0)
    check_settings(steps=steps, eta=eta, samples=settings.get("samples", 1), seed=settings.get("seed", 0),
                   batch_size=settings.get("batch_size"), core_threshold=settings.get("core_threshold", CORE_THRESHOLD))
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device)
    if not isinstance(loaded, LoadedModel):
        raise InputError(f"{model} is a {loaded.kind} baseline checkpoint; synthesis runs a cLDM (from "
                         "`ctp2mri train-ldm` or `post-train`). Score baselines with `ctp2mri evaluate`.")
    sampler_steps(sampler, steps, loaded)
    if sampler != "ddim" and eta != 0:
        raise InputError(f"eta = {eta:g} applies to DDIM only; {sampler} is deterministic (use eta 0, or sampler ddim)")
    recorded = {"model": str(loaded.path or model), "weights": loaded.weights,
                **{k: settings.get(k) for k in ("sampler", "steps", "eta", "samples", "seed", "precision",
                                                 "core_threshold")}}

    def run_case(case: CohortCase, folder: Path, replace: bool) -> None:
        run_synthesize(case.ctp, loaded, folder, mask=case.mask, ground_truth_lesion=case.lesion,
                       overwrite=replace, cancel=cancel, **settings)

    return run_cohort(cases, out_dir, run_case, command="synthesize", settings=recorded,
                      describe=_describe_synthesis, figure_columns=SYNTHESIS_COLUMNS, overwrite=overwrite,
                      progress=progress, cancel=cancel, on_case=on_case)


PERFUSION_COLUMNS = ("core_ml", "hypoperfusion_ml", "mismatch_ml", "mismatch_ratio", "aif_voxels")


def _describe_perfusion(report: dict[str, Any]) -> tuple[dict[str, Any], str]:
    aif = report.get("aif") or {}
    figures = {key: _rounded(report.get(key)) for key in PERFUSION_COLUMNS[:4]}
    figures["aif_voxels"] = aif.get("n_voxels")
    return figures, "; ".join(report.get("notes") or [])


def perfusion_cohort(cases: Sequence[CohortCase], out_dir: str | os.PathLike, *, overwrite: bool = False,
                     figure: bool = True, progress: ProgressCallback | None = None,
                     cancel: CancelToken | None = None, on_case: Callable[[CaseOutcome], None] | None = None,
                     **settings: Any) -> CohortResult:
    """`ctp2mri.perfusion.output.run_perfusion` over ``cases`` into ``OUT/<case>/`` (see `run_cohort`).

    ``settings`` are `run_perfusion`'s (core_rcbf, hypoperfusion_tmax_s, min_island_ml,
    smoothing_mm, method, …), checked before the first case; a case folder's ``mask.nii.gz`` is
    its brain mask.
    """
    from dataclasses import fields

    from ctp2mri.perfusion.analysis import PerfusionSettings
    from ctp2mri.perfusion.output import run_perfusion
    from ctp2mri.perfusion.regions import RegionSettings

    region_keys = {f.name for f in fields(RegionSettings)}
    try:  # bad settings would fail every case alike: refuse them once, before the first
        PerfusionSettings(regions=RegionSettings(**{k: v for k, v in settings.items() if k in region_keys}),
                          **{k: v for k, v in settings.items() if k not in region_keys})
    except TypeError as exc:
        raise InputError(f"unknown perfusion setting: {exc}") from None

    def run_case(case: CohortCase, folder: Path, replace: bool) -> None:
        run_perfusion(case.ctp, folder, mask=case.mask, overwrite=replace, figure=figure, cancel=cancel, **settings)

    return run_cohort(cases, out_dir, run_case, command="perfusion", settings=dict(settings),
                      describe=_describe_perfusion, figure_columns=PERFUSION_COLUMNS, overwrite=overwrite,
                      progress=progress, cancel=cancel, on_case=on_case)
