"""From a scanner's CT perfusion (and MRI) to a case folder on the model grid.

The normalisation contract (docs/contracts.md), 15-frame temporal resampling and
`preprocess_case`, the core of ``ctp2mri preprocess``. The brain mask lives in
`ctp2mri.preprocessing.brain_mask`, spatial resampling in `ctp2mri.preprocessing.resample`,
CTP → DWI registration in `ctp2mri.preprocessing.registration`; the last two are re-exported here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ctp2mri.casefolder import Case, write_case
from ctp2mri.checks import whole
from ctp2mri.errors import InputError
from ctp2mri.io import load_volume
from ctp2mri.io.atomic import claim_output
from ctp2mri.io.volume import Volume
from ctp2mri.preprocessing.brain_mask import brain_mask_from_ctp, brain_mask_notice
from ctp2mri.preprocessing.field_of_view import check_mri_coverage, inside_field_of_view
from ctp2mri.preprocessing.registration import estimate_ctp_to_dwi, register_to_dwi
from ctp2mri.preprocessing.resample import as_profile, model_grid, resample_like, resample_to_grid, to_profile
from ctp2mri.preprocessing.spacing import check_spacing
from ctp2mri.profiles import Profile
from ctp2mri.progress import CancelToken, ProgressCallback

__all__ = [
    "CTP_HU_RANGE", "frames_notice", "normalise_ctp", "normalise_mri", "normalise_mri_like",
    "denormalise_mri", "model_grid", "resample_to_grid", "resample_like", "to_profile", "resample_frames",
    "register_to_dwi", "preprocess_case",
]

CTP_HU_RANGE = (0.0, 200.0)  # contract: CTP clipped to [0, 200] HU → [−1, 1]
MRI_QUANTILES = (0.5, 99.5)  # contract: DWI/ADC clipped to these brain percentiles
AIR_HU = -1024.0  # written where a grid lies outside the CTP's field of view


# normalisation (docs/contracts.md) ------------------------------------------------------
def _brain(mask: Volume | np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
    m = np.asarray(mask.array if isinstance(mask, Volume) else mask) != 0
    if shape[: m.ndim] != m.shape:
        raise InputError(f"brain mask of shape {m.shape} does not fit the {what} of shape "
                         f"{shape}; use the mask on the same grid")
    if not m.any():
        raise InputError(f"the brain mask for the {what} is empty (all zero); recompute it "
                         "(ctp2mri preprocess derives one from the CTP)")
    return m.reshape(m.shape + (1,) * (len(shape) - m.ndim))


def normalise_ctp(array: np.ndarray, mask: Volume | np.ndarray,
                  hu_range: tuple[float, float] = CTP_HU_RANGE) -> np.ndarray:
    """CTP in HU → [−1, 1] per the contract: clip to ``hu_range``, scale, zero outside brain.

    ``mask`` covers the leading (spatial) axes; trailing axes (time) broadcast.
    """
    a = np.asarray(array, dtype=np.float32)
    m = _brain(mask, a.shape, "CTP")
    lo, hi = hu_range
    out = (np.clip(a, lo, hi) - np.float32(lo)) * np.float32(2.0 / (hi - lo)) - np.float32(1.0)
    out *= m
    return out


def normalise_mri(array: np.ndarray, mask: Volume | np.ndarray,
                  quantiles: tuple[float, float] = MRI_QUANTILES, hi_median: float | None = None,
                  ) -> tuple[np.ndarray, tuple[float, float]]:
    """DWI or ADC → [−1, 1] per the contract, with the case's own brain quantiles.

    ``hi_median``: the upper bound is ``hi_median`` × the brain's median instead of the upper
    quantile (the DWI anchor, `ctp2mri.settings.DWI_HI_MEDIAN`: normal tissue then lands on the
    same value in every case, whatever the lesion's size).

    Returns
    -------
    normalised, (lo, hi)
        float32 array (zero outside the brain) and the intensity range that maps to
        [−1, 1]; `denormalise_mri` inverts it inside that range.
    """
    a = np.asarray(array, dtype=np.float32)
    m = _brain(mask, a.shape, "MRI")
    values = a[np.broadcast_to(m, a.shape)]
    lo, hi = (float(q) for q in np.percentile(values, quantiles))
    if hi_median is not None:
        median = float(np.median(values))
        if median > lo:
            hi = float(hi_median) * median
        elif hi > lo:  # a constant image falls through to the message below
            raise InputError(f"the image's brain median ({median:g}) is not above its 0.5 % quantile ({lo:g}), "
                             "so it cannot be scaled to normal tissue; DWI must be a magnitude image (≥ 0) "
                             "inside the brain")
    if not hi > lo:
        raise InputError(f"the image is constant ({lo:g}) inside the brain mask; it cannot be "
                         "normalised. Check that the right image and mask were given.")
    out = (np.clip(a, lo, hi) - np.float32(lo)) * np.float32(2.0 / (hi - lo)) - np.float32(1.0)
    out *= m
    return out, (lo, hi)


def normalise_mri_like(array: np.ndarray, lo: float, hi: float, brain: np.ndarray) -> np.ndarray:
    """`normalise_mri`'s mapping with a given range (another image's, e.g. the ground truth's),
    clipped to [−1, 1]; ``brain`` broadcasts against ``array``."""
    out = (np.clip(array, lo, hi) - np.float32(lo)) * np.float32(2.0 / (hi - lo)) - np.float32(1.0)
    out *= brain
    # float32 rounding may overshoot ±1 by an ulp; the contract is [−1, 1] (as case_slices)
    return np.clip(out, -1.0, 1.0)


def denormalise_mri(array: np.ndarray, lo: float, hi: float,
                    mask: Volume | np.ndarray | None = None) -> np.ndarray:
    """[−1, 1] → intensities (inverse of `normalise_mri`); zero outside ``mask`` if given."""
    a = np.asarray(array, dtype=np.float32)
    out = (a + np.float32(1.0)) * np.float32((hi - lo) / 2.0) + np.float32(lo)
    if mask is not None:
        out *= _brain(mask, a.shape, "MRI")
    return out


# temporal resampling ---------------------------------------------------------------------
def resample_frames(ctp: Volume, n_frames: int = 15, times: np.ndarray | None = None) -> Volume:
    """Linear interpolation in time onto ``n_frames`` equally spaced times.

    The times span the acquisition window (first to last frame) unless ``times`` (s) is
    given; times outside the window are refused (no extrapolation). Already matching frame
    times return the volume unchanged. Frames are built one at a time (each a weighted sum
    of its two neighbours), so memory stays at the output size.
    """
    if not ctp.is_4d or ctp.n_frames < 2:
        raise InputError(f"the CTP has a single time point (shape {ctp.array.shape}); cannot "
                         "resample a single time point in time. Load the whole perfusion series.")
    src = ctp.frame_times
    if src is None:
        src = np.arange(ctp.n_frames, dtype=np.float64)
    if np.any(np.diff(src) <= 0):
        raise InputError(f"CTP frame times {np.round(src, 2).tolist()} are not increasing; "
                         "check the series' acquisition times")
    if times is None:
        if int(n_frames) < 2:
            raise InputError(f"n_frames must be at least 2, got {n_frames}")
        times = np.linspace(src[0], src[-1], int(n_frames))
    times = np.asarray(times, dtype=np.float64).ravel()
    tol = 1e-6 * max(1.0, float(src[-1] - src[0]))
    if times.size == 0 or times.min() < src[0] - tol or times.max() > src[-1] + tol:
        raise InputError(f"requested times {times.min():.2f}–{times.max():.2f} s lie outside the "
                         f"acquisition window {src[0]:.2f}–{src[-1]:.2f} s; cannot extrapolate")
    if times.shape == src.shape and np.allclose(times, src, atol=tol):
        return ctp
    left = np.clip(np.searchsorted(src, times, side="right") - 1, 0, src.size - 2)
    weight = np.clip((times - src[left]) / (src[left + 1] - src[left]), 0.0, 1.0)
    out = np.empty(ctp.spatial_shape + (times.size,), dtype=np.float32, order="F")
    for k, (i, w) in enumerate(zip(left, weight)):
        a, b = ctp.array[..., i], ctp.array[..., i + 1]
        out[..., k] = a if w == 0 else (b if w == 1 else (1 - w) * a.astype(np.float32) + w * b)
    meta = {**ctp.meta, "frames_resampled_from": src.tolist()}
    return Volume(out, ctp.affine, frame_times=times, meta=meta)


def frames_notice(ctp: Volume, n_frames: int) -> str | None:
    """Says that the CTP's frames are resampled in time, and to what, or None when they are kept."""
    if ctp.n_frames == int(n_frames):
        return None
    times = ctp.frame_times if ctp.frame_times is not None else np.arange(ctp.n_frames, dtype=float)
    span = f"{times[0]:.1f}–{times[-1]:.1f} s"
    if ctp.n_frames > n_frames:
        return (f"the CTP's {ctp.n_frames} frames ({span}) are resampled to the model's {int(n_frames)} equally "
                "spaced frames: the time course between them is not seen by the model")
    return f"the CTP's {ctp.n_frames} frames ({span}) are interpolated to the model's {int(n_frames)} frames"


# the whole case --------------------------------------------------------------------------
def _load(item: str | os.PathLike | Volume) -> tuple[Volume, str]:
    if isinstance(item, Volume):
        return item, str(item.meta.get("source", "<in memory>"))
    return load_volume(item), str(item)


def _check_output(out_dir: Path, overwrite: bool) -> None:
    """Refuse an unusable output before hours of work, without creating anything."""
    if out_dir.is_file():
        raise InputError(f"output {out_dir} is a file; give a folder for the case")
    if out_dir.is_dir() and not overwrite and any(out_dir.iterdir()):
        raise InputError(f"{out_dir} already exists and is not empty; pass overwrite "
                         "(--overwrite) to replace it")
    parent = out_dir.parent.absolute()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise InputError(f"cannot create {out_dir}: {parent} is not a writable folder. "
                         "Choose an output folder you can write to.")


def _describe(volume: Volume) -> dict[str, Any]:
    d = {"shape": list(volume.array.shape), "spacing_mm": [round(s, 4) for s in volume.spacing],
         "orientation": volume.orientation, "dtype": str(volume.array.dtype)}
    if volume.frame_times is not None:
        d["frame_times_s"] = np.round(volume.frame_times, 3).tolist()
    return d


class _Stages:
    """Maps each stage's own (step, total) onto one overall progress bar."""

    def __init__(self, progress: ProgressCallback | None, weights: dict[str, int]):
        self.progress, self.weights = progress, weights
        self.total, self.done = sum(weights.values()), 0

    def __call__(self, name: str) -> Callable[[int, int, dict], None]:
        def callback(step: int, total: int, info: dict) -> None:
            if self.progress is not None:
                part = self.weights[name] * min(step, total) // max(total, 1)
                stage = info.get("stage", name)
                self.progress(self.done + part, self.total, {**info, "stage": stage})
        return callback

    def finish(self, name: str) -> None:
        self.done += self.weights[name]
        if self.progress is not None and self.weights[name]:
            self.progress(self.done, self.total, {"stage": name})


def preprocess_case(ctp_path: str | os.PathLike | Volume, out_dir: str | os.PathLike,
                    profile: str | Profile = "demo", dwi: str | os.PathLike | Volume | None = None,
                    adc: str | os.PathLike | Volume | None = None,
                    lesion: str | os.PathLike | Volume | None = None,
                    mask: str | os.PathLike | Volume | None = None, register: bool = False,
                    transform: str = "rigid", n_frames: int = 15, overwrite: bool = False,
                    progress: ProgressCallback | None = None,
                    cancel: CancelToken | None = None, extra_info: dict[str, Any] | None = None) -> Path:
    """Bring one CTP (and its MRI) onto the model grid and write a case folder.

    Steps: load and validate; brain mask (given on the CTP or DWI grid, or derived from the
    CTP); optionally register the CTP to the DWI (rigid/affine, mutual information);
    resample everything once onto the profile's model grid (images linear and
    anti-aliased, masks nearest; the mask is cut to the CTP's field of view); resample the
    CTP to ``n_frames`` equally spaced times; write the folder atomically. The CTP is stored
    in raw HU (normalisation happens at training time); ``case.json`` records sources,
    original geometry, profile, grid, mask origin and registration.

    Without ``register``, DWI/ADC/lesion are assumed to share the CTP's world coordinates; an
    MRI that covers less than `field_of_view.MIN_MRI_COVERAGE` of the CTP's brain is refused
    either way (the overlap is recorded in ``case.json``). Warnings (frames resampled, an
    implausible brain mask, the overlap after registration) are listed under ``notices`` there.
    ``out_dir`` is claimed for the whole run (`claim_output`). ``extra_info`` (JSON-ready) is
    written into ``case.json`` beside ``preprocess``, in the same atomic write (the importers'
    provenance, `ctp2mri.importing.isles24`).
    """
    with claim_output(out_dir):
        return _preprocess_case(ctp_path, Path(out_dir), as_profile(profile), dwi, adc, lesion, mask, register,
                                transform, whole(n_frames, "n_frames (--frames)", minimum=2), overwrite,
                                progress, cancel, extra_info or {})


def _preprocess_case(ctp_path: str | os.PathLike | Volume, out_dir: Path, prof: Profile,
                     dwi: str | os.PathLike | Volume | None, adc: str | os.PathLike | Volume | None,
                     lesion: str | os.PathLike | Volume | None, mask: str | os.PathLike | Volume | None,
                     register: bool, transform: str, n_frames: int, overwrite: bool,
                     progress: ProgressCallback | None, cancel: CancelToken | None,
                     extra_info: dict[str, Any]) -> Path:
    _check_output(out_dir, overwrite)
    if register and dwi is None:
        raise InputError("registration needs a DWI to register the CTP to; pass dwi (--dwi)")
    notices: list[str] = []
    stages = _Stages(progress, {"load": 1, "mask": 10, "register": 20 if register else 0,
                                "resample": 15, "temporal": 1, "write": 3})

    ctp, ctp_src = _load(ctp_path)
    check_spacing(ctp.require_4d("CTP").require_finite("CTP"), "CTP")
    sources = {"ctp": ctp_src}
    mri: dict[str, Volume] = {}
    for name, item in (("dwi", dwi), ("adc", adc), ("lesion", lesion)):
        if item is not None:
            vol, sources[name] = _load(item)
            mri[name] = check_spacing(vol.require_3d(name.upper()).require_finite(name.upper()), name.upper())
    mri_ref = next(iter(mri.values()), None)
    for name, vol in mri.items():
        vol.require_same_grid(mri_ref, name.upper(), next(iter(mri)).upper())
    if "lesion" in mri:
        mri["lesion"] = mri["lesion"].with_array((mri["lesion"].array != 0).astype(np.uint8))
    stages.finish("load")

    if mask is not None:
        brain, sources["mask"] = _load(mask)
        brain.require_3d("brain mask")
        if brain.same_grid(ctp):
            mask_space = "ctp"
        elif mri_ref is not None and brain.same_grid(mri_ref):
            mask_space = "mri"
        else:
            ctp.require_same_grid(brain, "CTP", "brain mask")  # raises, naming both grids
        brain = brain.with_array((brain.array != 0).astype(np.uint8))
        if not brain.array.any():
            raise InputError(f"the brain mask {sources['mask']} is empty (all zero); leave it "
                             "out to derive one from the CTP")
        mask_info: dict[str, Any] = {"origin": f"given ({mask_space} grid)",
                                     "path": sources["mask"]}
    else:
        brain = brain_mask_from_ctp(ctp, progress=stages("mask"), cancel=cancel)
        mask_space = "ctp"
        mask_info = {"origin": "derived from the CTP", **brain.meta["brain_mask"]}
    notices += [n for n in (brain_mask_notice(brain), frames_notice(ctp, n_frames)) if n]
    stages.finish("mask")

    tx, registration = None, None
    if register:
        tx, registration = estimate_ctp_to_dwi(ctp, mri["dwi"], transform,
                                               progress=stages("register"), cancel=cancel)
    stages.finish("register")

    # One interpolation from each source straight onto the model grid; with registration
    # the grid lives in DWI space and the CTP (and a CTP-grid mask) go through the transform.
    space = mri["dwi"] if register else ctp
    mask_tx = tx if mask_space == "ctp" else None
    brain_in_space = brain
    if register:
        brain_in_space = resample_like(brain, space, "nearest", transform=mask_tx)
    grid = model_grid(space, prof, brain_in_space)
    mask_g = resample_to_grid(brain, *grid, "nearest", transform=mask_tx)
    inside = inside_field_of_view(ctp, grid, tx)
    mask_info["voxels_outside_ctp_fov_removed"] = int((mask_g.array.astype(bool) & ~inside).sum())
    mask_g = mask_g.with_array((mask_g.array.astype(bool) & inside).astype(np.uint8))
    if not mask_g.array.any():
        raise InputError("no brain voxel of the model grid lies inside the CTP's field of view; "
                         "check that CTP and MRI overlap (or use register)")
    if mri_ref is not None:
        mask_info["mri_coverage"] = check_mri_coverage(ctp, mri_ref, next(iter(mri)).upper(), grid,
                                                       mask_g.array != 0, register, notices)
    # the expensive resampling only once the inputs passed every check
    ctp_g = resample_to_grid(ctp, *grid, "linear", AIR_HU, transform=tx,
                             progress=stages("resample"), cancel=cancel)
    mri_g = {name: resample_to_grid(vol, *grid, "nearest" if name == "lesion" else "linear",
                                    cancel=cancel)
             for name, vol in mri.items()}
    brain_ml = float(mask_g.array.sum() * np.prod(prof.spacing) / 1000)
    mask_info["volume_ml_on_grid"] = round(brain_ml, 1)
    stages.finish("resample")

    ctp_t = resample_frames(ctp_g, n_frames)
    stages.finish("temporal")
    if cancel is not None:
        cancel.raise_if_cancelled()

    from ctp2mri import __version__

    info = {"preprocess": {
        "ctp2mri_version": __version__, "profile": prof.name,
        "grid": {"affine": grid[0].tolist(), "shape": list(grid[1]),
                 "spacing_mm": list(prof.spacing)},
        "sources": sources,
        "original": {"ctp": _describe(ctp), **{k: _describe(v) for k, v in mri.items()}},
        "frame_times_assumed": bool(ctp.meta.get("frame_times_assumed", False)),
        "mask": mask_info,
        "registration": registration if register else (
            "none: CTP and MRI assumed to share world coordinates" if mri else None),
        "temporal": {"n_frames_in": ctp.n_frames, "n_frames": ctp_t.n_frames,
                     "times_s": np.round(ctp_t.frame_times, 3).tolist()},
        "stored": "CTP in raw HU (int16); normalisation happens at training time (docs/contracts.md)",
        "notices": notices,
    }, **extra_info}
    case = Case(ctp=ctp_t, mask=mask_g, info=info, **mri_g)
    write_case(case, out_dir, overwrite=overwrite)
    stages.finish("write")
    return out_dir
