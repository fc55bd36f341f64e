"""What the perfusion widget shows, built without Qt: a `PerfusionResult` as layers, the AIF
region from clicked points, and the numbers of the results table.

The widget (`napari_ctp2mri._perfusion_widget`) runs the analysis and these in a worker thread
and only adds what they return to the viewer. The AIF's points are napari world coordinates;
they become CTP voxel indices through the same transforms the reader used to place the CTP
(`napari_ctp2mri._layers.world_to_voxel`), so a click lands on the voxel under the cursor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ctp2mri.errors import InputError
from ctp2mri.io.volume import Volume
from ctp2mri.perfusion import MAP_UNITS, PerfusionResult, RegionSettings
from ctp2mri.perfusion.output import DISPLAY_RANGES
from ctp2mri.progress import CancelToken
from napari_ctp2mri._layers import META_KEY, volume_to_layer_data, voxel_to_world, world_to_voxel

__all__ = ["AIF_COLOUR", "AIF_POINTS_NAME", "AIF_RADIUS_MM", "MAP_LAYERS", "POINT_LAYERS", "SOURCE",
           "VOF_COLOUR", "PerfusionRun", "aif_region_from_points", "in_plane_mm", "point_geometry",
           "region_names", "result_layers", "volume_rows"]

SOURCE = "ctp2mri perfusion"  # metadata["ctp2mri"]["source"] of this widget's layers
MAP_LAYERS = {"cbf": "CBF", "cbv": "CBV", "mtt": "MTT", "tmax": "Tmax", "ttp": "TTP"}
# Added in this order, so CBF ends on top and hiding it shows Tmax; TTP starts hidden (it
# mostly shows the bolus' arrival, which Tmax shows better).
MAP_ORDER = ("ttp", "mtt", "cbv", "tmax", "cbf")
MAP_COLORMAP = "turbo"
# Colours absent from turbo, so the outlines stay visible over every map; the true lesion is
# red and the synthetic-ADC core yellow elsewhere in the plugin.
REGION_COLOURS = {"core": "magenta", "hypoperfusion": "white"}
POINT_LAYERS = {"aif": "AIF voxels", "vof": "VOF voxels"}
AIF_COLOUR = "#ff5555"  # the AIF/VOF voxel points, and their curves in the plot
VOF_COLOUR = "#4f9dff"
AIF_POINTS_NAME = "AIF"  # the layer Place AIF adds; the AIF picker pre-selects it
AIF_RADIUS_MM = 3.0
POINT_SIZE_MM = 4.0


# layers and numbers --------------------------------------------------------------------------
def region_names(settings: RegionSettings) -> dict[str, str]:
    """Layer names of the core and hypoperfusion masks, with the thresholds that made them."""
    return {"core": f"perfusion core (rCBF<{100 * settings.core_rcbf:g}%)",
            "hypoperfusion": f"hypoperfusion (Tmax>{settings.hypoperfusion_tmax_s:g}s)"}


def _ml(value: float) -> str:
    return f"{value:.1f} ml"


def volume_rows(result: PerfusionResult) -> list[tuple[str, str]]:
    """``(label, value)`` of the widget's results table: volumes, mismatch, reference, AIF."""
    r, s = result.regions, result.regions.settings
    ratio = r.mismatch_ratio
    aif = result.aif
    return [
        (f"Core (rCBF < {100 * s.core_rcbf:g} %)", _ml(r.core_ml)),
        (f"Hypoperfusion (Tmax > {s.hypoperfusion_tmax_s:g} s)", _ml(r.hypoperfusion_ml)),
        ("Mismatch volume", _ml(r.mismatch_ml)),
        ("Mismatch ratio", f"{ratio:.2f}" if math.isfinite(ratio) else "∞ (no core)"),
        (f"Reference CBF ({r.healthy_side})", f"{r.reference_cbf:.1f} {MAP_UNITS['cbf']}"),
        (f"AIF ({len(aif.voxels)} voxels)",
         f"peak {aif.peak_hu:.0f} HU at {aif.time_to_peak_s:.0f} s"),
    ]


