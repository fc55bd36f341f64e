"""`ctp2mri bench perfusion`: seconds per case on the model grid, and a clinical-size series
end to end (load → brain mask → maps → NIfTI on the CT's grid) with its peak memory.

The clinical-size input is a phantom case (paper grid, with arteries, sinuses and a stroke)
resampled frame by frame onto a 512 × 512 × 320 grid of 0.47 × 0.47 × 1 mm and written as
uncompressed int16 NIfTI, so that it is memory-mapped as a scanner's export would be; writing
it is not timed. Targets: a model-grid case in < 2 s; the clinical series in < 60 s with a
peak memory below 1.5 × the input.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ctp2mri.bench.memory import PeakMemory, drop_from_page_cache
from ctp2mri.io.atomic import atomic_path

MODEL_GRID_SEED = 5  # the napari sample: a left-MCA stroke with a 68 ml core
TARGETS = {"model_grid_s": 2.0, "clinical_s": 60.0, "peak_rss_ratio": 1.5}


def write_clinical_ctp(path: str | os.PathLike, shape: tuple[int, int, int] = (512, 512, 320),
                       spacing: tuple[float, float, float] = (0.47, 0.47, 1.0), seed: int = MODEL_GRID_SEED) -> Path:
    """A phantom case resampled onto a clinical grid, written as uncompressed int16 NIfTI one frame at a time."""
    import SimpleITK as sitk

    from ctp2mri.bench.synthetic_head import centred_affine
    from ctp2mri.io.itk import frame_to_sitk, set_sitk_geometry
    from ctp2mri.phantom import generate_case

    case = generate_case(seed, "paper")
    ctp = case.ctp
    shape = tuple(int(s) for s in shape)
    affine = centred_affine(shape, spacing)
    centre = ctp.affine[:3, :3] @ ((np.asarray(ctp.spatial_shape) - 1) / 2.0) + ctp.affine[:3, 3]
    affine[:3, 3] += centre  # the head in the middle of the field of view
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape(shape + (ctp.n_frames,))
    interval = float(np.median(np.diff(ctp.frame_times)))
    header.set_zooms(tuple(spacing) + (interval,))
    header.set_xyzt_units("mm", "sec")
    header.set_sform(affine, code=1)
    header.set_qform(affine, code=1)
    reference = set_sitk_geometry(sitk.Image([1, 1, 1], sitk.sitkFloat32), affine)
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            header.write_to(f)
            offset = header.get_data_offset()
        data = np.memmap(tmp, dtype=np.int16, mode="r+", offset=offset, shape=shape + (ctp.n_frames,), order="F")
        for t in range(ctp.n_frames):
            frame = frame_to_sitk(np.asarray(ctp.array[..., t], dtype=np.float32), ctp.affine)
            moved = sitk.Resample(frame, list(shape), sitk.Transform(), sitk.sitkLinear, reference.GetOrigin(),
                                  reference.GetSpacing(), reference.GetDirection(), 0.0, sitk.sitkFloat32)
            data[..., t] = np.rint(np.transpose(sitk.GetArrayViewFromImage(moved), (2, 1, 0)))
        data.flush()
        del data
    return path


def bench_perfusion(repeats: int = 3, clinical: bool = True, shape: tuple[int, int, int] = (512, 512, 320),
                    spacing: tuple[float, float, float] = (0.47, 0.47, 1.0),
                    workdir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Time the model-grid analysis (median of ``repeats``) and, with ``clinical``, the
    clinical-size series end to end; see the module docstring."""
    from ctp2mri.io import load_volume
    from ctp2mri.perfusion import analyse_perfusion
    from ctp2mri.perfusion.output import write_perfusion
    from ctp2mri.phantom import generate_case

    if clinical and workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)  # before the model-grid runs: fail fast
    case = generate_case(MODEL_GRID_SEED, "demo")
    times = []
    for _ in range(int(repeats)):
        start = time.perf_counter()
        analyse_perfusion(case.ctp, case.mask)
        times.append(time.perf_counter() - start)
    result: dict[str, Any] = {"model_grid": {"shape": list(case.ctp.array.shape), "runs_s": [round(t, 3) for t in times],
                                             "median_s": round(statistics.median(times), 3)},
                              "cpu_count": os.cpu_count(), "targets": TARGETS}
    if clinical:
        root = Path(tempfile.mkdtemp(prefix="ctp2mri-bench-perfusion-", dir=workdir))
        try:
            path = root / "ctp.nii"
            start = time.perf_counter()
            write_clinical_ctp(path, shape, spacing)
            generate_s = time.perf_counter() - start
            cold = drop_from_page_cache(path)
            input_bytes = int(np.prod(shape)) * case.ctp.n_frames * 2
            stages: dict[str, float] = {}
            with PeakMemory() as memory:
                clock = time.perf_counter()
                ctp = load_volume(path)
                stages["load"] = time.perf_counter() - clock
                clock = time.perf_counter()
                analysis = analyse_perfusion(ctp)
                stages["analyse"] = time.perf_counter() - clock
                clock = time.perf_counter()
                write_perfusion(analysis, root / "out", figure=False)
                stages["write"] = time.perf_counter() - clock
            total = sum(stages.values())
            result["clinical"] = {
                "shape": list(shape), "spacing": list(spacing), "frames": int(case.ctp.n_frames),
                "input_bytes": input_bytes, "generate_s": round(generate_s, 1), "cold_cache": bool(cold),
                "stages_s": {k: round(v, 2) for k, v in stages.items()}, "total_s": round(total, 2),
                "working_block": list(analysis.factors), "core_ml": round(analysis.regions.core_ml, 1),
                "hypoperfusion_ml": round(analysis.regions.hypoperfusion_ml, 1),
                "peak_rss_bytes": memory.peak_rss, "peak_rss_ratio": round(memory.peak_rss / input_bytes, 3),
                "peak_anon_bytes": memory.peak_anon, "peak_anon_ratio": round(memory.peak_anon / input_bytes, 3),
            }
            del ctp, analysis
        finally:
            shutil.rmtree(root, ignore_errors=True)
    model_ok = result["model_grid"]["median_s"] < TARGETS["model_grid_s"]
    clinical_ok = not clinical or (result["clinical"]["total_s"] < TARGETS["clinical_s"]
                                   and result["clinical"]["peak_rss_ratio"] < TARGETS["peak_rss_ratio"])
    result["meets_targets"] = bool(model_ok and clinical_ok)
    return result


