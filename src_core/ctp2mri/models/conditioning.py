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

from ctp2mri.errors import InputError


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


# learned perfusion encoder --------------------------------------------------------------------
def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(round(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def perfusion_features(c: torch.Tensor, baseline_frames: int = 2, sigmas: tuple[float, ...] = (1.0, 2.5),
                       kernels: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Per-voxel perfusion features of normalised CTP slices, computed inside the network.

    For each slice of ``c`` (B, T, H, W), normalised as the data contract ([0, 200] HU →
    [−1, 1], 0 outside the brain): the brain (voxels whose curve is not all 0), the
    unenhanced baseline (mean of the first ``baseline_frames`` frames: tissue type), the
    enhancement curve above it divided by the peak of the slice's mean brain enhancement (a
    relative scale, as rCBF is relative to the healthy brain, so bolus size and scanner gain
    cancel), and that relative curve smoothed in-plane at each of ``sigmas`` voxels
    (normalised convolution inside the brain, so the brain's edge does not darken).

    Returns (B, T + T·len(sigmas) + 2, H, W): relative curve, smoothed curves, baseline, brain.
    """
    brain = (c != 0).any(dim=1, keepdim=True).to(c.dtype)
    baseline = c[:, :baseline_frames].mean(dim=1, keepdim=True) * brain
    enhancement = (c - baseline) * brain
    mean_curve = enhancement.sum(dim=(2, 3)) / brain.sum(dim=(2, 3)).clamp_min(1.0)
    # 0.02 normalised units = 2 HU: slices with hardly any brain must not blow the scale up.
    scale = mean_curve.amax(dim=1).clamp_min(0.02)[:, None, None, None]
    relative = (enhancement / scale).clamp(-10.0, 10.0)
    features = [relative]
    if kernels is None:
        kernels = [_gaussian_kernel(s).to(c.device, c.dtype) for s in sigmas]
    for k in kernels:
        features.append(_smooth_in_brain(relative, brain, k))
    return torch.cat(features + [baseline, brain], dim=1)


def _smooth_in_brain(x: torch.Tensor, brain: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian of ``x`` over brain voxels only: G∗(x·m) / G∗m, × m."""
    def blur(a: torch.Tensor) -> torch.Tensor:
        n = a.shape[1]
        r = kernel.numel() // 2
        kx = kernel.view(1, 1, -1, 1).expand(n, 1, -1, 1)
        ky = kernel.view(1, 1, 1, -1).expand(n, 1, 1, -1)
        a = F.conv2d(F.pad(a, (0, 0, r, r)), kx, groups=n)
        return F.conv2d(F.pad(a, (r, r, 0, 0)), ky, groups=n)

    return blur(x * brain) / blur(brain).clamp_min(1e-3) * brain


class PerfusionEncoder(nn.Module):
    """A learned condition encoder at the CTP's full resolution: c̃ = E_c(c) on the latent grid.

    Not in the paper (whose F is `SpatialRescaler`): the rescaler hands the UNet a linear
    average of noisy frames at ¼ resolution, from which the infarct core is hard to learn.
    This encoder first computes `perfusion_features` (relative enhancement curves at three
    smoothings, baseline HU, brain), runs a per-voxel MLP over time (1×1 convolutions, the
    voxel-classifier view of the curves), then strided 3×3 convolutions down to the latent
    grid.

    With ``latent_channels > 0`` it also has two 1×1 heads whose outputs are appended to c̃
    (so the UNet sees them): ẑ_0, the latent of the target predicted from the condition alone,
    and a lesion logit on the latent grid. `ctp2mri.losses.condition_loss` supervises both
    (the latent, its lesion voxels weighted up unless the condition lesion weight is 0; the
    lesion with a class-balanced BCE): the ε-objective alone teaches the encoder the lesion too
    slowly for a CPU budget (a probe of 600 steps: lesion AUC of the decoded ẑ_0 on DWI 0.20
    without, 0.96 with these terms).

    Parameters
    ----------
    in_channels
        CTP frames (15).
    out_channels
        Learned feature channels of c̃ (the heads add ``latent_channels + 1``).
    hidden_channels
        Width of the per-voxel MLP.
    down_channels
        Width of the strided convolutions (one per stage).
    n_stages
        ×½ stages (2 for a ×4 autoencoder).
    sigmas
        In-plane smoothings of the relative curves, in voxels.
    latent_channels
        Channels of the ẑ_0 head (the autoencoder's latent channels); 0: no heads.
    """

    def __init__(self, in_channels: int = 15, out_channels: int = 32, hidden_channels: int = 32,
                 down_channels: int = 64, n_stages: int = 2, sigmas: tuple[float, ...] = (1.0, 2.5),
                 latent_channels: int = 0) -> None:
        super().__init__()
        self.config = dict(in_channels=in_channels, out_channels=out_channels, hidden_channels=hidden_channels,
                           down_channels=down_channels, n_stages=n_stages, sigmas=list(sigmas),
                           latent_channels=latent_channels)
        self.in_channels = in_channels
        self.feature_channels = out_channels
        self.latent_channels = int(latent_channels)
        self.out_channels = out_channels + (self.latent_channels + 1 if self.latent_channels else 0)
        self.sigmas = tuple(float(s) for s in sigmas)
        for i, s in enumerate(self.sigmas):
            self.register_buffer(f"kernel_{i}", _gaussian_kernel(s), persistent=False)
        n_features = in_channels * (1 + len(self.sigmas)) + 2
        self.voxel_mlp = nn.Sequential(
            nn.Conv2d(n_features + in_channels, hidden_channels, 1), nn.SiLU(),
            nn.Conv2d(hidden_channels, hidden_channels, 1), nn.SiLU(),
        )
        stages: list[nn.Module] = []
        width = hidden_channels
        for _ in range(n_stages):
            stages += [nn.Conv2d(width, down_channels, 3, stride=2, padding=1), nn.SiLU()]
            width = down_channels
        stages += [nn.Conv2d(width, out_channels, 1)]
        self.down = nn.Sequential(*stages)
        self.condition_head = nn.Conv2d(out_channels, latent_channels, 1) if latent_channels else None
        self.lesion_head = nn.Conv2d(out_channels, 1, 1) if latent_channels else None

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        """c (B, in_channels, H, W) → c̃ (B, out_channels, H / 2^n, W / 2^n)."""
        kernels = [getattr(self, f"kernel_{i}") for i in range(len(self.sigmas))]
        features = perfusion_features(c, sigmas=self.sigmas, kernels=kernels)
        h = self.down(self.voxel_mlp(torch.cat([c, features], dim=1)))
        if self.condition_head is None:
            return h
        return torch.cat([h, self.condition_head(h), self.lesion_head(h)], dim=1)

    def lesion_probability(self, c: torch.Tensor) -> torch.Tensor:
        """The lesion head's probability for a CTP batch (B, in_channels, H, W), upsampled
        bilinearly from the latent grid to the slice grid: (B, 1, H, W), float32."""
        _, logit = self.heads(self(c))
        return torch.sigmoid(F.interpolate(logit.float(), size=c.shape[-2:], mode="bilinear", align_corners=False))

    def heads(self, c_tilde: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ẑ_0, lesion logit) read from a c̃ that this encoder made; needs ``latent_channels > 0``."""
        if self.condition_head is None:
            raise InputError("this perfusion encoder has no condition heads (latent_channels=0)")
        f, k = self.feature_channels, self.latent_channels
        return c_tilde[:, f:f + k], c_tilde[:, f + k:f + k + 1]


CONDITION_ENCODERS = ("rescaler", "perfusion")


def build_condition_encoder(kind: str, in_channels: int, rescaler_stages: int, rescaler_multiplier: float,
                            options: dict | None = None) -> nn.Module:
    """F of the paper (``"rescaler"``) or the learned `PerfusionEncoder` (``"perfusion"``)."""
    if kind == "rescaler":
        return SpatialRescaler(n_stages=rescaler_stages, method="bilinear", multiplier=rescaler_multiplier,
                               in_channels=in_channels, out_channels=in_channels, bias=False)
    if kind == "perfusion":
        return PerfusionEncoder(in_channels=in_channels, n_stages=rescaler_stages, **(options or {}))
    raise InputError(f"unknown condition encoder {kind!r}; choose one of {', '.join(CONDITION_ENCODERS)}")
