"""DICOM series: 3-D and 4-D (CT perfusion) round trips, frame grouping, and bad folders.

Series are written with `write_dicom_series` (SimpleITK) and, where a scanner's quirks are
needed, edited with pydicom (a test extra).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest
from _helpers_io import ctp_volume, make_affine, volume_3d, world

from ctp2mri.errors import Cancelled, InputError
from ctp2mri.io import load_volume
from ctp2mri.io.dicom import list_dicom_series, load_dicom_series
from ctp2mri.io.dicom_write import write_dicom_series
from ctp2mri.io.nifti import load_nifti, save_nifti
from ctp2mri.io.volume import Volume
from ctp2mri.progress import CancelToken

ATOL_MM = 1e-4  # DICOM decimal strings hold at most 16 characters


@pytest.fixture
def pydicom():
    import pydicom  # a test extra: headers are checked by an independent DICOM library

    return pydicom


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"))


def _headers(pydicom, folder: Path) -> list:
    return [pydicom.dcmread(str(p)) for p in _files(folder)]


def _edit(pydicom, folder: Path, change) -> None:
    """Apply ``change(dataset)`` to every file and save it in place."""
    for path in _files(folder):
        ds = pydicom.dcmread(str(path))
        change(ds)
        ds.save_as(str(path))


def _shuffle_names(folder: Path, seed: int = 0) -> None:
    """Random file names, so that nothing can be inferred from the listing order."""
    rng = np.random.default_rng(seed)
    for path in _files(folder):
        path.rename(folder / f"{uuid.UUID(int=int(rng.integers(2**62))).hex}.dcm")


def _delete(ds, *tags) -> None:
    for tag in tags:
        if tag in ds:
            del ds[tag]


TPI, ACQ_TIME, CONTENT_TIME, TRIGGER_TIME = (0x0020, 0x0100), (0x0008, 0x0032), (0x0008, 0x0033), (0x0018, 0x1060)


# round trips ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["ras", "lps", "oblique", "aniso"])
def test_3d_round_trip(tmp_path, kind):
    vol = volume_3d(kind)
    back = load_dicom_series(write_dicom_series(vol, tmp_path / "series"))
    assert not back.is_4d and back.array.dtype == np.int16
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.affine, vol.affine, atol=ATOL_MM, rtol=0)
    assert back.meta["series_description"] == "ctp2mri volume"
    assert back.meta["modality"] == "CT"


@pytest.mark.parametrize("kind", ["lps", "oblique"])
def test_4d_round_trip(tmp_path, kind):
    vol = ctp_volume(kind)
    vol.frame_times = np.array([0.0, 1.5, 3.0, 4.5, 7.25])  # uneven, like a real protocol
    back = load_dicom_series(write_dicom_series(vol, tmp_path / "ctp"))
    assert back.is_4d and back.array.dtype == np.int16
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.affine, vol.affine, atol=ATOL_MM, rtol=0)
    np.testing.assert_allclose(back.frame_times, vol.frame_times, atol=1e-6)
    assert back.meta["frame_grouping"] == "Temporal Position Identifier"
    assert "frame_times_assumed" not in back.meta


def test_nifti_and_dicom_of_one_ctp_load_to_the_same_array_and_affine(tmp_path):
    """The issue's requirement: both exports of a CTP are the same data on the same grid."""
    vol = ctp_volume("oblique")
    from_nifti = load_nifti(save_nifti(vol, tmp_path / "ctp.nii.gz"))
    from_dicom = load_volume(write_dicom_series(vol, tmp_path / "dicom"))
    assert from_nifti.array.dtype == from_dicom.array.dtype == np.int16
    np.testing.assert_array_equal(from_dicom.array, from_nifti.array)
    np.testing.assert_allclose(from_dicom.affine, from_nifti.affine, atol=ATOL_MM, rtol=0)
    np.testing.assert_allclose(from_dicom.frame_times, from_nifti.frame_times, atol=1e-6)
    assert from_dicom.same_grid(from_nifti)


