"""DDIM sampling: exact recovery with an oracle, determinism, cancel and progress."""

from __future__ import annotations

import pytest
import torch

from ctp2mri.diffusion import NoiseSchedule, ddim_sample
from ctp2mri.errors import Cancelled, InputError
from ctp2mri.progress import CancelToken

SHAPE = (3, 3, 8, 6)  # B slices, 3 latent channels
F64 = torch.float64


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return NoiseSchedule()


def oracle(schedule: NoiseSchedule, z0: torch.Tensor):
    """An ε-model that knows z_0: returns the noise that makes z_t = √ᾱ_t z_0 + √(1 − ᾱ_t) ε hold.

    Also records the timesteps it was called with, and checks the sampler's calling convention.
    """
    calls: list[int] = []

    def eps_model(z_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        assert t.dtype == torch.long and t.shape == (z_t.shape[0],) and torch.all(t == t[0])
        assert cond == "ctp"
        calls.append(int(t[0]))
        abar = schedule.alphas_cumprod[t].to(z_t.dtype).reshape(-1, 1, 1, 1)
        return (z_t - abar.sqrt() * z0.to(z_t.dtype)) / (1 - abar).sqrt()

    return eps_model, calls


def smooth_model(z_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
    """A fixed, non-trivial stand-in for a trained network."""
    return torch.tanh(z_t + t.reshape(-1, 1, 1, 1) / 1000.0) * 0.9


@pytest.fixture
def z0() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


@pytest.mark.parametrize("n_steps", [1, 10, 200])
def test_eta0_oracle_recovers_z0(schedule, z0, n_steps):
    eps_model, calls = oracle(schedule, z0)
    gen = torch.Generator().manual_seed(0)
    out = ddim_sample(eps_model, SHAPE, "ctp", schedule, n_steps, generator=gen, dtype=F64)
    torch.testing.assert_close(out, z0, rtol=0, atol=1e-10)
    assert calls == schedule.ddim_timesteps(n_steps).flip(0).tolist()  # noisiest first
    # float32 latents, as in real sampling: ~1e-5
    out32 = ddim_sample(eps_model, SHAPE, "ctp", schedule, n_steps, generator=gen)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32, z0.float(), rtol=0, atol=5e-5)


def test_eta1_oracle_still_recovers_z0(schedule, z0):
    # with the true ε every ẑ_0 is exact, and the last step (to ᾱ = 1) adds no noise
    eps_model, _ = oracle(schedule, z0)
    gen = torch.Generator().manual_seed(0)
    out = ddim_sample(eps_model, SHAPE, "ctp", schedule, 20, eta=1.0, generator=gen, dtype=F64)
    torch.testing.assert_close(out, z0, rtol=0, atol=1e-10)


def test_compvis_last_step_ends_at_first_noise_level(schedule, z0):
    # the official sampler stops at ᾱ[0] = 1 − β_1: √ᾱ[0] z_0 + √β_1 ε̂, ε̂ = the last oracle ε
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    eps_model, _ = oracle(schedule, z0)
    out = ddim_sample(
        eps_model, SHAPE, "ctp", schedule, 1, x_T=x_T, compvis_last_step=True, dtype=F64
    )
    t = schedule.ddim_timesteps(1)
    eps = eps_model(x_T, t.expand(SHAPE[0]), "ctp")
    a0 = schedule.alphas_cumprod[0]
    torch.testing.assert_close(out, a0.sqrt() * z0 + (1 - a0).sqrt() * eps, rtol=0, atol=1e-10)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_matches_monai_ddim_steps(schedule, eta):
    # MONAI's DDIMScheduler.step is an independent implementation of DDIM Eq. 12 and 16; walking
    # it over our 200 timesteps (its step stride T // n is ours) must give the same trajectory.
    # Both draw the η-noise from the generator once per step, in the same order.
    from monai.networks.schedulers import DDIMScheduler

    monai = DDIMScheduler(
        1000, "scaled_linear_beta", clip_sample=False, beta_start=0.0015, beta_end=0.0195
    )
    monai.set_timesteps(200)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    z = x_T.clone()
    gen_monai, gen_ours = torch.Generator().manual_seed(8), torch.Generator().manual_seed(8)
    for t in schedule.ddim_timesteps(200).flip(0).tolist():
        eps = smooth_model(z, torch.full((SHAPE[0],), t), None)
        z, _ = monai.step(eps, t, z, eta=eta, generator=gen_monai)
    ours = ddim_sample(smooth_model, SHAPE, None, schedule, 200, eta, x_T=x_T, generator=gen_ours)
    torch.testing.assert_close(ours, z, rtol=1e-5, atol=2e-4)  # float32 rounding of both


def test_eta0_deterministic_given_x_T(schedule):
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    a = ddim_sample(smooth_model, SHAPE, None, schedule, 10, x_T=x_T)
    gen = torch.Generator().manual_seed(99)
    b = ddim_sample(smooth_model, SHAPE, None, schedule, 10, x_T=x_T, generator=gen)
    assert torch.equal(a, b)
    assert not torch.equal(a, x_T)


def test_eta1_deterministic_with_generator(schedule):
    def run(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return ddim_sample(smooth_model, SHAPE, None, schedule, 10, eta=1.0, generator=gen)

    assert torch.equal(run(4), run(4))
    assert not torch.allclose(run(4), run(5))
    # with η = 1 the per-step noise matters, not just z_T
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    c, d = (
        ddim_sample(smooth_model, SHAPE, None, schedule, 10, 1.0, x_T=x_T, generator=gen)
        for gen in (torch.Generator().manual_seed(1), torch.Generator().manual_seed(2))
    )
    assert not torch.allclose(c, d)


def test_slices_of_a_batch_are_independent(schedule):
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    whole = ddim_sample(smooth_model, SHAPE, None, schedule, 10, x_T=x_T)
    one = ddim_sample(smooth_model, (1, *SHAPE[1:]), None, schedule, 10, x_T=x_T[1:2])
    torch.testing.assert_close(whole[1:2], one)


def per_row(seed: int, rows: int = SHAPE[0]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + r) for r in range(rows)]


def test_eta_noise_per_row_generator_does_not_depend_on_the_batch(schedule):
    """With one generator per row, a row's z_T and η-noise come from its own stream, so
    sampling rows alone, in pairs or all together gives the same result (a single generator
    would hand row 1 the noise row 0 drew in a smaller batch)."""
    whole = ddim_sample(smooth_model, SHAPE, None, schedule, 10, eta=1.0, generator=per_row(7))
    gens = per_row(7)
    parts = [ddim_sample(smooth_model, (len(g), *SHAPE[1:]), None, schedule, 10, eta=1.0, generator=g)
             for g in (gens[:1], gens[1:])]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=0)
    # the per-step noise is used: the same z_T with η = 0 ends elsewhere
    x_T = torch.stack([torch.randn(SHAPE[1:], generator=g) for g in per_row(7)])
    deterministic = ddim_sample(smooth_model, SHAPE, None, schedule, 10, x_T=x_T)
    assert not torch.allclose(whole, deterministic, atol=1e-3)


