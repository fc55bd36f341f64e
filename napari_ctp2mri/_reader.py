"""npe2 reader: NIfTI, NRRD, MHA files, DICOM series folders, case folders and BIDS subject folders.

A 4-D CT perfusion series opens with time as napari's first axis (a time slider); a case
folder opens as the layers "CTP", "DWI", "ADC", "brain mask" and "lesion"; a BIDS subject (or
session) folder such as ISLES'24's ``derivatives/sub-stroke0001`` opens every NIfTI in it whose
name says what it is (`ctp2mri.io.bids`) as a named layer on its own geometry: CTP, NCCT, CTA,
the perfusion maps, DWI, ADC, the lesion and other masks. Geometry follows
the convention of `napari_ctp2mri._layers`. Bad input raises the core's `InputError`, whose
message napari shows to the user.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from ctp2mri.casefolder import CASE_FILES, is_case_folder, read_case
from ctp2mri.errors import InputError
from ctp2mri.io import ITK_SUFFIXES, NIFTI_SUFFIXES, load_volume
from ctp2mri.io.bids import PERFUSION_MAPS, looks_like_subject, subject_files
from napari_ctp2mri._layers import LayerData, case_to_layer_data, volume_to_layer_data

FILE_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
_LABEL_HINTS = ("mask", "lesion", "seg", "label")
_DICOM_PROBE_FILES = 64  # enough to find an image file among DICOMDIR/README clutter
# BIDS roles in the order their layers are added (the last on top): (role, layer name, display role)
_BIDS_LAYERS = (("ctp", "CTP", "ctp"), ("ncct", "NCCT", "ct"), ("cta", "CTA", None),
                *((m, "Tmax" if m == "tmax" else m.upper(), None) for m in PERFUSION_MAPS),
                ("dwi", "DWI", "dwi"), ("adc", "ADC", "adc"), ("labels", None, "labels"),
                ("lesion", "lesion", "lesion"))

ReaderFunction = Callable[[str | list[str]], list[LayerData]]


def get_reader(path: str | list[str]) -> ReaderFunction | None:
    """Return `read_paths` if every path is something this plugin reads, else None.

    napari calls this for each candidate plugin; None lets another plugin try the path.
    """
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if paths and all(_readable(Path(p)) for p in paths):
        return read_paths
    return None


def read_paths(path: str | list[str]) -> list[LayerData]:
    """Read one path or several into napari layer data tuples."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    layers: list[LayerData] = []
    for p in paths:
        layers.extend(read_path(p))
    return layers


def read_path(path: str | os.PathLike) -> list[LayerData]:
    """Layer data for one file, DICOM series folder or case folder."""
    path = Path(path)
    if is_case_folder(path):
        return case_to_layer_data(read_case(path))
    if looks_like_subject(path):
        return bids_subject_layer_data(path)
    volume = load_volume(path)
    name = _stem(path)
    data, kwargs, layer_type = volume_to_layer_data(volume, name, _guess_role(name, volume))
    # A case hides its targets and brain mask at first; a file opened alone is what the
    # user wants to see.
    kwargs.pop("visible", None)
    return [(data, kwargs, layer_type)]


def bids_subject_layer_data(folder: Path) -> list[LayerData]:
    """Every NIfTI of a BIDS subject/session folder whose role is known, as named layers on its
    own geometry (no resampling: native scans of different scanners need not overlap). A name
    shared by several files gets their session/space, e.g. "DWI (ses-02, space-ncct)"."""
    order = {role: n for n, (role, _, _) in enumerate(_BIDS_LAYERS)}
    files = sorted((f for f in subject_files(folder) if f.role in order), key=lambda f: (order[f.role], str(f.path)))
    if not files:
        raise InputError(f"{folder} holds no NIfTI file named like a CTP, DWI, ADC, lesion mask or perfusion map")
    spec = {role: (name, style) for role, name, style in _BIDS_LAYERS}
    names = [spec[f.role][0] or f.parsed.suffix for f in files]
    for n, f in enumerate(files):
        if names.count(names[n]) > 1 and f.where:
            names[n] = f"{names[n]} ({f.where})"
    layers = []
    for f, name in zip(files, names):
        if names.count(name) > 1:
            name = _stem(f.path)
        data, kwargs, layer_type = volume_to_layer_data(load_volume(f.path), name, spec[f.role][1])
        if f.role in PERFUSION_MAPS:
            kwargs["colormap"] = "turbo"
        layers.append((data, kwargs, layer_type))
    return layers


# helpers ---------------------------------------------------------------------------------------
def _readable(path: Path) -> bool:
    if path.is_dir():
        return is_case_folder(path) or looks_like_subject(path) or _looks_like_dicom(path)
    return path.name.lower().endswith(FILE_SUFFIXES)


def _looks_like_dicom(folder: Path) -> bool:
    """True if one of the folder's first files is DICOM (``DICM`` after the preamble).

    Cheap on purpose: napari asks every reader about every folder it opens.
    """
    try:
        entries = sorted(folder.iterdir())[:_DICOM_PROBE_FILES]
    except OSError:
        return False
    for entry in entries:
        if not entry.is_file():
            continue
        if entry.suffix.lower() == ".dcm":
            return True
        try:
            with entry.open("rb") as fh:
                fh.seek(128)
                if fh.read(4) == b"DICM":
                    return True
        except OSError:
            continue
    return False


def _stem(path: Path) -> str:
    name = path.name
    for suffix in FILE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _guess_role(name: str, volume) -> str | None:
    """Pick display settings from the file name and content (case-folder names first)."""
    import numpy as np

    key = name.lower()
    if key in CASE_FILES:
        return key
    if volume.is_4d:
        return "ctp"  # a 4-D series in this plugin is a perfusion series
    if str(volume.meta.get("modality", "")).upper() == "CT":
        return "ct"
    integer = np.issubdtype(volume.array.dtype, np.integer) or volume.array.dtype == np.bool_
    if integer and (any(h in key for h in _LABEL_HINTS) or _is_binary(volume.array)):
        return "labels"
    return None


def _is_binary(array) -> bool:
    return bool(array.min() >= 0 and array.max() <= 1)
