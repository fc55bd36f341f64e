"""The networks of the model stack: VQGAN autoencoder, spatial rescaler F, conditional LDM."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from _helpers_cldm import SMALL_AE
from torch import nn

from ctp2mri.errors import InputError
from ctp2mri.models import (
    NETWORK_TYPES,
    ConditionalLDM,
    PatchGANDiscriminator,
    SpatialRescaler,
    VQAutoencoder,
    build_network,
    model_config,
    parameter_count,
)
from ctp2mri.profiles import get_profile

# Tiny networks: the demo grid (96 × 112) but few channels, so each test runs in about a second
# (SMALL_AE, the autoencoder's, is shared with the checkpoint tests).
TINY_LDM = dict(
    channels=[32, 32, 32],
    attention_levels=[False, False, True],
    num_res_blocks=1,
    num_head_channels=16,
)


@pytest.fixture
def ae() -> VQAutoencoder:
    torch.manual_seed(0)
    return VQAutoencoder(**SMALL_AE)


@pytest.fixture
def ldm() -> ConditionalLDM:
    torch.manual_seed(0)
    return ConditionalLDM(**TINY_LDM)


def test_autoencoder_shapes_x4_downsampling(ae):
    x = torch.randn(2, 2, 96, 112)
    z = ae.encode(x)
    assert z.shape == (2, 3, 24, 28)
    assert ae.decode(z).shape == (2, 2, 96, 112)
    x_rec, codebook_loss = ae(x)
    assert x_rec.shape == x.shape
    assert codebook_loss.ndim == 0 and torch.isfinite(codebook_loss) and codebook_loss > 0


def test_quantize_picks_nearest_code_and_reports_the_legacy_loss(ae):
    z = torch.randn(2, 3, 24, 28) * 0.01  # codes start within ±1/64: keep z on their scale
    z_q, loss, idx = ae.quantize(z)
    codes = ae.quantizer.embedding.weight
    flat = z.permute(0, 2, 3, 1).reshape(-1, 3)
    assert idx.shape == (2, 24, 28)
    assert torch.equal(idx.reshape(-1), torch.cdist(flat, codes).argmin(1))
    assert torch.allclose(z_q.permute(0, 2, 3, 1).reshape(-1, 3), codes[idx.reshape(-1)], atol=1e-6)
    # Both terms equal mean((z − z_q)²) in value; the legacy form weighs them 1 and β.
    assert loss.item() == pytest.approx((1 + 0.25) * F.mse_loss(z, z_q).item(), rel=1e-5)


def test_encode_is_unquantised_and_decode_quantises_by_default(ae):
    x = torch.randn(1, 2, 32, 48)
    with torch.no_grad():
        z = ae.encode(x)
        z_q = ae.quantize(z)[0]
        assert not torch.allclose(z, z_q)  # the LDM models the pre-quantisation latent
        assert torch.allclose(ae.decode(z), ae.decode(z_q, quantize=False), atol=1e-6)
        assert not torch.allclose(ae.decode(z, quantize=False), ae.decode(z))


def test_straight_through_gradient_reaches_the_latent(ae):
    z = torch.randn(1, 3, 8, 12, requires_grad=True)
    ae.decode(z).square().sum().backward()
    z_q = ae.quantize(z)[0].detach().requires_grad_(True)
    ae.decode(z_q, quantize=False).square().sum().backward()
    assert z.grad.abs().sum() > 0
    assert torch.allclose(z.grad, z_q.grad, atol=1e-6)  # d z_q / d z = identity


def test_autoencoder_training_step_updates_every_part(ae):
    x = torch.randn(2, 2, 32, 48)
    x_rec, codebook_loss = ae(x)
    (F.mse_loss(x_rec, x) + codebook_loss).backward()
    for name, p in ae.named_parameters():
        if name == "quantizer.embedding.weight":
            used = ae.quantize(ae.encode(x))[2].unique()
            assert p.grad[used].abs().sum() > 0
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert ae.last_layer is ae.decoder.blocks[-1].conv.weight


def test_encoder_and_decoder_end_like_compvis(ae):
    # GroupNorm → SiLU → conv_out, as CompVis's norm_out / nonlinearity / conv_out.
    for blocks in (ae.encoder.blocks, ae.decoder.blocks):
        assert isinstance(blocks[-3], nn.GroupNorm) and isinstance(blocks[-2], nn.SiLU)
        assert isinstance(blocks[-1].conv, nn.Conv2d)
    # The decoder has one more ResNet block per level than the encoder (num_res_blocks + 1).
    count = lambda blocks: sum(type(b).__name__ == "AEKLResBlock" for b in blocks)  # noqa: E731
    assert count(ae.decoder.blocks) - count(ae.encoder.blocks) == 3


def test_autoencoder_rejects_bad_slices(ae):
    with pytest.raises(InputError, match="DWI, ADC"):
        ae.encode(torch.randn(1, 15, 96, 112))
    with pytest.raises(InputError, match="not divisible by 4"):
        ae.encode(torch.randn(1, 2, 90, 112))


def test_patchgan_discriminator_gives_patch_logits():
    disc = PatchGANDiscriminator(in_channels=2, channels=16, num_layers=3)
    out = disc(torch.randn(2, 2, 96, 112))
    # Three stride-2 convs, then two stride-1 4×4 convs (padding 1): 96/8 − 2, 112/8 − 2.
    assert out.shape == (2, 1, 10, 12)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in disc.modules()) == 3


def test_rescaler_is_4x4_block_average_then_channel_mix():
    torch.manual_seed(0)
    c = torch.randn(2, 15, 96, 112)
    resc = SpatialRescaler(n_stages=2, multiplier=0.5, in_channels=15, out_channels=15)
    assert resc.channel_mapper.bias is None  # CompVis remap_output: bias=False
    out = resc(c)
    assert out.shape == (2, 15, 24, 28)
    # Bilinear ½ (align_corners=False) samples half-way between pixel pairs: a 2×2 mean.
    mix = resc.channel_mapper.weight[:, :, 0, 0]
    expected = torch.einsum("oi,bihw->bohw", mix, F.avg_pool2d(c, 4))
    assert torch.allclose(out, expected, atol=1e-5)
    out.square().mean().backward()
    assert resc.channel_mapper.weight.grad.abs().sum() > 0  # trainable


def test_cldm_forward_concatenates_latent_and_rescaled_ctp(ldm):
    assert ldm.unet.conv_in.conv.in_channels == 18
    z_t = torch.randn(2, 3, 24, 28)
    c = torch.randn(2, 15, 96, 112)
    t = torch.tensor([0, 999])
    eps = ldm(z_t, t, c)
    assert eps.shape == (2, 3, 24, 28)
    # Same result from a precomputed c̃ (what DDIM does once per run) and a scalar step.
    c_tilde = ldm.encode_condition(c)
    assert c_tilde.shape == (2, 15, 24, 28)
    assert torch.allclose(ldm.predict_noise(z_t, t, c_tilde), eps)
    assert torch.allclose(ldm(z_t[:1], torch.tensor(999), c[:1]), eps[1:], atol=1e-5)


def test_cldm_gradient_reaches_rescaler_and_unet(ldm):
    # MONAI zero-initialises the output conv (as CompVis), which blocks every other gradient
    # at step 0; give it weights as after some training.
    nn.init.normal_(ldm.unet.out[-1].conv.weight, std=0.05)
    eps = ldm(torch.randn(2, 3, 24, 28), torch.tensor([10, 500]), torch.randn(2, 15, 96, 112))
    F.mse_loss(eps, torch.randn_like(eps)).backward()
    assert ldm.rescaler.channel_mapper.weight.grad.abs().sum() > 0
    assert ldm.unet.conv_in.conv.weight.grad.abs().sum() > 0


def test_cldm_rejects_mismatched_condition(ldm):
    z_t = torch.randn(1, 3, 24, 28)
    with pytest.raises(InputError, match="15 frames"):
        ldm(z_t, torch.tensor([1]), torch.randn(1, 12, 96, 112))
    with pytest.raises(InputError, match="same grid"):
        ldm(z_t, torch.tensor([1]), torch.randn(1, 15, 192, 224))


@pytest.mark.parametrize("profile", ["paper", "demo"])
@pytest.mark.parametrize("kind", sorted(NETWORK_TYPES))
def test_model_config_is_exactly_the_constructor_arguments(profile, kind):
    cfg = model_config(profile, kind)
    cls = NETWORK_TYPES[kind]
    # every argument, but for the cLDM's non-paper options (condition encoder, parameterization,
    # case context), which a config states only when it departs from the paper
    optional = {"condition_encoder", "condition_options", "parameterization", "case_context"} if kind == "cldm" \
        else set()
    assert set(cfg) == set(inspect.signature(cls).parameters) - optional
    with torch.device("meta"):
        net = build_network(kind, cfg)
    assert net.config == cfg
    model_config(profile, kind)["channels"] = None  # a fresh copy each call
    assert model_config(profile, kind) == cfg


@pytest.mark.parametrize("profile, latent", [("paper", (3, 48, 56)), ("demo", (3, 24, 28))])
def test_profiles_latent_grid(profile, latent):
    prof = get_profile(profile)
    with torch.device("meta"):
        ae = build_network("autoencoder", model_config(profile, "autoencoder"))
        ldm = build_network("cldm", model_config(profile, "cldm"))
    assert ae.latent_shape(*prof.shape_xy) == latent
    assert latent[1] % ldm.size_multiple == 0 and latent[2] % ldm.size_multiple == 0
    assert ldm.condition_channels == prof.n_frames


def test_demo_networks_fit_a_cpu_budget():
    assert parameter_count("autoencoder", model_config("demo", "autoencoder")) < 3_000_000
    assert parameter_count("cldm", model_config("demo", "cldm")) < 3_000_000
    assert parameter_count("discriminator", model_config("demo", "discriminator")) < 1_000_000


def test_paper_networks_have_the_official_size():
    # Counted on the meta device: no memory, no initialisation.
    n_ldm = parameter_count("cldm", model_config("paper", "cldm"))
    n_ae = parameter_count("autoencoder", model_config("paper", "autoencoder"))
    assert 0.70e9 < n_ldm < 0.78e9  # ≈ 0.74 B: the "~0.7 B"
    assert 45e6 < n_ae < 65e6  # the f4 VQGAN of CompVis with ch 128, mult [1, 2, 4]: ≈ 55 M
