"""Tiny networks for the tests: the network configs the training and model tests share, and a
randomly initialised cLDM checkpoint in the trainer's format (the session's ``tiny_cldm`` fixture
in conftest.py) for the inference tests."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from ctp2mri.checkpoints import save_checkpoint
from ctp2mri.diffusion import NoiseSchedule
from ctp2mri.models.autoencoder import VQAutoencoder
from ctp2mri.models.cldm import ConditionalLDM

# demo-profile phantom ranges (median over a few cases), the shape SliceDataset.intensity_ranges gives
NORMALISATION = {"statistic": "median over cases", "n_cases": 2, "quantiles": [0.5, 99.5],
                 "ctp_hu_range": [0.0, 200.0],
                 "units": {"dwi": "scanner units (b = 1000 s/mm²)", "adc": "1e-6 mm²/s"},
                 "dwi": {"lo": 50.0, "hi": 220.0}, "adc": {"lo": 200.0, "hi": 2600.0}, "adc_window": [200.0, 2600.0],
                 "dwi_hi_median": None}
# a checkpoint trained with the DWI anchor: DWI's upper bound 1.6 × the brain median
ANCHORED_DWI_NORMALISATION = {**NORMALISATION, "dwi_hi_median": 1.6, "dwi": {"lo": 50.0, "hi": 215.0}}
# a checkpoint from before the fixed ADC window: ADC normalised with each case's quantiles
LEGACY_NORMALISATION = {**{k: v for k, v in NORMALISATION.items() if k not in ("adc_window", "dwi_hi_median")},
                        "adc": {"lo": 420.0, "hi": 2890.0}}

# Networks far smaller than the demo profile's, in the trainers' config form (train_autoencoder's
# autoencoder_config and discriminator_config, train_ldm's cldm_config; TINY_CLDM is also the
# cBBDM's cbbdm_config): the loops, not the models, are under test. Shared by several modules:
# derive a changed one ({**TINY_CLDM, ...}), never change these in place.
TINY_AE = {"in_channels": 2, "out_channels": 2, "channels": [8, 16, 16], "num_res_blocks": 1, "embedding_dim": 3,
           "num_embeddings": 64, "attention_levels": [False, False, False], "mid_attention": False,
           "norm_num_groups": 8}
TINY_D = {"in_channels": 2, "channels": 8, "num_layers": 2}
TINY_CLDM = {"latent_channels": 3, "condition_channels": 15, "channels": [16, 16], "attention_levels": [False, True],
             "num_res_blocks": 1, "num_head_channels": 16, "norm_num_groups": 8}

# VQAutoencoder keyword arguments of the model and checkpoint tests: the demo grid (96 × 112) but
# few channels, so each test runs in about a second.
SMALL_AE = {"channels": [16, 32, 32], "num_res_blocks": 1, "num_embeddings": 64, "norm_num_groups": 8}


def tiny_networks(seed: int = 0, scale_factor: float = 1.0,
                  **cldm_options) -> tuple[ConditionalLDM, ConditionalLDM, VQAutoencoder]:
    """(model, ema, autoencoder) small enough to sample 96×112 slices in milliseconds;
    ``cldm_options`` are further `ConditionalLDM` arguments (e.g. the perfusion encoder)."""
    torch.manual_seed(seed)
    cldm = ConditionalLDM(channels=(8, 8), attention_levels=(False, False), num_res_blocks=1,
                          num_head_channels=8, norm_num_groups=8, scale_factor=scale_factor, **cldm_options)
    # MONAI zero-initialises the UNet's output conv (ε̂ ≡ 0 until trained); give it weights
    # so the network's output depends on z_t and the condition, as a trained one does.
    for p in cldm.unet.out.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ema = ConditionalLDM(**cldm.config)
    ema.load_state_dict(cldm.state_dict())
    with torch.no_grad():  # EMA ≠ model, so a test can tell which weights were loaded
        for p in ema.unet.out.parameters():
            p.mul_(-1.0)
    autoencoder = VQAutoencoder(channels=(4, 4, 4), num_res_blocks=0, num_embeddings=32,
                                mid_attention=False, norm_num_groups=4)
    return cldm, ema, autoencoder


def save_tiny_cldm(path: Path, profile: str = "demo", seed: int = 0, scale_factor: float = 1.0,
                   normalisation: dict | None = None, **cldm_options) -> Path:
    """A real cLDM checkpoint folder (config.json + safetensors) with tiny random networks."""
    cldm, ema, autoencoder = tiny_networks(seed, scale_factor, **cldm_options)
    config = {"kind": "cldm", "profile": profile, "schedule": NoiseSchedule().config(),
              "normalisation": normalisation or NORMALISATION, "training": {"steps": 0},
              "provenance": {"command": "tests/_helpers_cldm.py", "steps": 0}}
    return save_checkpoint(path, {"model": cldm, "ema": ema, "autoencoder": autoencoder}, config)


@contextmanager
def one_thread():
    """Run torch on one thread: the tiny networks' convolutions take ~1 ms, and on a busy
    2-core machine the intra-op thread pool's synchronisation made them ~20× slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
