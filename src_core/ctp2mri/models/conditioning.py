"""Spatial rescaler F (paper §2.1): brings the 15-frame CTP slice c to the latent grid.

As CompVis ``ldm.modules.encoders.modules.SpatialRescaler`` with the official
``n_stages: 2, in_channels: 15, out_channels: 15``: ``n_stages`` bilinear resizes by
``multiplier`` (½ each, so ×¼ per axis, the autoencoder's downsampling), then a trainable
bias-free 1×1 convolution mixing the time frames. c̃ = F(c) is concatenated to z_t.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import nn


class SpatialRescaler(nn.Module):
    """c̃ = conv1×1(resize(…resize(c)…)), ``n_stages`` resizes by ``multiplier``.

    Parameters
    ----------
    n_stages
        Number of resizes (2 for a ×4 autoencoder).
    method
        ``F.interpolate`` mode; bilinear with ``align_corners=False`` at factor ½ averages each
        2×2 block exactly.
    multiplier
        Scale factor per stage (CompVis's ``multiplier``).
    in_channels
        CTP frames (15).
    out_channels
        Channels after the 1×1 conv; ``None`` skips the conv (CompVis ``remap_output=False``).
    bias
        Bias of the 1×1 conv (``False`` upstream).
    """

    def __init__(
        self,
        n_stages: int = 2,
        method: str = "bilinear",
        multiplier: float = 0.5,
        in_channels: int = 15,
        out_channels: int | None = 15,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if n_stages < 0:
            raise ValueError("n_stages must be >= 0")
        self.config = json.loads(
            json.dumps(
                dict(
                    n_stages=n_stages,
                    method=method,
                    multiplier=multiplier,
                    in_channels=in_channels,
                    out_channels=out_channels,
                    bias=bias,
                )
            )
        )
        self.n_stages = n_stages
        self.method = method
        self.multiplier = multiplier
        self.in_channels = in_channels
        self.out_channels = in_channels if out_channels is None else out_channels
        self.channel_mapper = (
            None if out_channels is None else nn.Conv2d(in_channels, out_channels, 1, bias=bias)
        )

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        """c (B, in_channels, H, W) → c̃ (B, out_channels, H·m^n, W·m^n)."""
        for _ in range(self.n_stages):
            c = F.interpolate(c, scale_factor=self.multiplier, mode=self.method)
        if self.channel_mapper is not None:
            c = self.channel_mapper(c)
        return c
