"""Sampling a cLDM checkpoint: loading, DDIM + decode wiring, seeding, batching, progress, errors."""

from __future__ import annotations

import shutil

import pytest
import torch
from _helpers_cldm import NORMALISATION, save_tiny_cldm

from ctp2mri.checkpoints import load_checkpoint
from ctp2mri.diffusion import ddim_sample
from ctp2mri.errors import Cancelled, InputError
from ctp2mri.progress import CancelToken
from ctp2mri.synthesis.inference import sample_slices
from ctp2mri.synthesis.loading import load_model
from ctp2mri.synthesis.seeding import slice_seed

pytestmark = pytest.mark.usefixtures("one_thread")

H, W = 96, 112  # the demo grid
STEPS = 3


@pytest.fixture(scope="module")
def model(tiny_cldm):
    return load_model(tiny_cldm, "cpu")


@pytest.fixture(scope="module")
def cond():
    """Seven CTP-like slices: [−1, 1] inside an elliptic 'brain', 0 outside (the contract)."""
    g = torch.Generator().manual_seed(3)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, W), indexing="ij")
    brain = (xx**2 / 0.8 + yy**2 / 0.9) < 1
    return (torch.rand((7, 15, H, W), generator=g) * 2 - 1) * brain


def test_load_model_uses_ema_weights_by_default(tiny_cldm, model):
    nets, config = load_checkpoint(tiny_cldm, names=["ema", "model"])
    for name, loaded in (("ema", model), ("model", load_model(tiny_cldm, "cpu", use_ema=False))):
        assert loaded.weights == name
        for key, value in nets[name].state_dict().items():
            torch.testing.assert_close(loaded.cldm.state_dict()[key], value, rtol=0, atol=0)
    assert model.profile == "demo" and model.device == torch.device("cpu")
    assert model.normalisation["adc"] == NORMALISATION["adc"]
    assert model.schedule.config() == config["schedule"]
    assert not model.cldm.training and not model.autoencoder.training
    assert not any(p.requires_grad for p in model.cldm.parameters())


def test_samples_have_the_target_shape_and_range(model, cond):
    out = sample_slices(model, cond, n_steps=STEPS, batch_size=4)
    assert out.shape == (7, 2, H, W) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert torch.isfinite(out).all() and out.min() >= -1 and out.max() <= 1
    assert out.std() > 0.01  # not a constant image
    assert not torch.equal(out[0], out[1])  # different condition and noise per slice


def test_pipeline_is_ddim_in_latent_space_then_decode(model, cond):
    """Slice 2 by hand: z_T from its seed, c̃ = F(c), DDIM with ε_θ, quantise, decode, clamp."""
    seed, sid = 5, 2
    gen = torch.Generator().manual_seed(slice_seed(seed, sid))
    latent = model.autoencoder.latent_shape(H, W)
    x_t = torch.randn(latent, generator=gen)[None]
    with torch.no_grad():
        c_tilde = model.cldm.encode_condition(cond[sid:sid + 1])
        z0 = ddim_sample(model.cldm.predict_noise, x_t.shape, c_tilde, model.schedule, STEPS, x_T=x_t)
        expected = model.autoencoder.decode(z0).clamp(-1, 1)
    out = sample_slices(model, cond, n_steps=STEPS, seed=seed, batch_size=3)
    torch.testing.assert_close(out[sid:sid + 1], expected, rtol=1e-5, atol=1e-5)
    unquantised = sample_slices(model, cond[sid:sid + 1], n_steps=STEPS, seed=seed, ids=[sid],
                                quantize=False)
    assert not torch.allclose(unquantised, expected, atol=1e-3)  # the codebook step is applied


def test_a_scaled_latent_model_decodes_z0_over_its_scale_factor(tmp_path, cond):
    """CompVis scale_factor: the sampler runs on s·E(x) latents, the decoder gets ẑ_0 / s."""
    scaled = load_model(save_tiny_cldm(tmp_path / "scaled", scale_factor=2.5), "cpu")
    assert scaled.cldm.scale_factor == 2.5
    seed, sid = 4, 1
    gen = torch.Generator().manual_seed(slice_seed(seed, sid))
    x_t = torch.randn(scaled.autoencoder.latent_shape(H, W), generator=gen)[None]
    with torch.no_grad():
        c_tilde = scaled.cldm.encode_condition(cond[sid:sid + 1])
        z0 = ddim_sample(scaled.cldm.predict_noise, x_t.shape, c_tilde, scaled.schedule, STEPS, x_T=x_t)
        expected = scaled.autoencoder.decode(z0 / 2.5).clamp(-1, 1)
        unscaled = scaled.autoencoder.decode(z0).clamp(-1, 1)
    out = sample_slices(scaled, cond[sid:sid + 1], n_steps=STEPS, seed=seed, ids=[sid])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, unscaled, atol=1e-3)


