"""Synthesis widget: a CTP layer in, synthetic DWI/ADC, uncertainty, lesion probability and core layers out.

A thin shell over `ctp2mri.synthesis.synthesize.synthesize`: the widget turns its controls into a
`SampleSettings` (refusing a bad one before anything starts), runs the core in a napari worker
thread and turns the returned volumes into layers on the CTP layer's geometry
(`napari_ctp2mri._layers`). It holds no model logic; the models it offers
are the registry's (`napari_ctp2mri._models`).

Progress and cancel are the shared worker shell's (`napari_ctp2mri._worker_widget`):
`synthesize` reports through a ``progress`` callback that only emits a queued Qt signal, and
Cancel sets a `CancelToken` that the core checks before every denoising step.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import ComboBox, FileEdit, Label, PushButton, SpinBox
from napari.layers import Image
from napari.utils.notifications import show_error, show_warning

from ctp2mri.devices import available_devices
from ctp2mri.errors import InputError
from ctp2mri.progress import CancelToken
from ctp2mri.settings import DEFAULT_SAMPLER, SAMPLER_STEPS
from ctp2mri.synthesis.sample_settings import SampleSettings
from ctp2mri.synthesis.synthesize import SynthesisResult, synthesize
from napari_ctp2mri._layers import (
    META_KEY,
    LayerData,
    checked_ctp_layer,
    layer_attributes,
    layer_to_volume,
    update_geometry,
    volume_to_layer_data,
)
from napari_ctp2mri._models import MODELS_CHANGED, ModelPicker
from napari_ctp2mri._worker_widget import WorkerWidget, format_eta

if TYPE_CHECKING:
    import napari

__all__ = ["LAYER_NAMES", "SynthesisWidget", "result_layers", "retired_name"]

# Names the compare widget pre-selects ("synthetic DWI"/"synthetic ADC"); keep them in step.
LAYER_NAMES = {"dwi": "synthetic DWI", "adc": "synthetic ADC",
               "uncertainty_dwi": "uncertainty DWI", "uncertainty_adc": "uncertainty ADC",
               "core": "core (synthetic ADC)", "lesion_probability": "lesion probability (model)"}
SOURCE = "ctp2mri synthesize"  # Volume.meta["source"] of synthesize's outputs
DEFAULT_STEPS = SAMPLER_STEPS  # the CLI's defaults (ctp2mri.settings): fast solver vs the paper's
CORE_COLOR = "yellow"  # distinct from the ground-truth lesion's red
UNCERTAINTY_COLORMAP = "magma"
PROBABILITY_COLORMAP = "inferno"
MAX_WIDTH_PX = 420


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
    if result.lesion_probability is not None:
        # the model's own lesion map, no sampling: on demand, fixed 0–1 so runs compare
        data = volume_to_layer_data(result.lesion_probability, LAYER_NAMES["lesion_probability"], mask=result.brain)
        layers.append(visible(data, colormap=PROBABILITY_COLORMAP, contrast_limits=(0.0, 1.0), opacity=0.5,
                              blending="additive", visible=False))
    core = volume_to_layer_data(result.core, LAYER_NAMES["core"], "labels")
    layers.append(visible(core, colormap={None: "transparent", 1: CORE_COLOR}, opacity=0.6))
    return layers


class SynthesisWidget(WorkerWidget):
    """Synthesise DWI/ADC from a CTP layer with a cLDM, in a worker thread.

    Parameters
    ----------
    viewer
        The napari viewer (npe2 passes it).
    """

    TASK = "Synthesis"

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(viewer)
        self.ctp = ComboBox(label="CTP", choices=self._ctp_choices, nullable=True,
                            tooltip="4-D CT perfusion layer (time, z, y, x)")
        self.models = ModelPicker("Model", "cLDM checkpoint folder (config.json + .safetensors)")
        self.model, self.checkpoint = self.models.model, self.models.checkpoint
        self.device = ComboBox(label="Device", choices=["auto", *available_devices()],
                               value="auto")
        self.sampler = ComboBox(label="Sampler", choices=list(SAMPLER_STEPS), value=DEFAULT_SAMPLER)
        self.steps = SpinBox(label="Steps", min=1, max=1000, value=DEFAULT_STEPS[DEFAULT_SAMPLER])
        self.samples = SpinBox(label="Samples", min=1, max=64, value=1,
                               tooltip="K samples per slice, averaged; K > 1 adds uncertainty maps and a "
                                       "steadier core (what most draws agree on)")
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
        self._add_progress_bar()
        self.status.native.setWordWrap(True)
        self.native.setMaximumWidth(MAX_WIDTH_PX)
        self.run_buttons = [self.run_button, self.run_folder_button]
        self.result: SynthesisResult | None = None  # the last finished run's result

        self.run_button.changed.connect(self.run)
        self.run_folder_button.changed.connect(self.run_folder)
        self.cancel_button.changed.connect(self.cancel)
        self.sampler.changed.connect(self._on_sampler)
        events = viewer.layers.events
        for event in (events.inserted, events.removed, events.moved):
            self._listen(event, self._on_layers_changed)
        self._listen(MODELS_CHANGED, self.models.refresh)
        self._on_layers_changed()
        self.models.refresh()

    # choices ------------------------------------------------------------------------------
    def _ctp_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        return [(layer.name, layer) for layer in self.viewer.layers
                if isinstance(layer, Image) and layer.ndim == 4 and not layer.rgb]

    def _on_layers_changed(self, _event: Any = None) -> None:
        current = self.ctp.value
        self.ctp.reset_choices()
        layers = [layer for _, layer in self._ctp_choices()]
        if current is None and layers:  # pick the reader's "CTP" layer, else the first
            self.ctp.value = next((x for x in layers if x.name == "CTP"), layers[0])

    def _on_sampler(self, sampler: str) -> None:
        # a step count left at the other sampler's default follows the new sampler's
        if self.steps.value in DEFAULT_STEPS.values():
            self.steps.value = DEFAULT_STEPS[sampler]

    # run --------------------------------------------------------------------------------
    def sample_settings(self) -> SampleSettings:
        """The controls' sampling settings, checked (`InputError` names a bad one)."""
        return SampleSettings(sampler=self.sampler.value, steps=self.steps.value, samples=self.samples.value,
                              seed=self.seed.value)

    def run(self) -> Any:
        """Start a synthesis in a worker thread; returns the worker (None on bad input)."""
        if self.busy:
            return None  # Run is disabled while running; a direct call is ignored too
        try:
            layer = checked_ctp_layer(self.viewer, self.ctp.value, "to synthesise from")
            model = self.models.path("a model")
            settings = self.sample_settings()
        except InputError as exc:
            show_error(str(exc))
            return None
        data, attributes = layer.data, layer_attributes(layer)
        device = self.device.value
        token, report = CancelToken(), self._reporter()

        def work() -> SynthesisResult:
            # the reorientation copy of a large CTP takes a while: here, not in the GUI thread
            ctp = layer_to_volume(data, attributes)
            return synthesize(ctp, model, settings, device=device, progress=report, cancel=token)

        return self._start_worker(work, self._on_returned, token,
                                  f"Preparing {layer.name!r} for the model…")

    def run_folder(self) -> Any:
        """Synthesise every case folder of the chosen folder into the output folder, in a worker
        (`ctp2mri.synthesis.cohort.synthesize_cohort`); returns the worker (None on bad input). No layers are
        added: the results are files, listed in OUTPUT/summary.csv."""
        from ctp2mri.synthesis.cohort import is_cohort

        if self.busy:
            return None
        try:
            folder, out = (self._chosen_folder(edit, what) for edit, what in (
                (self.folder, "a folder of case folders"), (self.folder_out, "an output folder")))
            model = self.models.path("a model")
            if not is_cohort([folder]):
                raise InputError(f"{folder} holds no case folders (folders with ctp.nii.gz); choose the "
                                 "folder that holds them")
            settings = self.sample_settings()
        except InputError as exc:
            show_error(str(exc))
            return None
        device = self.device.value
        token, report = CancelToken(), self._reporter()

        def work() -> Any:
            from ctp2mri.synthesis.cohort import collect_cases, synthesize_cohort

            cases, _ = collect_cases([folder])
            return synthesize_cohort(cases, model, out, settings, device=device, progress=report, cancel=token)

        return self._start_worker(work, self._on_folder_returned, token,
                                  f"Synthesising the cases in {folder.name!r}…")

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

    def _on_progress(self, step: int, total: int, info: dict[str, Any]) -> None:
        if not self._advance(step, total):
            return  # a report queued before the run ended
        if "case" in info:  # a folder run: one report per case
            self.progress_bar.setFormat(f"case {step}/{total}" + (f" · {info['case']}" if info["case"] else "")
                                        + (f" · {info['failed']} failed" if info.get("failed") else ""))
            return
        parts = [f"step {step}/{total}"]
        if "slices_total" in info:
            parts.append(f"{info['slices_done']}/{info['slices_total']} slices")
        eta = format_eta(info.get("eta_s", math.nan))  # the core's estimate
        self.progress_bar.setFormat(" · ".join(parts + ([eta] if eta else [])))
        if not self.cancelling:
            self.status.value = ("Mapping the result back onto the CTP's grid…" if step >= total
                                 else "Sampling…")

    def _on_returned(self, result: SynthesisResult) -> None:
        if not self._accepts():
            return
        self.result = result
        self.status.value = "Adding the layers…"
        self._apply_stepwise(self._layer_steps(result))  # five layers: one per event-loop turn

    def _on_applied(self) -> None:
        report = self.result.report
        self.status.value = (f"Done in {report['timings_s']['total_s']:.1f} s on "
                             f"{report['device']}: core {report['core_volume_ml']:.1f} ml")
        for notice in report.get("notices", []):
            show_warning(notice)

    # layers -----------------------------------------------------------------------------
    def _layer_steps(self, result: SynthesisResult) -> list[Callable[[], None]]:
        """Steps that add the result's layers, or update this widget's earlier ones in place."""
        new = result_layers(result)
        names = {kwargs["name"] for _, kwargs, _ in new}
        steps: list[Callable[[], None]] = []
        for key in ("uncertainty_dwi", "uncertainty_adc", "lesion_probability"):
            # A K = 1 run has no uncertainty, a model without a lesion head no lesion
            # probability: an earlier run's maps would not match it. They
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
        old.data = data
        update_geometry(old, kwargs, data.ndim)
        old.metadata = {**old.metadata, **kwargs["metadata"]}
        if "contrast_limits" in kwargs:
            old.contrast_limits = kwargs["contrast_limits"]
