"""How well perfusion maps match a phantom case's truth (its truth/ folder), and the plain
reference that the analysis has to beat.

Figures, inside tissue (the analysis's tissue that is brain with a true CBF above 5 and no
vessel in it): Pearson r of CBF and of CBV, the mean absolute error of Tmax (s), whether the
AIF voxels lie in an artery, and the Dice of the core against the lesion mask (the infarct
core on the MRI) with both volumes.

The reference (`reference_analysis`) is what the perfusion literature calls the plain method:
a truncated SVD (20 % of the largest singular value) of the lower-triangular (not
block-circulant) convolution matrix on the frames, with the case's *true* arterial input
(``aif_hu`` in case.json), in-plane Gaussian smoothing of σ = 1 voxel, CBV as the area ratio,
and the same core rule.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ctp2mri.casefolder import CASE_INFO, read_case, read_truth
from ctp2mri.errors import InputError
from ctp2mri.evaluation.lesion_metrics import dice
from ctp2mri.perfusion.analysis import K_H, RHO, PerfusionResult, analyse_perfusion
from ctp2mri.perfusion.curves import baseline_and_enhancement, bolus_arrival, smooth_in_region
from ctp2mri.perfusion.regions import RegionSettings, ischaemic_regions

ARTERY = 1  # label of the phantom's truth/vessels.nii.gz


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 3 or np.std(a) == 0 or np.std(b) == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


def score_maps(cbf: np.ndarray, cbv: np.ndarray, tmax: np.ndarray, core: np.ndarray, tissue: np.ndarray,
               truth: dict[str, Any], lesion: np.ndarray, voxel_ml: float) -> dict[str, float]:
    """The figures above for maps on the truth's grid."""
    inside = tissue & (truth["cbf"] > 5.0) & (truth["vessel_fraction"] == 0)
    return {
        "cbf_r": _pearson(cbf[inside], truth["cbf"][inside]),
        "cbv_r": _pearson(cbv[inside], truth["cbv"][inside]),
        "tmax_mae_s": float(np.mean(np.abs(tmax[inside] - truth["tmax"][inside]))) if inside.any() else math.nan,
        "core_dice": dice(core, lesion) if lesion.any() else math.nan,
        "core_ml": float(core.sum()) * voxel_ml,
        "lesion_ml": float(lesion.sum()) * voxel_ml,
        "tissue_voxels": int(inside.sum()),
    }


def case_truth(folder: str | Path) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, Any]]:
    """The truth maps, the lesion mask and case.json of a phantom case folder."""
    folder = Path(folder)
    truth = {k: v.array for k, v in read_truth(folder).items()}
    missing = {"cbf", "cbv", "tmax", "vessels", "vessel_fraction"} - set(truth)
    if missing:
        raise InputError(f"{folder} holds no phantom truth ({', '.join(sorted(missing))} missing in truth/); "
                         "generate it with `ctp2mri phantom` (version 2.0 or later)")
    lesion = read_case(folder, require=("ctp", "lesion")).lesion.array != 0
    info = json.loads((folder / CASE_INFO).read_text())
    return truth, lesion, info


def score_result(result: PerfusionResult, folder: str | Path) -> dict[str, float]:
    """Score an analysis of a phantom case folder (on the CT's grid) against its truth."""
    truth, lesion, _ = case_truth(folder)
    maps = {k: result.on_ctp_grid(k).array for k in ("cbf", "cbv", "tmax")}
    tissue = result.on_ctp_grid("tissue").array > 0
    core = result.on_ctp_grid("core").array > 0
    shape, affine = result.ctp_grid
    voxel_ml = float(np.prod(np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))) / 1000.0
    scores = score_maps(maps["cbf"], maps["cbv"], maps["tmax"], core, tissue, truth, lesion, voxel_ml)
    vessels = truth["vessels"]
    aif_cells = result.on_ctp_grid("aif").array > 0
    scores["aif_in_artery"] = float(np.mean(vessels[aif_cells] == ARTERY)) if aif_cells.any() else 0.0
    return scores


def analyse_case_folder(folder: str | Path, **settings: Any) -> PerfusionResult:
    """`analyse_perfusion` of a case folder's CTP with its brain mask."""
    case = read_case(folder, require=("ctp", "mask"))
    from ctp2mri.perfusion.analysis import PerfusionSettings

    return analyse_perfusion(case.ctp, case.mask, settings=PerfusionSettings(**settings))


def reference_analysis(folder: str | Path, threshold: float = 0.2, sigma_voxels: float = 1.0,
                       regions: RegionSettings | None = None) -> dict[str, Any]:
    """The plain reference: truncated SVD with the true AIF (see the module docstring); the same
    tissue mask as the analysis would use is passed in by the caller through ``tissue``."""
    case = read_case(Path(folder), require=("ctp", "mask"))
    info = json.loads((Path(folder) / CASE_INFO).read_text())
    hu = case.ctp.array.astype(np.float32)
    times = np.asarray(case.ctp.frame_times, dtype=np.float64)
    brain = case.mask.array != 0
    n_base, _ = bolus_arrival(hu, brain, times)
    baseline, enhancement = baseline_and_enhancement(hu, n_base)
    spacing = np.asarray(case.ctp.spacing)
    tissue = brain & (smooth_in_region(baseline, brain, sigma_voxels * spacing[0], spacing) >= 15.0) \
        & (enhancement.max(axis=-1) < 60.0)
    curves = smooth_in_region(enhancement, tissue, sigma_voxels * spacing[0], spacing)[tissue]
    aif = np.asarray(info["aif_hu"], dtype=np.float64) * float(info.get("gain", 1.0))
    dt = float(times[1] - times[0])
    n = times.size
    i, j = np.indices((n, n))
    matrix = dt * np.where(i >= j, aif[np.clip(i - j, 0, n - 1)], 0.0)
    u, s, vt = np.linalg.svd(matrix)
    inverse = np.where(s > threshold * s[0], 1.0 / np.maximum(s, 1e-12), 0.0)
    residues = (curves @ u) * inverse @ vt
    peak = residues.max(axis=1)
    tmax_values = times[np.argmax(residues, axis=1)]
    out = {name: np.zeros(brain.shape, dtype=np.float32) for name in ("cbf", "cbv", "tmax")}
    out["cbf"][tissue] = 6000.0 * K_H / RHO * peak
    out["cbv"][tissue] = 100.0 * K_H / RHO * np.trapezoid(np.clip(curves, 0, None), times, axis=1) \
        / np.trapezoid(aif, times)
    out["tmax"][tissue] = tmax_values
    found = ischaemic_regions(out["cbf"], out["tmax"], tissue, brain, case.ctp.affine, regions)
    out["core"], out["tissue"] = found.core, tissue
    return out


def score_reference(folder: str | Path, **kwargs: Any) -> dict[str, float]:
    """`reference_analysis` of a phantom case folder, scored as `score_result` scores the analysis."""
    ref = reference_analysis(folder, **kwargs)
    truth, lesion, _ = case_truth(folder)
    case_ctp = read_case(Path(folder), require=("ctp",)).ctp
    voxel_ml = float(np.prod(case_ctp.spacing)) / 1000.0
    return score_maps(ref["cbf"], ref["cbv"], ref["tmax"], ref["core"], ref["tissue"], truth, lesion, voxel_ml)


__all__ = ["analyse_case_folder", "case_truth", "reference_analysis", "score_maps", "score_reference", "score_result"]

