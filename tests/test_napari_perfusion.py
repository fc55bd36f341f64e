"""The perfusion widget in a real napari viewer (needs a display: run under xvfb-run)."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers_napari import errors
from napari.layers import Image, Labels, Points
from qtpy.QtCore import Qt

from ctp2mri.io.volume import Volume
from ctp2mri.perfusion import analyse_perfusion
from ctp2mri.phantom import generate_case
from napari_ctp2mri._layers import (
    CASE_LAYERS,
    layer_attributes,
    layer_to_volume,
    volume_to_layer_data,
    voxel_to_world,
    world_to_voxel,
)
from napari_ctp2mri._perfusion_layers import (
    AIF_POINTS_NAME,
    MAP_LAYERS,
    POINT_LAYERS,
    aif_region_from_points,
    region_names,
    volume_rows,
)
from napari_ctp2mri._perfusion_widget import PerfusionWidget

pytestmark = pytest.mark.gui

PLUGIN = "napari-ctp2mri"
WAIT_MS = 60_000
SLICES = slice(10, 22)  # the sample's lesion lies in slices 10–20: a quarter of the time


def _crop(volume: Volume) -> Volume:
    affine = volume.affine.copy()
    affine[:3, 3] += affine[:3, 2] * SLICES.start
    return Volume(np.ascontiguousarray(volume.array[:, :, SLICES]), affine,
                  frame_times=volume.frame_times, meta=dict(volume.meta))


@pytest.fixture(scope="module")
def case():
    """The stroke-phantom sample (seed 5, left MCA) cut to 12 axial slices through its lesion."""
    return generate_case(5)


def _viewer(make_napari_viewer, case, roles=("ctp", "dwi", "adc", "mask", "lesion")):
    """A viewer with the cut case's layers, named and styled as the reader names them."""
    viewer = make_napari_viewer()
    for role, name in CASE_LAYERS:
        if role in roles:
            data, kwargs, kind = volume_to_layer_data(_crop(getattr(case, role)), name, role)
            getattr(viewer, f"add_{kind}")(data, **kwargs)
    return viewer


def _widget(viewer):
    widget = PerfusionWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Perfusion")
    return widget


def _run(widget, qtbot):
    worker = widget.run()
    assert worker is not None
    assert not widget.run_button.enabled and widget.cancel_button.enabled
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)
    assert widget.run_button.enabled and not widget.cancel_button.enabled
    return worker


def _volume(layer):
    return layer_to_volume(layer.data, layer_attributes(layer))


def _output_names(widget):
    return {**MAP_LAYERS, **region_names(widget._settings().regions), **POINT_LAYERS}


def test_maps_and_regions_on_the_ctp_geometry_then_a_placed_aif_updates_them_in_place(
        make_napari_viewer, qtbot, case, notes):
    viewer = _viewer(make_napari_viewer, case)
    widget = _widget(viewer)
    ctp, brain = viewer.layers["CTP"], viewer.layers["brain mask"]
    assert widget.ctp.value is ctp and widget.brain.value is brain  # pre-selected by name
    assert widget.aif.value is None  # automatic AIF
    reports = []
    widget.relay.reported.connect(lambda step, total, info: reports.append(
        (step, total, info["stage"], widget.progress_bar.format())))
    _run(widget, qtbot)
    assert errors(notes) == []
    assert [r[0] for r in reports] == list(range(1, reports[-1][1] + 1))  # every stage, in order
    assert reports[1][3] == f"step 2/{reports[-1][1]} · {reports[1][2]}"
    assert widget.progress_bar.isHidden()

    # the layers: maps (Image, turbo, clinical windows), regions (Labels), AIF/VOF (Points),
    # all on the CTP's spatial geometry
    names = _output_names(widget)
    assert [x.name for x in viewer.layers][-len(names):] == [
        names[k] for k in ("ttp", "mtt", "cbv", "tmax", "cbf", "hypoperfusion", "core", "vof", "aif")]
    expected_kinds = {**dict.fromkeys(MAP_LAYERS, Image), "core": Labels, "hypoperfusion": Labels,
                      "aif": Points, "vof": Points}
    for key, name in names.items():
        layer = viewer.layers[name]
        assert isinstance(layer, expected_kinds[key]) and widget.own_layer(key) is layer
        np.testing.assert_allclose(layer.scale, ctp.scale[1:])
        np.testing.assert_allclose(layer.translate, ctp.translate[1:])
        if not isinstance(layer, Points):
            assert layer.data.shape == ctp.data.shape[1:]
    windows = {"CBF": (0, 80), "CBV": (0, 6), "MTT": (0, 16), "Tmax": (0, 16), "TTP": (0, 40)}
    for name, window in windows.items():
        layer = viewer.layers[name]
        assert layer.colormap.name == "turbo" and tuple(layer.contrast_limits) == window
        assert layer.visible == (name != "TTP")

    # what the GUI shows is analyse_perfusion's result on the same input, on the CT's own grid
    ctp_volume = _volume(ctp)
    expected = analyse_perfusion(ctp_volume, _volume(brain))
    for key in ("core", "hypoperfusion"):
        shown = _volume(viewer.layers[names[key]])
        truth = expected.on_ctp_grid(key)
        np.testing.assert_array_equal(shown.array, truth.array)
        np.testing.assert_allclose(shown.affine, ctp_volume.affine)
    np.testing.assert_allclose(_volume(viewer.layers["CBF"]).array, expected.on_ctp_grid("cbf").array)
    assert expected.regions.core_ml > 0 and expected.regions.hypoperfusion_ml > expected.regions.core_ml
    table = widget.table_values()
    assert table == dict(volume_rows(expected))
    assert table["Core (rCBF < 30 %)"] == f"{expected.regions.core_ml:.1f} ml"
    assert table["Mismatch volume"] == f"{expected.regions.mismatch_ml:.1f} ml"
    assert table["Mismatch ratio"] == f"{expected.regions.mismatch_ratio:.2f}"
    curves = widget.curve_plot.shown()
    np.testing.assert_allclose(curves["aif"], expected.aif.curve)
    np.testing.assert_allclose(curves["vof"], expected.vof.curve)
    # the AIF voxels' points sit where the core read the AIF
    aif_points = viewer.layers[POINT_LAYERS["aif"]]
    world = np.array([aif_points.data_to_world(p) for p in aif_points.data])
    np.testing.assert_allclose(world, voxel_to_world(expected.aif.voxels, expected.affine), atol=1e-6)

    # place the AIF on the first automatic AIF voxel; stricter thresholds; run again
    layers_before = {key: widget.own_layer(key) for key in names}
    n_layers = len(viewer.layers)
    points = widget.place_aif()
    assert points.name == AIF_POINTS_NAME and points.mode == "add" and widget.aif.value is points
    click = world[0]
    points.add(points.world_to_data(click))
    widget.core_rcbf.value, widget.tmax.value = 40.0, 8.0
    _run(widget, qtbot)
    assert errors(notes) == []
    assert len(viewer.layers) == n_layers + 1  # the AIF points; every result layer updated in place
    names = _output_names(widget)
    assert names["core"] == "perfusion core (rCBF<40%)" and names["hypoperfusion"] == "hypoperfusion (Tmax>8s)"
    for key, layer in layers_before.items():
        assert widget.own_layer(key) is layer and layer.name == names[key]
    # the click became a sphere on the CTP's grid, around the clicked voxel, and the AIF was
    # read inside it
    region = widget.aif_region
    assert region is not None and region.same_grid(ctp_volume)
    np.testing.assert_array_equal(region.array, aif_region_from_points(click[None], ctp_volume).array)
    clicked = tuple(np.round(world_to_voxel(click, ctp_volume.affine)[0]).astype(int))
    assert region.array[clicked] == 1 and 3 <= region.array.sum() <= 40
    result = widget.result
    assert result.factors == (1, 1, 1)  # the working grid is the CT's: voxels index both
    assert np.all(region.array[tuple(result.aif.voxels.T)] == 1)
    assert result.regions.settings.core_rcbf == pytest.approx(0.4)
    assert widget.table_values()["Hypoperfusion (Tmax > 8 s)"] == f"{result.regions.hypoperfusion_ml:.1f} ml"
    shown_core = _volume(viewer.layers[names["core"]]).array
    np.testing.assert_array_equal(shown_core, result.on_ctp_grid("core").array)


