"""`analyse_perfusion`: a CT perfusion series → CBF, CBV, MTT, Tmax, TTP, and the clinical core
and hypoperfused tissue.

1. The series on the working grid (`curves.working_series`), the brain (given or from the CT),
   bolus arrival and baseline (`curves.bolus_arrival`), enhancement ΔHU(t).
2. Vessels (voxels enhancing > 60 HU) and tissue (brain, unenhanced 15–70 HU: no CSF, no bone,
   no vessel); the AIF and VOF among the vessels (`aif.select_aif`, `aif.select_vof`, or the
   user's AIF region), the AIF scaled for partial volume by the VOF.
3. Tissue curves smoothed in-plane within the tissue only (vessels and CSF do not bleed in),
   deconvolved (`deconvolution.Deconvolver`): CBF from the residue's height, Tmax from the half
   maximum of its leading edge (`deconvolution.residue_onset`),
   CBV from the area ratio ∫C / ∫AIF, MTT = CBV / CBF (central volume), TTP from the curve.
4. Core and hypoperfusion (`ctp2mri.perfusion.regions`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from ctp2mri.errors import InputError
from ctp2mri.io.volume import Volume
from ctp2mri.perfusion.aif import InputFunction, partial_volume_scale, select_aif, select_vof
from ctp2mri.perfusion.curves import (
    WORKING_SPACING_MM,
    WorkingSeries,
    baseline_and_enhancement,
    bolus_arrival,
    smooth_in_region,
    working_series,
)
from ctp2mri.perfusion.deconvolution import METHODS, Deconvolver, residue_onset, residue_peak
from ctp2mri.perfusion.regions import RegionSettings, Regions, ischaemic_regions
from ctp2mri.progress import CancelToken, ProgressCallback

K_H = 0.73  # (1 − large-vessel haematocrit 0.45) / (1 − small-vessel 0.25)
RHO = 1.04  # brain tissue density, g/ml
MAP_NAMES = ("cbf", "cbv", "mtt", "tmax", "ttp")
MAP_UNITS = {"cbf": "ml/100 g/min", "cbv": "ml/100 g", "mtt": "s", "tmax": "s", "ttp": "s"}


@dataclass(frozen=True)
class PerfusionSettings:
    """How the maps are computed; every field is recorded in the report."""

    smoothing_mm: float = 4.0  # in-plane Gaussian σ of the tissue curves
    method: str = "osvd"  # deconvolution: "osvd" or "tikhonov"
    oi_target: float = 0.03  # oSVD's oscillation-index target
    tikhonov: float = 0.15  # Tikhonov's λ / largest singular value
    dt_fine: float = 1.0  # s, the deconvolution's time grid
    tissue_hu: tuple[float, float] = (15.0, 70.0)  # unenhanced HU of brain tissue (CSF and bone outside)
    partial_volume_correction: bool = True  # scale the AIF by ∫VOF / ∫AIF
    working_spacing_mm: tuple[float, float, float] = WORKING_SPACING_MM
    regions: RegionSettings = field(default_factory=RegionSettings)

    def __post_init__(self) -> None:
        numbers = {"smoothing_mm": (self.smoothing_mm, 0.0, 20.0), "oi_target": (self.oi_target, 1e-4, 10.0),
                   "tikhonov": (self.tikhonov, 1e-4, 1.0), "dt_fine": (self.dt_fine, 0.05, 10.0)}
        for name, (value, lo, hi) in numbers.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and lo <= value <= hi):
                raise InputError(f"perfusion setting {name} must be a number in [{lo:g}, {hi:g}], got {value!r}")
        if self.method not in METHODS:
            raise InputError(f"unknown deconvolution {self.method!r}; choose one of {', '.join(METHODS)}")
        lo, hi = self.tissue_hu
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise InputError(f"tissue_hu must be (low, high) with low < high, got {self.tissue_hu!r}")


@dataclass
class PerfusionResult:
    """Maps and regions on the working grid, with what they came from.

    ``maps[name]`` (nx, ny, nz) float32 for `MAP_NAMES` (0 outside the tissue); ``tissue``,
    ``vessels``, ``brain`` bool; ``regions`` the core and hypoperfusion; ``aif``/``vof`` the
    input functions (``aif.curve`` already scaled for partial volume); ``arrival_s`` the bolus
    arrival; ``ctp_grid`` the CT's own grid (shape, affine) that `on_ctp_grid` resamples onto.
    """

    maps: dict[str, np.ndarray]
    tissue: np.ndarray
    vessels: np.ndarray
    brain: np.ndarray
    regions: Regions
    aif: InputFunction
    vof: InputFunction | None
    arrival_s: float
    n_baseline: int
    affine: np.ndarray
    times: np.ndarray
    factors: tuple[int, int, int]
    ctp_grid: tuple[tuple[int, int, int], np.ndarray]
    settings: PerfusionSettings
    notes: list[str] = field(default_factory=list)

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))) / 1000.0

    def with_regions(self, regions: RegionSettings) -> "PerfusionResult":
        """The same maps read with other thresholds (no new deconvolution): a copy whose
        ``regions`` and ``settings.regions`` follow ``regions``."""
        from dataclasses import replace

        found = ischaemic_regions(self.maps["cbf"], self.maps["tmax"], self.tissue, self.brain, self.affine, regions)
        return replace(self, regions=found, settings=replace(self.settings, regions=regions), notes=list(self.notes))

    def volume(self, name: str) -> Volume:
        """A map or mask (``core``, ``hypoperfusion``, ``tissue``, ``aif``, ``vof``) on the working grid."""
        return Volume(self._array(name), self.affine.copy(), meta={"ctp2mri": {"perfusion": name}})

    def _array(self, name: str) -> np.ndarray:
        if name in self.maps:
            return self.maps[name]
        if name in ("core", "hypoperfusion"):
            return getattr(self.regions, name).astype(np.uint8)
        if name in ("tissue", "vessels", "brain"):
            return getattr(self, name).astype(np.uint8)
        if name in ("aif", "vof"):
            mask = np.zeros(self.tissue.shape, dtype=np.uint8)
            fn = getattr(self, name)
            if fn is not None:
                mask[tuple(fn.voxels.T)] = 1
            return mask
        raise InputError(f"unknown perfusion output {name!r}")

    def on_ctp_grid(self, name: str) -> Volume:
        """A map (linear) or mask (nearest) resampled onto the CT perfusion's own grid."""
        from ctp2mri.preprocessing.resample import resample_like

        shape, affine = self.ctp_grid
        vol = self.volume(name)
        if self.factors == (1, 1, 1):
            return Volume(vol.array, affine.copy(), meta=vol.meta)
        target = Volume(np.zeros(shape, dtype=np.uint8), affine)
        interp = "linear" if name in self.maps else "nearest"
        return resample_like(vol, target, interpolation=interp)

    def report(self) -> dict[str, Any]:
        """JSON-ready summary: volumes (ml), thresholds, reference, AIF/VOF curves and places."""
        def function(fn: InputFunction | None) -> dict[str, Any] | None:
            if fn is None:
                return None
            world = (self.affine[:3, :3] @ fn.voxels.T + self.affine[:3, 3:4]).T
            return {"curve_hu": [round(float(v), 3) for v in fn.curve], "peak_hu": round(fn.peak_hu, 2),
                    "time_to_peak_s": round(fn.time_to_peak_s, 2), "area_hu_s": round(fn.area(), 2),
                    "partial_volume_scale": round(fn.scale, 4), "n_voxels": int(len(fn.voxels)),
                    "voxels_ras_mm": np.round(world, 2).tolist(),
                    "gamma_fit": None if fn.fit is None else dict(zip(("t0_s", "peak_hu", "alpha", "beta_s"),
                                                                      (round(v, 4) for v in fn.fit)))}

        tissue = self.tissue
        stats = {name: {"median_in_tissue": _round(np.median(self.maps[name][tissue])) if tissue.any() else None,
                        "units": MAP_UNITS[name]} for name in MAP_NAMES}
        return {
            "frame_times_s": [round(float(t), 4) for t in self.times],
            "bolus_arrival_s": round(self.arrival_s, 3),
            "baseline_frames": int(self.n_baseline),
            "working_grid": {"block": list(self.factors),
                             "spacing_mm": np.round(np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)), 4).tolist()},
            "settings": _settings_dict(self.settings),
            **self.regions.report(),
            "maps": stats,
            "aif": function(self.aif),
            "vof": function(self.vof),
            "notes": list(self.notes),
        }


