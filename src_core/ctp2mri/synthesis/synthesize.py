"""The synthesis engine: a CTP in its own geometry in, DWI/ADC/core on the same geometry out.

`synthesize` is what ``ctp2mri synthesize``, the cohorts and the napari widget call:

1. validate the CTP (4-D, finite, ≥ 2 frames); brain mask given or derived from the CTP;
2. resample every frame onto the model's profile grid placed over the brain, then to the
   profile's 15 frames, and normalise per the contract (`ctp2mri.synthesis.regrid`);
3. sample only the axial slices that contain brain (the others stay zero), K samples per
   slice batched together, with DDIM or DPM-Solver++(2M) (`ctp2mri.synthesis.inference.sample_slices`);
4. map the output back to DWI units and ADC in 10⁻⁶ mm²/s with the *model's* stored
   intensity ranges, average the K samples (their standard deviation is the uncertainty);
5. resample onto the input's grid and affine, and estimate the core from the ADC
   (`ctp2mri.evaluation.core_estimate`);
6. for a model whose perfusion encoder has a lesion head, its lesion probability map, which
   needs no sampling (`ctp2mri.synthesis.lesion_head`).

What to sample with is a `ctp2mri.synthesis.sample_settings.SampleSettings`. `write_outputs`
writes the result atomically; `run_synthesize` is the CLI's whole command.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctp2mri.checks import settings_with
from ctp2mri.devices import resolve_device_with_notice
from ctp2mri.errors import InputError
from ctp2mri.evaluation.core_estimate import estimate_core
from ctp2mri.io import load_volume
from ctp2mri.io.atomic import atomic_dir, claim_output
from ctp2mri.io.jsonfile import strict_json
from ctp2mri.io.nifti import save_nifti
from ctp2mri.io.volume import Volume
from ctp2mri.preprocessing.preprocess import brain_mask_notice, check_spacing, frames_notice
from ctp2mri.profiles import Profile, get_profile
from ctp2mri.progress import CancelToken, ProgressCallback
from ctp2mri.synthesis.batch_size import auto_batch_size
from ctp2mri.synthesis.inference import autocast_dtype, sample_slices, sampler_steps
from ctp2mri.synthesis.lesion_head import lesion_probability
from ctp2mri.synthesis.loading import LoadedModel, synthesis_model
from ctp2mri.synthesis.regrid import (
    ModelGrid,
    back_to_input,
    brain_on_input,
    check_companions,
    model_input,
    profile_notice,
)
from ctp2mri.synthesis.sample_settings import SampleSettings
from ctp2mri.synthesis.units import output_ranges, to_units

__all__ = ["OUTPUT_FILES", "SynthesisResult", "run_synthesize", "synthesize", "write_outputs"]

#: What `write_outputs` writes; the uncertainty files only when K > 1. Two 3-D files rather
#: than one 4-D ``uncertainty.nii.gz``: a 4-D NIfTI reads as a time series in viewers, and
#: DWI and ADC standard deviations have different units.
OUTPUT_FILES = {"dwi": "dwi.nii.gz", "adc": "adc.nii.gz", "core": "core.nii.gz",
                "brain": "brain.nii.gz", "uncertainty_dwi": "uncertainty_dwi.nii.gz",
                "uncertainty_adc": "uncertainty_adc.nii.gz", "lesion_probability": "lesion_probability.nii.gz",
                "report": "report.json"}


@dataclass
class SynthesisResult:
    """Output of `synthesize`, every volume on the input CTP's grid and affine.

    Attributes
    ----------
    dwi, adc
        Mean over the K samples: DWI in the training data's units, ADC in 10⁻⁶ mm²/s;
        zero outside the brain.
    core
        uint8 core mask (ADC < threshold inside the brain, small components removed).
    uncertainty
        ``{"dwi": std, "adc": std}``, the per-voxel standard deviation over the K samples
        (unbiased, ddof = 1), or None when K = 1.
    brain
        The brain mask the outputs are defined on (uint8): the given or derived mask, less
        any rim voxels the model grid's brain does not reach.
    lesion_probability
        The perfusion encoder's lesion head, 0–1 (`ctp2mri.synthesis.lesion_head`), or None
        for a model without one.
    report
        JSON-ready summary: settings, device, timings, slices sampled/skipped, core volume,
        notices.
    """

    dwi: Volume
    adc: Volume
    core: Volume
    uncertainty: dict[str, Volume] | None
    brain: Volume
    report: dict[str, Any] = field(default_factory=dict)
    lesion_probability: Volume | None = None


def _sampling_progress(progress: ProgressCallback | None, n_slices: int) -> ProgressCallback | None:
    """Adds ``steps_done``/``steps_total``/``eta_s`` to `sample_slices`' per-step reports."""
    if progress is None:
        return None
    started = time.perf_counter()

    def report(step: int, total: int, info: dict[str, Any]) -> None:
        elapsed = time.perf_counter() - started
        eta = elapsed / step * (total - step) if step else math.nan
        progress(step, total, {"stage": "sample", "slices_done": info["slices_done"],
                               "slices_total": n_slices, "steps_done": step, "steps_total": total,
                               "eta_s": round(eta, 1)})
    return report


