"""Compare widget: synthetic vs ground-truth DWI/ADC, lesion contours side by side, metrics.

A thin shell over `ctp2mri.evaluation.compare`: the widget picks layers, turns them into arrays in the
core's ``(X, Y, Z)`` order and shows what the core returns; it computes nothing itself.
"Show lesion contours side by side" is napari's grid mode with contour layers
(`napari_ctp2mri._side_by_side`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, Label, PushButton
from napari.layers import Image, Labels
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QAbstractItemView,
    QAbstractScrollArea,
    QFileDialog,
    QHeaderView,
    QTableWidget,
    QTableWidgetItem,
)

from ctp2mri.evaluation.compare import (
    TABLE_NOTE,
    comparison_metrics,
    format_value,
    make_table,
    prepare_comparison,
    table_rows,
    table_to_csv,
)
from ctp2mri.errors import InputError
from napari_ctp2mri._layers import layer_attributes, spatial_transform
from napari_ctp2mri._side_by_side import CONTOUR_SOURCES, SideBySide

if TYPE_CHECKING:
    import napari

# picker → (label, layer type, optional, default layer name); names as the reader, the
# sample data and the synthesis widget give them, so a fresh comparison needs no picking
PICKERS = {
    "gt_dwi": ("Ground-truth DWI", Image, False, "DWI"),
    "gt_adc": ("Ground-truth ADC", Image, True, "ADC"),
    "syn_dwi": ("Synthetic DWI", Image, False, "synthetic DWI"),
    "syn_adc": ("Synthetic ADC", Image, True, "synthetic ADC"),
    "lesion": ("Lesion", Labels, True, "lesion"),
    "brain": ("Brain mask", Labels, True, "brain mask"),
    "perfusion_core": ("Perfusion core", Labels, True, "perfusion core"),
}
# pickers whose default is a name prefix: the perfusion widget names its core layer after
# the threshold, "perfusion core (rCBF<30%)"
PREFIX_DEFAULTS = {"perfusion_core"}
SLICE_DEBOUNCE_MS = 150
MAX_WIDTH_PX = 480


def _transform(layer: Any) -> np.ndarray:
    """The layer's 4×4 data → world map (the grid it lies on in the viewer)."""
    return spatial_transform(layer_attributes(layer), layer.ndim)