def test_written_headers_place_every_pixel_correctly(tmp_path, pydicom):
    """Read the files with pydicom and check the DICOM geometry against the affine by hand."""
    vol = ctp_volume("oblique", n_frames=3)
    headers = _headers(pydicom, write_dicom_series(vol, tmp_path / "ctp", patient_id="P7"))
    nx, ny, nz, nt = vol.array.shape
    assert len(headers) == nz * nt
    assert len({ds.SeriesInstanceUID for ds in headers}) == 1
    assert len({ds.StudyInstanceUID for ds in headers}) == 1
    assert len({ds.SOPInstanceUID for ds in headers}) == nz * nt
    lps = np.diag([-1.0, -1.0, 1.0])
    row_dir = lps @ vol.affine[:3, 0] / vol.spacing[0]
    col_dir = lps @ vol.affine[:3, 1] / vol.spacing[1]
    for ds in headers:
        assert ds.Modality == "CT" and ds.PatientID == "P7"
        assert ds.BitsAllocated == 16 and ds.PixelRepresentation == 1  # int16
        assert int(ds.NumberOfTemporalPositions) == nt
        t = int(ds.TemporalPositionIdentifier) - 1
        assert float(ds.TriggerTime) == pytest.approx(1000.0 * vol.frame_times[t])
        np.testing.assert_allclose(ds.ImageOrientationPatient, [*row_dir, *col_dir], atol=1e-6)
        np.testing.assert_allclose(ds.PixelSpacing, [vol.spacing[1], vol.spacing[0]], atol=1e-6)
        # which slice is it? the one whose world position matches its IPP
        ipp_ras = lps @ np.array(ds.ImagePositionPatient, dtype=float)
        k = int(np.argmin([np.linalg.norm(world(vol.affine, (0, 0, kk)) - ipp_ras) for kk in range(nz)]))
        np.testing.assert_allclose(ipp_ras, world(vol.affine, (0, 0, k)), atol=ATOL_MM)
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(hu, vol.array[:, :, k, t].T)  # rows run along j


def test_left_handed_grid_reads_back_as_the_same_image_in_world_space(tmp_path):
    """Slices are sorted along the normal: a k axis against it comes back reversed."""
    vol = volume_3d("ras")
    flipped = vol.affine @ np.diag([1.0, 1.0, -1.0, 1.0])  # k runs inferior
    vol = Volume(vol.array, flipped)
    back = load_dicom_series(write_dicom_series(vol, tmp_path / "s"))
    nz = vol.spatial_shape[2]
    np.testing.assert_array_equal(back.array, vol.array[:, :, ::-1])
    for ijk in [(0, 0, 0), (5, 7, 2), (15, 11, 5)]:
        mirrored = (ijk[0], ijk[1], nz - 1 - ijk[2])
        np.testing.assert_allclose(world(back.affine, mirrored), world(vol.affine, ijk), atol=ATOL_MM)


def test_non_integer_data_is_quantised_within_half_a_step(tmp_path, pydicom):
    vol = volume_3d("aniso", dtype=np.float32)
    folder = write_dicom_series(vol, tmp_path / "adc", modality="MR", series_description="ADC")
    back = load_dicom_series(folder)
    slope = float(_headers(pydicom, folder)[0].RescaleSlope)
    assert slope < np.ptp(vol.array) / 65000  # nearly the whole int16 range is used
    assert back.array.dtype == np.float32
    assert np.abs(back.array - vol.array).max() <= 0.51 * slope
    assert back.meta["modality"] == "MR" and back.meta["series_description"] == "ADC"


def test_wide_integer_range_round_trips_exactly_with_an_intercept(tmp_path):
    rng = np.random.default_rng(3)
    array = rng.integers(0, 60_000, size=(8, 6, 4)).astype(np.uint16)
    array[0, 0, 0], array[1, 0, 0] = 0, 60_000  # spans more than int16 can hold
    back = load_dicom_series(write_dicom_series(Volume(array, make_affine("ras")), tmp_path / "s"))
    np.testing.assert_array_equal(back.array, array)


def test_scanner_style_unsigned_pixels_with_intercept_give_int16_hu(tmp_path, pydicom):
    """Most CT scanners store unsigned 0..4095 with intercept -1024."""
    rng = np.random.default_rng(5)
    stored = rng.integers(0, 4096, size=(16, 12, 6)).astype(np.int16)
    folder = write_dicom_series(Volume(stored, make_affine("aniso")), tmp_path / "s")

    def unsigned_with_intercept(ds):
        ds.PixelRepresentation = 0  # same bytes: all values are non-negative
        ds.BitsStored, ds.HighBit = 12, 11
        ds.RescaleIntercept = "-1024"

    _edit(pydicom, folder, unsigned_with_intercept)
    back = load_dicom_series(folder)
    assert back.array.dtype == np.int16
    np.testing.assert_array_equal(back.array, stored.astype(np.int32) - 1024)


