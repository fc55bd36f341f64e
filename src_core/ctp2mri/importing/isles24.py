"""BIDS stroke datasets (ISLES'24 and the like) → case folders: ``ctp2mri import-isles24`` / ``import-bids``.

Per subject: find its CTP, DWI, ADC and lesion mask by their BIDS names (`ctp2mri.io.bids`),
preferring the requested space (``derivatives``: the ``space-*`` files co-registered to the
NCCT; ``raw``: the native scans) and taking a role missing there from the other; bring the MRI
into the CTP's world (`ctp2mri.importing.placement`: rigid registration where it is not already there);
then `ctp2mri.preprocessing.preprocess.preprocess_case` derives the brain mask from the CTP, resamples
everything once onto the profile's model grid and the CTP to 15 frames, and writes the case
folder atomically with ``case.json`` → ``import`` (sources, registration and its error estimate,
time between the scans, what the lesion means). A finished subject is skipped on a rerun; a
subject that fails is reported with its reason and the others go on. ``splits.json`` and
``import_summary.csv`` are written at the end.

**The lesion is the final infarct.** ISLES'24's DWI, ADC and lesion mask come from the
follow-up MRI 2–9 days after the CTP: the infarct as it ended up, after treatment, not the
acute core on a DWI taken within the hour of the CTP that the paper trained on.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ctp2mri.casefolder import CASE_INFO, is_case_folder
from ctp2mri.errors import Cancelled, InputError, OutputWriteError, user_message
from ctp2mri.io import load_volume
from ctp2mri.io.atomic import atomic_path, claim_output, ensure_writable_dir
from ctp2mri.io.bids import BidsFile, acquisition_time, bval_beside, find_subjects, sidecar, trace_and_adc
from ctp2mri.io.jsonfile import strict_json
from ctp2mri.io.volume import Volume
from ctp2mri.profiles import Profile
from ctp2mri.progress import CancelToken, ProgressCallback
from ctp2mri.preprocessing.resample import as_profile

SPACES = ("derivatives", "raw")
SPLITS_FILE = "splits.json"
SUMMARY_CSV = "import_summary.csv"
LESION_MEANING = (
    "FINAL infarct: the lesion mask, DWI and ADC come from the follow-up MRI (ISLES'24: 2-9 days after the "
    "CTP), not the acute infarct core on a DWI taken within the hour of the CTP as in the paper's data; a model "
    "trained on these cases learns the follow-up DWI/ADC, and its core estimate is a final-infarct estimate")
ACUTE_MEANING = (
    "acute lesion: the DWI/ADC and lesion mask are from the CTP's own session (or less than a day after it), "
    "the pairing the paper's method was designed for if the MRI was taken within hours of the CTP")
COLUMNS = ("case", "status", "lesion_ml", "frames", "frame_interval_s", "spacing_mm", "registration_error_mm",
           "days_between_scans", "seconds", "reason")
_WHAT = {"ctp": "CTP (*_ctp.nii[.gz])", "dwi": "DWI (*_dwi or *_trace.nii[.gz])", "adc": "ADC (*_adc.nii[.gz])",
         "lesion": "lesion mask (*_lesion-msk, *_msk, *_label-lesion_mask.nii[.gz])"}
_SPLIT_SHARES = (("test", 0.15, 3), ("val", 0.15, 4))  # as the phantom: ~70/15/15, val/test from 4/3 cases


@dataclass
class ImportReport:
    rows: list[dict[str, Any]]
    summary_csv: Path
    splits: Path

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] == "failed"]


# choosing the files -------------------------------------------------------------------------------
def _in_space(f: BidsFile, space: str) -> bool:
    return f.space is not None if space == "derivatives" else f.space is None


def _pick(files: list[BidsFile], role: str, space: str) -> BidsFile | None:
    candidates = [f for f in files if f.role == role]
    if role == "ctp" and space == "raw":  # a derivatives CTP is a fallback, never a rival
        candidates = [f for f in candidates if not f.derivative] or candidates
    pick = [f for f in candidates if _in_space(f, space)] or candidates
    if len(pick) > 1:
        pick = [f for f in pick if f.derivative == (space == "derivatives")] or pick
    if len(pick) > 1:  # the same image as .nii and .nii.gz
        stems = {f.path.name.lower().removesuffix(".gz") for f in pick}
        if len(stems) == 1:
            pick = [f for f in pick if f.path.name.lower().endswith(".gz")]
    if len(pick) > 1:
        raise InputError(f"{len(pick)} files could be its {_WHAT[role].split(' (')[0]}: "
                         f"{', '.join(f.path.name for f in pick)}; keep one in the dataset (move the others aside)")
    return pick[0] if pick else None


def select_files(files: list[BidsFile], space: str) -> dict[str, BidsFile]:
    """CTP, DWI, lesion mask and (when there is one) ADC of one subject; `InputError` naming what is
    missing or ambiguous."""
    if space not in SPACES:
        raise InputError(f"unknown space {space!r}; choose one of {SPACES}")
    chosen = {role: f for role in _WHAT if (f := _pick(files, role, space)) is not None}
    missing = [role for role in ("ctp", "dwi", "lesion") if role not in chosen]
    if "adc" not in chosen and "dwi" in chosen and not bval_beside(chosen["dwi"].path):
        missing.append("adc")  # (a diffusion series with its .bval gives one)
    if missing:
        raise InputError("no " + " and no ".join(_WHAT[r] for r in missing) + " found")
    return chosen


# loading ------------------------------------------------------------------------------------------
def _load_ctp(f: BidsFile) -> tuple[Volume, str | None]:
    ctp = load_volume(f.path).require_4d(f"CTP {f.path.name}")
    if not ctp.meta.get("frame_times_assumed"):
        return ctp, "NIfTI header"
    side = sidecar(f.path)
    starts, tr = side.get("FrameTimesStart"), side.get("RepetitionTime")
    if isinstance(starts, list) and len(starts) == ctp.n_frames and all(isinstance(v, (int, float)) for v in starts):
        times = np.asarray(starts, dtype=np.float64)
    elif isinstance(tr, (int, float)) and tr > 0:
        times = float(tr) * np.arange(ctp.n_frames)
    else:
        return ctp, None
    if np.all(np.diff(times) > 0):
        ctp.frame_times = times
        ctp.meta.pop("frame_times_assumed", None)
        return ctp, "sidecar JSON"
    return ctp, None


def _adc_units(adc: Volume) -> tuple[Volume, str | None]:
    """ADC in 10⁻⁶ mm²/s, the contract's unit (a scanner may write mm²/s or 10⁻³ mm²/s)."""
    values = np.asarray(adc.array)[np.asarray(adc.array) > 0]
    typical = float(np.median(values)) if values.size else 0.0
    for limit, factor, unit in ((0.05, 1e6, "mm²/s"), (20.0, 1e3, "10⁻³ mm²/s")):
        if 0 < typical < limit:
            return (adc.with_array(np.asarray(adc.array, dtype=np.float32) * np.float32(factor)),
                    f"the ADC was in {unit} (median {typical:.4g}); scaled ×{factor:g} to 10⁻⁶ mm²/s")
    return adc, None


