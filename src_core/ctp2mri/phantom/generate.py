"""Generate phantom cases: paired CT perfusion and diffusion MRI with ground truth.

One integer seed fixes a whole case. It is split (numpy ``SeedSequence``) into independent
streams, one per component, and every grid-independent parameter is drawn before any per-voxel
noise, so a seed describes the same patient on the ``demo`` and the ``paper`` grid and the same
seed always gives bit-identical arrays. Datasets of many cases: `ctp2mri.phantom.dataset`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ctp2mri.casefolder import Case
from ctp2mri.errors import InputError
from ctp2mri.io.volume import Volume
from ctp2mri.phantom.anatomy import (
    Deformation,
    Rigid,
    Tissue,
    model_grid,
    random_deformation,
    random_misalignment,
    sample_tissue,
    tissue_templates,
)
from ctp2mri.phantom.diffusion import (
    DiffusionParams,
    core_eligible,
    diffusion_images,
    draw_diffusion_params,
)
from ctp2mri.phantom.lesions import LesionPlan, calibrate_levels, draw_lesion_plan, lesion_masks
from ctp2mri.phantom.perfusion import (
    PerfusionParams,
    arterial_input,
    ctp_curves,
    draw_perfusion_params,
)
from ctp2mri.phantom.vessels import (
    BLOOD_BASELINE_HU,
    VEIN,
    VesselMap,
    VesselParams,
    blood_curves,
    draw_vessel_params,
    vessel_map,
)
from ctp2mri.profiles import Profile, get_profile

PHANTOM_VERSION = "2.0"  # 2.0: arteries and sinuses in the CT perfusion, truth/ maps in each case
#: Versions whose diffusion images equal this one's for the same seed (2.0 changed the CT only).
DIFFUSION_VERSIONS = ("1.0", "2.0")
ACQUISITION_WINDOW_S = 42.0  # the paper scanner's 15 frames, every 3 s from 0 s
MAX_ACQUISITION_S = 300.0
MAX_FRAMES = 120  # clinical protocols use 10–60; more only costs memory
# New streams go at the end: SeedSequence.spawn gives the earlier ones the same children.
_STREAMS = ("anatomy", "lesion", "perfusion", "diffusion", "misalignment", "ctp_noise", "mri_noise", "vessels")


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
        raise InputError(
            f"n_frames must be an integer ≥ 2 (CT perfusion needs a time course), got {n_frames!r}"
        )
    if n_frames > MAX_FRAMES:
        raise InputError(f"n_frames={n_frames}: the phantom makes at most {MAX_FRAMES} frames")
    if frame_interval is None:
        frame_interval = ACQUISITION_WINDOW_S / (n_frames - 1)
    frame_interval = float(frame_interval)
    if not np.isfinite(frame_interval) or frame_interval <= 0:
        raise InputError(
            f"frame_interval must be a positive number of seconds, got {frame_interval!r}"
        )
    if frame_interval * (n_frames - 1) > MAX_ACQUISITION_S:
        duration = frame_interval * (n_frames - 1)
        raise InputError(
            f"{n_frames} frames every {frame_interval:g} s last {duration:g} s; the phantom "
            f"simulates at most {MAX_ACQUISITION_S:g} s: use fewer frames or a shorter interval"
        )
    return np.arange(n_frames) * frame_interval


def check_seed(seed: Any) -> int:
    """``seed`` as an int, or `InputError` for anything but a non-negative integer."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


@dataclass
class _Draws:
    """Everything one seed decides before any grid is involved, and the noise generators."""

    seed: int
    deformation: Deformation
    misalignment: Rigid
    plan: LesionPlan
    perfusion: PerfusionParams
    scanner: DiffusionParams
    vessels: VesselParams
    ctp_noise: np.random.Generator
    mri_noise: np.random.Generator


def _draw(seed: int, prof: Profile) -> _Draws:
    children = np.random.SeedSequence(seed).spawn(len(_STREAMS))
    rng = {name: np.random.default_rng(child) for name, child in zip(_STREAMS, children)}
    return _Draws(
        seed=seed,
        deformation=random_deformation(rng["anatomy"]),
        misalignment=random_misalignment(rng["misalignment"], prof.spacing),
        plan=draw_lesion_plan(rng["lesion"]),
        perfusion=draw_perfusion_params(rng["perfusion"]),
        scanner=draw_diffusion_params(rng["diffusion"]),
        vessels=draw_vessel_params(rng["vessels"]),
        ctp_noise=rng["ctp_noise"],
        mri_noise=rng["mri_noise"],
    )


@dataclass
class _Geometry:
    """The case's tissue and lesion on the MRI grid (the truth) and, optionally, the CT grid."""

    shape: tuple[int, int, int]
    affine: np.ndarray
    voxel_ml: float
    mri: Tissue
    level_mri: np.ndarray
    core: np.ndarray  # per MRI brain voxel
    penumbra: np.ndarray
    ctp: Tissue | None = None
    level_ctp: np.ndarray | None = None
    ctp_points: np.ndarray | None = None  # (3, nx, ny, nz) MNI position of every CT voxel


