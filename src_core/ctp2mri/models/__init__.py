"""Networks of the paper's model (VQGAN autoencoder, spatial rescaler, conditional LDM) and of
its baselines (latent Brownian bridge BBDM/cBBDM, Pix2Pix generator).

Each network takes its whole configuration in the constructor and records it in
``.config``; `model_config` gives those arguments per profile and `build_network`
rebuilds a network from them (what checkpoints store).
"""

from ctp2mri.models.autoencoder import PatchGANDiscriminator, VectorQuantizer, VQAutoencoder
from ctp2mri.models.cbbdm import BrownianBridgeLDM
from ctp2mri.models.cldm import ConditionalLDM
from ctp2mri.models.conditioning import SpatialRescaler
from ctp2mri.models.configs import (
    NETWORK_TYPES,
    build_autoencoder,
    build_cldm,
    build_discriminator,
    build_network,
    model_config,
    network_type,
    parameter_count,
)
from ctp2mri.models.pix2pix import Pix2PixGenerator

__all__ = [
    "NETWORK_TYPES",
    "BrownianBridgeLDM",
    "ConditionalLDM",
    "PatchGANDiscriminator",
    "Pix2PixGenerator",
    "SpatialRescaler",
    "VQAutoencoder",
    "VectorQuantizer",
    "build_autoencoder",
    "build_cldm",
    "build_discriminator",
    "build_network",
    "model_config",
    "network_type",
    "parameter_count",
]
