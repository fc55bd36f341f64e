"""One case of `ctp2mri evaluate`: normalise it for a model, score a synthesis against its truth.

The driver (`ctp2mri.evaluation.evaluate.evaluate`) samples; this module turns one case and
one prediction into one CSV row: MAE, lesion MAE, PSNR and MS-SSIM per channel in the
normalised space (`ctp2mri.evaluation.metrics.channel_metrics`), the lesion contrast and AUC
of the synthetic and the true images, and the infarct core from the synthetic ADC mapped back
to units on the model's ADC scale (the fixed window; the case's own range for models from before
it) (`ctp2mri.evaluation.lesion_metrics`). The clinical CTP core
(`perfusion_core`) is scored against the same lesion beside the models'. `figure_slice` and
`figure_rows` pick what the evaluation figure (`ctp2mri.evaluation.figures`) shows.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ctp2mri.casefolder import Case
from ctp2mri.data import TARGETS, CaseSlices, normalise_case
from ctp2mri.errors import InputError
from ctp2mri.evaluation.lesion_metrics import (
    core_comparison,
    core_mask_from_adc,
    lesion_auc,
    lesion_contrast,
    volume_ml,
)
from ctp2mri.evaluation.metrics import channel_metrics, flat_metrics
from ctp2mri.evaluation.report import CHANNELS
from ctp2mri.preprocessing.preprocess import denormalise_mri
from ctp2mri.settings import ADC_WINDOW
from ctp2mri.synthesis.seeding import slice_seed

__all__ = ["FIGURE_ROWS", "case_seed", "figure_rows", "figure_slice", "normalise_for_model", "perfusion_core",
           "predicted_adc", "score_case"]

FIGURE_ROWS = 4  # test slices shown in the evaluation figure
_CORE_KEYS = ("dice", "pred_ml", "true_ml", "volume_diff_ml", "abs_volume_diff_ml")


def case_seed(seed: int, case: str) -> int:
    """The seed of one case's slices: the run seed mixed with a stable hash of the case name,
    so a case gets the same noise whichever other cases are evaluated with it."""
    return slice_seed(seed, zlib.crc32(case.encode("utf-8")))


def normalise_for_model(case: Case, name: str, profile: str, model_label: str,
                        adc_window: tuple[float, float] | None = ADC_WINDOW,
                        dwi_hi_median: float | None = None) -> CaseSlices:
    """Every axial slice of ``case`` that holds brain, normalised on ``profile``'s grid as the
    model was trained (``normalisation_of(model.normalisation)``: its ADC window, None for
    per-case quantiles, and DWI anchor, None for the 99.5 % quantile).

    Raises
    ------
    InputError
        The case is not on the grid of the model ``model_label``'s profile.
    """
    try:
        # min_brain_fraction 0: every slice with brain, so metrics cover the whole brain
        return normalise_case(case, name, profile, min_brain_fraction=0.0, adc_window=adc_window,
                              dwi_hi_median=dwi_hi_median)
    except InputError as exc:
        raise InputError(f"model {model_label} works on the {profile!r} profile's grid, but: {exc}") from None


def predicted_adc(pred: np.ndarray, part: CaseSlices, shape: tuple[int, ...]) -> np.ndarray:
    """Synthetic ADC in 10⁻⁶ mm²/s on the case grid, from the ADC range ``part`` was normalised with."""
    lo, hi = part.ranges["adc"]
    adc = np.zeros(shape, dtype=np.float32)
    adc[:, :, part.slices] = np.moveaxis(denormalise_mri(pred[:, 1], lo, hi), 0, -1)
    return adc


def _lesion_contrasts(pred: np.ndarray, part: CaseSlices, brain: np.ndarray,
                      lesion: np.ndarray | None) -> dict[str, float]:
    """`lesion_contrast` and `lesion_auc` of the synthetic and the true DWI and ADC: the
    contrast in units from the case's own ranges (the true images as clipped by normalisation,
    so both see the same range); the AUC is rank-based, so any monotone scaling gives the same."""
    out: dict[str, float] = {}
    for c, (channel, key) in enumerate(zip(CHANNELS, TARGETS)):
        lo, hi = part.ranges[key]
        for suffix, images in (("", pred), ("_true", part.target)):
            value = auc = math.nan
            if lesion is not None:
                value = lesion_contrast(denormalise_mri(np.asarray(images[:, c]), lo, hi), lesion, brain)
                auc = lesion_auc(np.asarray(images[:, c]), lesion, brain, higher_is_lesion=key == "dwi")
            out[f"{channel}_lesion_contrast{suffix}"] = value
            out[f"{channel}_lesion_auc{suffix}"] = auc
    return out


def score_case(name: str, label: str, case: Case, part: CaseSlices, pred: np.ndarray,
               settings: Mapping[str, Any]) -> tuple[dict[str, Any], np.ndarray]:
    """One CSV row (metrics in normalised space, core in units) and the predicted core mask.

    Parameters
    ----------
    name, label
        The case's and the model's names (the row's ``case`` and ``model``).
    case, part
        The case in units and its normalised slices (`normalise_for_model`).
    pred
        The synthetic DWI/ADC of ``part``'s slices, (n, 2, H, W) in [−1, 1], 0 outside the brain.
    settings
        Columns added to the row as they are (the sampler settings).
    """
    brain = part.brain[:, 0] > 0
    lesion = part.lesion[:, 0] > 0 if part.has_lesion_mask else None
    nested = channel_metrics(pred, part.target, brain, lesion, channel_names=CHANNELS,
                             layout="slices")
    row: dict[str, Any] = {"case": name, "model": label, "n_slices": len(part.slices),
                           "lesion_voxels": int(lesion.sum()) if lesion is not None else 0,
                           **flat_metrics(nested)}
    row.update(_lesion_contrasts(pred, part, brain, lesion))
    spacing = tuple(float(s) for s in case.ctp.spacing)
    brain_vol = case.mask.array > 0
    pred_core = core_mask_from_adc(predicted_adc(pred, part, brain_vol.shape), brain_vol,
                                   spacing=spacing)
    if case.lesion is not None:
        truth = (case.lesion.array > 0) & brain_vol
        cmp = core_comparison(pred_core, truth, spacing)
        gt_core = core_mask_from_adc(case.adc.array, brain_vol, spacing=spacing)
        row.update({f"core_{k}": cmp[k] for k in _CORE_KEYS})
        row["core_gt_adc_dice"] = core_comparison(gt_core, truth, spacing)["dice"]
        if not truth.any():
            # Dice is undefined without a lesion (MONAI's ignore_empty): a lesion-free case's
            # "1.0 for no core" would swamp the lesion cases' mean; its false core is in the
            # volumes
            row["core_dice"] = row["core_gt_adc_dice"] = math.nan
    else:
        row.update({f"core_{k}": math.nan for k in _CORE_KEYS})
        row["core_pred_ml"] = volume_ml(pred_core, spacing)  # no truth to compare with
        row["core_gt_adc_dice"] = math.nan
    row.update(settings)
    return row, pred_core


def perfusion_core(case: Case) -> dict[str, float]:
    """The clinical CTP core of a case (`ctp2mri.perfusion`) against its lesion mask:
    ``perfusion_core_{ml,dice,abs_volume_diff_ml}`` (NaN without a lesion mask)."""
    from ctp2mri.perfusion import analyse_perfusion

    core = analyse_perfusion(case.ctp, case.mask).on_ctp_grid("core").array > 0
    spacing = tuple(float(s) for s in case.ctp.spacing)
    out = {"perfusion_core_ml": volume_ml(core, spacing), "perfusion_core_dice": math.nan,
           "perfusion_core_abs_volume_diff_ml": math.nan}
    if case.lesion is not None:
        truth = (case.lesion.array > 0) & (case.mask.array > 0)
        cmp = core_comparison(core, truth, spacing)
        out["perfusion_core_abs_volume_diff_ml"] = cmp["abs_volume_diff_ml"]
        out["perfusion_core_dice"] = cmp["dice"] if truth.any() else math.nan
    return out


# the figure ------------------------------------------------------------------------------------
def figure_slice(name: str, label: str, case: Case, part: CaseSlices, pred: np.ndarray,
                 pred_core: np.ndarray) -> Any:
    """The case's slice with the most core (else the most brain), in units, as a
    `ctp2mri.evaluation.figures.EvaluationSlice`."""
    from ctp2mri.evaluation.figures import EvaluationSlice

    lesion_per_slice = part.lesion[:, 0].sum(axis=(1, 2))
    per_slice = lesion_per_slice if lesion_per_slice.any() else part.brain[:, 0].sum(axis=(1, 2))
    row = int(np.argmax(per_slice))
    z = int(part.slices[row])
    brain = case.mask.array[:, :, z] > 0
    ctp = case.ctp.array[:, :, z, :].astype(np.float32)
    peak = int(np.argmax(ctp[brain].mean(axis=0)))  # the frame where the brain enhances most
    synthetic = {what: denormalise_mri(pred[row, i], *part.ranges[what], mask=brain)
                 for i, what in enumerate(TARGETS)}
    return EvaluationSlice(
        name=name, z=z, ctp=ctp[..., peak], dwi_true=case.dwi.array[:, :, z],
        adc_true=case.adc.array[:, :, z], dwi_pred=synthetic["dwi"], adc_pred=synthetic["adc"],
        lesion=case.lesion.array[:, :, z] > 0 if case.lesion is not None else None,
        pred_core=pred_core[:, :, z], dwi_range=part.ranges["dwi"], model=label)


def figure_rows(candidates: Mapping[str, Sequence[Any]], lesion_voxels: Mapping[str, int],
                rows: int = FIGURE_ROWS) -> list[Any]:
    """The figure's rows: every model's slice of the cases with the largest lesions.

    ``candidates`` maps a case to one slice per model (the same slice, so models compare
    directly); as many cases as ``rows`` holds for that many models (at least one) are taken,
    largest lesion first, ties in case order.
    """
    per_case = max((len(v) for v in candidates.values()), default=1)
    picked = sorted(candidates, key=lambda n: -lesion_voxels.get(n, 0))[:max(1, rows // per_case)]
    return [s for name in picked for s in candidates[name]]