def _when(chosen: BidsFile, files: list[BidsFile]) -> tuple[Any, str | None]:
    """Acquisition time of a file, else of another file of its role and session (a derivative's raw scan)."""
    kin = [f for f in files if f.role == chosen.role and f.session == chosen.session and f != chosen]
    for f in [chosen, *sorted(kin, key=lambda f: f.derivative)]:
        when, source = acquisition_time(f)
        if when is not None:
            return when, source
    return None, None


def _days_between(ctp: BidsFile, dwi: BidsFile, files: list[BidsFile]) -> dict[str, Any]:
    (t_ctp, src_ctp), (t_dwi, src_dwi) = _when(ctp, files), _when(dwi, files)
    days = None if t_ctp is None or t_dwi is None else round((t_dwi - t_ctp).total_seconds() / 86400.0, 3)
    return {"ctp": t_ctp.isoformat() if t_ctp else None, "dwi": t_dwi.isoformat() if t_dwi else None,
            "days": days, "source": src_ctp if days is not None and src_ctp == src_dwi else
            (f"{src_ctp} / {src_dwi}" if days is not None else None)}


# one subject --------------------------------------------------------------------------------------
def import_subject(subject: str, files: list[BidsFile], folder: Path, root: Path, prof: Profile, space: str,
                   register: str, n_frames: int, overwrite: bool, cancel: CancelToken | None = None
                   ) -> dict[str, Any]:
    """Import one subject into ``folder``; returns its summary row (`COLUMNS`)."""
    from ctp2mri import __version__
    from ctp2mri.importing.placement import place_on_ctp
    from ctp2mri.preprocessing.preprocess import preprocess_case

    chosen = select_files(files, space)
    notices: list[str] = []
    ctp, times_from = _load_ctp(chosen["ctp"])
    dwi, derived_adc = trace_and_adc(load_volume(chosen["dwi"].path).require_finite("DWI"), chosen["dwi"].path)
    mri = {"dwi": (chosen["dwi"], dwi.require_3d(f"DWI {chosen['dwi'].path.name}"))}
    if "adc" in chosen:
        adc, note = _adc_units(load_volume(chosen["adc"].path).require_3d(f"ADC {chosen['adc'].path.name}"))
        mri["adc"] = (chosen["adc"], adc)
        notices += [note] if note else []
    elif derived_adc is not None:
        mri["adc"] = (chosen["dwi"], derived_adc)
        notices.append(f"no ADC file: the ADC was computed from {chosen['dwi'].path.name} (b = 0 and b ≈ 1000)")
    else:
        raise InputError(f"no {_WHAT['adc']} found, and {chosen['dwi'].path.name} has no b = 0 volume to compute it")
    lesion = load_volume(chosen["lesion"].path).require_3d(f"lesion {chosen['lesion'].path.name}")
    lesion = lesion.require_finite("lesion").with_array((np.asarray(lesion.array) > 0.5).astype(np.uint8))
    mri["lesion"] = (chosen["lesion"], lesion)
    lesion_ml = float(lesion.array.sum() * np.prod(lesion.spacing) / 1000.0)

    def load_anchor(f: BidsFile) -> Volume:
        return trace_and_adc(load_volume(f.path), f.path)[0].require_3d(f.path.name)

    placed, registration = place_on_ctp(ctp, chosen["ctp"], mri, files, register, load_anchor, cancel)
    errors = [v["error_estimate_mm"]["mean"] for v in registration.values() if isinstance(v, dict)]
    interval = float(np.median(np.diff(ctp.frame_times))) if ctp.frame_times is not None else None
    scans = _days_between(chosen["ctp"], chosen["dwi"], files)
    if interval is not None:
        interval = round(interval, 3) if times_from else f"{interval:g} (assumed)"
    sessions = chosen["ctp"].session, chosen["dwi"].session
    if scans["days"] is not None:
        acute = scans["days"] < 1.0
    else:  # no times: the same BIDS session means the same visit
        acute = None not in sessions and sessions[0] == sessions[1]
    summary = {"lesion_ml": round(lesion_ml, 2), "frames": f"{ctp.n_frames}→{n_frames}",
               "frame_interval_s": interval,
               "spacing_mm": "×".join(f"{s:.3g}" for s in ctp.spacing),
               "registration_error_mm": round(max(errors), 3) if errors else "none",
               "days_between_scans": scans["days"]}
    info = {"import": {
        "importer": "ctp2mri import-isles24 / import-bids", "ctp2mri_version": __version__,
        "subject": subject, "dataset_root": os.path.abspath(root), "space": space, "register": register,
        "sources": {role: {"path": os.path.relpath(f.path, root), "space": f.space or "native",
                           "session": f.session, "derivative": f.derivative} for role, f in chosen.items()},
        "lesion_meaning": ACUTE_MEANING if acute else LESION_MEANING,
        "mri_timepoint": "acute (the CTP's session)" if acute else "follow-up",
        "lesion_ml_source": round(lesion_ml, 3), "frame_times_from": times_from,
        "time_between_scans": scans, "registration": registration, "summary": summary, "notices": notices,
    }}
    preprocess_case(ctp, folder, prof, dwi=placed["dwi"], adc=placed["adc"], lesion=placed["lesion"],
                    n_frames=n_frames, overwrite=overwrite, cancel=cancel, extra_info=info)
    return {"case": folder.name, "status": "imported", **summary, "reason": ""}


