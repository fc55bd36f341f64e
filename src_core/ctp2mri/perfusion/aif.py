"""Arterial input and venous output functions: automatic selection, a user's region, and the
partial-volume scaling of the AIF by the VOF.

Arteries are the voxels that enhance most and earliest; a sinus enhances strongly, later and
longer. Small arteries are only partly inside a voxel, which lowers the measured AIF and
inflates CBF and CBV by the same factor; the sinus is wide enough to hold whole voxels, and
the indicator that enters the brain leaves it (∫VOF = ∫AIF), so the AIF is scaled by
∫VOF / ∫AIF when that is above 1 (Mouridsen et al. 2006's idea, as clinical CTP software does).
Areas are of gamma-variate fits to the first pass, which also give the AIF's shape between
frames on the fine grid of the deconvolution (a 3 s frame interval undersamples the bolus).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import curve_fit

from ctp2mri.errors import InputError

MIN_VESSEL_ENHANCEMENT_HU = 60.0  # tissue peaks at 10–40 HU (noise included); vessels well above
N_AIF_VOXELS = 8
N_VOF_VOXELS = 8


@dataclass
class InputFunction:
    """A vessel's enhancement curve and where it was read.

    Attributes
    ----------
    curve
        (T,) ΔHU at the frame times, the mean of the chosen voxels.
    voxels
        (n, 3) working-grid indices of the chosen voxels.
    times
        (T,) frame times (s).
    fit
        Gamma-variate parameters of the first pass (t0, peak, α, β), or None when no fit held.
    """

    curve: np.ndarray
    voxels: np.ndarray
    times: np.ndarray
    fit: tuple[float, float, float, float] | None = None
    scale: float = 1.0  # partial-volume correction applied to `curve` (1: none)
    notes: list[str] = field(default_factory=list)

    @property
    def peak_hu(self) -> float:
        return float(self.curve.max())

    @property
    def time_to_peak_s(self) -> float:
        return float(self.times[int(np.argmax(self.curve))])

    def area(self) -> float:
        """First-pass area (HU·s): of the gamma fit when there is one, else of the curve."""
        if self.fit is not None:
            return gamma_area(*self.fit)
        return float(np.trapezoid(np.clip(self.curve, 0, None), self.times))

    def on_grid(self, t: np.ndarray) -> np.ndarray:
        """The curve on a finer grid ``t``: the gamma fit plus the measured residual (recirculation,
        misfit) interpolated, so the frames keep their measured values and the peak between
        frames follows the fitted shape."""
        measured = np.interp(t, self.times, self.curve, right=self.curve[-1])
        if self.fit is None:
            return measured
        residual = self.curve - gamma_variate(self.times, *self.fit)
        return gamma_variate(t, *self.fit) + np.interp(t, self.times, residual, right=residual[-1])


def gamma_variate(t: np.ndarray, t0: float, peak: float, alpha: float, beta: float) -> np.ndarray:
    """``peak · (s/(αβ))^α · exp(α − s/β)``, s = t − t0 > 0: a gamma variate with maximum ``peak``."""
    s = np.clip(np.asarray(t, dtype=np.float64) - t0, 0.0, None)
    with np.errstate(divide="ignore"):
        log_shape = alpha * np.log(np.maximum(s, 1e-12) / (alpha * beta)) - s / beta + alpha
    return np.where(s > 0, peak * np.exp(log_shape), 0.0)


def gamma_area(t0: float, peak: float, alpha: float, beta: float) -> float:
    """∫ gamma_variate dt = peak · β · Γ(α + 1) · e^α / α^α."""
    from scipy.special import gammaln

    return float(peak * beta * np.exp(gammaln(alpha + 1.0) + alpha - alpha * np.log(alpha)))


def fit_first_pass(curve: np.ndarray, times: np.ndarray) -> tuple[float, float, float, float] | None:
    """Gamma-variate fit to the first pass: the frames up to where the curve, after its peak,
    falls below 40 % of it (recirculation excluded). None when it does not fit (R² < 0.9)."""
    k = int(np.argmax(curve))
    peak = float(curve[k])
    if peak <= 0 or k == 0:
        return None
    after = np.flatnonzero(curve[k:] < 0.4 * peak)
    stop = k + (int(after[0]) + 1 if after.size else curve.size - k)
    t, y = times[:stop], curve[:stop]
    rising = np.flatnonzero(curve[:k + 1] < 0.1 * peak)
    t0_guess = float(times[rising[-1]]) if rising.size else float(times[0])
    tp = float(times[k])
    alpha0 = 3.0
    beta0 = max((tp - t0_guess) / alpha0, 0.3)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            params, _ = curve_fit(gamma_variate, t, y, p0=(t0_guess, peak, alpha0, beta0),
                                  bounds=([times[0] - 5.0, 0.3 * peak, 1.0, 0.2], [tp, 3.0 * peak, 12.0, 15.0]),
                                  maxfev=2000)
    except (RuntimeError, ValueError):
        return None
    fitted = gamma_variate(t, *params)
    ss_res = float(np.sum((y - fitted) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    if ss_tot <= 0 or 1.0 - ss_res / ss_tot < 0.9:
        return None
    return tuple(float(p) for p in params)


def _curve_features(enhancement: np.ndarray, times: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Peak ΔHU, time to peak (s), area (HU·s) and first moment (s) of each row of (n, T) curves.

    The first moment ∫t·C⁺ / ∫C⁺ is the bolus's mean passage time: unlike the time to peak,
    noise hardly moves it on a strong curve, so it tells an artery from a sinus whose peak lags
    by only one frame.
    """
    positive = np.clip(enhancement, 0, None)
    peak = enhancement.max(axis=1)
    ttp = times[np.argmax(enhancement, axis=1)]
    area = np.trapezoid(positive, times, axis=1)
    moment = np.trapezoid(positive * times, times, axis=1) / np.maximum(area, 1e-9)
    return peak, ttp, area, moment


