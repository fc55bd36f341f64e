"""Between the CTP's grid and the model's: the brain mask, the model-grid condition, and the
result back on the CTP's grid (steps 1, 2 and 5 of `ctp2mri.synthesis.synthesize.synthesize`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ctp2mri.errors import InputError
from ctp2mri.io.volume import Volume
from ctp2mri.preprocessing.preprocess import (
    AIR_HU,
    CTP_HU_RANGE,
    brain_mask_from_ctp,
    model_grid,
    normalise_ctp,
    resample_frames,
    resample_like,
    resample_to_grid,
)
from ctp2mri.profiles import PROFILES, Profile, get_profile
from ctp2mri.progress import CancelToken

__all__ = ["ModelGrid", "back_to_input", "brain_on_input", "check_companions", "model_input", "profile_notice"]

_WEIGHT_FLOOR = 1e-3  # resampled brain weight below which a voxel has no model data


def profile_notice(ctp: Volume, model_profile: str) -> str | None:
    """A notice when the CTP sits on another profile's grid than the model's."""
    for name, prof in PROFILES.items():
        if name != model_profile and np.allclose(ctp.spacing, prof.spacing, atol=1e-3):
            model_prof = get_profile(model_profile)
            return (f"the CTP is on the {name!r} profile's grid ({_mm(prof.spacing)}) but the model "
                    f"works on {model_profile!r} ({_mm(model_prof.spacing)}): the CTP is resampled "
                    "to the model's grid and the result back to the CTP's")
    return None


def _mm(spacing: Any) -> str:
    return "×".join(f"{s:g}" for s in spacing) + " mm"


def check_companions(ctp: Volume, brain_mask: Volume | None, ground_truth: Volume | None) -> None:
    """Masks that cannot be used are refused before the model is loaded, not after sampling."""
    for volume, name in ((brain_mask, "brain mask"), (ground_truth, "ground-truth lesion")):
        if volume is not None:
            volume.require_3d(name).require_finite(name).require_same_grid(ctp, name, "CTP")


def brain_on_input(ctp: Volume, brain_mask: Volume | None, cancel: CancelToken | None) -> tuple[Volume, str]:
    """The brain mask on the CTP's grid (uint8) and where it came from (given or derived)."""
    if brain_mask is None:
        return brain_mask_from_ctp(ctp, cancel=cancel), "derived from the CTP"
    brain_mask.require_3d("brain mask").require_same_grid(ctp, "brain mask", "CTP")
    brain = brain_mask.with_array((np.asarray(brain_mask.array) != 0).astype(np.uint8))
    if not brain.array.any():
        raise InputError("the brain mask is empty (all zero); leave it out to derive one from "
                         "the CTP, or give the right mask")
    return brain, "given"


@dataclass(frozen=True)
class ModelGrid:
    """Where the model sees the CTP.

    Attributes
    ----------
    affine, shape
        The profile's grid placed over the brain (`ctp2mri.preprocessing.preprocess.model_grid`).
    brain
        Boolean brain mask on that grid.
    keep
        Indices of the axial slices holding brain: the only ones sampled.
    """

    affine: np.ndarray
    shape: tuple[int, int, int]
    brain: np.ndarray
    keep: np.ndarray


def model_input(ctp: Volume, prof: Profile, brain: Volume,
                cancel: CancelToken | None) -> tuple[ModelGrid, torch.Tensor]:
    """The model grid and, on it, the condition of `ctp2mri.synthesis.inference.sample_slices`:
    every frame resampled onto the profile's grid over the brain, then to the profile's frames,
    and the brain slices normalised per the contract ((slices, frames, X, Y), float32).

    Raises
    ------
    InputError
        No brain voxel falls on the model's grid.
    """
    grid_affine, grid_shape = model_grid(ctp, prof, brain)
    ctp_g = resample_to_grid(ctp, grid_affine, grid_shape, "linear", AIR_HU, cancel=cancel)
    brain_g = resample_to_grid(brain, grid_affine, grid_shape, "nearest").array != 0
    ctp_t = resample_frames(ctp_g, prof.n_frames)
    del ctp_g
    keep = np.flatnonzero(brain_g.any(axis=(0, 1)))
    if keep.size == 0:
        raise InputError("no brain voxel falls on the model's grid; check the brain mask")
    # (X, Y, z, t) → (slices, frames, X, Y), only the slices with brain
    cond = np.clip(normalise_ctp(ctp_t.array[:, :, keep, :], brain_g[:, :, keep], CTP_HU_RANGE),
                   -1.0, 1.0).transpose(2, 3, 0, 1)
    return ModelGrid(grid_affine, grid_shape, brain_g, keep), torch.from_numpy(np.ascontiguousarray(cond))


def back_to_input(channels: dict[str, np.ndarray], weight: np.ndarray, grid: np.ndarray,
                  ctp: Volume, brain: np.ndarray, cancel: CancelToken | None,
                  ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Model-grid maps onto the CTP's grid, normalised by the resampled brain weight, and
    the input-grid brain voxels that the model's brain covers (where the maps are defined).

    Each map is zero outside the model-grid brain; resampling it alone would darken a
    partial-volume rim along the brain's edge (and put false core there, ADC dropping
    towards 0). Resampling ``map × brain`` and ``brain`` together and dividing
    (normalised convolution) keeps edge values at the tissue's.
    """
    names = list(channels)
    stack = np.stack([channels[n] * weight for n in names] + [weight], axis=-1)
    moved = resample_like(Volume(stack.astype(np.float32), grid), ctp, "linear", cancel=cancel).array
    w = moved[..., -1]
    valid = (w > _WEIGHT_FLOOR) & brain
    out = {}
    for i, name in enumerate(names):
        a = np.zeros(w.shape, dtype=np.float32)
        np.divide(moved[..., i], w, out=a, where=valid)
        out[name] = a
    return out, valid
