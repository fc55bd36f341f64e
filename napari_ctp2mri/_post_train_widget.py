"""Post-training widget: annotate → post-train → synthesise, as MONAI Label's loop.

A thin shell over `ctp2mri.training.post_train.post_train` (paper §2.2, Eq. 5–8). The user
builds a local training set from case folders and/or the case open in the viewer (its CTP,
DWI, ADC, brain mask and lesion layers; the lesion as it is at Start, painted or corrected
with napari's Labels tools), picks the base cLDM and the settings, and presses Start.
"Save viewer case…" writes the viewer case as a case folder and lists it, so several
annotated cases, opened one after the other, make one training set.

The run itself happens in a child process (`ctp2mri.training.child`): the viewer keeps its
CPU time, the child's (GPU) memory is released when it ends, and a crash of the child (killed,
out of memory) is reported without taking the viewer with it. The data go to the child as
files: the case folders, and the viewer case written (with its lesion as it is at Start) to a
temporary case folder. The child builds the `SliceDataset`, post-trains, and optionally scores
the base and the new model on the training cases (`ctp2mri.evaluate`). The new checkpoint is
registered with `register_model`, so the synthesis widget offers it.

Progress, loss plot, cancel
---------------------------
A worker thread reads the child's events (JSON lines) and only emits a queued Qt signal per
report, so the progress bar and the loss history are updated in the GUI thread. The loss plot
(matplotlib, embedded) is redrawn by a timer at most every `PLOT_INTERVAL_MS`, whatever the
step rate. Cancel signals the child (SIGTERM): the core saves a resumable checkpoint at the
end of the running step and the child exits; "Continue the saved run" resumes it. A child
that has not stopped `CANCEL_TIMEOUT_S` later, or when Cancel ("Stop now") is pressed again,
is killed.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
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
from napari.layers import Image, Labels
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QObject, Qt, QTimer, Signal
from qtpy.QtGui import QColor
from qtpy.QtWidgets import (
    QAbstractItemView,
    QAbstractScrollArea,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QListWidget,
    QProgressBar,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ctp2mri.data import resolve_cases
from ctp2mri.devices import available_devices
from ctp2mri.errors import Cancelled, InputError
from ctp2mri.progress import CancelToken
from ctp2mri.training.child import ChildFailed, ChildRun
from napari_ctp2mri._loss_plot import LossPlot
from napari_ctp2mri._synthesis_widget import (
    MODELS_CHANGED,
    _layer_attributes,
    format_eta,
    model_choices,
    register_model,
)
from napari_ctp2mri._training_set import (
    BASE_LABEL,
    CASE_ROLES,
    NEW_LABEL,
    check_case_layers,
    metric_rows,
    save_viewer_case,
    viewer_case_name,
)

if TYPE_CHECKING:
    import napari

__all__ = ["LossPlot", "PostTrainResult", "PostTrainWidget"]

PLOT_INTERVAL_MS = 500  # the loss plot is updated at most this often
DEFAULT_STEPS = 200  # a few minutes of a demo-profile model on a laptop CPU
DEFAULT_BATCH = 8
DEFAULT_EVAL_STEPS = 10  # DDIM steps of the before/after check: a quick look, not Table 1
CANCEL_TIMEOUT_S = 30.0  # a cancelled child that has not stopped by then is killed
SEED = 0
MAX_WIDTH_PX = 460
# Layer kinds per role: (layer type, dimensions offered; None = any). Labels of any shape are
# offered, so that a mask on another grid gets a message rather than silently not being listed.
_PICKERS: dict[str, tuple[type, int | None]] = {
    "ctp": (Image, 4), "dwi": (Image, 3), "adc": (Image, 3), "mask": (Labels, None),
    "lesion": (Labels, None),
}
# the names the reader and the sample data give a case's layers
_DEFAULT_NAMES = {"ctp": "CTP", "dwi": "DWI", "adc": "ADC", "mask": "brain mask", "lesion": "lesion"}
_PHASE_STATUS = {"data": "Reading the training cases…", "train": "Post-training…",
                 "eval": "Scoring base vs post-trained on the training cases…"}


@dataclass
class PostTrainResult:
    """What a finished run hands back to the GUI thread."""

    out: Path
    base: Path
    steps: int
    seconds: float
    metrics: list[dict[str, Any]] | None  # `metric_rows`, None when not evaluated
    metrics_note: str = ""  # why there are no metrics, when asked for


class _ProgressRelay(QObject):
    """Carries the worker's reports to the GUI thread: (phase, step, total, info)."""

    reported = Signal(str, int, int, object)


