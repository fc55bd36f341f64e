"""The slice dataset: storage, brain slices, masks, cache, augmentation, errors (its normalisation:
test_normalisation.py)."""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import replace

import nibabel
import numpy as np
import pytest
import torch
from _helpers_data import ALL, data, train  # noqa: F401 (fixtures)
from torch.utils.data import DataLoader, WeightedRandomSampler

from ctp2mri.augmentation import Augmentation
from ctp2mri.data import SliceDataset, normalise_case
from ctp2mri.errors import InputError
from ctp2mri.io.volume import Volume
from ctp2mri.training.sampling import lesion_slice_weights


@pytest.fixture(scope="module")
def painted(data):
    """A lesion-free training case with a 20 × 20 × 5 voxel lesion 'painted' inside its brain."""
    _, splits, cases = data
    name = next(n for n in splits["train"] if not cases[n].lesion.array.any())
    case = cases[name]
    mask = np.zeros(case.mask.array.shape, dtype=np.uint8)
    z = int(np.argmax(case.mask.array.sum(axis=(0, 1))))
    mask[30:50, 45:65, z - 2:z + 3] = 1
    assert (mask & case.mask.array).sum() == mask.sum()  # well inside the brain
    return name, case, mask


# storage and layout ----------------------------------------------------------------------------
def test_float16_cache_is_close_and_half_the_size(data, train):
    root, _, _ = data
    half = SliceDataset(root, "train", augment=False)  # float16 by default; profile detected
    assert half.profile.name == "demo" and half.target.dtype == torch.float16
    assert half.nbytes < 0.6 * train.nbytes
    assert (half.target.float() - train.target).abs().max() <= 2.5e-4
    assert (half.cond.float() - train.cond).abs().max() <= 2.5e-4
    assert half[3]["target"].dtype == torch.float32


# slices and masks ------------------------------------------------------------------------------
def test_only_slices_with_enough_brain(data, train):
    root, splits, cases = data
    area = 96 * 112
    every = SliceDataset(root, "train", min_brain_fraction=0.0, augment=False)
    few = SliceDataset(root, "train", min_brain_fraction=0.3, augment=False)
    for fraction, ds in ((0.01, train), (0.0, every), (0.3, few)):
        need = max(1, math.ceil(fraction * area))
        for name, case in cases.items():
            counts = case.mask.array.sum(axis=(0, 1))
            kept = ds.slice_index[ds.case_index == ds.case_names.index(name)].numpy()
            np.testing.assert_array_equal(kept, np.flatnonzero(counts >= need))
        assert int(ds.brain.flatten(1).sum(1).min()) >= need
    # With no threshold every brain-holding slice is there and none without brain.
    assert len(every) == sum(int(c.mask.array.any(axis=(0, 1)).sum()) for c in cases.values())
    assert len(few) < len(train) < len(every)


def test_lesion_mask_is_carried(train, data):
    _, _, cases = data
    for i in range(len(train)):
        case = cases[train.case_names[int(train.case_index[i])]]
        z = int(train.slice_index[i])
        expect = case.lesion.array[:, :, z] & case.mask.array[:, :, z]
        np.testing.assert_array_equal(train.lesion[i, 0].numpy(), expect)
    n_lesion_slices = sum(int(c.lesion.array.any(axis=(0, 1)).sum()) for c in cases.values())
    assert n_lesion_slices > 5 and int(train.has_lesion.sum()) == n_lesion_slices
    assert train.cases_without_lesion == []
    # The core is bright on DWI: the carried mask sits on the image's lesion.
    lesion = train.lesion[:, 0].bool()
    dwi = train.target[:, 0]
    assert dwi[lesion].mean() > dwi[train.brain[:, 0].bool() & ~lesion].mean() + 0.3


def test_in_memory_case_with_a_painted_lesion(painted, data):
    root, _, _ = data
    name, case, mask = painted
    with_lesion = replace(case, lesion=Volume(mask, case.mask.affine))
    ds = SliceDataset([with_lesion], profile="demo", augment=False)
    assert ds.case_names == [name] and int(ds.has_lesion.sum()) == 5
    for i in range(len(ds)):
        np.testing.assert_array_equal(ds.lesion[i, 0].numpy(), mask[:, :, int(ds.slice_index[i])])
    # The same mask supplied beside a case folder (e.g. from napari's Labels layer, label 2).
    by_name = SliceDataset([root / name], lesions={name: mask * 2}, augment=False)
    assert torch.equal(by_name.lesion, ds.lesion) and torch.equal(by_name.target, ds.target)
    # normalise_case is the same per-case step, usable on its own.
    part = normalise_case(with_lesion, profile="demo")
    assert part.name == name and part.has_lesion_mask and part.lesion.sum() == mask.sum()


