"""Delay-insensitive deconvolution of tissue curves by the arterial input function.

Indicator dilution: ``C(t) = (ρ/k_H) · CBF · (AIF ⊛ R)(t)``. Written on a time grid as
``c = Δt · A · b`` with ``b = (ρ/k_H) · CBF · R``, the AIF's convolution matrix A is made
*block-circulant* (both curves zero-padded to twice their length, Wu et al. 2003): a tissue
curve that arrives later than the AIF then gives a residue shifted by its delay instead of a
truncated one, so CBF does not fall with delay and the residue's peak time is Tmax.

A is inverted once per case through its SVD, regularised either by

- ``"osvd"``: truncation at a threshold chosen *per voxel*, the smallest of a ladder whose
  residue's oscillation index stays below a target (Wu et al.'s oSVD), or
- ``"tikhonov"``: one filter ``s / (s² + λ²)`` with λ a fraction of the largest singular value.

The frames are interpolated onto a fine grid first (``dt_fine``, 1 s by default): the AIF by
its gamma-variate shape (`ctp2mri.perfusion.aif.InputFunction.on_grid`), the tissue curves
linearly, so the residue and Tmax resolve finer than the frame interval.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ctp2mri.errors import InputError

METHODS = ("osvd", "tikhonov")
OSVD_LADDER = (0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.45)
_CHUNK = 65536  # voxels per matrix product: bounded memory on clinical series


@dataclass(frozen=True)
class Deconvolver:
    """The regularised inverse of one AIF's block-circulant convolution matrix.

    Attributes
    ----------
    t_fine
        (N,) the fine time grid (s) from the first frame.
    weights
        (N, T) linear interpolation from the frames onto ``t_fine``.
    u, s, vt
        SVD of the (2N × 2N) block-circulant matrix Δt · A.
    method, oi_target, tikhonov
        The regularisation (see the module docstring).
    """

    t_fine: np.ndarray
    weights: np.ndarray
    u: np.ndarray
    s: np.ndarray
    vt: np.ndarray
    method: str
    oi_target: float
    tikhonov: float

    @classmethod
    def build(cls, aif_fine: np.ndarray, t_fine: np.ndarray, times: np.ndarray, method: str = "osvd",
              oi_target: float = 0.1, tikhonov: float = 0.15) -> "Deconvolver":
        """Set up for an AIF sampled on ``t_fine`` (its frames are ``times``)."""
        if method not in METHODS:
            raise InputError(f"unknown deconvolution {method!r}; choose one of {', '.join(METHODS)}")
        n = t_fine.size
        dt = float(t_fine[1] - t_fine[0])
        padded = np.zeros(2 * n)
        padded[:n] = aif_fine
        i, j = np.indices((2 * n, 2 * n))
        circulant = dt * padded[(i - j) % (2 * n)]
        u, s, vt = np.linalg.svd(circulant)
        weights = np.zeros((n, times.size))
        for k, t in enumerate(t_fine):
            right = int(np.clip(np.searchsorted(times, t, side="right"), 1, times.size - 1))
            left = right - 1
            w = (t - times[left]) / (times[right] - times[left])
            weights[k, left], weights[k, right] = 1.0 - w, w
        return cls(t_fine, weights, u, s, vt, method, float(oi_target), float(tikhonov))

    @property
    def dt(self) -> float:
        return float(self.t_fine[1] - self.t_fine[0])

    def residues(self, curves: np.ndarray) -> np.ndarray:
        """b = (ρ/k_H) · CBF · R(t) on the padded fine grid, (n, 2N), for tissue curves (n, T) in ΔHU."""
        out = np.empty((curves.shape[0], 2 * self.t_fine.size), dtype=np.float32)
        for start in range(0, curves.shape[0], _CHUNK):
            stop = min(start + _CHUNK, curves.shape[0])
            out[start:stop] = self._residues(np.asarray(curves[start:stop], dtype=np.float64))
        return out

    def _residues(self, curves: np.ndarray) -> np.ndarray:
        n = self.t_fine.size
        padded = np.zeros((curves.shape[0], 2 * n), dtype=np.float32)
        padded[:, :n] = curves @ self.weights.T
        u, vt = self.u.astype(np.float32), self.vt.astype(np.float32)
        smax = float(self.s[0])
        if self.method == "tikhonov":
            lam = self.tikhonov * smax
            return ((padded @ u) * (self.s / (self.s**2 + lam**2)).astype(np.float32)) @ vt
        # oSVD: b_r = Σ_{i<r} (uᵢᵀc / sᵢ) vᵢ for the truncation rank r of each threshold of the
        # ladder. The ranks fall as the threshold rises, so each step only subtracts the
        # components between two ranks, and only for the voxels still oscillating.
        ranks = [int(np.sum(self.s > fraction * smax)) for fraction in OSVD_LADDER]
        coefficients = (padded @ u) / np.maximum(self.s, 1e-12).astype(np.float32)
        b = coefficients[:, :ranks[0]] @ vt[:ranks[0]]
        pending = np.flatnonzero(oscillation_index(b) > self.oi_target)
        for high, low in zip(ranks[:-1], ranks[1:]):
            if pending.size == 0:
                break
            if low < high:
                b[pending] -= coefficients[pending, low:high] @ vt[low:high]
            pending = pending[oscillation_index(b[pending]) > self.oi_target]
        return b  # the voxels still pending keep the strongest regularisation of the ladder


def oscillation_index(b: np.ndarray) -> np.ndarray:
    """Wu et al.'s oscillation index of residues (n, L): (1/L) · (1/max b) · Σ|b[k] − 2b[k−1] + b[k−2]|."""
    second = np.abs(b[:, 2:] - 2.0 * b[:, 1:-1] + b[:, :-2]).sum(axis=1)
    peak = np.maximum(b.max(axis=1), 1e-9)
    return second / (b.shape[1] * peak)


