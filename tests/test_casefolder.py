"""Case-folder contract: five NIfTI files on one grid, on-disk dtypes, validation messages."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from _helpers_io import ctp_volume, make_affine

from ctp2mri import casefolder
from ctp2mri.casefolder import CASE_FILES, Case, is_case_folder, read_case, write_case
from ctp2mri.errors import InputError
from ctp2mri.io.nifti import save_nifti
from ctp2mri.io.volume import Volume


def make_case(kind: str = "oblique", seed: int = 0) -> Case:
    """A small consistent case: float CTP (to test the int16 cast) and boolean masks."""
    ctp = ctp_volume(kind, seed=seed)
    ctp = ctp.with_array(ctp.array.astype(np.float32) + 0.3)  # not integer on purpose
    rng = np.random.default_rng(seed)
    shape = ctp.spatial_shape
    mask = np.zeros(shape, bool)
    mask[2:-2, 2:-2, 1:-1] = True
    lesion = np.zeros(shape, bool)
    lesion[5:8, 4:7, 2:4] = True
    return Case(
        ctp=ctp,
        dwi=ctp.with_array(rng.normal(600, 50, shape).astype(np.float64)),
        adc=ctp.with_array(rng.normal(800, 80, shape).astype(np.float32)),
        lesion=ctp.with_array(lesion),
        mask=ctp.with_array(mask),
        info={"case_id": "P001", "lesion_volume_ml": np.float64(0.5), "frames": np.arange(3)},
    )


def test_round_trip_with_dtype_contract(tmp_path):
    case = make_case()
    folder = write_case(case, tmp_path / "P001")
    assert is_case_folder(folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*CASE_FILES.values(), "case.json"])
    on_disk = {name: nib.load(str(folder / f)).get_data_dtype() for name, f in CASE_FILES.items()}
    assert on_disk == {"ctp": np.int16, "dwi": np.float32, "adc": np.float32, "lesion": np.uint8, "mask": np.uint8}

    back = read_case(folder, require=("ctp", "dwi", "adc", "lesion", "mask"))
    assert back.path == folder
    assert back.ctp.array.dtype == np.int16 and back.mask.array.dtype == np.uint8
    np.testing.assert_array_equal(back.ctp.array, np.rint(case.ctp.array).astype(np.int16))
    np.testing.assert_allclose(back.dwi.array, case.dwi.array, rtol=1e-6)
    np.testing.assert_array_equal(back.adc.array, case.adc.array)
    np.testing.assert_array_equal(back.lesion.array, case.lesion.array.astype(np.uint8))
    np.testing.assert_array_equal(back.mask.array, case.mask.array.astype(np.uint8))
    for vol in back.volumes().values():
        np.testing.assert_array_equal(vol.affine, case.ctp.affine)
    np.testing.assert_allclose(back.ctp.frame_times, case.ctp.frame_times)
    assert back.info == {"case_id": "P001", "lesion_volume_ml": 0.5, "frames": [0, 1, 2]}


def test_ctp_out_of_int16_range_is_clipped_not_wrapped(tmp_path):
    case = make_case()
    array = case.ctp.array.copy()
    array[0, 0, 0, 0], array[1, 0, 0, 0] = 40_000.0, -40_000.0
    case.ctp = case.ctp.with_array(array)
    back = read_case(write_case(case, tmp_path / "c"))
    assert back.ctp.array[0, 0, 0, 0] == 32767 and back.ctp.array[1, 0, 0, 0] == -32768


def test_only_ctp_is_needed_unless_required(tmp_path):
    case = make_case()
    folder = write_case(Case(ctp=case.ctp), tmp_path / "ctp_only")
    assert read_case(folder).dwi is None
    with pytest.raises(InputError, match="has no dwi.nii.gz; it is required here"):
        read_case(folder, require=("ctp", "dwi"))
    with pytest.raises(InputError, match="does not exist"):
        read_case(tmp_path / "nowhere")


def _write_files(folder, **volumes):
    folder.mkdir()
    for name, vol in volumes.items():
        save_nifti(vol, folder / CASE_FILES[name])
    return folder


def test_ctp_and_mask_on_different_grids(tmp_path):
    case = make_case("ras")
    shifted = case.mask.affine.copy()
    shifted[:3, 3] += [1.0, 0.0, 0.0]
    folder = _write_files(tmp_path / "c", ctp=case.ctp, mask=Volume(case.mask.array.astype(np.uint8), shifted))
    with pytest.raises(InputError, match=r"mask in .* and ctp in .* are on different grids; resample"):
        read_case(folder)
    other_shape = Volume(np.ones((8, 8, 3), np.uint8), make_affine("ras"))
    folder = _write_files(tmp_path / "d", ctp=case.ctp, mask=other_shape)
    with pytest.raises(InputError, match=r"shape \(8, 8, 3\).*different grids"):
        read_case(folder)


def test_empty_brain_mask(tmp_path):
    case = make_case("ras")
    folder = _write_files(tmp_path / "c", ctp=case.ctp, mask=case.mask.with_array(np.zeros(case.ctp.spatial_shape, np.uint8)))
    with pytest.raises(InputError, match="brain mask in .* is empty"):
        read_case(folder)


def test_non_binary_mask(tmp_path):
    case = make_case("ras")
    labels = case.lesion.array.astype(np.uint8) * 2
    folder = _write_files(tmp_path / "c", ctp=case.ctp, lesion=case.lesion.with_array(labels))
    with pytest.raises(InputError, match=r"lesion in .* must be binary .* \[0, 2\]"):
        read_case(folder)


def test_ctp_must_be_4d_with_several_frames(tmp_path):
    case = make_case("ras")
    folder = _write_files(tmp_path / "three_d", ctp=case.ctp.with_array(case.ctp.array[..., 0]))
    with pytest.raises(InputError, match=r"ctp in .* has 3 dimensions .* needs 4 \(x, y, z, time\)"):
        read_case(folder)
    folder = _write_files(tmp_path / "one_frame", ctp=case.ctp.with_array(case.ctp.array[..., :1]))
    with pytest.raises(InputError, match="only 1 time point"):
        read_case(folder)


def test_non_finite_dwi(tmp_path):
    case = make_case("ras")
    dwi = case.dwi.array.astype(np.float32)
    dwi[3, 3, 3] = np.nan
    folder = _write_files(tmp_path / "c", ctp=case.ctp, dwi=case.dwi.with_array(dwi))
    with pytest.raises(InputError, match=r"dwi in .* contains 1 NaN/inf voxels \(first at index \(3, 3, 3\)\)"):
        read_case(folder)


def test_truncated_member_file(tmp_path):
    folder = write_case(make_case("ras"), tmp_path / "c")
    data = (folder / "adc.nii.gz").read_bytes()
    (folder / "adc.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="adc.nii.gz: the file is truncated"):
        read_case(folder)


def test_bad_case_json(tmp_path):
    folder = write_case(make_case("ras"), tmp_path / "c")
    (folder / "case.json").write_text("{not json")
    with pytest.raises(InputError, match="case.json is not valid JSON"):
        read_case(folder)


def test_write_refuses_invalid_case_and_existing_folder(tmp_path):
    case = make_case("ras")
    bad = Case(ctp=case.ctp, mask=case.mask.with_array(np.zeros(case.ctp.spatial_shape, bool)))
    with pytest.raises(InputError, match="empty"):
        write_case(bad, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    folder = write_case(case, tmp_path / "c")
    with pytest.raises(InputError, match="already exists"):
        write_case(make_case("ras", seed=1), folder)
    write_case(make_case("ras", seed=1), folder, overwrite=True)
    assert json.loads((folder / "case.json").read_text())["case_id"] == "P001"
    np.testing.assert_array_equal(
        read_case(folder).ctp.array, np.rint(make_case("ras", seed=1).ctp.array).astype(np.int16)
    )


def test_failed_write_leaves_the_old_case_and_no_partial_folder(tmp_path, monkeypatch):
    folder = write_case(make_case("ras"), tmp_path / "c")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    calls = {"n": 0}
    real_save = casefolder.save_nifti

    def crash_on_third_file(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(casefolder, "save_nifti", crash_on_third_file)
    with pytest.raises(OSError):
        write_case(make_case("ras", seed=1), folder, overwrite=True)
    calls["n"] = 0
    with pytest.raises(OSError):
        write_case(make_case("ras", seed=1), tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_unwritable_destination(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        write_case(make_case("ras"), tmp_path / "afile" / "case")
