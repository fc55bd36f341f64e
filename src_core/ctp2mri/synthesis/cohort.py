"""Cohorts: ``ctp2mri synthesize`` and ``ctp2mri perfusion`` over many cases in one run.

The inputs (`collect_cases`) are any mix of

* CTP paths (4-D NIfTI/NRRD/MHA files or DICOM series folders), one case each;
* case folders (docs/contracts.md): the case's ``ctp.nii.gz`` with its ``mask.nii.gz`` (and, for
  synthesis, ``lesion.nii.gz`` to score the core against) when present;
* a folder of case folders (e.g. ``ctp2mri phantom --out DIR``): every case folder in it;
* a CSV file with a column of paths named ``ctp`` (or ``path``, ``input``), optional ``case``
  (the output folder's name), ``mask`` and ``lesion`` columns; relative paths are read from
  the CSV's folder. A CSV of one unnamed column is a plain list of paths.

`synthesize_cohort` and `perfusion_cohort` are the two commands' cohorts (the CLI and the napari
synthesis widget call them), run by `ctp2mri.synthesis.cohort_runner.run_cohort`: resumable, one
folder per case, ``OUT/summary.csv``. The module holds no Qt and no printing.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctp2mri.casefolder import CASE_FILES, is_case_folder
from ctp2mri.checks import settings_with
from ctp2mri.errors import InputError
from ctp2mri.progress import CancelToken, ProgressCallback
from ctp2mri.synthesis.cohort_runner import (
    ERRORS_FILE,
    SETTINGS_FILE,
    SUMMARY_FILE,
    CaseOutcome,
    CohortResult,
    run_cohort,
)
from ctp2mri.synthesis.sample_settings import SampleSettings

__all__ = ["CohortCase", "collect_cases", "is_cohort", "perfusion_cohort", "synthesize_cohort"]

_RESERVED = {SUMMARY_FILE, SETTINGS_FILE, ERRORS_FILE}  # the cohort's own files: no case is named so
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


def synthesize_cohort(cases: Sequence[CohortCase], model: Any, out_dir: str | os.PathLike,
                      settings: SampleSettings | None = None, *, device: str = "auto", overwrite: bool = False,
                      progress: ProgressCallback | None = None, cancel: CancelToken | None = None,
                      on_case: Callable[[CaseOutcome], None] | None = None, **options: Any) -> CohortResult:
    """`ctp2mri.synthesis.synthesize.run_synthesize` over ``cases`` into ``OUT/<case>/`` (see `run_cohort`).

    ``model`` (a checkpoint folder, a bundled model's name or a `LoadedModel`) is loaded once,
    onto ``device``; ``settings`` and/or ``options`` (its fields as keywords, which replace the
    settings' own) are `synthesize`'s `SampleSettings`, checked before the first case. A case
    folder's ``mask.nii.gz`` is its brain mask and its ``lesion.nii.gz`` scores the core estimate.
    """
    from ctp2mri.synthesis.synthesize import run_synthesize
    from ctp2mri.synthesis.inference import sampler_steps
    from ctp2mri.synthesis.loading import synthesis_model

    opts = settings_with(SampleSettings, settings, options, "synthesize_cohort")
    loaded = synthesis_model(model, device, opts.use_ema)
    sampler_steps(opts.sampler, opts.n_steps, loaded)  # steps beyond the schedule would fail every case
    recorded = {"model": str(loaded.path or model), "weights": loaded.weights, **opts.recorded()}

    def run_case(case: CohortCase, folder: Path, replace: bool) -> None:
        run_synthesize(case.ctp, loaded, folder, opts, mask=case.mask, ground_truth_lesion=case.lesion,
                       overwrite=replace, cancel=cancel)

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