def test_result_does_not_depend_on_batch_size_or_companions(model, cond):
    whole = sample_slices(model, cond, n_steps=STEPS, seed=1, batch_size=7)
    for batch_size in (1, 3):
        torch.testing.assert_close(sample_slices(model, cond, n_steps=STEPS, seed=1,
                                                 batch_size=batch_size), whole, rtol=1e-5, atol=1e-5)
    # a slice sampled alone, under its id, equals its row of the full run
    alone = sample_slices(model, cond[4:5], n_steps=STEPS, seed=1, ids=[4])
    torch.testing.assert_close(alone, whole[4:5], rtol=1e-5, atol=1e-5)


def test_eta_noise_does_not_depend_on_batch_size(model, cond):
    """DDIM η > 0 draws each slice's step noise from its own stream: batch sizes 1, 3 and 7
    (with 2 samples per slice, so a batch may split a slice's samples) agree, and so does a
    slice sampled alone under its id."""
    whole = sample_slices(model, cond, n_steps=STEPS, eta=1.0, seed=2, batch_size=14, samples=2)
    for batch_size in (1, 3, 7):
        torch.testing.assert_close(sample_slices(model, cond, n_steps=STEPS, eta=1.0, seed=2, samples=2,
                                                 batch_size=batch_size), whole, rtol=1e-5, atol=1e-5)
    alone = sample_slices(model, cond[5:6], n_steps=STEPS, eta=1.0, seed=2, ids=[5], samples=2)
    torch.testing.assert_close(alone, whole[10:12], rtol=1e-5, atol=1e-5)
    # the η-noise is really drawn: η = 0 from the same z_T ends elsewhere
    deterministic = sample_slices(model, cond, n_steps=STEPS, eta=0.0, seed=2, batch_size=14, samples=2)
    assert (whole - deterministic).abs().mean() > 1e-3


def test_seeding_is_deterministic_and_seed_dependent(model, cond):
    a = sample_slices(model, cond[:2], n_steps=STEPS, seed=11)
    b = sample_slices(model, cond[:2], n_steps=STEPS, seed=11)
    c = sample_slices(model, cond[:2], n_steps=STEPS, seed=12)
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 1e-3
    assert slice_seed(0, 1) != slice_seed(1, 0) and slice_seed(3, 4) == slice_seed(3, 4)
    # η > 0 adds seeded noise: reproducible, and different from η = 0
    s1 = sample_slices(model, cond[:2], n_steps=STEPS, eta=1.0, seed=11)
    torch.testing.assert_close(s1, sample_slices(model, cond[:2], n_steps=STEPS, eta=1.0, seed=11))
    assert not torch.allclose(s1, a)


def test_progress_counts_steps_across_batches(model, cond):
    calls = []
    sample_slices(model, cond, n_steps=STEPS, batch_size=3,
                  progress=lambda step, total, info: calls.append((step, total, dict(info))))
    batches = 3  # 7 slices by 3
    assert [c[0] for c in calls] == list(range(1, batches * STEPS + 1))
    assert {c[1] for c in calls} == {batches * STEPS}
    assert [c[2]["slices_done"] for c in calls if c[0] % STEPS == 0] == [3, 6, 7]
    assert calls[-1][2]["batch"] == batches and calls[-1][2]["slices"] == 7


def test_cancel_stops_sampling(model, cond):
    token = CancelToken()
    calls = []

    def progress(step, total, info):
        calls.append(step)
        token.cancel()

    with pytest.raises(Cancelled):
        sample_slices(model, cond, n_steps=STEPS, batch_size=2, progress=progress, cancel=token)
    assert calls == [1]  # stopped before the second network call


def test_bad_condition_and_settings(model, cond):
    with pytest.raises(InputError, match="15 frames"):
        sample_slices(model, cond[:, :10], n_steps=STEPS)
    with pytest.raises(InputError, match="slices, frames, H, W"):
        sample_slices(model, cond[0], n_steps=STEPS)
    with pytest.raises(InputError, match="batch size"):
        sample_slices(model, cond, n_steps=STEPS, batch_size=0)
    with pytest.raises(InputError, match="DDIM steps"):
        sample_slices(model, cond, n_steps=0)
    with pytest.raises(InputError, match="ids"):
        sample_slices(model, cond, n_steps=STEPS, ids=[0, 1])


def test_checkpoint_missing_a_file_is_refused(tiny_cldm, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_cldm, broken)
    (broken / "autoencoder.safetensors").unlink()
    with pytest.raises(InputError, match="autoencoder.safetensors is missing"):
        load_model(broken, "cpu")


def test_autoencoder_checkpoint_is_not_a_cldm(tmp_path):
    from ctp2mri.checkpoints import save_checkpoint
    from ctp2mri.models.autoencoder import VQAutoencoder

    ae = VQAutoencoder(channels=(8, 8, 8), num_res_blocks=1, num_embeddings=8, norm_num_groups=8)
    path = save_checkpoint(tmp_path / "ae", {"autoencoder": ae}, {"kind": "autoencoder", "profile": "demo"})
    with pytest.raises(InputError, match="'autoencoder' checkpoint.*cldm"):
        load_model(path, "cpu")


def test_cuda_requested_without_gpu_is_a_clear_error(tiny_cldm):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(InputError, match="CUDA"):
        load_model(tiny_cldm, "cuda")
