"""The models the widgets offer: one process-wide registry, and the model picker over it.

The bundled demo models (`ctp2mri.bundled`) register themselves when this module is first
imported; the post-training widget registers each model it writes. Every open synthesis and
post-training widget lists the registered models and follows `MODELS_CHANGED`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from magicgui.widgets import ComboBox, FileEdit
from psygnal import SignalInstance

from ctp2mri.errors import InputError

__all__ = ["BUNDLED_LABELS", "MODELS_CHANGED", "ModelPicker", "model_choices", "register_bundled_models",
           "register_model"]

_MODELS: dict[str, Path] = {}
#: Emitted (no arguments) when `register_model` changes the list; open widgets refresh.
MODELS_CHANGED = SignalInstance()
#: Labels under which the bundled models are offered (the autoencoder alone cannot synthesise).
BUNDLED_LABELS = {"demo": "demo: post-trained cLDM (bundled)", "demo-base": "demo: base cLDM (bundled)",
                  "demo-reference": "demo: U-Net L1 reference (bundled)"}


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


def register_bundled_models() -> None:
    """Offer the bundled demo models (`ctp2mri.bundled`) that this installation has, default first."""
    from ctp2mri.bundled import bundled_models

    for name, path in bundled_models().items():
        if name in BUNDLED_LABELS:
            register_model(BUNDLED_LABELS[name], path)


register_bundled_models()


class ModelPicker:
    """A registered model, or else a checkpoint folder: the pair of fields a widget shows.

    ``model`` lists the registered models (empty: use the folder); ``checkpoint`` is enabled
    only while no registered model is chosen. The owning widget adds both fields to its form
    and connects `refresh` to `MODELS_CHANGED` (and disconnects it when it closes).
    """

    def __init__(self, label: str, checkpoint_tooltip: str) -> None:
        self.model = ComboBox(label=label, choices=self._choices, nullable=True,
                              tooltip="A registered model, or empty to use the folder below")
        self.checkpoint = FileEdit(label="Checkpoint folder", mode="d", tooltip=checkpoint_tooltip)
        self.model.changed.connect(self._on_model)

    @staticmethod
    def _choices(_widget: Any = None) -> list[tuple[str, Path]]:
        return model_choices()

    def refresh(self) -> None:
        """Re-read the registry; an empty choice with no folder typed gets the first model."""
        self.model.reset_choices()
        if self.model.value is None and not str(self.checkpoint.value).strip(". "):
            choices = model_choices()
            self.model.value = choices[0][1] if choices else None
        self._on_model()

    def _on_model(self, _value: Any = None) -> None:
        self.checkpoint.enabled = self.model.value is None

    def path(self, what: str = "a model") -> Path:
        """The chosen model's checkpoint folder; `InputError` when neither field says one."""
        if self.model.value is not None:
            return Path(self.model.value)
        text = str(self.checkpoint.value).strip()
        if text in ("", "."):
            raise InputError(f"choose {what}: a registered one, or a cLDM checkpoint folder "
                             "(holding config.json and .safetensors weights)")
        return Path(text).expanduser()
