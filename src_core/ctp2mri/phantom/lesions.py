"""Ischaemic lesions: an infarct core inside a larger penumbra, in one vascular territory.

A lesion is a smooth random blob: an ellipsoid roughened by a smooth noise field, clipped to
one hemisphere and one vascular territory (large MCA-type, small deep lacunar, occipital
PCA-type). Its *score* rises towards the blob's centre; thresholds of the score picked on the
MRI grid make exactly the drawn core and penumbra volumes (counted in parenchyma only, see
`lesion_masks`), and the same thresholds turn the score into an *ischaemia level* everywhere:

====================  =================  ==========================================
level                 region             meaning
====================  =================  ==========================================
0                     normal tissue
0 … 1                 benign oligaemia   mildly delayed, CBF 70–100 %
1 … 2                 penumbra           CBF 70 → 30 %, Tmax 6 → 10 s, normal ADC
2 … 3                 core               CBF < 30 %, Tmax ≥ 10 s, restricted diffusion
====================  =================  ==========================================

Sizes are heavy-tailed (log-normal per territory) and some cases have no core (a share of
those still have a hypoperfused, not yet infarcted region: the case a model must not paint).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

from ctp2mri.phantom.fields import SmoothField, smooth_field

NORMAL, PENUMBRA, CORE, DEEPEST = 0.0, 1.0, 2.0, 3.0  # ischaemia levels (table above)
PENUMBRA_MIN_TISSUE = 0.5  # grey + white matter fraction of a voxel labelled penumbra


@dataclass(frozen=True)
class Territory:
    """A vascular territory as an ellipsoid in MNI mm, given for the right hemisphere."""

    centre: tuple[float, float, float]
    radii: tuple[float, float, float]
    # log-normal core volume: median (ml), log-sd, clip range (ml)
    core_median_ml: float
    core_log_sd: float
    core_range_ml: tuple[float, float]
    # extra penumbra beyond core × ratio, ml
    penumbra_extra_ml: tuple[float, float]


TERRITORIES: dict[str, Territory] = {
    # Lateral frontal, parietal and temporal lobes, insula and basal ganglia.
    "MCA": Territory((40.0, -12.0, 12.0), (38.0, 66.0, 50.0), 12.0, 1.7, (0.5, 300.0), (5.0, 40.0)),
    # Small deep infarcts: basal ganglia, internal capsule, thalamus, corona radiata.
    "lacunar": Territory((22.0, -10.0, 10.0), (11.0, 24.0, 18.0), 0.6, 0.6, (0.1, 3.0), (0.3, 2.0)),
    # Occipital lobe and the inferomedial temporal lobe.
    "PCA": Territory((20.0, -72.0, 4.0), (22.0, 30.0, 26.0), 5.0, 1.0, (0.5, 80.0), (2.0, 15.0)),
}
TERRITORY_WEIGHTS = {"MCA": 0.42, "lacunar": 0.43, "PCA": 0.15}
P_NO_HYPOPERFUSION = 0.15  # no lesion at all
P_PENUMBRA_ONLY = 0.10  # hypoperfused but no core yet (a TIA-like or very early case)


@dataclass(frozen=True)
class LesionPlan:
    """Everything drawn for one case's lesion, independent of the output grid."""

    territory: str  # a key of TERRITORIES, or "none"
    hemisphere: str  # "left", "right" or "none"
    core_ml: float  # wanted volumes (the grid realises them to within a voxel)
    penumbra_ml: float
    oligaemia_ml: float
    centre: np.ndarray  # (3,) MNI mm
    axes_mm: np.ndarray  # (3,) ellipsoid semi-axes before clipping
    rotation: np.ndarray  # (3, 3)
    irregularity: float  # amplitude of the roughening noise relative to the ellipsoid radius
    texture: SmoothField | None
    # severity of the ischaemia
    core_cbf_min: float  # relative CBF at the deepest core
    core_cbv_min: float  # relative CBV at the deepest core
    penumbra_cbv: float  # relative CBV in the penumbra (autoregulatory vasodilation)
    core_tmax_max: float  # Tmax (s) at the deepest core
    core_adc_factor: float  # core ADC / normal ADC
    core_t2_factor: float  # slight T2 prolongation of the core
    core_hypodensity_hu: float  # early ischaemic hypodensity on unenhanced CT

    @property
    def has_lesion(self) -> bool:
        return self.territory != "none"

    def score(self, points: np.ndarray) -> np.ndarray:
        """Lesion score of MNI ``points`` ``(3, n)``: higher towards the blob's centre, −inf outside
        its hemisphere and territory.

        The score depends on position only, so the perfusion deficit is one smooth field that
        also covers the CSF inside the lesion; tissue enters only the labels (`lesion_masks`).
        """
        if not self.has_lesion:
            return np.full(points.shape[1], -np.inf)
        terr = TERRITORIES[self.territory]
        side = 1.0 if self.hemisphere == "right" else -1.0
        t_centre = np.array(terr.centre) * np.array([side, 1.0, 1.0])
        relative = (points - t_centre[:, None]) / np.array(terr.radii)[:, None]
        in_territory = np.sum(relative**2, axis=0) <= 1.0
        allowed = in_territory & (side * points[0] > 0)
        local = self.rotation.T @ (points - self.centre[:, None]) / self.axes_mm[:, None]
        distance = np.sqrt(np.sum(local**2, axis=0))
        # Roughen the radius multiplicatively: every level set stays one star-shaped blob, the
        # core compact in the middle, the large outer penumbra the most irregular.
        if self.texture is not None:
            bumps = 1.0 + self.irregularity * self.texture.at(points)
            distance = distance / np.clip(bumps, 0.3, None)
        return np.where(allowed, -distance, -np.inf)

    def describe(self) -> dict:
        return {
            "territory": self.territory,
            "hemisphere": self.hemisphere,
            "centre_mni_mm": np.round(self.centre, 2).tolist() if self.has_lesion else None,
            "core_rel_cbf_min": round(self.core_cbf_min, 3),
            "core_rel_cbv_min": round(self.core_cbv_min, 3),
            "penumbra_rel_cbv": round(self.penumbra_cbv, 3),
            "core_tmax_max_s": round(self.core_tmax_max, 2),
            "core_adc_factor": round(self.core_adc_factor, 3),
            "core_t2_factor": round(self.core_t2_factor, 3),
            "core_hypodensity_hu": round(self.core_hypodensity_hu, 2),
        }