def select_aif(enhancement: np.ndarray, region: np.ndarray, times: np.ndarray,
               user_region: np.ndarray | None = None, n_voxels: int = N_AIF_VOXELS,
               arrival_s: float = 0.0) -> InputFunction:
    """The arterial input function: the mean curve of the ``n_voxels`` strongest early enhancers.

    Candidates are voxels of ``region`` (or of ``user_region`` when the user placed the AIF)
    that enhance by more than `MIN_VESSEL_ENHANCEMENT_HU` and peak after the bolus arrival
    (``arrival_s``; a noise spike in the baseline is no artery); of those, the ones whose bolus
    passes (first moment) within half a frame interval of the early tenth of them (arteries
    before veins, and before the late, collateral-filled arteries beyond an occlusion); of
    those, the highest peaks.

    Raises
    ------
    InputError
        No voxel enhances like a vessel (in the user's region: it holds no artery).
    """
    where = region if user_region is None else (user_region & (region if region.any() else user_region))
    index = np.argwhere(where)
    if index.size == 0:
        raise InputError("the AIF region holds no voxel of the CT perfusion's head; place it on an artery "
                         "inside the brain (e.g. the MCA or the ICA)" if user_region is not None else
                         "the brain region is empty; no AIF can be selected")
    curves = enhancement[where]
    peak, ttp, _, moment = _curve_features(curves, times)
    vessel = (peak > MIN_VESSEL_ENHANCEMENT_HU) & (ttp >= arrival_s - 1e-6)
    if not vessel.any():
        what = "the AIF region" if user_region is not None else "the head"
        raise InputError(f"no artery found in {what}: no voxel enhances by more than "
                         f"{MIN_VESSEL_ENHANCEMENT_HU:g} HU (the strongest: {peak.max():.0f} HU). "
                         + ("Place the AIF on an artery (the MCA or ICA), where the bolus is brightest."
                            if user_region is not None else "Is the contrast bolus in this series?"))
    dt = float(np.median(np.diff(times)))
    early = vessel & (moment <= np.percentile(moment[vessel], 10) + 0.5 * dt)
    chosen = np.flatnonzero(early)[np.argsort(-peak[early])][:n_voxels]
    curve = curves[chosen].mean(axis=0)
    return InputFunction(curve.astype(np.float64), index[chosen], times, fit_first_pass(curve, times))


def select_vof(enhancement: np.ndarray, region: np.ndarray, times: np.ndarray, aif: InputFunction,
               n_voxels: int = N_VOF_VOXELS) -> InputFunction | None:
    """The venous output function: the mean curve of the ``n_voxels`` vessel voxels with the
    largest area among those peaking at least one frame after the AIF. None when there is none."""
    index = np.argwhere(region)
    curves = enhancement[region]
    peak, ttp, area, _ = _curve_features(curves, times)
    dt = float(np.median(np.diff(times)))
    late = (peak > MIN_VESSEL_ENHANCEMENT_HU) & (ttp >= aif.time_to_peak_s + dt - 1e-6)
    if not late.any():
        return None
    chosen = np.flatnonzero(late)[np.argsort(-area[late])][:n_voxels]
    curve = curves[chosen].mean(axis=0)
    return InputFunction(curve.astype(np.float64), index[chosen], times, fit_first_pass(curve, times))


def partial_volume_scale(aif: InputFunction, vof: InputFunction | None, max_scale: float = 3.0) -> float:
    """∫VOF / ∫AIF (first-pass areas), clipped to [1, ``max_scale``]: how much partial volume
    lowered the AIF. 1 without a VOF."""
    if vof is None:
        return 1.0
    a, v = aif.area(), vof.area()
    if not (a > 0 and v > 0):
        return 1.0
    return float(np.clip(v / a, 1.0, max_scale))