def test_per_file_rescale_is_applied(tmp_path, pydicom):
    """A scanner may scale each slice differently; each file's slope and intercept count."""
    vol = volume_3d("ras")
    folder = write_dicom_series(vol, tmp_path / "s")

    def rescale_slice_two(ds):
        if int(ds.InstanceNumber) == 3:  # slice k = 2
            ds.RescaleSlope, ds.RescaleIntercept = "0.5", "-10"

    _edit(pydicom, folder, rescale_slice_two)
    back = load_dicom_series(folder)
    expected = vol.array.astype(np.float64)
    expected[:, :, 2] = vol.array[:, :, 2] * 0.5 - 10
    np.testing.assert_allclose(back.array, expected)


# grouping into frames ---------------------------------------------------------------------
def _drop_up_to(key: str):
    """Remove the temporal tags that outrank ``key``, so grouping must fall back to it."""
    order = [TPI, ACQ_TIME, TRIGGER_TIME, CONTENT_TIME]
    names = ["Temporal Position Identifier", "Acquisition Time", "Trigger Time", "Content Time", "repeated slice positions"]
    return order[: names.index(key)]


@pytest.mark.parametrize(
    "grouping",
    ["Temporal Position Identifier", "Acquisition Time", "Trigger Time", "Content Time", "repeated slice positions"],
)
def test_frames_are_grouped_by_each_tag_kind(tmp_path, pydicom, grouping):
    vol = ctp_volume("oblique")
    vol.frame_times = np.array([0.0, 2.0, 3.0, 5.5, 9.0])
    folder = write_dicom_series(vol, tmp_path / "ctp")
    drop = _drop_up_to(grouping)
    _edit(pydicom, folder, lambda ds: _delete(ds, *drop))
    _shuffle_names(folder)
    back = load_dicom_series(folder)
    assert back.meta["frame_grouping"] == grouping
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.affine, vol.affine, atol=ATOL_MM, rtol=0)
    if grouping == "repeated slice positions":
        np.testing.assert_array_equal(back.frame_times, np.arange(vol.n_frames))
        assert back.meta["frame_times_assumed"] is True
    else:  # Trigger Time is absolute, clock times are relative to the first frame
        np.testing.assert_allclose(back.frame_times, vol.frame_times, atol=1e-6)


def test_acquisition_time_that_varies_within_a_frame_does_not_split_frames(tmp_path, pydicom):
    """Sequential scanners stamp each slice; such times are not frame labels."""
    vol = ctp_volume("ras")
    folder = write_dicom_series(vol, tmp_path / "ctp")
    n_slices = vol.spatial_shape[2]

    def stamp_each_slice(ds):
        _delete(ds, TPI)
        k = (int(ds.InstanceNumber) - 1) % n_slices
        hh, mm, ss = ds.AcquisitionTime[:2], ds.AcquisitionTime[2:4], float(ds.AcquisitionTime[4:])
        ds.AcquisitionTime = f"{hh}{mm}{ss + 0.05 * k:09.6f}"

    _edit(pydicom, folder, stamp_each_slice)
    _shuffle_names(folder, seed=1)
    back = load_dicom_series(folder)
    assert back.meta["frame_grouping"] == "Trigger Time"
    np.testing.assert_array_equal(back.array, vol.array)


def test_frame_times_from_clock_cross_midnight(tmp_path, pydicom):
    vol = ctp_volume("ras", n_frames=3)
    folder = write_dicom_series(vol, tmp_path / "ctp")
    clock = {1: "235959.000000", 2: "000000.500000", 3: "000002.000000"}

    def around_midnight(ds):
        _delete(ds, TRIGGER_TIME)
        ds.AcquisitionTime = ds.ContentTime = clock[int(ds.TemporalPositionIdentifier)]

    _edit(pydicom, folder, around_midnight)
    back = load_dicom_series(folder)
    np.testing.assert_allclose(back.frame_times, [0.0, 1.5, 3.0])


def test_single_frame_series_is_3d_and_refused_as_ctp(tmp_path):
    back = load_dicom_series(write_dicom_series(ctp_volume(n_frames=1), tmp_path / "one"))
    assert not back.is_4d
    with pytest.raises(InputError, match=r"needs 4 \(x, y, z, time\)"):
        back.require_4d("CTP")


