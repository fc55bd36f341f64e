"""Perfusion widget: a CTP layer in; CBF, CBV, MTT, Tmax, TTP maps, the perfusion core and the
hypoperfused tissue out, with the AIF/VOF curves and the mismatch volumes.

A thin shell over `ctp2mri.perfusion.analyse_perfusion`: the widget collects the inputs and
thresholds, runs the core in a napari worker thread and turns the returned maps and masks into
layers on the CTP layer's geometry (`napari_ctp2mri._layers`). It holds no perfusion logic.

Placing the AIF
---------------
By default the core selects the arterial input function itself. *Place AIF* adds a Points layer
called "AIF" in add mode on the CTP's grid; each click on an artery becomes a sphere of
`AIF_RADIUS_MM` on the CT's own voxel grid (`aif_region_from_points`), passed to the core as
``aif_region`` (the core picks the artery's voxels inside it). napari world coordinates become
CTP voxel indices through the same transforms the reader used to place the CTP
(`napari_ctp2mri._layers.world_to_voxel`), so a click lands on the voxel under the cursor.

Progress and cancel work as in the synthesis widget: the core's ``progress`` callback emits a
queued Qt signal, and Cancel sets a `CancelToken` the core checks between its stages.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import ComboBox, Container, FloatSpinBox, Label, PushButton
from napari.layers import Image, Labels, Points
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QObject, QTimer, Signal
from qtpy.QtWidgets import (
    QAbstractItemView,
    QAbstractScrollArea,
    QHeaderView,
    QProgressBar,
    QTableWidget,
    QTableWidgetItem,
)

from ctp2mri.errors import Cancelled, InputError
from ctp2mri.io.volume import Volume
from ctp2mri.perfusion import (
    MAP_UNITS,
    PerfusionResult,
    PerfusionSettings,
    RegionSettings,
    analyse_perfusion,
)
from ctp2mri.perfusion.output import DISPLAY_RANGES
from ctp2mri.progress import CancelToken
from napari_ctp2mri._curve_plot import AIF_COLOUR, VOF_COLOUR, CurvePlot
from napari_ctp2mri._layers import (
    META_KEY,
    _spatial_transform,
    layer_attributes,
    layer_to_volume,
    volume_to_layer_data,
    voxel_to_world,
    world_to_voxel,
)

if TYPE_CHECKING:
    import napari

__all__ = ["PerfusionWidget", "aif_region_from_points", "region_names", "volume_rows"]

SOURCE = "ctp2mri perfusion"  # metadata["ctp2mri"]["source"] of this widget's layers
MAP_LAYERS = {"cbf": "CBF", "cbv": "CBV", "mtt": "MTT", "tmax": "Tmax", "ttp": "TTP"}
# Added in this order, so CBF ends on top and hiding it shows Tmax; TTP starts hidden (it
# mostly shows the bolus' arrival, which Tmax shows better).
MAP_ORDER = ("ttp", "mtt", "cbv", "tmax", "cbf")
MAP_COLORMAP = "turbo"
# Colours absent from turbo, so the outlines stay visible over every map; the true lesion is
# red and the synthetic-ADC core yellow elsewhere in the plugin.
REGION_COLOURS = {"core": "magenta", "hypoperfusion": "white"}
REGION_CONTOUR_PX = 2
POINT_LAYERS = {"aif": "AIF voxels", "vof": "VOF voxels"}
AIF_POINTS_NAME = "AIF"  # the layer Place AIF adds; the AIF picker pre-selects it
AIF_RADIUS_MM = 3.0
POINT_SIZE_MM = 4.0
MAX_WIDTH_PX = 440


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


def _in_plane_mm(spatial: np.ndarray) -> float:
    """The finer in-plane voxel size (mm) of a 4×4 data → world map (point sizes are in
    voxels)."""
    return float(np.linalg.norm(spatial[:3, :3], axis=0)[1:].min())


def _geometry(spatial: np.ndarray) -> dict[str, Any]:
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
    size = POINT_SIZE_MM / _in_plane_mm(spatial)
    for key, colour in (("vof", VOF_COLOUR), ("aif", AIF_COLOUR)):
        function = getattr(result, key)
        voxels = np.empty((0, 3)) if function is None else function.voxels
        world = voxel_to_world(voxels, result.affine) if len(voxels) else np.empty((0, 3))
        data = world @ inverse[:3, :3].T + inverse[:3, 3]
        kwargs = {"name": POINT_LAYERS[key], "ndim": 3, "size": size, "face_color": colour,
                  "border_color": "white", "border_width": 0.1, **_geometry(spatial),
                  "metadata": {META_KEY: {"source": SOURCE, "output": key}}}
        layers.append((key, data, kwargs, "points"))
    return layers


class _ProgressRelay(QObject):
    """Carries the worker thread's progress reports to the GUI thread (queued signal)."""

    reported = Signal(int, int, object)


