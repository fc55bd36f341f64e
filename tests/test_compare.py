"""The compare widget's core (ctp2mri.evaluation.compare): no Qt, real phantom images."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from ctp2mri.evaluation import lesion_metrics, metrics
from ctp2mri.evaluation.compare import (
    METRIC_INFO,
    compare_volumes,
    comparison_metrics,
    prepare_comparison,
    table_rows,
    table_to_csv,
)
from ctp2mri.errors import InputError
from ctp2mri.phantom import generate_case

SPACING = (2.0, 2.0, 5.0)  # the demo profile's voxels


@pytest.fixture(scope="module")
def case():
    """A phantom stroke case cut to 6 axial slices through the lesion (fast metrics)."""
    c = generate_case(5, profile="demo")
    lesion = c.lesion.array != 0
    k = int(np.argmax(lesion.sum(axis=(0, 1))))
    z = slice(max(k - 3, 0), max(k - 3, 0) + 6)
    out = {name: getattr(c, name).array[:, :, z] for name in ("dwi", "adc", "mask", "lesion")}
    assert np.allclose(c.dwi.spacing, SPACING)
    return out


def _compare(case, **kwargs):
    """compare_volumes with the ground truth as "synthetic" unless ``kwargs`` say otherwise."""
    args = {"gt_dwi": case["dwi"], "gt_adc": case["adc"], "syn_dwi": case["dwi"],
            "syn_adc": case["adc"], "brain": case["mask"], "lesion": case["lesion"],
            "spacing": SPACING}
    args.update(kwargs)
    return compare_volumes(**args)


def test_identical_images_score_perfectly(case):
    table = _compare(case, slice_index=2, perfusion_core=case["lesion"])
    assert table["channels"] == ("DWI", "ADC")
    assert list(table["volume"]) == [k for k in METRIC_INFO]  # every row, in table order
    for scope in ("volume", "slice"):
        v = table[scope]
        for ch in ("DWI", "ADC"):
            assert v[f"{ch}_mae"] == 0 and v[f"{ch}_lesion_mae"] == 0
            assert v[f"{ch}_psnr"] == math.inf
            assert v[f"{ch}_ms_ssim"] == pytest.approx(1.0, abs=1e-6)
        assert v["core_dice"] == 1.0 and v["core_ml"] == v["gt_core_ml"] > 0
        assert v["perfusion_core_dice_lesion"] == 1.0 and v["perfusion_core_ml"] == v["lesion_ml"]
        for ch in ("DWI", "ADC"):
            assert v[f"{ch}_lesion_contrast"] == v[f"{ch}_lesion_contrast_true"]
    # the phantom's lesion: bright on DWI, dark on ADC
    assert table["volume"]["DWI_lesion_contrast"] > 1.2 and table["volume"]["ADC_lesion_contrast"] < 0.8
    # the lesion's volume is its voxel count times 2 × 2 × 5 mm³ = 0.02 ml
    lesion_in_brain = (case["lesion"] != 0) & (case["mask"] != 0)
    assert table["volume"]["lesion_ml"] == pytest.approx(lesion_in_brain.sum() * 0.02)


def test_synthetic_is_normalised_with_the_ground_truths_range(case):
    """A global brightness error stays an error (own quantiles would normalise it away)."""
    brain = case["mask"] != 0
    lo, hi = np.percentile(case["dwi"][brain], (0.5, 99.5))
    delta = 0.01 * (hi - lo)
    table = _compare(case, syn_dwi=case["dwi"] + np.float32(delta))
    assert table["ranges"]["DWI"] == pytest.approx((lo, hi), rel=1e-5)
    # every brain voxel inside the range moves by 2δ/(hi − lo) = 0.02 in [−1, 1] units; the
    # few within δ of the clip limits move less
    assert table["volume"]["DWI_mae"] == pytest.approx(0.02, rel=0.03)
    assert table["volume"]["DWI_psnr"] == pytest.approx(20 * math.log10(2 / 0.02), abs=0.3)
    own = metrics.mae(*(metrics_normalised(a, brain) for a in (case["dwi"], case["dwi"] + delta)),
                      brain)
    assert own < 0.002  # what per-image normalisation would have reported


def metrics_normalised(array, brain):
    from ctp2mri.preprocessing.preprocess import normalise_mri

    return normalise_mri(array, brain)[0]


def test_slices_add_up_to_the_volume_and_match_the_metrics(case):
    rng = np.random.default_rng(3)
    syn_dwi = case["dwi"] + rng.normal(0, 15, case["dwi"].shape).astype(np.float32)
    syn_adc = case["adc"].copy()
    syn_adc[case["lesion"] != 0] += 150  # part of the core is missed
    prepared = prepare_comparison(case["dwi"], case["adc"], syn_dwi, syn_adc, case["mask"],
                                  case["lesion"], SPACING)
    whole = comparison_metrics(prepared)
    slices = [comparison_metrics(prepared, k) for k in range(prepared.n_slices)]
    for key in ("core_ml", "gt_core_ml", "lesion_ml"):  # volumes are additive over slices
        assert sum(s[key] for s in slices) == pytest.approx(whole[key])
    assert 0 < whole["core_ml"] < whole["gt_core_ml"]
    assert 0 < whole["core_dice"] < 1
    k = 2
    brain_k = prepared.brain[..., k]
    assert slices[k]["DWI_mae"] == metrics.mae(prepared.target[0, ..., k],
                                                prepared.pred[0, ..., k], brain_k)
    assert slices[k]["DWI_ms_ssim"] == pytest.approx(metrics.ms_ssim(
        np.where(brain_k, prepared.target[0, ..., k], 0),
        np.where(brain_k, prepared.pred[0, ..., k], 0)), abs=1e-12)
    # MAE over the volume pools voxels: the brain-voxel-weighted mean of the slices' MAEs
    n = prepared.brain.sum(axis=(0, 1))
    pooled = sum(s["DWI_mae"] * c for s, c in zip(slices, n) if c) / n.sum()
    assert whole["DWI_mae"] == pytest.approx(pooled, rel=1e-9)
    # the raised lesion ADC is an error in the lesion only: the brain's summed error is the
    # lesion's
    n_lesion = prepared.lesion.sum()
    assert whole["ADC_mae"] * n.sum() == pytest.approx(whole["ADC_lesion_mae"] * n_lesion)
    assert whole["ADC_lesion_mae"] > 0
    # …and the lesion shows less on the synthetic ADC; in units, from the GT's range
    lo, hi = prepared.ranges["ADC"]
    adc_units = (prepared.pred[1] + 1) * (hi - lo) / 2 + lo
    assert whole["ADC_lesion_contrast"] == pytest.approx(
        lesion_metrics.lesion_contrast(adc_units, prepared.lesion, prepared.brain), rel=1e-6)
    assert whole["ADC_lesion_contrast_true"] < whole["ADC_lesion_contrast"] < 1
    assert slices[k]["DWI_lesion_contrast_true"] == pytest.approx(lesion_metrics.lesion_contrast(
        (prepared.target[0, ..., k] + 1) * np.subtract(*prepared.ranges["DWI"][::-1]) / 2
        + prepared.ranges["DWI"][0], prepared.lesion[..., k], brain_k), rel=1e-6)


def test_optional_inputs(case):
    no_gt_adc = _compare(case, gt_adc=None)
    assert no_gt_adc["channels"] == ("DWI",)
    assert "ADC_mae" not in no_gt_adc["volume"] and "core_dice" not in no_gt_adc["volume"]
    assert no_gt_adc["volume"]["core_dice_lesion"] > 0.8  # the phantom's core is its lesion
    bare = _compare(case, gt_adc=None, syn_adc=None, lesion=None)
    assert set(bare["volume"]) == {"DWI_mae", "DWI_lesion_mae", "DWI_psnr", "DWI_ms_ssim"}
    assert math.isnan(bare["volume"]["DWI_lesion_mae"])
    # without a brain mask the brain is where the ground-truth DWI is above 0
    derived = _compare(case, syn_dwi=case["dwi"] * np.float32(1.05), brain=None)
    explicit = _compare(case, syn_dwi=case["dwi"] * np.float32(1.05),
                        brain=(case["dwi"] > 0).astype(np.uint8))
    assert derived["volume"] == explicit["volume"]


def test_perfusion_core_rows_are_dice_and_volume_against_the_lesion(case):
    lesion = case["lesion"] != 0
    perfusion_core = np.roll(lesion, 3, axis=0).astype(np.uint8)  # overlaps the lesion in part
    perfusion_core[:3] = 0
    perfusion_core[0, 0, :] = 1  # outside the brain: not counted, as the lesion there
    table = _compare(case, perfusion_core=perfusion_core, slice_index=2)
    brain = case["mask"] != 0
    inside, lesion_in = (perfusion_core != 0) & brain, lesion & brain
    for scope, cut in (("volume", np.s_[...]), ("slice", np.s_[..., 2])):
        values = table[scope]
        assert values["perfusion_core_dice_lesion"] == lesion_metrics.dice(inside[cut], lesion_in[cut])
        assert values["perfusion_core_ml"] == lesion_metrics.volume_ml(inside[cut], SPACING)
    assert 0 < table["volume"]["perfusion_core_dice_lesion"] < 1
    # beside the synthetic ADC core's rows, labelled as the widget shows them
    keys = list(table["volume"])
    assert keys.index("perfusion_core_dice_lesion") == keys.index("core_dice_lesion") + 1
    assert keys.index("perfusion_core_ml") == keys.index("core_ml") + 1
    labels = {row["metric"]: row["label"] for row in table_rows(table)}
    assert labels["perfusion_core_dice_lesion"].startswith("perfusion core Dice")
    assert labels["perfusion_core_ml"] == "perfusion core volume (ml)"
    # without a lesion only the volume can be given; without the mask neither row
    assert "perfusion_core_dice_lesion" not in _compare(case, perfusion_core=perfusion_core,
                                                        lesion=None)["volume"]
    assert not any(k.startswith("perfusion") for k in _compare(case)["volume"])
    with pytest.raises(InputError, match="perfusion core .* same grid"):
        _compare(case, perfusion_core=perfusion_core[:, :, :2])


@pytest.mark.parametrize("change, message", [
    ({"syn_dwi": np.zeros((4, 4, 4), np.float32)}, "same grid"),
    ({"lesion": np.zeros((96, 112, 2), np.uint8)}, "same grid"),
    ({"gt_dwi": np.zeros((96, 112, 6, 15), np.float32)}, "3-D volume"),
    ({"syn_adc": np.full((96, 112, 6), np.nan, np.float32)}, "NaN"),
    ({"brain": np.zeros((96, 112, 6), np.uint8)}, "brain mask is empty"),
    ({"spacing": (2.0, 0.0, 5.0)}, "spacing"),
    ({"slice_index": 6}, "outside"),
])
def test_bad_input_says_what_to_fix(case, change, message):
    with pytest.raises(InputError, match=message):
        _compare(case, **change)


def test_csv_round_trip(case, tmp_path):
    table = _compare(case, syn_dwi=case["dwi"] * np.float32(0.9), slice_index=3)
    path = table_to_csv(table, tmp_path / "out" / "comparison.csv")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["metric", "label", "whole_volume", "slice_3"]
    written = {r[0]: r for r in rows[1:]}
    for row in table_rows(table):
        assert float(written[row["metric"]][2]) == row["whole_volume"]  # full precision
        assert float(written[row["metric"]][3]) == row["slice"]
        assert written[row["metric"]][1] == METRIC_INFO[row["metric"]][0]
    assert float(written["range_hi_DWI"][2]) == table["ranges"]["DWI"][1]
    assert sorted(p.name for p in path.parent.iterdir()) == ["comparison.csv"]  # no temp left