def draw_lesion_plan(rng: np.random.Generator) -> LesionPlan:
    """Draw a case's lesion: presence, territory, side, heavy-tailed volumes, shape, severity."""
    # Severity is drawn first and always, so the stream stays aligned whatever the branch.
    severity = dict(
        core_cbf_min=rng.uniform(0.05, 0.2),
        core_cbv_min=rng.uniform(0.3, 0.55),
        penumbra_cbv=rng.uniform(1.0, 1.25),
        core_tmax_max=rng.uniform(12.0, 16.0),
        core_adc_factor=rng.uniform(0.54, 0.72),  # GM 800 → 430–575, WM 720 → 390–520
        core_t2_factor=rng.uniform(1.05, 1.2),
        core_hypodensity_hu=rng.uniform(0.0, 3.0),
    )
    kind = rng.random()
    names = list(TERRITORY_WEIGHTS)
    territory = names[rng.choice(len(names), p=np.array(list(TERRITORY_WEIGHTS.values())))]
    hemisphere = "left" if rng.random() < 0.5 else "right"
    terr = TERRITORIES[territory]
    log_core = np.log(terr.core_median_ml) + terr.core_log_sd * rng.standard_normal()
    core = float(np.clip(np.exp(log_core), *terr.core_range_ml))
    penumbra = core * rng.uniform(1.2, 3.0) + rng.uniform(*terr.penumbra_extra_ml)
    if kind < P_NO_HYPOPERFUSION:
        return LesionPlan("none", "none", 0.0, 0.0, 0.0, np.zeros(3), np.ones(3), np.eye(3),
                          0.0, None, **severity)
    if kind < P_NO_HYPOPERFUSION + P_PENUMBRA_ONLY:
        core = 0.0
        if territory == "lacunar":  # a deep penumbra without core is not a clinical picture
            territory, terr = "MCA", TERRITORIES["MCA"]
        penumbra = rng.uniform(5.0, 60.0)
    oligaemia = 0.3 * (core + penumbra)

    side = 1.0 if hemisphere == "right" else -1.0
    # Blob centre: uniform in the inner part of the territory ellipsoid.
    while True:
        u = rng.uniform(-1.0, 1.0, 3)
        if np.sum(u**2) <= 0.6**2:
            break
    centre = np.array(terr.centre) * np.array([side, 1, 1]) + u * np.array(terr.radii)
    total_mm3 = 1000.0 * (core + penumbra + oligaemia)
    radius = (3.0 * total_mm3 / (4.0 * np.pi)) ** (1.0 / 3.0)
    shape = np.exp(rng.normal(0.0, 0.25, 3))
    axes = radius * shape / np.prod(shape) ** (1.0 / 3.0)
    rotation = Rotation.random(random_state=rng).as_matrix()
    irregularity = rng.uniform(0.2, 0.45)
    texture = smooth_field(rng, correlation_mm=8.0, spacing_mm=4.0)
    return LesionPlan(territory, hemisphere, core, penumbra, oligaemia, centre, axes, rotation,
                      irregularity, texture, **severity)


