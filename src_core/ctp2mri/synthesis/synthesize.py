"""The synthesis engine: a CTP in its own geometry in, DWI/ADC/core on the same geometry out.

`synthesize` is what ``ctp2mri synthesize`` and the napari widget call:

1. validate the CTP (4-D, finite, ≥ 2 frames); brain mask given or derived from the CTP;
2. resample every frame onto the model's profile grid placed over the brain, then to the
   profile's 15 frames, and normalise per the contract;
3. sample only the axial slices that contain brain (the others stay zero), K samples per
   slice batched together, with DDIM or DPM-Solver++(2M) (`ctp2mri.synthesis.inference.sample_slices`);
4. map the output back to DWI units and ADC in 10⁻⁶ mm²/s with the *model's* stored
   intensity ranges, average the K samples (their standard deviation is the uncertainty);
5. resample onto the input's grid and affine, and estimate the core from the ADC
   (`ctp2mri.evaluation.core_estimate`).

`write_outputs` writes the result atomically; `run_synthesize` is the CLI's whole command.
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

from ctp2mri.checks import number, whole
from ctp2mri.evaluation.core_estimate import CORE_THRESHOLD, estimate_core
from ctp2mri.devices import resolve_device_with_notice
from ctp2mri.errors import InputError
from ctp2mri.synthesis.inference import (
    LoadedModel,
    autocast_dtype,
    load_model,
    sample_slices,
    sampler_steps,
)
from ctp2mri.io import load_volume
from ctp2mri.io.atomic import atomic_dir, claim_output
from ctp2mri.io.jsonfile import strict_json
from ctp2mri.io.nifti import save_nifti
from ctp2mri.io.volume import Volume
from ctp2mri.preprocessing.preprocess import (
    AIR_HU,
    CTP_HU_RANGE,
    brain_mask_from_ctp,
    brain_mask_notice,
    check_spacing,
    frames_notice,
    model_grid,
    normalise_ctp,
    resample_frames,
    resample_like,
    resample_to_grid,
)
from ctp2mri.profiles import PROFILES, get_profile
from ctp2mri.progress import CancelToken, ProgressCallback

__all__ = ["OUTPUT_FILES", "SynthesisResult", "auto_batch_size", "check_settings", "run_synthesize",
           "synthesize", "write_outputs"]

#: What `write_outputs` writes; the uncertainty files only when K > 1. Two 3-D files rather
#: than one 4-D ``uncertainty.nii.gz``: a 4-D NIfTI reads as a time series in viewers, and
#: DWI and ADC standard deviations have different units.
OUTPUT_FILES = {"dwi": "dwi.nii.gz", "adc": "adc.nii.gz", "core": "core.nii.gz",
                "brain": "brain.nii.gz", "uncertainty_dwi": "uncertainty_dwi.nii.gz",
                "uncertainty_adc": "uncertainty_adc.nii.gz", "report": "report.json"}
_TARGETS = ("dwi", "adc")  # output channels of the model, in order
_WEIGHT_FLOOR = 1e-3  # resampled brain weight below which a voxel has no model data


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


def _row_bytes(model: LoadedModel, height: int, width: int) -> int:
    """Rough peak memory of one slice-sample in a batch (inference mode, float32).

    The UNet keeps its skip connections (~2 per resolution level and block) at the latent
    size; the decoder's widest level runs at full resolution. The factors are generous so the
    guess errs towards smaller batches; an out-of-memory error on the GPU halves the batch.
    """
    h, w = model.autoencoder.latent_shape(height, width)[-2:]
    unet = model.cldm.config.get("channels", [64])
    blocks = 2 * int(model.cldm.config.get("num_res_blocks", 2)) + 2
    unet_floats = sum(c * (h >> lvl) * (w >> lvl) * blocks for lvl, c in enumerate(unet)) * 4
    decoder_floats = max(model.autoencoder.config.get("channels", [64])) * height * width * 8
    return 4 * (unet_floats + decoder_floats)


def auto_batch_size(model: LoadedModel, height: int, width: int, rows: int) -> int:
    """Rows per network call from free memory: half of it over `_row_bytes`, capped.

    Free memory is ``torch.cuda.mem_get_info`` on CUDA, the system's available memory
    (psutil) elsewhere. CPU batches are capped at 32: larger ones no longer speed up
    convolutions and only delay the first progress report.
    """
    dev = model.device
    if dev.type == "cuda":
        free = torch.cuda.mem_get_info(dev)[0]
        cap = 512
    else:
        import psutil

        free = psutil.virtual_memory().available
        cap = 32
    fit = int(0.5 * free // max(_row_bytes(model, height, width), 1))
    return max(1, min(fit, cap, max(int(rows), 1)))


def _profile_notice(ctp: Volume, model_profile: str) -> str | None:
    """A notice when the CTP sits on another profile's grid than the model's."""
    for name, prof in PROFILES.items():
        if name != model_profile and np.allclose(ctp.spacing, prof.spacing, atol=1e-3):
            model_prof = get_profile(model_profile)
            return (f"the CTP is on the {name!r} profile's grid ({_mm(prof.spacing)}) but the model "
                    f"works on {model_profile!r} ({_mm(model_prof.spacing)}): the CTP is resampled "
                    "to the model's grid and the result back to the CTP's")
    return None


def _mm(spacing: Any) -> str:
    return "×".join(f"{s:g}" for s in spacing) + " mm"


def _ranges(model: LoadedModel) -> dict[str, tuple[float, float]]:
    """The model's stored (lo, hi) per target, mapping [−1, 1] back to units."""
    out = {}
    for what in _TARGETS:
        entry = model.normalisation.get(what)
        try:
            lo, hi = float(entry["lo"]), float(entry["hi"])
        except (TypeError, KeyError, ValueError):
            raise InputError(f"the model {model.path or ''} stores no {what.upper()} intensity range "
                             "(config.json 'normalisation'); it cannot map its output to units. "
                             "Use a checkpoint written by ctp2mri train-ldm or post-train.") from None
        if not hi > lo:
            raise InputError(f"the model's {what.upper()} range [{lo:g}, {hi:g}] is empty; the "
                             "checkpoint is damaged")
        out[what] = (lo, hi)
    return out


