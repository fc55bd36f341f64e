"""One case → normalised axial slices (the normalisation contract of docs/contracts.md).

Shared by the training dataset (`ctp2mri.data`), evaluation and synthesis, so that every
path normalises a case the same way: CTP [0, 200] HU → [−1, 1], DWI clipped to the case's
0.5–99.5 % brain quantiles → [−1, 1] (or, for a model trained with the DWI anchor, to its
0.5 % quantile and ``dwi_hi_median`` × its brain median), ADC clipped to the fixed window
``ADC_WINDOW`` (10⁻⁶ mm²/s) → [−1, 1] (models trained before that window used the case's
quantiles for ADC too: ``adc_window=None``), all × brain mask; slices laid out
``(H, W) = (X, Y)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctp2mri.casefolder import CASE_FILES, Case
from ctp2mri.errors import InputError
from ctp2mri.io.volume import Volume
from ctp2mri.preprocessing.preprocess import normalise_ctp, normalise_mri, normalise_mri_like
from ctp2mri.profiles import PROFILES, Profile, get_profile
from ctp2mri.settings import ADC_WINDOW

TARGETS = ("dwi", "adc")  # target channels, in order
TRAINING_NEEDS = ("ctp", "dwi", "adc", "mask")
PURPOSE = {"ctp": "the condition", "dwi": "a target channel", "adc": "a target channel",
            "mask": "the brain mask", "lesion": "the lesion mask (lesion-aware post-training)"}


@dataclass
class CaseSlices:
    """The kept axial slices of one case, normalised (numpy, channel-first, (H, W) = (X, Y)).

    Attributes
    ----------
    name
        Case name.
    slices
        (n,) z indices of the kept slices in the case volume.
    target, cond
        (n, 2, H, W) DWI/ADC and (n, T, H, W) CTP, float32 in [−1, 1], 0 outside the brain.
    brain, lesion
        (n, 1, H, W) uint8 masks; the lesion is cut to the brain.
    ranges
        ``{"dwi": (lo, hi), "adc": (lo, hi)}``: the case's intensities that map to −1 and 1.
    profile
        Name of the profile whose grid the case is on.
    has_lesion_mask
        False when the case came without a lesion mask (``lesion`` is then all zero).
    """

    name: str
    slices: np.ndarray
    target: np.ndarray
    cond: np.ndarray
    brain: np.ndarray
    lesion: np.ndarray
    ranges: dict[str, tuple[float, float]]
    profile: str
    has_lesion_mask: bool


def _grid_problem(case: Case, prof: Profile) -> str | None:
    """Why the case is not on ``prof``'s model grid, or None when it is."""
    ctp = case.ctp
    spacing = np.asarray(ctp.spacing)
    if tuple(ctp.spatial_shape[:2]) != tuple(prof.shape_xy):
        return f"{ctp.spatial_shape[0]}×{ctp.spatial_shape[1]} axial slices"
    if not np.allclose(spacing, prof.spacing, rtol=1e-3, atol=1e-3):
        return f"{' × '.join(f'{s:g}' for s in np.round(spacing, 3))} mm voxels"
    if ctp.orientation != "RAS":
        return f"{ctp.orientation} voxel order"
    return None


def _describe_profile(prof: Profile) -> str:
    sx, sy, sz = prof.spacing
    return (f"the {prof.name} profile's model grid ({prof.shape_xy[0]}×{prof.shape_xy[1]} axial slices of "
            f"{sx:g}×{sy:g} mm, {sz:g} mm apart, RAS)")


def _check_case(case: Case, name: str, prof: Profile | None, require_lesion: bool) -> Profile:
    """Validate a case for the dataset; returns the profile (detected when ``prof`` is None)."""
    needs = TRAINING_NEEDS + (("lesion",) if require_lesion else ())
    for what in needs:
        if getattr(case, what) is None:
            raise InputError(f"case {name} has no {CASE_FILES[what]} ({PURPOSE[what]}); it is required here. "
                             "Add it to the case folder (ctp2mri preprocess writes it), or leave the case out.")
    case.validate()
    if prof is None:
        prof = next((p for p in PROFILES.values() if _grid_problem(case, p) is None), None)
        if prof is None:
            problem = _grid_problem(case, PROFILES["paper"])
            raise InputError(f"case {name} has {problem}, which matches no model grid "
                             f"({', '.join(_describe_profile(p) for p in PROFILES.values())}); bring it onto one "
                             "with `ctp2mri preprocess --profile demo|paper`")
    problem = _grid_problem(case, prof)
    if problem is not None:
        raise InputError(f"case {name} has {problem}, not {_describe_profile(prof)}; bring it onto the model "
                         f"grid with `ctp2mri preprocess --profile {prof.name}`")
    if case.ctp.n_frames != prof.n_frames:
        raise InputError(f"case {name}: its CTP has {case.ctp.n_frames} time points but the model takes "
                         f"{prof.n_frames}; resample it in time with `ctp2mri preprocess --frames {prof.n_frames}` "
                         "(the dataset does not resample silently)")
    return prof


