"""Reader, writer, sample data and manifest of the napari plugin, without a viewer."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from napari.layers import Image, Labels
from scipy.spatial.transform import Rotation

from ctp2mri.casefolder import Case, write_case
from ctp2mri.errors import InputError
from ctp2mri.io.itk import save_itk
from ctp2mri.io.volume import Volume
from napari_ctp2mri import _reader, _writer
from napari_ctp2mri._reader import get_reader, read_path

SHAPE = (10, 12, 4)


def _affine(linear: np.ndarray) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = linear @ np.diag([0.8, 1.2, 5.0])  # anisotropic, thick axial slices
    affine[:3, 3] = [95.0, -120.5, -40.0]
    return affine


LPS_AFFINE = _affine(np.diag([-1.0, -1.0, 1.0]))
OBLIQUE_AFFINE = _affine(Rotation.from_euler("zyx", [15, -7, 4], degrees=True).as_matrix())


def _save(path: Path, array: np.ndarray, affine: np.ndarray, dt=None, t0=0.0) -> Path:
    """A NIfTI as other tools write it (nibabel directly, not our writer)."""
    image = nib.Nifti1Image(array, affine)
    image.set_sform(affine, code=1)
    if dt is not None:
        image.header.set_zooms(image.header.get_zooms()[:3] + (dt,))
        image.header.set_xyzt_units("mm", "sec")
        image.header["toffset"] = t0
    nib.save(image, str(path))
    return path


def _layer(layer_data):
    data, kwargs, layer_type = layer_data
    return (Labels if layer_type == "labels" else Image)(data, **kwargs)


def _write(layer, path: Path) -> Path:
    data, attributes, layer_type = layer.as_layer_data_tuple()
    writer = _writer.write_labels if layer_type == "labels" else _writer.write_image
    [written] = writer(str(path), data, attributes)
    return Path(written)


# reader -------------------------------------------------------------------------------------
@pytest.fixture
def case_dir(tmp_path) -> Path:
    rng = np.random.default_rng(3)
    mask = np.zeros(SHAPE, np.uint8)
    mask[2:8, 2:10, :] = 1
    lesion = np.zeros(SHAPE, np.uint8)
    lesion[4:6, 5:7, 1:3] = 1
    case = Case(
        ctp=Volume(
            rng.normal(35, 8, SHAPE + (7,)).round(), LPS_AFFINE, frame_times=np.arange(7) * 2.0
        ),
        dwi=Volume(rng.gamma(3.0, 40.0, SHAPE).astype(np.float32), LPS_AFFINE),
        adc=Volume(rng.normal(780, 40, SHAPE).astype(np.float32), LPS_AFFINE),
        lesion=Volume(lesion, LPS_AFFINE),
        mask=Volume(mask, LPS_AFFINE),
    )
    return write_case(case, tmp_path / "case001")


def test_case_folder_opens_as_named_layers(case_dir):
    reader = get_reader(str(case_dir))
    assert reader is not None
    layers = reader(str(case_dir))
    assert [(kw["name"], kind) for _, kw, kind in layers] == [
        ("CTP", "image"), ("DWI", "image"), ("ADC", "image"),
        ("brain mask", "labels"), ("lesion", "labels"),
    ]
    ctp, kwargs, _ = layers[0]
    assert ctp.shape == (7, 4, 12, 10)  # (t, z, y, x)
    # NIfTI stores the affine in float32, hence approx
    assert kwargs["scale"] == pytest.approx((1.0, 5.0, 1.2, 0.8))
    # LPS file: napari world = LPS mm, so the translate is the file's origin in LPS
    assert kwargs["translate"] == pytest.approx((0.0, -40.0, 120.5, -95.0))
    assert kwargs["metadata"]["ctp2mri"]["source"] == str(case_dir / "ctp.nii.gz")
    assert kwargs["metadata"]["ctp2mri"]["frame_times"] == [0, 2, 4, 6, 8, 10, 12]


def test_4d_nrrd_gets_time_first(tmp_path):
    array = np.arange(np.prod(SHAPE) * 5, dtype=np.int16).reshape(SHAPE + (5,))
    volume = Volume(array, LPS_AFFINE)
    path = save_itk(volume, tmp_path / "perf.nrrd")
    [(data, kwargs, kind)] = read_path(path)
    assert kind == "image" and kwargs["name"] == "perf" and data.shape == (5, 4, 12, 10)
    assert np.array_equal(data[3], volume.array[..., 3].T)  # LPS grid: a plain transpose
    assert kwargs["contrast_limits"] == (0.0, 100.0)


def test_single_files_pick_layer_type_from_name_and_content(tmp_path):
    binary = (np.random.default_rng(0).random(SHAPE) > 0.7).astype(np.uint8)
    _save(tmp_path / "stroke_seg.nii.gz", binary * 3, LPS_AFFINE)
    _save(tmp_path / "core.nii", binary, LPS_AFFINE)
    t2 = np.random.default_rng(0).gamma(2, 50, SHAPE).astype(np.float32)
    _save(tmp_path / "t2.nii.gz", t2, LPS_AFFINE)
    _save(tmp_path / "adc.nii.gz", np.full(SHAPE, 700.0, np.float32), LPS_AFFINE)
    names = ("stroke_seg.nii.gz", "core.nii", "t2.nii.gz", "adc.nii.gz")
    kinds = {p: read_path(tmp_path / p)[0] for p in names}
    assert kinds["stroke_seg.nii.gz"][2] == "labels"
    assert kinds["core.nii"][2] == "labels"
    assert kinds["t2.nii.gz"][2] == "image"
    adc_kwargs = kinds["adc.nii.gz"][1]
    assert adc_kwargs["contrast_limits"] == (0.0, 2000.0)
    assert "visible" not in adc_kwargs  # a file opened alone is shown


def test_get_reader_declines_what_it_cannot_read(tmp_path):
    assert get_reader(str(tmp_path / "cells.tif")) is None
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not an image")
    assert get_reader(str(tmp_path / "notes")) is None
    assert get_reader(str(tmp_path)) is None  # a folder holding only a folder


def test_dicom_folder_is_recognised_by_its_magic(tmp_path):
    series = tmp_path / "series"
    series.mkdir()
    (series / "IM0001").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
    assert get_reader(str(series)) is _reader.read_paths


def test_dicom_perfusion_series_opens_with_time_slider(tmp_path):
    from ctp2mri.io.dicom_write import write_dicom_series

    hu = np.random.default_rng(5).integers(-20, 120, SHAPE + (3,)).astype(np.int16)
    volume = Volume(hu, LPS_AFFINE, frame_times=[0.0, 2.0, 4.0])
    folder = write_dicom_series(volume, tmp_path / "ctp_dicom", modality="CT")
    assert get_reader(str(folder)) is _reader.read_paths
    [(data, kwargs, kind)] = read_path(folder)
    assert kind == "image" and kwargs["name"] == "ctp_dicom"
    assert data.shape == (3, 4, 12, 10) and kwargs["contrast_limits"] == (0.0, 100.0)
    assert kwargs["metadata"]["ctp2mri"]["frame_times"] == pytest.approx([0.0, 2.0, 4.0])
    # world position of the first voxel: the file's origin, in LPS (z, y, x)
    assert kwargs["translate"][1:] == pytest.approx((-40.0, 120.5, -95.0))
    assert np.array_equal(data[1, 2], hu[..., 2, 1].T)


def test_reader_errors_are_input_errors(tmp_path):
    noise = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    good = _save(tmp_path / "ok.nii.gz", noise, LPS_AFFINE)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputError, match="truncated"):
        read_path(broken)
    case = tmp_path / "flat_case"
    case.mkdir()
    _save(case / "ctp.nii.gz", np.ones(SHAPE, np.float32), LPS_AFFINE)  # 3-D, not a series
    with pytest.raises(InputError, match="4"):
        read_path(case)


# round trips --------------------------------------------------------------------------------
@pytest.mark.parametrize("affine", [LPS_AFFINE, OBLIQUE_AFFINE], ids=["LPS", "oblique"])
def test_nifti_round_trip_keeps_array_affine_and_timing(tmp_path, affine):
    array = np.random.default_rng(7).normal(30, 20, SHAPE + (6,)).astype(np.float32)
    source = _save(tmp_path / "ctp_in.nii.gz", array, affine, dt=1.5, t0=4.0)
    layer = _layer(read_path(source)[0])
    out = _write(layer, tmp_path / "ctp_out.nii.gz")
    written, original = nib.load(out), nib.load(source)
    assert np.array_equal(written.get_fdata(dtype=np.float32), array)
    assert np.array_equal(written.affine, original.affine)
    assert written.header.get_zooms()[3] == 1.5 and float(written.header["toffset"]) == 4.0


def test_labels_round_trip_is_exact_and_compact(tmp_path, case_dir):
    [*_, lesion] = read_path(case_dir)
    layer = _layer(lesion)
    layer.data = layer.data.astype(np.int64)  # as napari's own labels tools leave them
    out = _write(layer, tmp_path / "lesion_edit")  # bare name: .nii.gz is added
    assert out.name == "lesion_edit.nii.gz"
    written, original = nib.load(out), nib.load(case_dir / "lesion.nii.gz")
    assert written.get_data_dtype() == np.uint8
    assert np.array_equal(np.asanyarray(written.dataobj), np.asanyarray(original.dataobj))
    assert np.array_equal(written.affine, original.affine)


def test_writer_refuses_unknown_format(tmp_path):
    layer = Image(np.zeros((3, 4, 5), np.float32))
    with pytest.raises(InputError, match=".nii.gz"):
        _write(layer, tmp_path / "volume.tif")


def test_foreign_layer_is_written_with_its_napari_geometry(tmp_path):
    """scale/translate in (z, y, x) LPS mm become a RAS affine in (i, j, k) order."""
    layer = Image(
        np.zeros((3, 4, 5), np.float32), scale=(5.0, 1.2, 0.8), translate=(10.0, 20.0, 30.0)
    )
    out = _write(layer, tmp_path / "foreign.nii")
    written = nib.load(out)
    assert written.shape == (5, 4, 3)
    np.testing.assert_allclose(
        written.affine,
        [[-0.8, 0, 0, -30.0], [0, -1.2, 0, -20.0], [0, 0, 5.0, 10.0], [0, 0, 0, 1]],
    )


# sample data and manifest --------------------------------------------------------------------
def test_manifest_is_valid_and_commands_import():
    from npe2 import PluginManifest

    import napari_ctp2mri

    manifest = PluginManifest.from_file(Path(napari_ctp2mri.__file__).with_name("napari.yaml"))
    manifest.validate_imports()
    assert manifest.name == "napari-ctp2mri"
    contributions = manifest.contributions
    assert contributions.readers[0].accepts_directories
    assert {w.layer_types[0] for w in contributions.writers} == {"image", "labels"}
    assert [s.display_name for s in contributions.sample_data] == ["Stroke phantom case (demo)"]


def test_installed_manifest_is_discovered():
    from npe2 import PluginManager

    pm = PluginManager()
    pm.discover(include_npe1=False)
    assert "napari-ctp2mri" in pm._manifests  # found through the napari.manifest entry point
    readers = list(pm.iter_compatible_readers(["x/ctp.nii.gz"]))
    assert any(r.command == "napari-ctp2mri.get_reader" for r in readers)


def test_sample_data_is_a_phantom_case():
    from napari_ctp2mri._sample_data import stroke_phantom_case

    layers = stroke_phantom_case()
    assert [kw["name"] for _, kw, _ in layers] == ["CTP", "DWI", "ADC", "brain mask", "lesion"]
    ctp = layers[0][0]
    assert ctp.ndim == 4 and ctp.shape[0] == 15
    assert ctp.shape[2:] == (112, 96)  # demo profile: 96 × 112 in-plane, shown as (y, x)
