"""`ctp2mri bench synthesize`: seconds per volume, slices/s, batched vs one slice at a time."""

from __future__ import annotations

import os
import time
from typing import Any

from ctp2mri.bench.memory import PeakMemory

# synthesis ---------------------------------------------------------------------------------------
#: Nominal DWI/ADC ranges for a randomly initialised bench model (timings do not depend on them).
_BENCH_NORMALISATION = {"dwi": {"lo": 50.0, "hi": 220.0}, "adc": {"lo": 420.0, "hi": 2890.0}}


def _random_model(profile: str, device: Any) -> Any:
    """A `LoadedModel` of the profile's networks with random weights, on ``device``."""
    from ctp2mri.diffusion import NoiseSchedule
    from ctp2mri.models.configs import build_network, model_config
    from ctp2mri.synthesis.loading import LoadedModel

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
                                                        device=model.device),
                                            0.0 if model.cldm.takes_context else None)
            t = torch.full((1,), 500, device=model.device)
            model.cldm.predict_noise(torch.zeros((1, *latent), device=model.device), t, c,
                                     model.schedule.alphas_cumprod[t])
        return int(counter.get_total_flops())
    except (RuntimeError, NotImplementedError):  # best effort: an op without a formula must not stop the bench
        return None


def bench_synthesize(model: str | os.PathLike | None = None, profile: str = "demo",
                     steps: tuple[int, ...] = (50, 20), samplers: tuple[str, ...] = ("ddim", "dpm++2m"),
                     device: str = "auto", precision: str = "fp32", naive: bool = True,
                     peak_tflops: float | None = None, threads: int | None = None,
                     seed: int = 0) -> dict[str, Any]:
    """Seconds per volume, slices/s and peak memory of `ctp2mri.synthesis.synthesize.synthesize`.

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
    from ctp2mri.phantom import generate_case
    from ctp2mri.synthesis.loading import load_model
    from ctp2mri.synthesis.sample_settings import SampleSettings
    from ctp2mri.synthesis.synthesize import synthesize

    if len(steps) != len(samplers):
        raise ValueError(f"steps {steps} and samplers {samplers} must pair up one to one")
    dev, notice = resolve_device_with_notice(device)
    loaded = _random_model(profile, dev) if model is None else load_model(model, dev)
    case = generate_case(seed, profile=loaded.profile)
    base = SampleSettings(precision=precision, seed=seed)
    # warm-up: the allocator and cuDNN's choices, outside the timings
    synthesize(case.ctp, loaded, base, sampler=samplers[-1], steps=1, brain_mask=case.mask)
    height, width = case.ctp.spatial_shape[:2]
    flops = _denoiser_flops(loaded, height, width)

    runs = []
    for sampler, n_steps in zip(samplers, steps):
        row: dict[str, Any] = {"sampler": sampler, "steps": int(n_steps)}
        for mode in ("batched", "naive") if naive else ("batched",):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)
            with PeakMemory() as mem:
                started = time.perf_counter()
                r = synthesize(case.ctp, loaded, base, sampler=sampler, steps=n_steps,
                               batch_size=1 if mode == "naive" else None, brain_mask=case.mask)
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
