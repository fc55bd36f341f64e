"""The Brownian bridge (BBDM) against its formulas: schedule, forward process, objective,
one-step estimate, skipped-step posterior and sampler."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from ctp2mri.diffusion import BrownianBridge, bridge_loss, bridge_sample, bridge_step
from ctp2mri.errors import Cancelled, InputError
from ctp2mri.progress import CancelToken

pytestmark = pytest.mark.usefixtures("one_thread")

T = 1000


@pytest.fixture(scope="module")
def bridge() -> BrownianBridge:
    return BrownianBridge(T)


def _pair(n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, 3, 6, 7), generator=g, dtype=torch.float64), \
        torch.randn((n, 3, 6, 7), generator=g, dtype=torch.float64)


def test_schedule_is_linear_m_and_bbdm_variance():
    for s in (1.0, 0.5):
        b = BrownianBridge(T, max_var=s)
        assert b.m.dtype == torch.float64 and b.m.shape == (T + 1,)
        for t in (0, 1, 250, 500, 999, 1000):
            m = t / T
            assert b.m[t].item() == pytest.approx(m, abs=1e-15)
            assert b.variance[t].item() == pytest.approx(2 * s * (m - m * m), abs=1e-15)
        assert b.variance[0] == 0 and b.variance[T] == 0  # both ends are noise-free
        assert b.variance.max().item() == pytest.approx(s / 2) and int(b.variance.argmax()) == T // 2


@pytest.mark.parametrize("t", [0, T // 2, T])
def test_forward_process_mean_and_variance_monte_carlo(bridge, t):
    """q(x_t | x0, y) = N((1 − m_t) x0 + m_t y, δ_t): sample mean and variance of 20 000 draws."""
    n = 20_000  # draws, as rows of one batch
    x0 = torch.tensor([1.5, -0.5], dtype=torch.float64).reshape(1, 2, 1, 1).expand(n, 2, 1, 1)
    y = torch.tensor([-2.0, 3.0], dtype=torch.float64).reshape(1, 2, 1, 1).expand(n, 2, 1, 1)
    noise = torch.randn((n, 2, 1, 1), generator=torch.Generator().manual_seed(t), dtype=torch.float64)
    draws = bridge.q_sample(x0, y, t, noise)
    m = t / T
    delta = 2 * (m - m * m)
    mean = ((1 - m) * x0 + m * y)[0]
    torch.testing.assert_close(bridge.mean(x0, y, t)[0], mean, rtol=0, atol=1e-15)
    # standard error of the mean √(δ/n) ≤ 0.0036; of the variance δ√(2/n) ≤ 0.005
    torch.testing.assert_close(draws.mean(0), mean, rtol=0, atol=0.02)
    torch.testing.assert_close(draws.var(0), torch.full_like(mean, delta), rtol=0, atol=0.03)
    if t in (0, T):  # noise-free ends: exactly x0 and exactly y
        torch.testing.assert_close(draws, x0 if t == 0 else y, rtol=0, atol=0)


def test_forward_process_closed_form_per_element_timesteps(bridge):
    x0, y = _pair()
    t = torch.tensor([0, 1, T // 2, T])
    eps = torch.randn_like(x0)
    m = (t.double() / T).reshape(-1, 1, 1, 1)
    expected = (1 - m) * x0 + m * y + torch.sqrt(2 * (m - m * m)) * eps
    torch.testing.assert_close(bridge.q_sample(x0, y, t, eps), expected, rtol=0, atol=1e-12)


def test_objective_is_state_minus_clean_latent_and_one_step_estimate_is_exact(bridge):
    """The "grad" target m_t(y − x0) + √δ_t ε equals x_t − x0, so x̂0 = x_t − target is x0."""
    x0, y = _pair(seed=1)
    for t in (1, 17, T // 2, T - 1, T):
        eps = torch.randn_like(x0)
        x_t = bridge.q_sample(x0, y, t, eps)
        target = bridge.objective(x0, y, t, eps)
        m = t / T
        torch.testing.assert_close(target, m * (y - x0) + math.sqrt(2 * (m - m * m)) * eps, rtol=0, atol=1e-12)
        torch.testing.assert_close(bridge.predict_x0(x_t, t, target), x0, rtol=0, atol=1e-12)
    # differentiable in the network output, with ∂x̂0/∂ô = −1
    out = torch.zeros_like(x0, requires_grad=True)
    bridge.predict_x0(x0, 3, out).sum().backward()
    assert torch.equal(out.grad, -torch.ones_like(x0))


def test_posterior_variance_is_bbdm_formula_and_finite_at_the_ends(bridge):
    for t, s in ((500, 495), (800, 200), (2, 1), (999, 10)):
        m_t, m_s = t / T, s / T
        d_t, d_s = 2 * (m_t - m_t**2), 2 * (m_s - m_s**2)
        d_ts = d_t - d_s * ((1 - m_t) / (1 - m_s)) ** 2  # BBDM's variance_t_tminus
        assert bridge.posterior_variance(t, s) == pytest.approx(d_ts * d_s / d_t, rel=1e-10)
    assert bridge.posterior_variance(T, 400) == pytest.approx(bridge.variance[400].item(), rel=1e-12)
    assert bridge.posterior_variance(300, 0) == 0
    with pytest.raises(InputError):
        bridge.posterior_variance(10, 10)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_skipped_step_keeps_the_marginal_given_the_true_x0(bridge, eta):
    """x_t ~ q(x_t | x0, y) stepped to s with x̂0 = x0 is distributed as q(x_s | x0, y)."""
    x0 = torch.tensor([[[[1.0]]]], dtype=torch.float64).expand(20_000, 1, 1, 1)
    y = torch.full_like(x0, -1.0)
    g = torch.Generator().manual_seed(3)
    t, s = 700, 350
    x_t = bridge.q_sample(x0, y, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    x_s = bridge_step(bridge, x_t, t, s, x0, y, eta, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    m_s = s / T
    assert x_s.mean().item() == pytest.approx((1 - m_s) * 1.0 + m_s * -1.0, abs=0.02)
    assert x_s.var().item() == pytest.approx(2 * (m_s - m_s**2), abs=0.03)


def test_sample_timesteps_span_t_to_one(bridge):
    steps = bridge.sample_timesteps(200)
    assert len(steps) == 200 and steps[0] == T and steps[-1] == 1
    assert all(a > b for a, b in itertools.pairwise(steps))
    assert bridge.sample_timesteps(1) == [T] and bridge.sample_timesteps(2) == [T, 1]
    assert bridge.sample_timesteps(T) == list(range(T, 0, -1))
    with pytest.raises(InputError, match="between 1 and 1000"):
        bridge.sample_timesteps(0)


class Recorder:
    """An objective network that records its inputs; ``x0`` given: the oracle x_t − x0."""

    def __init__(self, x0: torch.Tensor | None = None):
        self.x0, self.calls = x0, []

    def __call__(self, x, t, cond):
        self.calls.append((x.clone(), t.clone()))
        if self.x0 is not None:
            return x - self.x0
        return 0.1 * x + 0.05 * cond  # some deterministic network


def test_sampler_starts_from_y_and_visits_the_timesteps(bridge):
    _, y = _pair(2, seed=4)
    y = y.float()
    net = Recorder()
    out = bridge_sample(net, y, y, bridge, n_steps=5, eta=0.0)
    assert out.shape == y.shape and out.dtype == y.dtype
    assert torch.equal(net.calls[0][0], y)  # x_T = y exactly
    assert [int(t[0]) for _, t in net.calls] == bridge.sample_timesteps(5)
    assert all(t.shape == (2,) for _, t in net.calls)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sampler_with_the_oracle_returns_the_clean_latent(bridge, eta):
    x0, y = _pair(3, seed=5)
    out = bridge_sample(Recorder(x0), y, None, bridge, n_steps=7, eta=eta,
                        generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-10)


def test_sampler_is_deterministic_at_eta_zero_and_seeded_above(bridge):
    _, y = _pair(2, seed=6)
    y = y.float()
    a = bridge_sample(Recorder(), y, y, bridge, n_steps=4, eta=0.0)
    assert torch.equal(a, bridge_sample(Recorder(), y, y, bridge, n_steps=4, eta=0.0))
    gens = lambda seed: [torch.Generator().manual_seed(seed + i) for i in range(2)]
    b = bridge_sample(Recorder(), y, y, bridge, n_steps=4, eta=1.0, generator=gens(0))
    assert torch.equal(b, bridge_sample(Recorder(), y, y, bridge, n_steps=4, eta=1.0, generator=gens(0)))
    assert not torch.allclose(b, a) and not torch.allclose(b, bridge_sample(Recorder(), y, y, bridge, 4, 1.0,
                                                                            generator=gens(9)))
    # a row's noise comes from its own generator: row 1 alone equals row 1 of the batch
    alone = bridge_sample(Recorder(), y[1:], y[1:], bridge, n_steps=4, eta=1.0, generator=gens(0)[1:])
    torch.testing.assert_close(alone, b[1:], rtol=0, atol=1e-6)


def test_sampler_progress_cancel_and_bad_settings(bridge):
    _, y = _pair(1)
    calls = []
    bridge_sample(Recorder(), y, y, bridge, n_steps=3, eta=0.0, progress=lambda *a: calls.append(a))
    assert [(c[0], c[1]) for c in calls] == [(1, 3), (2, 3), (3, 3)] and calls[0][2]["t"] == T
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        bridge_sample(Recorder(), y, y, bridge, n_steps=3, cancel=token)
    with pytest.raises(InputError, match="eta"):
        bridge_sample(Recorder(), y, y, bridge, n_steps=3, eta=-1)
    with pytest.raises(InputError, match="generators"):
        bridge_sample(Recorder(), y, y, bridge, n_steps=3, eta=1.0, generator=[torch.Generator()] * 3)


def test_loss_config_round_trip_and_refusals(bridge):
    a, b = torch.zeros(2, 3), torch.full((2, 3), 2.0)
    assert bridge_loss(a, b, "l1").item() == 2.0 and bridge_loss(a, b, "l2").item() == 4.0
    with pytest.raises(InputError, match="l1"):
        bridge_loss(a, b, "huber")
    again = BrownianBridge.from_config(BrownianBridge(500, max_var=0.5).config())
    assert again.n_timesteps == 500 and again.max_var == 0.5
    with pytest.raises(InputError, match="not a Brownian bridge"):
        BrownianBridge.from_config({"n_timesteps": 1000, "beta_schedule": "linear"})
    with pytest.raises(InputError):
        BrownianBridge(0)
    with pytest.raises(InputError, match="0 to 1000"):
        bridge.q_sample(a, a, 1001, a)
