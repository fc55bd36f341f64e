"""Volume ↔ napari layer geometry, checked with real napari layers (no viewer needed)."""

from __future__ import annotations

import numpy as np
import pytest
from napari.layers import Image, Labels
from scipy.spatial.transform import Rotation

from ctp2mri.casefolder import Case
from ctp2mri.errors import InputError
from ctp2mri.io.volume import Volume
from napari_ctp2mri._layers import (
    ADC_WINDOW,
    CTP_WINDOW_HU,
    META_KEY,
    case_to_layer_data,
    layer_to_volume,
    volume_to_layer_data,
    voxel_to_world,
    world_to_voxel,
)

SHAPE = (9, 11, 5)
SPACING = np.array([0.9, 1.1, 5.0])
ORIGIN = np.array([31.5, -22.0, 7.25])


def _affine(linear: np.ndarray) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = linear @ np.diag(SPACING)
    affine[:3, 3] = ORIGIN
    return affine


# Voxel axes → RAS world: plain RAS, DICOM-like LPS, a sagittal acquisition (axes permuted
# and flipped), and an oblique grid tilted 12° / 5° / 3°.
AFFINES = {
    "RAS": _affine(np.eye(3)),
    "LPS": _affine(np.diag([-1.0, -1.0, 1.0])),
    "sagittal": _affine(np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])),
    "oblique": _affine(Rotation.from_euler("xyz", [12, 5, -3], degrees=True).as_matrix()),
}
LPS = np.array([-1.0, -1.0, 1.0])


def _layer(volume: Volume, role: str | None = None):
    data, kwargs, layer_type = volume_to_layer_data(volume, "v", role)
    return (Labels if layer_type == "labels" else Image)(data, **kwargs)


def _marker_volume(affine: np.ndarray, n_frames: int = 0) -> tuple[Volume, tuple[int, int, int]]:
    shape = SHAPE + ((n_frames,) if n_frames else ())
    array = np.zeros(shape, np.float32)
    index = (6, 2, 3)
    array[index] = 100.0
    frame_times = np.arange(n_frames) * 2.0 + 1.0 if n_frames else None
    return Volume(array, affine, frame_times=frame_times), index


@pytest.mark.parametrize("orientation", list(AFFINES))
def test_layer_world_coordinates_are_lps_mm_of_the_voxel(orientation):
    """A marked voxel lands where the file's affine puts it, in LPS (z, y, x) millimetres."""
    affine = AFFINES[orientation]
    volume, index = _marker_volume(affine, n_frames=3)
    layer = _layer(volume, "ctp")
    where = np.argwhere(np.asarray(layer.data) == 100.0)
    assert len(where) == 3 and set(where[:, 0]) == {0, 1, 2}  # one per frame, time first
    ras = affine @ np.r_[index, 1.0]
    expected_zyx = (LPS * ras[:3])[::-1]
    world = np.asarray(layer.data_to_world(where[1]))
    np.testing.assert_allclose(world[1:], expected_zyx, atol=1e-9)
    assert world[0] == 1.0  # time axis counts frames


@pytest.mark.parametrize("orientation", list(AFFINES))
def test_world_points_map_to_the_volumes_voxel_indices(orientation):
    """A napari world point (a click) → the file's voxel index under it, and back."""
    affine = AFFINES[orientation]
    volume, index = _marker_volume(affine, n_frames=3)
    layer = _layer(volume, "ctp")
    shown = np.argwhere(np.asarray(layer.data) == 100.0)[1]  # (t, k, j, i) of the reoriented data
    world = np.asarray(layer.data_to_world(shown))[1:]
    np.testing.assert_allclose(world_to_voxel(world, affine), [index], atol=1e-9)
    np.testing.assert_allclose(voxel_to_world([index], affine), [world], atol=1e-9)
    # several points at once, fractional indices included
    ijk = np.array([[0.0, 0.0, 0.0], [1.5, 2.25, 3.0], [8.0, 10.0, 4.0]])
    np.testing.assert_allclose(world_to_voxel(voxel_to_world(ijk, affine), affine), ijk, atol=1e-9)


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "sagittal"])
def test_axis_aligned_grids_show_radiological_axial_slices(orientation):
    """Columns run to the patient's left, rows to posterior, slices to superior; no affine."""
    volume, _ = _marker_volume(AFFINES[orientation])
    data, kwargs, _ = volume_to_layer_data(volume, "v")
    assert "affine" not in kwargs
    assert np.all(np.asarray(kwargs["scale"]) > 0)
    layer = Image(data, **kwargs)
    origin = np.asarray(layer.data_to_world((0, 0, 0)))
    steps = [np.asarray(layer.data_to_world(np.eye(3)[axis])) - origin for axis in range(3)]
    # world axes are (z=S, y=P, x=L): each data axis moves along exactly its own world axis
    np.testing.assert_allclose(np.array(steps), np.diag(np.diag(np.array(steps))), atol=1e-12)
    assert all(np.diag(np.array(steps)) > 0)
    # physical voxel size survives the axis reordering
    assert sorted(np.diag(np.array(steps))) == pytest.approx(sorted(SPACING))


def test_oblique_grid_uses_napari_affine():
    volume, _ = _marker_volume(AFFINES["oblique"], n_frames=2)
    _, kwargs, _ = volume_to_layer_data(volume, "v")
    assert "scale" not in kwargs and kwargs["affine"].shape == (5, 5)
    assert np.array_equal(kwargs["affine"][0], [1, 0, 0, 0, 0])  # time untouched


