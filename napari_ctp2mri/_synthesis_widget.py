"""Synthesis widget: a CTP layer in, synthetic DWI/ADC, uncertainty and core layers out.

A thin shell over `ctp2mri.synthesize.synthesize`: the widget collects the settings, runs
the core in a napari worker thread and turns the returned volumes into layers on the CTP
layer's geometry (`napari_ctp2mri._layers`). It holds no model logic.

Progress
--------
`synthesize` reports through a plain ``progress(step, total, info)`` callback, called in the
worker thread. The callback only emits a Qt signal of a `QObject` that lives in the GUI
thread, so Qt queues each report to the event loop and the progress bar is updated there;
the worker never touches a widget. Cancel sets a `CancelToken` that the core checks before
every denoising step.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, Label, PushButton, SpinBox
from napari.layers import Image
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from psygnal import SignalInstance
from qtpy.QtCore import QObject, QTimer, Signal
from qtpy.QtWidgets import QProgressBar

from ctp2mri.devices import available_devices
from ctp2mri.errors import Cancelled, InputError
from ctp2mri.progress import CancelToken
from ctp2mri.synthesize import SynthesisResult, synthesize
from napari_ctp2mri._layers import META_KEY, LayerData, layer_to_volume, volume_to_layer_data
# its old home: the post-training widget and the tests import it from here
from napari_ctp2mri._layers import layer_attributes as _layer_attributes

if TYPE_CHECKING:
    import napari

__all__ = ["MODELS_CHANGED", "SynthesisWidget", "model_choices", "register_model", "retired_name"]

# Names the compare widget pre-selects ("synthetic DWI"/"synthetic ADC"); keep them in step.
LAYER_NAMES = {"dwi": "synthetic DWI", "adc": "synthetic ADC",
               "uncertainty_dwi": "uncertainty DWI", "uncertainty_adc": "uncertainty ADC",
               "core": "core (synthetic ADC)"}
SOURCE = "ctp2mri synthesize"  # Volume.meta["source"] of synthesize's outputs
SAMPLERS = ("dpm++2m", "ddim")
DEFAULT_STEPS = {"dpm++2m": 20, "ddim": 200}  # the CLI's defaults: fast solver vs the paper's
CORE_COLOR = "yellow"  # distinct from the ground-truth lesion's red
UNCERTAINTY_COLORMAP = "magma"
MAX_WIDTH_PX = 420

# registered models ---------------------------------------------------------------------------
_MODELS: dict[str, Path] = {}
#: Emitted (no arguments) when `register_model` changes the list; open widgets refresh.
MODELS_CHANGED = SignalInstance()


def register_model(label: str, path: str | os.PathLike) -> None:
    """Offer a cLDM checkpoint folder in every synthesis widget's model list.

    The bundled demo model registers itself here when it is installed, and the
    post-training widget registers each model it writes. Registering a label again moves it
    to the new path.
    """
    _MODELS[str(label)] = Path(path)
    MODELS_CHANGED.emit()


def model_choices() -> list[tuple[str, Path]]:
    """``(label, checkpoint folder)`` of the registered models, in registration order."""
    return list(_MODELS.items())


#: Labels under which the bundled models are offered (the autoencoder alone cannot synthesise).
BUNDLED_LABELS = {"demo": "demo: post-trained cLDM (bundled)", "demo-base": "demo: base cLDM (bundled)",
                  "demo-reference": "demo: U-Net L1 reference (bundled)"}


def register_bundled_models() -> None:
    """Offer the bundled demo models (`ctp2mri.bundled`) that this installation has, default first."""
    from ctp2mri.bundled import bundled_models

    for name, path in bundled_models().items():
        if name in BUNDLED_LABELS:
            register_model(BUNDLED_LABELS[name], path)


register_bundled_models()


class _ProgressRelay(QObject):
    """Carries the worker thread's progress reports to the GUI thread (queued signal)."""

    reported = Signal(int, int, object)


def format_eta(seconds: float) -> str:
    """``"ETA 42 s"``/``"ETA 3 min 05 s"``; empty while no estimate exists (first step)."""
    if seconds is None or not math.isfinite(seconds):
        return ""
    s = round(seconds)
    return f"ETA {s} s" if s < 60 else f"ETA {s // 60} min {s % 60:02d} s"


def retired_name(name: str) -> str:
    """The name a result layer gets when a later run has nothing to put in it."""
    return f"{name} (earlier run)"


