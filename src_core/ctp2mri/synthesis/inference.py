"""Sampling a loaded model: normalised CTP slices in, normalised DWI/ADC slices out.

The one inference path shared by `ctp2mri evaluate` and the synthesis engine: a batch of
normalised CTP slices goes in, normalised DWI/ADC slices in [−1, 1] come out. The
condition is rescaled once per batch (c̃ = F(c), reused at every step), the sampler (DDIM or
DPM-Solver++(2M)) runs in the latent space and the autoencoder decodes the result. K samples
per slice are extra rows of the same batches.

`sample_slices` dispatches on the model's kind (`ctp2mri.synthesis.loading.load_model`), so the
baselines are sampled by the same batching, seeding, progress and cancel code: a cLDM, a
cBBDM (the latent Brownian bridge walked back from y = F(c) by BBDM's sampler,
`ctp2mri.diffusion.bridge_sample`, then decoded) and Pix2Pix (one generator pass).

Seeding (`ctp2mri.synthesis.seeding`): each (slice, sample) row draws from its own CPU
generator, so ``batch_size`` is purely a speed/memory setting. The bridge starts from y
itself; with η > 0 each row's step noise comes from the same per-row seed.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ctp2mri.diffusion import bridge_sample, ddim_sample, dpm_solver_sample
from ctp2mri.diffusion.dpm_solver import dpm_solver_timesteps
from ctp2mri.errors import InputError
from ctp2mri.progress import CancelToken, ProgressCallback
from ctp2mri.settings import PRECISIONS
from ctp2mri.synthesis.loading import (
    KIND_SAMPLERS,
    SAMPLERS,
    AnyLoadedModel,
    LoadedBridge,
    LoadedPix2Pix,
    default_sampler,
)
from ctp2mri.synthesis.seeding import initial_noise, row_generators

__all__ = ["autocast_dtype", "sample_slices", "sampler_steps"]

#: Precision flag (`ctp2mri.settings.PRECISIONS`) → autocast dtype (None: float32).
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = dict(zip(PRECISIONS, (None, torch.bfloat16, torch.float16)))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None means plain float32.

    Half precision is used on CUDA only; CPU and MPS compute in float32 (the engine's
    contract: fp32 off the GPU, where mixed precision is neither measured nor tested here).

    Raises
    ------
    InputError
        ``precision`` is not fp32, bf16 or fp16.
    """
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if device.type != "cuda":
        return None
    return AUTOCAST_DTYPES[precision]


