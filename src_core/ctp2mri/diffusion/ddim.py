"""DDIM sampling (Song et al. 2021, Eq. 12) of the conditional LDM's reverse process."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from ctp2mri.diffusion.noise import NoiseSource, check_noise_source, standard_normal
from ctp2mri.diffusion.schedule import NoiseSchedule
from ctp2mri.errors import InputError
from ctp2mri.progress import CancelToken, ProgressCallback

#: ``eps_model(z_t, t, cond) -> ε̂``: z_t (B, C, H, W), t a long tensor (B,), cond passed through.
EpsModel = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


@torch.no_grad()
def ddim_sample(
    eps_model: EpsModel,
    shape: Sequence[int],
    cond: Any,
    schedule: NoiseSchedule,
    n_steps: int = 200,
    eta: float = 0.0,
    *,
    generator: NoiseSource = None,
    x_T: Optional[torch.Tensor] = None,
    clip_z0: Optional[float] = None,
    compvis_last_step: bool = False,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Draw z_0 ~ p_θ(z_0 | c̃) by DDIM from z_T ~ N(0, I); one batch of slices at a time.

    Each step from timestep t to the previous visited timestep s is Eq. 12 of DDIM:
    z_s = √ᾱ_s ẑ_0 + √(1 − ᾱ_s − σ_t²) ε̂ + σ_t ε, with ẑ_0 from Eq. 5 of the paper and
    σ_t = η √((1 − ᾱ_s)/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_s) (DDIM Eq. 16): η = 0 is deterministic
    DDIM, η = 1 the DDPM posterior.

    Parameters
    ----------
    eps_model
        ``eps_model(z_t, t, cond) -> ε̂`` with ``t`` a long tensor of shape (B,); any callable
        (the cLDM, or an oracle in tests). Called once per step.
    shape
        (B, C, H, W) of the latents; B slices are sampled together.
    cond
        Passed unchanged to ``eps_model`` (the CTP condition of the B slices).
    schedule
        The noise schedule the model was trained with.
    n_steps
        Number of DDIM steps, 1 … T (200 in the paper); see :meth:`NoiseSchedule.ddim_timesteps`.
    eta
        η ≥ 0, the stochasticity of each step.
    generator
        Source of z_T (when ``x_T`` is not given) and of the η > 0 noise; fixes the result.
        One generator draws each step's noise for the whole batch at once, so a row's noise
        depends on the rows sampled with it; a sequence of one generator per row draws row
        ``r`` from ``generator[r]`` alone, so a slice's result does not depend on its batch
        (`ctp2mri.diffusion.noise`). With η = 0 and ``x_T`` given it is not used.
    x_T
        Starting noise of shape ``shape``, instead of drawing it.
    clip_z0
        Clamp ẑ_0 to ±clip_z0 at every step; off by default (latents are not bounded).
    compvis_last_step
        End at ᾱ_s = ᾱ[0] = 1 − β_1 as CompVis's and the official code's sampler does, which
        leaves √β_1 ≈ 0.039 of predicted noise in the output. By default the last step goes to
        ᾱ_s = 1 and returns the clean ẑ_0 (diffusers' and MONAI's ``set_alpha_to_one``).
    progress, cancel
        ``progress(step, total, {"t": t})`` after each step; ``cancel`` is checked before each
        step, so a cancel costs at most one more network call.
    device, dtype
        Of the latents; ``device`` defaults to ``x_T``'s, else ``cond``'s, else the schedule's.

    Returns
    -------
    torch.Tensor
        z_0, shape ``shape``, to be decoded by the autoencoder.

    Raises
    ------
    InputError
        ``n_steps`` outside 1 … T, η < 0, ``x_T`` of the wrong shape, or a generator list
        whose length is not the batch size.
    ctp2mri.errors.Cancelled
        When ``cancel`` is set.
    """
    if eta < 0:
        raise InputError(f"DDIM eta must be >= 0 (0 = deterministic, 1 = DDPM-like), got {eta}")
    shape = tuple(int(s) for s in shape)
    check_noise_source(generator, shape[0])
    if device is None:
        device = x_T.device if x_T is not None else getattr(cond, "device", schedule.device)
    if x_T is not None and tuple(x_T.shape) != shape:
        raise InputError(f"x_T has shape {tuple(x_T.shape)}, expected {shape}")
    timesteps = schedule.ddim_timesteps(n_steps).tolist()  # t_1 < … < t_n, visited in reverse
    abar = schedule.alphas_cumprod.cpu().double()  # ᾱ per timestep, float64 scalars below
    abar_end = abar[0].item() if compvis_last_step else 1.0  # ᾱ after the last step

    z = x_T.to(device=device, dtype=dtype) if x_T is not None else standard_normal(
        shape, generator, device, dtype
    )  # z_T ~ N(0, I)
    for i, k in enumerate(reversed(range(len(timesteps)))):
        if cancel is not None:
            cancel.raise_if_cancelled()
        t = timesteps[k]
        a_t = abar[t].item()  # ᾱ_t
        a_s = abar[timesteps[k - 1]].item() if k > 0 else abar_end  # ᾱ_s, s the next timestep
        eps = eps_model(z, torch.full((shape[0],), t, device=device, dtype=torch.long), cond)  # ε̂
        z0 = schedule.predict_z0(z, t, eps)  # predicted z_0 (Eq. 5)
        if clip_z0 is not None:
            z0 = z0.clamp(-clip_z0, clip_z0)
        sigma = eta * ((1.0 - a_s) / (1.0 - a_t) * (1.0 - a_t / a_s)) ** 0.5  # σ_t(η), DDIM Eq. 16
        direction = max(1.0 - a_s - sigma**2, 0.0) ** 0.5 * eps  # direction pointing to z_t
        z = a_s**0.5 * z0 + direction  # z_s without noise
        if sigma > 0:
            noise = standard_normal(shape, generator, device, dtype)  # ε
            z = z + sigma * noise  # + σ_t ε
        if progress is not None:
            progress(i + 1, len(timesteps), {"t": t})
    return z