def result_layers(result: SynthesisResult) -> list[LayerData]:
    """The result's volumes as layer data tuples, in the order they are added (core on top)."""
    def visible(data: LayerData, **style: Any) -> LayerData:
        array, kwargs, kind = data
        return array, {**kwargs, "visible": True, **style}, kind

    layers = [  # dwi/adc roles: percentile window inside the brain, and the ADC's 0–2000
        visible(volume_to_layer_data(result.dwi, LAYER_NAMES["dwi"], "dwi", mask=result.brain)),
        visible(volume_to_layer_data(result.adc, LAYER_NAMES["adc"], "adc", mask=result.brain)),
    ]
    for key, volume in (result.uncertainty or {}).items():
        data = volume_to_layer_data(volume, LAYER_NAMES[f"uncertainty_{key}"], mask=result.brain)
        # shown on demand: the mean images are what a first look is for
        layers.append(visible(data, colormap=UNCERTAINTY_COLORMAP, visible=False))
    core = volume_to_layer_data(result.core, LAYER_NAMES["core"], "labels")
    layers.append(visible(core, colormap={None: "transparent", 1: CORE_COLOR}, opacity=0.6))
    return layers


class SynthesisWidget(Container):
    """Synthesise DWI/ADC from a CTP layer with a cLDM, in a worker thread.

    Parameters
    ----------
    viewer
        The napari viewer (npe2 passes it).
    """

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self.viewer = viewer
        self.ctp = ComboBox(label="CTP", choices=self._ctp_choices, nullable=True,
                            tooltip="4-D CT perfusion layer (time, z, y, x)")
        self.model = ComboBox(label="Model", choices=self._model_choices, nullable=True,
                              tooltip="A registered model, or empty to use the folder below")
        self.checkpoint = FileEdit(label="Checkpoint folder", mode="d",
                                   tooltip="cLDM checkpoint folder (config.json + .safetensors)")
        self.device = ComboBox(label="Device", choices=["auto", *available_devices()],
                               value="auto")
        self.sampler = ComboBox(label="Sampler", choices=list(SAMPLERS), value=SAMPLERS[0])
        self.steps = SpinBox(label="Steps", min=1, max=1000, value=DEFAULT_STEPS[SAMPLERS[0]])
        self.samples = SpinBox(label="Samples", min=1, max=64, value=1,
                               tooltip="K samples per slice; K > 1 adds uncertainty maps")
        self.seed = SpinBox(label="Seed", min=0, max=2**31 - 1, value=0)
        self.run_button = PushButton(text="Run")
        # a whole folder of case folders, written to disk (ctp2mri synthesize FOLDER --out OUT)
        self.folder = FileEdit(label="Case folders", mode="d",
                               tooltip="A folder of case folders (each holding ctp.nii.gz) to synthesise "
                               "one after the other; finished cases are skipped on a rerun")
        self.folder_out = FileEdit(label="Output folder", mode="d",
                                   tooltip="Each case's results go to OUTPUT/<case>/, the summary to "
                                   "OUTPUT/summary.csv")
        self.run_folder_button = PushButton(text="Run folder")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.status = Label(value="")
        self.extend([self.ctp, self.model, self.checkpoint, self.device, self.sampler,
                     self.steps, self.samples, self.seed, self.run_button, self.folder,
                     self.folder_out, self.run_folder_button, self.cancel_button, self.status])
        self.progress_bar = QProgressBar()
        self.progress_bar.setTextVisible(True)
        self.progress_bar.setVisible(False)
        self.native.layout().addWidget(self.progress_bar)
        self.status.native.setWordWrap(True)
        self.native.setMaximumWidth(MAX_WIDTH_PX)

        # Parentless on purpose: it must outlive a widget closed mid-run, since the worker
        # still reports through it until the cancel takes effect.
        self.relay = _ProgressRelay()
        self.relay.reported.connect(self._on_progress)
        self.worker: Any = None  # the running worker, None when idle
        self.cancel_token: CancelToken | None = None  # the running run's token
        self.result: SynthesisResult | None = None  # the last finished run's result
        self._pending: list[Callable[[], None]] = []  # layer updates not yet made
        self._closed = False  # the Qt widget is gone: late worker signals are dropped

        self.run_button.changed.connect(self.run)
        self.run_folder_button.changed.connect(self.run_folder)
        self.cancel_button.changed.connect(self.cancel)
        self.sampler.changed.connect(self._on_sampler)
        self.model.changed.connect(self._on_model)
        events = viewer.layers.events
        self._hooks = [(event, self._on_layers_changed)
                       for event in (events.inserted, events.removed, events.moved)]
        self._hooks.append((MODELS_CHANGED, self._on_models_changed))
        for event, callback in self._hooks:
            event.connect(callback)
        # a closed widget must stop listening and stop its run: the worker would otherwise
        # report into deleted Qt objects
        self.native.destroyed.connect(self._on_destroyed)
        self._on_layers_changed()
        self._on_models_changed()

    # choices ------------------------------------------------------------------------------
    def _ctp_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        return [(layer.name, layer) for layer in self.viewer.layers
                if isinstance(layer, Image) and layer.ndim == 4 and not layer.rgb]

    def _model_choices(self, _widget: Any = None) -> list[tuple[str, Path]]:
        return model_choices()

    def _on_layers_changed(self, _event: Any = None) -> None:
        current = self.ctp.value
        self.ctp.reset_choices()
        layers = [layer for _, layer in self._ctp_choices()]
        if current is None and layers:  # pick the reader's "CTP" layer, else the first
            self.ctp.value = next((x for x in layers if x.name == "CTP"), layers[0])

    def _on_models_changed(self) -> None:
        self.model.reset_choices()
        if self.model.value is None and not str(self.checkpoint.value).strip(". "):
            choices = model_choices()
            self.model.value = choices[0][1] if choices else None
        self._on_model()

    def _on_model(self, _value: Any = None) -> None:
        self.checkpoint.enabled = self.model.value is None

    def _on_sampler(self, sampler: str) -> None:
        # a step count left at the other sampler's default follows the new sampler's
        if self.steps.value in DEFAULT_STEPS.values():
            self.steps.value = DEFAULT_STEPS[sampler]

    def _on_destroyed(self, *_args: Any) -> None:
        self._closed = True
        for event, callback in self._hooks:
            event.disconnect(callback)
        self._hooks = []
        if self.cancel_token is not None:
            self.cancel_token.cancel()

    # inputs -----------------------------------------------------------------------------
    def _model_path(self) -> Path:
        if self.model.value is not None:
            return Path(self.model.value)
        text = str(self.checkpoint.value).strip()
        if text in ("", "."):
            raise InputError("choose a model: a registered one, or a cLDM checkpoint folder "
                             "(holding config.json and .safetensors weights)")
        return Path(text).expanduser()

    def _ctp_layer(self) -> Any:
        layer = self.ctp.value
        if layer is None:
            others = [x.name for x in self.viewer.layers if isinstance(x, Image)]
            hint = (f" (the image layers here, {', '.join(map(repr, others))}, are not 4-D)"
                    if others else "")
            raise InputError("no CT perfusion layer to synthesise from" + hint + "; open a 4-D "
                             "CT perfusion series (time, z, y, x), e.g. File ▸ Open Sample ▸ Stroke phantom")
        if layer not in self.viewer.layers:
            raise InputError(f"the CTP layer {layer.name!r} was removed; pick another")
        if not isinstance(layer, Image) or layer.ndim != 4 or layer.rgb:
            raise InputError(f"layer {layer.name!r} has {layer.ndim} dimensions; the CTP must be "
                             "a 4-D image (time, z, y, x)")
        return layer

    # run --------------------------------------------------------------------------------
    def run(self) -> Any:
        """Start a synthesis in a worker thread; returns the worker (None on bad input)."""
        if self.busy:
            return None  # Run is disabled while running; a direct call is ignored too
        try:
            layer = self._ctp_layer()
            model = self._model_path()
        except InputError as exc:
            show_error(str(exc))
            return None
        data, attributes = layer.data, _layer_attributes(layer)
        settings = {"model": model, "sampler": self.sampler.value, "steps": self.steps.value,
                    "samples": self.samples.value, "seed": self.seed.value,
                    "device": self.device.value}
        token = CancelToken()
        emit = self.relay.reported.emit

        def report(step: int, total: int, info: dict[str, Any]) -> None:
            emit(step, total, dict(info))  # the GUI thread gets its own copy

        def work() -> SynthesisResult:
            # the reorientation copy of a large CTP takes a while: here, not in the GUI thread
            ctp = layer_to_volume(data, attributes)
            return synthesize(ctp, **settings, progress=report, cancel=token)

        self.cancel_token = token
        self._set_running(True)
        self.status.value = f"Preparing {layer.name!r} for the model…"
        # errored is connected at creation: a worker without an errored handler re-raises
        # its exception in the Qt event loop (a traceback instead of a notification)
        self.worker = create_worker(work, _start_thread=False, _connect={
            "returned": self._on_returned, "errored": self._on_error,
            "finished": self._on_finished})
        self.worker.start()
        return self.worker

    def run_folder(self) -> Any:
        """Synthesise every case folder of the chosen folder into the output folder, in a worker
        (`ctp2mri.cohort.synthesize_cohort`); returns the worker (None on bad input). No layers are
        added: the results are files, listed in OUTPUT/summary.csv."""
        from ctp2mri.cohort import is_cohort

        if self.busy:
            return None
        try:
            folder, out = (self._chosen_folder(edit, what) for edit, what in (
                (self.folder, "a folder of case folders"), (self.folder_out, "an output folder")))
            model = self._model_path()
            if not is_cohort([folder]):
                raise InputError(f"{folder} holds no case folders (folders with ctp.nii.gz); choose the "
                                 "folder that holds them")
        except InputError as exc:
            show_error(str(exc))
            return None
        settings = {"sampler": self.sampler.value, "steps": self.steps.value, "samples": self.samples.value,
                    "seed": self.seed.value, "device": self.device.value}
        token = CancelToken()
        emit = self.relay.reported.emit

        def work() -> Any:
            from ctp2mri.cohort import collect_cases, synthesize_cohort

            cases, _ = collect_cases([folder])
            return synthesize_cohort(cases, model, out, progress=lambda s, t, i: emit(s, t, dict(i)),
                                     cancel=token, **settings)

        self.cancel_token = token
        self._set_running(True)
        self.status.value = f"Synthesising the cases in {folder.name!r}…"
        self.worker = create_worker(work, _start_thread=False, _connect={
            "returned": self._on_folder_returned, "errored": self._on_error, "finished": self._on_finished})
        self.worker.start()
        return self.worker

    @staticmethod
    def _chosen_folder(edit: FileEdit, what: str) -> Path:
        text = str(edit.value).strip()
        if text in ("", "."):
            raise InputError(f"choose {what} ({edit.label})")
        return Path(text).expanduser()

    def _on_folder_returned(self, result: Any) -> None:
        if self._closed:
            return
        counts = {s: result.count(s) for s in ("ok", "skipped", "failed")}
        self.status.value = (f"Folder done: {counts['ok']} ok, {counts['skipped']} skipped (finished earlier), "
                             f"{counts['failed']} failed; summary: {result.summary}")
        for outcome in result.failed:
            show_warning(f"{outcome.case} failed: {outcome.message}")

    def cancel(self) -> None:
        """Ask the running synthesis to stop; it ends within one denoising step."""
        if self.cancel_token is not None:
            self.cancel_token.cancel()
            self.status.value = "Cancelling…"

    def _set_running(self, running: bool) -> None:
        self.run_button.enabled = self.run_folder_button.enabled = not running
        self.cancel_button.enabled = running
        self.progress_bar.setVisible(running)
        self.progress_bar.setRange(0, 0)  # busy until the first step is reported
        self.progress_bar.setFormat("")

    def _on_progress(self, step: int, total: int, info: dict[str, Any]) -> None:
        if self.worker is None or self._closed:
            return  # a report queued before the run ended
        self.progress_bar.setRange(0, total)
        self.progress_bar.setValue(step)
        if "case" in info:  # a folder run: one report per case
            self.progress_bar.setFormat(f"case {step}/{total}" + (f" · {info['case']}" if info["case"] else "")
                                        + (f" · {info['failed']} failed" if info.get("failed") else ""))
            return
        parts = [f"step {step}/{total}"]
        if "slices_total" in info:
            parts.append(f"{info['slices_done']}/{info['slices_total']} slices")
        eta = format_eta(info.get("eta_s", math.nan))
        self.progress_bar.setFormat(" · ".join(parts + ([eta] if eta else [])))
        if step >= total and not (self.cancel_token and self.cancel_token.cancelled):
            self.status.value = "Mapping the result back onto the CTP's grid…"
        elif not (self.cancel_token and self.cancel_token.cancelled):
            self.status.value = "Sampling…"

    def _on_returned(self, result: SynthesisResult) -> None:
        if self._closed:
            return
        if self.cancel_token is not None and self.cancel_token.cancelled:
            self._notify_cancelled()  # cancelled after the last step: keep the promise
            return
        self.result = result
        self.status.value = "Adding the layers…"
        self.cancel_button.enabled = False  # the result is in: nothing left to cancel
        # One layer per event-loop turn: creating a layer's visuals takes napari a good
        # fraction of a second on a slow machine, and five at once would freeze the viewer.
        self._pending = self._layer_steps(result)
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
        report = self.result.report
        self.status.value = (f"Done in {report['timings_s']['total_s']:.1f} s on "
                             f"{report['device']}: core {report['core_volume_ml']:.1f} ml")
        for notice in report.get("notices", []):
            show_warning(notice)
        if self.worker is None:
            self._set_running(False)

    @property
    def busy(self) -> bool:
        """True from Run until the result's layers are all in the viewer (or it failed)."""
        return self.worker is not None or bool(self._pending)

    def _on_error(self, exc: Exception) -> None:
        if self._closed:
            return
        if isinstance(exc, Cancelled):
            self._notify_cancelled()
        elif isinstance(exc, InputError):
            self.status.value = "Failed: see the notification"
            show_error(str(exc))
        else:  # a bug, not the user's fault: still a notification, with its type
            self.status.value = "Failed: see the notification"
            show_error(f"Synthesis failed ({type(exc).__name__}): {exc}")

    def _notify_cancelled(self) -> None:
        self.status.value = "Cancelled"
        show_info("Synthesis cancelled; no layers were added or changed")

    def _on_finished(self) -> None:
        self.worker, self.cancel_token = None, None
        if not self._pending and not self._closed:  # else the last layer step ends the run
            self._set_running(False)

    # layers -----------------------------------------------------------------------------
    def _layer_steps(self, result: SynthesisResult) -> list[Callable[[], None]]:
        """Steps that add the result's layers, or update this widget's earlier ones in place."""
        new = result_layers(result)
        names = {kwargs["name"] for _, kwargs, _ in new}
        steps: list[Callable[[], None]] = []
        for key in ("uncertainty_dwi", "uncertainty_adc"):
            # A K = 1 run has no uncertainty: an earlier run's maps would not match it. They
            # are hidden and renamed, not removed: napari runs a full gc.collect() after every
            # layer removal (to free GL resources), ~0.5–1 s with torch loaded, a freeze the
            # viewer must not have; the next K > 1 run updates them in place.
            name = LAYER_NAMES[key]
            stale = self._own_layer(name) if name not in names else None
            if stale is not None:
                steps.append(functools.partial(self._retire, stale, name))
        steps += [lambda new=layer: self._put_layer(*new) for layer in new]
        return steps

    def _own_layer(self, name: str) -> Any:
        """This plugin's result layer called ``name`` (or its retired copy), else None."""
        for candidate in (name, retired_name(name)):
            if candidate in self.viewer.layers:
                layer = self.viewer.layers[candidate]
                if (layer.metadata.get(META_KEY) or {}).get("source") == SOURCE:
                    return layer
        return None

    @staticmethod
    def _retire(layer: Any, name: str) -> None:
        layer.visible = False
        layer.name = retired_name(name)

    def _put_layer(self, data: np.ndarray, kwargs: dict[str, Any], kind: str) -> None:
        layers = self.viewer.layers
        name = kwargs["name"]
        old = layers[name] if name in layers else self._own_layer(name)
        if old is not None and old.name != name:  # a retired map comes back with new data
            old.name, old.visible = name, True
        if old is None or type(old).__name__.lower() != kind or old.ndim != data.ndim:
            index = layers.index(old) if old is not None else len(layers)
            if old is not None:
                layers.remove(old)
            layer = getattr(self.viewer, f"add_{kind}")(data, **kwargs)
            layers.move(layers.index(layer), index)
            return
        # Same layer, new data: the compare widget's choices and the user's colormap,
        # opacity and visibility stay; geometry and window follow the new result.
        ndim = data.ndim
        old.data = data
        geometry = {"scale": kwargs.get("scale", np.ones(ndim)),
                    "translate": kwargs.get("translate", np.zeros(ndim)),
                    "rotate": np.eye(ndim), "shear": np.zeros(ndim * (ndim - 1) // 2),
                    "affine": kwargs.get("affine", np.eye(ndim + 1))}
        for key, value in geometry.items():
            current = getattr(old, key)
            current = getattr(current, "affine_matrix", current)
            # each setter redraws the layer: skip the unchanged ones (usually all of them)
            if np.shape(current) != np.shape(value) or not np.allclose(current, value):
                setattr(old, key, value)
        old.metadata = {**old.metadata, **kwargs["metadata"]}
        if "contrast_limits" in kwargs:
            old.contrast_limits = kwargs["contrast_limits"]