def test_case_without_lesion_mask(data):
    _, splits, cases = data
    name = splits["train"][0]
    ds = SliceDataset([replace(cases[name], lesion=None)], augment=False)
    assert ds.cases_without_lesion == [name] and not ds.lesion.any()
    with pytest.raises(InputError, match=f"case {name} has no lesion.nii.gz"):
        SliceDataset([replace(cases[name], lesion=None)], require_lesion=True)


# cache ------------------------------------------------------------------------------------------
def _no_nifti(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("NIfTI read after construction")

    monkeypatch.setattr(nibabel, "load", refuse)


def test_no_nifti_reads_after_construction(data, monkeypatch):
    root, _, _ = data
    ds = SliceDataset(root, "train", seed=1)  # the train split augments
    assert ds.augmentation is not None and ds.target.is_contiguous() and ds.cond.is_contiguous()
    _no_nifti(monkeypatch)
    ds.set_epoch(1)
    # A worker process (single-threaded, as training on CPU should use) draws the same
    # augmented samples as the main process: the draw depends on (seed, epoch, index) only.
    batches = list(DataLoader(ds, batch_size=16, num_workers=1))
    assert sum(b["target"].shape[0] for b in batches) == len(ds)
    batch = batches[0]
    assert batch["cond"].shape == (16, 15, 96, 112) and len(batch["case"]) == 16 and batch["slice"].shape == (16,)
    for i in (0, 15):
        sample = ds[i]
        assert torch.equal(batch["target"][i], sample["target"]) and torch.equal(batch["lesion"][i], sample["lesion"])


def test_disk_cache_round_trip_and_invalidation(data, tmp_path, monkeypatch):
    root, splits, _ = data
    cache = tmp_path / "cache"
    calls = []
    first = SliceDataset(root, "train", cache_dir=cache, augment=False,
                         progress=lambda step, total, info: calls.append(info["cached"]))
    assert calls == [False, False] and len(list(cache.glob("*.safetensors"))) == 2
    with monkeypatch.context() as m:
        _no_nifti(m)  # a cache hit reads no NIfTI at all
        second = SliceDataset(root, "train", cache_dir=cache, augment=False,
                              progress=lambda step, total, info: calls.append(info["cached"]))
    assert calls[2:] == [True, True]
    for key in ("target", "cond", "brain", "lesion", "slice_index", "case_index"):
        assert torch.equal(getattr(first, key), getattr(second, key)), key
    assert second.case_ranges() == first.case_ranges()

    # A changed case file (new modification time) is read again.
    copy = tmp_path / "copy"
    shutil.copytree(root / splits["train"][0], copy / splits["train"][0])
    SliceDataset(copy, cache_dir=cache)
    target = copy / splits["train"][0] / "dwi.nii.gz"
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    calls.clear()
    SliceDataset(copy, cache_dir=cache, progress=lambda step, total, info: calls.append(info["cached"]))
    assert calls == [False]


# augmentation -----------------------------------------------------------------------------------
def test_flip_maps_images_and_masks_together(data, train):
    root, _, _ = data
    flipped = SliceDataset(root, "train", augment=Augmentation(flip_prob=1.0, affine_prob=0.0),
                           cache_dtype=torch.float32)
    i = int(torch.nonzero(train.has_lesion)[0])
    plain, flip = train[i], flipped[i]
    for key in ("target", "cond", "brain", "lesion"):
        # H is the first in-plane axis, x: left ↔ right.
        assert torch.equal(flip[key], torch.flip(plain[key], dims=[1])), key
    assert flip["lesion"].sum() == plain["lesion"].sum() > 0


def test_affine_keeps_masks_binary_and_aligned(painted):
    name, case, mask = painted
    # DWI made from the masks: 2 in the painted lesion, 1 in the rest of the brain, so the
    # normalised target is +1 on the lesion and −1 elsewhere in the brain.
    dwi = (1.0 + mask) * case.mask.array
    synthetic = replace(case, lesion=Volume(mask, case.mask.affine), dwi=case.dwi.with_array(dwi.astype(np.float32)))
    ds = SliceDataset([synthetic], augment=Augmentation(flip_prob=0.5, affine_prob=1.0), seed=3)
    plain = SliceDataset([synthetic], augment=False)
    moved = 0
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in torch.nonzero(ds.has_lesion).flatten().tolist():
            s = ds[i]
            for key in ("brain", "lesion"):
                assert set(torch.unique(s[key]).tolist()) <= {0.0, 1.0}, key
            assert not (s["lesion"] > s["brain"]).any()
            assert not s["target"].masked_select(s["brain"] == 0).any()
            assert s["target"].abs().max() <= 1 and s["cond"].abs().max() <= 1
            lesion, bright = s["lesion"][0].bool(), s["target"][0] > 0
            dice = 2 * (lesion & bright).sum() / (lesion.sum() + bright.sum())
            assert dice > 0.85
            moved += not torch.equal(s["lesion"], plain[i]["lesion"])
    assert moved >= 10  # the affine really moved things


def test_augmentation_is_deterministic(data):
    root, _, _ = data
    a = SliceDataset(root, "train", augment=Augmentation(affine_prob=1.0), seed=11)
    b = SliceDataset(root, "train", augment=Augmentation(affine_prob=1.0), seed=11)
    c = SliceDataset(root, "train", augment=Augmentation(affine_prob=1.0), seed=12)
    # Same (seed, epoch, index) → same sample, whatever was drawn before.
    picks = [7, 2, 7]
    first = [a[i] for i in picks]
    assert torch.equal(first[0]["target"], first[2]["target"])
    for i, s in zip(picks, first):
        assert torch.equal(s["cond"], b[i]["cond"]) and torch.equal(s["lesion"], b[i]["lesion"])
    assert not torch.equal(a[7]["target"], c[7]["target"])
    a.set_epoch(1)
    assert not torch.equal(a[7]["target"], first[0]["target"])
    # seed=None follows torch's global seed (what monai.utils.set_determinism sets).
    from monai.utils import set_determinism

    set_determinism(5)
    d = SliceDataset(root, "train")
    set_determinism(5)
    e = SliceDataset(root, "train")
    set_determinism(None)
    assert d.seed == e.seed and torch.equal(d[4]["target"], e[4]["target"])
    # Validation and test splits are not augmented unless asked.
    assert SliceDataset(root, "test").augmentation is None


# sampling -------------------------------------------------------------------------------------
def test_lesion_weights_over_sample_lesion_slices(train):
    weights, fraction, effective = lesion_slice_weights(train, 4.0)
    lesion = train.has_lesion
    assert torch.all(weights[lesion] == 4.0) and torch.all(weights[~lesion] == 1.0)
    p = lesion.double().mean().item()
    assert fraction == pytest.approx(p)
    assert effective == pytest.approx(4 * p / (4 * p + 1 - p))
    drawn = list(WeightedRandomSampler(weights, 20000, generator=torch.Generator().manual_seed(0)))
    share = lesion[drawn].double().mean().item()
    assert share == pytest.approx(effective, abs=0.02) and share > 2 * p
    assert lesion_slice_weights(train, 1.0).effective_fraction == pytest.approx(p)
    with pytest.raises(InputError, match="positive"):
        lesion_slice_weights(train, 0)


# bad input --------------------------------------------------------------------------------------
def test_missing_training_file_names_case_and_file(data, tmp_path):
    root, splits, cases = data
    name = splits["train"][0]
    shutil.copytree(root / name, tmp_path / name)
    (tmp_path / name / "adc.nii.gz").unlink()
    with pytest.raises(InputError, match=f"case {name} has no adc.nii.gz"):
        SliceDataset([tmp_path / name])
    with pytest.raises(InputError, match=f"case {name} has no mask.nii.gz"):
        SliceDataset([replace(cases[name], mask=None)])


def test_no_cases_or_empty_split(data, tmp_path):
    root, splits, _ = data
    with pytest.raises(InputError, match="no case folders"):
        SliceDataset(tmp_path)
    with pytest.raises(InputError, match="no cases given"):
        SliceDataset([])
    with pytest.raises(InputError, match="has no splits.json"):
        SliceDataset(tmp_path, "train")
    (tmp_path / "splits.json").write_text(json.dumps({"train": [], "val": ["case_009"]}))
    with pytest.raises(InputError, match="'train' .* is empty"):
        SliceDataset(tmp_path, "train")
    with pytest.raises(InputError, match="case_009 of split 'val'"):
        SliceDataset(tmp_path, "val")
    with pytest.raises(InputError, match="split 'val' in .* is empty"):
        SliceDataset(root, "val")
    with pytest.raises(InputError, match="no split 'tset'"):
        SliceDataset(root, "tset")
    with pytest.raises(InputError, match="not a case folder"):
        SliceDataset([tmp_path])


def test_cases_off_the_model_grid(data):
    _, splits, cases = data
    name, other = splits["train"]
    case = cases[name]
    cropped = replace(case, **{k: replace(getattr(case, k), array=getattr(case, k).array[:, :100]) for k in ALL})
    with pytest.raises(InputError, match=f"case {name} has 96×100 axial slices.*ctp2mri preprocess --profile demo"):
        SliceDataset([cropped], profile="demo")
    with pytest.raises(InputError, match=f"case {name} .* matches no model grid"):
        SliceDataset([cropped])
    coarse = case.ctp.affine @ np.diag([1.0, 1.0, 2.0, 1.0])
    thick = replace(case, **{k: replace(getattr(case, k), affine=coarse) for k in ALL})
    with pytest.raises(InputError, match="2 × 2 × 10 mm voxels.*preprocess --profile demo"):
        SliceDataset([thick], profile="demo")
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    las = replace(case, **{k: replace(getattr(case, k), affine=case.ctp.affine @ flip) for k in ALL})
    with pytest.raises(InputError, match="LAS voxel order"):
        SliceDataset([las], profile="demo")

    # Two cases on different grids: the demo case and the same head on the paper grid.
    fine = case.ctp.affine @ np.diag([0.5, 0.5, 1.0, 1.0])
    paper = replace(cases[other], **{k: Volume(np.repeat(np.repeat(getattr(cases[other], k).array, 2, 0), 2, 1), fine,
                                               getattr(cases[other], k).frame_times) for k in ALL})
    with pytest.raises(InputError, match=f"case {other} has 192×224 axial slices .*but case {name} has 96×112"):
        SliceDataset([case, paper])


def test_ctp_with_other_frame_count(data):
    _, splits, cases = data
    case = cases[splits["train"][0]]
    short = replace(case, ctp=case.ctp.with_array(case.ctp.array[..., :10]))
    with pytest.raises(InputError, match="10 time points but the model takes 15.*preprocess --frames 15"):
        SliceDataset([short])


def test_bad_settings(data):
    root, _, _ = data
    with pytest.raises(InputError, match="flip_prob"):
        Augmentation(flip_prob=1.5)
    with pytest.raises(InputError, match="scale"):
        Augmentation(scale=-0.1)
    with pytest.raises(InputError, match="min_brain_fraction"):
        SliceDataset(root, "train", min_brain_fraction=2, augment=False)
    with pytest.raises(InputError, match="cache_dtype"):
        SliceDataset(root, "train", cache_dtype="int8")
    with pytest.raises(InputError, match="lesion masks were given for \\['nobody'\\]"):
        SliceDataset(root, "train", lesions={"nobody": np.zeros((96, 112, 3))})
    with pytest.raises(InputError, match="split selects cases"):
        SliceDataset([root / "case_000"], "train")
    for window in ((600.0, 600.0), (float("nan"), 1.0), "wide"):
        with pytest.raises(InputError, match="ADC window"):
            SliceDataset(root, "train", adc_window=window)


def test_affine_geometry_matches_its_draw():
    # A single bright pixel moved by a pure shift lands exactly that many pixels away, and a
    # 90° rotation about the centre maps the pixel (cx + d, cy) to (cx, cy ± d).
    aug = Augmentation(flip_prob=0.0, affine_prob=1.0)
    image = torch.zeros(1, 32, 40)
    image[0, 10, 20] = 1.0
    masks = (image > 0).float()

    class Fixed:
        def __init__(self, draw):
            self._draw = draw

        def random(self):
            return 0.0  # affine applied, flip not (flip_prob 0)

        def uniform(self, lo, hi, size=None):
            return self._draw.pop(0)

    shift = Fixed([0.0, np.array([0.0, 0.0]), np.array([-3.0 / 4.0, 0.0])])  # → shift_px (−3, 0)
    moved, moved_mask = aug.apply(image, masks, shift)
    # shift_px[0] runs along W (x): output (h, w) samples input (h, w − 3) → the pixel moves to w = 23.
    assert torch.nonzero(moved_mask[0]).tolist() == [[10, 23]]
    assert moved[0, 10, 23] == pytest.approx(1.0, abs=1e-5)

    quarter = Augmentation(flip_prob=0.0, affine_prob=1.0, rotate_deg=90.0)
    image = torch.zeros(1, 32, 32)
    image[0, 16, 24] = 1.0  # centre is at (15.5, 15.5) in pixel-centre coordinates
    turn = Fixed([1.0, np.array([0.0, 0.0]), np.array([0.0, 0.0])])
    _, turned = quarter.apply(image, (image > 0).float(), turn)
    (h, w), = torch.nonzero(turned[0]).tolist()
    # Distance to the centre is kept and the pixel is now off-centre along H, not W.
    assert abs(w - 15.5) < 1 and abs(abs(h - 15.5) - 8.5) < 1
