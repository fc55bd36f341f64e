"""Model grid and spatial resampling: geometric facts, 4-D streaming, labels, anti-aliasing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ctp2mri.errors import Cancelled, InputError
from ctp2mri.io import load_volume
from ctp2mri.io.nifti import save_nifti
from ctp2mri.io.volume import Volume
from ctp2mri.preprocessing.preprocess import model_grid, resample_like, resample_to_grid, to_profile
from ctp2mri.profiles import get_profile
from ctp2mri.progress import CancelToken
from ctp2mri.preprocessing.resample import _FrameReader, temporal_reduce


def _rotation(degrees_z: float, degrees_x: float) -> np.ndarray:
    a, b = np.deg2rad(degrees_z), np.deg2rad(degrees_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def _grid(rotation: np.ndarray, spacing, centre, shape) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = np.asarray(centre) - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return affine


def _world(affine: np.ndarray, shape) -> np.ndarray:
    ijk = np.indices(shape).reshape(3, -1)
    return (affine[:3, :3] @ ijk + affine[:3, 3:]).reshape((3,) + tuple(shape))


# an LPS-stored input, 1 × 1.2 × 2 mm
IN_SHAPE = (90, 80, 50)
IN_AFFINE = _grid(np.diag([-1.0, -1.0, 1.0]), (1.0, 1.2, 2.0), (3.0, -4.0, 2.0), IN_SHAPE)


def test_linear_ramp_is_reproduced_on_an_oblique_grid():
    x, y, z = _world(IN_AFFINE, IN_SHAPE)
    ramp = Volume((2.0 * x - 3.0 * y + 0.5 * z + 7.0).astype(np.float32), IN_AFFINE)
    out_shape = (20, 18, 10)
    out_affine = _grid(_rotation(25, 10), (2.0, 2.5, 3.0), (5.0, -2.0, 4.0), out_shape)
    out = resample_to_grid(ramp, out_affine, out_shape)  # downsampling: block mean + blur
    ox, oy, oz = _world(out_affine, out_shape)
    # symmetric anti-aliasing kernels keep a linear function exactly
    np.testing.assert_allclose(out.array, 2.0 * ox - 3.0 * oy + 0.5 * oz + 7.0, atol=1e-3)
    assert out.array.dtype == np.float32 and np.allclose(out.affine, out_affine)


def _ball(affine, shape, centre, radius) -> np.ndarray:
    x, y, z = _world(affine, shape)
    d = np.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2)
    return np.clip(radius + 0.5 - d, 0.0, 1.0).astype(np.float32)  # anti-aliased edge


def _centroid_mm(volume: Volume) -> np.ndarray:
    weights = volume.array.astype(np.float64)
    idx = np.array([(weights * g).sum() for g in np.indices(volume.spatial_shape)]) / weights.sum()
    return (volume.affine @ np.append(idx, 1))[:3]


def test_ball_centre_and_volume_stay_put_under_oblique_downsampling():
    centre = (12.0, -7.0, 5.0)
    ball = Volume(_ball(IN_AFFINE, IN_SHAPE, centre, 14.0), IN_AFFINE)
    out_shape = (24, 24, 12)
    out_affine = _grid(_rotation(30, -12), (2.0, 2.0, 5.0), (8.0, -5.0, 3.0), out_shape)
    out = resample_to_grid(ball, out_affine, out_shape)
    np.testing.assert_allclose(_centroid_mm(out), centre, atol=0.3)
    volume_in = ball.array.sum() * np.prod(ball.spacing)
    assert out.array.sum() * np.prod(out.spacing) == pytest.approx(volume_in, rel=0.02)


def test_every_frame_of_a_4d_series_is_resampled():
    ball = _ball(IN_AFFINE, IN_SHAPE, (0.0, 0.0, 0.0), 12.0)
    series = Volume(ball[..., None] * np.arange(1, 6, dtype=np.float32), IN_AFFINE, frame_times=np.arange(5) * 2.0)
    affine, shape = model_grid(series, "demo")
    seen = []
    out = resample_to_grid(series, affine, shape, progress=lambda s, t, info: seen.append((s, t)))
    assert out.array.shape == shape + (5,) and seen == [(k, 5) for k in range(1, 6)]
    np.testing.assert_allclose(out.frame_times, series.frame_times)
    for k in range(5):
        np.testing.assert_allclose(out.array[..., k], (k + 1) * out.array[..., 0], rtol=1e-5, atol=1e-6)
    assert out.array[..., 0].max() > 0.9


def test_nearest_keeps_labels_and_type():
    labels = np.zeros(IN_SHAPE, np.uint8)
    labels[10:40, 10:50, 5:30] = 3
    labels[50:80, 20:60, 10:40] = 7
    out = resample_to_grid(Volume(labels, IN_AFFINE), *model_grid(Volume(labels, IN_AFFINE), "demo"), "nearest")
    assert out.array.dtype == np.uint8 and set(np.unique(out.array)) == {0, 3, 7}


def test_resample_like_round_trip_recovers_a_smooth_image():
    x, y, z = _world(IN_AFFINE, IN_SHAPE)
    smooth = Volume((100 + 20 * np.sin(x / 15.0) * np.cos(y / 20.0) + z / 4).astype(np.float32), IN_AFFINE)
    coarse = to_profile(smooth, "demo")
    assert coarse.spatial_shape[:2] == get_profile("demo").shape_xy
    back = resample_like(coarse, smooth)
    assert back.same_grid(smooth)
    inner = (slice(10, -10), slice(10, -10), slice(5, -5))
    assert np.abs(back.array[inner] - smooth.array[inner]).mean() < 0.5  # of a ±20 signal


def test_model_grid_centres_on_the_brain_and_covers_its_extent():
    mask = np.zeros(IN_SHAPE, np.uint8)
    mask[20:70, 15:60, 10:35] = 1  # box: 50 × 54 × 50 mm
    vol = Volume(mask, IN_AFFINE)
    affine, shape = model_grid(vol, "paper", vol)
    assert shape[:2] == get_profile("paper").shape_xy
    np.testing.assert_allclose(np.diag(affine)[:3], get_profile("paper").spacing)
    centre = (affine @ np.append((np.asarray(shape) - 1) / 2, 1))[:3]
    np.testing.assert_allclose(centre, _centroid_mm(vol), atol=1e-6)
    assert shape[2] * 5.0 >= 50.0 > (shape[2] - 1) * 5.0  # whole slices over the 50 mm extent
    with pytest.raises(InputError, match="empty"):
        model_grid(vol, "paper", vol.with_array(np.zeros_like(mask)))


def test_memory_mapped_series_streams_to_the_same_result(tmp_path):
    ball = _ball(IN_AFFINE, IN_SHAPE, (5.0, 0.0, 0.0), 15.0) * 100
    series = Volume((ball[..., None] + np.arange(3)).astype(np.int16), IN_AFFINE, frame_times=[0.0, 1.0, 2.0])
    save_nifti(series, tmp_path / "ctp.nii")  # uncompressed: nibabel memory-maps it
    mapped = load_volume(tmp_path / "ctp.nii")
    assert isinstance(mapped.array.base, np.memmap)
    grid = model_grid(series, "demo")
    # equal up to the float32 rounding of the affine in the NIfTI header
    np.testing.assert_allclose(resample_to_grid(mapped, *grid).array, resample_to_grid(series, *grid).array,
                               atol=1e-4)


def _rss_file_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_frames_read_from_a_memory_map_do_not_stay_resident(tmp_path):
    """A clinical series read frame by frame must not end up wholly in this process's RSS."""
    frames = np.arange(8, dtype=np.int16)
    series = Volume(np.ones((128, 128, 64, 1), np.int16) * frames, IN_AFFINE, frame_times=frames.astype(float))
    save_nifti(series, tmp_path / "ctp.nii")  # 16 MiB, memory-mapped when loaded
    mapped = load_volume(tmp_path / "ctp.nii")
    read = _FrameReader(mapped)
    before = _rss_file_kib()
    for t in range(8):
        assert np.all(read(t) == t)
    assert _rss_file_kib() - before < 4 * 1024  # one 2 MiB frame at a time, not 16 MiB
    for t in (3, 0):  # released pages read back from the file
        assert np.all(read(t) == t)


