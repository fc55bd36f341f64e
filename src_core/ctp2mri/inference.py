"""Sampling a trained conditional LDM: checkpoint → model on a device → DWI/ADC slices.

The one inference path shared by `ctp2mri evaluate` and the synthesis engine: a batch of
normalised CTP slices goes in, normalised DWI/ADC slices in [−1, 1] come out. The
condition is rescaled once per batch (c̃ = F(c), reused at every step), the sampler (DDIM or
DPM-Solver++(2M)) runs in the latent space and the autoencoder decodes the result. K samples
per slice are extra rows of the same batches.

Seeding: slice ``i`` starts from z_T drawn by its own generator, seeded from
``(seed, ids[i])``, on the CPU. A slice's result therefore depends neither on the batch it
was sampled in nor on the device (up to floating-point summation order), so
``batch_size`` is purely a speed/memory setting.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ctp2mri.checkpoints import load_checkpoint, read_config
from ctp2mri.devices import resolve_device
from ctp2mri.diffusion import NoiseSchedule, ddim_sample, dpm_solver_sample
from ctp2mri.diffusion.dpm_solver import dpm_solver_timesteps
from ctp2mri.errors import InputError
from ctp2mri.models.autoencoder import VQAutoencoder
from ctp2mri.models.cldm import ConditionalLDM
from ctp2mri.progress import CancelToken, ProgressCallback

__all__ = ["PRECISIONS", "SAMPLERS", "LoadedModel", "autocast_dtype", "load_model", "row_seed",
           "sample_slices", "sampler_steps", "slice_seed"]


#: Samplers of `sample_slices`: DDIM (the paper's, Song et al. 2021) and DPM-Solver++(2M).
SAMPLERS = ("ddim", "dpm++2m")
#: Precision flag → autocast dtype (None: float32).
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16,
                                             "fp16": torch.float16}


@dataclass
class LoadedModel:
    """A cLDM checkpoint ready for sampling (networks in eval mode, no gradients).

    Attributes
    ----------
    cldm
        The ε-prediction network (EMA weights unless loaded with ``use_ema=False``).
    autoencoder
        The VQ autoencoder whose decoder maps latents to (DWI, ADC).
    schedule
        The noise schedule the cLDM was trained with, on the model's device.
    normalisation
        The checkpoint's intensity ranges (``{"dwi": {"lo", "hi"}, "adc": {...}, ...}``,
        see `ctp2mri.data.SliceDataset.intensity_ranges`) for mapping output back to units.
    profile
        Name of the model grid (`ctp2mri.profiles`).
    config
        The whole config.json.
    device
        Where the networks live.
    weights
        Which weight file the cLDM came from (``"ema"`` or ``"model"``).
    path
        The checkpoint folder.
    """

    cldm: ConditionalLDM
    autoencoder: VQAutoencoder
    schedule: NoiseSchedule
    normalisation: dict[str, Any]
    profile: str
    config: dict[str, Any]
    device: torch.device
    weights: str = "ema"
    path: str | None = None


def load_model(path: str | os.PathLike, device: str | torch.device = "auto",
               use_ema: bool = True) -> LoadedModel:
    """Load a cLDM checkpoint folder for sampling.

    Parameters
    ----------
    path
        Checkpoint folder (``kind: "cldm"``) holding ``model``/``ema`` cLDM weights and the
        ``autoencoder`` they were trained with.
    device
        ``"auto"``, ``"cpu"``, ``"cuda[:i]"``, ``"mps"`` or a `torch.device`
        (`ctp2mri.devices.resolve_device`).
    use_ema
        Sample with the EMA weights (as the paper and CompVis do); ``False`` takes the raw
        training weights. A checkpoint without EMA weights falls back to ``model``.

    Raises
    ------
    InputError
        Not a cLDM checkpoint, a weight file missing/truncated/mismatched (from
        `ctp2mri.checkpoints`), no schedule or profile recorded.
    """
    dev = resolve_device(device)
    config = read_config(path)
    if config.get("kind") != "cldm":
        raise InputError(f"{path} is a {config.get('kind')!r} checkpoint; sampling needs a 'cldm' "
                         "checkpoint (written by `ctp2mri train-ldm` or `post-train`)")
    networks = config["networks"]
    weights = "ema" if use_ema and "ema" in networks else "model"
    for needed in (weights, "autoencoder"):
        if needed not in networks:
            raise InputError(f"{path} holds no {needed!r} network (it has {', '.join(networks)}); "
                             "a cLDM checkpoint needs the denoiser and its autoencoder")
    if not isinstance(config.get("schedule"), dict):
        raise InputError(f"{path}/config.json records no noise schedule; the checkpoint is damaged")
    nets, config = load_checkpoint(path, names=[weights, "autoencoder"], map_location=dev,
                                   kind="cldm")
    cldm, autoencoder = nets[weights], nets["autoencoder"]
    if not isinstance(cldm, ConditionalLDM) or not isinstance(autoencoder, VQAutoencoder):
        raise InputError(f"{path}: {weights!r} must be a cldm and 'autoencoder' an autoencoder "
                         f"network; config.json says {networks[weights]['type']!r} and "
                         f"{networks['autoencoder']['type']!r}")
    for net in (cldm, autoencoder):
        net.eval().requires_grad_(False)
    return LoadedModel(cldm=cldm, autoencoder=autoencoder,
                       schedule=NoiseSchedule.from_config(config["schedule"]).to(dev),
                       normalisation=dict(config.get("normalisation") or {}),
                       profile=str(config["profile"]), config=config, device=dev,
                       weights=weights, path=os.fspath(path))


def slice_seed(seed: int, slice_id: int) -> int:
    """The 63-bit generator seed of one slice, mixed from (seed, slice_id) by SeedSequence.

    Neighbouring ids give unrelated streams (a plain ``seed + id`` would make runs with
    seeds 0 and 1 share all but one slice's noise).
    """
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF,
                                    int(slice_id) & 0xFFFFFFFFFFFFFFFF]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def row_seed(seed: int, slice_id: int, sample: int = 0) -> int:
    """Generator seed of sample ``sample`` of one slice; sample 0 is `slice_seed` itself.

    Sample 0 of a K-sample run therefore equals the single-sample run, and the other samples
    draw unrelated streams.
    """
    if int(sample) == 0:
        return slice_seed(seed, slice_id)
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF,
                                    int(slice_id) & 0xFFFFFFFFFFFFFFFF,
                                    int(sample) & 0xFFFFFFFFFFFFFFFF]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _initial_noise(rows: Sequence[tuple[int, int]], seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """z_T of each (slice id, sample) row from its own CPU generator (device- and batch-independent)."""
    out = torch.empty((len(rows), *shape), dtype=torch.float32)
    for r, (slice_id, sample) in enumerate(rows):
        gen = torch.Generator(device="cpu").manual_seed(row_seed(seed, slice_id, sample))
        out[r] = torch.randn(shape, generator=gen, dtype=torch.float32)
    return out


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
    return PRECISIONS[precision]


def _free(device: torch.device) -> None:
    """Hand cached GPU blocks back after a cancel, an out-of-memory or the end of a run."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sampler_steps(sampler: str, n_steps: int, model: LoadedModel) -> int:
    """Network calls one batch costs with ``sampler`` at ``n_steps`` (validates both)."""
    if sampler == "ddim":
        return len(model.schedule.ddim_timesteps(n_steps))
    if sampler == "dpm++2m":
        return len(dpm_solver_timesteps(model.schedule, n_steps))
    raise InputError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")


@torch.inference_mode()
def sample_slices(model: LoadedModel, cond: torch.Tensor | np.ndarray, n_steps: int = 200,
                  eta: float = 0.0, seed: int = 0, batch_size: int = 16,
                  ids: Sequence[int] | None = None, quantize: bool = True,
                  progress: ProgressCallback | None = None,
                  cancel: CancelToken | None = None, *, sampler: str = "ddim",
                  samples: int = 1, precision: str = "fp32",
                  stats: dict[str, Any] | None = None) -> torch.Tensor:
    """Synthesise normalised (DWI, ADC) slices from normalised CTP slices.

    Parameters
    ----------
    model
        From `load_model`.
    cond
        (B, 15, H, W) CTP slices normalised per the contract ([−1, 1], 0 outside the brain)
        on the model's grid.
    n_steps, eta
        Sampler steps (DDIM: 200 in the paper; DPM-Solver++(2M): ~20) and DDIM's η
        (0: deterministic given z_T). DPM-Solver++ is deterministic: η must be 0.
    seed
        Run seed; sample k of slice ``i`` starts from ``row_seed(seed, ids[i], k)`` (sample 0:
        ``slice_seed(seed, ids[i])``).
    batch_size
        Rows (slice × sample) per network call; with η = 0 it does not change the result.
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
        ``"ddim"`` or ``"dpm++2m"`` (`ctp2mri.diffusion.dpm_solver_sample`, order 2).
    samples
        K samples per slice, drawn from K seeds and batched together with the slices.
    precision
        ``"fp32"``, or ``"bf16"``/``"fp16"`` autocast of the denoiser on CUDA (ignored
        elsewhere, see `autocast_dtype`); the sampler's update arithmetic, the condition
        rescaler and the decoder stay float32.
    stats
        If given, filled with ``batch_size`` (the one finally used), ``oom_retries`` and
        ``network_calls`` (denoiser evaluations, each on one batch).

    Returns
    -------
    torch.Tensor
        (B·K, 2, H, W) float32 on the CPU, clamped to [−1, 1] (the contract's range, as the
        official sampling scripts clamp); rows ``i·K … i·K + K − 1`` are slice ``i``'s
        samples. Not brain-masked: multiply by the brain mask.

    Notes
    -----
    With η > 0 the per-step noise comes from one generator per batch, seeded by the
    batch's first row: reproducible for the same ``batch_size``, not across batch sizes
    (`ddim_sample` draws that noise for the whole batch).

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
    latent = model.autoencoder.latent_shape(height, width)
    out = torch.empty((len(rows), model.autoencoder.config["out_channels"], height, width),
                      dtype=torch.float32)
    info = {"batch_size": int(batch_size), "oom_retries": 0, "network_calls": 0}
    if stats is not None:
        stats.update(info)
    if not rows:
        return out
    batch_size = int(batch_size)

    def eps_model(z: torch.Tensor, t: torch.Tensor, c_tilde: torch.Tensor) -> torch.Tensor:
        info["network_calls"] += 1
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            return model.cldm.predict_noise(z, t, c_tilde).float()

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
                         {"slices_done": done // k_samples, "slices": n, "batch": b + 1,
                          "batches": n_batches, "t": step_info.get("t")})

        batch = rows[start:stop]
        c = x_t = c_tilde = z0 = images = None
        try:
            c = c_all[[i for i, _ in batch]].to(device=dev, dtype=torch.float32)
            c_tilde = model.cldm.encode_condition(c)  # once per batch, every step reuses it
            x_t = _initial_noise([(ids[i], k) for i, k in batch], seed, latent).to(dev)
            if sampler == "ddim":
                noise_gen = None
                if eta > 0:
                    first_slice, first_sample = batch[0]
                    noise_gen = torch.Generator(device=dev).manual_seed(
                        row_seed(seed + 1, ids[first_slice], first_sample))
                z0 = ddim_sample(eps_model, x_t.shape, c_tilde, model.schedule, n_steps, eta,
                                 generator=noise_gen, x_T=x_t, progress=step_report,
                                 cancel=cancel, device=dev)
            else:
                z0 = dpm_solver_sample(eps_model, x_t.shape, c_tilde, model.schedule, n_steps,
                                       order=2, x_T=x_t, progress=step_report, cancel=cancel,
                                       device=dev)
            # Decoding stays float32: the codebook look-up compares distances that half
            # precision can tie, and one decode per batch costs little next to the steps.
            images = model.autoencoder.decode(z0, quantize=quantize)
            out[start:stop] = images.clamp_(-1.0, 1.0).cpu()
        except torch.cuda.OutOfMemoryError:
            del c, x_t, c_tilde, z0, images
            _free(dev)
            if batch_size == 1:
                raise InputError(f"out of GPU memory on {dev} even with one slice per batch; "
                                 "close other programs using the GPU, use --precision bf16, or "
                                 "--device cpu") from None
            batch_size //= 2  # retry this batch with half the rows
            info["oom_retries"] += 1
            continue
        except BaseException:
            del c, x_t, c_tilde, z0, images  # a cancel frees the batch before propagating
            _free(dev)
            raise
        del c, x_t, c_tilde, z0, images
        start, steps_before, b = stop, steps_before + steps_per_batch, b + 1
    info["batch_size"] = batch_size
    if stats is not None:
        stats.update(info)
    return out
