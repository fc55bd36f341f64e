"""Exponential moving average of a network's weights (CompVis ``LitEma``).

The average is kept in a second instance of the same network class, so a checkpoint
stores it as an ordinary network (``ema``) that synthesis loads like any other.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ctp2mri.settings import EMA_DECAY

__all__ = ["EMA"]


class EMA:
    """θ_ema ← d θ_ema + (1 − d) θ after every optimiser step.

    Parameters
    ----------
    model
        The trained network (unwrapped); its current weights start the average.
    decay
        d (0.9999 in CompVis LDM).
    warmup
        As ``LitEma(use_num_updates=True)``: d_n = min(decay, (1 + n) / (10 + n)) for the n-th
        update, so early, random weights are forgotten quickly.
    """

    def __init__(self, model: nn.Module, decay: float = EMA_DECAY, warmup: bool = True) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s weights (call after each optimiser step)."""
        self.num_updates += 1
        d = self.current_decay()
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - d)  # θ_ema + (1 − d)(θ − θ_ema)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)  # buffers (e.g. norm statistics) are copied, not averaged, as LitEma

    def state(self) -> dict:
        """What a resume needs besides the weights (which are saved as the ``ema`` network)."""
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates}

    def load(self, weights: dict[str, torch.Tensor], state: dict) -> None:
        self.module.load_state_dict(weights)
        self.num_updates = int(state["num_updates"])
