"""`ctp2mri evaluate`: sample cases with trained models and score them as Table 1.

The cases are a data folder's split (``splits.json``), or case folders and in-memory cases
(`ctp2mri.casefolder.Case`, e.g. a case open in napari), which are scored as they are, with
nothing written to disk. For every case: normalise it as the training data
(`ctp2mri.data.normalise_case`, every axial slice that holds brain), synthesise DWI/ADC
(`ctp2mri.synthesis.inference`: DDIM for a cLDM, BBDM's bridge sampler for a cBBDM, one
generator pass for Pix2Pix), and compare with the ground truth **in the normalised space**
([−1, 1], brain-masked), as the paper does: MAE, lesion MAE, PSNR and MS-SSIM per channel
inside the brain (`ctp2mri.evaluation.scoring.score_case`). One row per case (and model) goes
to a CSV; the summary is the mean ± SD over cases, printed in the shape of the paper's
Table 1. Several models are scored on the same cases with the same steps, η and per-slice
seeds, and `ctp2mri.evaluation.report.write_comparison` writes their Table-1-shaped comparison (Markdown + CSV); the
printing and writing live in `ctp2mri.evaluation.report`.

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

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctp2mri.case_slices import adc_window_of, case_name, dwi_hi_median_of
from ctp2mri.casefolder import CASE_FILES, Case, read_case
from ctp2mri.checks import whole
from ctp2mri.data import CaseSlices, CaseSource, resolve_cases
from ctp2mri.errors import InputError
from ctp2mri.evaluation.report import sampling_seeds, write_rows
from ctp2mri.evaluation.scoring import (
    case_seed,
    figure_rows,
    figure_slice,
    normalise_for_model,
    perfusion_core,
    score_case,
)
from ctp2mri.evaluation.tables import Summary, summarise
from ctp2mri.io.atomic import ensure_writable_dir
from ctp2mri.io.nifti import load_nifti
from ctp2mri.progress import CancelToken, ProgressCallback
from ctp2mri.synthesis.inference import sample_slices, sampler_steps
from ctp2mri.synthesis.loading import AnyLoadedModel, default_sampler, load_model, model_label

__all__ = [
    "FID_WEIGHTS_ENV",
    "ModelSpec",
    "evaluate",
    "fid_status",
    "model_labels",
    "named_models",
]

FID_WEIGHTS_ENV = "CTP2MRI_FID_WEIGHTS"
EVALUATION_NEEDS = ("ctp", "dwi", "adc", "mask")  # what a case must hold to be scored
# one checkpoint (named by its Table-1 label) or {name: checkpoint}, in order
ModelSpec = str | os.PathLike | Mapping[str, str | os.PathLike]


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


# the cases -----------------------------------------------------------------------------------
def _named_cases(data: CaseSource | Sequence[CaseSource], split: str | None,
                 max_cases: int | None) -> list[tuple[str, Path | Case]]:
    """``(name, case folder or Case)`` of every case to evaluate, in order.

    A folder is named by its folder name, an in-memory case by `ctp2mri.data.case_name`; the
    name seeds the case's noise, so a name given twice gets a suffix (``-2``) rather than the
    same noise.
    """
    sources = resolve_cases(data, split) if isinstance(data, (str, os.PathLike)) else resolve_cases(data)
    if max_cases is not None:
        if int(max_cases) < 1:
            raise InputError(f"--max-cases must be at least 1, got {max_cases}")
        sources = sources[: int(max_cases)]
    named: list[tuple[str, Path | Case]] = []
    taken: set[str] = set()
    for index, source in enumerate(sources):
        name = case_name(source, index) if isinstance(source, Case) else Path(source).name
        candidate, n = name, 1
        while candidate in taken:
            n += 1
            candidate = f"{name}-{n}"
        taken.add(candidate)
        named.append((candidate, source))
    return named


def _count_brain_slices(name: str, source: Path | Case) -> int:
    """Slices the case will be sampled on, from its brain mask alone (for progress); a case
    without an image the evaluation needs is refused here, before any sampling."""
    if isinstance(source, Case):
        missing = [CASE_FILES[what] for what in EVALUATION_NEEDS if getattr(source, what) is None]
        if missing:
            raise InputError(f"case {name} has no {', '.join(missing)}; evaluation needs CTP, DWI, ADC "
                             "and the brain mask")
        mask = source.mask.array
    else:
        mask_file = source / CASE_FILES["mask"]
        if not mask_file.is_file():
            raise InputError(f"case {name} has no {CASE_FILES['mask']} (the brain mask); "
                             "evaluation needs it (ctp2mri preprocess writes one)")
        mask = load_nifti(mask_file).array
    return int(np.count_nonzero(mask.any(axis=(0, 1))))


def _scaled(progress: ProgressCallback | None, base: int, weight: int, total: int,
            info: dict[str, Any]) -> ProgressCallback | None:
    """Map one sampling run's (step, n_steps) onto the evaluation's slice-steps."""
    if progress is None:
        return None

    def report(step: int, n_total: int, _: dict[str, Any]) -> None:
        progress(base + round(step / n_total * weight), total, info)

    return report


# the evaluation --------------------------------------------------------------------------------
def evaluate(models: ModelSpec, data: CaseSource | Sequence[CaseSource], split: str | None = "test",
             n_steps: int = 200, eta: float = 0.0, seed: int | Sequence[int] = 0,
             batch_size: int = 16, device: str | torch.device = "auto",
             out_csv: str | os.PathLike | None = None, progress: ProgressCallback | None = None,
             cancel: CancelToken | None = None, *,
             max_cases: int | None = None, figure: str | os.PathLike | None = None,
             use_ema: bool = True, fid_weights: str | os.PathLike | None = None,
             sampler: str = "ddim", perfusion: bool = True, samples: int = 1,
             ) -> tuple[list[dict[str, Any]], Summary]:
    """Synthesise every case with every model and score it against its ground truth.

    Parameters
    ----------
    models
        Checkpoint folder of a cLDM, cBBDM or Pix2Pix model, reported under its Table-1 name
        (`ctp2mri.synthesis.loading.model_label`: ``"cLDM"``, ``"cLDM-PT"``, ``"cBBDM"``,
        ``"Pix2Pix"``, …), or ``{name: checkpoint}`` to compare several models on the same
        cases (Table 1 rows, in this order).
    data
        Data folder of case folders with a ``splits.json`` (``ctp2mri phantom`` writes one), or
        case folders and in-memory `ctp2mri.casefolder.Case` objects (one, or a sequence). An
        in-memory case is named by ``case.info["case"]`` (else its folder, else its position).
    split
        Which split of a data folder's ``splits.json`` (``"test"``); None takes every case
        folder in it. Cases given one by one are all evaluated.
    n_steps, eta, seed, batch_size
        Sampler settings, the same for every model (paper: 200 DDIM steps, η = 0; BBDM's bridge
        sampler takes the same steps and η; Pix2Pix makes one pass), the run seed (per-slice
        noise from ``(seed, case name, z)``, see `ctp2mri.synthesis.inference.sample_slices`) and
        slices per batch. Several seeds sample every case once per seed, one row each: the
        summary is then over cases and seeds, which is what a comparison of samplers or models
        needs when a single draw's lesion MAE moves by ± 15 % from seed to seed (a few small
        lesions).
    device
        ``auto``, ``cpu``, ``cuda[:i]``, ``mps``.
    out_csv
        Per-case CSV to write (atomically, only when the whole evaluation finished).
    progress
        ``progress(done, total, info)`` in slice-steps (one sampler step of one slice), over
        all cases, models and seeds; ``info`` names the ``case``, ``model`` and ``seed``, and
        gives ``cases_done`` (cases finished before this one) of ``cases_total``.
    cancel
        Checked before every DDIM step; a cancelled run writes nothing.
    max_cases
        Evaluate only the first N cases (a quick look).
    figure
        PNG path: a few cases' lesion slices, CTP, true and synthetic DWI/ADC (every model).
    use_ema
        Sample with EMA weights (default) or the raw training weights.
    fid_weights
        Local Inception weight file for FID (see `fid_status`; never downloaded).
    sampler
        ``"ddim"`` (the paper's) or ``"dpm++2m"`` (the fast solver; η must be 0), for every cLDM;
        a cBBDM always samples with BBDM's bridge sampler, Pix2Pix with its generator pass.
    samples
        K: score each cLDM's mean of K samples per slice (K seeds, batched together), as
        ``ctp2mri synthesize --samples K`` outputs it; 1 (default) scores one sample, as the
        paper. The mean of K draws estimates the model's posterior mean: where the CTP leaves
        it open whether tissue is core, some draws paint it as core and others do not, and the
        mean keeps only what most of them agree on. A cBBDM and Pix2Pix are sampled once.
    perfusion
        Also read each case's CT perfusion the clinical way (`ctp2mri.perfusion`: core = rCBF
        < 30 % within Tmax > 6 s) and score that core against the lesion beside the models'
        (``perfusion_core_dice``, ``perfusion_core_ml``): does the synthetic DWI beat the CTP?

    Returns
    -------
    (rows, summary)
        One dict per case, model and seed: ``case``, ``model``, ``n_slices``, ``lesion_voxels``,
        ``{DWI,ADC}_{mae,lesion_mae,psnr,ms_ssim}``, ``{DWI,ADC}_lesion_contrast[_true]``
        (`ctp2mri.evaluation.lesion_metrics.lesion_contrast` of the synthetic and the true
        image), ``core_{dice,pred_ml,true_ml,volume_diff_ml,abs_volume_diff_ml}`` (Dice NaN for a
        lesion-free case), ``core_gt_adc_dice``, ``{DWI,ADC}_lesion_auc[_true]``
        (`ctp2mri.evaluation.lesion_metrics.lesion_auc`), with ``perfusion``
        ``perfusion_core_{dice,ml,abs_volume_diff_ml}``, and the settings (``split``: the split,
        or ``"all"``; ``sampler``, ``steps`` = network calls per slice and sample, ``samples``,
        ``eta``, ``seed``, ``weights``); and ``summarise(rows)``: mean ± SD per model
        (`format_report` prints it).

    Raises
    ------
    InputError
        No model given; a checkpoint is missing or damaged; no cases, or no such split; a case
        lacks an image or is on another profile's grid than a model (run ``ctp2mri preprocess
        --profile``).
    ctp2mri.errors.Cancelled
        When ``cancel`` is set (no CSV or figure is left behind).
    """
    named = dict(models) if isinstance(models, Mapping) else {model_labels([models])[0]: models}
    if not named:
        raise InputError("no model to evaluate: give a cLDM (or cBBDM, Pix2Pix) checkpoint folder (--model)")
    seeds = sampling_seeds(seed)
    samples = whole(samples, "samples", minimum=1)
    if out_csv is not None:
        ensure_writable_dir(Path(out_csv).parent)
    if figure is not None:
        ensure_writable_dir(Path(figure).parent)
    fid_status(fid_weights)  # a named but absent weight file is an error before hours of sampling
    cases = _named_cases(data, split, max_cases)
    loaded: dict[str, AnyLoadedModel] = {label: load_model(path, device, use_ema=use_ema)
                                         for label, path in named.items()}
    # the sampler named applies to the cLDMs; a baseline has its own
    samplers = {label: sampler if m.kind == "cldm" else default_sampler(m) for label, m in loaded.items()}
    counts = [_count_brain_slices(name, source) for name, source in cases]
    steps = {label: sampler_steps(samplers[label], n_steps, m) for label, m in loaded.items()}
    draws = {label: samples if m.kind == "cldm" else 1 for label, m in loaded.items()}
    from_folder = isinstance(data, (str, os.PathLike))
    settings = {label: {"split": (split if from_folder else None) or "all", "sampler": samplers[label],
                        "steps": steps[label], "samples": draws[label], "eta": float(eta), "weights": m.weights}
                for label, m in loaded.items()}
    total = sum(counts) * sum(steps[label] * draws[label] for label in loaded) * len(seeds)
    done = 0
    rows: list[dict[str, Any]] = []
    # per case, each model's figures.EvaluationSlice (matplotlib is imported only for a figure)
    candidates: dict[str, list[Any]] = {}
    lesion_voxels: dict[str, int] = {}
    for index, (name, source) in enumerate(cases):
        case = source if isinstance(source, Case) else read_case(source, require=EVALUATION_NEEDS)
        perfusion_row = perfusion_core(case) if perfusion else {}
        parts: dict[tuple[str, tuple[float, float] | None, float | None], CaseSlices] = {}
        for label, model in loaded.items():
            if cancel is not None:
                cancel.raise_if_cancelled()
            # models on one grid and one normalisation share the normalised case
            key = (model.profile, adc_window_of(model.normalisation), dwi_hi_median_of(model.normalisation))
            if key not in parts:
                parts[key] = normalise_for_model(case, name, model.profile, label, key[1], key[2])
            part = parts[key]
            n = len(part.slices)
            for run_seed in seeds:
                if cancel is not None:
                    cancel.raise_if_cancelled()
                work = n * steps[label] * draws[label]
                report = _scaled(progress, done, work, total,
                                 {"case": name, "model": label, "slices": n, "seed": run_seed,
                                  "cases_done": index, "cases_total": len(cases)})
                pred = sample_slices(model, torch.from_numpy(np.asarray(part.cond, dtype=np.float32)),
                                     n_steps=n_steps, eta=eta, seed=case_seed(run_seed, name),
                                     batch_size=batch_size, ids=part.slices.tolist(),
                                     progress=report, cancel=cancel, sampler=samplers[label],
                                     samples=draws[label]).numpy()
                # rows i·K … i·K + K − 1 are slice i's samples
                pred = pred.reshape(n, draws[label], *pred.shape[1:]).mean(axis=1)
                pred *= part.brain  # the contract: zero outside the brain
                done += work
                row, pred_core = score_case(name, label, case, part, pred,
                                            {**settings[label], "seed": run_seed})
                row.update(perfusion_row)
                rows.append(row)
                if figure is not None and run_seed == seeds[0]:
                    candidates.setdefault(name, []).append(figure_slice(name, label, case, part, pred, pred_core))
                    lesion_voxels[name] = int(row["lesion_voxels"])
    summary = summarise(rows)
    if out_csv is not None:
        write_rows(rows, out_csv)
    if figure is not None:
        from ctp2mri.evaluation.figures import evaluation_figure

        evaluation_figure(figure_rows(candidates, lesion_voxels), figure)
    return rows, summary


# several models ------------------------------------------------------------------------------------
def model_labels(paths: Sequence[str | os.PathLike]) -> list[str]:
    """The Table-1 name of each checkpoint (`ctp2mri.synthesis.loading.model_label`), read from its
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
