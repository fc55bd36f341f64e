"""Conditional latent diffusion network ε_θ(z_t, t, c̃) (paper §2.1, Eq. 3–4).

The denoiser is MONAI's `DiffusionModelUNet`, the same design as CompVis's
``openaimodel.UNetModel`` that the official code trains: sinusoidal time embedding →
MLP, ResNet blocks with GroupNorm/SiLU and the time embedding added in each, self-attention
at the chosen levels and in the middle block, ``num_res_blocks + 1`` blocks per decoder
level, zero-initialised output convolution. Its input is ``[z_t, F(c)]`` on channels
(3 + 15 = 18), F being the trainable `SpatialRescaler`. The network knows nothing of the
noise schedule (ctp2mri.diffusion does).

Official configuration (configs/latent-diffusion/ldm.yaml): ``model_channels: 224``,
``channel_mult: [1, 4, 8]``, ``num_res_blocks: 2``, ``num_head_channels: 32``,
``attention_resolutions: [8, 4, 2]`` — downsampling factors, of which only 2 and 4 exist
with three levels, i.e. attention at the two lowest resolutions. That is
``channels=(224, 896, 1792), attention_levels=(False, True, True)`` here, ≈ 739 M parameters.
"""

from __future__ import annotations

import json
from typing import Sequence

import torch
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from ctp2mri.errors import InputError
from ctp2mri.models.case_context import burden_value, lesion_burden
from ctp2mri.models.conditioning import CONDITION_ENCODERS, PerfusionEncoder, build_condition_encoder

PARAMETERIZATIONS = ("eps", "z0-residual")