class CompareWidget(Container):
    """Compare synthetic DWI/ADC with the ground truth: metrics, contours, CSV export.

    Parameters
    ----------
    viewer
        The napari viewer (npe2 passes it).
    """

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self.viewer = viewer
        self.pickers: dict[str, ComboBox] = {}
        self.view = SideBySide(viewer)  # its contour layers are views of masks, not inputs
        # pickers the user has not touched follow the default names as layers come and go
        self._auto = set(PICKERS)
        self._auto_setting = False
        for key, (label, kind, _optional, _) in PICKERS.items():
            # every picker can be empty: a required one left empty gets a clear message,
            # where a first-layer default would silently compare the wrong images
            combo = ComboBox(label=label, choices=self._choices(kind), nullable=True)
            combo.changed.connect(lambda _value, key=key: self._on_pick(key))
            self.pickers[key] = combo
            self.append(combo)
        self.compute_button = PushButton(text="Compute metrics")
        self.compute_button.changed.connect(self.compute)
        self.side_by_side = CheckBox(text="Show lesion contours side by side")
        self.side_by_side.changed.connect(self.show_side_by_side)
        self.export_button = PushButton(text="Export CSV…")
        self.export_button.changed.connect(self._export_dialog)
        self.status = Label(value="")
        self.extend([self.compute_button, self.side_by_side, self.status])
        self.table_widget = QTableWidget(0, 2)
        self.table_widget.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table_widget.setHorizontalHeaderLabels(["Whole volume", "Slice"])
        # a dock widget as wide as its longest text would squeeze the canvas
        self.status.native.setWordWrap(True)
        self.table_widget.setSizeAdjustPolicy(QAbstractScrollArea.AdjustIgnored)
        self.table_widget.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeToContents)
        self.table_widget.horizontalHeader().setStretchLastSection(True)
        self.table_widget.setToolTip(TABLE_NOTE)
        self.native.setMaximumWidth(MAX_WIDTH_PX)
        self.native.layout().addWidget(self.table_widget)
        self.append(self.export_button)

        self.table: dict[str, Any] | None = None  # compare_volumes()-shaped, as shown
        self.worker: Any = None  # the running whole-volume worker, if any
        self.slice_worker: Any = None
        self._prepared = None
        self._slice_timer = QTimer(self.native)
        self._slice_timer.setSingleShot(True)
        self._slice_timer.setInterval(SLICE_DEBOUNCE_MS)
        self._slice_timer.timeout.connect(self._update_slice)

        events = viewer.layers.events
        self._viewer_hooks = [(event, self._on_layers_changed)
                              for event in (events.inserted, events.removed, events.moved)]
        self._viewer_hooks.append((viewer.dims.events.current_step, self._on_step))
        for event, callback in self._viewer_hooks:
            event.connect(callback)
        # a closed widget must stop listening, or the viewer would call into deleted Qt objects
        self.native.destroyed.connect(self._disconnect_viewer)
        self._on_layers_changed()

    def _on_step(self, _event: Any = None) -> None:
        self._slice_timer.start()  # debounce: dragging the slider computes once at the end

    def _disconnect_viewer(self, *_args: Any) -> None:
        for event, callback in self._viewer_hooks:
            event.disconnect(callback)
        self._viewer_hooks = []

    # layer pickers ----------------------------------------------------------------------
    def _choices(self, kind: type) -> Any:
        def choices(_widget: Any = None) -> list[tuple[str, Any]]:
            # the contour layers are views of the lesion, not inputs
            return [(layer.name, layer) for layer in self.viewer.layers
                    if isinstance(layer, kind) and layer not in self.view.contours]
        return choices

    def _on_pick(self, key: str) -> None:
        if not self._auto_setting:
            self._auto.discard(key)
        self._invalidate()

    def _on_layers_changed(self, _event: Any = None) -> None:
        self._auto_setting = True
        try:
            for key, combo in self.pickers.items():
                combo.reset_choices()
                if key in self._auto:
                    combo.value = self._default_layer(key)
        finally:
            self._auto_setting = False

    def _default_layer(self, key: str) -> Any:
        _, kind, _, default = PICKERS[key]
        layers = self.viewer.layers
        layer = layers[default] if default in layers else None  # noqa: SIM401
        if layer is None and key in PREFIX_DEFAULTS:
            layer = next((x for x in layers if x.name.startswith(default) and isinstance(x, kind)
                          and x not in self.view.contours), None)
        return layer if isinstance(layer, kind) else None

    def selected(self) -> dict[str, Any]:
        """The picked layers by role (None for an empty optional picker)."""
        return {key: combo.value for key, combo in self.pickers.items()}

    # arrays for the core ----------------------------------------------------------------
    def _inputs(self) -> dict[str, Any]:
        """Arrays in the core's (X, Y, Z) order and the spacing; checks the layers' grid."""
        layers = self.selected()
        for key, (label, _, optional, _) in PICKERS.items():
            if layers[key] is None and not optional:
                raise InputError(f"pick a {label} layer (an Image layer in the viewer)")
        reference = layers["gt_dwi"]
        for key, layer in layers.items():
            if layer is None:
                continue
            if layer.ndim != 3 or (isinstance(layer, Image) and (layer.rgb or layer.multiscale)):
                raise InputError(f"{PICKERS[key][0]} {layer.name!r} has {layer.ndim} dimensions; "
                                 "the comparison needs a 3-D (z, y, x) volume, not the CT "
                                 "perfusion series or an RGB image")
            if layer.data.shape != reference.data.shape:
                raise InputError(f"{PICKERS[key][0]} {layer.name!r} has shape {layer.data.shape} "
                                 f"but the ground-truth DWI {reference.name!r} has "
                                 f"{reference.data.shape}; pick layers on the same grid")
            # the reader builds these transforms from the files' affines, so equal transforms
            # mean the same grid in the patient, with or without stored metadata
            a, b = _transform(layer), _transform(reference)
            if not np.allclose(a, b, rtol=0, atol=1e-4 * max(1.0, float(np.abs(b).max()))):
                raise InputError(f"{PICKERS[key][0]} {layer.name!r} lies elsewhere in the patient "
                                 f"than the ground-truth DWI {reference.name!r} (different voxel "
                                 "size, position or orientation); resample it onto that grid")
        spacing = np.linalg.norm(_transform(reference)[:3, :3], axis=0)[::-1]

        def array(layer: Any) -> np.ndarray | None:
            # napari (z, y, x) → core (x, y, z). A copy, so that painting in the viewer while
            # the worker runs cannot change the arrays under it (a few MB per volume).
            return None if layer is None else np.array(layer.data).T
        return {**{key: array(layer) for key, layer in layers.items()}, "spacing": spacing}

    def current_slice(self) -> int:
        """Index of the shown axial slice in the ground-truth DWI's data."""
        layer = self.pickers["gt_dwi"].value
        if layer is None:
            raise InputError("pick a Ground-truth DWI layer")
        k = int(np.round(layer.world_to_data(self.viewer.dims.point)[0]))
        return int(np.clip(k, 0, layer.data.shape[0] - 1))

    # metrics ----------------------------------------------------------------------------
    def compute(self) -> Any:
        """Start the whole-volume comparison in a worker thread; returns the worker."""
        try:
            inputs = self._inputs()
            k = self.current_slice()
        except InputError as exc:
            show_error(str(exc))
            return None
        self._invalidate()
        self.status.value = "Computing the whole-volume metrics…"
        self.compute_button.enabled = False

        def work() -> tuple[Any, dict[str, Any]]:
            prepared = prepare_comparison(inputs["gt_dwi"], inputs["gt_adc"], inputs["syn_dwi"],
                                          inputs["syn_adc"], inputs["brain"], inputs["lesion"],
                                          inputs["spacing"], inputs["perfusion_core"])
            return prepared, make_table(prepared, comparison_metrics(prepared), k)

        self.worker = self._start(work, self._on_volume_done, self._on_volume_finished)
        return self.worker

    def _start(self, work: Any, returned: Any, finished: Any) -> Any:
        # errored is connected at creation: a worker without an errored handler re-raises
        # its exception in the Qt event loop (a traceback instead of a notification)
        worker = create_worker(work, _start_thread=False, _connect={
            "returned": returned, "errored": self._on_error, "finished": finished})
        worker.start()
        return worker

    def _on_volume_finished(self) -> None:
        self.compute_button.enabled = True

    def _on_volume_done(self, result: tuple[Any, dict[str, Any]]) -> None:
        self._prepared, self.table = result
        self.status.value = self._range_note()
        self._show_table()
        self._update_slice()  # the slice may have moved while the volume was computed

    def _update_slice(self) -> None:
        """Recompute the current slice's column in a worker (one at a time, latest wins)."""
        if self._prepared is None or self.table is None:
            return
        if self.slice_worker is not None:
            return  # _on_slice_done looks again when the running one ends
        try:
            k = self.current_slice()
        except InputError:
            return
        if k == self.table["slice_index"]:
            return
        prepared = self._prepared

        def work() -> tuple[Any, int, dict[str, float]]:
            return prepared, k, comparison_metrics(prepared, k)

        self.slice_worker = self._start(work, self._on_slice_done, self._on_slice_finished)

    def _on_slice_done(self, result: tuple[Any, int, dict[str, float]]) -> None:
        prepared, k, values = result
        if prepared is self._prepared and self.table is not None:
            self.table = {**self.table, "slice": values, "slice_index": k}
            self._show_table()

    def _on_slice_finished(self) -> None:
        self.slice_worker = None
        self._update_slice()

    def _on_error(self, exc: Exception) -> None:
        self.status.value = ""
        if isinstance(exc, InputError):
            show_error(str(exc))
        else:  # a bug, not the user's fault: still a notification, with its type
            show_error(f"Comparison failed ({type(exc).__name__}): {exc}")

    def _invalidate(self, _value: Any = None) -> None:
        self._prepared, self.table = None, None
        self.table_widget.setRowCount(0)
        self.status.value = ""

    def _range_note(self) -> str:
        ranges = (self.table or {}).get("ranges", {})
        parts = [f"{ch} {lo:.4g}–{hi:.4g}" for ch, (lo, hi) in ranges.items()]
        return "Normalised with the ground truth's brain 0.5–99.5 % range: " + ", ".join(parts)

    def _show_table(self) -> None:
        table = self.table
        rows = table_rows(table)
        self.table_widget.setRowCount(len(rows))
        self.table_widget.setHorizontalHeaderLabels(
            ["Whole volume", f"Slice z = {table['slice_index']}"])
        self.table_widget.setVerticalHeaderLabels([row["label"] for row in rows])
        for i, row in enumerate(rows):
            for j, column in enumerate(("whole_volume", "slice")):
                value = row[column]
                text = format_value(row["metric"], math.nan if value is None else value)
                self.table_widget.setItem(i, j, QTableWidgetItem(text))

    # CSV --------------------------------------------------------------------------------
    def export_csv(self, path: str | Path) -> Path | None:
        """Write the shown table (whole volume and current slice) to ``path``."""
        if self.table is None:
            show_error("Nothing to export yet: press “Compute metrics” first")
            return None
        try:
            written = table_to_csv(self.table, path)
        except (InputError, OSError) as exc:
            show_error(f"Could not write {path}: {exc}")
            return None
        show_info(f"Saved the comparison table to {written}")
        return written

    def _export_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self.native, "Export comparison table",
                                              "comparison.csv", "CSV (*.csv)")
        if path:
            self.export_csv(path)

    # side by side with contours ---------------------------------------------------------
    def show_side_by_side(self, on: bool = True) -> None:
        """Grid view: ground truth | synthetic (DWI, then ADC), the lesion (and the perfusion
        core, when picked) outlined on each."""
        if not on:
            self._restore_view()
            return
        layers = self.selected()
        if layers["gt_dwi"] is None or layers["syn_dwi"] is None:
            show_error("pick the ground-truth and synthetic DWI layers first")
            self._set_checkbox(False)
            return
        images = [layers["gt_dwi"], layers["syn_dwi"]]
        if layers["gt_adc"] is not None and layers["syn_adc"] is not None:
            images += [layers["gt_adc"], layers["syn_adc"]]
        self._restore_view()
        # one contour per image of each outlined mask, e.g. "lesion contour (DWI)"
        self.view.show(images, [(PICKERS[key][0].lower(), layers[key]) for key in CONTOUR_SOURCES
                                if layers[key] is not None])
        self._set_checkbox(True)

    def _set_checkbox(self, on: bool) -> None:
        # in step with the view when called directly, without re-entering show_side_by_side
        with self.side_by_side.changed.blocked():
            self.side_by_side.value = on

    def _restore_view(self) -> None:
        if self.view.restore():
            self._set_checkbox(False)
