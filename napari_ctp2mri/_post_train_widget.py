"""Post-training widget: annotate → post-train → synthesise, as MONAI Label's loop.

A thin shell over `ctp2mri.training.post_train.post_train` (paper §2.2, Eq. 5–8). The user
builds a local training set from case folders and/or the case open in the viewer (its CTP,
DWI, ADC, brain mask and lesion layers; the lesion as it is at Start, painted or corrected
with napari's Labels tools), picks the base cLDM (or cBBDM) and the settings, and presses Start.
"Save viewer case…" writes the viewer case as a case folder and lists it, so several
annotated cases, opened one after the other, make one training set
(`napari_ctp2mri._training_set_panel`).

The widget only gathers the inputs and shows the results. The run itself happens in a child
process (`ctp2mri.training.child`, driven by `napari_ctp2mri._post_train_job`): the viewer keeps
its CPU time, the child's (GPU) memory is released when it ends, and a crash of the child
(killed, out of memory) is reported without taking the viewer with it. The data go to the child
as files: the case folders, and the viewer case written (with its lesion as it is at Start) to a
temporary case folder. The child runs the core's pipeline
(`ctp2mri.evaluation.post_train_compare.post_train_and_compare`): it checks the output folder,
builds the training set, post-trains, and optionally scores the base and the new model on the
training cases (`ctp2mri.evaluation.before_after`). The new checkpoint is registered with
`napari_ctp2mri._models.register_model`, so the synthesis widget offers it.

Progress, loss plot, cancel
---------------------------
A worker thread reads the child's events (JSON lines) and only emits a queued Qt signal per
report (the shared worker shell, `napari_ctp2mri._worker_widget`), so the progress bar and the
loss history are updated in the GUI thread. The loss plot (matplotlib, embedded) is redrawn by
a timer at most every `PLOT_INTERVAL_MS`, whatever the step rate. Cancel signals the child
(SIGTERM): the core saves a resumable checkpoint at the end of the running step and the child
exits; "Continue the saved run" resumes it. A child that has not stopped `CANCEL_TIMEOUT_S`
later, or when Cancel ("Stop now") is pressed again, is killed.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    LineEdit,
    PushButton,
    SpinBox,
)
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt, QTimer
from qtpy.QtGui import QColor
from qtpy.QtWidgets import (
    QAbstractItemView,
    QAbstractScrollArea,
    QHeaderView,
    QTableWidget,
    QTableWidgetItem,
)

from ctp2mri.devices import available_devices
from ctp2mri.errors import Cancelled, InputError
from ctp2mri.progress import CancelToken
from ctp2mri.training.child import ChildFailed, ChildRun
from napari_ctp2mri._loss_plot import LossPlot
from napari_ctp2mri._models import MODELS_CHANGED, ModelPicker, register_model
from napari_ctp2mri._post_train_job import CANCEL_TIMEOUT_S, PostTrainResult, prefetch, run_in_child
from napari_ctp2mri._training_set_panel import TrainingSetMixin
from napari_ctp2mri._worker_widget import FAILED, PhaseEta, PhaseProgressRelay, WorkerWidget

if TYPE_CHECKING:
    import napari

__all__ = ["LossPlot", "PostTrainResult", "PostTrainWidget"]  # the first two: re-exported

PLOT_INTERVAL_MS = 500  # the loss plot is updated at most this often
DEFAULT_STEPS = 200  # a few minutes of a demo-profile model on a laptop CPU
DEFAULT_BATCH = 8
DEFAULT_EVAL_STEPS = 10  # DDIM steps of the before/after check: a quick look, not Table 1
SEED = 0
MAX_WIDTH_PX = 460
_PHASE_STATUS = {"data": "Reading the training cases…", "train": "Post-training…",
                 "eval": "Scoring base vs post-trained on the training cases…"}
_PREFETCH = {"started": False, "done": False}  # one prefetch per session


def _row(label: str, *widgets: Any, labels: bool = False) -> Container:
    """Widgets side by side under one label of the parent form."""
    row = Container(widgets=widgets, layout="horizontal", labels=labels, label=label)
    row.margins = (0, 0, 0, 0)
    return row


class PostTrainWidget(TrainingSetMixin, WorkerWidget):
    """Lesion-aware post-training of a cLDM (or cBBDM) on a local training set, in a child process.

    Parameters
    ----------
    viewer
        The napari viewer (npe2 passes it).
    """

    TASK = "Post-training"
    relay_class = PhaseProgressRelay

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(viewer)
        self._init_training_set(viewer)  # the viewer case's pickers and the case folders
        # model and settings
        self.models = ModelPicker("Base model", "Base cLDM or cBBDM checkpoint folder (config.json + .safetensors)")
        self.model, self.checkpoint = self.models.model, self.models.checkpoint
        self.lambda_image = FloatSpinBox(label="λ image", value=0.01, min=0.0, max=10.0, step=0.005,
                                         tooltip="Weight of the image-space term ‖x − x̂‖² (Eq. 6); "
                                                 "paper's best 0.01")
        self.lambda_lesion = FloatSpinBox(label="λ lesion", value=0.02, min=0.0, max=10.0, step=0.005,
                                          tooltip="Weight of the lesion term ‖M⊙(x − x̂)‖² (Eq. 7); "
                                                  "paper's best 0.02")
        self.lambda_core = FloatSpinBox(
            label="λ core", value=0.0, min=0.0, max=10.0, step=0.1,
            tooltip="Weight of the core term (not in the paper; 0 = off): 1 − soft Dice between the "
                    "lesion mask and what the synthetic ADC draws under 620 × 10⁻⁶ mm²/s. It holds the "
                    "core that a strong λ lesion over-draws; the bundled post-trained model used 0.3 "
                    "with λ lesion 4 (its REPORT.md §D9, §D12). Needs a base on the fixed ADC window.")
        self.case_context = CheckBox(
            text="case context", value=False,
            tooltip="Not in the paper: also give the model the lesion burden of the whole case, read by a "
                    "frozen copy of the base's perfusion encoder, so slices away from a large lesion draw "
                    "their case's intensity level (ctp2mri.models.case_context). Needs a base with the "
                    "perfusion encoder's heads (the demo models); a base that has it keeps it anyway. The "
                    "bundled post-trained model uses it (its REPORT.md §D12).")
        for spin in (self.lambda_image, self.lambda_lesion):
            spin.native.setDecimals(4)
        self.lambda_core.native.setDecimals(2)
        self.steps = SpinBox(label="Steps", min=1, max=1_000_000, value=DEFAULT_STEPS)
        self.batch_size = SpinBox(label="Batch size", min=1, max=1024, value=DEFAULT_BATCH,
                                  tooltip="Slices per step; the learning rate scales with it")
        self.oversample = FloatSpinBox(
            label="Lesion slices", value=1.0, min=1.0, max=64.0, step=1.0,
            tooltip="Draw slices with lesion this many times as often as the others (1 = "
                    "uniform, as the paper). The bundled post-trained model used 8× for 1500 steps "
                    "(bundled model's REPORT.md §D9, §D12).")
        self.oversample.native.setDecimals(0)
        self.oversample.native.setSuffix("× as often as the others")
        self.device = ComboBox(label="Device", choices=["auto", *available_devices()], value="auto")
        self.output = FileEdit(label="Output folder", mode="d",
                               tooltip="A new or empty folder for the post-trained checkpoint")
        self.resume = CheckBox(text="Continue the saved run in the output folder", value=False)
        self.model_name = LineEdit(label="Model name",
                                   tooltip="Name in the synthesis widget's model list "
                                           "(default: the output folder's name)")
        self.evaluate = CheckBox(text="metrics", value=True,
                                 tooltip="Afterwards, synthesise the training cases with the base "
                                         "and the new model (few DDIM steps) and compare")
        self.eval_steps = SpinBox(label="DDIM steps", min=1, max=1000, value=DEFAULT_EVAL_STEPS,
                                  tooltip="Sampling steps of the before/after metrics")
        self.start_button = PushButton(text="Start")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.status = Label(value="")
        pickers = self.pickers
        # pairs share a row: the whole widget must fit a laptop screen's height, since napari
        # docks a magicgui container without a scroll area
        rows = [self.use_viewer, pickers["ctp"],
                _row("DWI, ADC", pickers["dwi"], pickers["adc"]),
                _row("Brain, lesion", pickers["mask"], pickers["lesion"]),
                self.model, self.checkpoint,
                _row("λ image, lesion", self.lambda_image, self.lambda_lesion),
                _row("λ core", self.lambda_core, self.case_context),
                _row("Steps, batch", self.steps, self.batch_size), self.oversample,
                self.device, self.output, self.resume, self.model_name,
                _row("Before/after", self.evaluate, self.eval_steps, labels=True),
                _row("", self.start_button, self.cancel_button), self.status]
        self.extend(rows)
        self.status.native.setWordWrap(True)
        self.native.setMaximumWidth(MAX_WIDTH_PX)
        layout = self.native.layout()
        # case folders: a list with add/remove, after the viewer-case pickers
        layout.insertWidget(4, self._folder_panel())
        self._add_progress_bar()
        from napari.utils.theme import get_theme

        theme = get_theme(viewer.theme)
        self.loss_plot = LossPlot(theme.background.as_hex(), theme.text.as_hex())
        layout.addWidget(self.loss_plot.canvas)
        self.metrics_table = QTableWidget(0, 3)
        self.metrics_table.setHorizontalHeaderLabels(["Base", "Post-trained", "Change"])
        self.metrics_table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.metrics_table.setSizeAdjustPolicy(QAbstractScrollArea.AdjustIgnored)
        self.metrics_table.horizontalHeader().setSectionResizeMode(QHeaderView.Stretch)
        self.metrics_table.setToolTip("Means over the training cases, in the normalised space "
                                      "([−1, 1]) as the paper's Table 1; both models sample from "
                                      "the same noise")
        self.metrics_table.setVisible(False)
        layout.addWidget(self.metrics_table)

        self.run_buttons = [self.start_button]
        self._plot_timer = QTimer(self.native)
        self._plot_timer.setInterval(PLOT_INTERVAL_MS)
        self._plot_timer.timeout.connect(self.loss_plot.redraw)
        self.child: ChildRun | None = None  # the running run's child process
        self.result: PostTrainResult | None = None
        self.last_step = 0  # the last post-training step reported in this run
        self._run: dict[str, Any] = {}  # the running run's output folder and label
        self._eta = PhaseEta()

        self.start_button.changed.connect(self.start)
        self.cancel_button.changed.connect(self.cancel)
        events = viewer.layers.events
        for event in (events.inserted, events.removed, events.moved):
            self._listen(event, self._on_layers_changed)
        self._listen(MODELS_CHANGED, self.models.refresh)
        self._on_layers_changed()
        self.models.refresh()
        if not _PREFETCH["started"]:
            _PREFETCH["started"] = True
            # an import that fails here fails the run later, with a notification
            create_worker(prefetch, _connect={"errored": lambda exc: None,
                                               "finished": lambda: _PREFETCH.update(done=True)})

    @property
    def prefetching(self) -> bool:
        """True while the session's one-off imports (`prefetch`) are still running."""
        return _PREFETCH["started"] and not _PREFETCH["done"]

    # output -------------------------------------------------------------------------------
    def _output_path(self) -> Path:
        """The output folder asked for; what it may hold is the core's to check, in the run."""
        text = str(self.output.value).strip()
        if text in ("", "."):
            raise InputError("choose an output folder for the post-trained model (a new or empty "
                             "folder; or the folder of a cancelled run, with 'Continue the saved run')")
        return Path(text).expanduser()

    # run ----------------------------------------------------------------------------------
    def start(self) -> Any:
        """Start post-training in a worker thread; returns the worker (None on bad input)."""
        if self.busy:
            return None
        try:
            layers, folders = self._training_set()
            base, out = self.models.path("the base model"), self._output_path()
        except InputError as exc:
            show_error(str(exc))
            return None
        # (the core term does learn from a case without lesion: what it draws as core is false)
        if layers is not None and not layers["lesion"][0].any() and self.lambda_lesion.value > 0:
            show_warning(f"the lesion layer {layers['lesion'][1]['name']!r} is empty, so this case "
                         "adds nothing to the lesion term (Eq. 7); paint the lesion first")
        # ctp2mri.training.post_train.PostTrainSettings fields
        settings = {"lambda_image": self.lambda_image.value, "lambda_lesion": self.lambda_lesion.value,
                    "lambda_core": self.lambda_core.value, "case_context": self.case_context.value,
                    "steps": self.steps.value, "batch_size": self.batch_size.value, "seed": SEED,
                    # 1× is the paper's uniform sampling: no sampler at all, not weights of 1
                    "lesion_oversample": self.oversample.value if self.oversample.value > 1 else None}
        token = CancelToken()
        job = {"base": str(base), "out": str(out), "settings": settings, "device": self.device.value,
               "resume": self.resume.value, "compare_steps": self.eval_steps.value if self.evaluate.value else None}

        emit = self.relay.reported.emit

        def started(child: ChildRun) -> None:  # called in the worker thread
            self.child = child

        def work() -> PostTrainResult:
            return run_in_child(job, folders, layers, token, emit, started)

        self.result, self.last_step, self.child = None, 0, None
        self._run = {"out": out, "label": self.model_name.value.strip() or out.name}
        self._eta.reset()
        self.loss_plot.reset(settings["steps"])
        self.metrics_table.setVisible(False)
        return self._start_worker(work, self._on_returned, token, "Starting the post-training process…")

    def cancel(self) -> None:
        """Ask the run to stop: after the running step, with a resumable checkpoint (the child
        is killed if it has not stopped `CANCEL_TIMEOUT_S` later). Pressed again: stop now."""
        token = self.cancel_token
        if token is None:
            return
        if token.cancelled:  # "Stop now": the steps since the last checkpoint are lost
            if self.child is not None:
                self.child.kill()
            self.status.value = "Stopping the post-training process now…"
            return
        token.cancel()  # first, then the child: the worker sets the child, then reads the token
        child = self.child
        if child is not None:
            child.cancel(CANCEL_TIMEOUT_S)
        self.cancel_button.text = "Stop now"
        self.cancel_button.tooltip = "Kill the post-training process at once (no checkpoint of the running steps)"
        self.status.value = "Cancelling: saving a checkpoint after the running step…"

    def _set_running(self, running: bool) -> None:
        super()._set_running(running)
        self.cancel_button.text = "Cancel"
        self.cancel_button.tooltip = ("Stop after the running step, keeping a checkpoint that "
                                      "'Continue the saved run' resumes")
        if running:
            self._plot_timer.start()
        else:
            self._plot_timer.stop()
            self.loss_plot.redraw()

    def _on_progress(self, phase: str, step: int, total: int, info: dict[str, Any]) -> None:
        if not self._advance(step, total):
            return  # a report queued before the run ended
        if phase == "train":
            self.last_step = step
            self.loss_plot.add(step, info)
            parts = [f"step {step}/{total}", f"loss {info.get('loss', math.nan):.4g}",
                     self._eta(phase, step, total, float(info.get("seconds", math.nan)))]
        elif phase == "eval":
            parts = [f"metrics: case {info.get('cases_done', 0) + 1}/{info.get('cases_total', 1)}",
                     self._eta(phase, step, total, time.perf_counter())]
        else:
            parts = [f"case {step}/{total}"]
        self.progress_bar.setFormat(" · ".join(p for p in parts if p))
        if not self.cancelling:
            self.status.value = _PHASE_STATUS[phase]

    def _on_returned(self, result: PostTrainResult) -> None:
        if self._closed:
            return
        self.result = result
        label = self._run["label"]
        register_model(label, result.out)
        self.status.value = (f"Done: {result.steps} steps in {result.seconds:.0f} s. Saved in "
                             f"{result.out}; offered as {label!r} in the synthesis widget"
                             + (f" ({result.metrics_note})" if result.metrics_note else ""))
        if result.metrics is not None:
            self._show_metrics(result.metrics)
        show_info(f"Post-trained model {label!r} saved in {result.out}")

    def _show_metrics(self, rows: list[dict[str, Any]]) -> None:
        table = self.metrics_table
        table.setRowCount(len(rows))
        table.setVerticalHeaderLabels([row["label"] for row in rows])
        for i, row in enumerate(rows):
            digits = row.get("digits", 4)
            for j, key in enumerate(("base", "new", "change")):
                value = row[key]
                text = "–" if not math.isfinite(value) else (
                    f"{value:+.{digits}f}" if key == "change" else f"{value:.{digits}f}")
                item = QTableWidgetItem(text)
                item.setTextAlignment(int(Qt.AlignRight | Qt.AlignVCenter))
                if key == "change" and row["better"] is not None:
                    item.setForeground(QColor("#4caf50" if row["better"] else "#ef5350"))
                table.setItem(i, j, item)
        table.setVisible(True)

    def _error_text(self, exc: Exception) -> tuple[str, str]:
        if isinstance(exc, ChildFailed) and exc.crashed:
            # killed (the OOM killer, by hand) or a native crash: only the child is gone
            status = ("Failed: the post-training process ended unexpectedly; the viewer is "
                      "unaffected (see the notification)")
            return status, f"Post-training failed: {exc}"
        if isinstance(exc, ChildFailed):  # a bug in the child, with its type
            return FAILED, f"Post-training failed ({exc.event.get('type', 'error')}): {exc}"
        return super()._error_text(exc)

    def _notify_cancelled(self, exc: Cancelled | None = None) -> None:
        step = None if exc is None else exc.step
        out = (None if exc is None else exc.checkpoint) or self._run.get("out")
        if step is not None and out is not None and (Path(out) / "config.json").is_file():
            message = (f"Post-training cancelled at step {step}; the checkpoint in {out} "
                       "keeps it: tick 'Continue the saved run' and press Start to resume")
        else:
            message = "Post-training cancelled before its first checkpoint; nothing was saved"
        self.status.value = message
        show_info(message)

    def _on_finished(self) -> None:
        self.child = None
        super()._on_finished()

    def _on_destroyed(self, *_args: Any) -> None:
        self._closed = True
        try:
            self._plot_timer.stop()
        except RuntimeError:  # Qt deleted it already
            pass
        self.loss_plot.close()
        super()._on_destroyed()  # stops listening, then `_stop_on_close`

    def _stop_on_close(self) -> None:
        if self.cancel_token is not None and not self.cancel_token.cancelled:
            self.cancel_token.cancel()
            if self.child is not None:  # it saves a checkpoint and exits (killed if it does not)
                self.child.cancel(CANCEL_TIMEOUT_S)
