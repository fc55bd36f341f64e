"""Ground truth vs synthetic DWI/ADC of one case: the table of the napari compare widget.

Qt-free, so the widget stays a thin shell and the numbers can be checked without a display.
Everything is computed by `ctp2mri.evaluation.metrics` with the conventions of ``ctp2mri evaluate``
(normalised space with the ground truth's ranges, the same core rule). The widget sees the
synthetic images in intensity units, as the synthesis engine writes them (mapped back with
the model's training ranges), so a number here matches `ctp2mri.evaluation.evaluate`'s for the same
sample up to that round trip and the clipping of the synthetic image to the ground truth's
range.

Conventions
-----------
* Arrays are 3-D ``(X, Y, Z)`` volumes on one grid, axial slices along ``Z`` (the last axis),
  as in `ctp2mri.io.volume.Volume`; ``spacing`` is ``(x, y, z)`` in mm.
* DWI and ADC are compared in the contract's normalised space (docs/contracts.md): clipped to the
  0.5–99.5 % brain quantiles and mapped to [−1, 1], times the brain mask. Both the ground
  truth and the synthetic image are mapped with the **ground truth's** quantile range.
  Normalising the synthetic image with its own quantiles would hide global intensity
  errors (a synthetic DWI twice too bright would normalise to the same picture); with the
  ground truth's range an intensity error stays an error, measured in the units the model
  is trained and evaluated in (its output is denormalised with a fixed range, so this is
  the paper's comparison of a prediction with its normalised target). The ranges used are
  returned with the table.
* Infarct core: `ctp2mri.evaluation.metrics.core_mask_from_adc` on the ADC in 10⁻⁶ mm²/s (not
  normalised), computed once on the whole volume (its connected components are 3-D); a
  slice's core is that mask's slice.
* Perfusion core: optionally, a core mask from the CT perfusion (``ctp2mri perfusion`` or the
  napari perfusion widget, rCBF below 30 %) on the same grid, compared with the lesion as the
  synthetic ADC's core is; it sits beside that core in the table.
* A slice's metrics use that slice only: MAE, lesion MAE and PSNR over its brain (lesion)
  voxels, MS-SSIM of the brain-masked slice, Dice and volumes (ml) of the masks' slice.
  A slice without brain (lesion) gives NaN where nothing can be measured.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctp2mri.errors import InputError
from ctp2mri.io.atomic import atomic_path
from ctp2mri.evaluation.lesion_metrics import core_mask_from_adc, dice, lesion_contrast, volume_ml
from ctp2mri.evaluation.metrics import channel_metrics, flat_metrics
from ctp2mri.preprocessing.preprocess import MRI_QUANTILES, denormalise_mri, normalise_mri, normalise_mri_like
from ctp2mri.settings import CORE_ADC_THRESHOLD

__all__ = [
    "TABLE_NOTE",
    "METRIC_INFO",
    "PreparedComparison",
    "compare_volumes",
    "comparison_metrics",
    "format_value",
    "make_table",
    "prepare_comparison",
    "table_rows",
    "table_to_csv",
]

# key → (label, decimals), in the order the table shows them. Channel keys are those of
# `flat_metrics`, so a row can be merged with `ctp2mri evaluate`'s CSV.
_CHANNEL_INFO = {
    "mae": ("MAE", 4), "lesion_mae": ("lesion MAE", 4), "psnr": ("PSNR (dB)", 2),
    "ms_ssim": ("MS-SSIM", 4), "lesion_contrast": ("lesion contrast", 2),
    "lesion_contrast_true": ("GT lesion contrast", 2),
}
# "core" is `core_mask_from_adc` of the synthetic ADC, "GT core" that of the ground truth's
_CORE_INFO = {
    "core_dice": ("core Dice vs GT core", 3),
    "core_dice_lesion": ("core Dice vs lesion", 3),
    "perfusion_core_dice_lesion": ("perfusion core Dice vs lesion", 3),
    "gt_core_dice_lesion": ("GT core Dice vs lesion", 3),
    "core_ml": ("core (ml)", 2),
    "perfusion_core_ml": ("perfusion core volume (ml)", 2),
    "gt_core_ml": ("GT core (ml)", 2),
    "lesion_ml": ("lesion (ml)", 2),
}
TABLE_NOTE = (
    "DWI/ADC normalised to [-1, 1] with the ground truth's brain "
    f"{MRI_QUANTILES[0]:g}-{MRI_QUANTILES[1]:g} % range (both images). core: ADC < "
    f"{CORE_ADC_THRESHOLD:g} x 10^-6 mm^2/s in the brain (small specks removed), from the "
    "synthetic ADC; GT core: from the ground-truth ADC; perfusion core: the CT perfusion's "
    "(rCBF below the threshold), when picked. Volumes in ml. Lesion contrast: mean "
    "inside the lesion / median of the rest of the brain, in image units (rDWI, rADC; "
    "1 = the lesion cannot be seen)."
)
METRIC_INFO: dict[str, tuple[str, int]] = {
    **{f"{ch}_{k}": (f"{ch} {label}", d) for ch in ("DWI", "ADC")
       for k, (label, d) in _CHANNEL_INFO.items()},
    **_CORE_INFO,
}


@dataclass(frozen=True)
class PreparedComparison:
    """What every table of one case needs, computed once (normalisation, core masks).

    Attributes
    ----------
    target, pred
        (C, X, Y, Z) ground-truth and synthetic images, normalised with the ground truth's
        ranges; channels ``channels``.
    channels
        ``("DWI",)`` or ``("DWI", "ADC")``.
    brain, lesion
        Boolean (X, Y, Z) masks; the lesion cut to the brain, None when not given.
    core, gt_core
        Boolean core masks from the synthetic and ground-truth ADC, None without that ADC.
    perfusion_core
        Boolean core mask from the CT perfusion, cut to the brain; None when not given.
    spacing
        Voxel size (x, y, z) in mm.
    ranges
        ``{"DWI": (lo, hi), ...}``: the ground truth's intensities mapped to −1 and 1.
    """

    target: np.ndarray
    pred: np.ndarray
    channels: tuple[str, ...]
    brain: np.ndarray
    lesion: np.ndarray | None
    core: np.ndarray | None
    gt_core: np.ndarray | None
    spacing: tuple[float, float, float]
    ranges: dict[str, tuple[float, float]]
    perfusion_core: np.ndarray | None = None

    @property
    def n_slices(self) -> int:
        return int(self.brain.shape[2])


def _volume(array: Any, what: str, shape: tuple[int, ...] | None) -> np.ndarray:
    a = np.asarray(array)
    if a.ndim != 3:
        raise InputError(f"the {what} has {a.ndim} dimensions {a.shape}; the comparison needs "
                         "a 3-D volume (pick a 3-D image, not the CT perfusion series)")
    if shape is not None and a.shape != shape:
        raise InputError(f"the {what} has shape {a.shape} but the ground-truth DWI {shape}; "
                         "both must lie on the same grid (resample one onto the other first)")
    return a


def _image(array: Any, what: str, shape: tuple[int, ...] | None) -> np.ndarray:
    a = _volume(array, what, shape).astype(np.float32, copy=False)
    if not np.all(np.isfinite(a)):
        raise InputError(f"the {what} holds NaN or infinite values; fix or mask them first")
    return a


def prepare_comparison(gt_dwi: Any, gt_adc: Any | None, syn_dwi: Any, syn_adc: Any | None,
                       brain: Any | None, lesion: Any | None,
                       spacing: Sequence[float],
                       perfusion_core: Any | None = None) -> PreparedComparison:
    """Check and normalise one case's images and derive its core masks.

    Parameters
    ----------
    gt_dwi, syn_dwi
        Ground-truth and synthetic DWI, (X, Y, Z).
    gt_adc, syn_adc
        ADC in 10⁻⁶ mm²/s or None. The ADC image metrics need both; the core rows need the
        ADC they are about.
    brain
        Brain mask (non-zero inside); None derives it as ``gt_dwi > 0`` (the contract's
        images are zero outside the brain; a raw DWI's background noise would count too).
    lesion
        Lesion mask or None (no lesion MAE, no lesion rows). Counted inside the brain only.
    spacing
        Voxel size (x, y, z) in mm.
    perfusion_core
        Core mask from the CT perfusion (non-zero inside) on the same grid, or None (no
        perfusion core rows). Counted inside the brain only, as the lesion.

    Raises
    ------
    InputError
        A volume is not 3-D, not on the ground truth's grid, not finite; the brain is empty
        or the ground truth constant inside it; the ADC not in 10⁻⁶ mm²/s.
    """
    sp = np.asarray(spacing, dtype=np.float64).ravel()
    if sp.size != 3 or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise InputError(f"spacing must be three positive voxel sizes in mm (x, y, z), "
                         f"got {spacing!r}")
    gt = {"DWI": _image(gt_dwi, "ground-truth DWI", None)}
    shape = gt["DWI"].shape
    syn = {"DWI": _image(syn_dwi, "synthetic DWI", shape)}
    gt_adc_a = None if gt_adc is None else _image(gt_adc, "ground-truth ADC", shape)
    syn_adc_a = None if syn_adc is None else _image(syn_adc, "synthetic ADC", shape)
    if gt_adc_a is not None and syn_adc_a is not None:
        gt["ADC"], syn["ADC"] = gt_adc_a, syn_adc_a
    brain_a = (gt["DWI"] > 0) if brain is None else _volume(brain, "brain mask", shape) != 0
    if not brain_a.any():
        raise InputError("the brain mask is empty" + (" (the ground-truth DWI has no voxel "
                         "above 0)" if brain is None else "") + "; pick the case's brain mask")
    lesion_a = None if lesion is None else (_volume(lesion, "lesion mask", shape) != 0) & brain_a
    perfusion_a = (None if perfusion_core is None
                   else (_volume(perfusion_core, "perfusion core", shape) != 0) & brain_a)

    ranges: dict[str, tuple[float, float]] = {}
    target, pred = [], []
    for ch, image in gt.items():
        try:
            t, ranges[ch] = normalise_mri(image, brain_a)
        except InputError as exc:
            raise InputError(f"ground-truth {ch}: {exc}") from None
        target.append(np.clip(t, -1.0, 1.0))
        pred.append(normalise_mri_like(syn[ch], *ranges[ch], brain_a))

    def core(adc: np.ndarray | None, what: str) -> np.ndarray | None:
        if adc is None:
            return None
        try:
            return core_mask_from_adc(adc, brain_a, spacing=sp)
        except InputError as exc:
            raise InputError(f"{what}: {exc}") from None

    return PreparedComparison(
        target=np.stack(target), pred=np.stack(pred), channels=tuple(gt), brain=brain_a,
        lesion=lesion_a, core=core(syn_adc_a, "synthetic ADC"),
        gt_core=core(gt_adc_a, "ground-truth ADC"), spacing=tuple(float(s) for s in sp),
        ranges=ranges, perfusion_core=perfusion_a,
    )


def comparison_metrics(prepared: PreparedComparison,
                       slice_index: int | None = None) -> dict[str, float]:
    """The table's values for the whole volume (``slice_index=None``) or one axial slice.

    Returns
    -------
    dict
        Keys of `METRIC_INFO` in its order, those the inputs allow: ``{ch}_mae``,
        ``{ch}_lesion_mae``, ``{ch}_psnr``, ``{ch}_ms_ssim``, ``{ch}_lesion_contrast[_true]``
        (`ctp2mri.evaluation.metrics.lesion_contrast` of the synthetic and true image) per channel; ``core_dice``
        (synthetic vs ground-truth core), ``core_dice_lesion``, ``perfusion_core_dice_lesion``,
        ``gt_core_dice_lesion``, ``core_ml``, ``perfusion_core_ml``, ``gt_core_ml``, ``lesion_ml``.
    """
    p = prepared
    if slice_index is None:
        def cut(a: np.ndarray) -> np.ndarray:
            return a
        images = channel_metrics(p.pred, p.target, p.brain, p.lesion, p.channels,
                                 layout="volume")
    else:
        k = int(slice_index)
        if not 0 <= k < p.n_slices:
            raise InputError(f"slice {slice_index} is outside the volume's {p.n_slices} "
                             "axial slices")

        def cut(a: np.ndarray) -> np.ndarray:
            return a[..., k]
        images = channel_metrics(cut(p.pred)[None], cut(p.target)[None], cut(p.brain)[None],
                                 None if p.lesion is None else cut(p.lesion)[None], p.channels,
                                 layout="slices")
    values = flat_metrics(images)
    if p.lesion is not None:  # rDWI / rADC: is the lesion there at all, whatever the threshold
        for c, ch in enumerate(p.channels):
            lo, hi = p.ranges[ch]
            for key, images_c in ((f"{ch}_lesion_contrast", p.pred[c]),
                                  (f"{ch}_lesion_contrast_true", p.target[c])):
                values[key] = lesion_contrast(denormalise_mri(cut(images_c), lo, hi),
                                              cut(p.lesion), cut(p.brain))
    if p.core is not None and p.gt_core is not None:
        values["core_dice"] = dice(cut(p.core), cut(p.gt_core))
    if p.core is not None and p.lesion is not None:
        values["core_dice_lesion"] = dice(cut(p.core), cut(p.lesion))
    if p.perfusion_core is not None and p.lesion is not None:
        values["perfusion_core_dice_lesion"] = dice(cut(p.perfusion_core), cut(p.lesion))
    if p.gt_core is not None and p.lesion is not None:
        values["gt_core_dice_lesion"] = dice(cut(p.gt_core), cut(p.lesion))
    for key, mask in (("core_ml", p.core), ("perfusion_core_ml", p.perfusion_core),
                      ("gt_core_ml", p.gt_core), ("lesion_ml", p.lesion)):
        if mask is not None:
            values[key] = volume_ml(cut(mask), p.spacing)
    return {key: values[key] for key in METRIC_INFO if key in values}


def compare_volumes(gt_dwi: Any, gt_adc: Any | None, syn_dwi: Any, syn_adc: Any | None,
                    brain: Any | None, lesion: Any | None, spacing: Sequence[float],
                    slice_index: int | None = None,
                    perfusion_core: Any | None = None) -> dict[str, Any]:
    """Whole-volume (and one slice's) comparison of a synthetic case with its ground truth.

    Parameters are those of `prepare_comparison`, plus ``slice_index``, the axial slice
    (index along the last axis) whose metrics are wanted, or None.

    Returns
    -------
    dict
        ``volume``: `comparison_metrics` of the whole volume; ``slice``: of slice
        ``slice_index`` (None without one); ``slice_index``; ``channels``; ``ranges``: the
        ground truth's normalisation ranges ``{ch: (lo, hi)}``. `table_to_csv` writes it.
    """
    prepared = prepare_comparison(gt_dwi, gt_adc, syn_dwi, syn_adc, brain, lesion, spacing,
                                  perfusion_core)
    return make_table(prepared, comparison_metrics(prepared), slice_index)


def make_table(prepared: PreparedComparison, volume: dict[str, float],
               slice_index: int | None) -> dict[str, Any]:
    """`compare_volumes`' dict from already computed whole-volume values (the widget keeps
    them while the slice changes)."""
    return {
        "volume": volume,
        "slice": None if slice_index is None else comparison_metrics(prepared, slice_index),
        "slice_index": None if slice_index is None else int(slice_index),
        "channels": prepared.channels,
        "ranges": dict(prepared.ranges),
    }


def format_value(key: str, value: float) -> str:
    """A value as the table shows it (the metric's decimals; "–" for NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{METRIC_INFO.get(key, (key, 4))[1]}f}"


def table_rows(table: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per metric: ``metric`` (key), ``label``, ``whole_volume`` and ``slice``
    (None without a slice)."""
    volume, sliced = table["volume"], table.get("slice")
    keys = list(volume) + [k for k in (sliced or {}) if k not in volume]
    return [{"metric": k, "label": METRIC_INFO.get(k, (k, 4))[0],
             "whole_volume": volume.get(k, math.nan),
             "slice": None if sliced is None else sliced.get(k, math.nan)} for k in keys]


def table_to_csv(table: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write `compare_volumes`' table as CSV (atomically: complete or not at all).

    Columns: ``metric``, ``label``, ``whole_volume`` and, with a slice, ``slice_<k>`` (k the
    axial index). Values at full precision; NaN as ``nan``. Trailing rows record the
    normalisation ranges (``range_lo_<ch>``, ``range_hi_<ch>``) so the numbers can be
    reproduced.
    """
    path = Path(path)
    k = table.get("slice_index")
    header = ["metric", "label", "whole_volume"] + ([] if k is None else [f"slice_{k}"])
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in table_rows(table):
            cells = [row["metric"], row["label"], repr(float(row["whole_volume"]))]
            if k is not None:
                cells.append(repr(float(row["slice"])))
            writer.writerow(cells)
        for ch, (lo, hi) in table.get("ranges", {}).items():
            for end, v in (("lo", lo), ("hi", hi)):
                label = f"ground-truth {ch} intensity mapped to {'-1' if end == 'lo' else '1'}"
                writer.writerow([f"range_{end}_{ch}", label, repr(float(v))]
                                + ([] if k is None else [""]))
    return path