def check_settings(*, steps: int, eta: float, samples: int, seed: int, batch_size: int | None,
                   core_threshold: float) -> dict[str, Any]:
    """The numeric settings of `synthesize` validated (finite, in range), or an `InputError`
    naming the first bad one (`synthesize` calls it first; a GUI can check its fields with it)."""
    return {
        "steps": whole(steps, "steps", minimum=1),
        "eta": number(eta, "eta", minimum=0.0, maximum=1.0),
        "samples": whole(samples, "samples", minimum=1),
        "seed": whole(seed, "seed", minimum=0, maximum=2**63 - 1),
        "batch_size": None if batch_size is None else whole(batch_size, "batch size", minimum=1),
        "core_threshold": number(core_threshold, "core threshold (ADC, 10⁻⁶ mm²/s)", above=0.0,
                                 maximum=10000.0),
    }


def _check_companions(ctp: Volume, brain_mask: Volume | None, ground_truth: Volume | None) -> None:
    """Masks that cannot be used are refused before the model is loaded, not after sampling."""
    for volume, name in ((brain_mask, "brain mask"), (ground_truth, "ground-truth lesion")):
        if volume is not None:
            volume.require_3d(name).require_finite(name).require_same_grid(ctp, name, "CTP")


def _brain_on_input(ctp: Volume, brain_mask: Volume | None,
                    cancel: CancelToken | None) -> tuple[Volume, str]:
    if brain_mask is None:
        return brain_mask_from_ctp(ctp, cancel=cancel), "derived from the CTP"
    brain_mask.require_3d("brain mask").require_same_grid(ctp, "brain mask", "CTP")
    brain = brain_mask.with_array((np.asarray(brain_mask.array) != 0).astype(np.uint8))
    if not brain.array.any():
        raise InputError("the brain mask is empty (all zero); leave it out to derive one from "
                         "the CTP, or give the right mask")
    return brain, "given"


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