def _round(value: float, digits: int = 4) -> float | None:
    value = float(value)
    return round(value, digits) if math.isfinite(value) else None


def _settings_dict(settings: PerfusionSettings) -> dict[str, Any]:
    from ctp2mri.io.jsonfile import json_ready

    return json_ready(asdict(settings))


def _brain_on_working_grid(brain: Volume | None, ctp: Volume, series: WorkingSeries,
                           progress: ProgressCallback | None, cancel: CancelToken | None) -> np.ndarray:
    from ctp2mri.preprocessing.brain_mask import brain_mask_from_ctp
    from ctp2mri.preprocessing.resample import _BlockMean

    if brain is None:
        brain = brain_mask_from_ctp(ctp, progress=progress, cancel=cancel)
    else:
        brain.require_3d("brain mask")
        brain.require_same_grid(ctp, "the brain mask", "the CT perfusion")
    mask = np.asarray(_BlockMean(series.factors)(np.asarray(brain.array != 0, dtype=np.float32))) >= 0.5
    if mask.shape != series.hu.shape[:3]:
        raise InputError("the brain mask does not cover the CT perfusion's grid")
    if not mask.any():
        raise InputError("the brain mask is empty on the CT perfusion's grid; give a mask that covers the brain")
    return mask


def _user_region(aif_region: Volume | None, ctp: Volume, series: WorkingSeries, head: np.ndarray) -> np.ndarray | None:
    from ctp2mri.preprocessing.resample import _BlockMean

    if aif_region is None:
        return None
    aif_region.require_3d("AIF region")
    aif_region.require_same_grid(ctp, "the AIF region", "the CT perfusion")
    if not np.any(aif_region.array):
        raise InputError("the AIF region is empty; mark at least one voxel on an artery")
    region = np.asarray(_BlockMean(series.factors)(np.asarray(aif_region.array != 0, dtype=np.float32))) > 0
    if not (region & head).any():
        raise InputError("the AIF region lies outside the brain; place it on an artery inside the head "
                         "(the middle cerebral artery, or the internal carotid)")
    return region


