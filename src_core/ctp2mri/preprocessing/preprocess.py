"""From a scanner's CT perfusion (and MRI) to a case folder on the model grid.

Brain mask from the CTP itself, the normalisation contract (docs/contracts.md), 15-frame temporal
resampling and `preprocess_case`, the core of ``ctp2mri preprocess``. Spatial resampling
lives in `ctp2mri.preprocessing.resample`, CTP → DWI registration in `ctp2mri.preprocessing.registration`; both are
re-exported here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ctp2mri.casefolder import Case, write_case
from ctp2mri.checks import whole
from ctp2mri.errors import InputError
from ctp2mri.io import load_volume
from ctp2mri.io.atomic import claim_output
from ctp2mri.io.itk import frame_to_sitk, set_sitk_geometry
from ctp2mri.io.volume import Volume
from ctp2mri.profiles import Profile
from ctp2mri.progress import CancelToken, ProgressCallback
from ctp2mri.preprocessing.registration import estimate_ctp_to_dwi, register_to_dwi
from ctp2mri.preprocessing.resample import (
    as_profile,
    model_grid,
    resample_like,
    resample_to_grid,
    temporal_reduce,
    to_profile,
    transform_matrix,
)

__all__ = [
    "BRAIN_ML_RANGE", "CTP_HU_RANGE", "MIN_MRI_COVERAGE", "brain_mask_from_ctp", "brain_mask_notice",
    "check_spacing", "frames_notice", "normalise_ctp", "normalise_mri", "normalise_mri_like",
    "denormalise_mri", "model_grid", "resample_to_grid", "resample_like", "to_profile", "resample_frames",
    "register_to_dwi", "preprocess_case",
]

CTP_HU_RANGE = (0.0, 200.0)  # contract: CTP clipped to [0, 200] HU → [−1, 1]
MRI_QUANTILES = (0.5, 99.5)  # contract: DWI/ADC clipped to these brain percentiles
AIR_HU = -1024.0  # written where a grid lies outside the CTP's field of view
# A whole adult brain is about 1000–1600 ml; outside this range a mask is most likely wrong.
BRAIN_ML_RANGE = (600.0, 2500.0)
BRAIN_HEIGHT_MM = 120.0  # head-to-foot extent of a whole brain: shorter coverage scales the minimum
# Voxel-to-voxel noise of the frames' mean inside a derived mask above which the "brain" is
# more likely noise than tissue (phantoms 2–5 HU; white noise of σ 100 HU gives ~19 HU).
NOISE_HU_LIMIT = 12.0
MIN_MRI_COVERAGE = 0.5  # share of the CTP's brain the MRI must cover (else: not the same head)
# Voxel sizes any CT or MRI of a head has (mm). Outside, the affine's unit is wrong (metres,
# micrometres), and a structuring element of "3 mm" in micrometre voxels needs gigabytes.
SPACING_RANGE_MM = (0.05, 50.0)


# brain mask ------------------------------------------------------------------------------
def brain_mask_from_ctp(ctp: Volume, hu_window: tuple[float, float] = (10.0, 80.0),
                        reduce: str = "mean", working_spacing: float | None = 2.0,
                        opening_mm: float = 3.0,
                        min_volume_ml: float = 100.0, max_volume_ml: float | None = 3000.0,
                        progress: ProgressCallback | None = None,
                        cancel: CancelToken | None = None) -> Volume:
    """Brain mask (uint8, on the CTP's grid) from the CTP's own intensities.

    1. Temporal mean of the frames (``reduce="min"`` also offered): contrast-filled vessels
       and per-frame noise average out; each frame is first block-averaged towards
       ``working_spacing`` mm, which is plenty for a mask and fast on clinical series.
    2. The brain window ``hu_window``: brain 20–45 HU plus its mean enhancement lies
       inside; air (−1000), bone (> 300), CSF and a 0 HU background of a skull-stripped
       phantom lie outside. The lower bound sits above such a background (with the noise
       left after averaging frames and voxels) and below hypodense (infarcted) tissue.
    3. Opening with an ellipsoid of radius ``opening_mm`` (physical, so anisotropic voxels
       are handled) removes speckle and cuts scalp/orbit/neck bridges, then the largest
       face-connected component is the brain.
    4. Hole filling in 3-D, then slice-wise in axial planes (ventricles and CSF spaces
       that touch the surface in 3-D but are enclosed within a slice).

    Raises
    ------
    InputError
        No brain found (mask < ``min_volume_ml``) or the window caught the background
        (mask > ``max_volume_ml``); the message says what to check.
    """
    lo, hi = (float(v) for v in hu_window)
    if not lo < hi:
        raise InputError(f"hu_window {hu_window} must be (low, high) with low < high")
    check_spacing(ctp, "CTP")
    image = temporal_reduce(ctp, reduce, working_spacing, progress=progress, cancel=cancel)
    fg = (image.array >= lo) & (image.array <= hi)
    if opening_mm > 0:
        # scipy's opening with a small physical ellipsoid is ~5× faster than ITK's ball
        # opening at the working resolution (measured: 0.2 s vs 1.0 s for 2.6 M voxels).
        fg = ndimage.binary_opening(fg, _ellipsoid(opening_mm / np.asarray(image.spacing)))
    components = sitk.ConnectedComponent(frame_to_sitk(fg.view(np.uint8), image.affine), False)
    labels = sitk.RelabelComponent(components, sortByObjectSize=True)
    brain = sitk.BinaryFillhole(labels == 1, fullyConnected=False)
    mask = np.transpose(sitk.GetArrayFromImage(brain), (2, 1, 0)).astype(bool)
    # Slice-wise filling: the structure connects neighbours only within the axial plane.
    axial = int(np.argmax(np.abs(image.affine[2, :3])))
    structure = ndimage.generate_binary_structure(3, 1)
    structure[tuple(np.array([0, 2]) if a == axial else slice(None) for a in range(3))] = False
    mask = ndimage.binary_fill_holes(mask, structure)

    volume_ml = float(mask.sum() * np.prod(image.spacing) / 1000.0)
    noise_hu = _neighbour_noise(image.array, mask)
    advice = ("Check that this is a head CT perfusion in HU (brain 20–45 HU, air −1000, "
              "bone > 300; a rescale slope/intercept may be missing), adjust hu_window, or pass "
              "a brain mask (--mask).")
    if volume_ml < min_volume_ml:
        raise InputError(f"no brain found in the CTP: the {lo:g}–{hi:g} HU window gives only "
                         f"{volume_ml:.0f} ml of connected tissue (expected > "
                         f"{min_volume_ml:g} ml). {advice}")
    if max_volume_ml is not None and volume_ml > max_volume_ml:
        raise InputError(f"no brain found in the CTP: the {lo:g}–{hi:g} HU window selects "
                         f"{volume_ml:.0f} ml, more than any brain (> {max_volume_ml:g} ml) — "
                         f"the background is probably inside the window. {advice}")
    meta = {"source": ctp.meta.get("source"), "brain_mask": {
        "hu_window": [lo, hi], "reduce": reduce, "working_spacing": working_spacing,
        "opening_mm": opening_mm, "volume_ml": round(volume_ml, 1),
        "noise_hu": None if noise_hu is None else round(noise_hu, 1)}}
    if not image.same_grid(ctp):
        mask = _upsample_mask(mask, image.affine, ctp.affine, ctp.spatial_shape)
    return Volume(mask.astype(np.uint8, copy=False), ctp.affine, meta=meta)


def check_spacing(volume: Volume, name: str) -> Volume:
    """Refuse voxel sizes no head scan has (`SPACING_RANGE_MM`): a wrong unit in the affine."""
    lo, hi = SPACING_RANGE_MM
    spacing = volume.spacing
    if not all(lo <= s <= hi for s in spacing):
        size = " × ".join(f"{s:.4g}" for s in spacing)
        raise InputError(f"the {name}'s voxels measure {size} mm, impossible for a head scan (expected "
                         f"{lo:g}–{hi:g} mm per axis): its affine is probably in another unit (metres, "
                         "micrometres); fix the header's voxel size")
    return volume


def _neighbour_noise(image: np.ndarray, mask: np.ndarray) -> float | None:
    """Robust σ of the image's noise inside ``mask`` from differences of neighbouring voxels
    (MAD along the first axis, /√2): tissue is smooth there, noise is not."""
    both = mask[1:] & mask[:-1]
    if both.sum() < 100:
        return None
    d = (image[1:] - image[:-1])[both]
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2.0))


def brain_mask_notice(mask: Volume) -> str | None:
    """A warning when a brain mask is implausible for a head, naming the figure, else None.

    Implausible: a volume outside `BRAIN_ML_RANGE` (the minimum scaled down when the mask
    spans less than a whole brain's height, as a CTP slab does), or, for a mask derived from
    the CTP, a "tissue" as noisy as random numbers.
    """
    inside = np.asarray(mask.array) != 0
    ml = float(inside.sum() * np.prod(mask.spacing) / 1000.0)
    axial = int(np.argmax(np.abs(mask.affine[2, :3])))
    slices = np.flatnonzero(inside.any(axis=tuple(a for a in range(3) if a != axial)))
    height = (slices[-1] - slices[0] + 1) * mask.spacing[axial] if slices.size else 0.0
    low = BRAIN_ML_RANGE[0] * min(1.0, height / BRAIN_HEIGHT_MM)
    check = ("check that the input is a head CT perfusion in HU, or pass the right brain mask (--mask); "
             "the results are unreliable otherwise")
    if not low <= ml <= BRAIN_ML_RANGE[1]:
        return (f"implausible brain mask: {ml:.0f} ml over {height:.0f} mm (a head's brain is "
                f"{low:.0f}–{BRAIN_ML_RANGE[1]:.0f} ml over that height); {check}")
    noise = (mask.meta.get("brain_mask") or {}).get("noise_hu")
    if noise is not None and noise > NOISE_HU_LIMIT:
        return (f"implausible brain mask: the {ml:.0f} ml of \"brain\" found in the CTP vary by {noise:.0f} HU "
                f"from voxel to voxel (brain tissue: < {NOISE_HU_LIMIT:g} HU), as noise does; {check}")
    return None


def _upsample_mask(mask: np.ndarray, affine: np.ndarray, target_affine: np.ndarray,
                   target_shape: tuple[int, int, int]) -> np.ndarray:
    """A coarse mask on a fine grid with a smooth (not blocky) boundary, in uint8 throughout.

    Linear interpolation of the mask scaled to 0/200, cut at half, gives the smooth
    boundary; doing it in uint8 keeps a clinical-size result at 1 byte per voxel (a float
    detour cost 1.2 GB at 512 × 512 × 320).
    """
    geometry = set_sitk_geometry(sitk.Image([1, 1, 1], sitk.sitkUInt8), target_affine)
    coarse = frame_to_sitk(mask.astype(np.uint8) * np.uint8(200), affine)
    fine = sitk.Resample(coarse, [int(n) for n in target_shape], sitk.Transform(), sitk.sitkLinear,
                         geometry.GetOrigin(), geometry.GetSpacing(), geometry.GetDirection(), 0,
                         sitk.sitkUInt8)
    fine = sitk.BinaryThreshold(fine, 100, 255, 1, 0)
    return np.transpose(sitk.GetArrayFromImage(fine), (2, 1, 0))


def _ellipsoid(radius_voxels: np.ndarray) -> np.ndarray:
    """Structuring element: the voxels within an ellipsoid of the given radii (voxels)."""
    half = np.floor(radius_voxels).astype(int)
    axes = [np.arange(-h, h + 1) / max(r, 1e-9) for h, r in zip(half, radius_voxels)]
    grid = np.meshgrid(*axes, indexing="ij")
    return sum(g**2 for g in grid) <= 1.0


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
                  quantiles: tuple[float, float] = MRI_QUANTILES,
                  ) -> tuple[np.ndarray, tuple[float, float]]:
    """DWI or ADC → [−1, 1] per the contract, with the case's own brain quantiles.

    Returns
    -------
    normalised, (lo, hi)
        float32 array (zero outside the brain) and the intensity range that maps to
        [−1, 1]; `denormalise_mri` inverts it inside that range.
    """
    a = np.asarray(array, dtype=np.float32)
    m = _brain(mask, a.shape, "MRI")
    lo, hi = (float(q) for q in np.percentile(a[np.broadcast_to(m, a.shape)], quantiles))
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
    MRI that covers less than `MIN_MRI_COVERAGE` of the CTP's brain is refused either way
    (the overlap is recorded in ``case.json``). Warnings (frames resampled, an implausible
    brain mask, the overlap after registration) are listed under ``notices`` there.
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
    inside = _inside_field_of_view(ctp, grid, tx)
    mask_info["voxels_outside_ctp_fov_removed"] = int((mask_g.array.astype(bool) & ~inside).sum())
    mask_g = mask_g.with_array((mask_g.array.astype(bool) & inside).astype(np.uint8))
    if not mask_g.array.any():
        raise InputError("no brain voxel of the model grid lies inside the CTP's field of view; "
                         "check that CTP and MRI overlap (or use register)")
    if mri_ref is not None:
        mask_info["mri_coverage"] = _check_mri_coverage(ctp, mri_ref, next(iter(mri)).upper(), grid,
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


def _check_mri_coverage(ctp: Volume, mri: Volume, name: str, grid: tuple[np.ndarray, tuple[int, int, int]],
                        brain: np.ndarray, registered: bool, notices: list[str]) -> float:
    """Share of the model grid's brain inside the MRI's field of view; refuses one too small.

    Without registration an MRI that does not overlap the CTP (another patient, another
    session, world coordinates from another scanner) would be resampled to zeros and written
    as an all-black training target.
    """
    coverage = float((brain & _inside_field_of_view(mri, grid, None)).sum() / brain.sum())
    if coverage < MIN_MRI_COVERAGE:
        gap = float(np.linalg.norm(_fov_centre(ctp) - _fov_centre(mri)))
        fix = ("registration did not align them: check that both show the same head" if registered else
               "check that both show the same head, or pass --register rigid to align the CTP to the DWI")
        raise InputError(f"the {name} covers only {100 * coverage:.0f} % of the CTP's brain (their fields of "
                         f"view are centred {gap:.0f} mm apart; at least {100 * MIN_MRI_COVERAGE:.0f} % is "
                         f"needed): {fix}")
    if registered:
        notices.append(f"after registration the {name} covers {100 * coverage:.0f} % of the CTP's brain")
    return round(coverage, 4)


def _fov_centre(volume: Volume) -> np.ndarray:
    return (volume.affine @ np.append((np.asarray(volume.spatial_shape) - 1) / 2.0, 1.0))[:3]


def _inside_field_of_view(ctp: Volume, grid: tuple[np.ndarray, tuple[int, int, int]],
                          transform: sitk.Transform | None) -> np.ndarray:
    """Model-grid voxels whose centre falls inside the CTP volume."""
    affine, shape = grid
    to_ctp = np.linalg.inv(ctp.affine) @ transform_matrix(transform) @ affine
    ijk = np.indices(shape, dtype=np.float32).reshape(3, -1)
    idx = to_ctp[:3, :3].astype(np.float32) @ ijk + to_ctp[:3, 3:].astype(np.float32)
    limit = np.asarray(ctp.spatial_shape, dtype=np.float32)[:, None] - 0.5
    return np.all((idx >= -0.5) & (idx <= limit), axis=0).reshape(shape)
