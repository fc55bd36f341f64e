"""`Volume` ↔ napari layer data: the one place that knows how geometry maps to napari.

Convention
----------
napari world coordinates are LPS millimetres (DICOM patient coordinates) in the order
``(t, z, y, x)``, time counted in frames. Before a volume becomes a layer its array axes are
reordered and flipped (never resampled) so they point along +L, +P, +S, then reversed into
napari's order ``(t, k, j, i)``. napari shows the last two axes, so an axial slice appears in
radiological convention: the patient's right on the left of the screen, anterior at the top.
Axis-aligned grids become ``scale``/``translate``; oblique ones keep their residual rotation
in napari's ``affine``.

``metadata["ctp2mri"]`` keeps what napari cannot: the file's own affine, frame times and the
axis reordering, so `layer_to_volume` gives back the original array and affine exactly.
"""

from __future__ import annotations

from typing import Any

import nibabel as nib
import numpy as np

from ctp2mri.casefolder import Case
from ctp2mri.errors import InputError
from ctp2mri.io.volume import Volume

LayerData = tuple[np.ndarray, dict[str, Any], str]

META_KEY = "ctp2mri"
# (role, layer name) in the order layers are added: the last added is drawn on top, so the
# masks come after the images they outline.
CASE_LAYERS: tuple[tuple[str, str], ...] = (
    ("ctp", "CTP"),
    ("dwi", "DWI"),
    ("adc", "ADC"),
    ("mask", "brain mask"),
    ("lesion", "lesion"),
)
CTP_WINDOW_HU = (0.0, 100.0)  # grey/white matter and contrast-enhanced vessels, no bone
ADC_WINDOW = (0.0, 2000.0)  # 10⁻⁶ mm²/s: ischaemic core ~600, tissue ~800, CSF ~3000
PERCENTILES = (0.5, 99.5)

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Homogeneous permutation swapping (x, y, z) and (z, y, x); its own inverse.
_REVERSE_XYZ = np.eye(4)[[2, 1, 0, 3]]
_IDENTITY_ORNT = np.array([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]])
# Relative size of off-diagonal terms below which a grid counts as axis-aligned: scanners
# and converters leave ~1e-8 rounding there, and 1e-6 drifts by a thousandth of a voxel over
# a 1000-voxel field of view, far below anything visible.
_OBLIQUE_TOL = 1e-6


# geometry -------------------------------------------------------------------------------------
def display_orientation(affine: np.ndarray) -> np.ndarray:
    """nibabel orientation (3×2) that turns the array's axes into +L, +P, +S axes."""
    return nib.orientations.io_orientation(_RAS_TO_LPS @ np.asarray(affine, dtype=np.float64))


def napari_spatial_transform(affine: np.ndarray) -> np.ndarray:
    """4×4 map from napari data ``(k, j, i)`` to napari world ``(z, y, x)`` LPS mm."""
    return _REVERSE_XYZ @ _RAS_TO_LPS @ np.asarray(affine, dtype=np.float64) @ _REVERSE_XYZ


def affine_from_napari_spatial(transform: np.ndarray) -> np.ndarray:
    """Inverse of `napari_spatial_transform`: RAS+ voxel-to-world affine for ``(i, j, k)``."""
    return _RAS_TO_LPS @ _REVERSE_XYZ @ np.asarray(transform, dtype=np.float64) @ _REVERSE_XYZ