def _finished(folder: Path) -> dict[str, Any] | None:
    """``case.json``'s ``import`` record of a case this importer finished, else None."""
    if not is_case_folder(folder):
        return None
    try:
        info = json.loads((folder / CASE_INFO).read_text())
    except (OSError, ValueError):
        return None
    record = info.get("import") if isinstance(info, dict) else None
    if not isinstance(record, dict) or "summary" not in record:
        return None
    return {**record, "profile": (info.get("preprocess") or {}).get("profile")}


# the dataset --------------------------------------------------------------------------------------
def import_dataset(root: str | os.PathLike, out: str | os.PathLike, profile: str | Profile = "paper",
                   space: str = "derivatives", register: str = "auto", subjects: list[str] | None = None,
                   n_frames: int = 15, overwrite: bool = False, progress: ProgressCallback | None = None,
                   cancel: CancelToken | None = None,
                   on_subject: Callable[[dict[str, Any]], None] | None = None) -> ImportReport:
    """Import every subject of a BIDS stroke dataset under ``root`` into case folders in ``out``.

    Returns the summary rows (one per subject: imported, done earlier or failed with its reason),
    and the paths of ``import_summary.csv`` and ``splits.json`` (both over every finished case in
    ``out``). ``on_subject`` gets each row as soon as its subject is done.
    """
    root, out, prof = Path(root), Path(out), as_profile(profile)
    if space not in SPACES:
        raise InputError(f"unknown space {space!r}; choose one of {SPACES}")
    found = find_subjects(root)
    if not found:
        raise InputError(f"no BIDS subjects found under {root}: expected sub-*/ folders with NIfTI files such as "
                         "sub-stroke0001_ses-01_ctp.nii.gz (in rawdata/, raw_data/ or derivatives/)")
    if subjects:
        wanted = [s if s.lower().startswith("sub-") else f"sub-{s}" for s in subjects]
        unknown = [s for s in wanted if s.lower() not in found]
        if unknown:
            raise InputError(f"no subject {', '.join(unknown)} under {root} (it has {', '.join(list(found)[:5])}"
                             f"{', …' if len(found) > 5 else ''})")
        found = {s.lower(): found[s.lower()] for s in wanted}
    rows: list[dict[str, Any]] = []
    with claim_output(out):
        ensure_writable_dir(out)
        for n, (subject, files) in enumerate(found.items()):
            if cancel is not None:
                cancel.raise_if_cancelled()
            folder = out / subject
            start = time.perf_counter()
            done = None if overwrite else _finished(folder)
            if done is not None and done.get("profile") not in (None, prof.name):
                row = {"case": subject, "status": "failed", "reason": f"{folder} was imported with profile "
                       f"{done['profile']}; pass --overwrite or another --out to import it with {prof.name}"}
            elif done is not None:
                row = {"case": subject, "status": "done earlier", **done["summary"], "reason": ""}
            else:
                try:
                    row = import_subject(subject, files, folder, root, prof, space, register, n_frames,
                                         overwrite, cancel)
                except (Cancelled, KeyboardInterrupt, OutputWriteError):
                    raise
                except Exception as exc:  # noqa: BLE001 - one bad subject must not stop the others
                    reason = user_message(exc) or f"unexpected {type(exc).__name__}: {exc} (please report this)"
                    row = {"case": subject, "status": "failed", "reason": reason}
            row["seconds"] = round(time.perf_counter() - start, 1)
            rows.append(row)
            if on_subject is not None:
                on_subject(row)
            if progress is not None:
                progress(n + 1, len(found), {"subject": subject, "status": row["status"]})
        finished = sorted(p.name for p in out.iterdir() if p.is_dir() and _finished(p) is not None)
        splits = _write_splits(out, finished)
        summary = _write_summary(out, rows)
    return ImportReport(rows, summary, splits)