def lesion_volume(mask: Volume | np.ndarray, case: Case, name: str) -> Volume:
    """A supplied lesion mask (e.g. painted in napari) as a binary volume on the case's grid."""
    if isinstance(mask, Volume):
        mask.require_3d(f"lesion mask of case {name}")
        mask.require_same_grid(case.ctp, f"lesion mask of case {name}", f"case {name}'s CTP")
        array = mask.array
    else:
        array = np.asarray(mask)
        if array.shape != case.ctp.spatial_shape:
            raise InputError(f"the lesion mask given for case {name} has shape {array.shape}, but the case's "
                             f"grid is {case.ctp.spatial_shape}; paint or resample it on the case's grid")
    # Any non-zero label counts: a napari Labels layer may hold several label values.
    return Volume((np.asarray(array) != 0).astype(np.uint8), case.ctp.affine.copy(), meta={"source": "supplied"})


def adc_window_of(normalisation: Mapping[str, Any] | None) -> tuple[float, float] | None:
    """The fixed ADC window a checkpoint's ``normalisation`` record was trained with, or None
    for a model trained on per-case ADC quantiles (before the window existed)."""
    return check_adc_window((normalisation or {}).get("adc_window"))


def dwi_hi_median_of(normalisation: Mapping[str, Any] | None) -> float | None:
    """The DWI upper bound (× brain median) a checkpoint's ``normalisation`` record was trained
    with, or None for a model trained on per-case DWI quantiles (the default)."""
    return check_dwi_hi_median((normalisation or {}).get("dwi_hi_median"))