class PerfusionWidget(Container):
    """Perfusion maps, core and hypoperfusion of a CTP layer, computed in a worker thread.

    Parameters
    ----------
    viewer
        The napari viewer (npe2 passes it).
    """

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self.viewer = viewer
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
        self.progress_bar = QProgressBar()
        self.progress_bar.setTextVisible(True)
        self.progress_bar.setVisible(False)
        layout.addWidget(self.progress_bar)
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

        # Parentless on purpose: it must outlive a widget closed mid-run (see the synthesis widget).
        self.relay = _ProgressRelay()
        self.relay.reported.connect(self._on_progress)
        self.worker: Any = None  # the running worker, None when idle
        self.cancel_token: CancelToken | None = None
        self.result: PerfusionResult | None = None  # the last finished run's result
        self.aif_region: Volume | None = None  # the last finished run's placed AIF region
        self._run: PerfusionRun | None = None
        self._pending: list[Callable[[], None]] = []  # layer updates not yet made
        self._closed = False
        # pickers the user has not touched follow the default layers as layers come and go
        self._auto = {"ctp", "brain", "aif"}
        self._auto_setting = False

        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.place_button.changed.connect(self.place_aif)
        for key in self._auto:
            getattr(self, key).changed.connect(lambda _value, key=key: self._on_pick(key))
        events = viewer.layers.events
        self._hooks = [(event, self._on_layers_changed)
                       for event in (events.inserted, events.removed, events.moved)]
        for event, callback in self._hooks:
            event.connect(callback)
        self.native.destroyed.connect(self._on_destroyed)
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

    def _on_destroyed(self, *_args: Any) -> None:
        self._closed = True
        for event, callback in self._hooks:
            event.disconnect(callback)
        self._hooks = []
        if self.cancel_token is not None:
            self.cancel_token.cancel()

    # inputs -----------------------------------------------------------------------------
    def _ctp_layer(self) -> Any:
        layer = self.ctp.value
        if layer is None:
            others = [x.name for x in self.viewer.layers if isinstance(x, Image)]
            hint = (f" (the image layers here, {', '.join(map(repr, others))}, are not 4-D)"
                    if others else "")
            raise InputError("no CT perfusion layer to analyse" + hint + "; open a 4-D CT "
                             "perfusion series (time, z, y, x), e.g. File ▸ Open Sample ▸ "
                             "Stroke phantom")
        if layer not in self.viewer.layers:
            raise InputError(f"the CTP layer {layer.name!r} was removed; pick another")
        if not isinstance(layer, Image) or layer.ndim != 4 or layer.rgb:
            raise InputError(f"layer {layer.name!r} has {layer.ndim} dimensions; the CTP must be "
                             "a 4-D image (time, z, y, x)")
        return layer

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
            spatial = _spatial_transform(layer_attributes(ctp), ctp.ndim)
        except InputError as exc:
            show_error(str(exc))
            return None
        layer = self.aif.value
        if layer is None or layer not in self.viewer.layers:
            # drawn as large as the sphere the core reads, so the user sees what is read
            layer = self.viewer.add_points(np.empty((0, 3)), ndim=3, name=AIF_POINTS_NAME,
                                           size=2 * AIF_RADIUS_MM / _in_plane_mm(spatial),
                                           face_color="transparent", border_color=AIF_COLOUR,
                                           border_width=0.15, **_geometry(spatial))
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
            spatial = _spatial_transform(attributes, layer.ndim)  # refuses time mixed with space
        except InputError as exc:
            show_error(str(exc))
            return None
        data = layer.data
        mask_input = None if mask is None else (np.array(mask.data), layer_attributes(mask))
        token = CancelToken()
        emit = self.relay.reported.emit

        def report(step: int, total: int, info: dict[str, Any]) -> None:
            emit(step, total, dict(info))  # the GUI thread gets its own copy

        def work() -> PerfusionRun:
            start = time.perf_counter()
            ctp = layer_to_volume(data, attributes)
            brain = None if mask_input is None else layer_to_volume(*mask_input)
            region = None if points is None else aif_region_from_points(points, ctp)
            result = analyse_perfusion(ctp, brain, region, settings, progress=report, cancel=token)
            layers = result_layers(result, spatial, cancel=token)
            token.raise_if_cancelled()
            return PerfusionRun(result, region, layers, time.perf_counter() - start)

        self.cancel_token = token
        self._set_running(True)
        self.status.value = f"Reading {layer.name!r}…"
        # errored is connected at creation: a worker without an errored handler re-raises
        # its exception in the Qt event loop (a traceback instead of a notification)
        self.worker = create_worker(work, _start_thread=False, _connect={
            "returned": self._on_returned, "errored": self._on_error,
            "finished": self._on_finished})
        self.worker.start()
        return self.worker

    def cancel(self) -> None:
        """Ask the running analysis to stop; it ends at the core's next stage."""
        if self.cancel_token is not None:
            self.cancel_token.cancel()
            self.status.value = "Cancelling…"

    @property
    def busy(self) -> bool:
        """True from Run until the result's layers are all in the viewer (or it failed)."""
        return self.worker is not None or bool(self._pending)

    def _set_running(self, running: bool) -> None:
        self.run_button.enabled = not running
        self.cancel_button.enabled = running
        self.progress_bar.setVisible(running)
        self.progress_bar.setRange(0, 0)  # busy until the first stage is reported
        self.progress_bar.setFormat("")

    def _on_progress(self, step: int, total: int, info: dict[str, Any]) -> None:
        if self.worker is None or self._closed:
            return  # a report queued before the run ended
        self.progress_bar.setRange(0, total)
        self.progress_bar.setValue(step)
        stage = info.get("stage", "")
        self.progress_bar.setFormat(f"step {step}/{total}" + (f" · {stage}" if stage else ""))
        if self.cancel_token is not None and self.cancel_token.cancelled:
            return
        self.status.value = ("Mapping the results onto the CTP's grid…" if step >= total
                             else f"Analysing: {stage}…")

    def _on_returned(self, run: PerfusionRun) -> None:
        if self._closed:
            return
        if self.cancel_token is not None and self.cancel_token.cancelled:
            self._notify_cancelled()  # cancelled after the last stage: keep the promise
            return
        self._run, self.result, self.aif_region = run, run.result, run.aif_region
        self.cancel_button.enabled = False  # the result is in: nothing left to cancel
        self._show_numbers(run.result)
        self.status.value = "Adding the layers…"
        # One layer per event-loop turn, as in the synthesis widget: nine layers' visuals at
        # once would freeze the viewer on a slow machine.
        self._pending = [lambda new=new: self._put_layer(*new) for new in run.layers]
        self._show_next()

    def _show_next(self) -> None:
        if self._closed:
            self._pending = []
            return
        if self._pending:
            try:
                self._pending[0]()
            finally:  # popped after the step, so `busy` holds until the last layer is in
                self._pending.pop(0)
            if self._pending:
                QTimer.singleShot(0, self._show_next)
                return
        r = self.result.regions
        self.status.value = (f"Done in {self._run.seconds:.1f} s: core {r.core_ml:.1f} ml, "
                             f"hypoperfusion {r.hypoperfusion_ml:.1f} ml, "
                             f"mismatch {r.mismatch_ml:.1f} ml")
        for note in self.result.notes:
            show_warning(note)
        if self.worker is None:
            self._set_running(False)

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

    def _on_error(self, exc: Exception) -> None:
        if self._closed:
            return
        if isinstance(exc, Cancelled):
            self._notify_cancelled()
            return
        self.status.value = "Failed: see the notification"
        if isinstance(exc, InputError):
            show_error(str(exc))
        else:  # a bug, not the user's fault: still a notification, with its type
            show_error(f"Perfusion analysis failed ({type(exc).__name__}): {exc}")

    def _notify_cancelled(self) -> None:
        self.status.value = "Cancelled"
        show_info("Perfusion analysis cancelled; no layers were added or changed")

    def _on_finished(self) -> None:
        self.worker, self.cancel_token = None, None
        if not self._pending and not self._closed:  # else the last layer step ends the run
            self._set_running(False)

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
        geometry = {"scale": kwargs.get("scale", np.ones(ndim)),
                    "translate": kwargs.get("translate", np.zeros(ndim)),
                    "rotate": np.eye(ndim), "shear": np.zeros(ndim * (ndim - 1) // 2),
                    "affine": kwargs.get("affine", np.eye(ndim + 1))}
        for name, value in geometry.items():
            current = getattr(old, name)
            current = getattr(current, "affine_matrix", current)
            # each setter redraws the layer: skip the unchanged ones (usually all of them)
            if np.shape(current) != np.shape(value) or not np.allclose(current, value):
                setattr(old, name, value)
        old.metadata = {**old.metadata, **kwargs["metadata"]}
        if kind == "points" and len(data):
            old.size = kwargs["size"]
            old.face_color = kwargs["face_color"]