def aif_region_from_points(points: np.ndarray, ctp: Volume,
                           radius_mm: float = AIF_RADIUS_MM) -> Volume:
    """The AIF region on the CT's own grid: voxels within ``radius_mm`` of each point.

    Parameters
    ----------
    points
        ``(n, 3)`` napari world coordinates ``(z, y, x)`` (LPS mm): the clicks of a Points layer.
    ctp
        The CT perfusion whose grid the region lies on.
    radius_mm
        Sphere radius; the voxel under each point is always included, so a radius below the
        voxel size still marks the clicked voxel.

    Raises
    ------
    InputError
        No points, or a point outside the CT perfusion's field of view.
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if points.shape[0] == 0:
        raise InputError("the AIF layer has no points; click on an artery with Place AIF, or leave "
                         "the AIF choice empty to select it automatically")
    shape = np.asarray(ctp.spatial_shape)
    centres = world_to_voxel(points, ctp.affine)
    for n, (centre, world) in enumerate(zip(centres, points)):
        if np.any(centre < -0.5) or np.any(centre > shape - 0.5):
            where = ", ".join(f"{v:.1f}" for v in world)
            raise InputError(f"AIF point {n + 1} at (z, y, x) = ({where}) mm lies outside the CT "
                             "perfusion's field of view; place it on an artery inside the head "
                             "(the MCA or the ICA)")
    linear = ctp.affine[:3, :3]
    # index half-widths of the sphere's bounding box (exact for oblique grids too)
    half = radius_mm * np.linalg.norm(np.linalg.inv(linear), axis=1)
    mask = np.zeros(tuple(shape), dtype=np.uint8)
    for centre in centres:
        lo = np.maximum(np.floor(centre - half), 0).astype(int)
        hi = np.minimum(np.ceil(centre + half), shape - 1).astype(int)
        axes = [np.arange(a, b + 1) for a, b in zip(lo, hi)]
        grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).astype(np.float64)
        inside = (((grid - centre) @ linear.T) ** 2).sum(axis=-1) <= radius_mm ** 2
        mask[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1][inside] = 1
        mask[tuple(np.clip(np.round(centre), 0, shape - 1).astype(int))] = 1
    return Volume(mask, ctp.affine.copy(), meta={"source": SOURCE})


def in_plane_mm(spatial: np.ndarray) -> float:
    """The finer in-plane voxel size (mm) of a 4×4 data → world map (point sizes are in
    voxels)."""
    return float(np.linalg.norm(spatial[:3, :3], axis=0)[1:].min())


def point_geometry(spatial: np.ndarray) -> dict[str, Any]:
    """napari kwargs placing a 3-D layer with the 4×4 data → world map ``spatial`` (in mm, as
    the reader's layers: napari ignores units that differ between layers)."""
    linear = spatial[:3, :3]
    axes = {"axis_labels": ("z", "y", "x"), "units": ("mm",) * 3}
    if np.allclose(linear, np.diag(np.diag(linear)), rtol=0, atol=1e-9):
        return {"scale": tuple(np.diag(linear)), "translate": tuple(spatial[:3, 3]), **axes}
    return {"affine": spatial, **axes}


@dataclass
class PerfusionRun:
    """A finished analysis and what the widget made of it (built in the worker thread)."""

    result: PerfusionResult
    aif_region: Volume | None  # the placed AIF's region on the CT's grid; None: automatic
    layers: list[tuple[str, Any, dict[str, Any], str]]  # (output key, data, kwargs, kind)
    seconds: float


def result_layers(result: PerfusionResult, spatial: np.ndarray,
                  cancel: CancelToken | None = None) -> list[tuple[str, Any, dict[str, Any], str]]:
    """``(output key, data, kwargs, kind)`` of the result's layers, in the order they are added.

    Maps and masks come resampled onto the CT's own grid (`PerfusionResult.on_ctp_grid`); the
    AIF/VOF voxels become points in the data space of ``spatial``, the CTP layer's 4×4 spatial
    data → world map.
    """
    layers = []

    def on_ctp_grid(key: str, name: str, role: str | None = None) -> tuple[Any, dict, str]:
        if cancel is not None:
            cancel.raise_if_cancelled()  # resampling a clinical series' maps takes a while
        volume = result.on_ctp_grid(key)
        tagged = Volume(volume.array, volume.affine, meta={"source": SOURCE})
        data, kwargs, kind = volume_to_layer_data(tagged, name, role)
        kwargs["metadata"][META_KEY]["output"] = key
        return data, kwargs, kind

    for key in MAP_ORDER:
        data, kwargs, kind = on_ctp_grid(key, MAP_LAYERS[key])
        kwargs.update(colormap=MAP_COLORMAP, contrast_limits=DISPLAY_RANGES[key],
                      visible=key != "ttp")
        layers.append((key, data, kwargs, kind))
    names = region_names(result.regions.settings)
    for key in ("hypoperfusion", "core"):
        data, kwargs, kind = on_ctp_grid(key, names[key], "labels")
        kwargs.update(colormap={None: "transparent", 1: REGION_COLOURS[key]}, opacity=1.0)
        layers.append((key, data, kwargs, kind))
    inverse = np.linalg.inv(spatial)
    size = POINT_SIZE_MM / in_plane_mm(spatial)
    for key, colour in (("vof", VOF_COLOUR), ("aif", AIF_COLOUR)):
        function = getattr(result, key)
        voxels = np.empty((0, 3)) if function is None else function.voxels
        world = voxel_to_world(voxels, result.affine) if len(voxels) else np.empty((0, 3))
        data = world @ inverse[:3, :3].T + inverse[:3, 3]
        kwargs = {"name": POINT_LAYERS[key], "ndim": 3, "size": size, "face_color": colour,
                  "border_color": "white", "border_width": 0.1, **point_geometry(spatial),
                  "metadata": {META_KEY: {"source": SOURCE, "output": key}}}
        layers.append((key, data, kwargs, "points"))
    return layers
