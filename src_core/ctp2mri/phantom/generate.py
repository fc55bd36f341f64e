"""Generate phantom cases and datasets: paired CT perfusion and diffusion MRI with ground truth.

One integer seed fixes a whole case. It is split (numpy ``SeedSequence``) into independent
streams, one per component, and every grid-independent parameter is drawn before any per-voxel
noise, so a seed describes the same patient on the ``demo`` and the ``paper`` grid and the same
seed always gives bit-identical arrays.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctp2mri.casefolder import CASE_INFO, Case, write_case
from ctp2mri.errors import InputError
from ctp2mri.io.atomic import atomic_path, ensure_writable_dir
from ctp2mri.io.volume import Volume
from ctp2mri.phantom.anatomy import model_grid, random_deformation, random_misalignment, sample_tissue, tissue_templates
from ctp2mri.phantom.diffusion import draw_diffusion_params, diffusion_images
from ctp2mri.phantom.lesions import CORE, PENUMBRA, calibrate_levels, draw_lesion_plan
from ctp2mri.phantom.perfusion import arterial_input, ctp_curves, draw_perfusion_params
from ctp2mri.profiles import get_profile
from ctp2mri.progress import CancelToken, ProgressCallback

PHANTOM_VERSION = "1.0"
DEFAULT_FRAME_INTERVAL_S = 3.0
ACQUISITION_WINDOW_S = 42.0  # the paper scanner's 15 frames, every 3 s from 0 s
MAX_ACQUISITION_S = 300.0
SPLIT_FRACTIONS = {"val": 0.15, "test": 0.15}
SPLITS_FILE = "splits.json"
_STREAMS = ("anatomy", "lesion", "perfusion", "diffusion", "misalignment", "ctp_noise", "mri_noise")


@dataclass
class PhantomCase:
    """A generated case and the ground-truth maps it was made from.

    ``maps`` holds volumes on the case's grid: ``core``, ``penumbra`` (uint8) and
    ``ischaemia_level`` (0 normal, 1–2 penumbra, ≥ 2 core) on the MRI geometry; ``gm``, ``wm``,
    ``csf`` fractions; ``b0`` (noisy), ``b0_true``, ``dwi_true``, ``adc_true`` (noise-free); and on
    the CT-perfusion geometry (misaligned by under a voxel) ``cbf`` (ml/100 g/min), ``cbv``
    (ml/100 g), ``mtt`` (s), ``tmax`` (s), ``penumbra_ctp``, ``ctp_brain``.
    """

    case: Case
    maps: dict[str, Volume]


def frame_times(n_frames: int = 15, frame_interval: float | None = None) -> np.ndarray:
    """Acquisition times (s) of the CT-perfusion frames.

    By default 15 frames every 3 s from 0 s; other counts spread over the same 42 s window, so
    that resampling to the model's 15 frames has something real to do.
    """
    if isinstance(n_frames, bool) or not isinstance(n_frames, (int, np.integer)) or n_frames < 2:
        raise InputError(f"n_frames must be an integer ≥ 2 (CT perfusion needs a time course), got {n_frames!r}")
    if frame_interval is None:
        frame_interval = ACQUISITION_WINDOW_S / (n_frames - 1)
    frame_interval = float(frame_interval)
    if not np.isfinite(frame_interval) or frame_interval <= 0:
        raise InputError(f"frame_interval must be a positive number of seconds, got {frame_interval!r}")
    if frame_interval * (n_frames - 1) > MAX_ACQUISITION_S:
        raise InputError(
            f"{n_frames} frames every {frame_interval:g} s last {frame_interval * (n_frames - 1):g} s; "
            f"the phantom simulates at most {MAX_ACQUISITION_S:g} s, use fewer frames or a shorter interval"
        )
    return np.arange(n_frames) * frame_interval


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def simulate_case(
    seed: int, profile: str = "demo", n_frames: int = 15, frame_interval: float | None = None
) -> PhantomCase:
    """Simulate one case and keep the ground-truth maps (see `PhantomCase`)."""
    seed = _check_seed(seed)
    prof = get_profile(profile)
    times = frame_times(n_frames, frame_interval)
    shape, affine = model_grid(prof)
    voxel_ml = float(np.prod(prof.spacing)) / 1000.0
    templates = tissue_templates(prof.name)
    rng = dict(zip(_STREAMS, (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(len(_STREAMS)))))

    # Grid-independent draws first.
    deformation = random_deformation(rng["anatomy"])
    misalignment = random_misalignment(rng["misalignment"], prof.spacing)
    plan = draw_lesion_plan(rng["lesion"])
    perfusion = draw_perfusion_params(rng["perfusion"])
    scanner = draw_diffusion_params(rng["diffusion"])

    # The MRI grid is the ground truth; the CT sees the same head moved by under a voxel.
    mri = sample_tissue(templates, deformation.template_points(shape, affine))
    ctp = sample_tissue(templates, deformation.template_points(shape, affine, misalignment))
    score_mri = plan.score(mri.points, mri.gm + mri.wm)
    levels = calibrate_levels(plan, score_mri, voxel_ml)
    level_mri = levels.level(score_mri)
    level_ctp = levels.level(plan.score(ctp.points, ctp.gm + ctp.wm))

    hu, perf_maps = ctp_curves(ctp, level_ctp, plan, perfusion, times, rng["ctp_noise"])
    images, dwi_sigma = diffusion_images(mri.fractions, level_mri, plan, scanner, rng["mri_noise"])

    core = level_mri >= CORE
    penumbra = (level_mri >= PENUMBRA) & ~core
    core_grid = mri.scatter(core, dtype=np.uint8)
    slices_with_core = int(np.count_nonzero(core_grid.any(axis=(0, 1))))
    slices_with_brain = int(np.count_nonzero(mri.brain.any(axis=(0, 1))))

    info: dict[str, Any] = {
        "generator": "ctp2mri.phantom",
        "phantom_version": PHANTOM_VERSION,
        "seed": seed,
        "profile": prof.name,
        "spacing_mm": list(prof.spacing),
        "shape": list(shape),
        "lesion_ml": round(float(core.sum() * voxel_ml), 4),
        "penumbra_ml": round(float(penumbra.sum() * voxel_ml), 4),
        "slices_with_lesion": slices_with_core,
        "slices_with_brain": slices_with_brain,
        "brain_ml": round(float(mri.brain.sum() * voxel_ml), 2),
        **plan.describe(),
        "planned_core_ml": round(plan.core_ml, 4),
        "planned_penumbra_ml": round(plan.penumbra_ml, 4),
        **perfusion.describe(),
        "frame_times": [round(float(t), 6) for t in times],
        "aif_hu": [round(float(v), 3) for v in arterial_input(times, perfusion)],
        **scanner.describe(),
        "dwi_noise_sigma": round(dwi_sigma, 4),
        "misalignment": {"shift_mm": np.round(misalignment.shift_mm, 4).tolist(),
                         "rotation_deg": np.round(misalignment.rotation_deg, 4).tolist()},
        "deformation": deformation.describe(),
    }

    def vol(array: np.ndarray, **meta: Any) -> Volume:
        return Volume(array, affine.copy(), meta={"source": "ctp2mri phantom", "seed": seed, **meta})

    ctp_array = ctp.scatter(hu)  # skull-stripped: 0 outside the brain, like the registered paper data
    case = Case(
        ctp=Volume(ctp_array, affine.copy(), frame_times=times,
                   meta={"source": "ctp2mri phantom", "seed": seed, "modality": "CTP", "units": "HU"}),
        dwi=vol(mri.scatter(images["dwi"]), modality="DWI", b_value=scanner.b_value),
        adc=vol(mri.scatter(images["adc"]), modality="ADC", units="1e-6 mm2/s"),
        lesion=vol(core_grid, modality="lesion"),
        mask=vol(mri.brain.astype(np.uint8), modality="brain mask"),
        info=info,
    )
    maps = {
        "core": vol(core_grid),
        "penumbra": vol(mri.scatter(penumbra, dtype=np.uint8)),
        "ischaemia_level": vol(mri.scatter(level_mri.astype(np.float32))),
        "gm": vol(mri.scatter(mri.gm)),
        "wm": vol(mri.scatter(mri.wm)),
        "csf": vol(mri.scatter(mri.csf)),
        **{k: vol(mri.scatter(images[k])) for k in ("b0", "b0_true", "dwi_true", "adc_true")},
        **{k: vol(ctp.scatter(v), geometry="ctp") for k, v in perf_maps.items()},
        "penumbra_ctp": vol(ctp.scatter((level_ctp >= PENUMBRA) & (level_ctp < CORE), dtype=np.uint8)),
        "ctp_brain": vol(ctp.brain.astype(np.uint8)),
    }
    return PhantomCase(case, maps)


def generate_case(
    seed: int, profile: str = "demo", n_frames: int = 15, frame_interval: float | None = None
) -> Case:
    """Generate one paired phantom case.

    Parameters
    ----------
    seed
        Non-negative integer; the same seed gives bit-identical arrays.
    profile
        Model grid: ``"demo"`` (2 × 2 × 5 mm, 96 × 112) or ``"paper"`` (1 × 1 × 5 mm, 192 × 224).
    n_frames
        CT-perfusion time points.
    frame_interval
        Seconds between frames; by default 3 s for 15 frames, else the 42 s window spread evenly.

    Returns
    -------
    Case
        ``ctp`` (4-D float32 HU with ``frame_times``), ``dwi``, ``adc`` (float32, 10⁻⁶ mm²/s),
        ``lesion`` (core, uint8), ``mask`` (brain, uint8) and ``info`` with the ground truth.
    """
    return simulate_case(seed, profile, n_frames, frame_interval).case


def phantom_maps(
    seed: int, profile: str = "demo", n_frames: int = 15, frame_interval: float | None = None
) -> dict[str, Volume]:
    """Ground-truth maps of the case ``generate_case`` makes from the same arguments.

    See `PhantomCase` for the keys (core/penumbra masks, tissue fractions, CBF, CBV, MTT, Tmax,
    noise-free diffusion images).
    """
    return simulate_case(seed, profile, n_frames, frame_interval).maps


# datasets --------------------------------------------------------------------------------------
def case_seed(seed: int, index: int) -> int:
    """Seed of case ``index`` of a dataset: independent of how many cases are generated."""
    state = np.random.SeedSequence(_check_seed(seed), spawn_key=(0, int(index))).generate_state(1, np.uint32)
    return int(state[0])


def split_cases(names: list[str], seed: int) -> dict[str, list[str]]:
    """Deterministic ~70/15/15 train/val/test split; at least one test case from three cases on."""
    n = len(names)
    order = np.random.default_rng(np.random.SeedSequence(_check_seed(seed), spawn_key=(1,))).permutation(n)

    def share(fraction: float, minimum_n: int) -> int:
        return max(1, int(np.floor(fraction * n + 0.5))) if n >= minimum_n else 0

    n_test = share(SPLIT_FRACTIONS["test"], 3)
    n_val = share(SPLIT_FRACTIONS["val"], 4)
    picked = [names[i] for i in order]
    return {
        "train": sorted(picked[n_test + n_val:]),
        "val": sorted(picked[n_test:n_test + n_val]),
        "test": sorted(picked[:n_test]),
    }


_CASE_NAME = re.compile(r"case_\d+$")


def _is_phantom_case(folder: Path) -> bool:
    try:
        return json.loads((folder / CASE_INFO).read_text()).get("generator") == "ctp2mri.phantom"
    except (OSError, ValueError, AttributeError):
        return False


def generate_dataset(
    out_dir: str | os.PathLike,
    n_cases: int,
    seed: int = 0,
    profile: str = "demo",
    n_frames: int = 15,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> Path:
    """Write ``n_cases`` phantom cases and a ``splits.json`` into ``out_dir``.

    Case ``i`` is ``out_dir/case_{i:03d}`` (atomic case folders, see `write_case`), generated
    from ``case_seed(seed, i)``, so the first cases of a larger dataset equal a smaller one's.
    ``splits.json`` is written last: a folder without it is an interrupted (or cancelled) run
    whose finished cases are complete but not yet a dataset.

    Parameters
    ----------
    out_dir
        Target folder; must be empty or absent unless ``overwrite``.
    n_cases
        Number of cases (≥ 1).
    seed
        Dataset seed.
    profile, n_frames
        Grid profile and CT-perfusion frame count of every case.
    overwrite
        Replace the phantom cases and ``splits.json`` already in ``out_dir``; case folders of
        an earlier, larger phantom dataset there are removed, anything else is left alone.
    progress, cancel
        Called after every case / checked before every case.

    Returns
    -------
    Path
        The ``splits.json`` written.
    """
    if isinstance(n_cases, bool) or not isinstance(n_cases, (int, np.integer)) or n_cases < 1:
        raise InputError(f"n_cases must be a positive integer, got {n_cases!r}")
    seed = _check_seed(seed)
    prof = get_profile(profile)
    times = frame_times(n_frames)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} is a file; give a folder for the dataset")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(
            f"output folder {out} is not empty; choose a new or empty folder, or overwrite "
            "(--overwrite) to replace the phantom dataset in it"
        )
    ensure_writable_dir(out)

    width = max(3, len(str(n_cases - 1)))
    names = [f"case_{i:0{width}d}" for i in range(n_cases)]
    seeds = {name: case_seed(seed, i) for i, name in enumerate(names)}
    for i, name in enumerate(names):
        if cancel is not None:
            cancel.raise_if_cancelled()
        case = generate_case(seeds[name], prof.name, n_frames)
        case.info.update(case=name, dataset_seed=seed, index=i)
        write_case(case, out / name, overwrite=overwrite)
        if progress is not None:
            progress(i + 1, n_cases, {"case": name, "lesion_ml": case.info["lesion_ml"]})

    if overwrite:  # an earlier, larger phantom run would otherwise leave extra cases behind
        for stale in out.iterdir():
            if stale.is_dir() and _CASE_NAME.match(stale.name) and stale.name not in seeds and _is_phantom_case(stale):
                shutil.rmtree(stale)

    splits = {
        **split_cases(names, seed),
        "seed": seed,
        "profile": prof.name,
        "n_frames": int(n_frames),
        "frame_times": times.tolist(),
        "phantom_version": PHANTOM_VERSION,
        "case_seeds": seeds,
    }
    path = out / SPLITS_FILE
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(splits, indent=2))
    return path
