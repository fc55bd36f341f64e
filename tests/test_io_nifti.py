"""NIfTI I/O: exact geometry in every orientation, frame times, and clear errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from _helpers_io import ORIENTATIONS, ctp_volume, make_affine, volume_3d, world

from ctp2mri.errors import InputError
from ctp2mri.io import load_volume, save_volume
from ctp2mri.io.nifti import load_nifti, save_nifti
from ctp2mri.io.volume import Volume


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("kind", ORIENTATIONS)
def test_3d_round_trip_keeps_array_and_affine_exactly(tmp_path, kind, suffix):
    vol = volume_3d(kind)
    path = save_nifti(vol, tmp_path / f"img{suffix}")
    back = load_nifti(path)
    assert back.array.dtype == np.int16
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_array_equal(back.affine, vol.affine)  # exact, not approximately
    assert back.frame_times is None and not back.is_4d


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("kind", ORIENTATIONS)
def test_4d_round_trip_keeps_frames_and_frame_times(tmp_path, kind, suffix):
    vol = ctp_volume(kind)
    vol.frame_times = 2.0 + 1.5 * np.arange(vol.n_frames)  # non-zero start: toffset
    back = load_nifti(save_nifti(vol, tmp_path / f"ctp{suffix}"))
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_array_equal(back.affine, vol.affine)
    np.testing.assert_allclose(back.frame_times, vol.frame_times, atol=1e-6)
    assert "frame_times_assumed" not in back.meta


def test_orientation_codes_and_voxel_world_positions(tmp_path):
    for kind, codes in (("ras", "RAS"), ("lps", "LPS"), ("aniso", "RAS")):
        back = load_nifti(save_nifti(volume_3d(kind), tmp_path / f"{kind}.nii.gz"))
        assert back.orientation == codes
    # LPS grid: voxel (1, 0, 0) lies 1 mm to the right-to-left, i.e. at smaller R.
    lps = load_nifti(tmp_path / "lps.nii.gz")
    step = world(lps.affine, (1, 0, 0)) - world(lps.affine, (0, 0, 0))
    np.testing.assert_allclose(step, [-1.0, 0.0, 0.0])
    aniso = load_nifti(tmp_path / "aniso.nii.gz")
    np.testing.assert_allclose(aniso.spacing, (0.7, 0.9, 5.0), rtol=1e-6)


def test_sform_and_qform_agree_so_every_reader_sees_one_geometry(tmp_path):
    vol = volume_3d("oblique")
    path = save_nifti(vol, tmp_path / "img.nii.gz")
    header = nib.load(str(path)).header
    assert int(header["sform_code"]) == 1 and int(header["qform_code"]) == 1
    np.testing.assert_allclose(header.get_qform(), vol.affine, atol=1e-5)
    np.testing.assert_array_equal(header.get_sform(), vol.affine)


def test_dtypes_on_disk(tmp_path):
    floats = Volume(np.linspace(0, 1, 16 * 12 * 6).reshape(16, 12, 6), make_affine("ras"))
    assert load_nifti(save_nifti(floats, tmp_path / "f.nii.gz")).array.dtype == np.float32
    mask = Volume(floats.array > 0.5, floats.affine)
    back = load_nifti(save_nifti(mask, tmp_path / "m.nii.gz"))
    assert back.array.dtype == np.uint8
    np.testing.assert_array_equal(back.array, mask.array)
    as_int = load_nifti(save_nifti(floats, tmp_path / "i.nii.gz", dtype=np.int16), dtype=np.float32)
    assert as_int.array.dtype == np.float32


def test_dispatch_by_extension(tmp_path):
    vol = ctp_volume("lps")
    back = load_volume(save_volume(vol, tmp_path / "ctp.nii.gz"))
    np.testing.assert_array_equal(back.array, vol.array)
    with pytest.raises(InputError, match="don't know how to read"):
        (tmp_path / "x.tif").write_bytes(b"II*\x00")
        load_volume(tmp_path / "x.tif")
    with pytest.raises(InputError, match="does not exist"):
        load_volume(tmp_path / "nope.nii.gz")
    with pytest.raises(InputError, match="don't know how to write"):
        save_volume(vol, tmp_path / "ctp.png")


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_truncated_file_is_a_clear_error_and_nothing_is_modified(tmp_path, suffix):
    good = save_nifti(ctp_volume(), tmp_path / f"ctp{suffix}")
    data = good.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    before = {p.name: _digest(p) for p in tmp_path.iterdir()}
    with pytest.raises(InputError, match="truncated or not a valid NIfTI"):
        load_nifti(cut)
    assert {p.name: _digest(p) for p in tmp_path.iterdir()} == before
    # the intact original still loads
    assert load_nifti(good).n_frames == ctp_volume().n_frames


def test_not_a_nifti_and_missing_file(tmp_path):
    bogus = tmp_path / "bogus.nii.gz"
    bogus.write_text("this is not an image")
    with pytest.raises(InputError, match="bogus.nii.gz"):
        load_nifti(bogus)
    with pytest.raises(InputError, match="does not exist"):
        load_nifti(tmp_path / "missing.nii")


def test_3d_file_where_ctp_is_needed(tmp_path):
    vol = load_nifti(save_nifti(volume_3d(), tmp_path / "frame.nii.gz"))
    with pytest.raises(InputError, match=r"needs 4 \(x, y, z, time\)"):
        vol.require_4d("CTP")


def test_single_frame_4d_file_is_refused_as_ctp(tmp_path):
    one = ctp_volume(n_frames=1)
    back = load_nifti(save_nifti(one, tmp_path / "one.nii.gz"))
    assert back.array.shape == (*one.spatial_shape, 1)
    with pytest.raises(InputError, match="only 1 time point"):
        back.require_4d("CTP")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_voxels_are_reported_with_count_and_position(tmp_path, bad):
    array = np.zeros((8, 8, 4), np.float32)
    array[2, 3, 1] = bad
    array[5, 5, 2] = bad
    back = load_nifti(save_nifti(Volume(array, make_affine("ras")), tmp_path / "nan.nii.gz"))
    with pytest.raises(InputError, match=r"dwi contains 2 NaN/inf voxels \(first at index \(2, 3, 1\)\)"):
        back.require_finite("dwi")


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("a regular file, so nothing can be created beneath it, even as root")
    with pytest.raises(InputError, match="exists and is a file"):
        save_nifti(volume_3d(), blocker / "out" / "img.nii.gz")
    with pytest.raises(InputError, match="cannot write to output folder"):
        save_nifti(volume_3d(), Path("/proc/ctp2mri-test/img.nii.gz"))


def test_failed_write_leaves_no_partial_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    target = save_nifti(volume_3d(seed=1), tmp_path / "img.nii.gz")
    old = _digest(target)

    def half_written_then_disk_full(image, filename):
        Path(filename).write_bytes(b"\x1f\x8b" + b"\x00" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nib, "save", half_written_then_disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_nifti(volume_3d(seed=2), target)
    with pytest.raises(OSError, match="No space left"):
        save_nifti(volume_3d(seed=2), tmp_path / "new.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.nii.gz"]
    assert _digest(target) == old