def _free(device: torch.device) -> None:
    """Hand cached GPU blocks back after a cancel, an out-of-memory or the end of a run."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sampler_steps(sampler: str | None, n_steps: int, model: AnyLoadedModel) -> int:
    """Network calls one batch costs with ``sampler`` (None: the model's default) at
    ``n_steps`` (validates both; Pix2Pix always makes one call)."""
    sampler = default_sampler(model) if sampler is None else sampler
    if sampler not in KIND_SAMPLERS[model.kind]:
        known = SAMPLERS if model.kind == "cldm" else KIND_SAMPLERS[model.kind]
        raise InputError(f"unknown sampler {sampler!r} for a {model.kind} model; choose one of {', '.join(known)}")
    if sampler == "ddim":
        return len(model.schedule.ddim_timesteps(n_steps))
    if sampler == "dpm++2m":
        return len(dpm_solver_timesteps(model.schedule, n_steps))
    if sampler == "bbdm":
        return len(model.bridge.sample_timesteps(n_steps))
    return 1


#: ``run_batch(rows, step_report) -> images``: sample one batch of (slice, sample) rows.
_BatchFn = Callable[[Sequence[tuple[int, int]], ProgressCallback], torch.Tensor]


@torch.inference_mode()
def sample_slices(model: AnyLoadedModel, cond: torch.Tensor | np.ndarray, n_steps: int = 200,
                  eta: float = 0.0, seed: int = 0, batch_size: int = 16,
                  ids: Sequence[int] | None = None, quantize: bool = True,
                  progress: ProgressCallback | None = None,
                  cancel: CancelToken | None = None, *, sampler: str | None = None,
                  samples: int = 1, precision: str = "fp32",
                  stats: dict[str, Any] | None = None, context: float | None = None) -> torch.Tensor:
    """Synthesise normalised (DWI, ADC) slices from normalised CTP slices.

    Parameters
    ----------
    model
        From `load_model`: a cLDM, a cBBDM or a Pix2Pix generator.
    cond
        (B, 15, H, W) CTP slices normalised per the contract ([−1, 1], 0 outside the brain)
        on the model's grid. For a cLDM with the case context (`ConditionalLDM.takes_context`)
        these are all of one case's slices, from which the context is read, unless ``context``
        gives it.
    n_steps, eta
        Sampler steps (DDIM: 200 in the paper; DPM-Solver++(2M): ~20; BBDM: 200) and the
        stochasticity η (DDIM's and the bridge's; 0: deterministic). DPM-Solver++ is
        deterministic: η must be 0. Pix2Pix ignores both (one deterministic pass).
    seed
        Run seed; sample k of slice ``i`` starts from ``row_seed(seed, ids[i], k)`` (sample 0:
        ``slice_seed(seed, ids[i])``). The bridge starts from y = F(c) and uses the seed for
        its η > 0 step noise only.
    batch_size
        Rows (slice × sample) per network call; it does not change the result (for any η).
        On a CUDA out-of-memory error the batch is retried with half as many rows, down to 1.
    ids
        One integer per slice naming it for seeding (default ``0 … B−1``); give stable ids
        (e.g. z indices) so a slice gets the same noise whichever slices it is sampled with.
    quantize
        Quantise the sampled latent with the codebook before decoding, as the official
        code's ``decode_first_stage`` does for a VQ autoencoder.
    progress
        ``progress(steps_done, total_steps, info)`` after every sampler step, counted over all
        batches (``total_steps = n_batches × n_steps``); ``info`` holds ``slices_done``,
        ``slices``, ``batch``, ``batches`` and ``t``.
    cancel
        Checked before every sampler step; on cancel the batch's tensors are released (and
        the CUDA cache emptied) before `Cancelled` propagates.
    sampler
        None: the model's default (`default_sampler`); for a cLDM ``"ddim"`` or ``"dpm++2m"``
        (`ctp2mri.diffusion.dpm_solver_sample`, order 2), for a cBBDM ``"bbdm"``, for Pix2Pix
        ``"generator"``.
    samples
        K samples per slice, drawn from K seeds and batched together with the slices.
    precision
        ``"fp32"``, or ``"bf16"``/``"fp16"`` autocast of the denoiser (generator) on CUDA
        (ignored elsewhere, see `autocast_dtype`); the sampler's update arithmetic, the
        condition rescaler and the decoder stay float32.
    stats
        If given, filled with ``batch_size`` (the one finally used), ``oom_retries`` and
        ``network_calls`` (denoiser evaluations, each on one batch), and, for a model with the
        case context, ``context`` (the value used).
    context
        The case context of a cLDM that takes it (`ctp2mri.models.case_context`), when ``cond``
        is not the whole case; ignored by other models. None: read from ``cond``.

    Returns
    -------
    torch.Tensor
        (B·K, 2, H, W) float32 on the CPU, clamped to [−1, 1] (the contract's range, as the
        official sampling scripts clamp); rows ``i·K … i·K + K − 1`` are slice ``i``'s
        samples. Not brain-masked: multiply by the brain mask.

    Notes
    -----
    With η > 0 the DDIM per-step noise of a row continues its z_T generator's stream (one
    stream per row, so seeds s and s + 1 share no draws), and the bridge draws it from a
    generator per row too: η > 0 results, like η = 0 ones, do not depend on ``batch_size``
    or on which slices are sampled together.

    Raises
    ------
    InputError
        ``cond`` not (B, 15, H, W) or not divisible to the latent grid; bad steps/η/batch
        size/sampler/samples/precision; out of GPU memory even with one row per batch.
    ctp2mri.errors.Cancelled
        When ``cancel`` is set.
    """
    c_all = torch.as_tensor(cond)
    if c_all.ndim != 4:
        raise InputError(f"the CTP condition must be (slices, frames, H, W); got {tuple(c_all.shape)}")
    n = int(c_all.shape[0])
    if int(batch_size) < 1:
        raise InputError(f"batch size must be at least 1, got {batch_size}")
    if int(samples) < 1:
        raise InputError(f"the number of samples per slice must be at least 1, got {samples}")
    sampler = default_sampler(model) if sampler is None else sampler
    if sampler == "dpm++2m" and eta != 0:
        raise InputError(f"eta = {eta:g} applies to DDIM only; DPM-Solver++(2M) is deterministic "
                         "(use eta 0, or sampler ddim)")
    ids = list(range(n)) if ids is None else [int(i) for i in ids]
    if len(ids) != n:
        raise InputError(f"{len(ids)} slice ids given for {n} slices")
    dev = model.device
    amp = autocast_dtype(precision, dev)
    steps_per_batch = sampler_steps(sampler, n_steps, model)
    k_samples = int(samples)
    rows = [(i, k) for i in range(n) for k in range(k_samples)]  # slice-major
    height, width = (int(s) for s in c_all.shape[-2:])
    channels = (model.generator.out_channels if isinstance(model, LoadedPix2Pix)
                else model.autoencoder.config["out_channels"])
    out = torch.empty((len(rows), channels, height, width), dtype=torch.float32)
    info = {"batch_size": int(batch_size), "oom_retries": 0, "network_calls": 0}
    if stats is not None:
        stats.update(info)
    if not rows:
        return out

    def condition(batch: Sequence[tuple[int, int]]) -> torch.Tensor:
        return c_all[[i for i, _ in batch]].to(device=dev, dtype=torch.float32)

    def autocast() -> Any:
        return torch.autocast(dev.type, dtype=amp, enabled=amp is not None)

    if isinstance(model, LoadedPix2Pix):
        def run_batch(batch, report):
            if cancel is not None:
                cancel.raise_if_cancelled()
            c = condition(batch)
            info["network_calls"] += 1
            with autocast():
                images = model.generator(c).float()  # x̂ = G(c): one pass
            report(1, 1, {"t": None})
            return images.clamp_(-1.0, 1.0).cpu()
    elif isinstance(model, LoadedBridge):
        def objective_model(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            info["network_calls"] += 1
            with autocast():
                return model.network.predict_objective(x, t, y).float()

        def run_batch(batch, report):
            y = model.network.encode_condition(condition(batch))  # x_T = y = F(c), once per batch
            generators = None
            if eta > 0:  # one CPU generator per row: a row's noise does not depend on its batch
                generators = row_generators([(ids[i], k) for i, k in batch], seed)
            x0 = bridge_sample(objective_model, y, y, model.bridge, n_steps, eta, generator=generators,
                               progress=report, cancel=cancel)
            return model.autoencoder.decode(x0, quantize=quantize).clamp_(-1.0, 1.0).cpu()
    else:
        latent = model.autoencoder.latent_shape(height, width)

        def eps_model(z: torch.Tensor, t: torch.Tensor, c_tilde: torch.Tensor) -> torch.Tensor:
            info["network_calls"] += 1
            with autocast():
                return model.cldm.predict_noise(z, t, c_tilde, model.schedule.alphas_cumprod[t]).float()

        if not model.cldm.takes_context:
            context = None
        elif context is None:
            context = model.cldm.case_context_of(c_all, batch_size)  # the whole case, once
        if context is not None:
            info["context"] = float(context)

        def run_batch(batch, report):
            c_tilde = model.cldm.encode_condition(condition(batch), context)  # once per batch, every step reuses it
            generators = row_generators([(ids[i], k) for i, k in batch], seed)
            x_t = initial_noise(generators, latent).to(dev)
            if sampler == "ddim":
                # η > 0: each row's step noise goes on from its own z_T stream, so it does not
                # depend on the batch; η = 0 draws nothing more, leaving the result as before.
                z0 = ddim_sample(eps_model, x_t.shape, c_tilde, model.schedule, n_steps, eta,
                                 generator=generators if eta > 0 else None, x_T=x_t, progress=report,
                                 cancel=cancel, device=dev)
            else:
                z0 = dpm_solver_sample(eps_model, x_t.shape, c_tilde, model.schedule, n_steps,
                                       order=2, x_T=x_t, progress=report, cancel=cancel, device=dev)
            # Decoding stays float32: the codebook look-up compares distances that half
            # precision can tie, and one decode per batch costs little next to the steps.
            return model.autoencoder.decode(z0 / model.cldm.scale_factor, quantize=quantize).clamp_(-1.0, 1.0).cpu()

    _sample_in_batches(rows, n, k_samples, int(batch_size), steps_per_batch, out, dev, run_batch, progress, info)
    if stats is not None:
        stats.update(info)
    return out


def _sample_in_batches(rows: Sequence[tuple[int, int]], n_slices: int, k_samples: int, batch_size: int,
                       steps_per_batch: int, out: torch.Tensor, dev: torch.device, run_batch: _BatchFn,
                       progress: ProgressCallback | None, info: dict[str, Any]) -> None:
    """Fill ``out`` batch by batch with ``run_batch``; progress over all batches, and a CUDA
    out-of-memory error retries the batch with half the rows (``info`` records the outcome)."""
    start, steps_before, b = 0, 0, 0
    while start < len(rows):
        stop = min(start + batch_size, len(rows))
        n_batches = b + -(-(len(rows) - start) // batch_size)
        total = steps_before + (n_batches - b) * steps_per_batch

        def step_report(step: int, _total: int, step_info: dict[str, Any], b: int = b,
                        start: int = start, stop: int = stop, n_batches: int = n_batches,
                        total: int = total, before: int = steps_before) -> None:
            if progress is not None:
                done = start if step < steps_per_batch else stop
                progress(before + step, total,
                         {"slices_done": done // k_samples, "slices": n_slices, "batch": b + 1,
                          "batches": n_batches, "t": step_info.get("t")})

        out_of_memory = False
        try:
            out[start:stop] = run_batch(rows[start:stop], step_report)
        except torch.cuda.OutOfMemoryError as exc:
            traceback.clear_frames(exc.__traceback__)  # the failed batch's tensors live in those frames
            out_of_memory = True
        except BaseException as exc:
            traceback.clear_frames(exc.__traceback__)  # a cancel frees the batch before propagating
            _free(dev)
            raise
        if out_of_memory:
            _free(dev)
            if batch_size == 1:
                raise InputError(f"out of GPU memory on {dev} even with one slice per batch; "
                                 "close other programs using the GPU, use --precision bf16, or "
                                 "--device cpu") from None
            batch_size //= 2  # retry this batch with half the rows
            info["oom_retries"] += 1
            continue
        start, steps_before, b = stop, steps_before + steps_per_batch, b + 1
    info["batch_size"] = batch_size
