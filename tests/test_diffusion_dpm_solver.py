"""DPM-Solver++(2M): exact with an oracle, closer to the ODE than DDIM, second order, contract."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch

from ctp2mri.diffusion import NoiseSchedule, ddim_sample, dpm_solver_sample
from ctp2mri.diffusion.dpm_solver import dpm_solver_timesteps
from ctp2mri.errors import Cancelled, InputError
from ctp2mri.progress import CancelToken

SHAPE = (3, 3, 8, 6)  # B slices, 3 latent channels
F64 = torch.float64
MU, S = 1.0, 0.5  # Gaussian data N(μ, s² I) for the ODE-accuracy tests


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return NoiseSchedule()


@pytest.fixture(scope="module")
def fine_schedule() -> NoiseSchedule:
    # the same ᾱ(t/T) curve on 100× more timesteps: integer timesteps no longer limit how finely
    # the solvers can step, so their convergence order shows (on T = 1000 the last steps near
    # t = 0 are one timestep apart at any n and stop refining)
    return NoiseSchedule(100_000, 0.0015 / 100, 0.0195 / 100)


def oracle(schedule: NoiseSchedule, z0: torch.Tensor):
    """An ε-model that knows z_0 (the noise that makes Eq. 2 hold); records its timesteps."""
    calls: list[int] = []

    def eps_model(z_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        assert t.dtype == torch.long and t.shape == (z_t.shape[0],) and torch.all(t == t[0])
        assert cond == "ctp"
        calls.append(int(t[0]))
        abar = schedule.alphas_cumprod[t].to(z_t.dtype).reshape(-1, 1, 1, 1)
        return (z_t - abar.sqrt() * z0.to(z_t.dtype)) / (1 - abar).sqrt()

    return eps_model, calls


def gaussian_eps(schedule: NoiseSchedule):
    """The exact ε-predictor E[ε | z_t] for data z_0 ~ N(μ, s² I).

    z_t ~ N(√ᾱ μ, v I) with v = ᾱ s² + 1 − ᾱ, so E[ε | z_t] = √(1 − ᾱ) (z_t − √ᾱ μ) / v.
    """

    def eps_model(z_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        abar = schedule.alphas_cumprod[t].to(z_t.dtype).reshape(-1, 1, 1, 1)
        return (z_t - abar.sqrt() * MU) * (1 - abar).sqrt() / (abar * S**2 + 1 - abar)

    return eps_model


def ode_solution(schedule: NoiseSchedule, x_T: torch.Tensor, t_start: int) -> torch.Tensor:
    """The probability-flow ODE's exact z_0 from z = x_T at timestep ``t_start``.

    For Gaussian data each coordinate evolves on its own and the ODE's flow is monotone, so it
    keeps the standardised value y = (z_t − √ᾱ_t μ) / √v_t: z_0 = μ + s y.
    """
    abar = schedule.alphas_cumprod[t_start]
    y = (x_T - abar.sqrt() * MU) / (abar * S**2 + 1 - abar).sqrt()
    return MU + S * y


def smooth_model(z_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
    """A fixed, non-trivial stand-in for a trained network."""
    return torch.tanh(z_t + t.reshape(-1, 1, 1, 1) / 1000.0) * 0.9


@pytest.fixture
def z0() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(3), dtype=F64)


@pytest.fixture
def x_T() -> torch.Tensor:
    return torch.randn((8, 1, 16, 16), generator=torch.Generator().manual_seed(0), dtype=F64)


def test_timesteps_uniform_in_log_snr(schedule):
    abar = schedule.alphas_cumprod
    lam = 0.5 * torch.log(abar / (1 - abar))
    t = dpm_solver_timesteps(schedule, 20)
    assert t[0] == 999 and t[-1] == 0
    h = (lam[t[1:]] - lam[t[:-1]]).tolist()  # step sizes in λ
    h_ideal = (lam[0] - lam[999]).item() / 19
    assert all(x > 0 for x in h)
    # rounding to integer t only matters where λ moves fast (t ≤ 2: λ changes by > 0.1 per t)
    assert max(abs(x - h_ideal) for x in h[:-2]) < 0.05 * h_ideal
    assert dpm_solver_timesteps(schedule, 1) == [999]
    for n in (200, 999, 1000):  # rounding collisions resolved: always n distinct timesteps
        t = dpm_solver_timesteps(schedule, n)
        assert len(t) == n and all(a > b for a, b in pairwise(t)) and t[0] <= 999 and t[-1] == 0


@pytest.mark.parametrize("n_steps", [1, 5, 20])
def test_oracle_recovers_z0(schedule, z0, n_steps):
    eps_model, calls = oracle(schedule, z0)
    gen = torch.Generator().manual_seed(0)
    out = dpm_solver_sample(eps_model, SHAPE, "ctp", schedule, n_steps, generator=gen, dtype=F64)
    torch.testing.assert_close(out, z0, rtol=0, atol=1e-10)
    assert calls == dpm_solver_timesteps(schedule, n_steps)  # one call per step, noisiest first
    out32 = dpm_solver_sample(eps_model, SHAPE, "ctp", schedule, n_steps, generator=gen)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32, z0.float(), rtol=0, atol=5e-5)


def test_first_order_step_is_ddim(schedule):
    # DPM-Solver++(1) is DDIM η = 0 written in λ (Lu et al. 2022, §4): with 2 steps (999 → 0 → ᾱ = 1)
    # both orders make one first-order step and the final jump to ẑ_0
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=F64)

    def t(k: int) -> torch.Tensor:
        return torch.full((SHAPE[0],), k, dtype=torch.long)

    eps = smooth_model(x_T, t(999), None)
    a0 = schedule.alphas_cumprod[0]
    z_0 = a0.sqrt() * schedule.predict_z0(x_T, 999, eps) + (1 - a0).sqrt() * eps  # DDIM Eq. 12
    expected = schedule.predict_z0(z_0, 0, smooth_model(z_0, t(0), None))
    for order in (1, 2):
        out = dpm_solver_sample(
            smooth_model, SHAPE, None, schedule, 2, order=order, x_T=x_T, dtype=F64
        )
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_closer_to_the_ode_than_ddim(schedule, x_T):
    # the point of a second-order solver: at equal network calls it lands much nearer the exact
    # probability-flow ODE solution. Each sampler is measured against the ODE solution from its
    # own first timestep (DDIM's 20-step grid starts at t = 951, ours at 999).
    shape, eps_model = x_T.shape, gaussian_eps(schedule)

    def error(sampler, n_steps: int, t_start: int) -> float:
        out = sampler(eps_model, shape, None, schedule, n_steps, x_T=x_T, dtype=F64)
        return (out - ode_solution(schedule, x_T, t_start)).abs().max().item()

    err_dpm20 = error(dpm_solver_sample, 20, 999)
    err_ddim20 = error(ddim_sample, 20, schedule.ddim_timesteps(20)[-1].item())
    err_ddim200 = error(ddim_sample, 200, schedule.ddim_timesteps(200)[-1].item())
    # measured: 1.1e-2, 2.6e-1, 4.0e-2
    assert err_dpm20 < 0.1 * err_ddim20
    assert err_dpm20 < 0.5 * err_ddim200  # DDIM-200 quality (and better) in 20 steps


def test_second_order_convergence(fine_schedule, x_T):
    # halving h divides the error by ~4 for 2M and by ~2 for first order (DDIM)
    eps_model = gaussian_eps(fine_schedule)
    exact = ode_solution(fine_schedule, x_T, fine_schedule.n_timesteps - 1)

    def observed_orders(order: int) -> list[float]:
        samples = [
            dpm_solver_sample(
                eps_model, x_T.shape, None, fine_schedule, n, order=order, x_T=x_T, dtype=F64
            )
            for n in (20, 40, 80)
        ]
        errors = [(z - exact).abs().max().item() for z in samples]
        return [math.log2(a / b) for a, b in pairwise(errors)]

    orders_2m, orders_1 = observed_orders(2), observed_orders(1)  # measured: 1.96, 2.04; 0.99, 0.99
    assert all(1.7 < p < 2.4 for p in orders_2m), orders_2m
    assert all(0.8 < p < 1.2 for p in orders_1), orders_1


def test_deterministic(schedule):
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    a = dpm_solver_sample(smooth_model, SHAPE, None, schedule, 10, x_T=x_T)
    b = dpm_solver_sample(
        smooth_model, SHAPE, None, schedule, 10, x_T=x_T, generator=torch.Generator().manual_seed(9)
    )
    assert torch.equal(a, b) and not torch.equal(a, x_T)

    def run(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return dpm_solver_sample(smooth_model, SHAPE, None, schedule, 10, generator=gen)

    assert torch.equal(run(4), run(4))
    assert not torch.allclose(run(4), run(5))


def test_slices_of_a_batch_are_independent(schedule):
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    whole = dpm_solver_sample(smooth_model, SHAPE, None, schedule, 10, x_T=x_T)
    one = dpm_solver_sample(smooth_model, (1, *SHAPE[1:]), None, schedule, 10, x_T=x_T[1:2])
    torch.testing.assert_close(whole[1:2], one)


def test_per_row_generators_draw_each_row_s_z_T_on_its_own(schedule):
    """z_T from one generator per row does not depend on the rows drawn with it."""
    def gens(rows: range) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(20 + r) for r in rows]

    whole = dpm_solver_sample(smooth_model, SHAPE, None, schedule, 10, generator=gens(range(3)))
    last = dpm_solver_sample(smooth_model, (1, *SHAPE[1:]), None, schedule, 10, generator=gens(range(2, 3)))
    torch.testing.assert_close(whole[2:], last, rtol=0, atol=0)
    with pytest.raises(InputError, match="1 noise generators for 3 rows"):
        dpm_solver_sample(smooth_model, SHAPE, None, schedule, 10, generator=gens(range(1)))


def test_progress_called_once_per_step(schedule):
    seen = []
    dpm_solver_sample(
        smooth_model,
        SHAPE,
        None,
        schedule,
        20,
        progress=lambda s, n, info: seen.append((s, n, info["t"])),
    )
    assert [s for s, _, _ in seen] == list(range(1, 21))
    assert {n for _, n, _ in seen} == {20}
    assert [t for _, _, t in seen] == dpm_solver_timesteps(schedule, 20)


def test_cancel_stops_within_one_step(schedule):
    token = CancelToken()
    calls = []

    def eps_model(z_t, t, cond):
        calls.append(int(t[0]))
        if len(calls) == 3:
            token.cancel()  # as if the user clicked Cancel during the third network call
        return smooth_model(z_t, t, cond)

    with pytest.raises(Cancelled):
        dpm_solver_sample(eps_model, SHAPE, None, schedule, 20, cancel=token)
    assert len(calls) == 3

    calls.clear()
    with pytest.raises(Cancelled):
        dpm_solver_sample(eps_model, SHAPE, None, schedule, 20, cancel=token)
    assert calls == []


def test_bad_arguments(schedule):
    with pytest.raises(InputError, match="between 1 and 1000"):
        dpm_solver_sample(smooth_model, SHAPE, None, schedule, 0)
    with pytest.raises(InputError, match="between 1 and 1000"):
        dpm_solver_sample(smooth_model, SHAPE, None, schedule, 1001)
    with pytest.raises(InputError, match="order"):
        dpm_solver_sample(smooth_model, SHAPE, None, schedule, 10, order=3)
    with pytest.raises(InputError, match="x_T has shape"):
        dpm_solver_sample(smooth_model, SHAPE, None, schedule, 10, x_T=torch.zeros(1, 3, 8, 6))
