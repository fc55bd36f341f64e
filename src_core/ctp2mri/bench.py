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
