"""`ctp2mri evaluate`: sample a split's cases with trained models and score them as Table 1.

For every case of the split: normalise it as the training data (`ctp2mri.data.normalise_case`,
every axial slice that holds brain), synthesise DWI/ADC (`ctp2mri.synthesis.inference`: DDIM for a
cLDM, BBDM's bridge sampler for a cBBDM, one generator pass for Pix2Pix), and compare with
the ground truth **in the normalised space** ([−1, 1], brain-masked), as the paper does: MAE,
lesion MAE, PSNR and MS-SSIM per channel inside the brain (`ctp2mri.evaluation.metrics.channel_metrics`).
One row per case (and model) goes to a CSV; the summary is the mean ± SD over cases, printed
in the shape of the paper's Table 1. Several models are scored on the same cases with the
same steps, η and per-slice seeds, and `write_comparison` writes their Table-1-shaped
comparison (Markdown + CSV); the printing and writing live in `ctp2mri.evaluation.report`.

Infarct core: the synthetic ADC is mapped back to 10⁻⁶ mm²/s with the **case's own** ADC
quantile range (the one its ground truth was normalised with) and thresholded
(`core_mask_from_adc`); Dice and volumes against the case's lesion mask. Using the ground
truth's range isolates what the model gets right in normalised space, which is what the
paper's evaluation measures; a new patient has no ground truth, so the synthesis engine
maps output back with the model's stored training ranges instead, and its core volumes
carry that extra error. For reference, the same threshold on the *true* ADC gives
``core_gt_adc_dice``: the ceiling of the threshold rule on that case. Dice is averaged over
the cases with a lesion (a lesion-free case has none to overlap; its false core shows in the
volumes). Whether the lesion shows at all, whatever the threshold, is the lesion contrast:
mean inside the lesion over the median of the rest of the brain (rDWI, rADC), synthetic
against true.

FID needs an Inception-v3 network and its weights; ctp2mri downloads nothing, so FID is
reported as skipped unless both are available locally (see `fid_status`).
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctp2mri.casefolder import CASE_FILES, read_case
from ctp2mri.data import TARGETS, CaseSlices, normalise_case, resolve_cases
from ctp2mri.errors import InputError
from ctp2mri.evaluation.report import (
    CHANNELS,
    format_report,
    sampling_seeds,
    write_comparison,
    write_rows,
)
from ctp2mri.synthesis.inference import (
    AnyLoadedModel,
    default_sampler,
    load_model,
    model_label,
    sample_slices,
    sampler_steps,
    slice_seed,
)
from ctp2mri.io.atomic import ensure_writable_dir
from ctp2mri.io.nifti import load_nifti
from ctp2mri.evaluation.metrics import (
    channel_metrics,
    core_comparison,
    core_mask_from_adc,
    flat_metrics,
    lesion_auc,
    lesion_contrast,
    volume_ml,
)
from ctp2mri.preprocessing.preprocess import denormalise_mri
from ctp2mri.progress import CancelToken, ProgressCallback
from ctp2mri.evaluation.tables import Summary, summarise

__all__ = [
    "CHANNELS",
    "FID_WEIGHTS_ENV",
    "case_seed",
    "evaluate",
    "fid_status",
    "format_report",
    "model_labels",
    "named_models",
    "write_comparison",
    "write_rows",
]

FID_WEIGHTS_ENV = "CTP2MRI_FID_WEIGHTS"
FIGURE_ROWS = 4  # test slices shown in the evaluation figure
_CORE_KEYS = ("dice", "pred_ml", "true_ml", "volume_diff_ml", "abs_volume_diff_ml")


# FID ---------------------------------------------------------------------------------------
def fid_status(fid_weights: str | os.PathLike | None = None) -> str:
    """Why FID is not computed (the message printed with the results).

    FID compares Inception-v3 features of real and synthetic slices. ctp2mri has no
    Inception network of its own and never downloads weights, so FID is skipped unless a
    local weight file is given (``--fid-weights`` or ``$CTP2MRI_FID_WEIGHTS``) *and* an
    Inception implementation is installed; with neither, it says so.

    Raises
    ------
    InputError
        A weight file was named but does not exist.
    """
    weights = fid_weights or os.environ.get(FID_WEIGHTS_ENV) or None
    if weights is not None and not Path(weights).is_file():
        raise InputError(f"FID weight file {weights} does not exist; give the path of a local "
                         f"Inception-v3 weight file, or leave --fid-weights / ${FID_WEIGHTS_ENV} unset")
    if weights is None:
        return ("FID skipped: Inception weights not available offline (give --fid-weights FILE or "
                f"set ${FID_WEIGHTS_ENV}; nothing is downloaded)")
    return ("FID skipped: Inception weights not available offline: a weight file was given, but no "
            "Inception-v3 implementation (pytorch-fid) is installed to use it")


# one case ------------------------------------------------------------------------------------
def case_seed(seed: int, case: str) -> int:
    """The seed of one case's slices: the run seed mixed with a stable hash of the case name,
    so a case gets the same noise whichever other cases are evaluated with it."""
    return slice_seed(seed, zlib.crc32(case.encode("utf-8")))


def _normalise(case_dir: Path, name: str, profile: str, model_label: str) -> tuple[Any, CaseSlices]:
    case = read_case(case_dir, require=("ctp", "dwi", "adc", "mask"))
    try:
        # min_brain_fraction 0: every slice with brain, so metrics cover the whole brain
        part = normalise_case(case, name, profile, min_brain_fraction=0.0)
    except InputError as exc:
        raise InputError(f"model {model_label} works on the {profile!r} profile's grid, but: {exc}") from None
    return case, part


def _pred_adc_volume(pred: np.ndarray, part: CaseSlices, shape: tuple[int, ...]) -> np.ndarray:
    """Synthetic ADC in 10⁻⁶ mm²/s on the case grid, from the case's own ADC range."""
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