class ConditionalLDM(nn.Module):
    """ε-prediction network of the conditional LDM: UNet on ``[z_t, F(c)]``.

    Parameters
    ----------
    latent_channels
        Channels of z (3).
    condition_channels
        CTP frames in c (15); F keeps the count (official ``out_channels: 15``).
    channels
        UNet channels per level (``model_channels × channel_mult``).
    attention_levels
        Self-attention at each level (the middle block always has one).
    num_res_blocks
        ResNet blocks per encoder level.
    num_head_channels
        Channels per attention head.
    norm_num_groups
        GroupNorm groups; every entry of ``channels`` must be a multiple.
    rescaler_stages, rescaler_multiplier
        F's bilinear stages and factor: ``multiplier ** stages`` must be 1 / the
        autoencoder's downsampling (½, ½ for ×4).
    use_flash_attention
        Use ``scaled_dot_product_attention`` (needed for the paper model's memory on GPU).
    scale_factor
        The diffusion runs on z = scale_factor · E(x) and decodes D(z / scale_factor)
        (CompVis ``LatentDiffusion.scale_factor``). 1.0 is the official VQ-f4 setting; a
        unit-variance latent (1 / std, ``train-ldm --scale-factor auto``) keeps the noise
        schedule's signal-to-noise ratios as designed when the autoencoder's latents are small.
    condition_encoder
        ``"rescaler"``: the paper's F (`SpatialRescaler`, weights under ``rescaler.``);
        ``"perfusion"``: the learned full-resolution `PerfusionEncoder` (under
        ``perfusion_encoder.``), whose output channels replace the 15 rescaled frames.
    condition_options
        Constructor arguments of the `PerfusionEncoder` (``out_channels``, ``hidden_channels``,
        ``down_channels``, ``sigmas``, ``latent_channels`` for the auxiliary z_0 head).
    parameterization
        ``"eps"``: the UNet predicts ε (the paper). ``"z0-residual"`` (predict and refine; needs
        the perfusion encoder's heads): the UNet predicts a correction u to the encoder's own
        estimate, ẑ_0 = ẑ_0(c̃) + u, and ε̂ = (z_t − √ᾱ_t ẑ_0) / √(1 − ᾱ_t) follows from the
        schedule's ᾱ_t, which the caller passes (`predict_noise`). The zero-initialised output
        convolution makes an untrained model sample the encoder's estimate, lesion included;
        training refines the detail the estimate lacks.
    case_context
        None (the paper; every model before it): slices only. ``{"threshold", "scale", "encoder"}``: the
        UNet also sees the case context (`ctp2mri.models.case_context`), the lesion burden of
        the whole case read by a frozen `PerfusionEncoder` (``encoder``: its constructor
        arguments, weights under ``context_encoder.``), as one more constant input channel.
        Added by post-training (`ctp2mri.models.case_context.add_case_context`).
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
        use_flash_attention: bool = False,
        scale_factor: float = 1.0,
        condition_encoder: str = "rescaler",
        condition_options: dict | None = None,
        parameterization: str = "eps",
        case_context: dict | None = None,
    ) -> None:
        super().__init__()
        self.config = json.loads(
            json.dumps(
                dict(
                    latent_channels=latent_channels,
                    condition_channels=condition_channels,
                    channels=list(channels),
                    attention_levels=list(attention_levels),
                    num_res_blocks=num_res_blocks,
                    num_head_channels=num_head_channels,
                    norm_num_groups=norm_num_groups,
                    rescaler_stages=rescaler_stages,
                    rescaler_multiplier=rescaler_multiplier,
                    use_flash_attention=use_flash_attention,
                    scale_factor=float(scale_factor),
                    **({} if condition_encoder == "rescaler" else
                       dict(condition_encoder=condition_encoder, condition_options=dict(condition_options or {}))),
                    **({} if parameterization == "eps" else dict(parameterization=parameterization)),
                    **({} if case_context is None else dict(case_context=dict(case_context))),
                )
            )
        )
        if not (float(scale_factor) > 0 and float(scale_factor) < float("inf")):
            raise InputError(f"the latent scale factor must be a positive number, got {scale_factor}")
        self.scale_factor = float(scale_factor)
        self.latent_channels = latent_channels
        self.condition_channels = condition_channels
        # The UNet halves the grid len(channels) - 1 times and concatenates skips, so the
        # latent size must divide by this.
        self.size_multiple = 2 ** (len(channels) - 1)
        if parameterization not in PARAMETERIZATIONS:
            raise InputError(f"unknown parameterization {parameterization!r}; choose one of {', '.join(PARAMETERIZATIONS)}")
        self.parameterization = parameterization
        if condition_encoder not in CONDITION_ENCODERS:
            raise InputError(f"unknown condition encoder {condition_encoder!r}; "
                             f"choose one of {', '.join(CONDITION_ENCODERS)}")
        self.condition_encoder = condition_encoder
        encoder = build_condition_encoder(condition_encoder, condition_channels, rescaler_stages,
                                          rescaler_multiplier, condition_options)
        # The attribute names keep the paper model's weight names (rescaler.*) unchanged.
        if condition_encoder == "rescaler":
            self.rescaler = encoder
        else:
            self.perfusion_encoder = encoder
        if parameterization != "eps" and not self.has_condition_head:
            raise InputError("the z0-residual parameterization refines the perfusion encoder's own estimate; it needs "
                             "the perfusion encoder with heads (condition_options latent_channels > 0)")
        self.case_context = None if case_context is None else dict(case_context)
        if self.case_context is not None:
            if condition_encoder != "perfusion" or not self.has_condition_head:
                raise InputError("the case context is read by the perfusion encoder's lesion head; it needs "
                                 "condition_encoder 'perfusion' with heads (condition_options latent_channels > 0)")
            # frozen: the context a model is trained with must be the one it is used with
            self.context_encoder = PerfusionEncoder(**self.case_context["encoder"]).requires_grad_(False)
        self.unet = DiffusionModelUNet(
            spatial_dims=2,
            in_channels=latent_channels + encoder.out_channels + (self.case_context is not None),
            out_channels=latent_channels,
            num_res_blocks=num_res_blocks,
            channels=list(channels),
            attention_levels=list(attention_levels),
            norm_num_groups=norm_num_groups,
            num_head_channels=num_head_channels,
            use_flash_attention=use_flash_attention,
        )

    def encode_condition(self, c: torch.Tensor, context: torch.Tensor | float | None = None) -> torch.Tensor:
        """c̃ = F(c) for a CTP batch (B, 15, H, W); compute once per DDIM run and reuse.

        A model with the case context (`takes_context`) needs ``context``, a number or one per
        row (`case_context`), appended to c̃ as a constant channel; others refuse one.
        """
        if c.ndim != 4 or c.shape[1] != self.condition_channels:
            raise InputError(
                "the CTP condition must be shaped "
                f"(batch, {self.condition_channels} frames, H, W); got {tuple(c.shape)}. "
                f"Resample the perfusion series to {self.condition_channels} time points "
                "(ctp2mri preprocess)."
            )
        c_tilde = self.encoder(c)
        if self.case_context is None:
            if context is not None:
                raise InputError("this cLDM does not take a case context (it was not post-trained with one)")
            return c_tilde
        if context is None:
            raise InputError("this cLDM takes the case context: pass the lesion burden of the whole case "
                             "(ConditionalLDM.case_context_of on all of the case's slices)")
        value = torch.as_tensor(context, dtype=c_tilde.dtype, device=c_tilde.device).reshape(-1)
        if value.numel() == 1:
            value = value.expand(c_tilde.shape[0])
        if value.numel() != c_tilde.shape[0] or not bool(torch.isfinite(value).all()):
            raise InputError(f"the case context must be one finite number, or one per row ({c_tilde.shape[0]}); "
                             f"got {value.numel()} value(s)")
        # a context model saved without a scale (REPORT.md §D12's first probe) reads it at 1
        value = value * float(self.case_context.get("scale", 1.0))
        plane = value.reshape(-1, 1, 1, 1).expand(-1, 1, *c_tilde.shape[-2:])
        return torch.cat([c_tilde, plane], dim=1)

    @property
    def takes_context(self) -> bool:
        """Whether the network needs the case context (`ctp2mri.models.case_context`)."""
        return self.case_context is not None

    def case_context_of(self, cond: torch.Tensor, batch_size: int = 16) -> float:
        """The case context for all of one case's normalised CTP slices (n, 15, H, W):
        ``burden_value`` of the context encoder's `lesion_burden` (needs `takes_context`)."""
        if self.case_context is None:
            raise InputError("this cLDM does not take a case context")
        fraction = lesion_burden(self.context_encoder, cond, float(self.case_context["threshold"]), batch_size)
        return float(burden_value(fraction))

    @property
    def encoder(self) -> nn.Module:
        """The condition encoder: F (`SpatialRescaler`) or the `PerfusionEncoder`."""
        return self.rescaler if self.condition_encoder == "rescaler" else self.perfusion_encoder

    @property
    def has_condition_head(self) -> bool:
        """Whether the condition encoder predicts z_0 and the lesion (the auxiliary condition loss)."""
        return isinstance(self.encoder, PerfusionEncoder) and self.encoder.condition_head is not None

    def predict_noise(
        self, z_t: torch.Tensor, t: torch.Tensor, c_tilde: torch.Tensor,
        alphas_cumprod_t: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ε̂ = ε_θ(z_t, t, c̃) with an already rescaled condition.

        ``alphas_cumprod_t`` (ᾱ_t per row, from the noise schedule) is needed by the
        ``z0-residual`` parameterization to turn its ẑ_0 into ε̂; ``eps`` ignores it.
        """
        if z_t.ndim != 4 or z_t.shape[1] != self.latent_channels:
            raise InputError(
                f"z_t must be shaped (batch, {self.latent_channels}, h, w); got {tuple(z_t.shape)}"
            )
        if c_tilde.shape[0] != z_t.shape[0] or c_tilde.shape[-2:] != z_t.shape[-2:]:
            raise InputError(
                f"the rescaled CTP condition {tuple(c_tilde.shape)} does not match the latent "
                f"{tuple(z_t.shape)}: CTP and DWI/ADC slices must come from the same grid, the "
                "model's profile."
            )
        h, w = z_t.shape[-2:]
        if h % self.size_multiple or w % self.size_multiple:
            raise InputError(
                f"latent size {h}×{w} is not divisible by {self.size_multiple}, which this UNet "
                "needs; use the slice size of the model's profile."
            )
        t = torch.as_tensor(t, device=z_t.device)
        if t.ndim == 0:
            t = t.expand(z_t.shape[0])
        out = self.unet(torch.cat([z_t, c_tilde.to(z_t.dtype)], dim=1), t)
        if self.parameterization == "eps":
            return out
        if alphas_cumprod_t is None:
            raise InputError("this cLDM predicts ẑ0 as a correction of its condition's estimate; pass the schedule's "
                             "ᾱ_t (alphas_cumprod_t) to turn it into ε̂")
        a = torch.as_tensor(alphas_cumprod_t, device=z_t.device, dtype=out.dtype).reshape(-1, 1, 1, 1)
        z0_hat = self.encoder.heads(c_tilde)[0].to(out.dtype) + out
        return (z_t - a.sqrt() * z0_hat) / (1.0 - a).sqrt()

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, c: torch.Tensor, with_condition_latent: bool = False,
                alphas_cumprod_t: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """ε̂ for noisy latents z_t (B, 3, h, w), steps t (B,), raw CTP slices c (B, 15, 4h, 4w)
        and, for a model with the case context, each row's ``context`` (B,).

        With ``with_condition_latent``, also the condition heads' ẑ_0 and lesion logit (what the
        auxiliary condition loss scores; one forward, so DDP sees every parameter used).
        """
        c_tilde = self.encode_condition(c, context)
        eps_hat = self.predict_noise(z_t, t, c_tilde, alphas_cumprod_t)
        if not with_condition_latent:
            return eps_hat
        return (eps_hat, *self.encoder.heads(c_tilde))
