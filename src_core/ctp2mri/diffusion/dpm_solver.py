"""DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): the fast sampler of the conditional LDM.

A second-order multistep solver of the probability-flow ODE in the data-prediction (x_0)
parameterisation, for the same discrete-time ε-prediction network that DDIM samples. With
α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t) and λ_t = log(α_t / σ_t), one step from t to s (h = λ_s − λ_t) is

    z_s = (σ_s / σ_t) z_t − α_s (e^{−h} − 1) D,

with D = ẑ_0(z_t) for the first-order step (which *is* deterministic DDIM) and, in 2M, D
extrapolated linearly in λ from the last two ẑ_0's: D = (1 + 1/(2r)) ẑ_0(z_t) − 1/(2r) ẑ_0(z_prev),
r = h_prev / h.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ctp2mri.diffusion.ddim import EpsModel
from ctp2mri.diffusion.noise import NoiseSource, check_noise_source, standard_normal
from ctp2mri.diffusion.schedule import NoiseSchedule
from ctp2mri.errors import InputError
from ctp2mri.progress import CancelToken, ProgressCallback


def dpm_solver_timesteps(schedule: NoiseSchedule, n_steps: int) -> list[int]:
    """``n_steps`` distinct timesteps from T − 1 down to 0, uniform in λ_t = log(√ᾱ_t / √(1 − ᾱ_t)).

    Uniform-λ steps (Lu et al. 2022, "logSNR" skip type) keep h constant, which is what the
    solver's error bound is stated in. DDIM's uniform-in-t steps do not suit it with the linear
    β schedule: their last interval (t = 51 → 1 at 20 steps) spans h ≈ 1.7 after steps of
    h ≈ 0.4, and the 2M extrapolation over it overshoots (tests: Gaussian data). Each λ is
    rounded to the nearest integer timestep, the only ones a discrete-time model knows; where
    rounding would repeat a timestep (near t = 0, where λ moves fastest, or for n_steps near T)
    the next free one is taken, so there are always exactly ``n_steps`` network calls.
    """
    T = schedule.n_timesteps
    n = int(n_steps)
    if not 1 <= n <= T:
        raise InputError(
            f"the number of DPM-Solver++ steps must be between 1 and {T}, got {n_steps}"
        )
    abar = schedule.alphas_cumprod.cpu().double()
    lam = 0.5 * torch.log(abar / (1.0 - abar))  # λ_t, decreasing in t
    target = torch.linspace(lam[T - 1].item(), lam[0].item(), n, dtype=torch.float64)
    above = torch.searchsorted(-lam, -target).clamp(1, T - 1)  # λ[above − 1] ≥ target ≥ λ[above]
    nearer_below = (lam[above - 1] - target) < (target - lam[above])
    t = torch.where(nearer_below, above - 1, above).tolist()
    t = [min(max(t_k, n - 1 - k), T - 1 - k) for k, t_k in enumerate(t)]  # room for the rest
    for k in range(n - 2, -1, -1):
        t[k] = max(t[k], t[k + 1] + 1)  # strictly decreasing
    return t


@torch.no_grad()
def dpm_solver_sample(
    eps_model: EpsModel,
    shape: Sequence[int],
    cond: Any,
    schedule: NoiseSchedule,
    n_steps: int = 20,
    *,
    order: int = 2,
    generator: NoiseSource = None,
    x_T: torch.Tensor | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Draw z_0 ~ p_θ(z_0 | c̃) with DPM-Solver++(2M) from z_T ~ N(0, I); deterministic given z_T.

    The ``n_steps`` timesteps are uniform in λ (:func:`dpm_solver_timesteps`), so every step
    has about the same h. The first step is first order (there is no previous ẑ_0 yet); the
    last goes from t = 0 to ᾱ = 1 (σ = 0, λ = ∞), where a linear extrapolation in λ is
    unbounded, so it is first order too ("lower_order_final") and returns the last ẑ_0, as
    DDIM's last step does.

    Parameters
    ----------
    eps_model
        ``eps_model(z_t, t, cond) -> ε̂`` with ``t`` a long tensor of shape (B,); called once
        per step.
    shape
        (B, C, H, W) of the latents.
    cond
        Passed unchanged to ``eps_model``.
    schedule
        The noise schedule the model was trained with.
    n_steps
        Number of steps (= network calls), 1 … T.
    order
        2 for DPM-Solver++(2M); 1 gives DPM-Solver++(1), which is DDIM with η = 0.
    generator
        Source of z_T when ``x_T`` is not given: one generator, or one per row so that a
        row's z_T does not depend on its batch (`ctp2mri.diffusion.noise`). The solver
        draws nothing after z_T.
    x_T
        Starting noise of shape ``shape``, instead of drawing it.
    progress, cancel
        ``progress(step, total, {"t": t})`` after each step; ``cancel`` is checked before each
        network call, so a cancel costs at most the call in flight.
    device, dtype
        Of the latents; ``device`` defaults to ``x_T``'s, else ``cond``'s, else the schedule's.

    Returns
    -------
    torch.Tensor
        z_0, shape ``shape``, to be decoded by the autoencoder.

    Raises
    ------
    InputError
        ``n_steps`` outside 1 … T, ``order`` not 1 or 2, ``x_T`` of the wrong shape, or a
        generator list whose length is not the batch size.
    ctp2mri.errors.Cancelled
        When ``cancel`` is set.
    """
    if order not in (1, 2):
        raise InputError(f"DPM-Solver++ order must be 1 or 2 (2 = the 2M solver), got {order}")
    shape = tuple(int(s) for s in shape)
    check_noise_source(generator, shape[0])
    if device is None:
        device = x_T.device if x_T is not None else getattr(cond, "device", schedule.device)
    if x_T is not None and tuple(x_T.shape) != shape:
        raise InputError(f"x_T has shape {tuple(x_T.shape)}, expected {shape}")
    timesteps = dpm_solver_timesteps(schedule, n_steps)  # t_0 > t_1 > … > 0, noisiest first
    abar = schedule.alphas_cumprod.cpu().double()

    def alpha_sigma_lambda(t: int) -> tuple[float, float, float]:
        a = abar[t].item()
        return a**0.5, (1.0 - a) ** 0.5, 0.5 * math.log(a / (1.0 - a))  # α_t, σ_t, λ_t (float64)

    z = (
        x_T.to(device=device, dtype=dtype)
        if x_T is not None
        else standard_normal(shape, generator, device, dtype)
    )  # z_T ~ N(0, I)
    z0_prev, h_prev = None, None  # ẑ_0 and h of the previous step, the multistep buffer
    for i, t in enumerate(timesteps):
        if cancel is not None:
            cancel.raise_if_cancelled()
        eps = eps_model(z, torch.full((shape[0],), t, device=device, dtype=torch.long), cond)  # ε̂
        z0 = schedule.predict_z0(z, t, eps)  # ẑ_0 = x_θ(z_t, t) (Eq. 5)
        if i == len(timesteps) - 1:
            z = z0  # to σ_s = 0, α_s = 1, e^{−h} = 0: first order, z_s = D = ẑ_0
        else:
            _, sigma_t, lambda_t = alpha_sigma_lambda(t)
            alpha_s, sigma_s, lambda_s = alpha_sigma_lambda(timesteps[i + 1])
            h = lambda_s - lambda_t  # step in log-SNR, h > 0
            if order == 1 or z0_prev is None:
                D = z0  # first order: DPM-Solver++(1) = DDIM η = 0
            else:
                r = h_prev / h  # ratio of the previous step to this one
                D = (1 + 1 / (2 * r)) * z0 - 1 / (2 * r) * z0_prev  # ẑ_0 extrapolated in λ
            z = (sigma_s / sigma_t) * z - alpha_s * math.expm1(-h) * D  # z_s
            z0_prev, h_prev = z0, h
        if progress is not None:
            progress(i + 1, len(timesteps), {"t": t})
    return z