def _score_case(name: str, label: str, case: Any, part: CaseSlices, pred: np.ndarray,
                settings: Mapping[str, Any]) -> tuple[dict[str, Any], np.ndarray]:
    """One CSV row (metrics in normalised space, core in units) and the predicted core mask."""
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
    pred_core = core_mask_from_adc(_pred_adc_volume(pred, part, brain_vol.shape), brain_vol,
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


def _perfusion_core(case_dir: Path) -> dict[str, float]:
    """The clinical CTP core of a case (`ctp2mri.perfusion`) against its lesion mask."""
    from ctp2mri.perfusion import analyse_perfusion

    case = read_case(case_dir, require=("ctp", "mask"))
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


def _count_brain_slices(case_dir: Path) -> int:
    """Slices the case will be sampled on, read from its brain mask alone (for progress)."""
    mask_file = case_dir / CASE_FILES["mask"]
    if not mask_file.is_file():
        raise InputError(f"case {case_dir.name} has no {CASE_FILES['mask']} (the brain mask); "
                         "evaluation needs it (ctp2mri preprocess writes one)")
    return int(np.count_nonzero(load_nifti(mask_file).array.any(axis=(0, 1))))


def _scaled(progress: ProgressCallback | None, base: int, weight: int, total: int,
            info: dict[str, Any]) -> ProgressCallback | None:
    """Map one sampling run's (step, n_steps) onto the evaluation's slice-steps."""
    if progress is None:
        return None

    def report(step: int, n_total: int, _: dict[str, Any]) -> None:
        progress(base + round(step / n_total * weight), total, info)

    return report


# the evaluation --------------------------------------------------------------------------------
def evaluate(model_path: str | os.PathLike | None, data_dir: str | os.PathLike,
             split: str | None = "test", n_steps: int = 200, eta: float = 0.0,
             seed: int | Sequence[int] = 0,
             batch_size: int = 16, device: str | torch.device = "auto",
             out_csv: str | os.PathLike | None = None, progress: ProgressCallback | None = None,
             cancel: CancelToken | None = None,
             models: Mapping[str, str | os.PathLike] | None = None, *,
             max_cases: int | None = None, figure: str | os.PathLike | None = None,
             use_ema: bool = True, fid_weights: str | os.PathLike | None = None,
             sampler: str = "ddim", perfusion: bool = True,
             ) -> tuple[list[dict[str, Any]], Summary]:
    """Synthesise every case of a split and score it against its ground truth.

    Parameters
    ----------
    model_path
        Checkpoint folder of a cLDM, cBBDM or Pix2Pix model, reported under its Table-1 name
        (`ctp2mri.synthesis.inference.model_label`: ``"cLDM"``, ``"cLDM-PT"``, ``"cBBDM"``, ``"Pix2Pix"``,
        …); may be None when ``models`` is given.
    data_dir
        Data folder of case folders with a ``splits.json`` (``ctp2mri phantom`` writes one).
    split
        Which split of ``splits.json`` (``"test"``); None takes every case folder.
    n_steps, eta, seed, batch_size
        Sampler settings, the same for every model (paper: 200 DDIM steps, η = 0; BBDM's bridge
        sampler takes the same steps and η; Pix2Pix makes one pass), the run seed (per-slice
        noise from ``(seed, case, z)``, see `ctp2mri.synthesis.inference.sample_slices`) and slices per
        batch. Several seeds sample every case once per seed, one row each: the summary is then
        over cases and seeds, which is what a comparison of samplers or models needs when a
        single draw's lesion MAE moves by ± 15 % from seed to seed (a few small lesions).
    device
        ``auto``, ``cpu``, ``cuda[:i]``, ``mps``.
    out_csv
        Per-case CSV to write (atomically, only when the whole evaluation finished).
    progress
        ``progress(done, total, info)`` in slice-steps (one sampler step of one slice), over
        all cases, models and seeds; ``info`` names the case, model and seed.
    cancel
        Checked before every DDIM step; a cancelled run writes nothing.
    models
        ``{name: checkpoint}`` to compare several models on the same cases (Table 1 rows, in
        this order); ``model_path``, when also given, comes first under its Table-1 name.
    max_cases
        Evaluate only the first N cases of the split (a quick look).
    figure
        PNG path: a few cases' lesion slices, CTP, true and synthetic DWI/ADC (first model).
    use_ema
        Sample with EMA weights (default) or the raw training weights.
    fid_weights
        Local Inception weight file for FID (see `fid_status`; never downloaded).
    sampler
        ``"ddim"`` (the paper's) or ``"dpm++2m"`` (the fast solver; η must be 0), for every cLDM;
        a cBBDM always samples with BBDM's bridge sampler, Pix2Pix with its generator pass.
    perfusion
        Also read each case's CT perfusion the clinical way (`ctp2mri.perfusion`: core = rCBF
        < 30 % within Tmax > 6 s) and score that core against the lesion beside the models'
        (``perfusion_core_dice``, ``perfusion_core_ml``): does the synthetic DWI beat the CTP?

    Returns
    -------
    (rows, summary)
        One dict per case, model and seed: ``case``, ``model``, ``n_slices``, ``lesion_voxels``,
        ``{DWI,ADC}_{mae,lesion_mae,psnr,ms_ssim}``, ``{DWI,ADC}_lesion_contrast[_true]``
        (`ctp2mri.evaluation.metrics.lesion_contrast` of the synthetic and the true image),
        ``core_{dice,pred_ml,true_ml,volume_diff_ml,abs_volume_diff_ml}`` (Dice NaN for a
        lesion-free case), ``core_gt_adc_dice``, ``{DWI,ADC}_lesion_auc[_true]``
        (`ctp2mri.evaluation.metrics.lesion_auc`), with ``perfusion`` ``perfusion_core_{dice,ml,abs_volume_diff_ml}``,
        and the sampler settings
        (``sampler``, ``steps`` = network calls per slice, ``eta``, ``seed``, ``weights``);
        and ``summarise(rows)``: mean ± SD per model (`format_report` prints it).

    Raises
    ------
    InputError
        No model given; a checkpoint is missing or damaged; the data folder has no cases or
        no such split; a case lacks an image or is on another profile's grid than a model
        (run ``ctp2mri preprocess --profile``).
    ctp2mri.errors.Cancelled
        When ``cancel`` is set (no CSV or figure is left behind).
    """
    named: dict[str, str | os.PathLike] = dict(models or {})
    if model_path is not None:
        label = model_labels([model_path])[0]
        if label in named:
            raise InputError(f"a model named {label!r} was given twice (model_path and models); rename one")
        named = {label: model_path, **named}
    if not named:
        raise InputError("no model to evaluate: give a cLDM (or cBBDM, Pix2Pix) checkpoint folder (--model)")
    seeds = sampling_seeds(seed)
    if out_csv is not None:
        ensure_writable_dir(Path(out_csv).parent)
    if figure is not None:
        ensure_writable_dir(Path(figure).parent)
    fid_status(fid_weights)  # a named but absent weight file is an error before hours of sampling
    case_dirs = [Path(p) for p in resolve_cases(data_dir, split)]
    if max_cases is not None:
        if int(max_cases) < 1:
            raise InputError(f"--max-cases must be at least 1, got {max_cases}")
        case_dirs = case_dirs[: int(max_cases)]
    loaded: dict[str, AnyLoadedModel] = {label: load_model(path, device, use_ema=use_ema)
                                         for label, path in named.items()}
    # the sampler named applies to the cLDMs; a baseline has its own
    samplers = {label: sampler if m.kind == "cldm" else default_sampler(m) for label, m in loaded.items()}
    counts = [_count_brain_slices(d) for d in case_dirs]
    steps = {label: sampler_steps(samplers[label], n_steps, m) for label, m in loaded.items()}
    settings = {label: {"split": split or "all", "sampler": samplers[label], "steps": steps[label],
                        "eta": float(eta), "weights": m.weights}
                for label, m in loaded.items()}
    total = sum(counts) * sum(steps.values()) * len(seeds)
    done = 0
    rows: list[dict[str, Any]] = []
    # per case, each model's figures.EvaluationSlice (matplotlib is imported only for a figure)
    candidates: dict[str, list[Any]] = {}
    lesion_voxels: dict[str, int] = {}
    for case_dir in case_dirs:
        name = case_dir.name
        perfusion_row = _perfusion_core(case_dir) if perfusion else {}
        parts: dict[str, tuple[Any, CaseSlices]] = {}
        for label, model in loaded.items():
            if cancel is not None:
                cancel.raise_if_cancelled()
            if model.profile not in parts:
                parts[model.profile] = _normalise(case_dir, name, model.profile, label)
            case, part = parts[model.profile]
            n = len(part.slices)
            for run_seed in seeds:
                if cancel is not None:
                    cancel.raise_if_cancelled()
                report = _scaled(progress, done, n * steps[label], total,
                                 {"case": name, "model": label, "slices": n, "seed": run_seed})
                pred = sample_slices(model, torch.from_numpy(np.asarray(part.cond, dtype=np.float32)),
                                     n_steps=n_steps, eta=eta, seed=case_seed(run_seed, name),
                                     batch_size=batch_size, ids=part.slices.tolist(),
                                     progress=report, cancel=cancel, sampler=samplers[label]).numpy()
                pred *= part.brain  # the contract: zero outside the brain
                done += n * steps[label]
                row, pred_core = _score_case(name, label, case, part, pred,
                                             {**settings[label], "seed": run_seed})
                row.update(perfusion_row)
                rows.append(row)
                if figure is not None and run_seed == seeds[0]:
                    candidates.setdefault(name, []).append(_figure_slice(name, label, case, part, pred, pred_core))
                    lesion_voxels[name] = int(row["lesion_voxels"])
    summary = summarise(rows)
    if out_csv is not None:
        write_rows(rows, out_csv)
    if figure is not None:
        from ctp2mri.evaluation.figures import evaluation_figure

        evaluation_figure(figure_rows(candidates, lesion_voxels), figure)
    return rows, summary


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


def _figure_slice(name: str, label: str, case: Any, part: CaseSlices, pred: np.ndarray,
                  pred_core: np.ndarray) -> Any:
    """The case's slice with the most core (else the most brain), in units, for the figure."""
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


# several models ------------------------------------------------------------------------------------
def model_labels(paths: Sequence[str | os.PathLike]) -> list[str]:
    """The Table-1 name of each checkpoint (`ctp2mri.synthesis.inference.model_label`), read from its
    config.json: ``cLDM``, ``cLDM-PT``, ``cBBDM``, ``cBBDM-PT``, ``Pix2Pix``."""
    from ctp2mri.checkpoints import read_config

    return [model_label(read_config(p)) for p in paths]


def named_models(specs: Sequence[str]) -> dict[str, Path]:
    """``{label: checkpoint}`` from ``NAME=PATH`` or bare ``PATH`` entries (the CLI's ``--model``),
    in the order given; a bare path is named by `model_labels`.

    Raises
    ------
    InputError
        Two entries end up with the same name (name them, ``--model NAME=PATH``).
    """
    named: dict[str, Path] = {}
    for spec in specs:
        spec = os.fspath(spec)
        label, sep, path = spec.partition("=")
        if not sep or Path(spec).exists() or not label:
            label, path = model_labels([spec])[0], spec
        if label in named:
            raise InputError(f"two models would both be called {label!r} ({named[label]} and {path}); name them: "
                             f"--model NAME=PATH, e.g. --model {label}-2={path}")
        named[label] = Path(path)
    return named