def test_bad_input_gives_notifications_and_no_layers(make_napari_viewer, qtbot, case, notes):
    # no 4-D layer: only a 3-D image, which the CTP picker does not offer
    viewer = _viewer(make_napari_viewer, case, roles=("dwi",))
    widget = _widget(viewer)
    assert widget.ctp.value is None and widget.brain.value is None
    assert widget.run() is None
    assert "no CT perfusion layer" in errors(notes)[-1] and "'DWI'" in errors(notes)[-1]
    assert widget.place_aif() is None and "no CT perfusion layer" in errors(notes)[-1]

    data, kwargs, kind = volume_to_layer_data(_crop(case.ctp), "CTP", "ctp")
    ctp = viewer.add_image(data, **kwargs)
    assert widget.ctp.value is ctp
    n_layers = len(viewer.layers)
    # an AIF layer without points
    widget.place_aif()
    assert widget.run() is None and "has no points" in errors(notes)[-1]
    points = viewer.layers[AIF_POINTS_NAME]
    n_layers += 1
    # a point outside the CT's field of view: refused in the worker, before the analysis
    points.add(points.world_to_data(np.add(ctp.data_to_world((0, 0, 0, 0))[1:], (0.0, -20.0, 0.0))))
    _run(widget, qtbot)
    assert "outside the CT perfusion's field of view" in errors(notes)[-1]
    # a point inside the field of view but outside the head (a corner of the slice)
    points.data = points.world_to_data(np.asarray(ctp.data_to_world((0, 5, 1, 1))[1:]))[None]
    _run(widget, qtbot)
    assert "outside the brain" in errors(notes)[-1]
    # a brain mask on another grid
    widget.aif.value = None
    mask = viewer.add_labels(np.ones((4, 5, 6), np.uint8), name="small mask")
    widget.brain.value = mask
    _run(widget, qtbot)
    assert "brain mask" in errors(notes)[-1]
    assert len(viewer.layers) == n_layers + 1 and widget.result is None
    assert not any(widget.own_layer(key) for key in _output_names(widget))
    assert widget.table.rowCount() == 0 and widget.curve_plot.shown() == {}


def test_cancel_leaves_no_layers_and_says_so(make_napari_viewer, qtbot, case, notes):
    viewer = _viewer(make_napari_viewer, case, roles=("ctp", "mask"))
    widget = _widget(viewer)
    before = [layer.name for layer in viewer.layers]
    steps = []

    def cancel_after_first_stage(step, total, info):
        # runs in the worker thread (direct connection), like a click right after stage 1
        steps.append(step)
        widget.cancel_token.cancel()
    widget.relay.reported.connect(cancel_after_first_stage, Qt.DirectConnection)
    _run(widget, qtbot)
    assert steps == [1]
    assert [layer.name for layer in viewer.layers] == before
    assert widget.status.value == "Cancelled" and any("cancelled" in m for _, m in notes)
    assert errors(notes) == [] and widget.result is None


def test_manifest_offers_the_widget(make_napari_viewer):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Perfusion maps and core/penumbra")
    assert isinstance(widget, PerfusionWidget)