def normalisation_of(normalisation: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``adc_window`` and ``dwi_hi_median`` keywords (of `normalise_case`, `SliceDataset`,
    `ctp2mri.training.batches.load_dataset`) that reproduce a checkpoint's normalisation."""
    return {"adc_window": adc_window_of(normalisation), "dwi_hi_median": dwi_hi_median_of(normalisation)}


def check_dwi_hi_median(value: float | None) -> float | None:
    """``value`` as a float, or an InputError unless it is a finite number > 1 (the bound must
    lie above normal tissue)."""
    if value is None:
        return None
    try:
        factor = float(value)
    except (TypeError, ValueError):
        raise InputError(f"the DWI upper bound must be a multiple of the brain median, got {value!r}") from None
    if not (math.isfinite(factor) and factor > 1.0):
        raise InputError(f"the DWI upper bound must be a finite multiple > 1 of the brain median, got {factor:g}")
    return factor


def check_adc_window(window: tuple[float, float] | None) -> tuple[float, float] | None:
    """``window`` as floats, or an InputError when it is not two finite numbers lo < hi."""
    if window is None:
        return None
    try:
        lo, hi = (float(v) for v in window)
    except (TypeError, ValueError):
        raise InputError(f"the ADC window must be two numbers (lo, hi) in 10⁻⁶ mm²/s, got {window!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise InputError(f"the ADC window must be finite with lo < hi, got ({lo:g}, {hi:g})")
    return lo, hi


def _check_adc_units(adc: np.ndarray, brain: np.ndarray, window: tuple[float, float]) -> None:
    """A fixed window reads the ADC in 10⁻⁶ mm²/s: one in mm²/s or 10⁻³ mm²/s would be clipped
    to a constant without a word, so its median over the brain's positive voxels (a zero
    background inside a loose mask says nothing about units) must fall inside the window."""
    values = adc[brain & (adc > 0)]
    median = float(np.median(values)) if values.size else math.nan
    if not window[0] < median < window[1]:
        raise InputError(f"its ADC has a median of {median:.4g} over the brain's positive voxels, outside the ADC window "
                         f"{window[0]:g}–{window[1]:g}: ADC must be in 10⁻⁶ mm²/s (brain tissue ≈ 700–900); "
                         "multiply an ADC in 10⁻³ mm²/s by 1000, one in mm²/s by 10⁶")


def normalise_case(case: Case, name: str | None = None, profile: str | Profile | None = None,
                   min_brain_fraction: float = 0.01, require_lesion: bool = False, *,
                   adc_window: tuple[float, float] | None = ADC_WINDOW,
                   dwi_hi_median: float | None = None) -> CaseSlices:
    """Validate one case and cut it into normalised axial slices (the dataset's per-case step).

    Parameters
    ----------
    case
        A case with CTP, DWI, ADC and brain mask on a profile's model grid (lesion optional
        unless ``require_lesion``; a missing one gives an all-zero lesion mask).
    name
        Case name for messages and sample ids (default: ``case.info["case"]`` or the folder).
    profile
        The model grid the case must be on; None detects it among `ctp2mri.profiles.PROFILES`.
    min_brain_fraction
        Keep the slices whose brain covers at least this fraction of the slice area (always at
        least one voxel; 0 keeps every slice that touches the brain).
    require_lesion
        Refuse a case without lesion mask.
    adc_window
        ADC (10⁻⁶ mm²/s) mapped to [−1, 1]; None: the case's own brain quantiles, as DWI
        (what models trained before the fixed window expect; `adc_window_of` reads it from a
        checkpoint).
    dwi_hi_median
        DWI's upper bound as a multiple of the brain median (the DWI anchor,
        `ctp2mri.settings.DWI_HI_MEDIAN`); None: the 99.5 % brain quantile (the default; a
        checkpoint's is read by `dwi_hi_median_of`).

    Raises
    ------
    InputError
        A required image is missing, the case is off the model grid or has ≠ 15 CTP frames
        (both fixed by ``ctp2mri preprocess``), or no slice has enough brain.
    """
    name = name or case_name(case, 0)
    adc_window = check_adc_window(adc_window)
    dwi_hi_median = check_dwi_hi_median(dwi_hi_median)
    prof = _check_case(case, name, get_profile(profile) if isinstance(profile, str) else profile, require_lesion)
    brain = case.mask.array != 0
    counts = brain.sum(axis=(0, 1))
    area = brain.shape[0] * brain.shape[1]
    need = max(1, math.ceil(float(min_brain_fraction) * area - 1e-9))
    keep = np.flatnonzero(counts >= need)
    if keep.size == 0:
        raise InputError(f"case {name} has no axial slice with at least {min_brain_fraction:.1%} brain "
                         f"(the largest holds {counts.max() / area:.1%}); check its brain mask or lower "
                         "min_brain_fraction")
    ranges: dict[str, tuple[float, float]] = {}
    target = []
    for what in TARGETS:
        try:
            if what == "adc" and adc_window is not None:
                _check_adc_units(case.adc.array, brain, adc_window)
                image, ranges[what] = normalise_mri_like(case.adc.array, *adc_window, brain), adc_window
            else:
                image, ranges[what] = normalise_mri(getattr(case, what).array, brain,
                                                    hi_median=dwi_hi_median if what == "dwi" else None)
        except InputError as exc:
            raise InputError(f"case {name}, {CASE_FILES[what]}: {exc}") from None
        # float32 rounding in the scaling may overshoot ±1 by an ulp; the contract is [−1, 1].
        target.append(np.clip(image[:, :, keep], -1.0, 1.0))
    # (X, Y, n) per channel → (n, C, X, Y); quantiles above came from the whole brain volume.
    target_n = np.ascontiguousarray(np.stack(target).transpose(3, 0, 1, 2))
    cond = np.clip(normalise_ctp(case.ctp.array[:, :, keep, :], brain[:, :, keep]), -1.0, 1.0)
    cond_n = np.ascontiguousarray(cond.transpose(2, 3, 0, 1))
    brain_kept = brain[:, :, keep]
    # The lesion counts inside the brain only: losses and metrics live there.
    lesion = np.zeros_like(brain_kept) if case.lesion is None else (case.lesion.array[:, :, keep] != 0) & brain_kept
    brain_n, lesion_n = (np.ascontiguousarray(m.transpose(2, 0, 1)[:, None], dtype=np.uint8)
                         for m in (brain_kept, lesion))
    return CaseSlices(name, keep.astype(np.int64), target_n, cond_n, brain_n, lesion_n, ranges, prof.name,
                      case.lesion is not None)


def case_name(case: Case, index: int) -> str:
    if isinstance(case.info.get("case"), str) and case.info["case"]:
        return case.info["case"]
    if case.path is not None:
        return Path(case.path).name
    return f"case_{index:03d}"
