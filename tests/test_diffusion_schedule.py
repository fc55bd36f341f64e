"""The noise schedule against its closed form and the forward process against Eq. 2 and 5."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ctp2mri.diffusion import NoiseSchedule
from ctp2mri.errors import InputError

T = 1000
B0, B1 = 0.0015, 0.0195


def closed_form_abar(t: int) -> float:
    """ᾱ at 0-based index t: ∏_{i=0}^{t} (1 − β_i), β_i = (√B0 + i (√B1 − √B0)/(T − 1))²."""
    step = (math.sqrt(B1) - math.sqrt(B0)) / (T - 1)
    return math.prod(1.0 - (math.sqrt(B0) + i * step) ** 2 for i in range(t + 1))


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return NoiseSchedule()


def test_alphas_cumprod_matches_closed_form(schedule):
    assert schedule.alphas_cumprod.dtype == torch.float64
    assert schedule.alphas_cumprod.shape == (T,)
    for t in (0, 1, 10, 250, 499, 500, 998, 999):
        expect = closed_form_abar(t)
        assert schedule.alphas_cumprod[t].item() == pytest.approx(expect, rel=1e-6, abs=0)
    # ᾱ_T of this schedule is ~1.4e-4: z_T is noise to within √ᾱ_T ≈ 1.2 %
    assert 1.3e-4 < schedule.alphas_cumprod[-1].item() < 1.5e-4


def test_betas_linear_in_sqrt_with_official_endpoints(schedule):
    betas = schedule.betas.numpy()
    assert betas[0] == pytest.approx(B0, rel=1e-12)
    assert betas[-1] == pytest.approx(B1, rel=1e-12)
    assert np.all(np.diff(betas) > 0)
    # √β is an arithmetic sequence: constant first difference
    d = np.diff(np.sqrt(betas))
    np.testing.assert_allclose(d, (math.sqrt(B1) - math.sqrt(B0)) / (T - 1), rtol=1e-9)
    np.testing.assert_allclose(schedule.alphas.numpy(), 1.0 - betas, rtol=0, atol=0)


def test_same_schedule_as_monai_scaled_linear_beta(schedule):
    # MONAI's "scaled_linear_beta" is the same formula in float32: agreement to float32 precision
    # shows the two name the same schedule (ours is the float64 one).
    from monai.networks.schedulers import DDIMScheduler

    monai = DDIMScheduler(T, schedule="scaled_linear_beta", beta_start=B0, beta_end=B1)
    np.testing.assert_allclose(
        monai.alphas_cumprod.double().numpy(), schedule.alphas_cumprod.numpy(), rtol=1e-5
    )


def test_q_sample_has_eq2_mean_and_variance(schedule):
    gen = torch.Generator().manual_seed(0)
    n = 100_000
    for t in (0, 300, 999):
        z0 = torch.full((n, 1, 1, 1), 0.7, dtype=torch.float64)
        noise = torch.randn(z0.shape, generator=gen, dtype=torch.float64)
        z_t = schedule.q_sample(z0, t, noise)
        abar = schedule.alphas_cumprod[t].item()
        mean, var = z_t.mean().item(), z_t.var().item()
        sd = math.sqrt(1 - abar)
        # 5 standard errors of the sample mean and of the sample variance
        assert mean == pytest.approx(math.sqrt(abar) * 0.7, abs=5 * sd / math.sqrt(n))
        assert var == pytest.approx(1 - abar, abs=5 * (1 - abar) * math.sqrt(2 / n))


def test_q_sample_per_element_timesteps(schedule):
    z0 = torch.ones(3, 2, 4, 4, dtype=torch.float64)
    noise = torch.zeros_like(z0)
    t = torch.tensor([0, 500, 999])
    z_t = schedule.q_sample(z0, t, noise)
    for b in range(3):
        expect = math.sqrt(closed_form_abar(int(t[b])))
        np.testing.assert_allclose(z_t[b].numpy(), expect, rtol=1e-6)


def test_predict_z0_inverts_q_sample(schedule):
    gen = torch.Generator().manual_seed(1)
    z0 = torch.randn(4, 3, 8, 8, generator=gen, dtype=torch.float64)
    noise = torch.randn(z0.shape, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 1, 600, 999])
    z_t = schedule.q_sample(z0, t, noise)
    torch.testing.assert_close(schedule.predict_z0(z_t, t, noise), z0, rtol=0, atol=1e-12)
    # float32 latents: the 1/√ᾱ ≈ 84 amplification at t = 999 keeps the error ~1e-5
    z32 = schedule.predict_z0(z_t[3:].float(), 999, noise[3:].float())
    assert z32.dtype == torch.float32
    torch.testing.assert_close(z32, z0[3:].float(), rtol=0, atol=1e-4)


def test_predict_z0_is_differentiable_in_eps(schedule):
    z_t = torch.randn(2, 3, 4, 4)
    eps = torch.zeros_like(z_t, requires_grad=True)
    schedule.predict_z0(z_t, 400, eps).sum().backward()
    abar = schedule.alphas_cumprod[400].item()
    expect = -math.sqrt((1 - abar) / abar)  # ∂ẑ0/∂ε̂ from Eq. 5
    torch.testing.assert_close(eps.grad, torch.full_like(eps, expect))


@pytest.mark.parametrize("n", [1, 2, 4, 5, 8, 10, 20, 25, 40, 50, 100, 125, 200, 250, 500])
def test_ddim_timesteps_match_official_uniform_when_n_divides_T(schedule, n):
    # CompVis / Diffusion-LAPT make_ddim_timesteps("uniform")
    official = np.arange(0, T, T // n) + 1
    np.testing.assert_array_equal(schedule.ddim_timesteps(n).numpy(), official)


def test_ddim_timesteps_for_every_step_count(schedule):
    assert schedule.ddim_timesteps(200)[[0, 1, -1]].tolist() == [1, 6, 996]
    for n in range(1, T + 1):
        ts = schedule.ddim_timesteps(n)
        assert len(ts) == n
        assert ts[0] >= 0 and ts[-1] <= T - 1
        assert torch.all(ts[1:] > ts[:-1])
        # spans the chain: the first DDIM step starts within one stride of the noisiest index
        assert ts[-1] >= T - math.ceil(T / n) - 1
    assert schedule.ddim_timesteps(T).tolist() == list(range(T))


@pytest.mark.parametrize("n", [0, -3, T + 1])
def test_ddim_timesteps_out_of_range(schedule, n):
    with pytest.raises(InputError, match="between 1 and 1000"):
        schedule.ddim_timesteps(n)


def test_config_round_trip_and_to(schedule):
    again = NoiseSchedule.from_config(schedule.config())
    assert torch.equal(again.alphas_cumprod, schedule.alphas_cumprod)
    moved = schedule.to("cpu")
    assert moved is not schedule and torch.equal(moved.betas, schedule.betas)
    with pytest.raises(InputError, match="beta_schedule"):
        NoiseSchedule.from_config({**schedule.config(), "beta_schedule": "cosine"})
    with pytest.raises(InputError):
        NoiseSchedule(beta_start=0.02, beta_end=0.01)
