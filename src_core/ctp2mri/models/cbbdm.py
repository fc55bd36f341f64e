"""Brownian-bridge latent diffusion network ô_θ(x_t, t, y): BBDM and conditional BBDM.

BBDM (Li et al., CVPR 2023) bridges the target's latent x_0 and a latent of the source
image y; its UNet sees x_t alone. The conditional variant cBBDM (Kim & Chung 2024) also
feeds the condition to the UNet by concatenation at every step. Here the source is the
15-frame CTP, which the MRI autoencoder cannot encode, so its latent is the trainable
spatial rescaler F (`SpatialRescaler`: bilinear ×¼ per axis, then a 1×1 conv mapping the 15
frames to the latent's 3 channels): y = F(c), the bridge's endpoint x_T, and — for cBBDM —
the UNet input is ``[x_t, y]`` (3 + 3 channels). F is trained with the UNet, as BBDM trains
its ``SpatialRescaler`` condition stage.

The denoiser is MONAI's `DiffusionModelUNet`, as for the cLDM (`ctp2mri.models.cldm`); it
predicts BBDM's "grad" objective x_t − x_0 (`ctp2mri.diffusion.bridge`) and knows nothing of
the bridge's schedule.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from ctp2mri.errors import InputError
from ctp2mri.models.conditioning import SpatialRescaler

__all__ = ["BrownianBridgeLDM"]


class BrownianBridgeLDM(nn.Module):
    """Objective network of the latent Brownian bridge, with the CTP's latent y = F(c).

    Parameters
    ----------
    latent_channels
        Channels of the autoencoder's latent (3); F maps the CTP to as many.
    condition_channels
        CTP frames in c (15).
    channels, attention_levels, num_res_blocks, num_head_channels, norm_num_groups
        UNet layout, as `ConditionalLDM`.
    rescaler_stages, rescaler_multiplier
        F's bilinear stages and factor (``multiplier ** stages`` = 1 / the autoencoder's
        downsampling).
    concat_condition
        True: cBBDM, the UNet sees ``[x_t, y]``; False: plain BBDM, the UNet sees x_t only.
    use_flash_attention
        Use ``scaled_dot_product_attention`` in the UNet's attention.
    """

    def __init__(
        self,
        latent_channels: int = 3,
        condition_channels: int = 15,
        channels: Sequence[int] = (224, 896, 1792),
        attention_levels: Sequence[bool] = (False, True, True),
        num_res_blocks: int = 2,
        num_head_channels: int = 32,
        norm_num_groups: int = 32,
        rescaler_stages: int = 2,
        rescaler_multiplier: float = 0.5,
        concat_condition: bool = True,
        use_flash_attention: bool = False,
    ) -> None:
        super().__init__()
        self.config = json.loads(json.dumps({
            "latent_channels": latent_channels, "condition_channels": condition_channels, "channels": list(channels),
            "attention_levels": list(attention_levels), "num_res_blocks": num_res_blocks,
            "num_head_channels": num_head_channels, "norm_num_groups": norm_num_groups,
            "rescaler_stages": rescaler_stages, "rescaler_multiplier": rescaler_multiplier,
            "concat_condition": concat_condition, "use_flash_attention": use_flash_attention,
        }))
        self.latent_channels = latent_channels
        self.condition_channels = condition_channels
        self.concat_condition = bool(concat_condition)
        self.size_multiple = 2 ** (len(channels) - 1)
        self.rescaler = SpatialRescaler(n_stages=rescaler_stages, method="bilinear", multiplier=rescaler_multiplier,
                                        in_channels=condition_channels, out_channels=latent_channels, bias=False)
        self.unet = DiffusionModelUNet(
            spatial_dims=2,
            in_channels=latent_channels * (2 if self.concat_condition else 1),
            out_channels=latent_channels,
            num_res_blocks=num_res_blocks,
            channels=list(channels),
            attention_levels=list(attention_levels),
            norm_num_groups=norm_num_groups,
            num_head_channels=num_head_channels,
            use_flash_attention=use_flash_attention,
        )

    def encode_condition(self, c: torch.Tensor) -> torch.Tensor:
        """y = F(c): the CTP batch (B, 15, H, W) on the latent grid, (B, 3, H/4, W/4).

        The bridge's endpoint x_T; compute once per sampling run and reuse at every step.
        """
        if c.ndim != 4 or c.shape[1] != self.condition_channels:
            raise InputError(
                f"the CTP condition must be shaped (batch, {self.condition_channels} frames, H, W); got "
                f"{tuple(c.shape)}. Resample the perfusion series to {self.condition_channels} time points "
                "(ctp2mri preprocess)."
            )
        return self.rescaler(c)

    def predict_objective(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """ô = ô_θ(x_t, t, y), the estimate of x_t − x_0, for states x_t (B, 3, h, w) and steps t (B,)."""
        if x_t.ndim != 4 or x_t.shape[1] != self.latent_channels:
            raise InputError(f"x_t must be shaped (batch, {self.latent_channels}, h, w); got {tuple(x_t.shape)}")
        if y.shape != x_t.shape:
            raise InputError(f"the CTP's latent {tuple(y.shape)} does not match the state {tuple(x_t.shape)}: "
                             "CTP and DWI/ADC slices must come from the same grid, the model's profile.")
        h, w = x_t.shape[-2:]
        if h % self.size_multiple or w % self.size_multiple:
            raise InputError(f"latent size {h}×{w} is not divisible by {self.size_multiple}, which this UNet needs; "
                             "use the slice size of the model's profile.")
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        inputs = torch.cat([x_t, y.to(x_t.dtype)], dim=1) if self.concat_condition else x_t
        return self.unet(inputs, t)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """ô for states x_t, steps t and the endpoint y = `encode_condition` (c).

        The network takes y already encoded: the trainer needs the same y for x_t and the
        objective, and its gradient reaches F through all three.
        """
        return self.predict_objective(x_t, t, y)
