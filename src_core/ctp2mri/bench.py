"""Speed and memory benchmarks behind ``ctp2mri bench``.

`bench_preprocess` times the memory-critical front of preprocessing on a clinical-size
synthetic CTP: load (memory-mapped NIfTI) → brain mask → resampling of every frame to the
model grid, and reports wall time per stage and peak memory relative to the input size.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ctp2mri.io.atomic import atomic_path
from ctp2mri.io.volume import Volume

# Labels of the synthetic head and their unenhanced HU / peak enhancement (HU).
AIR, SCALP, SKULL, GREY, WHITE, CSF = range(6)
BRAIN_LABELS = (GREY, WHITE, CSF)
_BASE_HU = np.array([-1000, 40, 1000, 40, 30, 5], dtype=np.int16)
_PEAK_HU = np.array([0, 10, 0, 25, 8, 0], dtype=np.float64)
_BRAIN_SEMI_AXES_MM = (66.0, 82.0, 58.0)  # brain ellipsoid: 4/3·π·66·82·58 mm³ ≈ 1315 ml


def head_labels(shape: tuple[int, int, int], spacing: tuple[float, float, float],
                z0: int = 0, z1: int | None = None) -> np.ndarray:
    """Labels of slices z0:z1 of an ellipsoidal head centred in the field of view.

    Brain (grey shell, white core, a ventricle) inside a 7 mm skull and a 5 mm scalp;
    world coordinates are centred on the volume (see `centred_affine`).
    """
    z1 = shape[2] if z1 is None else z1
    axes = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing)]
    x, y, z = np.meshgrid(axes[0], axes[1], axes[2][z0:z1], indexing="ij", sparse=True)
    a, b, c = _BRAIN_SEMI_AXES_MM
    r = np.sqrt((x / a) ** 2 + (y / b) ** 2 + (z / c) ** 2).astype(np.float32)
    ventricles = ((x - 4.0) / 9.0) ** 2 + (y / 24.0) ** 2 + ((z - 8.0) / 11.0) ** 2 < 1.0
    labels = np.full(r.shape, AIR, dtype=np.int8)
    labels[r < 1.17] = SCALP
    labels[r < 1.10] = SKULL
    labels[r < 1.00] = GREY
    labels[r < 0.75] = WHITE
    labels[(r < 0.75) & ventricles] = CSF
    return labels


def centred_affine(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """RAS affine with the given spacing and the volume's centre at world (0, 0, 0)."""
    affine = np.diag(list(spacing) + [1.0])
    affine[:3, 3] = -np.asarray(spacing) * (np.asarray(shape) - 1) / 2.0
    return affine


def _bolus(frames: int, frame_interval: float) -> np.ndarray:
    """Gamma-variate bolus (arrival 6 s, α = 3, β = 1.5 s), peak 1."""
    t = np.maximum(np.arange(frames) * frame_interval - 6.0, 0.0)
    curve = t**3 * np.exp(-t / 1.5)
    return curve / curve.max() if curve.max() > 0 else curve


def _frame_hu(labels: np.ndarray, bolus_k: float, rng: np.random.Generator,
              noise: int) -> np.ndarray:
    frame = (_BASE_HU + np.rint(_PEAK_HU * bolus_k).astype(np.int16))[labels]
    if noise:
        frame += rng.integers(-noise, noise + 1, size=frame.shape, dtype=np.int16)
    return frame


def synthetic_ctp(shape: tuple[int, int, int] = (96, 96, 48),
                  spacing: tuple[float, float, float] = (2.5, 2.5, 4.0), frames: int = 15,
                  frame_interval: float = 2.0, noise: int = 12, seed: int = 0) -> Volume:
    """An in-memory head CTP (int16 HU) like `write_synthetic_ctp` writes; labels in meta."""
    labels = head_labels(shape, spacing)
    bolus = _bolus(frames, frame_interval)
    rng = np.random.default_rng(seed)
    array = np.stack([_frame_hu(labels, b, rng, noise) for b in bolus], axis=-1)
    return Volume(array, centred_affine(shape, spacing),
                  frame_times=np.arange(frames) * frame_interval, meta={"labels": labels})


