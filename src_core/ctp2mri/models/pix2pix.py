"""Pix2Pix baseline generator G(c): 15 CTP frames → (DWI, ADC) in one pass (Isola et al., CVPR 2017).

A U-Net, as Pix2Pix's generator: stride-2 convolutions down, transposed convolutions up,
skip connections by concatenation, LeakyReLU(0.2), and tanh on the output so that it lives
in the contract's [−1, 1]. The U-Net is MONAI's `UNet`; its normalisation defaults to
instance norm (Pix2Pix's batch norm at its batch size of 1 is the same thing) so that
a slice's output does not depend on the batch it is computed in. Pix2Pix's dropout (its
only noise source) is off by default: the baseline is then deterministic, as evaluated.

The discriminator is the conditional PatchGAN on ``[c, x]`` (15 + 2 channels), the
existing `PatchGANDiscriminator` (``num_layers = 3`` is Pix2Pix's 70×70 PatchGAN).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch
from monai.networks.nets import UNet
from torch import nn

from ctp2mri.errors import InputError

__all__ = ["Pix2PixGenerator"]


class Pix2PixGenerator(nn.Module):
    """U-Net generator x̂ = tanh(UNet(c)).

    Parameters
    ----------
    in_channels
        CTP frames (15).
    out_channels
        Output images (DWI, ADC: 2).
    channels
        Feature channels per level; ``len(channels) − 1`` stride-2 downsamplings, so the
        slice size must divide by ``2 ** (len(channels) − 1)``.
    num_res_units
        Residual units per MONAI block (0: Pix2Pix's plain conv blocks).
    norm
        MONAI norm name (``"instance"`` or ``"batch"``).
    dropout
        Dropout probability in every block (0 by default).
    """

    def __init__(
        self,
        in_channels: int = 15,
        out_channels: int = 2,
        channels: Sequence[int] = (64, 128, 256, 512, 512, 512),
        num_res_units: int = 0,
        norm: str = "instance",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(channels) < 2:
            raise InputError(f"the Pix2Pix U-Net needs at least two levels of channels, got {list(channels)}")
        self.config = json.loads(json.dumps({
            "in_channels": in_channels, "out_channels": out_channels, "channels": list(channels),
            "num_res_units": num_res_units, "norm": norm, "dropout": dropout,
        }))
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.size_multiple = 2 ** (len(channels) - 1)
        self.unet = UNet(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=list(channels),
            strides=[2] * (len(channels) - 1),
            kernel_size=3,
            up_kernel_size=3,
            num_res_units=num_res_units,
            act=("LEAKYRELU", {"negative_slope": 0.2}),
            norm=norm,
            dropout=dropout,
        )

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        """x̂ (B, 2, H, W) in [−1, 1] from CTP slices c (B, 15, H, W)."""
        if c.ndim != 4 or c.shape[1] != self.in_channels:
            raise InputError(
                f"the CTP condition must be shaped (batch, {self.in_channels} frames, H, W); got {tuple(c.shape)}. "
                f"Resample the perfusion series to {self.in_channels} time points (ctp2mri preprocess)."
            )
        h, w = c.shape[-2:]
        if h % self.size_multiple or w % self.size_multiple:
            raise InputError(f"slice size {h}×{w} is not divisible by {self.size_multiple}, which this U-Net needs; "
                             "use the slice size of the model's profile.")
        return torch.tanh(self.unet(c))