def synthesize(ctp: Volume, model: LoadedModel | str | os.PathLike, settings: SampleSettings | None = None, *,
               device: str | torch.device = "auto", brain_mask: Volume | None = None,
               ground_truth_lesion: Volume | None = None, progress: ProgressCallback | None = None,
               cancel: CancelToken | None = None, **options: Any) -> SynthesisResult:
    """Synthesise DWI and ADC (and the infarct core) from a CT perfusion series.

    Parameters
    ----------
    ctp
        4-D CTP in HU (x, y, z, t) in any geometry, ≥ 2 frames.
    model
        A `LoadedModel`, or a cLDM checkpoint folder (or a bundled model's name) loaded onto
        ``device``.
    settings, options
        A `SampleSettings` (sampler, steps, eta, samples, seed, batch_size, precision,
        use_ema, core_threshold), and/or its fields as keywords, which replace the settings'
        own; both checked before anything else.
    device
        Where a model given by path is loaded (``auto``, ``cpu``, ``cuda[:i]``, ``mps``); a
        `LoadedModel` runs where it is. Half precision applies on CUDA only (a notice says so
        elsewhere).
    brain_mask
        3-D mask on the CTP's grid; None derives it from the CTP.
    ground_truth_lesion
        Optional lesion mask on the CTP's grid: the report gets the core's Dice and volume
        difference against it.
    progress
        ``progress(steps_done, steps_total, info)`` after every denoising step, ``info``
        holding ``slices_done``, ``slices_total``, ``steps_done``, ``steps_total``, ``eta_s``.
    cancel
        Checked at every denoising step (and between stages); raises `Cancelled` after
        releasing the sampling tensors.

    Raises
    ------
    InputError
        Not a 4-D finite CTP, a single frame, no brain found, a mask on another grid, a
        model without stored ranges, bad settings, out of GPU memory at batch size 1.
    TypeError
        An ``options`` keyword that is no `SampleSettings` field.
    ctp2mri.errors.Cancelled
        When ``cancel`` is set.
    """
    opts = settings_with(SampleSettings, settings, options, "synthesize")
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    notices: list[str] = []
    check_spacing(ctp.require_4d("CTP").require_finite("CTP"), "CTP")  # also refuses a single frame
    check_companions(ctp, brain_mask, ground_truth_lesion)  # before loading the model and sampling
    if not isinstance(model, LoadedModel):
        device, notice = resolve_device_with_notice(device)
        notices += [notice] if notice else []
    loaded = synthesis_model(model, device, opts.use_ema)
    sampler_steps(opts.sampler, opts.n_steps, loaded)  # steps beyond the schedule fail before any resampling
    if opts.precision != "fp32" and autocast_dtype(opts.precision, loaded.device) is None:
        notices.append(f"precision {opts.precision} applies on CUDA GPUs only; computing in fp32 on "
                       f"{loaded.device}")
    ranges = output_ranges(loaded)
    prof = get_profile(loaded.profile)
    notice = profile_notice(ctp, prof.name)
    notices += [notice] if notice else []
    timings["load_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    brain, mask_origin = brain_on_input(ctp, brain_mask, cancel)
    notices += [n for n in (brain_mask_notice(brain), frames_notice(ctp, prof.n_frames)) if n]
    timings["brain_mask_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    grid, cond = model_input(ctp, prof, brain, cancel)
    timings["resample_in_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    height, width = grid.shape[:2]
    rows = grid.keep.size * opts.samples
    chosen = opts.batch_size if opts.batch_size is not None else auto_batch_size(loaded, height, width, rows)
    stats: dict[str, Any] = {}
    pred = sample_slices(loaded, cond, n_steps=opts.n_steps, eta=opts.eta, seed=opts.seed, batch_size=chosen,
                         ids=grid.keep.tolist(), progress=_sampling_progress(progress, int(grid.keep.size)),
                         cancel=cancel, sampler=opts.sampler, samples=opts.samples, precision=opts.precision,
                         stats=stats)
    probability = lesion_probability(loaded, cond, stats["batch_size"], cancel)
    del cond
    if stats["oom_retries"]:
        notices.append(f"out of GPU memory at batch size {chosen}; finished with batch size "
                       f"{stats['batch_size']}")
    timings["sample_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    maps = to_units(pred, grid, opts.samples, ranges)
    del pred
    if probability is not None:
        maps["lesion_probability"] = np.zeros(grid.shape, dtype=np.float32)
        maps["lesion_probability"][:, :, grid.keep] = np.moveaxis(probability, 0, -1)
    on_input, covered = back_to_input(maps, grid.brain.astype(np.float32), grid.affine, ctp, brain.array != 0,
                                      cancel)
    # Brain voxels of the input that no model-grid brain voxel reaches (a rim thinner than
    # the model's voxels) have no synthetic value: they leave the output's brain mask, so a
    # 0 there is never read as ADC (or core).
    dropped = int(np.count_nonzero(brain.array)) - int(np.count_nonzero(covered))
    brain = brain.with_array(covered.astype(np.uint8))
    timings["resample_out_s"] = time.perf_counter() - clock

    def vol(array: np.ndarray, **meta: Any) -> Volume:
        return Volume(array, ctp.affine.copy(), meta={"source": "ctp2mri synthesize", **meta})

    clock = time.perf_counter()
    adc = vol(on_input["adc"], modality="ADC", units="1e-6 mm2/s")
    core, core_summary = estimate_core(adc, brain, opts.core_threshold, ground_truth=ground_truth_lesion)
    timings["core_s"] = time.perf_counter() - clock

    uncertainty = None
    if opts.samples > 1:
        uncertainty = {"dwi": vol(on_input["sd_dwi"], modality="DWI standard deviation"),
                       "adc": vol(on_input["sd_adc"], modality="ADC standard deviation",
                                  units="1e-6 mm2/s")}
    report = _report(ctp, loaded, opts, prof, grid, ranges, stats, core_summary, timings, notices,
                     {"origin": mask_origin, "rim_voxels_without_model_data": dropped,
                      "volume_ml": round(float(covered.sum() * np.prod(ctp.spacing) / 1000), 2)})
    probability_map = None
    if probability is not None:
        probability_map = vol(np.clip(on_input["lesion_probability"], 0.0, 1.0),
                              modality="lesion probability (perfusion encoder's lesion head)")
    return SynthesisResult(dwi=vol(on_input["dwi"], modality="DWI"), adc=adc, core=core,
                           uncertainty=uncertainty, brain=brain, report=report,
                           lesion_probability=probability_map)


def _report(ctp: Volume, loaded: LoadedModel, opts: SampleSettings, prof: Profile, grid: ModelGrid,
            ranges: dict[str, tuple[float, float]], stats: dict[str, Any], core_summary: dict[str, Any],
            timings: dict[str, float], notices: list[str], brain_mask: dict[str, Any]) -> dict[str, Any]:
    """``report.json`` of a run: versions, model, settings, geometry, brain, core, timings."""
    from ctp2mri import __version__

    report = {
        "ctp2mri_version": __version__,
        "model": {"path": loaded.path, "profile": prof.name, "weights": loaded.weights,
                  "normalisation": {w: {"lo": r[0], "hi": r[1]} for w, r in ranges.items()}},
        "device": str(loaded.device), "precision": opts.precision if loaded.device.type == "cuda" else "fp32",
        "sampler": opts.sampler, "steps": opts.n_steps, "eta": opts.eta, "samples": opts.samples,
        "seed": opts.seed, "batch_size": stats["batch_size"], "network_calls": stats["network_calls"],
        "input": {"shape": list(ctp.array.shape), "spacing_mm": [round(s, 4) for s in ctp.spacing],
                  "orientation": ctp.orientation, "affine": ctp.affine.tolist()},
        "model_grid": {"shape": list(grid.shape), "spacing_mm": list(prof.spacing),
                       "affine": grid.affine.tolist(), "n_frames": prof.n_frames},
        "brain_mask": brain_mask,
        "slices_total": int(grid.shape[2]), "slices_sampled": int(grid.keep.size),
        "slices_skipped": int(grid.shape[2] - grid.keep.size),
        "core": core_summary, "core_volume_ml": core_summary["volume_ml"],
        "timings_s": {k: round(v, 3) for k, v in timings.items()}, "notices": notices,
    }
    report["timings_s"]["total_s"] = round(sum(timings.values()), 3)
    return report


def write_outputs(result: SynthesisResult, out_dir: str | os.PathLike,
                  overwrite: bool = False) -> Path:
    """Write a result as NIfTI files with the input's affine, plus ``report.json``.

    Files: ``dwi.nii.gz``, ``adc.nii.gz`` (float32), ``core.nii.gz``, ``brain.nii.gz``
    (uint8), when K > 1 ``uncertainty_dwi.nii.gz``/``uncertainty_adc.nii.gz``, and for a model
    with a lesion head ``lesion_probability.nii.gz`` (see `OUTPUT_FILES`). The folder appears complete or not at all (`atomic_dir`).

    Raises
    ------
    InputError
        ``out_dir`` exists and is not empty (without ``overwrite``), or is not writable.
    """
    volumes = {"dwi": result.dwi, "adc": result.adc, "core": result.core, "brain": result.brain}
    if result.uncertainty is not None:
        volumes.update({f"uncertainty_{k}": v for k, v in result.uncertainty.items()})
    if result.lesion_probability is not None:
        volumes["lesion_probability"] = result.lesion_probability
    report = {**result.report, "files": {k: OUTPUT_FILES[k] for k in [*volumes, "report"]}}
    text = strict_json(report)  # NaN/inf as null: report.json stays valid JSON
    needed = sum(v.array.size * 4 for v in volumes.values()) + len(text)  # float32, before gzip
    with atomic_dir(out_dir, overwrite=overwrite, needed_bytes=needed) as tmp:
        for key, volume in volumes.items():
            save_nifti(volume, tmp / OUTPUT_FILES[key])
        (tmp / OUTPUT_FILES["report"]).write_text(text, encoding="utf-8")
    return Path(out_dir)


def _check_output(out_dir: Path, overwrite: bool) -> None:
    """Refuse an unusable output folder before minutes of sampling, creating nothing."""
    if out_dir.is_file():
        raise InputError(f"output {out_dir} is a file; give a folder for the results")
    if out_dir.is_dir() and not overwrite and any(out_dir.iterdir()):
        raise InputError(f"{out_dir} already exists and is not empty; pass --overwrite to "
                         "replace it, or choose another folder")
    parent = out_dir.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise InputError(f"cannot create {out_dir}: {parent} is not a writable folder")


def run_synthesize(ctp: str | os.PathLike, model: LoadedModel | str | os.PathLike, out_dir: str | os.PathLike,
                   settings: SampleSettings | None = None, *, device: str | torch.device = "auto",
                   series_uid: str | None = None,
                   mask: str | os.PathLike | None = None, ground_truth_lesion: str | os.PathLike | None = None,
                   overwrite: bool = False, progress: ProgressCallback | None = None,
                   cancel: CancelToken | None = None, **options: Any) -> SynthesisResult:
    """``ctp2mri synthesize``: read a CTP (NIfTI/NRRD/MHA file or DICOM folder), synthesise,
    write the outputs to ``out_dir``.

    ``settings`` and/or ``options`` (its fields as keywords, which replace the settings' own)
    and ``device`` are `synthesize`'s. The settings and the output folder are checked first, so
    a run that could not write its results fails before sampling; a cancelled or failed run
    leaves nothing behind. ``out_dir`` is claimed for the whole run (`claim_output`): a second
    run into the same folder is refused at once instead of overwriting this one's result.
    """
    opts = settings_with(SampleSettings, settings, options, "run_synthesize")
    out_dir = Path(out_dir)
    with claim_output(out_dir):
        _check_output(out_dir, overwrite)
        volume = load_volume(ctp, series_uid=series_uid)
        volume.meta.setdefault("source", str(ctp))
        brain = load_volume(mask) if mask is not None else None
        truth = load_volume(ground_truth_lesion) if ground_truth_lesion is not None else None
        result = synthesize(volume, model, opts, device=device, brain_mask=brain, ground_truth_lesion=truth,
                            progress=progress, cancel=cancel)
        result.report["input"]["path"] = str(ctp)
        if cancel is not None:
            cancel.raise_if_cancelled()
        write_outputs(result, out_dir, overwrite=overwrite)
    return result