def write_synthetic_ctp(path: str | os.PathLike, shape: tuple[int, int, int] = (512, 512, 320),
                        spacing: tuple[float, float, float] = (0.47, 0.47, 1.0), frames: int = 15,
                        frame_interval: float = 2.0, noise: int = 12, seed: int = 0) -> Path:
    """Write a head-like CTP as uncompressed int16 NIfTI, a slab at a time.

    Air −1000 HU, scalp 40, skull 1000, grey/white matter 40/30, ventricle 5 HU; brain and
    scalp enhance with a gamma-variate bolus (arrival 6 s); uniform noise ±``noise`` HU.
    Memory use stays at one slab whatever the volume size (2.5 GB on disk by default).
    """
    path = Path(path)
    shape = tuple(int(s) for s in shape)
    affine = centred_affine(shape, spacing)
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape(shape + (frames,))
    header.set_zooms(tuple(spacing) + (frame_interval,))
    header.set_xyzt_units("mm", "sec")
    header.set_sform(affine, code=1)
    header.set_qform(affine, code=1)
    bolus = _bolus(frames, frame_interval)
    rng = np.random.default_rng(seed)
    slab = max(1, (8 << 20) // (shape[0] * shape[1]))  # ~8 M voxels per slab
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            header.write_to(f)
            offset = header.get_data_offset()
        data = np.memmap(tmp, dtype=header.get_data_dtype(), mode="r+", offset=offset,
                         shape=shape + (frames,), order="F")
        for z0 in range(0, shape[2], slab):
            z1 = min(shape[2], z0 + slab)
            labels = head_labels(shape, spacing, z0, z1)
            for k in range(frames):
                data[:, :, z0:z1, k] = _frame_hu(labels, bolus[k], rng, noise)
        data.flush()
        del data
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    return path


def _drop_from_page_cache(path: Path) -> bool:
    """Evict one file from the page cache so the benchmark reads it from disk."""
    if not hasattr(os, "posix_fadvise"):
        return False
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return True


class _PeakMemory:
    """Peak resident memory of this process during a ``with`` block.

    The kernel's own high-water mark (VmHWM, reset through /proc/self/clear_refs) is exact;
    a sampling thread additionally tracks anonymous memory (RSS minus file-backed pages,
    i.e. without the memory-mapped input, which the kernel can drop at any time).
    """

    def __init__(self, interval: float = 0.005):
        import psutil

        self._proc = psutil.Process()
        self.interval = interval
        self.peak_rss = self.peak_anon = self.baseline_rss = 0
        self.kernel_peak: int | None = None
        self._reset = False
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            info = self._proc.memory_info()
            self.peak_rss = max(self.peak_rss, info.rss)
            self.peak_anon = max(self.peak_anon, info.rss - getattr(info, "shared", 0))
            time.sleep(self.interval)

    def __enter__(self) -> "_PeakMemory":
        self.baseline_rss = self._proc.memory_info().rss
        try:  # "5" resets the kernel's peak-RSS counter (Linux ≥ 4.0)
            Path("/proc/self/clear_refs").write_text("5")
            self._reset = True
        except OSError:
            pass
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        if self._reset:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.kernel_peak = int(line.split()[1]) * 1024
        self.peak_rss = max(self.peak_rss, self.kernel_peak or 0)


def bench_preprocess(shape: tuple[int, int, int] = (512, 512, 320),
                     spacing: tuple[float, float, float] = (0.47, 0.47, 1.0), frames: int = 15,
                     profile: str = "paper", workdir: str | os.PathLike | None = None,
                     keep: bool = False,
                     cold: bool = True) -> dict[str, Any]:
    """Time load → brain mask → resampling to the model grid on a synthetic clinical CTP.

    The input (int16, uncompressed NIfTI so that it is memory-mapped) is written first,
    outside the timed part, and evicted from the page cache when ``cold`` so that loading
    reads the disk. Targets: < 30 s in total and peak memory < 1.5 × the input size.

    Returns
    -------
    dict
        Stage times (s), total, peak RSS (kernel high-water mark, includes mapped input
        pages), peak anonymous memory, both also relative to the input size, and context.
    """
    from ctp2mri.io import load_volume
    from ctp2mri.preprocess import AIR_HU, brain_mask_from_ctp, model_grid, resample_to_grid

    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in spacing)
    root = Path(tempfile.mkdtemp(prefix="ctp2mri-bench-", dir=workdir))
    path = root / "ctp.nii"
    result: dict[str, Any] = {"shape": list(shape), "spacing": list(spacing), "frames": int(frames),
                              "profile": profile, "cpu_count": os.cpu_count()}
    try:
        start = time.perf_counter()
        write_synthetic_ctp(path, shape, spacing, frames)
        result["generate_s"] = round(time.perf_counter() - start, 2)
        result["cold_cache"] = bool(cold and _drop_from_page_cache(path))
        input_bytes = int(np.prod(shape)) * frames * 2
        stages: dict[str, float] = {}
        with _PeakMemory() as memory:
            clock = time.perf_counter()

            def lap(name: str) -> None:
                nonlocal clock
                now = time.perf_counter()
                stages[name] = round(now - clock, 3)
                clock = now

            ctp = load_volume(path)
            lap("load")
            brain = brain_mask_from_ctp(ctp)
            lap("brain_mask")
            grid = model_grid(ctp, profile, brain)
            ctp_grid = resample_to_grid(ctp, *grid, "linear", AIR_HU)
            lap("resample_ctp")
            mask_grid = resample_to_grid(brain, *grid, "nearest")
            lap("resample_mask")
        result.update({
            "input_bytes": input_bytes,
            "memory_mapped": isinstance(getattr(ctp.array, "base", None), np.memmap)
            or isinstance(ctp.array, np.memmap),
            "grid_shape": list(ctp_grid.array.shape),
            "mask_ml": brain.meta["brain_mask"]["volume_ml"],
            "mask_ml_on_grid": round(float(mask_grid.array.sum() * np.prod(ctp_grid.spacing))
                                     / 1000, 1),
            "stages_s": stages,
            "total_s": round(sum(stages.values()), 2),
            "baseline_rss_bytes": memory.baseline_rss,
            "peak_rss_bytes": memory.peak_rss,
            "peak_rss_ratio": round(memory.peak_rss / input_bytes, 3),
            "peak_anon_bytes": memory.peak_anon,
            "peak_anon_ratio": round(memory.peak_anon / input_bytes, 3),
            "kernel_peak_measured": memory.kernel_peak is not None,
            "targets": {"total_s": 30.0, "peak_rss_ratio": 1.5},
        })
        result["meets_targets"] = result["total_s"] < 30.0 and result["peak_rss_ratio"] < 1.5
        del ctp, brain, ctp_grid, mask_grid
    finally:
        if keep:
            result["input_path"] = str(path)
        else:
            shutil.rmtree(root, ignore_errors=True)
    return result


