"""BIDS-style stroke datasets (ISLES'22/'24 and the like): which file is which, by its name.

A file name is read as BIDS entities and a suffix, ``sub-<label>[_ses-<label>][_<key>-<value>…]_<suffix>``
with ``.nii`` or ``.nii.gz``, case-insensitively; the last ``_``-separated token is the suffix
even when it holds a hyphen (ISLES'24's ``lesion-msk``). Nothing depends on the spelling of a
label, so ``sub-stroke0001`` and ``sub-strokecase0001``, ``ses-01`` and ``ses-0001`` are alike,
and files may sit directly in the session folder or in ``ct/``, ``perfusion-maps/``, ``dwi/``,
``anat/``. A file's *space* is its ``space-`` entity (``space-ncct``: co-registered to the
admission NCCT) or None (native: the scanner's own coordinates). `ROLE_SUFFIXES` lists the
accepted suffixes; a lesion mask is also any ``mask``/``msk``/``dseg``/``seg`` file whose
``label-``/``desc-`` entity (or a word before the suffix) says lesion, infarct, stroke or core.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ctp2mri.errors import InputError
from ctp2mri.io.volume import Volume

__all__ = ["BidsFile", "ROLE_SUFFIXES", "acquisition_time", "bval_beside", "find_subjects", "looks_like_subject",
           "parse_name", "role_of", "sidecar", "subject_files", "trace_and_adc"]

NIFTI_EXTENSIONS = (".nii.gz", ".nii")
ENTITY_KEYS = {"sub", "ses", "task", "acq", "ce", "rec", "dir", "run", "mod", "echo", "space", "desc", "label",
               "res", "den", "trc", "hemi", "from", "to", "split", "chunk", "inv", "part", "mt", "flip"}
#: role → accepted suffixes (lower case)
ROLE_SUFFIXES: dict[str, tuple[str, ...]] = {
    "ctp": ("ctp", "pct", "ctperf"),
    "dwi": ("dwi", "trace", "tracew"),
    "adc": ("adc",),
    "lesion": ("lesion-msk", "lesionmsk", "lesion-mask", "lesion", "infarct", "msk"),
    "cbf": ("cbf",), "cbv": ("cbv",), "mtt": ("mtt",), "tmax": ("tmax",), "ttp": ("ttp",),
    "ncct": ("ncct", "ct"),
    "cta": ("cta",),
}
PERFUSION_MAPS = ("cbf", "cbv", "mtt", "tmax", "ttp")
_MASK_SUFFIXES = ("mask", "msk", "dseg", "seg", "label", "labels", "roi")
_LESION_WORDS = ("lesion", "infarct", "stroke", "core")
_SKIPPED_DIRS = {"sourcedata", "code", ".git", ".datalad"}
_MAX_DEPTH = 6  # ROOT/derivatives/pipeline/sub-X/ses-Y/dwi/file


@dataclass(frozen=True)
class BidsName:
    entities: dict[str, str]
    words: tuple[str, ...]  # tokens that are neither entities nor the suffix
    suffix: str
    extension: str


def parse_name(name: str) -> BidsName | None:
    """Entities, loose words and suffix of a NIfTI file name (lower case), or None for another file."""
    low = name.lower()
    ext = next((e for e in NIFTI_EXTENSIONS if low.endswith(e)), None)
    if ext is None or low.startswith("."):
        return None
    tokens = [t for t in low[: -len(ext)].split("_") if t]
    if not tokens:
        return None
    entities: dict[str, str] = {}
    words = []
    for token in tokens[:-1]:
        key, sep, value = token.partition("-")
        if sep and key in ENTITY_KEYS and value:
            entities[key] = value
        else:
            words.append(token)
    return BidsName(entities, tuple(words), tokens[-1], ext)


def role_of(parsed: BidsName) -> str | None:
    """What a file holds: a `ROLE_SUFFIXES` key, ``"labels"`` (another mask) or None (unknown)."""
    suffix = parsed.suffix
    tags = {parsed.entities.get("label", ""), parsed.entities.get("desc", ""), *parsed.words}
    if suffix in _MASK_SUFFIXES or suffix.endswith(("-msk", "-mask")):
        if any(w in t for t in tags for w in _LESION_WORDS) or suffix.split("-")[0] in _LESION_WORDS:
            return "lesion"
        if suffix == "msk" and not tags - {""}:
            return "lesion"  # ISLES'22: sub-strokecase0001_ses-0001_msk.nii.gz
        return "labels"
    for role, suffixes in ROLE_SUFFIXES.items():
        if suffix in suffixes:
            return role
    return None


@dataclass(frozen=True)
class BidsFile:
    """One NIfTI file of a subject, with what its name and place say about it."""

    path: Path
    role: str | None
    subject: str  # "sub-stroke0001"
    session: str | None  # "ses-01"
    space: str | None  # "ncct", or None: native (the scanner's coordinates)
    derivative: bool  # under a derivatives/ folder
    parsed: BidsName = field(repr=False, compare=False, default=None)  # type: ignore[assignment]

    @property
    def where(self) -> str:
        """``ses-02, space-ncct, derivatives``: for layer names and messages."""
        parts = [self.session, f"space-{self.space}" if self.space else None,
                 "derivatives" if self.derivative else None]
        return ", ".join(p for p in parts if p)


def _describe(path: Path, root: Path) -> BidsFile | None:
    parsed = parse_name(path.name)
    if parsed is None:
        return None
    # the folders from the root's parent down: a subject folder opened by itself still names its subject
    parts = [p.lower() for p in (*root.parts[-2:], *path.relative_to(root).parts[:-1])]
    folder_sub = next((p for p in reversed(parts) if p.startswith("sub-")), None)
    folder_ses = next((p for p in reversed(parts) if p.startswith("ses-")), None)
    subject = f"sub-{parsed.entities['sub']}" if "sub" in parsed.entities else folder_sub
    if subject is None:
        return None
    session = f"ses-{parsed.entities['ses']}" if "ses" in parsed.entities else folder_ses
    return BidsFile(path, role_of(parsed), subject, session, parsed.entities.get("space"),
                    "derivatives" in parts, parsed)


def _walk(root: Path):
    root_depth = len(root.parts)
    for here, dirs, files in os.walk(root):
        depth = len(Path(here).parts) - root_depth
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d.lower() not in _SKIPPED_DIRS
                         and depth < _MAX_DEPTH)
        for name in sorted(files):
            yield Path(here) / name


def find_subjects(root: str | os.PathLike) -> dict[str, list[BidsFile]]:
    """Every subject under a dataset root (``rawdata``/``raw_data`` and ``derivatives`` alike) with
    its NIfTI files, by subject label, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root} is not a folder; give the dataset's root (holding rawdata/ or raw_data/ and "
                         "derivatives/, or the sub-* folders)")
    subjects: dict[str, list[BidsFile]] = {}
    for path in _walk(root):
        item = _describe(path, root)
        if item is not None:
            subjects.setdefault(item.subject, []).append(item)
    return dict(sorted(subjects.items()))