def test_cancel_is_checked_between_frames():
    series = Volume(np.zeros((20, 20, 10, 4), np.float32), np.eye(4), frame_times=np.arange(4.0))
    token = CancelToken()
    seen = []

    def progress(step, total, info):
        seen.append(step)
        token.cancel()

    with pytest.raises(Cancelled):
        resample_to_grid(series, np.diag([2.0, 2, 2, 1]), (10, 10, 5), progress=progress, cancel=token)
    assert seen == [1]


def test_antialiasing_removes_a_pattern_finer_than_the_target_grid():
    # stripes with a 2 mm period on a 1 mm grid, resampled to 4 mm: pure aliasing without a prefilter
    shape = (64, 64, 8)
    stripes = Volume(np.broadcast_to((np.arange(64) % 2 * 100.0)[:, None, None], shape).astype(np.float32),
                     np.eye(4))
    out_affine = np.diag([4.0, 4.0, 1.0, 1.0])
    out_affine[:3, 3] = [2.0, 2.0, 0.0]
    smooth = resample_to_grid(stripes, out_affine, (15, 15, 8))
    aliased = resample_to_grid(stripes, out_affine, (15, 15, 8), antialias=False)
    assert np.abs(smooth.array - 50.0).max() < 1.0  # the mean, as it should be
    assert np.abs(aliased.array - 50.0).max() > 40.0


def test_temporal_reduce_matches_numpy():
    rng = np.random.default_rng(0)
    series = Volume(rng.normal(30, 10, (12, 10, 6, 5)).astype(np.float32), np.diag([0.5, 0.5, 1.0, 1.0]))
    np.testing.assert_allclose(temporal_reduce(series, "mean").array, series.array.mean(-1), rtol=1e-5)
    np.testing.assert_array_equal(temporal_reduce(series, "min").array, series.array.min(-1))
    coarse = temporal_reduce(series, "mean", spacing=1.0)  # 2 × 2 × 1 blocks
    expected = series.array.mean(-1).reshape(6, 2, 5, 2, 6).mean(axis=(1, 3))
    np.testing.assert_allclose(coarse.array, expected, rtol=1e-5)
    # block centres: voxel (0, 0, 0) of the coarse grid sits between input voxels 0 and 1
    np.testing.assert_allclose(coarse.affine[:3, 3], [0.25, 0.25, 0.0])


def test_bad_grid_arguments():
    vol = Volume(np.zeros((4, 4, 4), np.float32), np.eye(4))
    with pytest.raises(InputError, match="interpolation"):
        resample_to_grid(vol, np.eye(4), (4, 4, 4), interpolation="cubic")
    with pytest.raises(InputError, match="unknown profile"):
        model_grid(vol, "huge")