@dataclass(frozen=True)
class IschaemiaLevels:
    """Score thresholds that turn a lesion score into an ischaemia level (module docstring)."""

    oligaemia: float
    penumbra: float
    core: float
    deepest: float
    has_core: bool

    def level(self, score: np.ndarray) -> np.ndarray:
        """Ischaemia level in [0, 3] of each score (0 also for −inf: outside any lesion)."""
        if not np.isfinite(self.oligaemia):
            return np.zeros(score.shape)
        xp = [self.oligaemia, self.penumbra, self.core, self.deepest]
        fp = [NORMAL, PENUMBRA, CORE, DEEPEST]
        if not self.has_core:
            # The penumbra-only case: nothing crosses into the core, whichever grid looks.
            xp, fp = xp[:3], [NORMAL, PENUMBRA, CORE - 1e-3]
        # float64 on purpose: float32 would round scores just below the core threshold up to 2.
        return np.interp(np.where(np.isfinite(score), score, xp[0] - 1.0), xp, fp)


def lesion_masks(
    level: np.ndarray, core_eligible: np.ndarray, tissue_fraction: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Core and penumbra labels of each voxel.

    Parameters
    ----------
    level
        Ischaemia levels.
    core_eligible
        Voxels whose ADC would fall below the clinical threshold if infarcted (diffusion.py);
        CSF partial volume keeps the others above it, and experts, who segment the core on the
        ADC map, would leave them out.
    tissue_fraction
        Grey + white matter fraction; the penumbra is labelled where there is tissue to save.
    """
    core = (level >= CORE) & core_eligible
    penumbra = (level >= PENUMBRA) & (level < CORE) & (tissue_fraction >= PENUMBRA_MIN_TISSUE)
    return core, penumbra


def calibrate_levels(
    plan: LesionPlan,
    score: np.ndarray,
    core_eligible: np.ndarray,
    tissue_fraction: np.ndarray,
    voxel_ml: float,
) -> IschaemiaLevels:
    """Thresholds so that `lesion_masks` labels exactly the planned core and penumbra volumes
    (in voxels of ``voxel_ml``) on the grid whose ``score`` is given (the MRI grid: the truth).
    """
    finite = np.isfinite(score)
    core_candidates = np.sort(score[finite & core_eligible])[::-1]
    candidates = np.sort(score[finite & (tissue_fraction >= PENUMBRA_MIN_TISSUE)])[::-1]
    n = candidates.size
    if not plan.has_lesion or core_candidates.size < 8:
        return IschaemiaLevels(-np.inf, -np.inf, -np.inf, -np.inf, False)
    # A territory smaller than the plan (a small head, a huge infarct) gives up oligaemia first,
    # then penumbra, then core.
    k_core = max(int(round(plan.core_ml / voxel_ml)), 1) if plan.core_ml > 0 else 0
    k_core = min(k_core, int(0.45 * core_candidates.size))
    has_core = k_core >= 1
    peak = float(score[finite].max())
    eps = 1e-6  # keep the interpolation points strictly increasing
    core = float(core_candidates[k_core - 1]) if has_core else peak + eps
    # Candidates past the core line that are not core (too much CSF) are not penumbra either.
    above_core = int(np.count_nonzero(candidates >= core))
    k_pen = min(above_core + max(int(round(plan.penumbra_ml / voxel_ml)), 1), int(0.9 * n))
    k_olig = min(k_pen + max(int(round(plan.oligaemia_ml / voxel_ml)), 1), n)
    penumbra = min(float(candidates[max(k_pen - 1, 0)]), core - eps)
    oligaemia = min(float(candidates[max(k_olig - 1, 0)]), penumbra - eps)
    deepest = max(peak, core + eps)
    return IschaemiaLevels(oligaemia, penumbra, core, deepest, has_core)
