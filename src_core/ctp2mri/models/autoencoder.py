"""VQGAN first stage (paper §2.1): encoder E, codebook, decoder D, and its PatchGAN critic.

The architecture is the CompVis/taming one the official code trains
(``ldm.modules.diffusionmodules.model.Encoder/Decoder`` + ``VectorQuantizer2``): ResNet
blocks with GroupNorm and SiLU, strided-conv downsampling, nearest-neighbour upsampling,
one attention block in the middle, ``num_res_blocks + 1`` blocks per decoder level, and 1×1
``quant_conv`` / ``post_quant_conv`` around the codebook. MONAI's AutoencoderKL encoder and
decoder are that design block for block, so they are reused here; the one thing they leave
out is the SiLU between the last GroupNorm and the output convolution, which is put back so
that the function (not only the parameter list) is CompVis's.

MONAI's ``VQVAE`` was not used: it has no normalisation, no attention and ReLU residual
units, and its EMA codebook is not the gradient-trained codebook whose loss the official
configuration weighs (``codebook_weight: 1.0``).

Latent contract (as CompVis ``VQModelInterface``): `encode` returns the *unquantised*
output of ``quant_conv``; the latent diffusion model is trained on it, and `decode`
quantises by default before decoding (``decode(z, force_not_quantize=False)`` upstream).
Quantisation uses the straight-through estimator, so gradients reach ``z`` through
`decode` (needed by the post-training image losses, Eq. 6–7).
"""

from __future__ import annotations

import json
from typing import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import PatchDiscriminator
from monai.networks.nets.autoencoderkl import Decoder, Encoder
from torch import nn

from ctp2mri.errors import InputError

# Nearest-code search is done in chunks so that a paper-sized batch (48 slices of 48×56
# latents against 8192 codes) never materialises a multi-GB distance matrix.
_SEARCH_CHUNK = 8192


def _as_json(config: dict) -> dict:
    """The constructor arguments exactly as config.json will hold them (tuples → lists)."""
    return json.loads(json.dumps(config))


def _restore_output_activation(blocks: nn.ModuleList) -> None:
    """Insert CompVis's ``nonlinearity`` between the final GroupNorm and ``conv_out``."""
    if not isinstance(blocks[-2], nn.GroupNorm):  # guard against a MONAI layout change
        raise RuntimeError("unexpected MONAI Encoder/Decoder layout: no GroupNorm before conv_out")
    blocks.insert(len(blocks) - 1, nn.SiLU())


