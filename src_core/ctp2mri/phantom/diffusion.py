"""Diffusion MRI of a phantom case: b = 0, DWI (b = 1000 s/mm²) and the ADC derived from them.

Each voxel is a mix of grey matter, white matter and CSF compartments, each with its own
proton density, T2 and ADC: ``S_b = Σ f · PD · exp(−TE/T2) · exp(−b · ADC)``. Magnitude images
get Rician noise, and the ADC map is computed from the *noisy* pair like a scanner does,
``ADC = ln(S0/S_b)/b``. In the infarct core the tissue ADC drops to 400–600 × 10⁻⁶ mm²/s
(cytotoxic oedema) and T2 lengthens slightly, so the core is bright on DWI and dark on ADC,
while the penumbra keeps normal diffusion.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ctp2mri.phantom.lesions import CORE, LesionPlan
from ctp2mri.settings import CORE_ADC_THRESHOLD

# grey matter, white matter, CSF
PROTON_DENSITY = np.array([0.8, 0.7, 1.0])
T2_MS = np.array([100.0, 80.0, 2000.0])
ADC = np.array([800.0, 720.0, 3000.0])  # 10⁻⁶ mm²/s
ADC_DISPLAY_MAX = 4000.0  # clip of the derived map: noise in CSF can overshoot
CLINICAL_CORE_ADC = CORE_ADC_THRESHOLD  # the core the phantom draws is what the clinical threshold marks
CORE_EDGE_WEIGHT = 0.9
SIGNAL_SCALE = 1000.0  # arbitrary scanner units of the b = 0 image


@dataclass(frozen=True)
class DiffusionParams:
    """One case's scanner settings."""

    b_value: float  # s/mm²
    te_ms: float
    snr: float  # grey-matter DWI signal / noise σ
    receive_gain: float

    def describe(self) -> dict:
        return {
            "b_value": self.b_value,
            "te_ms": round(self.te_ms, 2),
            "dwi_snr": round(self.snr, 3),
            "receive_gain": round(self.receive_gain, 4),
        }


def draw_diffusion_params(rng: np.random.Generator) -> DiffusionParams:
    return DiffusionParams(
        b_value=1000.0,
        te_ms=rng.uniform(85.0, 95.0),
        snr=rng.uniform(20.0, 30.0),
        receive_gain=rng.uniform(0.8, 1.25),
    )


def core_weight(level: np.ndarray) -> np.ndarray:
    """How far a voxel's diffusion is restricted: 0 outside the core, 0.9 at its edge, 1 inside.

    A little restriction starts just before the core edge so that the edge is soft like a real
    lesion, yet every voxel of the ground-truth core is below the clinical ADC threshold.
    """
    return np.interp(level, [CORE - 0.08, CORE, CORE + 0.1], [0.0, CORE_EDGE_WEIGHT, 1.0])


def _compartments(
    fractions: np.ndarray, weight: np.ndarray, plan: LesionPlan, params: DiffusionParams
) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free b = 0 and b = b_value signals of voxels restricted by ``weight`` ∈ [0, 1]."""
    w = np.asarray(weight, dtype=np.float64)[None, :]
    tissue = np.array([1.0, 1.0, 0.0])[:, None]  # only parenchyma infarcts, CSF stays free water
    adc = ADC[:, None] * (1.0 - tissue * w * (1.0 - plan.core_adc_factor))
    t2 = T2_MS[:, None] * (1.0 + tissue * w * (plan.core_t2_factor - 1.0))
    s0 = SIGNAL_SCALE * params.receive_gain * PROTON_DENSITY[:, None] * np.exp(-params.te_ms / t2)
    attenuation = np.exp(-params.b_value * adc * 1e-6)
    return np.sum(fractions * s0, axis=0), np.sum(fractions * s0 * attenuation, axis=0)


def core_eligible(fractions: np.ndarray, plan: LesionPlan, params: DiffusionParams) -> np.ndarray:
    """Voxels whose noise-free ADC, if infarcted, is below the clinical core threshold.

    Evaluated at the weakest restriction inside the core (its edge), so every voxel labelled
    core is dark on the ADC map whatever its depth.
    """
    b0, dwi = _compartments(fractions, np.full(fractions.shape[1], CORE_EDGE_WEIGHT), plan, params)
    return np.log(b0 / dwi) / params.b_value * 1e6 < CLINICAL_CORE_ADC


def diffusion_images(
    fractions: np.ndarray,
    level: np.ndarray,
    plan: LesionPlan,
    params: DiffusionParams,
    rng: np.random.Generator,
) -> tuple[dict[str, np.ndarray], float]:
    """b0, DWI and derived ADC of every brain voxel, plus their noise-free versions.

    Parameters
    ----------
    fractions
        ``(3, n)`` grey matter, white matter, CSF fractions.
    level
        ``(n,)`` ischaemia levels (lesions.py).

    Returns
    -------
    images
        ``b0``, ``dwi`` (noisy magnitude), ``adc`` (from the noisy pair, 10⁻⁶ mm²/s, clipped to
        [0, 4000]), and the noise-free ``b0_true``, ``dwi_true``, ``adc_true`` (with partial
        volume).
    sigma
        The Gaussian σ of the Rician noise, in image units.
    """
    b0_true, dwi_true = _compartments(fractions, core_weight(level), plan, params)

    gm_dwi = SIGNAL_SCALE * params.receive_gain * PROTON_DENSITY[0] * np.exp(
        -params.te_ms / T2_MS[0] - params.b_value * ADC[0] * 1e-6)
    sigma = gm_dwi / params.snr
    noise = rng.standard_normal((4, level.size)) * sigma
    b0 = np.hypot(b0_true + noise[0], noise[1])  # Rician magnitude
    dwi = np.hypot(dwi_true + noise[2], noise[3])
    floor = 0.5 * sigma  # keeps the log finite where noise drives a magnitude to ~0
    adc_noisy = np.log(np.maximum(b0, floor) / np.maximum(dwi, floor)) / params.b_value * 1e6
    adc_noisy = np.clip(adc_noisy, 0.0, ADC_DISPLAY_MAX)
    adc_true = np.log(b0_true / dwi_true) / params.b_value * 1e6
    out = {"b0": b0, "dwi": dwi, "adc": adc_noisy,
           "b0_true": b0_true, "dwi_true": dwi_true, "adc_true": adc_true}
    return {k: v.astype(np.float32) for k, v in out.items()}, float(sigma)