def residue_peak(b: np.ndarray, dt: float) -> tuple[np.ndarray, np.ndarray]:
    """Height and time (s) of each residue's maximum; a peak in the padded half is a negative
    delay (the tissue curve led the AIF), refined by a parabola through the neighbours."""
    n2 = b.shape[1]
    k = np.argmax(b, axis=1)
    height = b[np.arange(b.shape[0]), k]
    left = b[np.arange(b.shape[0]), (k - 1) % n2]
    right = b[np.arange(b.shape[0]), (k + 1) % n2]
    curvature = left - 2.0 * height + right
    with np.errstate(divide="ignore", invalid="ignore"):
        offset = np.where(curvature < 0, 0.5 * (left - right) / curvature, 0.0)
    offset = np.clip(offset, -0.5, 0.5)
    shift = np.where(k >= n2 // 2, k - n2, k) + offset
    return height, shift * dt


def residue_onset(b: np.ndarray, dt: float, level: float = 0.5) -> np.ndarray:
    """Time (s) at which each residue, walking back from its peak, falls below ``level`` of it
    (linear interpolation; circular, so a crossing in the padded half is a negative time).

    Regularisation spreads a residue's sharp onset symmetrically, so its peak drifts later by
    about half the filter's width while the half-maximum of its leading edge stays near the
    true bolus delay.
    """
    n_voxels, n2 = b.shape
    k = np.argmax(b, axis=1)
    peak = b[np.arange(n_voxels), k]
    onset = np.zeros(n_voxels)
    found = np.zeros(n_voxels, dtype=bool)
    above = b[np.arange(n_voxels), k]
    for back in range(1, n2 // 2):
        idx = (k - back) % n2
        value = b[np.arange(n_voxels), idx]
        crossing = ~found & (value < level * peak)
        frac = np.where(crossing, (above - level * peak) / np.maximum(above - value, 1e-12), 0.0)
        onset = np.where(crossing, (k - back + 1) - frac, onset)
        found |= crossing
        above = np.where(found, above, value)
        if found.all():
            break
    onset = np.where(found, onset, k)
    onset = np.where(onset >= n2 // 2, onset - n2, onset)
    return onset * dt
