"""A local training set from layers and case folders, and its before/after evaluation.

Qt-free helpers of the post-training widget (`napari_ctp2mri._post_train_widget`), testable
without a display. A *viewer case* is the five layers of one case open in napari: a 4-D CTP
Image, DWI and ADC Images, brain mask and lesion Labels, the lesion often just painted or
corrected with napari's Labels tools. `case_from_layers` turns their data into a
`ctp2mri.casefolder.Case` on the CTP's grid; `training_dataset` mixes such cases with case
folders into the `SliceDataset` that `ctp2mri.training.post_train.post_train` trains on;
`before_after` scores the base and the post-trained model on the same cases with the core's
`ctp2mri.evaluation.evaluate.evaluate`, and `metric_rows` lays the result out as a small table.

Layers are passed as ``(data, attributes)`` pairs, ``attributes`` being what
`napari_ctp2mri._layers.layer_to_volume` reads (`napari_ctp2mri._layers.layer_attributes`),
so nothing here holds a live layer.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ctp2mri.casefolder import Case, write_case
from ctp2mri.errors import InputError
from ctp2mri.io.volume import Volume
from ctp2mri.progress import CancelToken, ProgressCallback
from napari_ctp2mri._layers import META_KEY, layer_to_volume, spatial_transform

__all__ = [
    "BASE_LABEL",
    "CASE_ROLES",
    "NEW_LABEL",
    "LayerInput",
    "before_after",
    "case_from_layers",
    "check_case_layers",
    "metric_rows",
    "save_viewer_case",
    "training_dataset",
    "viewer_case_name",
]

LayerInput = tuple[Any, Mapping[str, Any]]  # (layer data, layer attributes)
Source = Path | Case

# role → what the user calls it; the roles are the case-folder contract's names
CASE_ROLES: dict[str, str] = {"ctp": "CTP", "dwi": "DWI", "adc": "ADC", "mask": "brain mask",
                              "lesion": "lesion"}
_MASK_ROLES = ("mask", "lesion")
BASE_LABEL, NEW_LABEL = "base", "post-trained"
# (row label, evaluate() column, lower is better): lesion terms first, what post-training targets
METRICS: tuple[tuple[str, str, bool], ...] = (
    ("Lesion MAE DWI", "DWI_lesion_mae", True),
    ("Lesion MAE ADC", "ADC_lesion_mae", True),
    ("MAE DWI", "DWI_mae", True),
    ("MAE ADC", "ADC_mae", True),
    ("PSNR DWI (dB)", "DWI_psnr", False),
    ("PSNR ADC (dB)", "ADC_psnr", False),
    ("Core Dice", "core_dice", False),
)
# (row label, evaluate() column): rDWI / rADC, better when closer to the ground truth's
CONTRASTS: tuple[tuple[str, str], ...] = (
    ("Lesion contrast DWI", "DWI_lesion_contrast"),
    ("Lesion contrast ADC", "ADC_lesion_contrast"),
)


# viewer cases --------------------------------------------------------------------------------
def _transform(name: str, attributes: Mapping[str, Any], ndim: int) -> np.ndarray:
    return spatial_transform({**attributes, "name": name}, ndim)


def check_case_layers(layers: Mapping[str, LayerInput]) -> None:
    """Check that the layers form one case on one grid; cheap (no array is read).

    Parameters
    ----------
    layers
        ``{role: (data, attributes)}`` for every role of `CASE_ROLES`.

    Raises
    ------
    InputError
        A role is missing, the CTP is not 4-D, another layer is not 3-D, or a layer lies on
        another grid than the CTP (other shape, voxel size, position or orientation).
    """
    missing = [CASE_ROLES[role] for role in CASE_ROLES if layers.get(role) is None]
    if missing:
        raise InputError(f"pick the viewer case's {', '.join(missing)} layer(s), or untick "
                         "'Viewer case' to train on case folders only")
    ctp_data, ctp_attributes = layers["ctp"]
    ctp_name = ctp_attributes.get("name", "CTP")
    ctp_shape = tuple(np.shape(ctp_data))
    if len(ctp_shape) != 4 or ctp_attributes.get("rgb"):
        raise InputError(f"layer {ctp_name!r} has {len(ctp_shape)} dimensions {ctp_shape}; the CTP "
                         "must be a 4-D image (time, z, y, x), e.g. the case's 'CTP' layer")
    grid = _transform(ctp_name, ctp_attributes, 4)
    tol = 1e-4 * max(1.0, float(np.abs(grid).max()))
    for role in ("dwi", "adc", "mask", "lesion"):
        data, attributes = layers[role]
        name, what = attributes.get("name", role), CASE_ROLES[role]
        shape = tuple(np.shape(data))
        if len(shape) != 3 or attributes.get("rgb"):
            raise InputError(f"the {what} layer {name!r} has {len(shape)} dimensions {shape}; it must be "
                             f"a 3-D (z, y, x) volume of the same case as the CTP {ctp_name!r}")
        if shape != ctp_shape[1:]:
            raise InputError(f"the {what} layer {name!r} has shape {shape} but the CTP {ctp_name!r} has "
                             f"(z, y, x) = {ctp_shape[1:]}; pick the layers of one case (paint a new "
                             "lesion with the DWI layer selected and 'New labels layer', so it gets "
                             "the case's grid)")
        if not np.allclose(_transform(name, attributes, 3), grid, rtol=0, atol=tol):
            raise InputError(f"the {what} layer {name!r} lies elsewhere in the patient than the CTP "
                             f"{ctp_name!r} (other voxel size, position or orientation); pick the "
                             "layers of one case, or reset the layer's scale/translate")


def _on_ctp_grid(ctp_attributes: Mapping[str, Any], name: str) -> dict[str, Any]:
    """Attributes that read a 3-D array with the CTP layer's geometry.

    A lesion painted in a new Labels layer has no stored geometry of its own; read with the
    CTP's (its 3-D part, and the file affine and axis order the reader kept), it comes back on
    exactly the CTP volume's voxel grid, so the `Case` passes the one-grid check.
    """
    attributes: dict[str, Any] = {"name": name, "affine": _transform(name, ctp_attributes, 4)}
    meta = (ctp_attributes.get("metadata") or {}).get(META_KEY)
    if meta is not None:
        spatial = {**meta, "shape": list(meta["shape"])[:3], "frame_times": None, "axes": "zyx"}
        attributes["metadata"] = {META_KEY: spatial}
    return attributes


def viewer_case_name(ctp_attributes: Mapping[str, Any]) -> str:
    """A file-system-safe case name: the case folder the CTP came from, else its layer name."""
    meta = (ctp_attributes.get("metadata") or {}).get(META_KEY) or {}
    source = meta.get("source")
    stem = Path(str(source)).parent.name if source else ""
    stem = stem or str(ctp_attributes.get("name", "case"))
    return "viewer-" + (re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._") or "case")


def case_from_layers(layers: Mapping[str, LayerInput], name: str | None = None) -> Case:
    """One viewer case as a `Case` on the CTP's voxel grid.

    Parameters
    ----------
    layers
        ``{role: (data, attributes)}`` for the roles of `CASE_ROLES` (see `check_case_layers`).
    name
        Case name (``case.info["case"]``); default `viewer_case_name`.

    Returns
    -------
    Case
        CTP, DWI, ADC as read from the layers; brain and lesion masks as 0/1 ``uint8`` (any
        non-zero label counts, as a painted Labels layer may hold several label values).
    """
    check_case_layers(layers)
    ctp_data, ctp_attributes = layers["ctp"]
    ctp = layer_to_volume(ctp_data, ctp_attributes)
    volumes: dict[str, Volume] = {"ctp": ctp}
    for role in ("dwi", "adc", "mask", "lesion"):
        data, attributes = layers[role]
        volume = layer_to_volume(data, _on_ctp_grid(ctp_attributes, attributes.get("name", role)))
        if role in _MASK_ROLES:
            volume = volume.with_array((volume.array != 0).astype(np.uint8))
        volumes[role] = volume
    info = {"case": name or viewer_case_name(ctp_attributes), "source": "napari layers"}
    return Case(**volumes, info=info).validate()


def save_viewer_case(layers: Mapping[str, LayerInput], parent: str | os.PathLike, name: str | None = None,
                     overwrite: bool = False) -> Path:
    """Write a viewer case as the case folder ``parent/name`` and return it.

    The folder follows the case-folder contract, so a painted lesion outlives the session and
    joins the training set with the other folders, as MONAI Label's "submit label" puts it in
    the datastore. Written atomically (all five files appear together, or none); an existing
    folder is replaced only with ``overwrite``.
    """
    case = case_from_layers(layers, name)
    return write_case(case, Path(parent) / case.info["case"], overwrite=overwrite)


# training set --------------------------------------------------------------------------------
def training_dataset(sources: Sequence[Source], profile: str, *, seed: int = 0,
                     require_lesion: bool = True, progress: ProgressCallback | None = None,
                     cancel: CancelToken | None = None) -> Any:
    """The post-training `SliceDataset` of case folders and in-memory cases.

    Augmented as ``post_train`` augments a data folder's ``train`` split, on the base model's
    ``profile`` grid; ``require_lesion`` (λ_lesion > 0) refuses cases without lesion mask.
    """
    from ctp2mri.data import SliceDataset

    if not sources:
        raise InputError("the training set is empty: add case folders, or tick 'Viewer case' and "
                         "pick the layers of a case open in the viewer")
    return SliceDataset(list(sources), profile=profile, augment=True, seed=seed,
                        require_lesion=require_lesion, progress=progress, cancel=cancel)


# before / after --------------------------------------------------------------------------------
def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}-{n}"
    taken.add(candidate)
    return candidate


def before_after(base: str | os.PathLike, new: str | os.PathLike, sources: Sequence[Source], *,
                 n_steps: int = 10, seed: int = 0, batch_size: int = 16, device: str = "auto",
                 progress: ProgressCallback | None = None,
                 cancel: CancelToken | None = None) -> list[dict[str, Any]]:
    """Score the base and the post-trained model on the training cases (`evaluate` rows).

    Both models sample every brain slice of every case with DDIM (``n_steps``, η = 0) from the
    same per-slice noise, so the difference is the models'. In-memory cases are written to a
    temporary case folder first (the evaluation reads case folders), with their lesion as it
    is now. ``progress(done, total, info)`` counts thousandths of the whole evaluation.
    """
    from ctp2mri.training.child import before_after_folders

    with tempfile.TemporaryDirectory(prefix="ctp2mri-eval-") as tmp:
        folders, taken = [], set()
        for index, source in enumerate(sources):
            if isinstance(source, Case):
                if cancel is not None:
                    cancel.raise_if_cancelled()
                name = _unique(str(source.info.get("case") or f"case_{index:03d}"), taken)
                folders.append(write_case(source, Path(tmp) / name))
            else:
                folders.append(Path(source))
        return before_after_folders({BASE_LABEL: base, NEW_LABEL: new}, folders, n_steps=n_steps, seed=seed,
                                    batch_size=batch_size, device=device, progress=progress, cancel=cancel)


def metric_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean over cases of the lesion and image metrics, base vs post-trained.

    The lesion contrasts (rDWI, rADC: is the painted lesion drawn at all) follow the lesion
    MAEs; their label gives the ground truth's value, and closer to it is better.

    Returns
    -------
    list of dict
        ``label``, ``key``, ``base``, ``new`` (means, NaN where no case has a value, e.g. lesion
        MAE without lesion), ``change`` (new − base), ``better`` (True/False, None if NaN or
        unchanged) and ``digits`` to show.
    """
    from ctp2mri.evaluation.tables import summarise

    summary = summarise(rows)

    def mean(model: str, key: str) -> float:
        return summary.get(model, {}).get(key, {}).get("mean", math.nan)

    out = []
    for label, key, lower_is_better in METRICS:
        base, new = mean(BASE_LABEL, key), mean(NEW_LABEL, key)
        change = new - base
        better = None if not math.isfinite(change) else (change < 0) == lower_is_better and change != 0
        out.append({"label": label, "key": key, "base": base, "new": new, "change": change,
                    "better": better, "digits": 2 if "psnr" in key else 4})
        if key == "ADC_lesion_mae":
            out += [_contrast_row(c_label, c_key, mean) for c_label, c_key in CONTRASTS]
    return out


def _contrast_row(label: str, key: str, mean: Callable[[str, str], float]) -> dict[str, Any]:
    base, new, true = mean(BASE_LABEL, key), mean(NEW_LABEL, key), mean(BASE_LABEL, f"{key}_true")
    change = new - base
    gaps = abs(new - true), abs(base - true)
    better = None if not all(map(math.isfinite, (*gaps, change))) or gaps[0] == gaps[1] else gaps[0] < gaps[1]
    shown = f"{label} (true {true:.2f})" if math.isfinite(true) else label
    return {"label": shown, "key": key, "base": base, "new": new, "change": change,
            "better": better, "digits": 3}