def format_bench(result: dict[str, Any]) -> str:
    """Human-readable report of `bench_perfusion` for the CLI."""
    gib = 1024**3
    m = result["model_grid"]
    lines = [f"perfusion benchmark ({result['cpu_count']} CPUs)",
             f"  model grid {tuple(m['shape'])}: median {m['median_s']:.2f} s over {len(m['runs_s'])} runs "
             f"(target < {TARGETS['model_grid_s']:g} s: {'ok' if m['median_s'] < TARGETS['model_grid_s'] else 'over target'})"]
    c = result.get("clinical")
    if c:
        lines.append(f"  clinical {'×'.join(map(str, c['shape']))} × {c['frames']} frames int16 "
                     f"({c['input_bytes'] / gib:.2f} GiB, {'cold' if c['cold_cache'] else 'warm'} page cache; "
                     f"writing it took {c['generate_s']:.0f} s, not counted), working grid block {tuple(c['working_block'])}")
        lines += [f"    {name:<10}{seconds:8.2f} s" for name, seconds in c["stages_s"].items()]
        ok = "ok" if c["total_s"] < TARGETS["clinical_s"] else "over target"
        lines.append(f"    {'total':<10}{c['total_s']:8.2f} s   (target < {TARGETS['clinical_s']:g} s: {ok})")
        ok = "ok" if c["peak_rss_ratio"] < TARGETS["peak_rss_ratio"] else "over target"
        lines.append(f"    peak RSS {c['peak_rss_bytes'] / gib:.2f} GiB = {c['peak_rss_ratio']:.2f} × input "
                     f"(target < {TARGETS['peak_rss_ratio']:g}: {ok}); anonymous {c['peak_anon_ratio']:.2f} × input")
        lines.append(f"    core {c['core_ml']:.1f} ml, hypoperfusion {c['hypoperfusion_ml']:.1f} ml")
    return "\n".join(lines)