# bad folders ------------------------------------------------------------------------------
def test_two_series_need_a_choice(tmp_path):
    folder = tmp_path / "mixed"
    write_dicom_series(ctp_volume(), tmp_path / "a", series_description="Perfusion 5mm")
    write_dicom_series(volume_3d(seed=4), tmp_path / "b", series_description="Head 5mm")
    folder.mkdir()
    for sub in ("a", "b"):
        for path in _files(tmp_path / sub):
            path.rename(folder / f"{sub}_{path.name}")
    series = {s.description: s for s in list_dicom_series(folder)}
    assert set(series) == {"Perfusion 5mm", "Head 5mm"}
    assert series["Perfusion 5mm"].n_files == 30
    with pytest.raises(InputError) as err:
        load_dicom_series(folder)
    message = str(err.value)
    assert "2 DICOM series" in message and "series_uid=" in message and "--series-uid" in message
    for s in series.values():
        assert s.uid in message and s.description in message
    ctp = load_dicom_series(folder, series_uid=series["Perfusion 5mm"].uid)
    np.testing.assert_array_equal(ctp.array, ctp_volume().array)
    head = load_dicom_series(folder, series_uid=series["Head 5mm"].uid)
    np.testing.assert_array_equal(head.array, volume_3d(seed=4).array)
    with pytest.raises(InputError, match="no series with UID 1.2.3"):
        load_dicom_series(folder, series_uid="1.2.3")


def test_missing_slice_in_a_3d_series(tmp_path):
    folder = write_dicom_series(volume_3d("aniso"), tmp_path / "s")  # 5 mm slices
    (folder / "IM000003.dcm").unlink()  # k = 2
    with pytest.raises(InputError, match=r"gap between .* is 10\.000 mm where the others are 5\.000 mm.*slice is missing"):
        load_dicom_series(folder)


def test_slice_missing_from_one_frame_names_the_frame(tmp_path):
    vol = ctp_volume("ras")
    folder = write_dicom_series(vol, tmp_path / "ctp")
    nz = vol.spatial_shape[2]
    (folder / f"IM{2 * nz + 4:06d}.dcm").unlink()  # frame 2, slice k = 3
    with pytest.raises(InputError, match=r"frame 2 .* has 5 slices but frame 0 has 6.*missing, the first at 0\.000 mm"):
        load_dicom_series(folder)


def test_slice_missing_from_every_frame_is_a_gap(tmp_path):
    vol = ctp_volume("ras")
    folder = write_dicom_series(vol, tmp_path / "ctp")
    nz = vol.spatial_shape[2]
    for t in range(vol.n_frames):
        (folder / f"IM{t * nz + 3:06d}.dcm").unlink()
    with pytest.raises(InputError, match=r"not evenly spaced.*slice is missing there \(in every frame\)"):
        load_dicom_series(folder)


def test_frame_with_a_different_pixel_spacing(tmp_path, pydicom):
    folder = write_dicom_series(ctp_volume("ras"), tmp_path / "ctp")

    def coarser_frame_four(ds):
        if int(ds.TemporalPositionIdentifier) == 4:
            ds.PixelSpacing = [2.0, 2.0]

    _edit(pydicom, folder, coarser_frame_four)
    with pytest.raises(InputError, match=r"frame 3 .* not on the slice grid .* pixel spacing \[2\.0, 2\.0\]"):
        load_dicom_series(folder)


def test_frame_on_shifted_slice_positions(tmp_path, pydicom):
    folder = write_dicom_series(ctp_volume("ras"), tmp_path / "ctp")

    def shift_frame_one(ds):
        if int(ds.TemporalPositionIdentifier) == 2:
            x, y, z = (float(v) for v in ds.ImagePositionPatient)
            ds.ImagePositionPatient = [x, y, z + 0.5]

    _edit(pydicom, folder, shift_frame_one)
    with pytest.raises(InputError, match=r"frame 1 .* not on the slice grid of frame 0"):
        load_dicom_series(folder)


def test_frame_shifted_in_plane(tmp_path, pydicom):
    folder = write_dicom_series(ctp_volume("ras"), tmp_path / "ctp")

    def move_frame_five(ds):
        if int(ds.TemporalPositionIdentifier) == 5:
            x, y, z = (float(v) for v in ds.ImagePositionPatient)
            ds.ImagePositionPatient = [x + 2.0, y, z]

    _edit(pydicom, folder, move_frame_five)
    with pytest.raises(InputError, match=r"frame 4 .* shifted in-plane by 2\.000 mm against frame 0"):
        load_dicom_series(folder)


def test_tilted_stack_is_refused(tmp_path, pydicom):
    folder = write_dicom_series(volume_3d("ras"), tmp_path / "s")

    def gantry_tilt(ds):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.3 * (int(ds.InstanceNumber) - 1), z]

    _edit(pydicom, folder, gantry_tilt)
    with pytest.raises(InputError, match="shifted in-plane.*gantry tilt"):
        load_dicom_series(folder)