class VectorQuantizer(nn.Module):
    """Learned codebook with the straight-through estimator (taming ``VectorQuantizer2``).

    Parameters
    ----------
    num_embeddings
        Codebook size (8192 in the official configuration).
    embedding_dim
        Length of each code = latent channels (3).
    beta
        Weight of the second loss term (0.25 upstream).
    legacy_loss
        ``True`` reproduces the official code's default (``legacy=True``),
        ``‖sg(z_q) − z‖² + β‖z_q − sg(z)‖²``: β weighs the codebook update. ``False`` is
        the VQ-VAE paper's ``‖z_q − sg(z)‖² + β‖sg(z_q) − z‖²``: β weighs commitment.
    """

    def __init__(
        self, num_embeddings: int, embedding_dim: int, beta: float = 0.25, legacy_loss: bool = True
    ) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.beta = beta
        self.legacy_loss = legacy_loss
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)
        # taming's initialisation: codes start in a tiny cube around 0 and are pulled out
        # by the codebook loss towards the encoder outputs they win.
        nn.init.uniform_(self.embedding.weight, -1.0 / num_embeddings, 1.0 / num_embeddings)

    @torch.no_grad()
    def nearest(self, z_flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code (Euclidean) for each row of ``z_flat`` (N, C)."""
        codes = self.embedding.weight.float()
        code_norm = (codes * codes).sum(1)
        # ‖z‖² is the same for every code, so argmin(‖e‖² − 2 z·e) is the nearest code.
        # float32 even under autocast: bf16 ties would pick wrong codes.
        chunks = z_flat.split(_SEARCH_CHUNK)
        return torch.cat([(code_norm - 2.0 * ch.float() @ codes.T).argmin(1) for ch in chunks])

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes for an index map (B, H, W) as a latent (B, C, H, W)."""
        return self.embedding(indices).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantise z (B, C, H, W) → (z_q, straight-through gradient; loss; indices (B, H, W))."""
        b, c, h, w = z.shape
        indices = self.nearest(z.permute(0, 2, 3, 1).reshape(-1, c)).view(b, h, w)
        z_q = self.embed(indices)
        to_codes = F.mse_loss(z_q, z.detach().to(z_q.dtype))  # moves the codebook
        to_encoder = F.mse_loss(z.to(z_q.dtype), z_q.detach())  # commits the encoder
        if self.legacy_loss:
            loss = to_encoder + self.beta * to_codes
        else:
            loss = to_codes + self.beta * to_encoder
        z_q = z + (z_q - z).detach()  # forward: codes; backward: identity to z
        return z_q, loss, indices

    @torch.no_grad()
    def restart_dead_codes(self, usage: torch.Tensor, z_flat: torch.Tensor, noise: float = 0.01) -> torch.Tensor:
        """Move every code with ``usage == 0`` onto a random encoder output of ``z_flat`` (N, C).

        A short training run with taming's tiny uniform initialisation collapses onto a
        handful of codes (seen here: 4 of 512 in use after 230 demo steps, 15 dB
        reconstructions) and never recovers. Restarting dead codes on current encoder
        outputs (Dhariwal et al. 2020, Jukebox; Zeghidour et al. 2021, SoundStream) revives
        them; at the first call every unused code is placed this way, which is the usual
        data-dependent initialisation. A little noise keeps two restarts of the same vector
        apart. Uses the global torch RNG (saved and restored with the run).

        Returns the indices of the restarted codes.
        """
        dead = torch.nonzero(usage.to(self.embedding.weight.device) == 0).flatten()
        if dead.numel() == 0 or z_flat.shape[0] == 0:
            return dead
        picks = torch.randint(0, z_flat.shape[0], (dead.numel(),), device="cpu").to(z_flat.device)
        chosen = z_flat[picks].float()
        chosen = chosen + noise * chosen.std() * torch.randn(chosen.shape, device="cpu").to(chosen.device)
        self.embedding.weight[dead] = chosen.to(self.embedding.weight.dtype)
        return dead


class VQAutoencoder(nn.Module):
    """VQGAN autoencoder for 2-channel (DWI, ADC) axial slices.

    The whole configuration is in the constructor and recorded in ``self.config`` (what a
    checkpoint's config.json stores). Downsampling is ``2 ** (len(channels) - 1)`` per axis.

    Parameters
    ----------
    in_channels, out_channels
        Image channels (2: DWI, ADC).
    channels
        Feature channels per level, ``ch × ch_mult`` upstream (paper: 128 × [1, 2, 4]).
    num_res_blocks
        ResNet blocks per encoder level; the decoder has one more per level, as upstream.
    embedding_dim
        Latent channels and code length (``z_channels`` = ``embed_dim`` = 3 upstream).
    num_embeddings
        Codebook size.
    beta, legacy_loss
        Codebook loss settings, see `VectorQuantizer`.
    attention_levels
        Self-attention after the ResNet blocks of each level. The official
        ``attn_resolutions: [16]`` never matches a 192×224 (or 224) input's levels
        (224, 112, 56), so the paper model has none; default: none.
    mid_attention
        The attention block between two ResNet blocks at the lowest level (always there upstream).
    norm_num_groups, norm_eps
        GroupNorm settings (32 and 1e-6 upstream); every entry of ``channels`` must be a
        multiple of ``norm_num_groups``.
    use_flash_attention
        Use ``torch.nn.functional.scaled_dot_product_attention`` (same result, less memory).
    """

    def __init__(
        self,
        in_channels: int = 2,
        out_channels: int = 2,
        channels: Sequence[int] = (128, 256, 512),
        num_res_blocks: int = 2,
        embedding_dim: int = 3,
        num_embeddings: int = 8192,
        beta: float = 0.25,
        legacy_loss: bool = True,
        attention_levels: Sequence[bool] | None = None,
        mid_attention: bool = True,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        use_flash_attention: bool = False,
    ) -> None:
        super().__init__()
        channels = list(channels)
        if attention_levels is None:
            attention_levels = [False] * len(channels)
        attention_levels = list(attention_levels)
        if len(attention_levels) != len(channels):
            raise ValueError("attention_levels needs one entry per entry of channels")
        if any(ch % norm_num_groups for ch in channels):
            raise ValueError(f"channels {channels} must all be multiples of {norm_num_groups}")
        self.config = _as_json(
            dict(
                in_channels=in_channels,
                out_channels=out_channels,
                channels=channels,
                num_res_blocks=num_res_blocks,
                embedding_dim=embedding_dim,
                num_embeddings=num_embeddings,
                beta=beta,
                legacy_loss=legacy_loss,
                attention_levels=attention_levels,
                mid_attention=mid_attention,
                norm_num_groups=norm_num_groups,
                norm_eps=norm_eps,
                use_flash_attention=use_flash_attention,
            )
        )
        self.in_channels = in_channels
        self.embedding_dim = embedding_dim
        self.downsampling = 2 ** (len(channels) - 1)
        common = dict(
            spatial_dims=2,
            channels=channels,
            norm_num_groups=norm_num_groups,
            norm_eps=norm_eps,
            attention_levels=attention_levels,
            with_nonlocal_attn=mid_attention,
            use_flash_attention=use_flash_attention,
        )
        self.encoder = Encoder(
            in_channels=in_channels,
            out_channels=embedding_dim,
            num_res_blocks=[num_res_blocks] * len(channels),
            **common,
        )
        self.decoder = Decoder(
            in_channels=embedding_dim,
            out_channels=out_channels,
            num_res_blocks=[num_res_blocks + 1] * len(channels),
            **common,
        )
        _restore_output_activation(self.encoder.blocks)
        _restore_output_activation(self.decoder.blocks)
        self.quant_conv = nn.Conv2d(embedding_dim, embedding_dim, 1)
        self.post_quant_conv = nn.Conv2d(embedding_dim, embedding_dim, 1)
        self.quantizer = VectorQuantizer(num_embeddings, embedding_dim, beta, legacy_loss)

    @property
    def last_layer(self) -> torch.Tensor:
        """Decoder output-conv weight (VQGAN's adaptive GAN weight uses its gradients)."""
        return self.decoder.blocks[-1].conv.weight

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the latent of a ``height × width`` slice."""
        return (self.embedding_dim, height // self.downsampling, width // self.downsampling)

    def _check_image(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise InputError(
                f"the autoencoder takes slices shaped (batch, {self.in_channels}, H, W) "
                f"(DWI, ADC); got {tuple(x.shape)}. Stack DWI and ADC as channels."
            )
        h, w = x.shape[-2:]
        if h % self.downsampling or w % self.downsampling:
            raise InputError(
                f"slice size {h}×{w} is not divisible by {self.downsampling}; resample the case "
                "to the model profile's grid (ctp2mri preprocess) first."
            )

    def _check_latent(self, z: torch.Tensor) -> None:
        if z.ndim != 4 or z.shape[1] != self.embedding_dim:
            raise InputError(
                f"latents must be shaped (batch, {self.embedding_dim}, h, w); got {tuple(z.shape)}"
            )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Unquantised latent z = quant_conv(E(x)), (B, 3, H/4, W/4) — what the LDM models."""
        self._check_image(x)
        return self.quant_conv(self.encoder(x))

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z_q, codebook loss, code indices (B, h, w)); z_q carries straight-through gradients."""
        self._check_latent(z)
        return self.quantizer(z)

    def decode(self, z: torch.Tensor, quantize: bool = True) -> torch.Tensor:
        """Image from a latent; quantises first unless ``quantize=False`` (force_not_quantize)."""
        self._check_latent(z)
        if quantize:
            z = self.quantizer(z)[0]
        return self.decoder(self.post_quant_conv(z))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Image from a code-index map (B, h, w)."""
        return self.decoder(self.post_quant_conv(self.quantizer.embed(indices)))

    def forward(self, x: torch.Tensor, return_codes: bool = False) -> tuple[torch.Tensor, ...]:
        """Reconstruction D(q(E(x))) and the codebook loss (autoencoder training step).

        With ``return_codes`` also the detached latent z (B, C, h, w) and the code indices
        (B, h, w), which training uses to track codebook usage.
        """
        z = self.encode(x)
        z_q, codebook_loss, indices = self.quantize(z)
        reconstruction = self.decoder(self.post_quant_conv(z_q))
        if return_codes:
            return reconstruction, codebook_loss, z.detach(), indices
        return reconstruction, codebook_loss


class PatchGANDiscriminator(PatchDiscriminator):
    """The VQGAN's PatchGAN critic (taming ``NLayerDiscriminator``) on MONAI's `PatchDiscriminator`.

    ``num_layers = 3`` gives taming's layout: a stride-2 conv with LeakyReLU(0.2), two
    stride-2 conv + BatchNorm blocks, one stride-1 block, a 1-channel 4×4 output conv, all
    initialised N(0, 0.02) (BatchNorm weights N(1, 0.02)). `forward` returns the patch logits
    only (MONAI's returns every intermediate feature map as well).
    """

    def __init__(self, in_channels: int = 2, channels: int = 64, num_layers: int = 3) -> None:
        super().__init__(
            spatial_dims=2,
            channels=channels,
            in_channels=in_channels,
            out_channels=1,
            num_layers_d=num_layers,
            kernel_size=4,
            activation=("LEAKYRELU", {"negative_slope": 0.2}),
            norm="BATCH",
            bias=False,
            padding=1,
        )
        self.config = _as_json(
            dict(in_channels=in_channels, channels=channels, num_layers=num_layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Patch logits (B, 1, h, w): >0 real, <0 fake under the hinge loss."""
        return super().forward(x)[-1]
