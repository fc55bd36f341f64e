"""Opening a BIDS subject folder in napari: every modality a named layer on its own geometry."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from _helpers_bids import rigid, write_subject

from ctp2mri.phantom import generate_case
from napari_ctp2mri._layers import voxel_to_world
from napari_ctp2mri._reader import get_reader


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("isles24")
    case = generate_case(5, "demo", n_frames=5)
    write_subject(root, case, "sub-stroke0001")
    write_subject(root, case, "sub-strokecase0002", ses=("ses-0001", "ses-0002"), raw="rawdata", ext=".nii",
                  subdirs=True, mri_to_ct=rigid(), ncct_files=False)
    return root


def _on_its_geometry(layer, rng) -> None:
    """Voxels of the layer's file sit where its affine puts them, with their values."""
    source = layer.metadata["ctp2mri"]["source"]
    image = nib.load(source)
    array = np.asanyarray(image.dataobj)
    for _ in range(5):
        ijk = tuple(int(rng.integers(0, n)) for n in array.shape[:3])
        world = voxel_to_world(np.array([ijk]), image.affine)[0]
        frame = int(rng.integers(0, array.shape[3])) if array.ndim == 4 else None
        position = ([frame] if frame is not None else []) + world.tolist()
        index = tuple(int(round(v)) for v in layer.world_to_data(position))
        expected = array[ijk + ((frame,) if frame is not None else ())]
        assert layer.data[index] == pytest.approx(expected, rel=1e-5, abs=1e-4), (layer.name, ijk)


def test_a_derivatives_subject_opens_every_modality_on_its_geometry(make_napari_viewer, tree):
    folder = tree / "derivatives" / "sub-stroke0001"
    assert get_reader(str(folder)) is not None and get_reader(str(tree / "derivatives")) is None
    viewer = make_napari_viewer()
    viewer.open(str(folder), plugin="napari-ctp2mri")
    layers = {layer.name: layer for layer in viewer.layers}
    assert list(layers) == ["CTP", "Tmax", "DWI", "ADC", "lesion"]
    assert layers["CTP"].ndim == 4 and layers["CTP"].axis_labels[0] == "t"  # a time slider
    assert type(layers["lesion"]).__name__ == "Labels" and layers["Tmax"].colormap.name == "turbo"
    rng = np.random.default_rng(0)
    for layer in viewer.layers:
        _on_its_geometry(layer, rng)


def test_a_raw_subject_of_the_other_naming_opens_on_the_scanners_geometries(make_napari_viewer, tree):
    folder = tree / "rawdata" / "sub-strokecase0002"
    viewer = make_napari_viewer()
    viewer.open(str(folder), plugin="napari-ctp2mri")
    assert [layer.name for layer in viewer.layers] == ["CTP", "DWI", "ADC"]
    rng = np.random.default_rng(1)
    for layer in viewer.layers:
        _on_its_geometry(layer, rng)
    # the MRI keeps its own grid (1.6 mm), the CTP its own (2 mm): nothing was resampled
    assert np.allclose(viewer.layers["DWI"].scale[-2:], 1.6) and np.allclose(viewer.layers["CTP"].scale[-2:], 2.0)
