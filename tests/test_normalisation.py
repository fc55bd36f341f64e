"""The normalisation contract as the slice dataset applies it: CTP, DWI on its quantiles or its
anchor, ADC on the fixed window or per-case quantiles, the record a checkpoint keeps, the cache."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from _helpers_data import data, sample_of, train  # noqa: F401 (fixtures)

from ctp2mri.case_slices import adc_window_of, dwi_hi_median_of, normalisation_of
from ctp2mri.data import SliceDataset, normalise_case
from ctp2mri.errors import InputError
from ctp2mri.preprocessing.preprocess import denormalise_mri
from ctp2mri.training.batches import load_dataset


def test_samples_follow_the_normalisation_contract(train, data):
    _, splits, cases = data
    sample = train[0]
    assert sample["target"].shape == (2, 96, 112) and sample["cond"].shape == (15, 96, 112)
    assert sample["brain"].shape == (1, 96, 112) and sample["lesion"].shape == (1, 96, 112)
    assert all(sample[k].dtype == torch.float32 for k in ("target", "cond", "brain", "lesion"))
    assert sample["case"] in splits["train"] and isinstance(sample["slice"], int)

    outside = train.brain == 0
    for images in (train.target, train.cond):
        assert images.min() >= -1 and images.max() <= 1
        assert not images.masked_select(outside).any()  # zero outside the brain, every channel
    assert set(torch.unique(train.brain).tolist()) == {0, 1}

    # Independent recomputation of the contract for one slice of each case: (H, W) = (X, Y).
    for name, case in cases.items():
        brain = case.mask.array.astype(bool)
        z = int(np.argmax(brain.sum(axis=(0, 1))))
        got = sample_of(train, name, z)
        for channel, image in enumerate((case.dwi.array, case.adc.array)):
            # DWI (arbitrary units): the case's brain quantiles; ADC (physical): the fixed window
            lo, hi = np.percentile(image[brain], [0.5, 99.5]) if channel == 0 else (200.0, 2600.0)
            expect = (2 * (np.clip(image[:, :, z], lo, hi) - lo) / (hi - lo) - 1) * brain[:, :, z]
            np.testing.assert_allclose(got["target"][channel].numpy(), expect, atol=1e-5)
            assert train.case_ranges()[name][("dwi", "adc")[channel]] == pytest.approx((lo, hi), rel=1e-6)
        hu = case.ctp.array[:, :, z, :].astype(np.float64).transpose(2, 0, 1)
        expect = (np.clip(hu, 0, 200) / 100 - 1) * brain[None, :, :, z]
        np.testing.assert_allclose(got["cond"].numpy(), expect, atol=1e-6)
        np.testing.assert_array_equal(got["brain"][0].numpy(), brain[:, :, z])


def test_intensity_ranges_are_medians_and_invert_the_normalisation(train, data):
    _, _, cases = data
    ranges = train.intensity_ranges()
    per_case = np.array([np.percentile(c.dwi.array[c.mask.array.astype(bool)], [0.5, 99.5]) for c in cases.values()])
    assert ranges["dwi"]["lo"] == pytest.approx(np.median(per_case[:, 0]), rel=1e-6)
    assert ranges["dwi"]["hi"] == pytest.approx(np.median(per_case[:, 1]), rel=1e-6)
    assert ranges["dwi_hi_median"] is None and dwi_hi_median_of(json.loads(json.dumps(ranges))) is None
    # ADC (1e-6 mm²/s): the fixed window for every case, recorded for adc_window_of
    assert (ranges["adc"]["lo"], ranges["adc"]["hi"]) == (200.0, 2600.0) and ranges["adc_window"] == [200.0, 2600.0]
    assert adc_window_of(json.loads(json.dumps(ranges))) == (200.0, 2600.0)  # goes into config.json
    # Back to physical units with the case's ADC range (the window): the clipped ADC inside the brain.
    name, case = next(iter(cases.items()))
    z = int(np.argmax(case.mask.array.sum(axis=(0, 1))))
    lo, hi = train.case_ranges()[name]["adc"]
    brain = case.mask.array[:, :, z]
    back = denormalise_mri(sample_of(train, name, z)["target"][1].numpy(), lo, hi, brain)
    np.testing.assert_allclose(back, np.clip(case.adc.array[:, :, z], lo, hi) * brain, rtol=1e-5, atol=1e-2)


def test_adc_window_maps_one_value_alike_in_every_case_and_legacy_keeps_quantiles(data, train):
    """The fixed window gives ADC one scale across cases (the core threshold means the same
    everywhere); adc_window=None is the per-case quantile mapping that older models expect."""
    root, _, cases = data
    legacy = SliceDataset(root, "train", "demo", augment=False, cache_dtype=torch.float32, adc_window=None)
    assert legacy.intensity_ranges()["adc_window"] is None and adc_window_of(legacy.intensity_ranges()) is None
    assert adc_window_of({}) is None  # a checkpoint from before the window
    with pytest.raises(InputError, match="ADC window"):
        adc_window_of({"adc_window": "wide"})  # a damaged config.json: a clear error, not a ValueError
    threshold = -1 + 2 * (620.0 - 200.0) / 2400.0  # 620 × 10⁻⁶ mm²/s on the window's scale
    for name, case in cases.items():
        brain = case.mask.array.astype(bool)
        lo, hi = np.percentile(case.adc.array[brain], [0.5, 99.5])
        assert legacy.case_ranges()[name]["adc"] == pytest.approx((lo, hi), rel=1e-6)
        assert train.case_ranges()[name]["adc"] == (200.0, 2600.0)
        rows = (train.case_index == train.case_names.index(name)).nonzero()[:, 0]
        below = (train.target[rows, 1] < threshold) & (train.brain[rows, 0] > 0)
        expect = (case.adc.array[:, :, train.slice_index[rows].numpy()] < 620) & brain[:, :, train.slice_index[rows].numpy()]
        assert torch.equal(below, torch.from_numpy(np.moveaxis(expect, -1, 0)))
    assert not torch.equal(legacy.target[:, 1], train.target[:, 1])


def test_dwi_anchor_puts_normal_tissue_on_one_level_and_is_recorded(data, train):
    """dwi_hi_median=1.6: DWI's upper bound at 1.6 × the brain median, so the median brain voxel
    lands on one value in every case, where the default 99.5 % quantile moves with the lesion's
    size and brightness; recorded for dwi_hi_median_of, refused when a model needs the other."""
    root, _, cases = data
    anchored = SliceDataset(root, "train", "demo", augment=False, cache_dtype=torch.float32, dwi_hi_median=1.6)
    assert anchored.intensity_ranges()["dwi_hi_median"] == 1.6
    assert dwi_hi_median_of(json.loads(json.dumps(anchored.intensity_ranges()))) == 1.6  # goes into config.json
    assert dwi_hi_median_of({}) is None  # a checkpoint from before the option: the quantiles
    assert normalisation_of({"adc_window": [200, 2600], "dwi_hi_median": 1.6}) == {"adc_window": (200.0, 2600.0),
                                                                                  "dwi_hi_median": 1.6}
    for bad in (1.0, 0.5, float("inf"), "bright"):
        with pytest.raises(InputError, match="DWI upper bound"):
            dwi_hi_median_of({"dwi_hi_median": bad})
    levels = []
    for name, case in cases.items():
        brain = case.mask.array.astype(bool)
        lo, median = np.percentile(case.dwi.array[brain], 0.5), np.median(case.dwi.array[brain])
        assert anchored.case_ranges()[name]["dwi"] == pytest.approx((lo, 1.6 * median), rel=1e-5)
        levels.append(-1 + 2 * (median - lo) / (1.6 * median - lo))  # where the median voxel lands
        rows = (anchored.case_index == anchored.case_names.index(name)).nonzero()[:, 0]
        values = anchored.target[rows, 0][anchored.brain[rows, 0] > 0]
        assert float(values.median()) == pytest.approx(levels[-1], abs=0.02)  # the slices kept hold most of the brain
        assert torch.equal(anchored.target[rows, 1], train.target[rows, 1])  # ADC untouched
    assert not torch.equal(anchored.target[:, 0], train.target[:, 0])
    assert max(levels) - min(levels) < 0.1
    # a cache written on one scale is not read for the other; the default's key is unchanged
    from ctp2mri.slice_cache import cache_key

    folder, prof = root / anchored.case_names[0], anchored.profile
    default_key = cache_key(folder, prof, 0.01, torch.float16, (200.0, 2600.0))
    assert cache_key(folder, prof, 0.01, torch.float16, (200.0, 2600.0), None) == default_key
    assert cache_key(folder, prof, 0.01, torch.float16, (200.0, 2600.0), 1.6) != default_key
    # a dataset built one way is refused for a model trained the other way
    with pytest.raises(InputError, match="DWI upper bound is the 99.5 % brain quantile but the model needs 1.6"):
        load_dataset(train, "demo", 0, adc_window=(200.0, 2600.0), dwi_hi_median=1.6)
    with pytest.raises(InputError, match="DWI upper bound is 1.6 × the brain median but the model needs the 99.5"):
        load_dataset(anchored, "demo", 0, adc_window=(200.0, 2600.0))
    assert load_dataset(anchored, "demo", 0, adc_window=(200.0, 2600.0), dwi_hi_median=1.6) is anchored


def test_adc_in_other_units_is_refused_on_the_window_and_named(data):
    _, _, cases = data
    name, case = next(iter(cases.items()))
    for scale in (1e-3, 1e-6):  # ADC in 10⁻³ mm²/s or mm²/s: clipped to a constant without the check
        other = replace(case, adc=case.adc.with_array(case.adc.array * scale))
        with pytest.raises(InputError, match=r"adc.nii.gz: its ADC has a median of .* must be in 10⁻⁶ mm²/s"):
            normalise_case(other, name, "demo")
        normalise_case(other, name, "demo", adc_window=None)  # per-case quantiles do not read units


def test_cache_of_one_adc_window_is_not_read_for_another(data, tmp_path):
    root, _, _ = data
    calls = []
    for window in ((200.0, 2600.0), None, (200.0, 2600.0)):
        SliceDataset(root, "train", cache_dir=tmp_path, augment=False, adc_window=window,
                     progress=lambda step, total, info: calls.append(info["cached"]))
    assert calls == [False] * 4 + [True] * 2 and len(list(tmp_path.glob("*.safetensors"))) == 4
