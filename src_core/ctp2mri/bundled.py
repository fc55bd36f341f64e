"""The models that ship with the project (``resources/models/``), found offline by name.

Every ``--model`` option and the napari widgets accept a bundled model's name (``demo``,
``demo-base``) as well as a checkpoint folder. The bundled files live in the repository's
``resources/models/`` (an editable install, the README's set-up) or, for a wheel install,
in ``<prefix>/share/napari-ctp2mri/models/``; ``CTP2MRI_RESOURCES`` points elsewhere.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ctp2mri.errors import InputError

__all__ = ["BUNDLED_MODELS", "RESOURCES_ENV", "bundled_model", "bundled_models", "resolve_model", "resources_dir"]

RESOURCES_ENV = "CTP2MRI_RESOURCES"

#: name → (folder under resources/models, what it is). The first is the default model.
BUNDLED_MODELS: dict[str, tuple[str, str]] = {
    "demo": ("demo/cldm_post_trained", "demo profile, lesion-aware post-trained cLDM (λ_image 0.01, λ_lesion 0.02)"),
    "demo-base": ("demo/cldm_base", "demo profile, base cLDM (Eq. 4 only)"),
    "demo-autoencoder": ("demo/autoencoder", "demo profile, VQGAN autoencoder"),
    "demo-reference": ("demo/reference_unet", "demo profile, U-Net regressor trained with L1 only (the non-generative reference)"),
}
DEFAULT_MODEL = "demo"


def resources_dir() -> Path | None:
    """The ``resources`` folder holding ``models/``, or None when none is installed."""
    candidates = []
    if os.environ.get(RESOURCES_ENV):
        candidates.append(Path(os.environ[RESOURCES_ENV]))
    candidates.append(Path(__file__).resolve().parents[2] / "resources")  # repository checkout
    candidates.append(Path(sys.prefix) / "share" / "napari-ctp2mri")  # wheel's data_files
    for folder in candidates:
        if (folder / "models").is_dir():
            return folder
    return None


def bundled_models() -> dict[str, Path]:
    """``{name: checkpoint folder}`` of the bundled models present on this installation."""
    root = resources_dir()
    if root is None:
        return {}
    found = {}
    for name, (sub, _) in BUNDLED_MODELS.items():
        path = root / "models" / sub
        if (path / "config.json").is_file():
            found[name] = path
    return found


def bundled_model(name: str = DEFAULT_MODEL) -> Path:
    """Checkpoint folder of bundled model ``name``; a clear error when it is not installed."""
    if name not in BUNDLED_MODELS:
        raise InputError(f"no bundled model called {name!r}; bundled: {', '.join(BUNDLED_MODELS)}")
    found = bundled_models()
    if name not in found:
        raise InputError(
            f"the bundled model {name!r} is not installed (looked in ${RESOURCES_ENV}, the repository's "
            "resources/models and <prefix>/share/napari-ctp2mri/models). Reinstall from a full checkout, "
            "or rebuild it with `ctp2mri train-demo --bundle resources/models/demo` (about 75 minutes on a 2-core CPU)")
    return found[name]


def resolve_model(spec: str | os.PathLike) -> Path:
    """A ``--model`` value as a checkpoint folder: an existing path, else a bundled model's name."""
    path = Path(spec)
    if path.exists():
        return path
    if str(spec) in BUNDLED_MODELS:
        return bundled_model(str(spec))
    raise InputError(f"checkpoint folder {path} does not exist, and {str(spec)!r} is not a bundled model name "
                     f"either ({', '.join(BUNDLED_MODELS)})")