def _geometry(draws: _Draws, prof: Profile, with_ctp: bool = True) -> _Geometry:
    shape, affine = model_grid(prof)
    voxel_ml = float(np.prod(prof.spacing)) / 1000.0
    templates = tissue_templates(prof.name)
    deformation, plan = draws.deformation, draws.plan
    elastic = deformation.elastic_field(shape, affine)
    mri = sample_tissue(templates, deformation.template_points(shape, affine, elastic=elastic))
    score = plan.score(mri.points)
    eligible = core_eligible(mri.fractions, plan, draws.scanner)
    levels = calibrate_levels(plan, score, eligible, mri.gm + mri.wm, voxel_ml)
    level_mri = levels.level(score)
    core, penumbra = lesion_masks(level_mri, eligible, mri.gm + mri.wm)
    geometry = _Geometry(shape, affine, voxel_ml, mri, level_mri, core, penumbra)
    if with_ctp:  # the CT sees the same head, moved by under a voxel
        points = deformation.template_points(shape, affine, draws.misalignment, elastic)
        ctp = sample_tissue(templates, points)
        geometry.ctp, geometry.level_ctp = ctp, levels.level(plan.score(ctp.points))
        geometry.ctp_points = points
    return geometry


def lesion_truth(seed: int, profile: str = "demo") -> dict[str, Volume]:
    """Core, penumbra and brain masks of case ``seed`` without synthesising its images.

    Equal to the masks `generate_case` writes for the same seed and profile, at a third of the
    cost; for lesion statistics over many cases.
    """
    prof = get_profile(profile)
    g = _geometry(_draw(check_seed(seed), prof), prof, with_ctp=False)
    return {
        "core": Volume(g.mri.scatter(g.core, dtype=np.uint8), g.affine),
        "penumbra": Volume(g.mri.scatter(g.penumbra, dtype=np.uint8), g.affine),
        "mask": Volume(g.mri.brain.astype(np.uint8), g.affine),
    }


def diffusion_truth(seed: int, profile: str = "demo") -> dict[str, Volume]:
    """DWI and ADC of case ``seed``, as `generate_case` writes them and noise-free.

    Keys ``dwi``, ``adc`` (equal to the case's images) and ``dwi_true``, ``adc_true`` (the same
    without Rician noise, with partial volume). The CT perfusion is not simulated, and the
    diffusion images do not depend on the frame count, so this takes a fraction of the cost.
    """
    prof = get_profile(profile)
    draws = _draw(check_seed(seed), prof)
    g = _geometry(draws, prof, with_ctp=False)
    images, _ = diffusion_images(g.mri.fractions, g.level_mri, draws.plan, draws.scanner, draws.mri_noise)
    return {k: Volume(g.mri.scatter(images[k]), g.affine.copy()) for k in ("dwi", "adc", "dwi_true", "adc_true")}


