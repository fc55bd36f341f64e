"""`ctp2mri bench preprocess`: load → brain mask → resample a clinical-size CTP.

Times the memory-critical front of preprocessing on a synthetic CTP (memory-mapped NIfTI)
and reports wall time per stage and peak memory relative to the input size.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ctp2mri.bench.memory import PeakMemory, drop_from_page_cache
from ctp2mri.bench.synthetic_head import write_synthetic_ctp


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
    from ctp2mri.preprocessing.brain_mask import brain_mask_from_ctp
    from ctp2mri.preprocessing.preprocess import AIR_HU, model_grid, resample_to_grid

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
        result["cold_cache"] = bool(cold and drop_from_page_cache(path))
        input_bytes = int(np.prod(shape)) * frames * 2
        stages: dict[str, float] = {}
        with PeakMemory() as memory:
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
