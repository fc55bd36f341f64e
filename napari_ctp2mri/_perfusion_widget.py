"""Perfusion widget: a CTP layer in; CBF, CBV, MTT, Tmax, TTP maps, the perfusion core and the
hypoperfused tissue out, with the AIF/VOF curves and the mismatch volumes.

A thin shell over `ctp2mri.perfusion.analyse_perfusion`: the widget collects the inputs and
thresholds, runs the core in a napari worker thread and turns the returned maps and masks into
layers on the CTP layer's geometry (`napari_ctp2mri._perfusion_layers`). It holds no perfusion
logic.

Placing the AIF
---------------
By default the core selects the arterial input function itself. *Place AIF* adds a Points layer
called "AIF" in add mode on the CTP's grid; each click on an artery becomes a sphere of
`AIF_RADIUS_MM` on the CT's own voxel grid (`aif_region_from_points`), passed to the core as
``aif_region`` (the core picks the artery's voxels inside it).

Progress and cancel are the shared worker shell's (`napari_ctp2mri._worker_widget`): the core's
``progress`` callback emits a queued Qt signal, and Cancel sets a `CancelToken` the core checks
between its stages.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import ComboBox, FloatSpinBox, Label, PushButton
from napari.layers import Image, Labels, Points
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtWidgets import (
    QAbstractItemView,
    QAbstractScrollArea,
    QHeaderView,
    QTableWidget,
    QTableWidgetItem,
)

from ctp2mri.errors import InputError
from ctp2mri.io.volume import Volume
from ctp2mri.perfusion import PerfusionResult, PerfusionSettings, RegionSettings, analyse_perfusion
from ctp2mri.progress import CancelToken
from napari_ctp2mri._curve_plot import CurvePlot
from napari_ctp2mri._layers import (
    META_KEY,
    checked_ctp_layer,
    layer_attributes,
    layer_to_volume,
    spatial_transform,
    update_geometry,
)
from napari_ctp2mri._perfusion_layers import (
    AIF_COLOUR,
    AIF_POINTS_NAME,
    AIF_RADIUS_MM,
    SOURCE,
    PerfusionRun,
    aif_region_from_points,
    in_plane_mm,
    point_geometry,
    result_layers,
    volume_rows,
)
from napari_ctp2mri._worker_widget import WorkerWidget

if TYPE_CHECKING:
    import napari

__all__ = ["PerfusionWidget"]

REGION_CONTOUR_PX = 2
MAX_WIDTH_PX = 440


class PerfusionWidget(WorkerWidget):
    """Perfusion maps, core and hypoperfusion of a CTP layer, computed in a worker thread.

    Parameters
    ----------
    viewer
        The napari viewer (npe2 passes it).
    """

    TASK = "Perfusion analysis"

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(viewer)
        defaults = RegionSettings()
        self.ctp = ComboBox(label="CTP", choices=self._choices(Image), nullable=True,
                            tooltip="4-D CT perfusion layer (time, z, y, x) in HU")
        self.brain = ComboBox(label="Brain mask", choices=self._choices(Labels), nullable=True,
                              tooltip="Labels layer on the CTP's grid; empty: derived from the CT")
        self.aif = ComboBox(label="AIF", choices=self._choices(Points), nullable=True,
                            tooltip="Points on an artery (Place AIF); empty: selected "
                            "automatically")
        self.place_button = PushButton(text="Place AIF…",
                                       tooltip="Add a Points layer 'AIF' and click on an artery "
                                       f"(each point reads the AIF within {AIF_RADIUS_MM:g} mm)")
        self.core_rcbf = FloatSpinBox(label="Core: rCBF below (%)", min=1.0, max=100.0, step=1.0,
                                      value=round(100 * defaults.core_rcbf, 1),
                                      tooltip="Core: CBF below this share of the healthy "
                                      "hemisphere's")
        self.tmax = FloatSpinBox(label="Hypoperfusion: Tmax above (s)", min=0.5, max=60.0, step=0.5,
                                 value=defaults.hypoperfusion_tmax_s)
        self.min_island = FloatSpinBox(label="Smallest island (ml)", min=0.0, max=100.0, step=0.1,
                                       value=defaults.min_island_ml,
                                       tooltip="Connected pieces of core or hypoperfusion smaller "
                                       "than this are removed as noise")
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.status = Label(value="")
        self.extend([self.ctp, self.brain, self.aif, self.place_button, self.core_rcbf, self.tmax,
                     self.min_island, self.run_button, self.cancel_button, self.status])
        layout = self.native.layout()
        self._add_progress_bar()
        self.table = QTableWidget(0, 1)
        self.table.setHorizontalHeaderLabels(["Last run"])
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.setSizeAdjustPolicy(QAbstractScrollArea.AdjustIgnored)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.Stretch)
        self.table.setToolTip("The last finished run (its layers are in the viewer). Volumes "
                              "on the analysis' working grid; mismatch: the hypoperfused tissue "
                              "outside the core; reference CBF: the median CBF of the healthy "
                              "hemisphere's tissue (its side in brackets)")
        self.table.setMinimumHeight(150)
        layout.addWidget(self.table)
        from napari.utils.theme import get_theme

        theme = get_theme(viewer.theme)
        self.curve_plot = CurvePlot(theme.background.as_hex(), theme.text.as_hex())
        layout.addWidget(self.curve_plot.canvas)
        self.status.native.setWordWrap(True)
        self.native.setMaximumWidth(MAX_WIDTH_PX)

        self.run_buttons = [self.run_button]
        self.result: PerfusionResult | None = None  # the last finished run's result
        self.aif_region: Volume | None = None  # the last finished run's placed AIF region
        self._run: PerfusionRun | None = None
        # pickers the user has not touched follow the default layers as layers come and go
        self._auto = {"ctp", "brain", "aif"}
        self._auto_setting = False

        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.place_button.changed.connect(self.place_aif)
        for key in self._auto:
            getattr(self, key).changed.connect(lambda _value, key=key: self._on_pick(key))
        events = viewer.layers.events
        for event in (events.inserted, events.removed, events.moved):
            self._listen(event, self._on_layers_changed)
        self._on_layers_changed()

    # choices ------------------------------------------------------------------------------
    def _choices(self, kind: type) -> Callable[[Any], list[tuple[str, Any]]]:
        def choices(_widget: Any = None) -> list[tuple[str, Any]]:
            return [(layer.name, layer) for layer in self.viewer.layers
                    if isinstance(layer, kind) and self._offered(layer)]
        return choices

    def _offered(self, layer: Any) -> bool:
        if isinstance(layer, Image):
            return layer.ndim == 4 and not layer.rgb
        # this widget's own outputs are no inputs (an AIF read from the last AIF is circular)
        return (layer.metadata.get(META_KEY) or {}).get("source") != SOURCE

    def _default(self, key: str, layers: list[Any]) -> Any:
        names = {"ctp": "CTP", "brain": "brain mask", "aif": AIF_POINTS_NAME}
        named = next((x for x in layers if x.name == names[key]), None)
        # the CTP has one obvious fallback; a wrong brain mask or AIF would silently mislead
        return named if named is not None or key != "ctp" else (layers[0] if layers else None)

    def _on_pick(self, key: str) -> None:
        if not self._auto_setting:
            self._auto.discard(key)

    def _on_layers_changed(self, _event: Any = None) -> None:
        self._auto_setting = True
        try:
            for key, kind in (("ctp", Image), ("brain", Labels), ("aif", Points)):
                combo = getattr(self, key)
                current = combo.value
                combo.reset_choices()
                layers = [layer for _, layer in self._choices(kind)()]
                if key in self._auto or current not in layers:
                    combo.value = self._default(key, layers)
        finally:
            self._auto_setting = False

    # inputs -----------------------------------------------------------------------------
    def _ctp_layer(self) -> Any:
        return checked_ctp_layer(self.viewer, self.ctp.value, "to analyse")

    def _mask_layer(self) -> Any:
        layer = self.brain.value
        if layer is not None and layer not in self.viewer.layers:
            raise InputError(f"the brain mask {layer.name!r} was removed; pick another, or none "
                             "to derive it from the CT")
        return layer

    def _aif_points(self) -> np.ndarray | None:
        """The AIF layer's points in napari world coordinates ``(z, y, x)``, or None (automatic)."""
        layer = self.aif.value
        if layer is None:
            return None
        if layer not in self.viewer.layers:
            raise InputError(f"the AIF layer {layer.name!r} was removed; pick another, or none "
                             "to select the AIF automatically")
        if len(layer.data) == 0:
            raise InputError(f"the AIF layer {layer.name!r} has no points; click on an artery in "
                             "it (Place AIF), or leave the AIF choice empty to select it "
                             "automatically")
        world = np.array([layer.data_to_world(point) for point in np.asarray(layer.data)],
                         dtype=np.float64)
        return world[:, -3:]  # a 4-D point's time is of no interest: the region spans all frames

    def _settings(self) -> PerfusionSettings:
        regions = replace(RegionSettings(), core_rcbf=self.core_rcbf.value / 100.0,
                          hypoperfusion_tmax_s=float(self.tmax.value),
                          min_island_ml=float(self.min_island.value))
        return PerfusionSettings(regions=regions)

    # place AIF ----------------------------------------------------------------------------
    def place_aif(self) -> Any:
        """Add (or select) the "AIF" Points layer on the CTP's grid in add mode; returns it."""
        try:
            ctp = self._ctp_layer()
            spatial = spatial_transform(layer_attributes(ctp), ctp.ndim)
        except InputError as exc:
            show_error(str(exc))
            return None
        layer = self.aif.value
        if layer is None or layer not in self.viewer.layers:
            # drawn as large as the sphere the core reads, so the user sees what is read
            layer = self.viewer.add_points(np.empty((0, 3)), ndim=3, name=AIF_POINTS_NAME,
                                           size=2 * AIF_RADIUS_MM / in_plane_mm(spatial),
                                           face_color="transparent", border_color=AIF_COLOUR,
                                           border_width=0.15, **point_geometry(spatial))
            self.aif.value = layer
        self.viewer.layers.selection.active = layer
        layer.mode = "add"
        show_info("Click on an artery (the MCA or the ICA) where the bolus is brightest; each "
                  f"point reads the AIF within {AIF_RADIUS_MM:g} mm. Then press Run.")
        return layer

    # run --------------------------------------------------------------------------------
    def run(self) -> Any:
        """Start an analysis in a worker thread; returns the worker (None on bad input)."""
        if self.busy:
            return None  # Run is disabled while running; a direct call is ignored too
        try:
            layer = self._ctp_layer()
            mask = self._mask_layer()
            points = self._aif_points()
            settings = self._settings()
            attributes = layer_attributes(layer)
            spatial = spatial_transform(attributes, layer.ndim)  # refuses time mixed with space
        except InputError as exc:
            show_error(str(exc))
            return None
        data = layer.data
        mask_input = None if mask is None else (np.array(mask.data), layer_attributes(mask))
        token, report = CancelToken(), self._reporter()

        def work() -> PerfusionRun:
            start = time.perf_counter()
            ctp = layer_to_volume(data, attributes)
            brain = None if mask_input is None else layer_to_volume(*mask_input)
            region = None if points is None else aif_region_from_points(points, ctp)
            result = analyse_perfusion(ctp, brain, region, settings, progress=report, cancel=token)
            layers = result_layers(result, spatial, cancel=token)
            token.raise_if_cancelled()
            return PerfusionRun(result, region, layers, time.perf_counter() - start)

        return self._start_worker(work, self._on_returned, token, f"Reading {layer.name!r}…")

    def _on_progress(self, step: int, total: int, info: dict[str, Any]) -> None:
        if not self._advance(step, total):
            return  # a report queued before the run ended
        stage = info.get("stage", "")
        self.progress_bar.setFormat(f"step {step}/{total}" + (f" · {stage}" if stage else ""))
        if not self.cancelling:
            self.status.value = ("Mapping the results onto the CTP's grid…" if step >= total
                                 else f"Analysing: {stage}…")

    def _on_returned(self, run: PerfusionRun) -> None:
        if not self._accepts():
            return
        self._run, self.result, self.aif_region = run, run.result, run.aif_region
        self._show_numbers(run.result)
        self.status.value = "Adding the layers…"
        # nine layers: one per event-loop turn
        self._apply_stepwise([lambda new=new: self._put_layer(*new) for new in run.layers])

    def _on_applied(self) -> None:
        r = self.result.regions
        self.status.value = (f"Done in {self._run.seconds:.1f} s: core {r.core_ml:.1f} ml, "
                             f"hypoperfusion {r.hypoperfusion_ml:.1f} ml, "
                             f"mismatch {r.mismatch_ml:.1f} ml")
        for note in self.result.notes:
            show_warning(note)

    def _show_numbers(self, result: PerfusionResult) -> None:
        rows = volume_rows(result)
        self.table.setRowCount(len(rows))
        self.table.setVerticalHeaderLabels([label for label, _ in rows])
        for i, (_, value) in enumerate(rows):
            self.table.setItem(i, 0, QTableWidgetItem(value))
        aif = result.aif
        label = "AIF (" + ("placed" if self.aif_region is not None else "automatic")
        if aif.scale != 1.0:  # the partial-volume correction by the VOF
            label += f", ×{aif.scale:.2f}"
        vof = None if result.vof is None else result.vof.curve
        self.curve_plot.show(result.times, aif.curve, vof, aif_label=label + ")", vof_label="VOF")

    def table_values(self) -> dict[str, str]:
        """The results table as shown: ``{row label: text}``."""
        return {self.table.verticalHeaderItem(i).text(): self.table.item(i, 0).text()
                for i in range(self.table.rowCount())}

    # layers -----------------------------------------------------------------------------
    def own_layer(self, key: str) -> Any:
        """This widget's layer of output ``key`` (``cbf``, …, ``core``, ``aif``), else None.

        Found by its metadata, not its name: the region layers are renamed when the thresholds
        change, and a user's own layer called "CBF" is never overwritten.
        """
        for layer in self.viewer.layers:
            meta = layer.metadata.get(META_KEY) or {}
            if meta.get("source") == SOURCE and meta.get("output") == key:
                return layer
        return None

    def _put_layer(self, key: str, data: Any, kwargs: dict[str, Any], kind: str) -> None:
        layers = self.viewer.layers
        old = self.own_layer(key)
        ndim = 3 if kind == "points" else np.ndim(data)
        if old is None or type(old).__name__.lower() != kind or old.ndim != ndim:
            index = layers.index(old) if old is not None else len(layers)
            if old is not None:
                layers.remove(old)
            if kind == "points" and len(data) == 0:
                return  # no VOF this time, and no earlier layer to empty
            layer = getattr(self.viewer, f"add_{kind}")(data, **kwargs)
            if kind == "labels":
                layer.contour = REGION_CONTOUR_PX  # not a constructor argument in napari
            layers.move(layers.index(layer), index)
            return
        # Same layer, new data: the user's colormap, window, opacity and visibility stay (the
        # maps' windows are fixed clinical ranges); name and geometry follow the new result.
        old.data = data
        if old.name != kwargs["name"]:
            old.name = kwargs["name"]
        update_geometry(old, kwargs, ndim)
        old.metadata = {**old.metadata, **kwargs["metadata"]}
        if kind == "points" and len(data):
            old.size = kwargs["size"]
            old.face_color = kwargs["face_color"]