def simulate_case(
    seed: int, profile: str = "demo", n_frames: int = 15, frame_interval: float | None = None
) -> PhantomCase:
    """Simulate one case and keep the ground-truth maps (see `PhantomCase`).

    Arguments as `generate_case`.
    """
    seed = check_seed(seed)
    prof = get_profile(profile)
    times = frame_times(n_frames, frame_interval)
    draws = _draw(seed, prof)
    g = _geometry(draws, prof)
    mri, ctp, plan = g.mri, g.ctp, draws.plan

    hu, perfusion_maps, vessels, vof = _ctp_with_vessels(draws, g, prof, times)
    images, dwi_sigma = diffusion_images(
        mri.fractions, g.level_mri, plan, draws.scanner, draws.mri_noise
    )
    core = mri.scatter(g.core, dtype=np.uint8)

    core_ml = round(float(g.core.sum() * g.voxel_ml), 4)
    info: dict[str, Any] = {
        "generator": "ctp2mri.phantom",
        "phantom_version": PHANTOM_VERSION,
        "seed": seed,
        "profile": prof.name,
        "spacing_mm": list(prof.spacing),
        "shape": list(g.shape),
        "lesion_ml": core_ml,  # the lesion mask is the core
        "core_ml": core_ml,
        "penumbra_ml": round(float(g.penumbra.sum() * g.voxel_ml), 4),
        "slices_with_lesion": int(np.count_nonzero(core.any(axis=(0, 1)))),
        "slices_with_brain": int(np.count_nonzero(mri.brain.any(axis=(0, 1)))),
        "brain_ml": round(float(mri.brain.sum() * g.voxel_ml), 2),
        **plan.describe(),
        "planned_core_ml": round(plan.core_ml, 4),
        "planned_penumbra_ml": round(plan.penumbra_ml, 4),
        **draws.perfusion.describe(),
        "frame_times": [round(float(t), 6) for t in times],
        "aif_hu": [round(float(v), 3) for v in arterial_input(times, draws.perfusion)],
        "vof_hu": [round(float(v), 3) for v in vof],
        **draws.vessels.describe(),
        **draws.scanner.describe(),
        "dwi_noise_sigma": round(dwi_sigma, 4),
        "misalignment": {"shift_mm": np.round(draws.misalignment.shift_mm, 4).tolist(),
                         "rotation_deg": np.round(draws.misalignment.rotation_deg, 4).tolist()},
        "deformation": draws.deformation.describe(),
    }

    def vol(array: np.ndarray, frame_times: np.ndarray | None = None, **meta: Any) -> Volume:
        meta = {"source": "ctp2mri phantom", "seed": seed, **meta}
        return Volume(array, g.affine.copy(), frame_times=frame_times, meta=meta)

    case = Case(
        # Skull-stripped like the paper's registered data: 0 outside the brain.
        ctp=vol(hu, frame_times=times, modality="CTP", units="HU"),
        dwi=vol(mri.scatter(images["dwi"]), modality="DWI", b_value=draws.scanner.b_value),
        adc=vol(mri.scatter(images["adc"]), modality="ADC", units="1e-6 mm2/s"),
        lesion=vol(core, modality="lesion"),
        mask=vol(mri.brain.astype(np.uint8), modality="brain mask"),
        info=info,
    )
    ctp_eligible = core_eligible(ctp.fractions, plan, draws.scanner)
    ctp_penumbra = lesion_masks(g.level_ctp, ctp_eligible, ctp.gm + ctp.wm)[1]
    maps = {
        "core": vol(core),
        "penumbra": vol(mri.scatter(g.penumbra, dtype=np.uint8)),
        "ischaemia_level": vol(mri.scatter(g.level_mri.astype(np.float32))),
        "gm": vol(mri.scatter(mri.gm)),
        "wm": vol(mri.scatter(mri.wm)),
        "csf": vol(mri.scatter(mri.csf)),
        **{k: vol(mri.scatter(images[k])) for k in ("b0", "b0_true", "dwi_true", "adc_true")},
        **{k: vol(ctp.scatter(v), geometry="ctp") for k, v in perfusion_maps.items()},
        "penumbra_ctp": vol(ctp.scatter(ctp_penumbra, dtype=np.uint8), geometry="ctp"),
        "ctp_brain": vol(ctp.brain.astype(np.uint8), geometry="ctp"),
        "vessel_fraction": vol(vessels.fraction, geometry="ctp"),
        "vessels": vol(vessels.kind(), geometry="ctp"),
    }
    case.truth = {k: maps[k] for k in TRUTH_MAPS}
    return PhantomCase(case, maps)


#: Ground truth written into each case folder's truth/ (on the CT perfusion's geometry); never
#: read as a model input.
TRUTH_MAPS = ("cbf", "cbv", "mtt", "tmax", "vessels", "vessel_fraction")


def _ctp_with_vessels(draws: _Draws, g: _Geometry, prof: Profile, times: np.ndarray
                      ) -> tuple[np.ndarray, dict[str, np.ndarray], VesselMap, np.ndarray]:
    """The CT perfusion on the whole grid: tissue curves in the brain, blood mixed into the
    voxels the vessels cross (by their partial volume), then the noise over both.

    Returns the HU array (nx, ny, nz, T), the perfusion maps per brain voxel, the vessel map
    and the venous output function at the frame times (HU above the blood baseline).
    """
    ctp, p = g.ctp, draws.perfusion
    vessels = vessel_map(g.ctp_points, np.asarray(prof.spacing), draws.deformation, draws.vessels.radius_scale)
    share = 1.0 - vessels.fraction[ctp.brain]
    tissue_hu, maps = ctp_curves(ctp, g.level_ctp, draws.plan, p, times, None, tissue_share=share)
    dt = 0.1
    fine = arterial_input(np.arange(0.0, float(times.max()) + 30.0, dt), p)
    plan = draws.plan
    curves = blood_curves(vessels, fine, dt, times, draws.vessels,
                          plan.territory if plan.has_lesion else None, plan.hemisphere if plan.has_lesion else None)
    hu = ctp.scatter(tissue_hu)
    hit = vessels.fraction > 0
    blood = p.gain * (BLOOD_BASELINE_HU + curves[vessels.segment[hit]])
    hu[hit] += vessels.fraction[hit, None] * blood
    region = ctp.brain | hit
    hu[hit & ~ctp.brain] += p.offset_hu  # the tissue curves carry it already
    hu[region] += p.noise_sigma_hu * draws.ctp_noise.standard_normal((int(region.sum()), times.size),
                                                                      dtype=np.float32)
    vein = next(i for i, (seg, _) in enumerate(vessels.segments) if seg.kind == VEIN)
    return hu.astype(np.float32), maps, vessels, curves[vein]


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