def _split_of_new(names: list[str], taken: dict[str, str]) -> dict[str, str]:
    """Splits for cases not yet in ``splits.json``: by a hash of the name (stable across reruns)."""
    order = sorted(names, key=lambda n: hashlib.sha1(n.encode()).hexdigest())
    assigned: dict[str, str] = {}
    n = len(order)
    if not taken:  # a new dataset: exact shares, as the phantom's splits
        cut = 0
        for split, share, minimum in _SPLIT_SHARES:
            k = max(1, int(np.floor(share * n + 0.5))) if n >= minimum else 0
            assigned.update({name: split for name in order[cut:cut + k]})
            cut += k
        return {name: assigned.get(name, "train") for name in order}
    for name in order:
        u = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) / 16**8
        assigned[name] = "test" if u < 0.15 else "val" if u < 0.30 else "train"
    return assigned


def _write_splits(out: Path, names: list[str]) -> Path:
    path = out / SPLITS_FILE
    taken: dict[str, str] = {}
    try:
        old = json.loads(path.read_text())
        taken = {n: s for s in ("train", "val", "test") for n in old.get(s, []) if n in names}
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    split_of = {**_split_of_new([n for n in names if n not in taken], taken), **taken}
    data = {s: sorted(n for n in names if split_of[n] == s) for s in ("train", "val", "test")}
    data["note"] = ("written by ctp2mri import; cases keep their split on a rerun, new cases are placed by a hash "
                    "of their name. What the lesion masks mean: each case.json's import.lesion_meaning (ISLES'24: "
                    "the FINAL infarct on the follow-up MRI, not the acute core)")
    with atomic_path(path) as tmp:
        tmp.write_text(strict_json(data))
    return path


def _write_summary(out: Path, rows: list[dict[str, Any]]) -> Path:
    path = out / SUMMARY_CSV
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in COLUMNS})
    return path


def format_summary(rows: list[dict[str, Any]]) -> str:
    """The summary as an aligned text table (the failed subjects' reasons below it)."""
    heads = ("case", "status", "lesion ml", "frames", "interval s", "spacing mm", "reg. err mm", "days", "s")
    keys = COLUMNS[:-1]
    cells = [[("" if r.get(k) is None else str(r.get(k))) for k in keys] for r in rows if r["status"] != "failed"]
    cells += [[r["case"], "failed"] + [""] * (len(keys) - 3) + [str(r.get("seconds", ""))]
              for r in rows if r["status"] == "failed"]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    lines += [f"{r['case']}: {r['reason']}" for r in rows if r["status"] == "failed"]
    return "\n".join(line.rstrip() for line in lines)
