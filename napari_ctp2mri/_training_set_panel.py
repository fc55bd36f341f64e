"""The post-training widget's training set: the viewer case's layers and the case folders.

The user trains on the case open in the viewer (its CTP, DWI, ADC, brain mask and lesion layers,
the lesion as it is at Start) and/or on case folders, listed with add/remove. "Save viewer
case…" writes the viewer case as a case folder and lists it, so several annotated cases,
opened one after the other, make one training set. The conversions themselves are the
Qt-free `napari_ctp2mri._training_set`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from magicgui.widgets import CheckBox, ComboBox
from napari.layers import Image, Labels
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import (
    QAbstractItemView,
    QFileDialog,
    QHBoxLayout,
    QListWidget,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ctp2mri.data import resolve_cases
from ctp2mri.errors import InputError
from napari_ctp2mri._layers import layer_attributes
from napari_ctp2mri._post_train_job import prefetch
from napari_ctp2mri._training_set import (
    CASE_ROLES,
    LayerInput,
    check_case_layers,
    save_viewer_case,
    viewer_case_name,
)

__all__ = ["TrainingSetMixin"]

# Layer kinds per role: (layer type, dimensions offered; None = any). Labels of any shape are
# offered, so that a mask on another grid gets a message rather than silently not being listed.
_PICKERS: dict[str, tuple[type, int | None]] = {
    "ctp": (Image, 4), "dwi": (Image, 3), "adc": (Image, 3), "mask": (Labels, None),
    "lesion": (Labels, None),
}
# the names the reader and the sample data give a case's layers
_DEFAULT_NAMES = {"ctp": "CTP", "dwi": "DWI", "adc": "ADC", "mask": "brain mask", "lesion": "lesion"}


def _choices(viewer: Any, kind: type, ndim: int | None) -> Any:
    def choices(_widget: Any = None) -> list[tuple[str, Any]]:
        return [(layer.name, layer) for layer in viewer.layers
                if isinstance(layer, kind) and (ndim is None or layer.ndim == ndim)
                and not getattr(layer, "rgb", False)]
    return choices


class TrainingSetMixin:
    """The training-set part of `napari_ctp2mri._post_train_widget.PostTrainWidget`.

    The widget calls `_init_training_set` first, adds ``use_viewer``, the ``pickers`` and
    `_folder_panel` to its form, and connects `_on_layers_changed` to the viewer's layer
    events; this part uses the widget's ``viewer``, ``native``, ``status`` and ``_closed``.
    """

    viewer: Any
    native: Any
    status: Any
    _closed: bool

    def _init_training_set(self, viewer: Any) -> None:
        self._auto = set(_PICKERS)  # pickers the user has not touched follow the default names
        self._auto_setting = False
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
        self.use_viewer.changed.connect(self._on_use_viewer)
        self.folders: list[Path] = []
        # case folders this widget wrote → the viewer case each holds (re-saving replaces them)
        self._saved: dict[Path, str] = {}

    def _training_set(self) -> tuple[dict[str, LayerInput] | None, list[Path]]:
        """The viewer case's layers (None: not trained on) and the case folders to train on."""
        layers = self._viewer_layers() if self.use_viewer.value else None
        folders = list(self.folders)
        if layers is not None:  # the viewer case as it is now, not also its saved copy
            live = viewer_case_name(layers["ctp"][1])
            folders = [f for f in folders if self._saved.get(f) != live]
        if layers is None and not folders:
            raise InputError("the training set is empty: add case folders, or tick 'Viewer case' "
                             "and pick the layers of a case open in the viewer")
        return layers, folders

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
            prefetch()
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
        layers = {role: None if layer is None else (layer.data, layer_attributes(layer))
                  for role, layer in picked.items()}
        check_case_layers(layers)
        for role in ("mask", "lesion"):
            # a copy: painting on while the worker trains must not change its data under it
            data, attributes = layers[role]
            layers[role] = (np.array(data), attributes)
        return layers
