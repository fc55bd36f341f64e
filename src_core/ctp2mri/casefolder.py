"""The case-folder contract (docs/contracts.md): one folder per patient, five NIfTI files on one grid.

``ctp.nii.gz`` (4-D x·y·z·t, HU), ``dwi.nii.gz``, ``adc.nii.gz`` (10⁻⁶ mm²/s),
``lesion.nii.gz`` (uint8), ``mask.nii.gz`` (uint8 brain mask), optional ``case.json``.
These are the names the paper's official code reads.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ctp2mri.errors import InputError
from ctp2mri.io.atomic import atomic_dir
from ctp2mri.io.jsonfile import json_ready
from ctp2mri.io.nifti import load_nifti, save_nifti
from ctp2mri.io.volume import Volume

CASE_FILES: dict[str, str] = {
    "ctp": "ctp.nii.gz",
    "dwi": "dwi.nii.gz",
    "adc": "adc.nii.gz",
    "lesion": "lesion.nii.gz",
    "mask": "mask.nii.gz",
}
CASE_INFO = "case.json"
TRUTH_DIR = "truth"  # ground-truth maps of a simulated case (phantom); never a model input
_MASKS = ("lesion", "mask")
# On-disk types: CTP as integer HU like a scanner writes it, masks as uint8.
_DTYPES = {"ctp": np.int16, "dwi": np.float32, "adc": np.float32, "lesion": np.uint8, "mask": np.uint8}


@dataclass
class Case:
    """One patient: CTP and, when known, DWI, ADC, lesion (core) and brain masks."""

    ctp: Volume
    dwi: Volume | None = None
    adc: Volume | None = None
    lesion: Volume | None = None
    mask: Volume | None = None
    info: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    truth: dict[str, Volume] = field(default_factory=dict)  # written to truth/<name>.nii.gz

    def volumes(self) -> dict[str, Volume]:
        """The present volumes by contract name."""
        return {k: v for k in CASE_FILES if (v := getattr(self, k)) is not None}

    def validate(self) -> "Case":
        """Check the contract: 4-D finite CTP, finite 3-D images, binary masks, one grid."""
        where = f" in {self.path}" if self.path else ""
        self.ctp.require_4d(f"ctp{where}").require_finite(f"ctp{where}")
        for name, vol in self.volumes().items():
            if name == "ctp":
                continue
            label = f"{name}{where}"
            vol.require_3d(label).require_finite(label)
            vol.require_same_grid(self.ctp, label, f"ctp{where}")
            if name in _MASKS:
                values = np.unique(vol.array)
                if not np.isin(values, (0, 1)).all():
                    raise InputError(
                        f"{label} must be binary (0/1) but holds values {values[:8].tolist()}; "
                        "threshold or relabel it"
                    )
        if self.mask is not None and not self.mask.array.any():
            raise InputError(
                f"the brain mask{where} is empty (all zero); recompute it "
                "(ctp2mri preprocess derives one from the CTP)"
            )
        return self


def is_case_folder(path: str | os.PathLike) -> bool:
    """True for a folder holding at least ``ctp.nii.gz``."""
    path = Path(path)
    return path.is_dir() and (path / CASE_FILES["ctp"]).is_file()


def read_case(folder: str | os.PathLike, require: Iterable[str] = ("ctp",)) -> Case:
    """Load a case folder and validate it.

    Parameters
    ----------
    folder
        The case folder.
    require
        Contract names that must be present (e.g. ``("ctp", "dwi", "adc", "mask")`` for
        training); a missing one raises `InputError` naming the file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"case folder {folder} does not exist")
    volumes: dict[str, Volume] = {}
    for name, filename in CASE_FILES.items():
        path = folder / filename
        if path.is_file():
            volumes[name] = load_nifti(path)
        elif name in require:
            raise InputError(f"case {folder.name} has no {filename}; it is required here")
    info: dict[str, Any] = {}
    if (folder / CASE_INFO).is_file():
        try:
            info = json.loads((folder / CASE_INFO).read_text())
        except json.JSONDecodeError as exc:
            raise InputError(f"{folder / CASE_INFO} is not valid JSON ({exc})") from None
    return Case(**volumes, info=info, path=folder).validate()


def write_case(case: Case, folder: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a case folder atomically (all files appear together, or none)."""
    case.validate()
    folder = Path(folder)
    needed = sum(v.array.size * np.dtype(_DTYPES[n]).itemsize for n, v in case.volumes().items())  # before gzip
    with atomic_dir(folder, overwrite=overwrite, needed_bytes=needed) as tmp:
        for name, vol in case.volumes().items():
            array = vol.array
            if name == "ctp" and not np.issubdtype(array.dtype, np.integer):
                array = np.clip(np.rint(array), -32768, 32767)
            save_nifti(vol.with_array(array), tmp / CASE_FILES[name], dtype=_DTYPES[name])
        if case.info:
            # strict JSON: a NaN in the info is written as null, never as a bare NaN token
            (tmp / CASE_INFO).write_text(json.dumps(json_ready(case.info), indent=2, allow_nan=False,
                                                    default=_json_default))
        if case.truth:
            (tmp / TRUTH_DIR).mkdir()
            for name, vol in case.truth.items():
                dtype = np.uint8 if np.issubdtype(vol.array.dtype, np.integer) else np.float32
                save_nifti(vol, tmp / TRUTH_DIR / f"{name}.nii.gz", dtype=dtype)
    return folder


def read_truth(folder: str | os.PathLike, names: Iterable[str] | None = None) -> dict[str, Volume]:
    """The ground-truth maps in a case folder's truth/ (a phantom case's CBF, CBV, MTT, Tmax,
    vessels), by name; empty when the case has none (a scanner's case, an older phantom)."""
    root = Path(folder) / TRUTH_DIR
    if not root.is_dir():
        return {}
    found = {p.name[: -len(".nii.gz")]: p for p in sorted(root.glob("*.nii.gz"))}
    wanted = found if names is None else {n: found[n] for n in names if n in found}
    return {name: load_nifti(path) for name, path in wanted.items()}


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot store {type(obj).__name__} in case.json")