def subject_files(folder: str | os.PathLike) -> list[BidsFile]:
    """The NIfTI files in one subject (or session) folder, sorted by path."""
    folder = Path(folder)
    return [f for p in _walk(folder) if (f := _describe(p, folder)) is not None]


def looks_like_subject(folder: Path, limit: int = 200) -> bool:
    """True for a ``sub-*``/``ses-*`` folder holding a NIfTI file whose role is known (cheap)."""
    if not folder.is_dir() or not folder.name.lower().startswith(("sub-", "ses-")):
        return False
    for n, path in enumerate(_walk(folder)):
        if n >= limit:
            return False
        parsed = parse_name(path.name)
        if parsed is not None and role_of(parsed) is not None:
            return True
    return False


# acquisition times ------------------------------------------------------------------------------
def _parse_time(text: object, time: object = None) -> dt.datetime | None:
    if not isinstance(text, str) or not text.strip() or text.strip().lower() == "n/a":
        return None
    s = text.strip().replace("Z", "")
    if isinstance(time, str) and time.strip():
        s = f"{s}T{time.strip()}"
    m = re.fullmatch(r"(\d{4})-?(\d{2})-?(\d{2})(?:[T ](\d{2}):?(\d{2}):?(\d{2})?(?:\.\d+)?)?.*", s)
    if m is None:
        return None
    try:
        return dt.datetime(*(int(v) if v else 0 for v in m.groups()))
    except ValueError:
        return None