def format_bench(result: dict[str, Any]) -> str:
    """Human-readable report of `bench_preprocess` for the CLI."""
    gib = 1024**3
    r, targets = result, result["targets"]
    shape = "×".join(str(s) for s in r["shape"])
    cache = "cold" if r.get("cold_cache") else "warm"
    lines = [
        f"preprocess benchmark: {shape} × {r['frames']} frames int16 "
        f"({r['input_bytes'] / gib:.2f} GiB), spacing {tuple(r['spacing'])} mm → {r['profile']} "
        f"grid {tuple(r['grid_shape'])}, {r['cpu_count']} CPUs, {cache} page cache"
        + ("" if r.get("memory_mapped") else ", NOT memory-mapped"),
        f"  (writing the synthetic input took {r['generate_s']:.1f} s, not counted)",
    ]
    lines += [f"  {name:<14}{seconds:8.2f} s" for name, seconds in r["stages_s"].items()]
    ok = "ok" if r["total_s"] < targets["total_s"] else "over target"
    lines.append(f"  {'total':<14}{r['total_s']:8.2f} s   "
                 f"(target < {targets['total_s']:g} s: {ok})")
    ok = "ok" if r["peak_rss_ratio"] < targets["peak_rss_ratio"] else "over target"
    lines.append(f"  {'peak RSS':<14}{r['peak_rss_bytes'] / gib:8.2f} GiB = "
                 f"{r['peak_rss_ratio']:.2f} × input (target < {targets['peak_rss_ratio']:g}: "
                 f"{ok}; counts mapped input pages)")
    lines.append(f"  {'peak anon':<14}{r['peak_anon_bytes'] / gib:8.2f} GiB = "
                 f"{r['peak_anon_ratio']:.2f} × input (without the mapped file; baseline RSS "
                 f"{r['baseline_rss_bytes'] / gib:.2f} GiB)")
    lines.append(f"  brain mask {r['mask_ml']:.0f} ml at input resolution, "
                 f"{r['mask_ml_on_grid']:.0f} ml on the model grid")
    return "\n".join(lines)


