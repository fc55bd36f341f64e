"""CTP → DWI registration for training pairs (Mattes mutual information, SimpleITK).

CT and MR come from different scanners, so their world coordinates need not agree. The
temporal mean of the CTP (contrast and noise averaged out) is registered to the DWI (b0 or
b1000, 3-D) and the one transform is then applied to every CTP frame. The transform maps
DWI (fixed) points to CTP (moving) points, SimpleITK's convention, which is what
resampling the CTP onto the DWI grid needs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import SimpleITK as sitk

from ctp2mri.errors import Cancelled, InputError
from ctp2mri.io.itk import frame_to_sitk
from ctp2mri.io.volume import Volume
from ctp2mri.preprocessing.brain_mask import brain_mask_from_ctp
from ctp2mri.preprocessing.resample import resample_like, resample_to_grid, temporal_reduce, transform_matrix
from ctp2mri.progress import CancelToken, ProgressCallback

TRANSFORMS = ("rigid", "affine")
REGIONS = ("head", "brain")
_INITIALISERS = {
    "moments": sitk.CenteredTransformInitializerFilter.MOMENTS,
    "geometry": sitk.CenteredTransformInitializerFilter.GEOMETRY,
}


def _run(fixed: sitk.Image, moving: sitk.Image, initial: sitk.Transform, *,
         shrink: tuple[int, ...], sigmas_mm: tuple[float, ...], iterations: int, sampling: float,
         seed: int, report, cancel: CancelToken | None) -> tuple[sitk.Transform, dict[str, Any]]:
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    # SimpleITK reads seed 0 as "seed from the wall clock": shifted by one, every run seed
    # (0 included, the default) gives the same voxel sample, so the same fit, on every run
    reg.SetMetricSamplingPercentage(sampling, seed + 1)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3,
                                                 numberOfIterations=iterations,
                                                 relaxationFactor=0.6,
                                                 gradientMagnitudeTolerance=1e-8)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(shrink))
    reg.SetSmoothingSigmasPerLevel(list(sigmas_mm))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(initial, inPlace=False)

    def on_iteration() -> None:
        if cancel is not None and cancel.cancelled:
            reg.StopRegistration()
        report(reg.GetCurrentLevel(), reg.GetOptimizerIteration(), reg.GetMetricValue())

    reg.AddCommand(sitk.sitkIterationEvent, on_iteration)
    result = reg.Execute(fixed, moving)
    if cancel is not None and cancel.cancelled:
        raise Cancelled("registration cancelled by the user")
    return result, {"metric": float(reg.GetMetricValue()),
                    "stop": reg.GetOptimizerStopConditionDescription()}


def _as_matrix_transform(transform: sitk.Transform) -> sitk.Transform:
    """Unwrap the composite that ImageRegistrationMethod returns into a plain rigid/affine."""
    if transform.GetName() == "CompositeTransform":
        composite = sitk.CompositeTransform(transform)
        if composite.GetNumberOfTransforms() == 1:
            transform = composite.GetNthTransform(0)
    kinds = {"Euler3DTransform": sitk.Euler3DTransform, "AffineTransform": sitk.AffineTransform}
    return kinds[transform.GetName()](transform) if transform.GetName() in kinds else transform


def estimate_ctp_to_dwi(ctp: Volume, dwi: Volume, transform: str = "rigid",
                        region: str = "head", ctp_mask: Volume | None = None,
                        dwi_mask: Volume | None = None, initial: str = "moments",
                        working_spacing: float = 1.5,
                        shrink_factors: tuple[int, ...] = (4, 2, 1),
                        smoothing_mm: tuple[float, ...] = (4.0, 2.0, 0.0), iterations: int = 200,
                        sampling: float = 0.25, seed: int = 0,
                        progress: ProgressCallback | None = None,
                        cancel: CancelToken | None = None) -> tuple[sitk.Transform, dict[str, Any]]:
    """Estimate the DWI → CTP transform (see `register_to_dwi`), without resampling.

    ``region="head"`` registers the whole temporal-mean CTP to the whole DWI; ``"brain"``
    zeroes both outside brain masks first (``ctp_mask``, derived from the CTP when not
    given, and ``dwi_mask`` if given). On synthetic heads with a known 5.9 mm / 4.7°
    misalignment the mean error over brain voxels was 0.28 mm (head) vs 0.48 mm (brain)
    for rigid, and 0.7 mm vs 23 mm for affine: with a brain-only CTP the affine fit shrinks
    the brain onto the DWI's whole head (scale 0.58), so "head" is the default.

    Returns
    -------
    transform, info
        A ``sitk.Euler3DTransform`` (rigid) or ``sitk.AffineTransform`` and a JSON-ready
        description (type, parameters, RAS matrix, final metric, stop condition).
    """
    if transform not in TRANSFORMS:
        raise InputError(f"unknown transform {transform!r}; choose one of {TRANSFORMS}")
    if initial not in _INITIALISERS:
        raise InputError(f"unknown initialisation {initial!r}; choose one of "
                         f"{sorted(_INITIALISERS)}")
    ctp.require_4d("CTP").require_finite("CTP")
    dwi.require_3d("DWI").require_finite("DWI")
    if len(shrink_factors) != len(smoothing_mm):
        raise InputError("give one smoothing value per shrink factor (one per resolution level)")
    if region not in REGIONS:
        raise InputError(f"unknown region {region!r}; choose one of {REGIONS}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32 - 1:
        raise InputError(f"the registration seed must be a whole number from 0 to {2**32 - 2}, got {seed!r}")
    mean = temporal_reduce(ctp, "mean", working_spacing, cancel=cancel)
    moving_array = mean.array
    fixed_array = np.asarray(dwi.array, dtype=np.float32)
    if region == "brain":
        if ctp_mask is None:
            ctp_mask = brain_mask_from_ctp(mean, working_spacing=working_spacing, cancel=cancel)
        else:
            ctp_mask.require_3d("CTP brain mask").require_same_grid(ctp, "CTP brain mask", "CTP")
        inside = resample_like(ctp_mask, mean, "nearest").array != 0
        if not inside.any():
            raise InputError("the CTP brain mask is empty; registration needs the brain to align")
        moving_array = np.where(inside, moving_array, 0.0)
        if dwi_mask is not None:
            dwi_mask.require_3d("DWI brain mask").require_same_grid(dwi, "DWI brain mask", "DWI")
            fixed_array = np.where(np.asarray(dwi_mask.array) != 0, fixed_array, 0.0)
    moving = frame_to_sitk(moving_array.astype(np.float32), mean.affine)
    fixed = frame_to_sitk(fixed_array.astype(np.float32), dwi.affine)

    stages = ["rigid"] + (["affine"] if transform == "affine" else [])
    total = iterations * len(shrink_factors) * len(stages)
    done = 0
    info: dict[str, Any] = {}
    current = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                                _INITIALISERS[initial])
    for name in stages:
        if name == "affine":
            rigid = current
            current = sitk.AffineTransform(3)
            current.SetCenter(rigid.GetCenter())
            current.SetMatrix(rigid.GetMatrix())
            current.SetTranslation(rigid.GetTranslation())

        def report(level: int, iteration: int, metric: float, _stage=name) -> None:
            if progress is not None:
                step = min(total, done + level * iterations + iteration)
                progress(step, total, {"stage": f"register ({_stage})", "level": level,
                                       "metric": round(metric, 4)})

        result, stage_info = _run(fixed, moving, current, shrink=shrink_factors,
                                  sigmas_mm=smoothing_mm, iterations=iterations,
                                  sampling=sampling, seed=seed, report=report, cancel=cancel)
        current = _as_matrix_transform(result)
        info[name] = stage_info
        done += iterations * len(shrink_factors)
    info.update(transform_to_dict(current))
    return current, info


def transform_to_dict(transform: sitk.Transform) -> dict[str, Any]:
    """JSON-ready description of an affine-type transform (for case.json)."""
    return {
        "type": transform.GetName(),
        "parameters": [float(p) for p in transform.GetParameters()],
        "fixed_parameters": [float(p) for p in transform.GetFixedParameters()],
        "matrix_ras_dwi_to_ctp": transform_matrix(transform).round(6).tolist(),
        "convention": "maps DWI (fixed) RAS mm to CTP (moving) RAS mm",
    }


def register_to_dwi(ctp: Volume, dwi: Volume, transform: str = "rigid", region: str = "head",
                    ctp_mask: Volume | None = None, dwi_mask: Volume | None = None,
                    default: float = -1024.0,
                    progress: ProgressCallback | None = None, cancel: CancelToken | None = None,
                    **options: Any) -> tuple[Volume, sitk.Transform]:
    """Register a 4-D CTP to a DWI and resample every frame onto the DWI grid.

    Parameters
    ----------
    ctp
        4-D CT perfusion (HU).
    dwi
        3-D DWI (b0 or b1000) defining the MRI space (the fixed image).
    transform
        ``"rigid"`` (6 parameters) or ``"affine"`` (a rigid stage, then 12 parameters).
    region
        ``"head"`` (whole images, default) or ``"brain"`` (both zeroed outside brain
        masks); see `estimate_ctp_to_dwi` for the measured difference.
    ctp_mask, dwi_mask
        Brain masks on the CTP / DWI grids for ``region="brain"``; the CTP mask is derived
        with `brain_mask_from_ctp` when not given.
    default
        HU written where the DWI grid lies outside the CTP (air).
    **options
        Passed to `estimate_ctp_to_dwi` (initial, working_spacing, shrink_factors,
        smoothing_mm, iterations, sampling, seed).

    Returns
    -------
    ctp_on_dwi_grid, transform
        The CTP on the DWI grid (float32 HU, frame times kept; ``meta["registration"]``
        describes the fit) and the DWI → CTP transform.
    """
    tx, info = estimate_ctp_to_dwi(ctp, dwi, transform, region, ctp_mask, dwi_mask,
                                   progress=progress, cancel=cancel, **options)
    moved = resample_to_grid(ctp, dwi.affine, dwi.spatial_shape, "linear", default, transform=tx,
                             cancel=cancel)
    moved.meta["registration"] = info
    return moved, tx
