"""The perfusion encoder's own lesion estimate: the probability its lesion head gives each voxel.

A cLDM trained with the learned perfusion encoder and its condition heads (`train-ldm
--condition perfusion --condition-loss`, the demo bundles since v4) predicts, from the CTP
alone and before any sampling, a lesion logit on the latent grid (class-balanced BCE against
the lesion mask, `ctp2mri.losses.condition_loss`). `lesion_probability` upsamples its sigmoid
bilinearly to the slice grid. It costs one encoder pass per slice, so `synthesize` returns it
beside the sampled images as a second, independent view of where the model puts the core.
The class balancing pushes probabilities up around the core: read it as a map, and threshold
high (for the v6 demo bundle on its tuning set the core Dice on lesions ≥ 5 ml was 0.36 at
p > 0.5 and best, 0.66, at p > 0.98; resources/models/demo/REPORT.md §D6).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ctp2mri.progress import CancelToken

__all__ = ["has_lesion_head", "lesion_probability"]


def _encoder(model: Any) -> torch.nn.Module | None:
    encoder = getattr(getattr(model, "cldm", None), "perfusion_encoder", None)
    return encoder if getattr(encoder, "lesion_head", None) is not None else None


def has_lesion_head(model: Any) -> bool:
    """Whether a loaded model (`ctp2mri.synthesis.loading.load_model`) has a perfusion encoder
    with a lesion head (cBBDM, Pix2Pix and the paper's rescaler conditioning have none)."""
    return _encoder(model) is not None


def lesion_probability(model: Any, cond: torch.Tensor, batch_size: int = 16,
                       cancel: CancelToken | None = None) -> np.ndarray | None:
    """(n, H, W) float32 lesion probability of the model's lesion head for (n, T, H, W)
    normalised CTP slices, or None when the model has no lesion head.

    Computed on the model's device, ``batch_size`` slices at a time, in fp32.
    """
    encoder = _encoder(model)
    if encoder is None:
        return None
    device = next(encoder.parameters()).device
    out = []
    with torch.inference_mode():
        for start in range(0, cond.shape[0], max(1, int(batch_size))):
            if cancel is not None:
                cancel.raise_if_cancelled()
            c = cond[start:start + batch_size].to(device=device, dtype=torch.float32)
            out.append(encoder.lesion_probability(c)[:, 0].cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, *cond.shape[-2:]), np.float32)
