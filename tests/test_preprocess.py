"""Brain mask, normalisation contract, temporal resampling and `preprocess_case` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ctp2mri.bench import BRAIN_LABELS, SCALP, SKULL, centred_affine, synthetic_ctp
from ctp2mri.casefolder import read_case
from ctp2mri.errors import Cancelled, InputError
from ctp2mri.io.nifti import save_nifti
from ctp2mri.io.volume import Volume
from ctp2mri.preprocessing.brain_mask import brain_mask_from_ctp
from ctp2mri.preprocessing.preprocess import (
    denormalise_mri,
    normalise_ctp,
    normalise_mri,
    preprocess_case,
    resample_frames,
)
from ctp2mri.profiles import get_profile
from ctp2mri.progress import CancelToken


@pytest.fixture(scope="module")
def head() -> Volume:
    # 240 × 240 × 192 mm field of view around an ellipsoidal head (brain ≈ 1315 ml).
    return synthetic_ctp(shape=(96, 96, 48), spacing=(2.5, 2.5, 4.0), frames=10, frame_interval=3.0)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


# brain mask ------------------------------------------------------------------------------
def test_mask_of_synthetic_head_is_the_brain(head):
    mask = brain_mask_from_ctp(head)
    brain = np.isin(head.meta["labels"], BRAIN_LABELS)
    assert mask.array.dtype == np.uint8 and mask.same_grid(head) and mask.array.ndim == 3
    assert _dice(mask.array, brain) > 0.97
    # the ventricle (5 HU, outside the window) is filled, skull and scalp are not included
    assert abs(int(mask.array.sum()) - int(brain.sum())) < 0.03 * brain.sum()
    assert not mask.array[np.isin(head.meta["labels"], (SCALP, SKULL))].any()
    assert abs(mask.meta["brain_mask"]["volume_ml"] - 1315) < 0.05 * 1315


def test_mask_on_clinical_resolution_is_computed_coarse_and_returned_fine():
    # 0.94 mm in-plane: the mask is built on a ~2 mm working grid and brought back.
    fine = synthetic_ctp(shape=(240, 240, 40), spacing=(0.94, 0.94, 4.0), frames=4)
    mask = brain_mask_from_ctp(fine)
    brain = np.isin(fine.meta["labels"], BRAIN_LABELS)
    assert mask.same_grid(fine)
    assert _dice(mask.array, brain) > 0.97


def test_mask_on_skull_stripped_phantom_like_background():
    # Phantom-like: brain ~30–40 HU on a 0 HU background with noise, no skull.
    shape, spacing = (96, 112, 30), (2.0, 2.0, 5.0)
    affine = centred_affine(shape, spacing)
    x, y, z = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)], indexing="ij")
    r = np.sqrt((x / 65) ** 2 + (y / 80) ** 2 + (z / 55) ** 2)
    base = np.where(r < 1, np.where(r < 0.7, 29.0, 38.0), 0.0)
    rng = np.random.default_rng(3)
    frames = np.stack([base + rng.normal(0, 12, shape) for _ in range(15)], axis=-1)
    mask = brain_mask_from_ctp(Volume(frames.astype(np.float32), affine, frame_times=np.arange(15.0)))
    assert _dice(mask.array, r < 1) > 0.97


def test_mask_on_the_digital_phantom():
    from ctp2mri.phantom import generate_case

    case = generate_case(seed=1, profile="demo")  # skull-stripped: exactly 0 HU outside the brain
    mask = brain_mask_from_ctp(case.ctp)
    assert _dice(mask.array, case.mask.array) > 0.97


def test_no_brain_is_a_clear_error(head):
    air = head.with_array(np.full(head.array.shape, -1000, np.int16))
    with pytest.raises(InputError, match="no brain found"):
        brain_mask_from_ctp(air)
    # everything inside the window: the background would be "brain"
    flat = head.with_array(np.full(head.array.shape, 35, np.int16))
    with pytest.raises(InputError, match="background is probably inside"):
        brain_mask_from_ctp(flat)


# normalisation contract ------------------------------------------------------------------
def test_normalise_ctp_contract():
    hu = np.array([[-1000.0, 0.0], [100.0, 200.0], [3000.0, 50.0]])[:, :, None]  # 3 × 2 × 1
    mask = np.array([[1, 1], [1, 1], [1, 0]])
    out = normalise_ctp(hu, mask)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[..., 0], [[-1, -1], [0, 1], [1, 0]])
    # a 4-D series broadcasts the 3-D mask over time
    series = np.stack([hu[..., 0]] * 3, axis=-1)[:, :, None, :]
    out4 = normalise_ctp(series, mask[:, :, None])
    assert out4.shape == series.shape and out4.min() >= -1 and out4.max() <= 1
    assert (out4[2, 1] == 0).all()


def test_normalise_mri_quantiles_and_inverse():
    rng = np.random.default_rng(0)
    image = rng.lognormal(6.5, 0.4, size=(20, 20, 10)).astype(np.float32)
    mask = np.zeros(image.shape, bool)
    mask[2:18, 3:17, 1:9] = True
    out, (lo, hi) = normalise_mri(image, mask)
    inside = image[mask]
    assert lo == pytest.approx(np.percentile(inside, 0.5)) and hi == pytest.approx(np.percentile(inside, 99.5))
    assert out.min() >= -1 and out.max() <= 1 and (out[~mask] == 0).all()
    # ~0.5 % of brain voxels at each end are clipped to exactly ±1
    assert 0.002 < np.mean(out[mask] == -1) < 0.01 and 0.002 < np.mean(out[mask] == 1) < 0.01
    back = denormalise_mri(out, lo, hi, mask)
    np.testing.assert_allclose(back[mask], np.clip(inside, lo, hi), rtol=1e-5)
    assert (back[~mask] == 0).all()


def test_normalise_mri_anchored_on_the_brain_median():
    """hi_median: the upper bound is a multiple of the brain median (DWI), so the median voxel
    lands where it does in any case, however bright the tail above it."""
    rng = np.random.default_rng(1)
    image = rng.lognormal(5.0, 0.1, size=(20, 20, 10)).astype(np.float32)
    mask = np.zeros(image.shape, bool)
    mask[2:18, 3:17, 1:9] = True
    bright = image.copy()
    bright[4:12, 4:12, 2:6] *= 1.5  # a large bright lesion moves the 99.5 % quantile, not the anchor
    levels = []
    for img in (image, bright):
        out, (lo, hi) = normalise_mri(img, mask, hi_median=1.6)
        inside = img[mask]
        assert lo == pytest.approx(np.percentile(inside, 0.5)) and hi == pytest.approx(1.6 * np.median(inside))
        levels.append(float(np.median(out[mask])))
        np.testing.assert_allclose(denormalise_mri(out, lo, hi, mask)[mask], np.clip(inside, lo, hi), rtol=1e-5)
    assert levels[0] == pytest.approx(levels[1], abs=0.02)
    quantile_levels = [float(np.median(normalise_mri(img, mask)[0][mask])) for img in (image, bright)]
    assert abs(quantile_levels[0] - quantile_levels[1]) > 0.2  # what the anchor is for
    with pytest.raises(InputError, match="constant"):
        normalise_mri(np.full((4, 4, 4), 0.0, np.float32), np.ones((4, 4, 4)), hi_median=1.6)


@pytest.mark.parametrize("bad_mask, match", [(np.zeros((4, 4, 4)), "empty"), (np.ones((4, 4, 3)), "does not fit")])
def test_normalisation_refuses_bad_masks(bad_mask, match):
    image = np.arange(64, dtype=np.float32).reshape(4, 4, 4)
    with pytest.raises(InputError, match=match):
        normalise_ctp(image, bad_mask)
    with pytest.raises(InputError, match=match):
        normalise_mri(image, bad_mask)


def test_normalise_mri_refuses_constant_image():
    with pytest.raises(InputError, match="constant"):
        normalise_mri(np.full((4, 4, 4), 7.0), np.ones((4, 4, 4)))


# temporal resampling ---------------------------------------------------------------------
def test_resample_frames_is_exact_on_linear_in_time_data():
    rng = np.random.default_rng(1)
    a, b = rng.normal(30, 10, (5, 6, 4)), rng.normal(0, 3, (5, 6, 4))
    times = np.cumsum(np.r_[0.0, rng.uniform(1.0, 3.0, 19)])  # 20 irregular frames
    series = Volume((a[..., None] + b[..., None] * times).astype(np.float32), np.eye(4), frame_times=times)
    out = resample_frames(series, 15)
    expected_t = np.linspace(times[0], times[-1], 15)
    np.testing.assert_allclose(out.frame_times, expected_t)
    np.testing.assert_allclose(out.array, a[..., None] + b[..., None] * expected_t, atol=1e-3)
    assert out.array.dtype == np.float32 and out.n_frames == 15


def test_resample_frames_identity_and_explicit_times(head):
    same = resample_frames(head, head.n_frames)
    assert same.array is head.array
    half = resample_frames(head, times=[1.5, 4.5])  # midway between frames 0/1 and 1/2
    expected = (head.array[..., 0:2].astype(np.float32) + head.array[..., 1:3]) / 2
    np.testing.assert_allclose(half.array, expected, atol=1e-4)


def test_resample_frames_refuses_one_frame_and_extrapolation(head):
    single = Volume(head.array[..., :1], head.affine, frame_times=[0.0])
    with pytest.raises(InputError, match="single time point"):
        resample_frames(single)
    with pytest.raises(InputError, match="outside the acquisition window"):
        resample_frames(head, times=[0.0, 100.0])


# preprocess_case -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def case_files(tmp_path_factory, head):
    """A CTP file (10 frames every 3 s) and MRI on its own finer, LPS-stored grid."""
    folder = tmp_path_factory.mktemp("raw")
    save_nifti(head, folder / "ctp.nii.gz")
    # MRI grid: 1.8 mm, LPS voxel order, same world (no registration needed).
    shape = (120, 130, 40)
    affine = np.diag([-1.8, -1.8, 4.5, 1.0])
    affine[:3, 3] = [1.8 * 59.5, 1.8 * 64.5, -4.5 * 19.5]
    ijk = np.indices(shape).reshape(3, -1)
    xyz = (affine[:3, :3] @ ijk + affine[:3, 3:]).reshape((3,) + shape)
    r = np.sqrt((xyz[0] / 66) ** 2 + (xyz[1] / 82) ** 2 + (xyz[2] / 58) ** 2)
    dwi = np.where(r < 1, 600.0, 0.0).astype(np.float32)
    lesion = (xyz[0] - 30) ** 2 + (xyz[1] - 10) ** 2 + (xyz[2] - 5) ** 2 < 15**2
    save_nifti(Volume(dwi + 400.0 * lesion, affine), folder / "dwi.nii.gz")
    save_nifti(Volume(np.where(r < 1, 800.0 - 300.0 * lesion, 0.0).astype(np.float32), affine),
               folder / "adc.nii.gz")
    save_nifti(Volume(lesion.astype(np.uint8), affine), folder / "lesion.nii.gz")
    return folder


def test_preprocess_case_writes_a_valid_case_folder(case_files, tmp_path):
    steps = []
    out = preprocess_case(case_files / "ctp.nii.gz", tmp_path / "case", profile="demo",
                          dwi=case_files / "dwi.nii.gz", adc=case_files / "adc.nii.gz",
                          lesion=case_files / "lesion.nii.gz",
                          progress=lambda step, total, info: steps.append((step, total)))
    case = read_case(out, require=("ctp", "dwi", "adc", "lesion", "mask"))
    demo = get_profile("demo")
    assert case.ctp.spatial_shape[:2] == demo.shape_xy and case.ctp.n_frames == 15
    np.testing.assert_allclose(case.ctp.spacing, demo.spacing)
    assert case.ctp.orientation == "RAS" and case.ctp.array.dtype == np.int16
    np.testing.assert_allclose(case.ctp.frame_times, np.linspace(0, 27, 15), atol=1e-3)
    # raw HU kept: brain is 30–65 HU, the grid edge outside the head is air
    brain = case.mask.array.astype(bool)
    assert 25 < np.median(case.ctp.array[brain]) < 70 and case.ctp.array[0, 0, 0, 0] < -900
    # brain volume preserved (1315 ml ellipsoid; the grid cuts nothing)
    assert abs(brain.sum() * np.prod(demo.spacing) / 1000 - 1315) < 0.05 * 1315
    # the lesion stays where it was in world coordinates (centre (30, 10, 5) mm)
    idx = np.argwhere(case.lesion.array > 0).mean(axis=0)
    np.testing.assert_allclose((case.lesion.affine @ np.append(idx, 1))[:3], [30, 10, 5], atol=1.5)
    assert case.adc.array[case.lesion.array > 0].mean() < 600 < case.adc.array[brain & (case.lesion.array == 0)].mean()
    info = json.loads((out / "case.json").read_text())["preprocess"]
    assert info["profile"] == "demo" and info["mask"]["origin"] == "derived from the CTP"
    assert info["original"]["ctp"]["shape"] == [96, 96, 48, 10] and info["original"]["dwi"]["orientation"] == "LPS"
    assert info["temporal"]["n_frames_in"] == 10 and info["sources"]["ctp"].endswith("ctp.nii.gz")
    assert steps[-1][0] == steps[-1][1] and all(a[0] <= b[0] for a, b in zip(steps, steps[1:]))


def test_preprocess_case_on_the_model_grid_is_exact(tmp_path):
    # A case already on the demo grid (like a phantom case) passes through unchanged.
    demo = get_profile("demo")
    ctp = synthetic_ctp(shape=(*demo.shape_xy, 30), spacing=demo.spacing, frames=15, frame_interval=2.0)
    save_nifti(ctp, tmp_path / "ctp.nii.gz")
    mask = Volume(np.isin(ctp.meta["labels"], BRAIN_LABELS).astype(np.uint8), ctp.affine)
    save_nifti(mask, tmp_path / "mask.nii.gz")
    case = read_case(preprocess_case(tmp_path / "ctp.nii.gz", tmp_path / "case", mask=tmp_path / "mask.nii.gz"))
    brain_slices = np.flatnonzero(mask.array.any(axis=(0, 1)))
    k0 = brain_slices[0]
    assert case.ctp.spatial_shape == (*demo.shape_xy, brain_slices.size)
    np.testing.assert_array_equal(case.ctp.array, ctp.array[:, :, k0:k0 + brain_slices.size])
    np.testing.assert_array_equal(case.mask.array, mask.array[:, :, k0:k0 + brain_slices.size])
    assert case.info["preprocess"]["mask"]["origin"] == "given (ctp grid)"


def _no_leftovers(folder):
    return [p.name for p in folder.iterdir() if ".partial" in p.name or p.name == "case"]


def test_preprocess_case_bad_inputs(tmp_path, head):
    save_nifti(head.with_array(head.array[..., 0]), tmp_path / "ctp3d.nii.gz")
    with pytest.raises(InputError, match="4 \\(x, y, z, time\\)"):
        preprocess_case(tmp_path / "ctp3d.nii.gz", tmp_path / "case")
    nan = head.array.astype(np.float32)
    nan[40, 40, 20, 3] = np.nan
    save_nifti(head.with_array(nan), tmp_path / "nan.nii.gz")
    with pytest.raises(InputError, match="NaN"):
        preprocess_case(tmp_path / "nan.nii.gz", tmp_path / "case")
    save_nifti(Volume(head.array[..., :1], head.affine), tmp_path / "one.nii.gz")
    with pytest.raises(InputError, match="only 1 time point"):
        preprocess_case(tmp_path / "one.nii.gz", tmp_path / "case")
    save_nifti(head, tmp_path / "ctp.nii.gz")
    save_nifti(Volume(np.ones((50, 50, 20), np.uint8), np.eye(4)), tmp_path / "badgrid.nii.gz")
    with pytest.raises(InputError, match="different grids"):
        preprocess_case(tmp_path / "ctp.nii.gz", tmp_path / "case", mask=tmp_path / "badgrid.nii.gz")
    save_nifti(Volume(np.zeros(head.spatial_shape, np.uint8), head.affine), tmp_path / "empty.nii.gz")
    with pytest.raises(InputError, match="empty"):
        preprocess_case(tmp_path / "ctp.nii.gz", tmp_path / "case", mask=tmp_path / "empty.nii.gz")
    with pytest.raises(InputError, match="needs a DWI"):
        preprocess_case(tmp_path / "ctp.nii.gz", tmp_path / "case", register=True)
    assert _no_leftovers(tmp_path) == []


def test_preprocess_case_refuses_unusable_output_and_writes_nothing(tmp_path, head):
    save_nifti(head, tmp_path / "ctp.nii.gz")
    (tmp_path / "file").write_text("a regular file")
    with pytest.raises(InputError, match="not a writable folder"):
        preprocess_case(tmp_path / "ctp.nii.gz", tmp_path / "file" / "case")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("user data")
    with pytest.raises(InputError, match="overwrite"):
        preprocess_case(tmp_path / "ctp.nii.gz", tmp_path / "full")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        preprocess_case(tmp_path / "ctp.nii.gz", tmp_path / "case", cancel=token)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ctp.nii.gz", "file", "full"]