def sidecar(path: Path) -> dict:
    """The JSON sidecar beside a NIfTI file (same name, ``.json``), or {} when there is none."""
    name = path.name
    stem = name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else path.stem
    json_path = path.with_name(stem + ".json")
    try:
        data = json.loads(json_path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _tsv_rows(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="") as fh:
            return list(csv.DictReader(fh, delimiter="\t"))
    except (OSError, csv.Error, UnicodeDecodeError):
        return []


def acquisition_time(item: BidsFile) -> tuple[dt.datetime | None, str | None]:
    """When a file was acquired, and where that was read: its JSON sidecar's ``AcquisitionDateTime``
    (or ``AcquisitionDate`` + ``AcquisitionTime``), else ``acq_time`` in ``*_scans.tsv`` beside it or
    in ``*_sessions.tsv`` of its subject; (None, None) when none says."""
    side = sidecar(item.path)
    when = _parse_time(side.get("AcquisitionDateTime")) or _parse_time(side.get("AcquisitionDate"),
                                                                     side.get("AcquisitionTime"))
    if when is not None:
        return when, "sidecar JSON"
    for parent in list(item.path.parents)[:3]:
        for tsv in sorted(parent.glob("*_scans.tsv")):
            for row in _tsv_rows(tsv):
                if Path(row.get("filename", "")).name == item.path.name and (t := _parse_time(row.get("acq_time"))):
                    return t, tsv.name
        if parent.name.lower() == item.subject and item.session:
            for tsv in sorted(parent.glob("*_sessions.tsv")):
                for row in _tsv_rows(tsv):
                    if row.get("session_id", "").lower() == item.session and (t := _parse_time(row.get("acq_time"))):
                        return t, tsv.name
    return None, None


# diffusion series --------------------------------------------------------------------------------
def bval_beside(path: Path) -> Path | None:
    """The ``.bval`` file of a diffusion series, or None."""
    name = path.name
    stem = name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else path.stem
    bval = path.with_name(stem + ".bval")
    return bval if bval.is_file() else None


def _bvals(path: Path) -> np.ndarray | None:
    bval = bval_beside(path)
    try:
        return None if bval is None else np.array(bval.read_text().split(), dtype=np.float64)
    except (OSError, ValueError):
        return None


def trace_and_adc(dwi: Volume, path: Path, b_range: tuple[float, float] = (800.0, 1200.0)
                  ) -> tuple[Volume, Volume | None]:
    """A 3-D b≈1000 trace image from a 4-D diffusion series (the geometric mean over its
    directions, the ``.bval`` beside it saying which volumes), and the ADC (10⁻⁶ mm²/s) from it
    and the b = 0 volumes when there are any. A 3-D image is returned as it is, with no ADC."""
    if not dwi.is_4d:
        return dwi, None
    bvals = _bvals(path)
    if bvals is None or bvals.size != dwi.n_frames:
        raise InputError(f"{path.name} is a 4-D diffusion series ({dwi.n_frames} volumes) without a matching "
                         ".bval file beside it; give the b = 1000 trace image (3-D) or add the .bval")
    high = (bvals >= b_range[0]) & (bvals <= b_range[1])
    if not high.any():
        raise InputError(f"{path.name}: no volume with b = {b_range[0]:g}–{b_range[1]:g} s/mm² "
                         f"(b-values {sorted(set(bvals.round().astype(int).tolist()))}); give the b = 1000 trace")
    data = np.asarray(dwi.array, dtype=np.float32)
    trace = np.exp(np.log(np.maximum(data[..., high], 1e-3)).mean(axis=-1))
    b = float(bvals[high].mean())
    meta = {**dwi.meta, "derived": f"geometric mean of {int(high.sum())} volumes at b ≈ {b:.0f}"}
    adc = None
    low = bvals <= 50
    if low.any():
        b0 = np.maximum(data[..., low].mean(axis=-1), 1e-3)
        values = np.clip(-np.log(np.maximum(trace, 1e-3) / b0) / b * 1e6, 0.0, 5000.0)
        adc = Volume(np.where(data[..., low].mean(axis=-1) > 0, values, 0.0).astype(np.float32), dwi.affine,
                     meta={"source": dwi.meta.get("source"), "derived": f"ADC from b = 0 and b ≈ {b:.0f}"})
    return Volume(trace.astype(np.float32), dwi.affine, meta=meta), adc
