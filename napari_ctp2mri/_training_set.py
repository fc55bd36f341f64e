"""A viewer case from layers: the post-training widget's part of the training set.

Qt-free helpers of the post-training widget (`napari_ctp2mri._post_train_widget`), testable
without a display. A *viewer case* is the five layers of one case open in napari: a 4-D CTP
Image, DWI and ADC Images, brain mask and lesion Labels, the lesion often just painted or
corrected with napari's Labels tools. `case_from_layers` turns their data into a
`ctp2mri.casefolder.Case` on the CTP's grid, and `save_viewer_case` writes it as a case folder;
with case folders it makes the training set of the core's post-train-and-compare pipeline
(`ctp2mri.evaluation.post_train_compare`).

Layers are passed as ``(data, attributes)`` pairs, ``attributes`` being what
`napari_ctp2mri._layers.layer_to_volume` reads (`napari_ctp2mri._layers.layer_attributes`),
so nothing here holds a live layer.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ctp2mri.casefolder import Case, write_case
from ctp2mri.errors import InputError
from ctp2mri.io.volume import Volume
from napari_ctp2mri._layers import META_KEY, layer_to_volume, spatial_transform

__all__ = [
    "CASE_ROLES",
    "LayerInput",
    "case_from_layers",
    "check_case_layers",
    "save_viewer_case",
    "viewer_case_name",
]

LayerInput = tuple[Any, Mapping[str, Any]]  # (layer data, layer attributes)

# role → what the user calls it; the roles are the case-folder contract's names
CASE_ROLES: dict[str, str] = {"ctp": "CTP", "dwi": "DWI", "adc": "ADC", "mask": "brain mask",
                              "lesion": "lesion"}
_MASK_ROLES = ("mask", "lesion")


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