def analyse_perfusion(ctp: Volume, brain: Volume | None = None, aif_region: Volume | None = None,
                      settings: PerfusionSettings | None = None, progress: ProgressCallback | None = None,
                      cancel: CancelToken | None = None) -> PerfusionResult:
    """Perfusion maps and the ischaemic core/hypoperfusion of a CT perfusion series.

    Parameters
    ----------
    ctp
        4-D CT perfusion in HU with frame times (any grid; clinical series are analysed on a ~2 mm
        working grid, `curves.working_series`).
    brain
        Brain mask on the CT's grid; None derives it from the CT (`ctp2mri.preprocessing.preprocess.brain_mask_from_ctp`).
    aif_region
        A region on the CT's grid where the user placed the AIF (e.g. a sphere around a click on
        an artery); None selects it automatically.
    settings
        `PerfusionSettings`; the defaults were chosen by measurement on the phantom (docs).
    progress, cancel
        ``progress(step, total, {"stage"})``; cancel is checked between stages and frames.

    Raises
    ------
    InputError
        A 3-D image, too few frames, NaN voxels, no bolus, an AIF region that is empty, outside
        the brain or holds no artery, a mask on another grid.
    """
    settings = settings or PerfusionSettings()
    ctp.require_4d("CT perfusion").require_finite("CT perfusion")
    total = 6

    def step(k: int, stage: str) -> None:
        if cancel is not None:
            cancel.raise_if_cancelled()
        if progress is not None:
            progress(k, total, {"stage": stage})

    series = working_series(ctp, settings.working_spacing_mm, cancel=cancel)
    step(1, "brain mask")
    brain_mask = _brain_on_working_grid(brain, ctp, series, None, cancel)
    head = ndimage.binary_dilation(brain_mask, iterations=2) & np.any(series.hu != 0, axis=-1)
    user = _user_region(aif_region, ctp, series, head)
    step(2, "bolus and input functions")
    n_baseline, arrival = bolus_arrival(series.hu, brain_mask, series.times)
    baseline, enhancement = baseline_and_enhancement(series.hu, n_baseline)
    del series.hu  # the enhancement holds what is needed; keep the peak memory at one copy
    vessels = head & (enhancement.max(axis=-1) > 60.0)
    aif = select_aif(enhancement, head, series.times, user, arrival_s=arrival)
    vof = select_vof(enhancement, head, series.times, aif)
    notes: list[str] = []
    if vof is None:
        notes.append("no venous output function found: the AIF is not corrected for partial volume")
    scale = partial_volume_scale(aif, vof) if settings.partial_volume_correction else 1.0
    aif.curve, aif.scale = aif.curve * scale, scale
    if aif.fit is not None:
        aif.fit = (aif.fit[0], aif.fit[1] * scale, aif.fit[2], aif.fit[3])
    else:
        notes.append("the AIF's first pass did not fit a gamma variate; it is interpolated linearly between frames")

    step(3, "tissue")
    spacing = series.spacing
    near_vessel = ndimage.binary_dilation(vessels, iterations=1)
    smooth_base = smooth_in_region(baseline, brain_mask & ~near_vessel, settings.smoothing_mm, spacing)
    lo, hi = settings.tissue_hu
    tissue = brain_mask & ~near_vessel & (smooth_base >= lo) & (smooth_base <= hi)
    if tissue.sum() < 10:
        raise InputError(f"the brain holds almost no tissue with an unenhanced density of {lo:g}–{hi:g} HU; "
                         "is the series in Hounsfield units (a rescale slope/intercept missing)?")
    curves = smooth_in_region(enhancement, tissue, settings.smoothing_mm, spacing)
    del enhancement

    step(4, "deconvolution")
    maps = _maps(curves, tissue, aif, series.times, settings)
    step(5, "core and hypoperfusion")
    regions = ischaemic_regions(maps["cbf"], maps["tmax"], tissue, brain_mask, series.affine, settings.regions)
    step(6, "done")
    return PerfusionResult(maps, tissue, vessels, brain_mask, regions, aif, vof, arrival, n_baseline,
                           series.affine, series.times, series.factors, (ctp.spatial_shape, ctp.affine.copy()),
                           settings, notes)