@pytest.mark.parametrize("orientation", list(AFFINES))
@pytest.mark.parametrize("n_frames", [0, 4])
def test_layer_to_volume_restores_array_affine_and_times_exactly(orientation, n_frames):
    volume, _ = _marker_volume(AFFINES[orientation], n_frames)
    volume.array[...] = np.random.default_rng(1).normal(size=volume.array.shape)
    data, attributes, _ = _layer(volume).as_layer_data_tuple()
    back = layer_to_volume(data, attributes)
    assert np.array_equal(back.array, volume.array)
    assert np.array_equal(back.affine, volume.affine)
    if n_frames:
        assert np.array_equal(back.frame_times, volume.frame_times)


@pytest.mark.parametrize("orientation", list(AFFINES))
def test_layer_without_metadata_gets_affine_from_napari_transform(orientation):
    """A layer from elsewhere (e.g. napari's 'new labels') keeps the same world geometry."""
    volume, index = _marker_volume(AFFINES[orientation])
    data, attributes, _ = _layer(volume).as_layer_data_tuple()
    del attributes["metadata"][META_KEY]
    back = layer_to_volume(data, attributes)
    new_index = np.argwhere(back.array == 100.0)[0]
    np.testing.assert_allclose(
        back.affine @ np.r_[new_index, 1.0], volume.affine @ np.r_[index, 1.0], atol=1e-9
    )
    assert sorted(back.spacing) == pytest.approx(sorted(SPACING))
    assert back.frame_times is None


def test_edited_labels_keep_their_grid():
    volume = Volume(np.zeros(SHAPE, np.uint8), AFFINES["LPS"])
    layer = _layer(volume, "lesion")
    layer.data[2, 3, 4] = 1  # paint in display coordinates (k, j, i) of an LPS grid
    back = layer_to_volume(*layer.as_layer_data_tuple()[:2])
    assert np.array_equal(back.affine, volume.affine)
    assert np.argwhere(back.array).tolist() == [[4, 3, 2]]  # LPS grid: already display order


def test_layer_moved_in_napari_is_written_where_it_is_shown():
    volume, index = _marker_volume(AFFINES["LPS"])
    layer = _layer(volume)
    layer.translate = np.asarray(layer.translate) + (10.0, 0.0, 0.0)  # 10 mm superior
    back = layer_to_volume(*layer.as_layer_data_tuple()[:2])
    new_index = np.argwhere(back.array == 100.0)[0]
    shift = back.affine @ np.r_[new_index, 1.0] - volume.affine @ np.r_[index, 1.0]
    np.testing.assert_allclose(shift[:3], [0.0, 0.0, 10.0], atol=1e-9)  # RAS: +S


def test_layer_to_volume_rejects_2d_and_rgb():
    with pytest.raises(InputError, match="3-D"):
        layer_to_volume(np.zeros((4, 5)), {"name": "flat"})
    with pytest.raises(InputError, match="RGB"):
        layer_to_volume(np.zeros((4, 5, 3)), {"name": "photo", "rgb": True})


def test_float_mask_becomes_labels_and_fractional_one_is_refused():
    mask = Volume(np.ones(SHAPE, np.float32), AFFINES["RAS"])
    data, _, layer_type = volume_to_layer_data(mask, "m", "mask")
    assert layer_type == "labels" and data.dtype == np.uint8
    with pytest.raises(InputError, match="whole numbers"):
        volume_to_layer_data(mask.with_array(np.full(SHAPE, 0.5, np.float32)), "m", "mask")


def _case(rng: np.random.Generator) -> Case:
    affine = AFFINES["LPS"]
    mask = np.zeros(SHAPE, np.uint8)
    mask[2:7, 2:9, 1:4] = 1
    lesion = np.zeros(SHAPE, np.uint8)
    lesion[3:5, 4:6, 2] = 1
    dwi = rng.gamma(2.0, 50.0, SHAPE).astype(np.float32) * mask
    return Case(
        ctp=Volume(rng.normal(40, 10, SHAPE + (6,)), affine, frame_times=np.arange(6) * 3.0),
        dwi=Volume(dwi, affine),
        adc=Volume(rng.normal(800, 50, SHAPE).astype(np.float32), affine),
        lesion=Volume(lesion, affine),
        mask=Volume(mask, affine),
    )


def test_case_layers_names_types_and_display_settings():
    case = _case(np.random.default_rng(0))
    layers = case_to_layer_data(case)
    assert [(kw["name"], kind) for _, kw, kind in layers] == [
        ("CTP", "image"), ("DWI", "image"), ("ADC", "image"),
        ("brain mask", "labels"), ("lesion", "labels"),
    ]
    by_name = {kw["name"]: (data, kw) for data, kw, _ in layers}
    assert by_name["CTP"][0].shape == (6, 5, 11, 9)
    assert by_name["CTP"][1]["contrast_limits"] == CTP_WINDOW_HU
    assert by_name["ADC"][1]["contrast_limits"] == ADC_WINDOW
    inside = case.dwi.array[case.mask.array > 0]
    expected = tuple(np.percentile(inside, [0.5, 99.5]))
    assert by_name["DWI"][1]["contrast_limits"] == pytest.approx(expected)
    assert by_name["lesion"][1].get("visible", True) is True
    lesion_layer = Labels(by_name["lesion"][0], **by_name["lesion"][1])
    assert lesion_layer.contour == 0  # filled, not outlined
    assert lesion_layer.colormap.map(np.array([1]))[0, 0] == 1.0  # red
    for _, kw in by_name.values():
        assert kw["metadata"][META_KEY]["affine"] == case.ctp.affine.tolist()
    assert by_name["CTP"][1]["metadata"][META_KEY]["frame_times"] == list(np.arange(6) * 3.0)


def test_case_without_targets_gives_only_present_layers():
    case = _case(np.random.default_rng(0))
    case.dwi = case.adc = case.lesion = None
    assert [kw["name"] for _, kw, _ in case_to_layer_data(case)] == ["CTP", "brain mask"]