# training ----------------------------------------------------------------------------------------
def bench_train(profile: str = "demo", kind: str = "ldm", batch_size: int = 16, steps: int = 10,
                device: str = "auto", precision: str = "auto", warmup: int = 2, seed: int = 0) -> dict[str, Any]:
    """Training steps/s and peak memory of the profile's networks on random slices (no data needed).

    One step is what the trainers do per optimiser step: for ``ldm``, z_0 = E(x) with the frozen
    autoencoder, t and ε drawn, z_t (Eq. 2), ε̂ and the Eq. 4 loss, backward, AdamW, EMA update;
    for ``autoencoder``, the VQGAN step after ``disc_start`` (reconstruction, codebook and
    adaptive adversarial loss, then the discriminator's hinge step), the costlier phase.

    Parameters
    ----------
    profile, kind
        Network sizes (`ctp2mri.models.model_config`) and which training to time.
    batch_size, steps, warmup
        Slices per step; timed steps after ``warmup`` untimed ones.
    device, precision
        Device spec (`ctp2mri.devices`); ``auto`` precision is bf16 autocast on CUDA, fp32 elsewhere.

    Returns
    -------
    dict with ``steps_per_s``, ``slices_per_s``, ``seconds_per_step``, ``peak_memory_bytes`` (CUDA:
    ``max_memory_allocated``; CPU: peak RSS of the process) and the settings.
    """
    import torch

    from ctp2mri.devices import resolve_device_with_notice
    from ctp2mri.diffusion import NoiseSchedule
    from ctp2mri.errors import InputError
    from ctp2mri.losses import autoencoder_loss, hinge_discriminator_loss, latent_loss
    from ctp2mri.models import model_config, parameter_count
    from ctp2mri.models.autoencoder import PatchGANDiscriminator, VQAutoencoder
    from ctp2mri.models.cldm import ConditionalLDM
    from ctp2mri.profiles import get_profile
    from ctp2mri.training.ema import EMA
    from ctp2mri.training.loop import autocast, check_precision

    if kind not in ("ldm", "autoencoder"):
        raise InputError(f"unknown training kind {kind!r}; choose ldm or autoencoder")
    if steps < 1 or batch_size < 1 or warmup < 0:
        raise InputError("steps and batch size must be at least 1 (warmup at least 0)")
    prof = get_profile(profile)
    dev, notice = resolve_device_with_notice(device)
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" else "fp32"
    precision = check_precision(precision, dev)
    torch.manual_seed(seed)
    h, w = prof.shape_xy
    x = torch.rand(batch_size, 2, h, w, device=dev) * 2 - 1
    c = torch.rand(batch_size, prof.n_frames, h, w, device=dev) * 2 - 1
    ae = VQAutoencoder(**model_config(prof.name, "autoencoder")).to(dev)

    if kind == "ldm":
        ae.eval().requires_grad_(False)
        model = ConditionalLDM(**model_config(prof.name, "cldm")).to(dev).train()
        ema = EMA(model, 0.9999)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        schedule = NoiseSchedule().to(dev)
        n_params = parameter_count("cldm", model.config)

        def step() -> float:
            with torch.no_grad(), autocast(precision, dev):
                z0 = ae.encode(x).float()
            t = torch.randint(0, schedule.n_timesteps, (batch_size,), device=dev)
            eps = torch.randn_like(z0)
            with autocast(precision, dev):
                eps_hat = model(schedule.q_sample(z0, t, eps), t, c)
            loss = latent_loss(eps, eps_hat)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema.update(model)
            return float(loss.detach())
    else:
        ae.train()
        disc = PatchGANDiscriminator(**model_config(prof.name, "discriminator")).to(dev).train()
        opt_ae = torch.optim.Adam(ae.parameters(), lr=1e-5, betas=(0.5, 0.9))
        opt_d = torch.optim.Adam(disc.parameters(), lr=1e-5, betas=(0.5, 0.9))
        n_params = parameter_count("autoencoder", ae.config) + parameter_count("discriminator", disc.config)

        def step() -> float:
            with autocast(precision, dev):
                x_rec, codebook = ae(x)
                disc.requires_grad_(False)
                logits_fake = disc(x_rec)
                disc.requires_grad_(True)
            loss, _ = autoencoder_loss(x, x_rec, codebook, logits_fake, ae.last_layer, 1, 0)
            opt_ae.zero_grad(set_to_none=True)
            loss.backward()
            opt_ae.step()
            with autocast(precision, dev):
                logits = disc(torch.cat([x, x_rec.detach()]))
            d_loss = hinge_discriminator_loss(*logits.split(batch_size))
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            return float(loss.detach())

    for _ in range(warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    with _PeakMemory() as mem:
        start = time.perf_counter()
        for _ in range(steps):
            step()  # float(loss) synchronises the device every step
        elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else mem.peak_rss
    return {
        "profile": prof.name, "kind": kind, "batch_size": batch_size, "steps": steps, "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
        "threads": torch.get_num_threads(), "precision": precision, "notice": notice,
        "parameters": n_params, "slice_shape": [h, w], "seconds_per_step": elapsed / steps,
        "steps_per_s": steps / elapsed, "slices_per_s": steps * batch_size / elapsed,
        "peak_memory_bytes": int(peak),
        "peak_memory_kind": "CUDA max_memory_allocated" if dev.type == "cuda" else "process peak RSS",
    }


def format_bench_train(result: dict[str, Any]) -> str:
    """Human-readable report of `bench_train` for the CLI."""
    r = result
    lines = [(f"train benchmark: {r['kind']} ({r['parameters'] / 1e6:.1f} M parameters), {r['profile']} profile "
              f"{r['slice_shape'][0]}×{r['slice_shape'][1]} slices, batch {r['batch_size']}, {r['precision']}, "
              f"{r['device_name']} [{r['device']}], {r['threads']} threads")]
    if r.get("notice"):
        lines.append(f"  note: {r['notice']}")
    lines += [(f"  {r['steps_per_s']:8.3f} steps/s   ({r['seconds_per_step']:.2f} s per step, "
               f"{r['slices_per_s']:.1f} slices/s, {r['steps']} timed steps)"),
              f"  {r['peak_memory_bytes'] / 1024**3:8.2f} GiB peak memory ({r['peak_memory_kind']})"]
    return "\n".join(lines)


# synthesis ---------------------------------------------------------------------------------------
#: Nominal DWI/ADC ranges for a randomly initialised bench model (timings do not depend on them).
_BENCH_NORMALISATION = {"dwi": {"lo": 50.0, "hi": 220.0}, "adc": {"lo": 420.0, "hi": 2890.0}}


def _random_model(profile: str, device: Any) -> Any:
    """A `LoadedModel` of the profile's networks with random weights, on ``device``."""
    from ctp2mri.diffusion import NoiseSchedule
    from ctp2mri.inference import LoadedModel
    from ctp2mri.models.configs import build_network, model_config

    nets = {kind: build_network(kind, model_config(profile, kind)).to(device).eval().requires_grad_(False)
            for kind in ("cldm", "autoencoder")}
    return LoadedModel(cldm=nets["cldm"], autoencoder=nets["autoencoder"],
                       schedule=NoiseSchedule().to(device), normalisation=_BENCH_NORMALISATION,
                       profile=profile, config={"kind": "cldm", "profile": profile}, device=device,
                       weights="random", path=None)


def _denoiser_flops(model: Any, height: int, width: int) -> int | None:
    """FLOPs of one denoiser call on one slice (torch's counter of conv/matmul FLOPs)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    latent = model.autoencoder.latent_shape(height, width)
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            c = model.cldm.encode_condition(torch.zeros((1, model.cldm.condition_channels, height, width),
                                                        device=model.device))
            model.cldm.predict_noise(torch.zeros((1, *latent), device=model.device),
                                     torch.full((1,), 500, device=model.device), c)
        return int(counter.get_total_flops())
    except (RuntimeError, NotImplementedError):  # best effort: an op without a formula must not stop the bench
        return None


def bench_synthesize(model: str | os.PathLike | None = None, profile: str = "demo",
                     steps: tuple[int, ...] = (50, 20), samplers: tuple[str, ...] = ("ddim", "dpm++2m"),
                     device: str = "auto", precision: str = "fp32", naive: bool = True,
                     peak_tflops: float | None = None, threads: int | None = None,
                     seed: int = 0) -> dict[str, Any]:
    """Seconds per volume, slices/s and peak memory of `ctp2mri.synthesize.synthesize`.

    The input is a digital-phantom case of the profile (its brain mask given, so the timing
    is the engine's). Each (sampler, steps) pair — ``steps[i]`` for ``samplers[i]`` — runs
    once batched (batch size from free memory, as the engine picks it) and, with ``naive``,
    once more at one slice per network call: same network, steps and slices, so the ratio
    of the two sampling times is the batching speed-up, measured in the same run.

    Parameters
    ----------
    model
        A cLDM checkpoint folder; None builds the profile's networks with random weights
        (timings do not depend on the weights; the output says so).
    profile
        Profile of the random model (a checkpoint brings its own).
    steps, samplers
        Paired: the default times DDIM-50 and DPM-Solver++(2M)-20.
    device, precision
        As `synthesize`.
    naive
        Also time the one-slice-at-a-time loop.
    peak_tflops
        The device's peak dense TFLOP/s at the chosen precision (e.g. 989 for an H100 SXM in
        bf16), to report the achieved fraction; None reports achieved TFLOP/s only.
    threads
        torch's CPU threads for the run (None: leave torch's setting). On a machine shared
        with other work, 1 thread avoids the intra-op pool's contention and gives steadier
        figures.
    """
    import torch

    if threads is None:
        return _bench_synthesize(model, profile, steps, samplers, device, precision, naive,
                                 peak_tflops, seed)
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        return _bench_synthesize(model, profile, steps, samplers, device, precision, naive,
                                 peak_tflops, seed)
    finally:
        torch.set_num_threads(before)


def _bench_synthesize(model: str | os.PathLike | None, profile: str, steps: tuple[int, ...],
                      samplers: tuple[str, ...], device: str, precision: str, naive: bool,
                      peak_tflops: float | None, seed: int) -> dict[str, Any]:
    import torch

    from ctp2mri.devices import resolve_device_with_notice
    from ctp2mri.inference import load_model
    from ctp2mri.phantom import generate_case
    from ctp2mri.synthesize import synthesize

    if len(steps) != len(samplers):
        raise ValueError(f"steps {steps} and samplers {samplers} must pair up one to one")
    dev, notice = resolve_device_with_notice(device)
    loaded = _random_model(profile, dev) if model is None else load_model(model, dev)
    case = generate_case(seed, profile=loaded.profile)
    common = {"brain_mask": case.mask, "device": dev, "precision": precision, "seed": seed}
    synthesize(case.ctp, loaded, sampler=samplers[-1], steps=1, **common)  # warm-up (allocator, cuDNN)
    height, width = case.ctp.spatial_shape[:2]
    flops = _denoiser_flops(loaded, height, width)

    runs = []
    for sampler, n_steps in zip(samplers, steps):
        row: dict[str, Any] = {"sampler": sampler, "steps": int(n_steps)}
        for mode in ("batched", "naive") if naive else ("batched",):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)
            with _PeakMemory() as mem:
                started = time.perf_counter()
                r = synthesize(case.ctp, loaded, sampler=sampler, steps=n_steps,
                               batch_size=1 if mode == "naive" else None, **common)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                total = time.perf_counter() - started
            sample_s = r.report["timings_s"]["sample_s"]
            peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else mem.peak_rss
            row[mode] = {"seconds_per_volume": total, "sample_s": sample_s,
                         "slices_per_s": r.report["slices_sampled"] / sample_s,
                         "batch_size": r.report["batch_size"], "network_calls": r.report["network_calls"],
                         "peak_memory_bytes": int(peak)}
            if flops:
                tflops = flops * r.report["slices_sampled"] * n_steps / sample_s / 1e12
                row[mode]["denoiser_tflops"] = tflops
                if peak_tflops:
                    row[mode]["fraction_of_peak"] = tflops / peak_tflops
        if naive:
            row["speedup_over_naive"] = row["naive"]["sample_s"] / row["batched"]["sample_s"]
        runs.append(row)
    return {
        "profile": loaded.profile, "model": "random weights (timings do not depend on weights)"
        if model is None else os.fspath(model),
        "device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU",
        "threads": torch.get_num_threads(), "precision": precision if dev.type == "cuda" else "fp32",
        "notice": notice, "parameters": sum(p.numel() for p in loaded.cldm.parameters()),
        "slice_shape": [int(height), int(width)], "slices": r.report["slices_sampled"],
        "denoiser_gflops_per_slice": flops / 1e9 if flops else None,
        "peak_memory_kind": "CUDA max_memory_allocated" if dev.type == "cuda" else "process peak RSS",
        "runs": runs,
    }


def format_bench_synthesize(result: dict[str, Any]) -> str:
    """Human-readable report of `bench_synthesize` for the CLI."""
    r = result
    lines = [(f"synthesize benchmark: {r['profile']} profile ({r['parameters'] / 1e6:.1f} M-parameter "
              f"denoiser, {r['model']}), {r['slices']} brain slices of {r['slice_shape'][0]}×"
              f"{r['slice_shape'][1]}, {r['precision']}, {r['device_name']} [{r['device']}], "
              f"{r['threads']} threads")]
    if r.get("notice"):
        lines.append(f"  note: {r['notice']}")
    for run in r["runs"]:
        name = f"{'DDIM' if run['sampler'] == 'ddim' else 'DPM-Solver++(2M)'}-{run['steps']}"
        for mode in ("batched", "naive"):
            m = run.get(mode)
            if m is None:
                continue
            extra = ""
            if "denoiser_tflops" in m:  # denoiser arithmetic rate (conv/matmul FLOPs counted by torch)
                rate = m["denoiser_tflops"]
                extra = f", {rate:.1f} TFLOP/s" if rate >= 0.1 else f", {rate * 1e3:.1f} GFLOP/s"
            if "fraction_of_peak" in m:
                extra += f" ({m['fraction_of_peak']:.1%} of peak)"
            lines.append(f"  {name:<22} {mode:<7} {m['seconds_per_volume']:7.2f} s/volume "
                         f"(sampling {m['sample_s']:.2f} s, {m['slices_per_s']:.2f} slices/s, batch "
                         f"{m['batch_size']}), peak {m['peak_memory_bytes'] / 1024**3:.2f} GiB{extra}")
        if "speedup_over_naive" in run:
            lines.append(f"  {'':<22} batched sampling is {run['speedup_over_naive']:.2f}× the "
                         "one-slice-at-a-time loop")
    lines.append(f"  peak memory: {r['peak_memory_kind']}")
    return "\n".join(lines)