def _prefetch() -> None:
    """Import, ahead of Start, what the widget's workers import (writing case folders).

    Training and evaluation run in a child process, so the viewer's process no longer imports
    their modules (``torch._dynamo``, the evaluation). Every worker calls it first: module
    initialisation is not safe against a second thread importing the same modules at the same
    time, so the imports happen under one lock, once.
    """
    with _IMPORT_LOCK:
        import ctp2mri.casefolder  # noqa: F401


_PREFETCH = {"started": False, "done": False}  # one prefetch per session
_IMPORT_LOCK = threading.Lock()


def _choices(viewer: Any, kind: type, ndim: int | None) -> Any:
    def choices(_widget: Any = None) -> list[tuple[str, Any]]:
        return [(layer.name, layer) for layer in viewer.layers
                if isinstance(layer, kind) and (ndim is None or layer.ndim == ndim)
                and not getattr(layer, "rgb", False)]
    return choices


def _row(label: str, *widgets: Any, labels: bool = False) -> Container:
    """Widgets side by side under one label of the parent form."""
    row = Container(widgets=widgets, layout="horizontal", labels=labels, label=label)
    row.margins = (0, 0, 0, 0)
    return row


class PostTrainWidget(Container):
    """Lesion-aware post-training of a cLDM on a local training set, in a child process.

    Parameters
    ----------
    viewer
        The napari viewer (npe2 passes it).
    """

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self.viewer = viewer
        self._auto = set(_PICKERS)  # pickers the user has not touched follow the default names
        self._auto_setting = False
        # training set
        self.use_viewer = CheckBox(text="Viewer case", value=True,
                                   tooltip="Train on the case open in the viewer, with its lesion "
                                           "layer as it is when Start is pressed")
        self.pickers: dict[str, ComboBox] = {}
        for role, (kind, ndim) in _PICKERS.items():
            combo = ComboBox(label=CASE_ROLES[role], choices=_choices(viewer, kind, ndim),
                             nullable=True, tooltip=f"The viewer case's {CASE_ROLES[role]} layer")
            combo.changed.connect(lambda _value, role=role: self._auto.discard(role)
                                  if not self._auto_setting else None)
            self.pickers[role] = combo
        self.pickers["lesion"].tooltip = "The lesion Labels layer; paint or correct it first"
        # model and settings
        self.model = ComboBox(label="Base model", choices=self._model_choices, nullable=True,
                              tooltip="A registered model, or empty to use the folder below")
        self.checkpoint = FileEdit(label="Checkpoint folder", mode="d",
                                   tooltip="Base cLDM checkpoint folder (config.json + .safetensors)")
        self.lambda_image = FloatSpinBox(label="λ image", value=0.01, min=0.0, max=10.0, step=0.005,
                                         tooltip="Weight of the image-space term ‖x − x̂‖² (Eq. 6); "
                                                 "paper's best 0.01")
        self.lambda_lesion = FloatSpinBox(label="λ lesion", value=0.02, min=0.0, max=10.0, step=0.005,
                                          tooltip="Weight of the lesion term ‖M⊙(x − x̂)‖² (Eq. 7); "
                                                  "paper's best 0.02")
        for spin in (self.lambda_image, self.lambda_lesion):
            spin.native.setDecimals(4)
        self.steps = SpinBox(label="Steps", min=1, max=1_000_000, value=DEFAULT_STEPS)
        self.batch_size = SpinBox(label="Batch size", min=1, max=1024, value=DEFAULT_BATCH,
                                  tooltip="Slices per step; the learning rate scales with it")
        self.oversample = FloatSpinBox(
            label="Lesion slices", value=1.0, min=1.0, max=64.0, step=1.0,
            tooltip="Draw slices with lesion this many times as often as the others (1 = "
                    "uniform, as the paper). The bundled post-trained model used 8× for 600 steps "
                    "(bundled model's REPORT.md §A).")
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
        self.progress_bar = QProgressBar()
        self.progress_bar.setTextVisible(True)
        self.progress_bar.setVisible(False)
        layout.addWidget(self.progress_bar)
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

        # Parentless on purpose: it must outlive a widget closed mid-run (see the synthesis widget).
        self.relay = _ProgressRelay()
        self.relay.reported.connect(self._on_progress)
        self._plot_timer = QTimer(self.native)
        self._plot_timer.setInterval(PLOT_INTERVAL_MS)
        self._plot_timer.timeout.connect(self.loss_plot.redraw)
        self.folders: list[Path] = []
        # case folders this widget wrote → the viewer case each holds (re-saving replaces them)
        self._saved: dict[Path, str] = {}
        self.worker: Any = None
        self.cancel_token: CancelToken | None = None  # set by Cancel, also before the child exists
        self.child: ChildRun | None = None  # the running run's child process
        self.result: PostTrainResult | None = None
        self.last_step = 0  # the last post-training step reported in this run
        self._run: dict[str, Any] = {}  # the running run's output folder, label, ETA anchors
        self._closed = False

        self.start_button.changed.connect(self.start)
        self.cancel_button.changed.connect(self.cancel)
        self.use_viewer.changed.connect(self._on_use_viewer)
        self.model.changed.connect(self._on_model)
        events = viewer.layers.events
        self._hooks = [(event, self._on_layers_changed)
                       for event in (events.inserted, events.removed, events.moved)]
        self._hooks.append((MODELS_CHANGED, self._on_models_changed))
        for event, callback in self._hooks:
            event.connect(callback)
        self.native.destroyed.connect(self._on_destroyed)
        self._on_layers_changed()
        self._on_models_changed()
        if not _PREFETCH["started"]:
            _PREFETCH["started"] = True
            # an import that fails here fails the run later, with a notification
            create_worker(_prefetch, _connect={"errored": lambda exc: None,
                                               "finished": lambda: _PREFETCH.update(done=True)})

    @property
    def prefetching(self) -> bool:
        """True while the session's one-off imports (`_prefetch`) are still running."""
        return _PREFETCH["started"] and not _PREFETCH["done"]

    # training set -------------------------------------------------------------------------
    def _folder_panel(self) -> QWidget:
        panel = QWidget()
        box = QVBoxLayout(panel)
        box.setContentsMargins(0, 0, 0, 0)
        self.folder_list = QListWidget()
        self.folder_list.setSelectionMode(QAbstractItemView.ExtendedSelection)
        self.folder_list.setMaximumHeight(56)
        self.folder_list.setVisible(False)  # shown once it lists a folder
        self.folder_list.setToolTip("Case folders in the training set (ctp.nii.gz, dwi.nii.gz, "
                                    "adc.nii.gz, mask.nii.gz, lesion.nii.gz)")
        buttons = QHBoxLayout()
        add = QPushButton("Add case folders…")
        add.setToolTip("A case folder, or a data folder: all case folders in it")
        add.clicked.connect(self._add_folder_dialog)
        remove = QPushButton("Remove")
        remove.clicked.connect(self._remove_selected_folders)
        self.save_case_button = QPushButton("Save viewer case…")
        self.save_case_button.setToolTip("Write the viewer case (its lesion as painted now) as a case "
                                         "folder and add it here: annotate several cases one after the "
                                         "other, then train on all of them")
        self.save_case_button.clicked.connect(lambda: self.save_viewer_case())
        buttons.addWidget(add)
        buttons.addWidget(self.save_case_button)
        buttons.addWidget(remove)
        box.addWidget(self.folder_list)
        box.addLayout(buttons)
        return panel

    def _add_folder_dialog(self) -> None:
        path = QFileDialog.getExistingDirectory(self.native, "Case folder, or a data folder of cases")
        if path:
            self.add_folders(path)

    def add_folders(self, path: str | Path) -> list[Path]:
        """Add a case folder, or every case folder in a data folder; returns those added.

        A folder that holds no case gives a notification (nothing is added).
        """
        try:
            found = [Path(p) for p in resolve_cases(Path(path).expanduser())]
        except InputError as exc:
            show_error(str(exc))
            return []
        added = [p for p in found if p not in self.folders]
        self.folders.extend(added)
        self.folder_list.addItems([str(p) for p in added])
        self.folder_list.setVisible(bool(self.folders))
        return added

    def save_viewer_case(self, parent: str | Path | None = None) -> Any:
        """Save the viewer case as a case folder in ``parent`` (asked for when None), in a
        worker, and add it to the training set; returns the worker (None on bad input).

        Saving the same case again replaces the folder this widget wrote for it; an existing
        folder it did not write is left alone and the new one gets a suffix.
        """
        try:
            layers = self._viewer_layers()  # masks copied now: painting on does not change the save
        except InputError as exc:
            show_error(str(exc))
            return None
        if parent is None:
            parent = QFileDialog.getExistingDirectory(self.native, "Folder to save annotated cases in")
            if not parent:
                return None
        name = viewer_case_name(layers["ctp"][1])
        parent = Path(parent).expanduser()
        folder = parent / name
        overwrite = folder in self._saved
        n = 1
        while folder.exists() and not overwrite:
            n += 1
            folder = parent / f"{name}-{n}"
        self.save_case_button.setEnabled(False)
        self.status.value = f"Saving the viewer case to {folder}…"

        def saved(path: Path) -> None:
            if self._closed:
                return
            self._saved[path] = name
            if path not in self.folders:
                self.add_folders(path)
            self.status.value = f"Saved the viewer case as {path}; it is in the training set"
            show_info(f"Viewer case saved as {path}")

        def failed(exc: Exception) -> None:
            if self._closed:
                show_error(f"Saving the viewer case failed: {exc}")
                return
            self.status.value = "Saving failed: see the notification"
            show_error(str(exc) if isinstance(exc, InputError) else
                       f"Saving the viewer case failed ({type(exc).__name__}): {exc}")

        def write() -> Path:
            _prefetch()
            return save_viewer_case(layers, parent, folder.name, overwrite)

        worker = create_worker(write, _start_thread=False,
                               _connect={"returned": saved, "errored": failed,
                                         "finished": lambda: None if self._closed
                                         else self.save_case_button.setEnabled(True)})
        worker.start()
        return worker

    def _remove_selected_folders(self) -> None:
        rows = sorted((self.folder_list.row(item) for item in self.folder_list.selectedItems()),
                      reverse=True)
        for row in rows:
            self.folder_list.takeItem(row)
            del self.folders[row]
        self.folder_list.setVisible(bool(self.folders))

    def _on_use_viewer(self, on: bool) -> None:
        for combo in self.pickers.values():
            combo.enabled = on

    def _on_layers_changed(self, _event: Any = None) -> None:
        self._auto_setting = True
        try:
            for role, combo in self.pickers.items():
                combo.reset_choices()
                if role not in self._auto:
                    continue
                layers = [layer for _, layer in _choices(self.viewer, *_PICKERS[role])()]
                named = [layer for layer in layers if layer.name == _DEFAULT_NAMES[role]]
                # the CTP picker falls back to the only 4-D image; masks need their name, as
                # a wrong mask would silently train on the wrong lesion
                fallback = layers[:1] if role == "ctp" else []
                combo.value = (named or fallback or [None])[0]
        finally:
            self._auto_setting = False

    def _viewer_layers(self) -> dict[str, Any]:
        """The viewer case's ``{role: (data, attributes)}``, checked; masks copied now."""
        picked = {role: combo.value for role, combo in self.pickers.items()}
        if picked["ctp"] is None:
            images = [x.name for x in self.viewer.layers if isinstance(x, Image)]
            hint = (f" (the image layers here, {', '.join(map(repr, images))}, are not 4-D)"
                    if images else "")
            raise InputError("no CT perfusion layer for the viewer case" + hint + "; open a case "
                             "(a 4-D CTP with DWI, ADC, brain mask and lesion), or untick 'Viewer case'")
        for role, layer in picked.items():
            if layer is not None and layer not in self.viewer.layers:
                raise InputError(f"the {CASE_ROLES[role]} layer {layer.name!r} was removed; pick another")
        layers = {role: None if layer is None else (layer.data, _layer_attributes(layer))
                  for role, layer in picked.items()}
        check_case_layers(layers)
        for role in ("mask", "lesion"):
            # a copy: painting on while the worker trains must not change its data under it
            data, attributes = layers[role]
            layers[role] = (np.array(data), attributes)
        return layers

    # models -------------------------------------------------------------------------------
    def _model_choices(self, _widget: Any = None) -> list[tuple[str, Path]]:
        return model_choices()

    def _on_models_changed(self) -> None:
        self.model.reset_choices()
        if self.model.value is None and not str(self.checkpoint.value).strip(". "):
            choices = model_choices()
            self.model.value = choices[0][1] if choices else None
        self._on_model()

    def _on_model(self, _value: Any = None) -> None:
        self.checkpoint.enabled = self.model.value is None

    def _base_path(self) -> Path:
        if self.model.value is not None:
            return Path(self.model.value)
        text = str(self.checkpoint.value).strip()
        if text in ("", "."):
            raise InputError("choose the base model: a registered one, or a cLDM checkpoint folder "
                             "(holding config.json and .safetensors weights)")
        return Path(text).expanduser()

    def _output_path(self) -> Path:
        text = str(self.output.value).strip()
        if text in ("", "."):
            raise InputError("choose an output folder for the post-trained model (a new or empty "
                             "folder; or the folder of a cancelled run, with 'Continue the saved run')")
        out = Path(text).expanduser()
        # prepare_out_dir's rules (checked again in the worker), worded for this widget
        if out.exists() and not out.is_dir():
            raise InputError(f"the output folder {out} is a file; choose a folder")
        if self.resume.value:
            if not (out / "config.json").is_file():
                raise InputError(f"{out} holds no saved run to continue (no config.json); untick "
                                 "'Continue the saved run' to start a new one")
        elif out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()):
            raise InputError(f"the output folder {out} is not empty; choose a new or empty folder, "
                             "or tick 'Continue the saved run' to continue the run saved there")
        return out

    # run ----------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """True from Start until the run has finished, failed or been cancelled."""
        return self.worker is not None

    def start(self) -> Any:
        """Start post-training in a worker thread; returns the worker (None on bad input)."""
        if self.busy:
            return None
        try:
            layers = self._viewer_layers() if self.use_viewer.value else None
            folders = list(self.folders)
            if layers is not None:  # the viewer case as it is now, not also its saved copy
                live = viewer_case_name(layers["ctp"][1])
                folders = [f for f in folders if self._saved.get(f) != live]
            if layers is None and not folders:
                raise InputError("the training set is empty: add case folders, or tick 'Viewer case' "
                                 "and pick the layers of a case open in the viewer")
            base, out = self._base_path(), self._output_path()
        except InputError as exc:
            show_error(str(exc))
            return None
        if layers is not None and not layers["lesion"][0].any() and self.lambda_lesion.value > 0:
            show_warning(f"the lesion layer {layers['lesion'][1]['name']!r} is empty, so this case "
                         "adds nothing to the lesion term (Eq. 7); paint the lesion first")
        settings = {"lambda_image": self.lambda_image.value, "lambda_lesion": self.lambda_lesion.value,
                    "steps": self.steps.value, "batch_size": self.batch_size.value,
                    # 1× is the paper's uniform sampling: no sampler at all, not weights of 1
                    "lesion_oversample": self.oversample.value if self.oversample.value > 1 else None,
                    "device": self.device.value, "resume": self.resume.value}
        evaluate, eval_steps = self.evaluate.value, self.eval_steps.value
        token = CancelToken()
        emit = self.relay.reported.emit
        job = {"base": str(base), "out": str(out), "seed": SEED, "settings": settings,
               "evaluate": {"n_steps": eval_steps, "labels": [BASE_LABEL, NEW_LABEL]} if evaluate else None}

        def work() -> PostTrainResult:
            _prefetch()
            sources = [str(f) for f in folders]
            tmp = None
            try:
                if layers is not None:  # the viewer case goes to the child as a case folder
                    tmp = tempfile.mkdtemp(prefix="ctp2mri-viewer-case-")
                    sources.append(str(save_viewer_case(layers, tmp)))
                token.raise_if_cancelled()
                child = ChildRun({**job, "sources": sources}).start()
                self.child = child
                if token.cancelled:  # Cancel pressed while the child was being started
                    child.cancel(CANCEL_TIMEOUT_S)
                final: dict[str, Any] = {}
                for event in child:
                    if event["event"] == "progress":
                        # the GUI thread gets its own copy (a queued signal)
                        emit(event["phase"], event["step"], event["total"], event["info"])
                    else:
                        final = event
            finally:
                if tmp is not None:
                    shutil.rmtree(tmp, ignore_errors=True)
            kind = final.get("event")
            if kind == "done":
                rows = final.get("rows")
                return PostTrainResult(out, base, final["steps"], final["seconds"],
                                       metric_rows(rows) if rows is not None else None,
                                       final.get("metrics_note", ""))
            if kind == "cancelled":
                raise Cancelled(final.get("message") or "cancelled", checkpoint=final.get("checkpoint"),
                                step=final.get("step"))
            if kind == "error" and final.get("user_error"):
                raise InputError(final["message"])
            raise ChildFailed(final)

        self.cancel_token, self.result, self.last_step, self.child = token, None, 0, None
        self._run = {"out": out, "label": self.model_name.value.strip() or out.name}
        self._set_running(True)
        self.loss_plot.reset(settings["steps"])
        self.metrics_table.setVisible(False)
        self.status.value = "Starting the post-training process…"
        # errored is connected at creation: a worker without an errored handler re-raises
        # its exception in the Qt event loop (a traceback instead of a notification)
        self.worker = create_worker(work, _start_thread=False, _connect={
            "returned": self._on_returned, "errored": self._on_error, "finished": self._on_finished})
        self.worker.start()
        return self.worker

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
        self.start_button.enabled = not running
        self.cancel_button.enabled = running
        self.cancel_button.text = "Cancel"
        self.cancel_button.tooltip = ("Stop after the running step, keeping a checkpoint that "
                                      "'Continue the saved run' resumes")
        self.progress_bar.setVisible(running)
        self.progress_bar.setRange(0, 0)  # busy until the first report
        self.progress_bar.setFormat("")
        if running:
            self._plot_timer.start()
        else:
            self._plot_timer.stop()
            self.loss_plot.redraw()

    def _eta(self, phase: str, step: int, total: int, seconds: float) -> str:
        """From the time since the phase's first report: the first step also loads and warms up."""
        anchor = self._run.setdefault(f"anchor_{phase}", (step, seconds))
        if step <= anchor[0]:
            return ""
        return format_eta((seconds - anchor[1]) / (step - anchor[0]) * (total - step))

    def _on_progress(self, phase: str, step: int, total: int, info: dict[str, Any]) -> None:
        if self.worker is None or self._closed:
            return  # a report queued before the run ended
        cancelling = self.cancel_token is not None and self.cancel_token.cancelled
        self.progress_bar.setRange(0, total)
        self.progress_bar.setValue(step)
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
        if not cancelling:
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

    def _on_error(self, exc: Exception) -> None:
        if self._closed:
            return
        if isinstance(exc, Cancelled):
            self._notify_cancelled(exc)
        elif isinstance(exc, InputError):
            self.status.value = "Failed: see the notification"
            show_error(str(exc))
        elif isinstance(exc, ChildFailed) and exc.crashed:
            # killed (the OOM killer, by hand) or a native crash: only the child is gone
            self.status.value = ("Failed: the post-training process ended unexpectedly; the viewer "
                                 "is unaffected (see the notification)")
            show_error(f"Post-training failed: {exc}")
        elif isinstance(exc, ChildFailed):  # a bug in the child, with its type
            self.status.value = "Failed: see the notification"
            show_error(f"Post-training failed ({exc.event.get('type', 'error')}): {exc}")
        else:  # a bug, not the user's fault: still a notification, with its type
            self.status.value = "Failed: see the notification"
            show_error(f"Post-training failed ({type(exc).__name__}): {exc}")

    def _notify_cancelled(self, exc: Cancelled) -> None:
        out = exc.checkpoint or self._run.get("out")
        if exc.step is not None and out is not None and (Path(out) / "config.json").is_file():
            message = (f"Post-training cancelled at step {exc.step}; the checkpoint in {out} "
                       "keeps it: tick 'Continue the saved run' and press Start to resume")
        else:
            message = "Post-training cancelled before its first checkpoint; nothing was saved"
        self.status.value = message
        show_info(message)

    def _on_finished(self) -> None:
        self.worker, self.cancel_token, self.child = None, None, None
        if not self._closed:
            self._set_running(False)

    def _on_destroyed(self, *_args: Any) -> None:
        self._closed = True
        try:
            self._plot_timer.stop()
        except RuntimeError:  # Qt deleted it already
            pass
        self.loss_plot.close()
        for event, callback in self._hooks:
            event.disconnect(callback)
        self._hooks = []
        if self.cancel_token is not None and not self.cancel_token.cancelled:
            self.cancel_token.cancel()
            if self.child is not None:  # it saves a checkpoint and exits (killed if it does not)
                self.child.cancel(CANCEL_TIMEOUT_S)
