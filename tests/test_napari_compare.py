"""The compare widget in a real napari viewer (needs a display: run under xvfb-run)."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
from _helpers_napari import errors
from qtpy.QtCore import QCoreApplication, QEvent

from ctp2mri.evaluation.compare import compare_volumes, comparison_metrics, format_value
from napari_ctp2mri._compare_widget import CompareWidget
from napari_ctp2mri._side_by_side import viewer_grid as _grid

pytestmark = pytest.mark.gui

PLUGIN = "napari-ctp2mri"
WAIT_MS = 60_000


def _add_synthetic(viewer, rng):
    """A stand-in for a model's output: the phantom's DWI/ADC with noise and a lesion whose
    intensities are off (DWI less bright, ADC less low, so part of the core is missed)."""
    lesion = viewer.layers["lesion"].data != 0
    for name, noise, lesion_shift in (("DWI", 10.0, -40.0), ("ADC", 30.0, 120.0)):
        gt = viewer.layers[name]
        data = gt.data + rng.normal(0, noise, gt.data.shape).astype(np.float32)
        data[lesion] += lesion_shift
        viewer.add_image(data, name=f"synthetic {name}", scale=gt.scale, translate=gt.translate,
                         units=gt.units, contrast_limits=gt.contrast_limits)


def _expected(viewer, k):
    """compare_volumes on the same layers' arrays, in the core's (x, y, z) order."""
    arrays = {name: viewer.layers[name].data.T for name in
              ("DWI", "ADC", "synthetic DWI", "synthetic ADC", "brain mask", "lesion")}
    return compare_volumes(arrays["DWI"], arrays["ADC"], arrays["synthetic DWI"],
                           arrays["synthetic ADC"], arrays["brain mask"], arrays["lesion"],
                           spacing=(2.0, 2.0, 5.0), slice_index=k)


def test_compare_widget_metrics_contours_and_csv(make_napari_viewer, qtbot, tmp_path, notes):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "stroke-phantom")
    _add_synthetic(viewer, np.random.default_rng(0))
    widget = CompareWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Compare")

    # the pickers find the layers by the names the reader and the synthesis give them
    for key, name in (("gt_dwi", "DWI"), ("gt_adc", "ADC"), ("syn_dwi", "synthetic DWI"),
                      ("syn_adc", "synthetic ADC"), ("lesion", "lesion"),
                      ("brain", "brain mask")):
        assert widget.pickers[key].value is viewer.layers[name]

    k = 17  # through the phantom's lesion
    viewer.dims.set_current_step(1, k)  # axis 0 is the CTP's time
    assert widget.current_slice() == k
    widget.compute()
    qtbot.waitUntil(lambda: widget.table is not None, timeout=WAIT_MS)
    expected = _expected(viewer, k)
    assert widget.table["slice_index"] == k
    assert widget.table["volume"] == expected["volume"]
    assert widget.table["slice"] == expected["slice"]
    assert expected["volume"]["lesion_ml"] > 10 and 0 < expected["volume"]["core_dice"] < 1
    # the table shows them: one row per metric, whole volume | slice
    table = widget.table_widget
    assert table.rowCount() == len(expected["volume"])
    first = next(iter(expected["volume"]))
    assert table.item(0, 0).text() == format_value(first, expected["volume"][first])
    assert table.item(0, 1).text() == format_value(first, expected["slice"][first])
    assert table.horizontalHeaderItem(1).text() == f"Slice z = {k}"

    # moving the slider recomputes the slice column (debounced, in a worker)
    viewer.dims.set_current_step(1, k + 2)
    qtbot.waitUntil(lambda: widget.table["slice_index"] == k + 2, timeout=WAIT_MS)
    prepared = widget._prepared
    assert widget.table["slice"] == comparison_metrics(prepared, k + 2)
    assert widget.table["volume"] == expected["volume"]

    # CSV export writes the numbers shown
    path = widget.export_csv(tmp_path / "comparison.csv")
    with open(path, newline="") as f:
        rows = {row["metric"]: row for row in csv.DictReader(f)}
    for key, value in widget.table["volume"].items():
        assert float(rows[key]["whole_volume"]) == value
        assert float(rows[key][f"slice_{k + 2}"]) == widget.table["slice"][key]

    # side by side: ground truth | synthetic, DWI above ADC, the lesion outlined in each cell
    before = {layer.name: layer.visible for layer in viewer.layers}
    widget.show_side_by_side(True)
    assert widget.side_by_side.value
    grid = _grid(viewer)
    assert grid.enabled and grid.stride == 2 and tuple(grid.shape) == (2, 2)
    lesion = viewer.layers["lesion"]
    cells = {"DWI": (0, 0), "synthetic DWI": (0, 1), "ADC": (1, 0), "synthetic ADC": (1, 1)}
    for i, (name, cell) in enumerate(cells.items()):
        image, contour = viewer.layers[2 * i], viewer.layers[2 * i + 1]
        assert image.name == name and image.visible
        assert contour.data is lesion.data and contour.contour == 1 and contour.visible
        assert grid.position(2 * i, viewer.layers) == cell
        assert grid.position(2 * i + 1, viewer.layers) == cell
        np.testing.assert_allclose(contour.scale, lesion.scale)
    assert not any(layer.visible for layer in viewer.layers[8:])  # no stray viewboxes
    assert grid.actual_shape(viewer.layers) == (2, 2)
    assert viewer.layers["synthetic ADC"].contrast_limits == viewer.layers["ADC"].contrast_limits
    shot = viewer.screenshot(canvas_only=True)  # draws the four viewboxes without error
    if os.environ.get("CTP2MRI_SCREENSHOT_DIR"):
        from imageio.v3 import imwrite
        imwrite(os.path.join(os.environ["CTP2MRI_SCREENSHOT_DIR"], "compare.png"), shot)
    # a lesion painted afterwards shows in every cell (the contours share its array)
    lesion.data[k, 5, 5] = 1
    assert all(viewer.layers[2 * i + 1].data[k, 5, 5] == 1 for i in range(4))

    widget.side_by_side.value = False  # the checkbox turns it off
    assert not grid.enabled
    assert not any(layer.name.startswith("lesion contour") for layer in viewer.layers)
    assert {layer.name: layer.visible for layer in viewer.layers} == before
    assert errors(notes) == []


def test_wrong_layers_give_notifications_not_crashes(make_napari_viewer, qtbot, notes):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "stroke-phantom")
    listeners = len(viewer.dims.events.current_step.callbacks)
    # Plugins ▸ Compare synthetic vs ground truth: the manifest's widget contribution
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Compare synthetic vs ground truth")
    assert isinstance(widget, CompareWidget)
    assert widget.pickers["syn_dwi"].value is None  # no synthetic layer yet
    assert widget.compute() is None
    assert "Synthetic DWI" in errors(notes)[-1]

    widget.pickers["syn_dwi"].value = viewer.layers["CTP"]  # 4-D
    assert widget.compute() is None
    assert "3-D" in errors(notes)[-1] and "CTP" in errors(notes)[-1]

    dwi = viewer.layers["DWI"]
    widget.pickers["syn_dwi"].value = viewer.add_image(dwi.data[:, ::2], name="half",
                                                       scale=dwi.scale)
    assert widget.compute() is None
    assert "same grid" in errors(notes)[-1]

    shifted = viewer.add_image(dwi.data, name="shifted", scale=dwi.scale,
                               translate=np.add(dwi.translate, (0.0, 10.0, 0.0)))
    widget.pickers["syn_dwi"].value = shifted
    assert widget.compute() is None
    assert "lies elsewhere" in errors(notes)[-1]

    # a problem found in the worker (a constant ground truth) is a notification too
    widget.pickers["syn_dwi"].value = viewer.layers["ADC"]
    widget.pickers["gt_dwi"].value = viewer.add_image(np.ones_like(dwi.data), name="flat",
                                                      scale=dwi.scale, translate=dwi.translate)
    n = len(errors(notes))
    assert widget.compute() is not None  # the grid is fine; the worker finds the problem
    qtbot.waitUntil(lambda: len(errors(notes)) > n, timeout=WAIT_MS)
    assert "constant" in errors(notes)[-1] and widget.table is None

    # a deleted widget stops listening to the viewer (which would call into dead Qt objects)
    assert len(viewer.dims.events.current_step.callbacks) == listeners + 1
    widget.native.deleteLater()
    QCoreApplication.sendPostedEvents(None, QEvent.DeferredDelete)
    assert len(viewer.dims.events.current_step.callbacks) == listeners
    viewer.dims.set_current_step(1, 3)


def test_perfusion_core_rows_and_contours(make_napari_viewer, qtbot, notes):
    from ctp2mri.evaluation.lesion_metrics import dice, volume_ml

    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "stroke-phantom")
    _add_synthetic(viewer, np.random.default_rng(0))
    lesion = viewer.layers["lesion"]
    # a stand-in for the perfusion widget's core: the lesion shifted by 3 voxels, named as
    # the widget names it (the picker finds it by that name's prefix)
    core = viewer.add_labels(np.roll(lesion.data, 3, axis=2), name="perfusion core (rCBF<30%)",
                             scale=lesion.scale, translate=lesion.translate, units=lesion.units,
                             colormap={None: "transparent", 1: "magenta"})
    widget = CompareWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Compare")
    assert widget.pickers["perfusion_core"].value is core
    k = 17
    viewer.dims.set_current_step(1, k)
    widget.compute()
    qtbot.waitUntil(lambda: widget.table is not None, timeout=WAIT_MS)
    brain = viewer.layers["brain mask"].data.T != 0
    mask, truth = (core.data.T != 0) & brain, (lesion.data.T != 0) & brain
    spacing = (2.0, 2.0, 5.0)
    volume, sliced = widget.table["volume"], widget.table["slice"]
    assert volume["perfusion_core_dice_lesion"] == dice(mask, truth)
    assert volume["perfusion_core_ml"] == volume_ml(mask, spacing)
    assert sliced["perfusion_core_dice_lesion"] == dice(mask[..., k], truth[..., k])
    assert sliced["perfusion_core_ml"] == volume_ml(mask[..., k], spacing)
    assert 0 < volume["perfusion_core_dice_lesion"] < 1
    # shown beside the synthetic ADC core's Dice and volume
    table = widget.table_widget
    labels = [table.verticalHeaderItem(i).text() for i in range(table.rowCount())]
    i = labels.index("perfusion core Dice vs lesion")
    assert labels[i - 1] == "core Dice vs lesion"
    assert table.item(i, 0).text() == format_value("perfusion_core_dice_lesion",
                                                   volume["perfusion_core_dice_lesion"])
    j = labels.index("perfusion core volume (ml)")
    assert labels[j - 1] == "core (ml)"
    assert table.item(j, 1).text() == format_value("perfusion_core_ml", sliced["perfusion_core_ml"])

    # side by side: each image outlined by the lesion and by the perfusion core
    widget.show_side_by_side(True)
    grid = _grid(viewer)
    assert grid.enabled and grid.stride == 3 and tuple(grid.shape) == (2, 2)
    for i, name in enumerate(("DWI", "synthetic DWI", "ADC", "synthetic ADC")):
        image, outline, perfusion = (viewer.layers[3 * i + n] for n in range(3))
        assert image.name == name and outline.data is lesion.data and perfusion.data is core.data
        assert perfusion.name == f"perfusion core contour ({name})" and perfusion.contour == 1
        assert grid.position(3 * i + 2, viewer.layers) == grid.position(3 * i, viewer.layers)
    widget.side_by_side.value = False
    assert not any("contour" in layer.name for layer in viewer.layers)
    assert errors(notes) == []