def _back_to_input(channels: dict[str, np.ndarray], weight: np.ndarray, grid: np.ndarray,
                   ctp: Volume, brain: np.ndarray, cancel: CancelToken | None,
                   ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Model-grid maps onto the CTP's grid, normalised by the resampled brain weight, and
    the input-grid brain voxels that the model's brain covers (where the maps are defined).

    Each map is zero outside the model-grid brain; resampling it alone would darken a
    partial-volume rim along the brain's edge (and put false core there, ADC dropping
    towards 0). Resampling ``map × brain`` and ``brain`` together and dividing
    (normalised convolution) keeps edge values at the tissue's.
    """
    names = list(channels)
    stack = np.stack([channels[n] * weight for n in names] + [weight], axis=-1)
    moved = resample_like(Volume(stack.astype(np.float32), grid), ctp, "linear", cancel=cancel).array
    w = moved[..., -1]
    valid = (w > _WEIGHT_FLOOR) & brain
    out = {}
    for i, name in enumerate(names):
        a = np.zeros(w.shape, dtype=np.float32)
        np.divide(moved[..., i], w, out=a, where=valid)
        out[name] = a
    return out, valid


def synthesize(ctp: Volume, model: LoadedModel | str | os.PathLike, *, sampler: str = "dpm++2m",
               steps: int = 20, eta: float = 0.0, samples: int = 1, seed: int = 0,
               batch_size: int | None = None, device: str | torch.device = "auto",
               precision: str = "fp32", core_threshold: float = CORE_THRESHOLD,
               brain_mask: Volume | None = None, ground_truth_lesion: Volume | None = None,
               progress: ProgressCallback | None = None,
               cancel: CancelToken | None = None) -> SynthesisResult:
    """Synthesise DWI and ADC (and the infarct core) from a CT perfusion series.

    Parameters
    ----------
    ctp
        4-D CTP in HU (x, y, z, t) in any geometry, ≥ 2 frames.
    model
        A `LoadedModel`, or a cLDM checkpoint folder loaded onto ``device``.
    sampler, steps, eta
        ``"dpm++2m"`` (default, ~20 steps) or ``"ddim"`` (the paper's: 200 steps, η);
        η must be 0 for DPM-Solver++.
    samples
        K samples per slice (seeded, batched); K > 1 gives the uncertainty maps.
    seed
        Run seed; each slice's noise depends on (seed, z index on the model grid, sample).
    batch_size
        Slice-samples per network call; None picks it from free memory (`auto_batch_size`).
    device
        Where a model given by path is loaded (``auto``, ``cpu``, ``cuda[:i]``, ``mps``); a
        `LoadedModel` runs where it is.
    precision
        ``fp32``, ``bf16`` or ``fp16``: autocast of the denoiser on CUDA; float32 elsewhere
        (a notice says so).
    core_threshold
        ADC threshold of the core, 10⁻⁶ mm²/s.
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
    ctp2mri.errors.Cancelled
        When ``cancel`` is set.
    """
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    notices: list[str] = []
    check_spacing(ctp.require_4d("CTP").require_finite("CTP"), "CTP")  # also refuses a single frame
    checked = check_settings(steps=steps, eta=eta, samples=samples, seed=seed, batch_size=batch_size,
                             core_threshold=core_threshold)
    steps, eta, samples, seed = checked["steps"], checked["eta"], checked["samples"], checked["seed"]
    batch_size, core_threshold = checked["batch_size"], checked["core_threshold"]
    _check_companions(ctp, brain_mask, ground_truth_lesion)  # before loading the model and sampling
    if isinstance(model, LoadedModel):
        loaded = model
    else:
        dev, notice = resolve_device_with_notice(device)
        notices += [notice] if notice else []
        loaded = load_model(model, dev)
    if not isinstance(loaded, LoadedModel):  # load_model also reads the baselines' checkpoints
        raise InputError(f"{model} is a {loaded.kind} baseline checkpoint; synthesis runs a cLDM (from "
                         "`ctp2mri train-ldm` or `post-train`). Score baselines with `ctp2mri evaluate`.")
    sampler_steps(sampler, steps, loaded)  # bad sampler/steps fail before any resampling
    if sampler != "ddim" and eta != 0:
        raise InputError(f"eta = {eta:g} applies to DDIM only; {sampler} is deterministic "
                         "(use eta 0, or sampler ddim)")
    if precision != "fp32" and autocast_dtype(precision, loaded.device) is None:
        notices.append(f"precision {precision} applies on CUDA GPUs only; computing in fp32 on "
                       f"{loaded.device}")
    ranges = _ranges(loaded)
    prof = get_profile(loaded.profile)
    notice = _profile_notice(ctp, prof.name)
    notices += [notice] if notice else []
    timings["load_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    brain, mask_origin = _brain_on_input(ctp, brain_mask, cancel)
    notices += [n for n in (brain_mask_notice(brain), frames_notice(ctp, prof.n_frames)) if n]
    timings["brain_mask_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    grid_affine, grid_shape = model_grid(ctp, prof, brain)
    ctp_g = resample_to_grid(ctp, grid_affine, grid_shape, "linear", AIR_HU, cancel=cancel)
    brain_g = resample_to_grid(brain, grid_affine, grid_shape, "nearest").array != 0
    ctp_t = resample_frames(ctp_g, prof.n_frames)
    del ctp_g
    keep = np.flatnonzero(brain_g.any(axis=(0, 1)))
    if keep.size == 0:
        raise InputError("no brain voxel falls on the model's grid; check the brain mask")
    # (X, Y, z, t) → (slices, frames, X, Y), only the slices with brain
    cond = np.clip(normalise_ctp(ctp_t.array[:, :, keep, :], brain_g[:, :, keep], CTP_HU_RANGE),
                   -1.0, 1.0).transpose(2, 3, 0, 1)
    cond = torch.from_numpy(np.ascontiguousarray(cond))
    del ctp_t
    timings["resample_in_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    height, width = grid_shape[:2]
    rows = keep.size * int(samples)
    chosen = int(batch_size) if batch_size is not None else auto_batch_size(loaded, height, width, rows)
    stats: dict[str, Any] = {}
    pred = sample_slices(loaded, cond, n_steps=steps, eta=eta, seed=seed, batch_size=chosen,
                         ids=keep.tolist(), progress=_sampling_progress(progress, int(keep.size)),
                         cancel=cancel, sampler=sampler, samples=samples, precision=precision,
                         stats=stats)
    del cond
    if stats["oom_retries"]:
        notices.append(f"out of GPU memory at batch size {chosen}; finished with batch size "
                       f"{stats['batch_size']}")
    timings["sample_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    pred = pred.numpy().reshape(keep.size, int(samples), len(_TARGETS), height, width)
    weight = brain_g.astype(np.float32)
    maps: dict[str, np.ndarray] = {}
    for c, what in enumerate(_TARGETS):
        lo, hi = ranges[what]
        units = (pred[:, :, c] + np.float32(1.0)) * np.float32((hi - lo) / 2.0) + np.float32(lo)
        for key, stat in ((what, units.mean(axis=1)),
                          (f"sd_{what}", units.std(axis=1, ddof=1) if samples > 1 else None)):
            if stat is None:
                continue
            full = np.zeros(grid_shape, dtype=np.float32)
            full[:, :, keep] = np.moveaxis(stat, 0, -1)  # (slices, X, Y) → (X, Y, slices)
            maps[key] = full
    del pred
    on_input, covered = _back_to_input(maps, weight, grid_affine, ctp, brain.array != 0, cancel)
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
    core, core_summary = estimate_core(adc, brain, core_threshold, ground_truth=ground_truth_lesion)
    timings["core_s"] = time.perf_counter() - clock

    uncertainty = None
    if samples > 1:
        uncertainty = {"dwi": vol(on_input["sd_dwi"], modality="DWI standard deviation"),
                       "adc": vol(on_input["sd_adc"], modality="ADC standard deviation",
                                  units="1e-6 mm2/s")}
    from ctp2mri import __version__

    report = {
        "ctp2mri_version": __version__,
        "model": {"path": loaded.path, "profile": prof.name, "weights": loaded.weights,
                  "normalisation": {w: {"lo": r[0], "hi": r[1]} for w, r in ranges.items()}},
        "device": str(loaded.device), "precision": precision if loaded.device.type == "cuda" else "fp32",
        "sampler": sampler, "steps": int(steps), "eta": float(eta), "samples": int(samples),
        "seed": int(seed), "batch_size": stats["batch_size"], "network_calls": stats["network_calls"],
        "input": {"shape": list(ctp.array.shape), "spacing_mm": [round(s, 4) for s in ctp.spacing],
                  "orientation": ctp.orientation, "affine": ctp.affine.tolist()},
        "model_grid": {"shape": list(grid_shape), "spacing_mm": list(prof.spacing),
                       "affine": grid_affine.tolist(), "n_frames": prof.n_frames},
        "brain_mask": {"origin": mask_origin, "rim_voxels_without_model_data": dropped,
                       "volume_ml": round(float(covered.sum() * np.prod(ctp.spacing) / 1000), 2)},
        "slices_total": int(grid_shape[2]), "slices_sampled": int(keep.size),
        "slices_skipped": int(grid_shape[2] - keep.size),
        "core": core_summary, "core_volume_ml": core_summary["volume_ml"],
        "timings_s": {k: round(v, 3) for k, v in timings.items()}, "notices": notices,
    }
    report["timings_s"]["total_s"] = round(sum(timings.values()), 3)
    return SynthesisResult(dwi=vol(on_input["dwi"], modality="DWI"), adc=adc, core=core,
                           uncertainty=uncertainty, brain=brain, report=report)


def write_outputs(result: SynthesisResult, out_dir: str | os.PathLike,
                  overwrite: bool = False) -> Path:
    """Write a result as NIfTI files with the input's affine, plus ``report.json``.

    Files: ``dwi.nii.gz``, ``adc.nii.gz`` (float32), ``core.nii.gz``, ``brain.nii.gz``
    (uint8), and when K > 1 ``uncertainty_dwi.nii.gz``/``uncertainty_adc.nii.gz`` (see
    `OUTPUT_FILES`). The folder appears complete or not at all (`atomic_dir`).

    Raises
    ------
    InputError
        ``out_dir`` exists and is not empty (without ``overwrite``), or is not writable.
    """
    volumes = {"dwi": result.dwi, "adc": result.adc, "core": result.core, "brain": result.brain}
    if result.uncertainty is not None:
        volumes.update({f"uncertainty_{k}": v for k, v in result.uncertainty.items()})
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


def run_synthesize(ctp: str | os.PathLike, model: str | os.PathLike, out_dir: str | os.PathLike, *,
                   series_uid: str | None = None, mask: str | os.PathLike | None = None,
                   ground_truth_lesion: str | os.PathLike | None = None, overwrite: bool = False,
                   progress: ProgressCallback | None = None, cancel: CancelToken | None = None,
                   **settings: Any) -> SynthesisResult:
    """``ctp2mri synthesize``: read a CTP (NIfTI/NRRD/MHA file or DICOM folder), synthesise,
    write the outputs to ``out_dir``.

    ``settings`` are `synthesize`'s keywords (sampler, steps, eta, samples, seed,
    batch_size, device, precision, core_threshold). The output folder is checked first, so
    a run that could not write its results fails before sampling; a cancelled or failed run
    leaves nothing behind. ``out_dir`` is claimed for the whole run (`claim_output`): a second
    run into the same folder is refused at once instead of overwriting this one's result.
    """
    out_dir = Path(out_dir)
    with claim_output(out_dir):
        _check_output(out_dir, overwrite)
        volume = load_volume(ctp, series_uid=series_uid)
        volume.meta.setdefault("source", str(ctp))
        brain = load_volume(mask) if mask is not None else None
        truth = load_volume(ground_truth_lesion) if ground_truth_lesion is not None else None
        result = synthesize(volume, model, brain_mask=brain, ground_truth_lesion=truth,
                            progress=progress, cancel=cancel, **settings)
        result.report["input"]["path"] = str(ctp)
        if cancel is not None:
            cancel.raise_if_cancelled()
        write_outputs(result, out_dir, overwrite=overwrite)
    return result