def test_empty_and_non_dicom_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no DICOM image files found"):
        load_dicom_series(empty)
    (empty / "notes.txt").write_text("not DICOM")
    (empty / "patient1").mkdir()
    with pytest.raises(InputError, match="sub-folders \\(patient1\\)"):
        load_dicom_series(empty)
    save_nifti(volume_3d(), empty / "ctp.nii.gz")
    with pytest.raises(InputError, match=r"holds image files \(ctp.nii.gz\)"):
        load_volume(empty)
    with pytest.raises(InputError, match="does not exist"):
        load_dicom_series(tmp_path / "nowhere")


def test_cancel_stops_reading(tmp_path):
    folder = write_dicom_series(ctp_volume(), tmp_path / "ctp")
    token = CancelToken()
    steps = []

    def progress(step, total, info):
        steps.append((step, total))
        if step == 3:
            token.cancel()

    with pytest.raises(Cancelled):
        load_dicom_series(folder, progress=progress, cancel=token)
    assert steps == [(1, 30), (2, 30), (3, 30)]


# writer refusals --------------------------------------------------------------------------
def test_writer_refuses_bad_volumes_and_leaves_nothing_behind(tmp_path):
    vol = volume_3d("ras")
    sheared = vol.affine.copy()
    sheared[0, 1] = 0.5
    with pytest.raises(InputError, match="not perpendicular"):
        write_dicom_series(Volume(vol.array, sheared), tmp_path / "sheared")
    nan = vol.array.astype(np.float32)
    nan[1, 1, 1] = np.nan
    with pytest.raises(InputError, match="NaN/inf"):
        write_dicom_series(Volume(nan, vol.affine), tmp_path / "nan")
    with pytest.raises(InputError, match="frame_times has 2 entries for 5 frames"):
        write_dicom_series(ctp_volume(), tmp_path / "times", frame_times=[0, 1])
    assert list(tmp_path.iterdir()) == []


def test_writer_is_atomic_and_does_not_overwrite_by_accident(tmp_path, monkeypatch):
    folder = write_dicom_series(volume_3d(seed=1), tmp_path / "s")
    first = sorted(p.read_bytes() for p in _files(folder))
    with pytest.raises(InputError, match="already exists"):
        write_dicom_series(volume_3d(seed=2), folder)

    import SimpleITK as sitk

    calls = {"n": 0}
    real_execute = sitk.ImageFileWriter.Execute

    def fail_on_fourth_slice(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("disk full")
        return real_execute(self, *args, **kwargs)

    monkeypatch.setattr(sitk.ImageFileWriter, "Execute", fail_on_fourth_slice)
    with pytest.raises(RuntimeError, match="disk full"):
        write_dicom_series(volume_3d(seed=2), folder, overwrite=True)
    with pytest.raises(RuntimeError, match="disk full"):
        calls["n"] = 0
        write_dicom_series(volume_3d(seed=2), tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    assert sorted(p.read_bytes() for p in _files(folder)) == first
    monkeypatch.undo()
    write_dicom_series(volume_3d(seed=2), folder, overwrite=True)
    np.testing.assert_array_equal(load_dicom_series(folder).array, volume_3d(seed=2).array)


def test_unwritable_output_folder(tmp_path):
    (tmp_path / "afile").write_text("a file, so no folder can be made under it, even by root")
    with pytest.raises(InputError, match="afile exists and is a file"):
        write_dicom_series(volume_3d(), tmp_path / "afile" / "out")


def test_single_slice_series(tmp_path):
    vol = volume_3d("aniso", shape=(8, 6, 1))
    back = load_dicom_series(write_dicom_series(vol, tmp_path / "s"))
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.affine, vol.affine, atol=ATOL_MM, rtol=0)  # 5 mm from the header


def test_a_processes_first_write_of_a_rescaled_mr_reads_back(tmp_path):
    """GDCM wrote a rescaled MR slice as Enhanced MR (positions in per-frame sequences) until it
    had read a file; in a fresh process the first write must read back placed in space."""
    script = textwrap.dedent(f"""
        import numpy as np
        from ctp2mri.io.dicom import load_dicom_series
        from ctp2mri.io.dicom_write import write_dicom_series
        from ctp2mri.io.volume import Volume
        affine = np.diag([1.5, 1.5, 4.0, 1.0])
        array = np.random.default_rng(0).normal(800.0, 50.0, (6, 5, 3)).astype(np.float32)
        back = load_dicom_series(write_dicom_series(Volume(array, affine), {str(tmp_path / "adc")!r}, modality="MR"))
        assert np.abs(back.array - array).max() < 0.01 and np.allclose(back.affine, affine, atol=1e-4)
        print(back.meta["modality"])
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.split() == ["MR"], out.stderr[-2000:]
