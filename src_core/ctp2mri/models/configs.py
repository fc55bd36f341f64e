"""Network configurations per profile, as plain dicts of constructor arguments.

``model_config(profile, kind)`` is exactly what the network's constructor takes and what a
checkpoint's config.json stores for it, so ``build_network(kind, model_config(...))``
rebuilds the same architecture anywhere.

``paper`` is the official configuration (configs/autoencoder/VQGAN.yaml and
configs/latent-diffusion/ldm.yaml of the paper's code). ``demo`` keeps the structure
(×4 autoencoder, 3 latent channels, mid attention, 18-channel UNet with attention at
low resolution) with widths a 2-core CPU can train.

The baselines: ``cbbdm`` (latent Brownian bridge, `BrownianBridgeLDM`) uses the cLDM's UNet
of the same profile, so the two latent models differ in the process only; ``pix2pix`` is
the image-space U-Net generator (Pix2Pix's unet with as many downsamplings as the slice
size allows: 5 for 192×224, 4 for 96×112) and ``pix2pix_discriminator`` its conditional
70×70 PatchGAN on [CTP, DWI/ADC] (a `PatchGANDiscriminator`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ctp2mri.errors import InputError
from ctp2mri.models.autoencoder import PatchGANDiscriminator, VQAutoencoder
from ctp2mri.models.cbbdm import BrownianBridgeLDM
from ctp2mri.models.cldm import ConditionalLDM
from ctp2mri.models.pix2pix import Pix2PixGenerator
from ctp2mri.profiles import get_profile

# Network type name (as written in config.json) → class.
NETWORK_TYPES: dict[str, type[nn.Module]] = {
    "autoencoder": VQAutoencoder,
    "discriminator": PatchGANDiscriminator,
    "cldm": ConditionalLDM,
    "cbbdm": BrownianBridgeLDM,
    "pix2pix": Pix2PixGenerator,
}
# Configured networks whose class is another kind's (config name → NETWORK_TYPES name).
_ALIASES = {"pix2pix_discriminator": "discriminator"}

_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {
        "autoencoder": dict(
            in_channels=2,
            out_channels=2,
            channels=[128, 256, 512],  # ch 128, ch_mult [1, 2, 4]
            num_res_blocks=2,
            embedding_dim=3,
            num_embeddings=8192,
            beta=0.25,
            legacy_loss=True,
            attention_levels=[False, False, False],  # attn_resolutions [16] never reached
            mid_attention=True,
            norm_num_groups=32,
            norm_eps=1e-6,
            use_flash_attention=True,
        ),
        "discriminator": dict(in_channels=2, channels=64, num_layers=3),
        "cldm": dict(
            latent_channels=3,
            condition_channels=15,
            channels=[224, 896, 1792],  # model_channels 224, channel_mult [1, 4, 8]
            attention_levels=[False, True, True],  # attention_resolutions 2 and 4 (of 8, 4, 2)
            num_res_blocks=2,
            num_head_channels=32,
            norm_num_groups=32,
            rescaler_stages=2,
            rescaler_multiplier=0.5,
            use_flash_attention=True,
            scale_factor=1.0,  # the official VQ-f4 setting; train-ldm --scale-factor auto: 1 / latent std
        ),
        "cbbdm": dict(
            latent_channels=3,
            condition_channels=15,
            channels=[224, 896, 1792],
            attention_levels=[False, True, True],
            num_res_blocks=2,
            num_head_channels=32,
            norm_num_groups=32,
            rescaler_stages=2,
            rescaler_multiplier=0.5,
            concat_condition=True,
            use_flash_attention=True,
        ),
        "pix2pix": dict(in_channels=15, out_channels=2, channels=[64, 128, 256, 512, 512, 512], num_res_units=0,
                        norm="instance", dropout=0.0),
        "pix2pix_discriminator": dict(in_channels=17, channels=64, num_layers=3),
    },
    "demo": {
        "autoencoder": dict(
            in_channels=2,
            out_channels=2,
            channels=[16, 32, 64],
            num_res_blocks=1,
            embedding_dim=3,
            num_embeddings=512,
            beta=0.25,
            legacy_loss=True,
            attention_levels=[False, False, False],
            mid_attention=True,
            norm_num_groups=16,
            norm_eps=1e-6,
            use_flash_attention=True,
        ),
        "discriminator": dict(in_channels=2, channels=32, num_layers=3),
        "cldm": dict(
            latent_channels=3,
            condition_channels=15,
            channels=[32, 64, 64],
            attention_levels=[False, False, True],
            num_res_blocks=2,
            num_head_channels=32,
            norm_num_groups=32,
            rescaler_stages=2,
            rescaler_multiplier=0.5,
            use_flash_attention=True,
            scale_factor=1.0,  # the official VQ-f4 setting; train-ldm --scale-factor auto: 1 / latent std
        ),
        "cbbdm": dict(
            latent_channels=3,
            condition_channels=15,
            channels=[32, 64, 64],
            attention_levels=[False, False, True],
            num_res_blocks=2,
            num_head_channels=32,
            norm_num_groups=32,
            rescaler_stages=2,
            rescaler_multiplier=0.5,
            concat_condition=True,
            use_flash_attention=True,
        ),
        "pix2pix": dict(in_channels=15, out_channels=2, channels=[32, 64, 128, 256, 256], num_res_units=0,
                        norm="instance", dropout=0.0),
        "pix2pix_discriminator": dict(in_channels=17, channels=32, num_layers=3),
    },
}


def model_config(profile: str, kind: str = "autoencoder") -> dict[str, Any]:
    """Constructor arguments of network ``kind`` (autoencoder, discriminator, cldm, cbbdm,
    pix2pix, pix2pix_discriminator), per profile."""
    prof = get_profile(profile)
    if kind not in _CONFIGS[prof.name]:
        raise InputError(f"unknown network kind {kind!r}; choose one of {sorted(_CONFIGS[prof.name])}")
    cfg = copy.deepcopy(_CONFIGS[prof.name][kind])
    if kind in ("cldm", "cbbdm"):
        cfg["condition_channels"] = prof.n_frames
    elif kind == "pix2pix":
        cfg["in_channels"] = prof.n_frames
    elif kind == "pix2pix_discriminator":
        cfg["in_channels"] = prof.n_frames + 2  # [c, x]: CTP frames + DWI, ADC
    return cfg


def build_network(kind: str, config: dict[str, Any]) -> nn.Module:
    """Instantiate network type ``kind`` from its constructor arguments."""
    try:
        cls = NETWORK_TYPES[_ALIASES.get(kind, kind)]
    except KeyError:
        raise InputError(f"unknown network type {kind!r}; known: {sorted(NETWORK_TYPES)}") from None
    return cls(**config)


def build_autoencoder(config: dict[str, Any]) -> VQAutoencoder:
    """`VQAutoencoder` from ``model_config(profile, "autoencoder")``."""
    return VQAutoencoder(**config)


def build_discriminator(config: dict[str, Any]) -> PatchGANDiscriminator:
    """`PatchGANDiscriminator` from ``model_config(profile, "discriminator")``."""
    return PatchGANDiscriminator(**config)


def build_cldm(config: dict[str, Any]) -> ConditionalLDM:
    """`ConditionalLDM` from ``model_config(profile, "cldm")``."""
    return ConditionalLDM(**config)


def network_type(module: nn.Module) -> str:
    """The config.json type name of a network instance (inverse of `NETWORK_TYPES`)."""
    for name, cls in NETWORK_TYPES.items():
        if type(module) is cls:
            return name
    raise TypeError(
        f"{type(module).__name__} is not a checkpointable ctp2mri network; "
        f"known: {sorted(NETWORK_TYPES)}"
    )


def parameter_count(kind: str, config: dict[str, Any]) -> int:
    """Number of parameters, counted on the meta device (no memory, no initialisation cost)."""
    with torch.device("meta"):
        net = build_network(kind, config)
    return sum(p.numel() for p in net.parameters())

