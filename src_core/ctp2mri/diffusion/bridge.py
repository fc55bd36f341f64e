"""Brownian-bridge diffusion between two latents (BBDM, Li et al., CVPR 2023).

The process runs from the clean target latent x_0 (t = 0) to the condition's latent y
(t = T) instead of to pure noise. With m_t = t/T and the variance
δ_t = 2s (m_t − m_t²) (BBDM's ``max_var`` s, 1 by default: δ peaks at s/2 mid-way and
vanishes at both ends), the marginal of the forward process is

    q(x_t | x_0, y) = N((1 − m_t) x_0 + m_t y, δ_t I),

so x_0 and x_T = y are both exact, noise-free ends. The network predicts BBDM's "grad"
objective, the difference between the state and the clean latent,

    x_t − x_0 = m_t (y − x_0) + √δ_t ε,

trained with an L1 (BBDM's configuration) or L2 loss. Sampling starts from y and walks the
bridge back in ``n`` skipped steps (`bridge_sample`, BBDM's accelerated sampler).

Timestep convention
-------------------
Unlike `ctp2mri.diffusion.NoiseSchedule` (0-based, CompVis), t here is the bridge's own
index t ∈ {0, …, T} with m_t = t/T exactly as the BBDM paper writes it: t = 0 is x_0,
t = T is y, training draws t ∈ {1, …, T}. BBDM's code instead uses T values of m spaced
from 0.001 to 0.999 to stay clear of 0/0 at the ends; here the two ends are handled in
closed form (see `BrownianBridge.posterior_variance` and `bridge_step`), so m reaches 0 and 1.

Like the noise schedule, the bridge knows nothing of the network.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ctp2mri.diffusion.noise import NoiseSource, check_noise_source, standard_normal
from ctp2mri.errors import InputError
from ctp2mri.progress import CancelToken, ProgressCallback

__all__ = ["BRIDGE_LOSSES", "BrownianBridge", "ObjectiveModel", "bridge_loss", "bridge_sample", "bridge_step"]

Timestep = int | torch.Tensor
#: ``objective_model(x_t, t, cond) -> x_t − x̂_0``: x_t (B, C, h, w), t a long tensor (B,).
ObjectiveModel = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
#: Latent losses of the bridge objective: BBDM's configurations train with ``l1``.
BRIDGE_LOSSES = ("l1", "l2")


class BrownianBridge:
    """The bridge's schedule: m_t = t/T and δ_t = 2s (m_t − m_t²) for t = 0 … T.

    Arrays are float64 (exact to ~1e-15) and cast to the latents' dtype when applied.

    Parameters
    ----------
    n_timesteps
        T (1000 in BBDM).
    max_var
        s, BBDM's ``max_var``: δ_t = 2s·m_t(1 − m_t), at most s/2 (at t = T/2).
    device
        Where the arrays live.

    Attributes
    ----------
    m, variance
        m_t and δ_t, float64 tensors of length T + 1 (index t).
    """

    def __init__(self, n_timesteps: int = 1000, max_var: float = 1.0,
                 device: torch.device | str | None = None) -> None:
        if int(n_timesteps) < 1:
            raise InputError(f"a Brownian bridge needs at least 1 timestep, got {n_timesteps}")
        if not float(max_var) > 0:
            raise InputError(f"the bridge's max_var s must be > 0, got {max_var}")
        self.n_timesteps = int(n_timesteps)
        self.max_var = float(max_var)
        self.m = (torch.arange(self.n_timesteps + 1, dtype=torch.float64) / self.n_timesteps).to(device)
        self.variance = 2.0 * self.max_var * (self.m - self.m**2)

    # -- configuration -------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.m.device

    def to(self, device: torch.device | str) -> BrownianBridge:
        """The same bridge with its arrays on ``device`` (a new object)."""
        return BrownianBridge(self.n_timesteps, self.max_var, device=device)

    def config(self) -> dict[str, Any]:
        """JSON-serialisable description, for a checkpoint's ``config.json``."""
        return {"process": "brownian_bridge", "n_timesteps": self.n_timesteps, "mt_type": "linear",
                "max_var": self.max_var, "objective": "grad"}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BrownianBridge:
        if config.get("process") != "brownian_bridge":
            raise InputError(f"the model config's schedule is {config.get('process')!r}, not a Brownian bridge; "
                             "the checkpoint is not a cBBDM")
        if config.get("mt_type", "linear") != "linear" or config.get("objective", "grad") != "grad":
            raise InputError(f"unsupported bridge settings {config}: only mt_type 'linear' and objective 'grad' "
                             "are implemented")
        return cls(config["n_timesteps"], config.get("max_var", 1.0))

    def __repr__(self) -> str:
        return f"BrownianBridge(n_timesteps={self.n_timesteps}, max_var={self.max_var}, device={str(self.device)!r})"

    # -- forward process -------------------------------------------------------------------
    def _coef(self, values: torch.Tensor, t: Timestep, like: torch.Tensor) -> torch.Tensor:
        """``values[t]`` shaped to broadcast over a (B, C, H, W) batch, in ``like``'s dtype."""
        t = torch.as_tensor(t, device=values.device, dtype=torch.long)
        if bool(((t < 0) | (t > self.n_timesteps)).any()):
            raise InputError(f"bridge timesteps run from 0 to {self.n_timesteps}; got {t.tolist()}")
        coef = values[t]
        if coef.ndim == 1:
            coef = coef.reshape(-1, *([1] * (like.ndim - 1)))
        return coef.to(device=like.device, dtype=like.dtype)

    def mean(self, x0: torch.Tensor, y: torch.Tensor, t: Timestep) -> torch.Tensor:
        """E[x_t | x_0, y] = (1 − m_t) x_0 + m_t y."""
        m = self._coef(self.m, t, x0)
        return (1.0 - m) * x0 + m * y

    def q_sample(self, x0: torch.Tensor, y: torch.Tensor, t: Timestep, noise: torch.Tensor) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0, y) in one jump: x_t = (1 − m_t) x_0 + m_t y + √δ_t ε.

        Parameters
        ----------
        x0, y
            Target latent and bridge endpoint, (B, C, h, w).
        t
            One timestep for the batch (int) or one per element (long tensor (B,)), in 0 … T.
        noise
            ε ~ N(0, I), shaped like ``x0``.
        """
        return self.mean(x0, y, t) + self._coef(self.variance.sqrt(), t, x0) * noise

    def objective(self, x0: torch.Tensor, y: torch.Tensor, t: Timestep, noise: torch.Tensor) -> torch.Tensor:
        """BBDM's "grad" training target m_t (y − x_0) + √δ_t ε, which equals x_t − x_0."""
        m = self._coef(self.m, t, x0)
        return m * (y - x0) + self._coef(self.variance.sqrt(), t, x0) * noise

    def predict_x0(self, x_t: torch.Tensor, t: Timestep, objective_hat: torch.Tensor) -> torch.Tensor:
        """One-step estimate of the clean latent: x̂_0 = x_t − ô, ô the network's output.

        Derivation: the forward process gives x_t = (1 − m_t) x_0 + m_t y + √δ_t ε
        = x_0 + [m_t (y − x_0) + √δ_t ε], and the bracket is exactly the "grad" objective
        the network is trained to predict (`objective`). Hence x_0 = x_t − objective, and
        replacing the objective by its prediction ô = ô_θ(x_t, t, y) gives
        x̂_0 = x_t − ô. It holds at every t (m_t = 1 at t = T included) and needs no
        division, so unlike Eq. 5's ẑ_0 = (z_t − √(1 − ᾱ_t) ε̂)/√ᾱ_t of the cLDM it does not
        amplify the network's error at large t. It is exact when ô equals the true
        objective, is differentiable in ô (post-training decodes it, `ctp2mri.training.bbdm`)
        and is the "x0_recon" of BBDM's sampler. ``t`` is unused, kept for the signature of
        `NoiseSchedule.predict_z0`.
        """
        del t
        return x_t - objective_hat

    def posterior_variance(self, t: int, s: int) -> float:
        """Variance δ̃_{s|t} of q(x_s | x_t, x_0, y) for s < t (skipped steps, BBDM's sampler).

        BBDM computes it as δ_{t|s} δ_s / δ_t with δ_{t|s} = δ_t − δ_s (1 − m_t)²/(1 − m_s)²,
        which is 0/0 at t = T (δ_T = 0). Substituting δ = 2s m(1 − m) it simplifies to
        2s·m_s (m_t − m_s)/m_t, finite everywhere: δ_s at t = T (x_T = y says nothing about
        the noise), 0 at s = 0.
        """
        if not 0 <= s < t <= self.n_timesteps:
            raise InputError(f"the posterior needs 0 <= s < t <= {self.n_timesteps}; got s={s}, t={t}")
        m_t, m_s = float(self.m[t]), float(self.m[s])
        return 2.0 * self.max_var * m_s * (m_t - m_s) / m_t

    # -- sampling discretisation ----------------------------------------------------------
    def random_timesteps(self, n: int, generator: torch.Generator | None = None,
                         device: torch.device | str | None = None) -> torch.Tensor:
        """Training timesteps t ~ U{1, …, T} (t = 0 is the clean latent itself)."""
        return torch.randint(1, self.n_timesteps + 1, (int(n),), generator=generator,
                             device=device if device is not None else self.device)

    def sample_timesteps(self, n_steps: int) -> list[int]:
        """The ``n_steps`` timesteps the sampler visits, descending from T to 1.

        t_k = T − ⌊k (T − 1)/(n − 1)⌋ for k = 0 … n − 1 (T alone for n = 1): BBDM's "linear"
        skip sampling, whose network calls likewise start at m = max and end at the smallest
        m before the clean latent. BBDM builds the list as ``arange(T−1, 1, −(T−1)/(n−2))``
        plus {1, 0}, which repeats a step when n > T/2; this spacing never does.
        """
        T = self.n_timesteps
        if not 1 <= int(n_steps) <= T:
            raise InputError(f"the number of bridge sampling steps must be between 1 and {T}, got {n_steps} "
                             "(BBDM samples with 200)")
        n = int(n_steps)
        if n == 1:
            return [T]
        return [T - (k * (T - 1)) // (n - 1) for k in range(n)]


def bridge_loss(target: torch.Tensor, prediction: torch.Tensor, loss_type: str = "l1") -> torch.Tensor:
    """The bridge's latent objective ‖m_t(y − x_0) + √δ_t ε − ô_θ(x_t, t, y)‖, mean over elements.

    ``l1`` is BBDM's configured loss, ``l2`` the squared error of Eq. 4's form. Computed in
    float32 even under autocast.
    """
    if loss_type not in BRIDGE_LOSSES:
        raise InputError(f"unknown bridge loss {loss_type!r}; choose one of {', '.join(BRIDGE_LOSSES)}")
    diff = prediction.float() - target.float()
    return diff.abs().mean() if loss_type == "l1" else diff.square().mean()


def bridge_step(bridge: BrownianBridge, x_t: torch.Tensor, t: int, s: int, x0_hat: torch.Tensor,
                y: torch.Tensor, eta: float = 1.0, noise: torch.Tensor | None = None) -> torch.Tensor:
    """One skipped step x_t → x_s (s < t) of BBDM's sampler, given the estimate x̂_0.

    x_s = (1 − m_s) x̂_0 + m_s y + √(δ_s − σ²) ε̂ + σ z, with ε̂ = (x_t − (1 − m_t) x̂_0 − m_t y)/√δ_t
    the noise x_t implies and σ² = η² δ̃_{s|t} (`BrownianBridge.posterior_variance`).
    Written this way it is BBDM's ``p_sample`` (its ``√((δ_s − σ²)/δ_t)·(x_t − …)``):
    η = 1 is the exact posterior q(x_s | x_t, x̂_0, y), η = 0 the deterministic,
    DDIM-like step; for every η the marginal q(x_s | x_0, y) is kept when x̂_0 = x_0 and
    t < T. At t = T the state y carries no noise (δ_T = 0), so ε̂ = 0 there and the step's
    spread is σ = η √δ_s: η = 1 restores the full marginal, η = 0 follows the mean.

    Parameters
    ----------
    noise
        z ~ N(0, I) shaped like ``x_t``; needed when η > 0 and s > 0.
    """
    m_t, m_s = float(bridge.m[t]), float(bridge.m[s])
    d_t, d_s = float(bridge.variance[t]), float(bridge.variance[s])
    sigma2 = float(eta) ** 2 * bridge.posterior_variance(t, s)
    x_s = (1.0 - m_s) * x0_hat + m_s * y  # mean of q(x_s | x̂_0, y)
    if d_t > 0 and d_s - sigma2 > 0:
        eps_hat = (x_t - (1.0 - m_t) * x0_hat - m_t * y) / d_t**0.5  # noise implied by x_t
        x_s = x_s + (d_s - sigma2) ** 0.5 * eps_hat
    if sigma2 > 0:
        if noise is None:
            raise InputError("a stochastic bridge step (eta > 0) needs noise")
        x_s = x_s + sigma2**0.5 * noise
    return x_s


@torch.no_grad()
def bridge_sample(
    objective_model: ObjectiveModel,
    y: torch.Tensor,
    cond: Any,
    bridge: BrownianBridge,
    n_steps: int = 200,
    eta: float = 1.0,
    *,
    generator: NoiseSource = None,
    clip_x0: float | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> torch.Tensor:
    """Draw x_0 ~ p_θ(x_0 | y) by walking the bridge back from x_T = y (BBDM's sampler).

    At each visited t (`BrownianBridge.sample_timesteps`) the network's objective gives the
    one-step estimate x̂_0 = x_t − ô_θ(x_t, t, cond) (`BrownianBridge.predict_x0`), and
    `bridge_step` moves to the next visited timestep s (0 after the last), returning x̂_0
    of the final step.

    Parameters
    ----------
    objective_model
        ``objective_model(x_t, t, cond) -> ô`` with ``t`` a long tensor (B,); the cBBDM, or
        an oracle in tests. Called once per step.
    y
        The bridge's endpoint x_T, (B, C, h, w): the condition's latent.
    cond
        Passed unchanged to ``objective_model``.
    bridge
        The schedule the model was trained with.
    n_steps
        Network calls, 1 … T (BBDM samples with 200).
    eta
        η ≥ 0: 0 is deterministic (the result depends on y alone), 1 BBDM's default posterior.
    generator
        Source of the η > 0 noise: one generator, or one per batch row (then a row's noise
        does not depend on the batch it is sampled in, see `ctp2mri.diffusion.noise`).
    clip_x0
        Clamp x̂_0 to ±clip_x0 at every step (off by default; latents are not bounded).
    progress, cancel
        ``progress(step, n_steps, {"t": t})`` after each step; ``cancel`` checked before each.

    Returns
    -------
    torch.Tensor
        x_0, shaped like ``y``.
    """
    if eta < 0:
        raise InputError(f"the bridge sampler's eta must be >= 0 (0 = deterministic, 1 = BBDM), got {eta}")
    check_noise_source(generator, y.shape[0])
    timesteps = bridge.sample_timesteps(n_steps)
    x = y.clone()  # x_T = y: the bridge starts exactly at the condition's latent
    x0_hat = x
    for i, t in enumerate(timesteps):
        if cancel is not None:
            cancel.raise_if_cancelled()
        s = timesteps[i + 1] if i + 1 < len(timesteps) else 0  # next visited timestep
        objective = objective_model(x, torch.full((y.shape[0],), t, device=y.device, dtype=torch.long), cond)
        x0_hat = bridge.predict_x0(x, t, objective)  # x̂_0 = x_t − ô
        if clip_x0 is not None:
            x0_hat = x0_hat.clamp(-clip_x0, clip_x0)
        if s == 0:
            x = x0_hat  # m_0 = δ_0 = 0: the step to t = 0 lands on x̂_0 itself
        else:
            noise = standard_normal(y.shape, generator, y.device, y.dtype) if eta > 0 else None
            x = bridge_step(bridge, x, t, s, x0_hat, y, eta, noise)
        if progress is not None:
            progress(i + 1, len(timesteps), {"t": t})
    return x
