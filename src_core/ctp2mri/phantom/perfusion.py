"""CT perfusion by indicator-dilution theory: HU time curves of every brain voxel.

Tissue enhancement ``ΔHU(t) = ρ/k_H · CBF/6000 · (AIF ⊛ R)(t − Tmax)`` (Østergaard's
indicator-dilution convention: CBF in ml/100 g/min, ρ the brain density, k_H the large- to
small-vessel haematocrit correction) with residue ``R(τ) = exp(−τ/MTT)``, ``MTT = 60 ·
CBV/CBF``. For an exponential residue the deconvolved residue peaks at the tissue's bolus
delay, so that delay *is* Tmax. The convolution is done once per case on a 0.1 s grid for a
log-spaced table of MTTs; every voxel then reads its curve from the table at its own MTT and
delay (bilinear), without a per-voxel convolution.

The arterial bolus is a clinical one (gamma variate α ≈ 3, β 2.2–2.8 s: a full width at half
maximum of 9–11 s; peak 380–480 HU), so that with textbook CBF and CBV the tissue's peak
enhancement lands at the clinical GM 15–30 HU and WM 5–10 HU (tests check it) with the
physical scale: a perfusion analysis of the phantom reads its CBF and CBV in true units.
(Phantom 1.0 had a narrower, smaller bolus and scaled the tissue by an empirical 3.34 instead.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ctp2mri.phantom.anatomy import Tissue
from ctp2mri.phantom.fields import SmoothField, smooth_field
from ctp2mri.phantom.lesions import CORE, DEEPEST, NORMAL, PENUMBRA, LesionPlan

K_H = 0.73  # large-vessel to capillary haematocrit correction, (1 − 0.45) / (1 − 0.25)
RHO = 1.04  # brain density, g/ml
NORMAL_CBF = np.array([55.0, 22.0])  # grey, white matter, ml/100 g/min
NORMAL_CBV = np.array([4.0, 2.0])  # ml/100 g
FINE_DT = 0.1  # s, grid of the convolution
MTT_TABLE = np.geomspace(0.5, 120.0, 192)  # s


@dataclass(frozen=True)
class PerfusionParams:
    """One case's bolus, scanner and normal-tissue parameters."""

    bolus_arrival_s: float  # t0 of the arterial gamma variate
    aif_peak_hu: float
    aif_alpha: float
    aif_beta_s: float
    recirculation: float  # second-pass peak relative to the first
    recirculation_delay_s: float
    tissue_delay_s: float  # Tmax of normal tissue
    noise_sigma_hu: float
    gain: float
    offset_hu: float
    baseline_hu: tuple[float, float, float]  # unenhanced grey matter, white matter, CSF
    flow_variation: float  # regional spread of normal CBF (fraction)
    flow_texture: SmoothField

    def describe(self) -> dict:
        return {
            "bolus_arrival_s": round(self.bolus_arrival_s, 3),
            "aif_peak_hu": round(self.aif_peak_hu, 2),
            "aif_alpha": round(self.aif_alpha, 3),
            "aif_beta_s": round(self.aif_beta_s, 3),
            "recirculation": round(self.recirculation, 3),
            "tissue_delay_s": round(self.tissue_delay_s, 3),
            "noise_sigma_hu": round(self.noise_sigma_hu, 3),
            "gain": round(self.gain, 4),
            "offset_hu": round(self.offset_hu, 3),
            "baseline_hu": [round(v, 2) for v in self.baseline_hu],
        }