def _maps(curves: np.ndarray, tissue: np.ndarray, aif: InputFunction, times: np.ndarray,
          settings: PerfusionSettings) -> dict[str, np.ndarray]:
    """CBF, CBV, MTT, Tmax, TTP of the tissue voxels (0 elsewhere)."""
    t_fine = np.arange(0.0, float(times[-1]) + 1e-9, settings.dt_fine)
    aif_fine = aif.on_grid(t_fine)
    deconvolver = Deconvolver.build(aif_fine, t_fine, times, settings.method, settings.oi_target, settings.tikhonov)
    tissue_curves = curves[tissue]
    residues = deconvolver.residues(tissue_curves)
    height, _ = residue_peak(residues, deconvolver.dt)
    # Tmax, the time of the residue's maximum, is read at the half maximum of its leading edge:
    # regularisation smears the sharp onset of a delayed residue and drags its peak ~2–3 s late
    # (measured on the phantom: Tmax error 2.9 s at the peak, 0.65 s at the edge).
    delay = residue_onset(residues, deconvolver.dt)
    del residues
    aif_area = float(np.trapezoid(aif_fine, t_fine))
    if not aif_area > 0:
        raise InputError("the arterial input function has no area above its baseline; no perfusion can be computed")
    cbf = 6000.0 * K_H / RHO * height
    area = np.trapezoid(np.clip(tissue_curves, 0, None), times, axis=1)
    cbv = 100.0 * K_H / RHO * area / float(np.trapezoid(np.clip(aif.curve, 0, None), times))
    with np.errstate(divide="ignore", invalid="ignore"):
        mtt = np.where(cbf > 1e-6, 60.0 * cbv / cbf, 0.0)
    ttp = _time_to_peak(tissue_curves, times)
    values = {"cbf": cbf, "cbv": cbv, "mtt": np.clip(mtt, 0.0, 60.0), "tmax": np.clip(delay, 0.0, None), "ttp": ttp}
    out = {}
    for name in MAP_NAMES:
        grid = np.zeros(tissue.shape, dtype=np.float32)
        grid[tissue] = values[name]
        out[name] = grid
    return out


def _time_to_peak(curves: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Time (s) of each curve's maximum, refined by a parabola through the neighbouring frames."""
    k = np.clip(np.argmax(curves, axis=1), 1, times.size - 2)
    rows = np.arange(curves.shape[0])
    left, mid, right = curves[rows, k - 1], curves[rows, k], curves[rows, k + 1]
    curvature = left - 2.0 * mid + right
    with np.errstate(divide="ignore", invalid="ignore"):
        offset = np.where(curvature < 0, 0.5 * (left - right) / curvature, 0.0)
    offset = np.clip(offset, -0.5, 0.5)
    step = np.where(offset >= 0, times[k + 1] - times[k], times[k] - times[k - 1])
    return times[k] + offset * step
