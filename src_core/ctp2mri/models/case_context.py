"""Case context: one number per case, from the whole CTP volume, that every slice is told.

Not in the paper. The targets are normalised per case (DWI from its 0.5 % to its 99.5 % brain
quantile), so when a case holds a large lesion its 99.5 % quantile lies on the lesion and
normal tissue lands lower in [−1, 1] — on *every* slice, also on those that do not show the
lesion. A slice-wise model cannot see that from one slice and draws normal tissue at the level
of a case without a large lesion (resources/models/demo/REPORT.md §D11: +0.46 against the
truth's −0.16 on the lesion-free slices of a 92.8 ml lesion's case).

The context tells it the case's lesion burden as the CTP shows it: the fraction of the brain
(the voxels whose CTP curve is not all 0, as `perfusion_features` defines it) where a frozen
perfusion encoder's lesion head gives p > ``threshold``, over all slices of the case, as
``log1p(100 · fraction)`` (0 without lesion, 0.4 at 0.5 %, 2 at 6.5 %). The encoder is the
base model's own, copied and frozen when post-training adds the context
(`add_case_context`), so the number a model is trained with and the number it is used with
come from the same function of the CTP. The network sees it as one more constant input
channel beside c̃ (`ConditionalLDM.encode_condition`), times `CONTEXT_SCALE`.
"""

from __future__ import annotations

import copy
import math

import torch

from ctp2mri.errors import InputError

__all__ = ["CONTEXT_SCALE", "CONTEXT_THRESHOLD", "add_case_context", "burden_value", "lesion_burden"]

#: Lesion-head probability above which a voxel counts as lesion. On the training phantom the
#: count at 0.98 follows the true lesion fraction without the bulk of false positives that
#: the class-balanced head spreads at lower probabilities (the summed probability is about
#: 24 × the true volume, the count at 0.98 about 0.9 ×).
CONTEXT_THRESHOLD = 0.98
#: The context plane's scale in the UNet's input. Its weights start at 0 and Adam moves each by
#: about the learning rate per step, so the input changes by about lr × scale per step: at scale
#: 1 (the size of c̃'s own channels) 1500 post-training steps at 10⁻⁴ moved the normal tissue of
#: the largest tuning case (92.8 ml) an eighth of the way to its level (rDWI 1.20 → 1.25 of 1.60).
CONTEXT_SCALE = 8.0


def burden_value(fraction: float | torch.Tensor) -> float | torch.Tensor:
    """The context's value for a lesion fraction of the brain: ``log1p(100 · fraction)``."""
    if isinstance(fraction, torch.Tensor):
        return torch.log1p(100.0 * fraction)
    return math.log1p(100.0 * float(fraction))


def lesion_burden(encoder: torch.nn.Module, cond: torch.Tensor, threshold: float = CONTEXT_THRESHOLD,
                  batch_size: int = 16) -> float:
    """Fraction of the brain where ``encoder``'s lesion head gives p > ``threshold``.

    ``cond``: (n, T, H, W) normalised CTP slices of **one whole case**, 0 outside the brain
    (a subset of its slices gives another number), on the slice grid
    (`PerfusionEncoder.lesion_probability`, as synthesis' lesion map). 0 for a case without
    brain voxels.
    """
    if cond.ndim != 4:
        raise InputError(f"the case context needs a case's CTP slices shaped (slices, frames, H, W); "
                         f"got {tuple(cond.shape)}")
    device = next(encoder.parameters()).device
    hits, brain = 0.0, 0.0
    with torch.no_grad():
        for start in range(0, int(cond.shape[0]), max(1, int(batch_size))):
            c = cond[start:start + batch_size].to(device=device, dtype=torch.float32)
            p = encoder.lesion_probability(c)
            inside = (c != 0).any(dim=1, keepdim=True)
            hits += float(((p > threshold) & inside).sum())
            brain += float(inside.sum())
    return hits / brain if brain else 0.0


def add_case_context(cldm: torch.nn.Module, threshold: float = CONTEXT_THRESHOLD,
                     encoder: torch.nn.Module | None = None, scale: float = CONTEXT_SCALE) -> torch.nn.Module:
    """A copy of ``cldm`` (a `ConditionalLDM` with a perfusion encoder and its lesion head) that
    also takes the case context, computing exactly what ``cldm`` computes until trained.

    The new network holds a frozen copy of ``encoder`` (default: ``cldm``'s own perfusion
    encoder; post-training passes the base's EMA one, what its synthesis used, to the training
    weights and to their average alike) as its context encoder; the UNet's first convolution
    gets one more input channel, its weights 0, so the context changes nothing until
    post-training learns to use it. ``scale`` multiplies the context in the UNet's input
    (`CONTEXT_SCALE`).
    """
    from ctp2mri.models.cldm import ConditionalLDM

    if not isinstance(cldm, ConditionalLDM) or not cldm.has_condition_head:
        raise InputError("the case context is read by the base's perfusion encoder and its lesion head: post-train "
                         "a cLDM trained with --condition perfusion and the condition loss (the demo models since v4)")
    if cldm.case_context is not None:
        raise InputError("this cLDM already takes the case context")
    if not (0.0 < float(threshold) < 1.0):
        raise InputError(f"the case context's probability threshold must lie in (0, 1), got {threshold}")
    if not (0.0 < float(scale) < float("inf")):
        raise InputError(f"the case context's scale must be a positive number, got {scale}")
    source = cldm.encoder if encoder is None else encoder
    if type(source) is not type(cldm.encoder) or source.config != cldm.encoder.config:
        raise InputError("the context encoder must be a perfusion encoder of the same configuration as the cLDM's")
    config = {**copy.deepcopy(cldm.config),
              "case_context": {"threshold": float(threshold), "scale": float(scale),
                               "encoder": copy.deepcopy(source.config)}}
    new = ConditionalLDM(**config).to(next(cldm.parameters()).device)
    state = cldm.state_dict()
    old_in = state["unet.conv_in.conv.weight"]
    grown = torch.zeros_like(new.state_dict()["unet.conv_in.conv.weight"])
    grown[:, :old_in.shape[1]] = old_in
    state["unet.conv_in.conv.weight"] = grown
    state.update({f"context_encoder.{k}": v.detach().clone() for k, v in source.state_dict().items()})
    new.load_state_dict(state)
    new.train(cldm.training)
    return new