def draw_perfusion_params(rng: np.random.Generator) -> PerfusionParams:
    """Draw bolus timing and shape, normal tissue delay, noise, gain/offset, baseline HU."""
    return PerfusionParams(
        bolus_arrival_s=rng.uniform(5.0, 10.0),
        aif_peak_hu=rng.uniform(380.0, 480.0),
        aif_alpha=rng.uniform(2.9, 3.1),
        aif_beta_s=rng.uniform(2.2, 2.8),
        recirculation=rng.uniform(0.05, 0.15),
        recirculation_delay_s=rng.uniform(9.0, 13.0),
        tissue_delay_s=rng.uniform(0.0, 2.0),
        noise_sigma_hu=rng.uniform(5.0, 15.0),
        gain=rng.uniform(0.98, 1.02),
        offset_hu=rng.uniform(-3.0, 3.0),
        baseline_hu=(rng.uniform(36.0, 40.0), rng.uniform(27.0, 31.0), rng.uniform(3.0, 8.0)),
        flow_variation=rng.uniform(0.03, 0.08),
        flow_texture=smooth_field(rng, correlation_mm=15.0, spacing_mm=6.0),
    )


def gamma_variate(t: np.ndarray, t0: float, alpha: float, beta: float, peak: float) -> np.ndarray:
    """``A·(t−t0)^α·exp(−(t−t0)/β)`` for t > t0, with A chosen so the maximum is ``peak``."""
    s = np.clip(t - t0, 0.0, None)
    shape = np.exp(alpha * np.log(np.maximum(s, 1e-12) / (alpha * beta)) - s / beta + alpha)
    return np.where(s > 0, peak * shape, 0.0)


def arterial_input(t: np.ndarray, params: PerfusionParams) -> np.ndarray:
    """Arterial enhancement (HU above baseline): first pass plus a small, broader second pass."""
    p = params
    first = gamma_variate(t, p.bolus_arrival_s, p.aif_alpha, p.aif_beta_s, p.aif_peak_hu)
    second = gamma_variate(t, p.bolus_arrival_s + p.recirculation_delay_s, p.aif_alpha,
                           2.0 * p.aif_beta_s, p.recirculation * p.aif_peak_hu)
    return first + second


@dataclass(frozen=True)
class ResidueTable:
    """``(AIF ⊛ exp(−τ/MTT))(t)`` in HU·s for a grid of MTTs on a fine time grid."""

    values: np.ndarray  # (n_mtt, n_time)
    dt: float

    @classmethod
    def build(cls, params: PerfusionParams, t_end: float, dt: float = FINE_DT) -> "ResidueTable":
        t = np.arange(0.0, t_end + dt, dt)
        aif = arterial_input(t, params)
        kernels = np.exp(-t[None, :] / MTT_TABLE[:, None])
        kernels[:, 0] *= 0.5  # trapezoidal rule: the kernel then integrates to MTT, not MTT + dt/2
        n_fft = 2 * t.size  # zero-padded: a linear, not circular, convolution
        spectrum = np.fft.rfft(aif, n_fft)[None, :] * np.fft.rfft(kernels, n_fft, axis=1)
        return cls(dt * np.fft.irfft(spectrum, n_fft, axis=1)[:, : t.size], dt)

    def sample(self, mtt: np.ndarray, times: np.ndarray) -> np.ndarray:
        """Curve value for each MTT ``(n,)`` at times ``(n, k)`` (0 before the bolus)."""
        row = np.interp(np.log(mtt), np.log(MTT_TABLE), np.arange(MTT_TABLE.size))
        rows = np.broadcast_to(row[:, None], times.shape)
        # mode="nearest" reads the table's first column (0: nothing arrived) for negative times.
        index = [rows, times / self.dt]
        return ndimage.map_coordinates(self.values, index, order=1, mode="nearest")


def enhancement_scale() -> float:
    """HU per (ml/100 g/min · HU·s): converts CBF × (AIF ⊛ R) into tissue enhancement (ρ/k_H/6000)."""
    return RHO / K_H / 6000.0