def world_to_voxel(points: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """napari world points ``(n, 3)`` ``(z, y, x)`` LPS mm → voxel indices ``(n, 3)``
    ``(i, j, k)`` (fractional) of the volume whose RAS+ affine is ``affine``."""
    inverse = np.linalg.inv(napari_spatial_transform(affine))
    world = np.atleast_2d(np.asarray(points, dtype=np.float64))
    kji = world @ inverse[:3, :3].T + inverse[:3, 3]
    return kji[:, ::-1]


def voxel_to_world(indices: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Voxel indices ``(n, 3)`` ``(i, j, k)`` → napari world ``(n, 3)`` ``(z, y, x)`` LPS mm;
    the inverse of `world_to_voxel`."""
    transform = napari_spatial_transform(affine)
    kji = np.atleast_2d(np.asarray(indices, dtype=np.float64))[:, ::-1]
    return kji @ transform[:3, :3].T + transform[:3, 3]


def _geometry_kwargs(affine: np.ndarray, ndim: int) -> dict[str, Any]:
    """``scale``/``translate`` for axis-aligned grids, else a full napari ``affine``."""
    m = napari_spatial_transform(affine)
    linear = m[:3, :3]
    diag = np.diag(linear)
    off = linear - np.diag(diag)
    lead = ndim - 3  # time axis, if any, stays in frame units
    if np.all(diag > 0) and np.abs(off).max() <= _OBLIQUE_TOL * np.abs(diag).max():
        return {
            "scale": tuple([1.0] * lead + diag.tolist()),
            "translate": tuple([0.0] * lead + m[:3, 3].tolist()),
        }
    full = np.eye(ndim + 1)
    full[lead:, lead:] = m
    return {"affine": full}


def volume_to_layer_array(volume: Volume) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reorient a volume for display.

    Returns
    -------
    data
        The array in napari order ``(k, j, i)`` or ``(t, k, j, i)`` (a view, no copy).
    affine
        RAS+ affine of the reoriented ``(i, j, k)`` array.
    ornt
        The nibabel orientation that was applied (kept to undo it on writing).
    """
    ornt = display_orientation(volume.affine)
    array = nib.orientations.apply_orientation(volume.array, ornt)
    affine = volume.affine @ nib.orientations.inv_ornt_aff(ornt, volume.spatial_shape)
    return np.transpose(array, tuple(range(array.ndim))[::-1]), affine, ornt


# layer data ----------------------------------------------------------------------------------
def _percentile_limits(array: np.ndarray, mask: np.ndarray | None) -> tuple[float, float]:
    inside = mask is not None and mask.shape == array.shape and mask.any()
    values = array[mask > 0] if inside else array
    lo, hi = (float(v) for v in np.percentile(values, PERCENTILES))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _style(role: str | None, volume: Volume, mask: Volume | None) -> tuple[str, dict[str, Any]]:
    """Layer type and display settings for a volume playing ``role``."""
    if role == "lesion":
        return "labels", {"colormap": {None: "transparent", 1: "red"}, "opacity": 0.6}
    if role == "mask":
        # Hidden at first: a filled brain mask would hide the images below it.
        colormap = {None: "transparent", 1: "cyan"}
        return "labels", {"colormap": colormap, "opacity": 0.3, "visible": False}
    if role == "labels":
        return "labels", {}
    if role in ("ctp", "ct"):
        limits = CTP_WINDOW_HU
    elif role == "adc":
        limits = ADC_WINDOW
    else:
        limits = _percentile_limits(volume.array, None if mask is None else mask.array)
    style: dict[str, Any] = {"colormap": "gray", "contrast_limits": limits}
    if role in ("dwi", "adc"):
        # Start with the input in view; the targets sit hidden above it in the layer list.
        style["visible"] = False
    return "image", style


def volume_to_layer_data(
    volume: Volume, name: str, role: str | None = None, mask: Volume | None = None
) -> LayerData:
    """One `Volume` as a napari layer data tuple.

    Parameters
    ----------
    volume
        3-D or 4-D volume; a 4-D one gets time as the first napari axis (a time slider).
    name
        Layer name.
    role
        ``"ctp"``, ``"ct"``, ``"dwi"``, ``"adc"``, ``"mask"``, ``"lesion"``, ``"labels"`` or
        None (a plain image); picks the layer type, colormap and contrast limits.
    mask
        Brain mask on the same grid; percentile contrast limits are taken inside it.
    """
    layer_type, style = _style(role, volume, mask)
    data, affine, ornt = volume_to_layer_array(volume)
    if layer_type == "labels":
        data = _as_labels(data, name)
    meta = {
        "affine": volume.affine.tolist(),
        "ornt": ornt.tolist(),
        "shape": list(volume.array.shape),
        "frame_times": None if volume.frame_times is None else volume.frame_times.tolist(),
        "source": volume.meta.get("source"),
        "axes": "tzyx" if volume.is_4d else "zyx",
        "role": role,
    }
    kwargs: dict[str, Any] = {
        "name": name,
        "metadata": {META_KEY: meta},
        "axis_labels": tuple("tzyx"[4 - data.ndim:]),
        "units": tuple(["pixel"] * (data.ndim - 3) + ["mm"] * 3),
        **_geometry_kwargs(affine, data.ndim),
        **style,
    }
    return data, kwargs, layer_type


def case_to_layer_data(case: Case) -> list[LayerData]:
    """The volumes of a case as named layers: CTP, DWI, ADC, brain mask, lesion."""
    layers = []
    for role, name in CASE_LAYERS:
        volume = getattr(case, role)
        if volume is not None:
            layers.append(volume_to_layer_data(volume, name, role, mask=case.mask))
    return layers


def _as_labels(data: np.ndarray, name: str) -> np.ndarray:
    """Integer label data; masks saved as 0.0/1.0 floats are common and are converted."""
    if data.dtype == np.bool_:
        return data.astype(np.uint8)
    if np.issubdtype(data.dtype, np.integer):
        return data
    if np.issubdtype(data.dtype, np.floating) and np.array_equal(data, np.round(data)):
        if data.min() >= 0 and data.max() <= 255:
            return data.astype(np.uint8)
        if data.min() >= np.iinfo(np.int32).min and data.max() <= np.iinfo(np.int32).max:
            return data.astype(np.int32)
    raise InputError(
        f"{name} holds non-integer {data.dtype} values; a mask or label image must hold "
        "whole numbers (0 = background). Threshold or round it first."
    )


# layer → volume ------------------------------------------------------------------------------
def layer_attributes(layer: Any) -> dict[str, Any]:
    """What `layer_to_volume` reads from a layer: its transforms and stored geometry."""
    return {"name": layer.name, "scale": layer.scale, "translate": layer.translate,
            "rotate": layer.rotate, "shear": layer.shear,
            "affine": layer.affine.affine_matrix, "metadata": layer.metadata,
            "rgb": getattr(layer, "rgb", False), "multiscale": layer.multiscale}


def layer_to_volume(data: Any, attributes: dict[str, Any]) -> Volume:
    """A napari layer (data + saved attributes) as a `Volume` ready to write.

    Layers that came from this plugin's reader carry the file's affine, axis order and frame
    times in ``metadata["ctp2mri"]`` and are restored exactly, unless the user has since
    moved or rescaled the layer in napari. Other layers get an affine built from their scale,
    translate, rotate, shear and affine, read as LPS millimetres in ``(z, y, x)`` order (this
    plugin's convention); a 4-D layer's first axis is time.
    """
    name = attributes.get("name", "layer")
    if attributes.get("multiscale"):
        data = data[0]
    if attributes.get("rgb"):
        raise InputError(f"layer {name!r} is an RGB image; save a single-channel volume instead")
    array = np.asarray(data)
    if array.ndim not in (3, 4):
        raise InputError(
            f"layer {name!r} has {array.ndim} dimensions {array.shape}; only 3-D (z, y, x) "
            "or 4-D (t, z, y, x) layers can be saved as a volume"
        )
    # napari order (t, k, j, i) → nibabel order (i, j, k, t)
    array = np.transpose(array, tuple(range(array.ndim))[::-1])
    spatial = spatial_transform(attributes, array.ndim)
    meta = (attributes.get("metadata") or {}).get(META_KEY)
    if meta is not None and _still_on_stored_grid(meta, array.shape, spatial):
        ornt = np.asarray(meta["ornt"], dtype=np.float64)
        array = nib.orientations.apply_orientation(
            array, nib.orientations.ornt_transform(_IDENTITY_ORNT, ornt)
        )
        frame_times = meta.get("frame_times")
        if array.ndim != 4 or frame_times is None or len(frame_times) != array.shape[3]:
            frame_times = None
        return Volume(
            np.ascontiguousarray(array),
            np.asarray(meta["affine"], dtype=np.float64),
            frame_times=frame_times,
            meta={"source": meta["source"]} if meta.get("source") else {},
        )
    if abs(np.linalg.det(spatial[:3, :3])) < 1e-12:
        raise InputError(f"layer {name!r} has a zero scale; fix its scale before saving")
    # Without stored frame times nothing says how far apart the frames were (the time axis
    # counts frames here): leave them unset rather than invent them.
    return Volume(np.ascontiguousarray(array), affine_from_napari_spatial(spatial))


def spatial_transform(attributes: dict[str, Any], ndim: int) -> np.ndarray:
    """4×4 data→world map of the layer's last three axes, as napari applies it.

    ``attributes`` as `layer_attributes` gives them (only the name and the transforms are
    read); `InputError` if the transform mixes time with space.
    """
    from napari.utils.transforms import Affine

    composite = Affine(
        scale=attributes.get("scale", np.ones(ndim)),
        translate=attributes.get("translate", np.zeros(ndim)),
        rotate=attributes.get("rotate", np.eye(ndim)),
        shear=attributes.get("shear", np.zeros(ndim * (ndim - 1) // 2)),
        ndim=ndim,
    ).affine_matrix
    extra = attributes.get("affine")
    if extra is not None:
        composite = np.asarray(getattr(extra, "affine_matrix", extra), dtype=np.float64) @ composite
    lead = ndim - 3
    if lead and (np.any(composite[lead:ndim, :lead]) or np.any(composite[:lead, lead:ndim])):
        raise InputError(
            f"layer {attributes.get('name', 'layer')!r} mixes time with space in its "
            "transform; reset its rotation/affine on the time axis before saving"
        )
    spatial = np.eye(4)
    spatial[:3, :3] = composite[lead:ndim, lead:ndim]
    spatial[:3, 3] = composite[lead:ndim, ndim]
    return spatial


def _still_on_stored_grid(
    meta: dict[str, Any], shape: tuple[int, ...], spatial: np.ndarray
) -> bool:
    """True if the layer still has the shape and world placement the reader gave it."""
    ornt = np.asarray(meta["ornt"], dtype=np.float64)
    stored_shape = list(meta["shape"])
    # apply_orientation sends input axis n to output axis ornt[n, 0]
    shown = [stored_shape[n] for n in np.argsort(ornt[:, 0])] + stored_shape[3:]
    if tuple(shown) != tuple(shape):
        return False
    affine = np.asarray(meta["affine"], dtype=np.float64)
    displayed = affine @ nib.orientations.inv_ornt_aff(ornt, stored_shape[:3])
    expected = napari_spatial_transform(displayed)
    tol = 1e-6 * max(1.0, float(np.abs(expected).max()))
    return bool(np.allclose(spatial, expected, rtol=0, atol=tol))


# live layers --------------------------------------------------------------------------------
def update_geometry(layer: Any, kwargs: dict[str, Any], ndim: int) -> None:
    """Place an existing ``ndim``-D layer where new layer ``kwargs`` put it (rotation and shear
    reset), changing only what differs: each setter redraws the layer."""
    geometry = {"scale": kwargs.get("scale", np.ones(ndim)),
                "translate": kwargs.get("translate", np.zeros(ndim)),
                "rotate": np.eye(ndim), "shear": np.zeros(ndim * (ndim - 1) // 2),
                "affine": kwargs.get("affine", np.eye(ndim + 1))}
    for key, value in geometry.items():
        current = getattr(layer, key)
        current = getattr(current, "affine_matrix", current)
        # usually all of them are unchanged
        if np.shape(current) != np.shape(value) or not np.allclose(current, value):
            setattr(layer, key, value)


def checked_ctp_layer(viewer: Any, layer: Any, purpose: str) -> Any:
    """``layer``, picked as the CTP ``purpose`` (e.g. "to analyse"), if it still is a 4-D
    image of the viewer; else `InputError` saying what to pick or open."""
    from napari.layers import Image

    if layer is None:
        others = [x.name for x in viewer.layers if isinstance(x, Image)]
        hint = (f" (the image layers here, {', '.join(map(repr, others))}, are not 4-D)"
                if others else "")
        raise InputError(f"no CT perfusion layer {purpose}" + hint + "; open a 4-D CT perfusion "
                         "series (time, z, y, x), e.g. File ▸ Open Sample ▸ Stroke phantom")
    if layer not in viewer.layers:
        raise InputError(f"the CTP layer {layer.name!r} was removed; pick another")
    if not isinstance(layer, Image) or layer.ndim != 4 or layer.rgb:
        raise InputError(f"layer {layer.name!r} has {layer.ndim} dimensions; the CTP must be "
                         "a 4-D image (time, z, y, x)")
    return layer
