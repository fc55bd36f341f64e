"""NRRD / MHA through SimpleITK: same geometry as NIfTI, LPS handled once."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from _helpers_io import ORIENTATIONS, ctp_volume, volume_3d, world

from ctp2mri.errors import InputError
from ctp2mri.io import load_volume, save_volume
from ctp2mri.io.itk import affine_from_sitk, frame_to_sitk, from_sitk, load_itk, save_itk, to_sitk
from ctp2mri.io.nifti import load_nifti, save_nifti
from ctp2mri.io.volume import Volume

ATOL_MM = 1e-9  # ITK normalises direction columns: a rounding of the last bit, nothing more


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
@pytest.mark.parametrize("kind", ORIENTATIONS)
def test_3d_round_trip(tmp_path, kind, suffix):
    vol = volume_3d(kind)
    back = load_itk(save_itk(vol, tmp_path / f"img{suffix}"))
    assert back.array.dtype == np.int16
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.affine, vol.affine, atol=ATOL_MM, rtol=0)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
@pytest.mark.parametrize("kind", ["lps", "oblique"])
def test_4d_round_trip_with_frame_times(tmp_path, kind, suffix):
    vol = ctp_volume(kind)
    vol.frame_times = 4.0 + 2.0 * np.arange(vol.n_frames)
    back = load_itk(save_itk(vol, tmp_path / f"ctp{suffix}"))
    assert back.is_4d and back.n_frames == vol.n_frames
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.affine, vol.affine, atol=ATOL_MM, rtol=0)
    np.testing.assert_allclose(back.frame_times, vol.frame_times)


def test_itk_world_coordinates_are_lps(tmp_path):
    """SimpleITK places each voxel at the LPS mirror of our RAS position."""
    vol = volume_3d("oblique")
    image = sitk.ReadImage(str(save_itk(vol, tmp_path / "img.nrrd")))
    for ijk in [(0, 0, 0), (15, 0, 0), (3, 7, 5), (15, 11, 5)]:
        lps = np.array(image.TransformIndexToPhysicalPoint(ijk))
        np.testing.assert_allclose(lps * [-1, -1, 1], world(vol.affine, ijk), atol=1e-9)
        # and the voxel value there is the one our array holds at (i, j, k)
        assert image[ijk] == vol.array[ijk]


@pytest.mark.parametrize("kind", ORIENTATIONS)
def test_nrrd_and_nifti_of_one_volume_agree(tmp_path, kind):
    vol = ctp_volume(kind)
    a = load_volume(save_volume(vol, tmp_path / "ctp.nrrd"))
    b = load_volume(save_volume(vol, tmp_path / "ctp.nii.gz"))
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-6)


def test_to_and_from_sitk_frames():
    vol = ctp_volume("aniso")
    frames = to_sitk(vol)
    assert len(frames) == vol.n_frames
    assert frames[0].GetSpacing() == pytest.approx(vol.spacing)
    back = from_sitk(frames, frame_times=vol.frame_times)
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(affine_from_sitk(frames[2]), vol.affine, atol=ATOL_MM)


def test_frames_on_different_grids_are_refused():
    vol = ctp_volume("ras")
    frames = to_sitk(vol)
    frames[3].SetOrigin((frames[3].GetOrigin()[0] + 1.0, *frames[3].GetOrigin()[1:]))
    with pytest.raises(InputError, match="frame 3 is not on the grid of frame 0"):
        from_sitk(frames)


def test_boolean_masks_are_written_as_uint8(tmp_path):
    vol = volume_3d("ras")
    mask = Volume(vol.array > 0, vol.affine)
    assert frame_to_sitk(mask.array, mask.affine).GetPixelID() == sitk.sitkUInt8
    back = load_itk(save_itk(mask, tmp_path / "mask.nrrd"))
    np.testing.assert_array_equal(back.array, mask.array.astype(np.uint8))


def test_degenerate_affine_is_refused():
    vol = volume_3d("ras")
    flat = vol.affine.copy()
    flat[:3, 2] = 0.0
    with pytest.raises(InputError, match="zero-length axis"):
        frame_to_sitk(vol.array, flat)


def test_damaged_and_missing_files(tmp_path):
    good = save_itk(ctp_volume(), tmp_path / "ctp.nrrd")
    data = good.read_bytes()
    cut = tmp_path / "cut.nrrd"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cut.nrrd"):
        load_itk(cut)
    assert good.read_bytes() == data
    with pytest.raises(InputError, match="does not exist"):
        load_itk(tmp_path / "missing.mha")


def test_nifti_written_then_read_by_itk_has_the_same_world_geometry(tmp_path):
    """Cross-check against an independent reader: ITK's own NIfTI IO."""
    vol = volume_3d("oblique")
    path = save_nifti(vol, tmp_path / "img.nii.gz")
    itk_view = from_sitk(sitk.ReadImage(str(path)))
    np.testing.assert_array_equal(itk_view.array, vol.array)
    np.testing.assert_allclose(itk_view.affine, load_nifti(path).affine, atol=1e-5)