def ischaemic_parameters(
    level: np.ndarray, plan: LesionPlan, normal_tmax: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Relative CBF, relative CBV and Tmax (s) for each ischaemia level (see lesions.py)."""
    levels = [NORMAL, PENUMBRA, CORE, DEEPEST]
    rel_cbf = np.interp(level, levels, [1.0, 0.7, 0.3, plan.core_cbf_min])
    # CBV holds up (collaterals, vasodilation) until autoregulation fails at the core's edge.
    rel_cbv = np.where(
        level < CORE,
        np.interp(level, [NORMAL, PENUMBRA], [1.0, plan.penumbra_cbv]),
        np.interp(level, [CORE, DEEPEST], [0.75, plan.core_cbv_min]),
    )
    tmax = np.interp(level, levels, [normal_tmax, 6.0, 10.0, plan.core_tmax_max])
    return rel_cbf, rel_cbv, tmax


def ctp_curves(
    tissue: Tissue,
    level: np.ndarray,
    plan: LesionPlan,
    params: PerfusionParams,
    frame_times: np.ndarray,
    rng: np.random.Generator | None,
    tissue_share: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Noisy CT-perfusion HU curves of every brain voxel, and the perfusion maps behind them.

    ``rng`` None leaves the noise out (the caller adds it after mixing in the vessels);
    ``tissue_share`` (n_brain,) is the part of each voxel that is tissue rather than blood
    (1 − vessel fraction; default 1): it scales the tissue's enhancement, baseline and maps.

    Returns
    -------
    hu
        ``(n_brain, n_frames)`` float32 HU.
    maps
        Per brain voxel: ``cbf`` (ml/100 g/min), ``cbv`` (ml/100 g), ``mtt`` (s), ``tmax`` (s).
    """
    frame_times = np.asarray(frame_times, dtype=np.float64)
    table = ResidueTable.build(params, float(frame_times.max()) + 1.0)
    scale = enhancement_scale()
    fractions = tissue.fractions[:2].astype(np.float64)  # CSF has no capillary bed
    flow = np.clip(1.0 + params.flow_variation * params.flow_texture.at(tissue.points), 0.7, 1.3)
    normal_mtt = 60.0 * NORMAL_CBV / NORMAL_CBF

    # Normal tissue shares two curves (grey, white); only their amplitude varies.
    delayed = np.broadcast_to(frame_times - params.tissue_delay_s, (2, frame_times.size))
    base = table.sample(normal_mtt, delayed)
    delta = flow[:, None] * ((fractions * (scale * NORMAL_CBF)[:, None]).T @ base)

    rel_cbf, rel_cbv, tmax = ischaemic_parameters(level, plan, params.tissue_delay_s)
    hit = level > NORMAL
    if hit.any():
        times = frame_times[None, :] - tmax[hit, None]
        delta[hit] = 0.0
        for c in range(2):  # grey- and white-matter compartments of each ischaemic voxel
            mtt = normal_mtt[c] * rel_cbv[hit] / rel_cbf[hit]
            amplitude = scale * NORMAL_CBF[c] * rel_cbf[hit] * flow[hit] * fractions[c, hit]
            delta[hit] += amplitude[:, None] * table.sample(mtt, times)

    baseline = tissue.fractions.T.astype(np.float64) @ np.asarray(params.baseline_hu)
    baseline -= plan.core_hypodensity_hu * np.clip(level - CORE, 0.0, 1.0)
    share = np.ones(baseline.shape) if tissue_share is None else np.asarray(tissue_share, dtype=np.float64)
    hu = params.gain * share[:, None] * (baseline[:, None] + delta) + params.offset_hu
    if rng is not None:
        hu += params.noise_sigma_hu * rng.standard_normal(hu.shape, dtype=np.float32)

    cbf = share * flow * rel_cbf * (fractions.T @ NORMAL_CBF)
    cbv = share * flow * rel_cbv * (fractions.T @ NORMAL_CBV)
    mtt = np.where(cbf > 0, 60.0 * cbv / np.maximum(cbf, 1e-9), 0.0)
    maps = {"cbf": cbf, "cbv": cbv, "mtt": mtt, "tmax": tmax}
    return hu.astype(np.float32), {k: v.astype(np.float32) for k, v in maps.items()}