def test_progress_called_once_per_step(schedule):
    seen = []
    ddim_sample(
        smooth_model, SHAPE, None, schedule, 25,
        progress=lambda s, n, info: seen.append((s, n, info["t"])),
    )
    assert [s for s, _, _ in seen] == list(range(1, 26))
    assert {n for _, n, _ in seen} == {25}
    assert [t for _, _, t in seen] == schedule.ddim_timesteps(25).flip(0).tolist()


def test_cancel_stops_within_one_step(schedule):
    token = CancelToken()
    calls = []

    def eps_model(z_t, t, cond):
        calls.append(int(t[0]))
        if len(calls) == 3:
            token.cancel()  # as if the user clicked Cancel during the third network call
        return smooth_model(z_t, t, cond)

    with pytest.raises(Cancelled):
        ddim_sample(eps_model, SHAPE, None, schedule, 200, cancel=token)
    assert len(calls) == 3

    calls.clear()
    with pytest.raises(Cancelled):
        ddim_sample(eps_model, SHAPE, None, schedule, 200, cancel=token)
    assert calls == []


def test_clip_z0(schedule, z0):
    eps_model, _ = oracle(schedule, z0)
    out = ddim_sample(eps_model, SHAPE, "ctp", schedule, 5, clip_z0=0.5, dtype=torch.float64)
    assert out.abs().max().item() <= 0.5 + 1e-12
    torch.testing.assert_close(out, z0.clamp(-0.5, 0.5), rtol=0, atol=1e-10)


def test_bad_arguments(schedule):
    with pytest.raises(InputError, match="between 1 and 1000"):
        ddim_sample(smooth_model, SHAPE, None, schedule, 0)
    with pytest.raises(InputError, match="eta"):
        ddim_sample(smooth_model, SHAPE, None, schedule, 10, eta=-0.1)
    with pytest.raises(InputError, match="x_T has shape"):
        ddim_sample(smooth_model, SHAPE, None, schedule, 10, x_T=torch.zeros(1, 3, 8, 6))
    with pytest.raises(InputError, match="2 noise generators for 3 rows"):
        ddim_sample(smooth_model, SHAPE, None, schedule, 10, eta=1.0, generator=per_row(0, 2))
