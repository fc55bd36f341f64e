"""The forward-process noise schedule of the conditional LDM (paper §2.1, Eq. 1, 2 and 5).

Timestep convention
-------------------
A timestep ``t`` is a 0-based index into the length-T arrays, as in CompVis LDM (training
draws ``t ∈ {0, …, T−1}``) and MONAI: ``alphas_cumprod[t]`` is the paper's
ᾱ_{t+1} = ∏_{i=1}^{t+1} α_i. The network's time embedding sees the same integer, so a
model trained here and one trained with the official code agree on what ``t`` means.
The clean latent z_0 (ᾱ = 1) has no index; DDIM reaches it after its last step.
"""

from __future__ import annotations

from typing import Any, Union

import torch

from ctp2mri.errors import InputError

Timestep = Union[int, torch.Tensor]


class NoiseSchedule:
    """CompVis "linear" schedule: √β_t linear from √β_start to √β_end over T steps.

    Holds only the schedule: it knows nothing of the network. All arrays are
    computed and kept in float64 so that the per-step coefficients are exact to ~1e-15; they
    are cast to the working dtype of the latents only when applied.

    Parameters
    ----------
    n_timesteps
        T, the number of forward steps (1000 in the paper).
    beta_start, beta_end
        β_1 and β_T (0.0015 and 0.0195 in the official config).
    device
        Where the arrays live (the latents' device).

    Attributes
    ----------
    betas, alphas, alphas_cumprod
        β_t, α_t = 1 − β_t and ᾱ_t = ∏ α_i, float64 tensors of length T.
    """

    def __init__(
        self,
        n_timesteps: int = 1000,
        beta_start: float = 0.0015,
        beta_end: float = 0.0195,
        device: torch.device | str | None = None,
    ) -> None:
        if n_timesteps < 1:
            raise InputError(f"a noise schedule needs at least 1 timestep, got {n_timesteps}")
        if not 0.0 < beta_start <= beta_end < 1.0:
            raise InputError(
                f"β must satisfy 0 < beta_start <= beta_end < 1, got {beta_start} and {beta_end}"
            )
        self.n_timesteps = int(n_timesteps)
        self.beta_start = float(beta_start)
        self.beta_end = float(beta_end)
        sqrt_betas = torch.linspace(
            beta_start**0.5, beta_end**0.5, n_timesteps, dtype=torch.float64
        )
        self.betas = (sqrt_betas**2).to(device)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

    # -- configuration -------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.betas.device

    def to(self, device: torch.device | str) -> "NoiseSchedule":
        """The same schedule with its arrays on ``device`` (a new object; this one is unchanged)."""
        return NoiseSchedule(self.n_timesteps, self.beta_start, self.beta_end, device=device)

    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments, for a checkpoint's ``config.json``."""
        return {
            "n_timesteps": self.n_timesteps,
            "beta_schedule": "linear",
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "NoiseSchedule":
        kind = config.get("beta_schedule", "linear")
        if kind != "linear":
            raise InputError(
                f"unknown beta_schedule {kind!r} in the model config; only 'linear' is supported"
            )
        return cls(config["n_timesteps"], config["beta_start"], config["beta_end"])

    def __repr__(self) -> str:
        return (
            f"NoiseSchedule(n_timesteps={self.n_timesteps}, beta_start={self.beta_start}, "
            f"beta_end={self.beta_end}, device={str(self.device)!r})"
        )

    # -- Eq. 2 and Eq. 5 -----------------------------------------------------------------

    def _coef(self, values: torch.Tensor, t: Timestep, like: torch.Tensor) -> torch.Tensor:
        """``values[t]`` shaped to broadcast over a (B, C, H, W) batch, in ``like``'s dtype."""
        t = torch.as_tensor(t, device=values.device, dtype=torch.long)
        coef = values[t]
        if coef.ndim == 1:  # one timestep per batch element
            coef = coef.reshape(-1, *([1] * (like.ndim - 1)))
        return coef.to(device=like.device, dtype=like.dtype)

    def q_sample(self, z0: torch.Tensor, t: Timestep, noise: torch.Tensor) -> torch.Tensor:
        """Diffuse z_0 to z_t in one jump (Eq. 2): z_t = √ᾱ_t z_0 + √(1 − ᾱ_t) ε.

        Parameters
        ----------
        z0
            Clean latents, shape (B, C, H, W).
        t
            One timestep for the whole batch (int) or one per element (long tensor, shape (B,)).
        noise
            ε ~ N(0, I), same shape as ``z0``.
        """
        sqrt_abar = self._coef(self.alphas_cumprod.sqrt(), t, z0)
        sqrt_one_minus_abar = self._coef((1.0 - self.alphas_cumprod).sqrt(), t, z0)
        return sqrt_abar * z0 + sqrt_one_minus_abar * noise

    def predict_z0(self, z_t: torch.Tensor, t: Timestep, eps_hat: torch.Tensor) -> torch.Tensor:
        """The one-step estimate of the clean latent (Eq. 5): ẑ_0 = (z_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t.

        Differentiable in ``eps_hat``: post-training decodes ẑ_0 and back-propagates the image
        and lesion losses (Eq. 6–7) through it to the UNet. DDIM uses the same estimate as its
        "predicted z_0" (Song et al., Eq. 12). Exactly inverts :meth:`q_sample` when ε̂ = ε.

        Parameters
        ----------
        z_t
            Noisy latents, shape (B, C, H, W).
        t
            One timestep for the whole batch (int) or one per element (long tensor, shape (B,)).
        eps_hat
            The network's noise estimate ε_θ(z_t, t, c̃), same shape as ``z_t``.
        """
        sqrt_abar = self._coef(self.alphas_cumprod.sqrt(), t, z_t)
        sqrt_one_minus_abar = self._coef((1.0 - self.alphas_cumprod).sqrt(), t, z_t)
        return (z_t - sqrt_one_minus_abar * eps_hat) / sqrt_abar

    # -- DDIM discretisation -------------------------------------------------------------

    def ddim_timesteps(self, n_steps: int) -> torch.Tensor:
        """The ``n_steps`` timesteps DDIM visits, ascending (long tensor on the schedule's device).

        t_k = ⌊k·T/n⌋ + 1 for k = 0 … n−1. When n divides T (the paper's 200 included) this is
        exactly the official code's "uniform" discretisation, ``arange(n) * (T // n) + 1``
        (200 steps: 1, 6, …, 996): the +1 makes the last DDIM step start from ᾱ of index 1 and
        step down to the clean latent. For other n it still spans the whole chain with exactly n
        steps, where ``arange(n) * (T // n) + 1`` would stop short (n = 300 → top 898, not 998).
        For n = T the +1 would index past the end (the official code then silently drops a
        step), so the full chain 0 … T−1 is used.
        """
        T = self.n_timesteps
        if not 1 <= int(n_steps) <= T:
            raise InputError(
                f"the number of DDIM steps must be between 1 and {T}, got {n_steps} "
                "(the paper samples with 200)"
            )
        n = int(n_steps)
        offset = 1 if n < T else 0
        k = torch.arange(n, dtype=torch.long)
        return ((k * T) // n + offset).to(self.device)
