"""`ctp2mri evaluate`: per-case CSV, Table-1 summary, core estimate, figure, cancel, errors."""

from __future__ import annotations

import csv
import json
import math
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from _helpers_cldm import ANCHORED_DWI_NORMALISATION, LEGACY_NORMALISATION, save_tiny_cldm

from ctp2mri.casefolder import read_case, write_case
from ctp2mri.data import normalise_case
from ctp2mri.errors import Cancelled, InputError
from ctp2mri.evaluation.evaluate import evaluate, fid_status
from ctp2mri.evaluation.lesion_metrics import core_mask_from_adc, dice
from ctp2mri.evaluation.metrics import METRICS, channel_metrics, flat_metrics
from ctp2mri.evaluation.report import format_report
from ctp2mri.evaluation.scoring import case_seed, figure_rows, score_case
from ctp2mri.evaluation.tables import summarise
from ctp2mri.progress import CancelToken
from ctp2mri.synthesis.inference import sample_slices
from ctp2mri.synthesis.loading import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 2
CASES = ["case_000", "case_001"]  # both phantom cases of seed 7 have a core


@pytest.fixture(scope="module")
def data(held_out_data, tmp_path_factory):
    """``generate_dataset(root, 2, seed=7)`` with both cases in the test split: the session's
    seed-7 cases (a larger dataset's first cases equal a smaller one's), copied, since this
    module writes its own splits.json."""
    root = tmp_path_factory.mktemp("evaluate") / "phantom"
    for name in CASES:
        shutil.copytree(held_out_data / name, root / name)
    splits = json.loads((held_out_data / "splits.json").read_text())
    # two cases all go to "train" by default; make them the test split
    splits.update(train=[], test=CASES, case_seeds={name: splits["case_seeds"][name] for name in CASES})
    (root / "splits.json").write_text(json.dumps(splits))
    return root


@pytest.fixture(scope="module")
def result(data, tiny_cldm, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluate-out")
    calls = []
    rows, summary = evaluate(tiny_cldm, data, "test", n_steps=STEPS, seed=3, batch_size=8, device="cpu",
                             out_csv=out / "results.csv", figure=out / "figure.png",
                             progress=lambda step, total, info: calls.append((step, total, info)))
    return rows, summary, out, calls


def test_csv_has_one_row_per_case_with_the_table1_columns(result):
    rows, _, out, _ = result
    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["case"] for r in table] == CASES and [r["model"] for r in table] == ["cLDM"] * 2
    expected = {f"{ch}_{m}" for ch in ("DWI", "ADC") for m in METRICS}
    expected |= {"core_dice", "core_pred_ml", "core_true_ml", "core_volume_diff_ml", "core_gt_adc_dice",
                 "n_slices", "lesion_voxels", "steps", "eta", "seed", "sampler"}
    assert expected <= set(table[0])
    for written, row in zip(table, rows):
        for key in expected - {"sampler"}:
            assert math.isclose(float(written[key]), float(row[key]), rel_tol=1e-12), key
    assert table[0]["steps"] == str(STEPS) and table[0]["seed"] == "3"
    assert not [p for p in out.iterdir() if p.name not in ("results.csv", "figure.png")]  # no temp files


def test_numbers_equal_a_direct_recomputation(result, data, tiny_cldm):
    rows, summary, _, _ = result
    # one case resampled and scored by hand, as a (2, X, Y, Z) volume (the paper's per-case layout)
    name = CASES[1]
    model = load_model(tiny_cldm, "cpu")
    case = read_case(data / name, require=("ctp", "dwi", "adc", "mask", "lesion"))
    part = normalise_case(case, name, "demo", min_brain_fraction=0.0)
    # every slice holding brain is scored
    assert list(part.slices) == list(np.flatnonzero(case.mask.array.any(axis=(0, 1))))
    pred = sample_slices(model, torch.from_numpy(part.cond), n_steps=STEPS, seed=case_seed(3, name),
                         batch_size=32, ids=part.slices.tolist()).numpy() * part.brain
    vol = np.zeros((2, *case.mask.array.shape), np.float32)
    gt = np.zeros_like(vol)
    vol[:, :, :, part.slices] = pred.transpose(1, 2, 3, 0)
    gt[:, :, :, part.slices] = part.target.transpose(1, 2, 3, 0)
    lesion = (case.lesion.array > 0) & (case.mask.array > 0)
    direct = flat_metrics(channel_metrics(vol, gt, case.mask.array, lesion, layout="volume"))
    for key, value in direct.items():
        assert math.isclose(rows[1][key], value, rel_tol=1e-6, abs_tol=1e-9), key
    # the summary is mean ± SD (ddof 1) over the two cases' rows
    for key in [*direct, "core_dice", "core_abs_volume_diff_ml"]:
        values = np.array([r[key] for r in rows], dtype=float)
        assert math.isclose(summary["cLDM"][key]["mean"], values.mean(), rel_tol=1e-9), key
        assert math.isclose(summary["cLDM"][key]["std"], values.std(ddof=1), rel_tol=1e-9), key
        assert summary["cLDM"][key]["n"] == 2


def test_core_of_a_perfect_prediction_is_the_true_adc_core(data):
    """Scored with the ground truth as prediction: zero error, and the core from the ADC mapped
    back with the case's range is the core of the true ADC (the range round trip is exact)."""
    name = CASES[0]
    case = read_case(data / name, require=("ctp", "dwi", "adc", "mask", "lesion"))
    part = normalise_case(case, name, "demo", min_brain_fraction=0.0)
    row, core = score_case(name, "oracle", case, part, part.target.copy(), {})
    assert row["DWI_mae"] == 0 and row["ADC_lesion_mae"] == 0 and row["ADC_psnr"] == math.inf
    assert row["DWI_ms_ssim"] == pytest.approx(1.0, abs=1e-6)
    true_core = core_mask_from_adc(case.adc.array, case.mask.array, spacing=case.ctp.spacing)
    assert dice(core, true_core) > 0.99
    assert row["core_dice"] == pytest.approx(row["core_gt_adc_dice"], abs=0.01)
    assert row["core_dice"] > 0.8  # the phantom's core is where its ADC is low
    assert row["core_true_ml"] == pytest.approx(case.lesion.array.sum() * np.prod(case.ctp.spacing) / 1000)
    # the phantom's lesion is bright on DWI and dark on ADC, and a perfect prediction shows it so
    for channel in ("DWI", "ADC"):
        assert row[f"{channel}_lesion_contrast"] == row[f"{channel}_lesion_contrast_true"]
    assert row["DWI_lesion_contrast"] > 1.2 and row["ADC_lesion_contrast"] < 0.8


def test_lesion_contrast_is_one_when_the_lesion_is_painted_over(data):
    """A prediction that is the truth with the lesion replaced by the tissue around it: its
    voxel errors are only in the lesion, and its contrast says the lesion is not there."""
    name = CASES[0]
    case = read_case(data / name, require=("ctp", "dwi", "adc", "mask", "lesion"))
    part = normalise_case(case, name, "demo", min_brain_fraction=0.0)
    pred = part.target.copy()
    lesion, brain = part.lesion[:, 0] > 0, part.brain[:, 0] > 0
    for c in range(2):
        channel = pred[:, c]
        channel[lesion] = np.median(channel[brain & ~lesion])
    row, _ = score_case(name, "painted over", case, part, pred, {})
    assert row["DWI_lesion_mae"] > 0.2 and row["DWI_mae"] < row["DWI_lesion_mae"] / 10
    for channel in ("DWI", "ADC"):
        assert row[f"{channel}_lesion_contrast"] == pytest.approx(1.0, abs=1e-3)
        assert abs(row[f"{channel}_lesion_contrast_true"] - 1.0) > 0.2


def test_lesion_free_case_has_no_dice_but_counts_its_false_core(data):
    """An all-zero lesion mask: Dice is undefined (not 1.0 for "no core"), so it does not
    enter the mean over lesion cases; a false core still shows as volume difference."""
    name = CASES[1]
    full = read_case(data / name, require=("ctp", "dwi", "adc", "mask", "lesion"))
    case = replace(full, lesion=replace(full.lesion, array=np.zeros_like(full.lesion.array)))
    part = normalise_case(case, name, "demo", min_brain_fraction=0.0)
    truth_row, _ = score_case(name, "m", case, part, part.target.copy(), {})
    assert math.isnan(truth_row["core_dice"]) and math.isnan(truth_row["core_gt_adc_dice"])
    assert math.isnan(truth_row["ADC_lesion_contrast"]) and math.isnan(truth_row["ADC_lesion_mae"])
    assert truth_row["core_true_ml"] == 0 and truth_row["core_abs_volume_diff_ml"] == truth_row["core_pred_ml"]
    lesion_row, _ = score_case(CASES[0], "m", *_normalised(data, CASES[0]), {})
    rows = [{**truth_row, "model": "m"}, {**lesion_row, "model": "m"}]
    text = format_report(summarise(rows), rows, n_steps=1, eta=0.0, seed=0, split="test")
    assert f"Dice {lesion_row['core_dice']:.3f} over 1 lesion cases" in text
    assert "over 2 cases" in text and "Lesion contrast" in text


def _normalised(data, name):
    """(case, its slices, a perfect prediction) for `score_case`."""
    case = read_case(data / name, require=("ctp", "dwi", "adc", "mask", "lesion"))
    part = normalise_case(case, name, "demo", min_brain_fraction=0.0)
    return case, part, part.target.copy()


def test_case_without_lesion_mask_has_no_lesion_scores(data):
    name = CASES[1]
    case = replace(read_case(data / name, require=("ctp", "dwi", "adc", "mask")), lesion=None)
    part = normalise_case(case, name, "demo", min_brain_fraction=0.0)
    pred = part.target.copy()
    pred[:, 1] = -1.0 * part.brain[:, 0]  # the lowest ADC everywhere in the brain: all core
    row, core = score_case(name, "m", case, part, pred, {})
    assert math.isnan(row["DWI_lesion_mae"]) and math.isnan(row["core_dice"])
    brain_ml = case.mask.array.sum() * np.prod(case.ctp.spacing) / 1000
    assert row["core_pred_ml"] == pytest.approx(brain_ml, rel=1e-6) and core.sum() == case.mask.array.sum()


def test_progress_covers_every_slice_step(result):
    rows, _, _, calls = result
    total = sum(r["n_slices"] for r in rows) * STEPS
    steps = [c[0] for c in calls]
    assert steps == sorted(steps) and steps[-1] == total and {c[1] for c in calls} == {total}
    assert {(c[2]["case"], c[2]["cases_done"], c[2]["cases_total"]) for c in calls} == {
        (name, i, len(CASES)) for i, name in enumerate(CASES)}


def test_figure_rows_show_every_model_on_the_largest_lesions():
    cands = {c: [f"{c}/base", f"{c}/pt"] for c in ("a", "b", "c", "d")}
    voxels = {"a": 0, "b": 50, "c": 900, "d": 50}
    assert figure_rows(cands, voxels, rows=4) == ["c/base", "c/pt", "b/base", "b/pt"]  # ties keep case order
    assert figure_rows({c: v[:1] for c, v in cands.items()}, voxels, rows=3) == ["c/base", "b/base", "d/base"]
    assert figure_rows({c: v * 3 for c, v in cands.items()}, voxels, rows=4) == ["c/base", "c/pt"] * 3  # ≥ 1 case
    assert figure_rows({}, {}) == []


def test_figure_is_a_png_with_a_row_per_case(result):
    import matplotlib.image

    _, _, out, _ = result
    image = matplotlib.image.imread(out / "figure.png")
    assert image.ndim == 3 and image.shape[1] > image.shape[0] > 300  # 2 rows of 5 panels
    assert image[..., :3].std() > 0.05


def test_report_is_table1_shaped_and_states_the_sampler(result):
    rows, summary, _, _ = result
    text = format_report(summary, rows, n_steps=STEPS, eta=0.0, seed=3, split="test",
                         fid_message=fid_status())
    assert f"DDIM, {STEPS} steps, eta = 0, seed 3" in text and "2 cases" in text
    assert "| cLDM |" in text and "DWI Lesion MAE↓" in text and "ADC MS-SSIM↑" in text
    assert "FID skipped: Inception weights not available offline" in text
    assert "Infarct core" in text and "over 2 lesion cases" in text
    assert "Lesion contrast" in text and "(true " in text


def test_in_memory_cases_score_as_the_same_cases_written_as_folders(result, data, tiny_cldm, tmp_path):
    """Cases in memory are scored directly (nothing written), with exactly the numbers of the
    same cases in case folders, and of the data folder's split (but for the ``split`` column)."""
    cases = [read_case(data / name) for name in CASES]
    for case in cases:
        case.path = None  # named by case.json's "case", as a case made in napari
    folders = [write_case(case, tmp_path / "written" / case.info["case"]) for case in cases]
    settings = dict(n_steps=STEPS, seed=3, batch_size=8, device="cpu")
    in_memory, summary = evaluate(tiny_cldm, cases, **settings)
    from_folders, _ = evaluate(tiny_cldm, folders, **settings)
    assert [(r["case"], r["split"]) for r in in_memory] == [(name, "all") for name in CASES]
    assert [list(r) for r in in_memory] == [list(r) for r in from_folders]
    np.testing.assert_equal(in_memory, from_folders)  # to the last digit, NaN where NaN
    split_rows, _, _, _ = result
    np.testing.assert_equal([{**r, "split": "all"} for r in split_rows], in_memory)
    assert summary["cLDM"]["DWI_mae"]["n"] == 2


def test_several_models_share_cases_and_seeds(data, tiny_cldm):
    rows, summary = evaluate({"a": tiny_cldm, "b": tiny_cldm}, data, "test", n_steps=1, device="cpu",
                             max_cases=1)
    assert [(r["case"], r["model"]) for r in rows] == [("case_000", "a"), ("case_000", "b")]
    assert rows[0]["DWI_mae"] == rows[1]["DWI_mae"]  # same weights, same noise
    assert set(summary) == {"a", "b"}


def test_older_models_are_scored_on_the_scales_they_were_trained_on(data, tiny_cldm, tmp_path):
    """Each model is scored on the scales it was trained on: ADC on the fixed window or (older
    checkpoints) each case's quantiles, DWI up to its 99.5 % quantile or (the DWI anchor) 1.6 ×
    the brain median; same weights and noise, so only the scales differ."""
    anchored = save_tiny_cldm(tmp_path / "anchored", normalisation=ANCHORED_DWI_NORMALISATION)
    legacy = save_tiny_cldm(tmp_path / "legacy", normalisation=LEGACY_NORMALISATION)
    rows, _ = evaluate({"window": tiny_cldm, "anchored DWI": anchored, "legacy": legacy}, data, "test",
                       n_steps=1, device="cpu", max_cases=1)
    name = rows[0]["case"]
    case = read_case(data / name, require=("ctp", "dwi", "adc", "mask", "lesion"))
    lesion = (case.lesion.array > 0) & (case.mask.array > 0)
    model = load_model(tiny_cldm, "cpu")
    for row, (window, anchor) in zip(rows, (((200.0, 2600.0), None), ((200.0, 2600.0), 1.6), (None, None))):
        part = normalise_case(case, name, "demo", min_brain_fraction=0.0, adc_window=window, dwi_hi_median=anchor)
        pred = sample_slices(model, torch.from_numpy(part.cond), n_steps=1, seed=case_seed(0, name),
                             batch_size=32, ids=part.slices.tolist()).numpy() * part.brain
        vol, gt = (np.zeros((2, *case.mask.array.shape), np.float32) for _ in range(2))
        vol[:, :, :, part.slices], gt[:, :, :, part.slices] = pred.transpose(1, 2, 3, 0), part.target.transpose(1, 2, 3, 0)
        direct = flat_metrics(channel_metrics(vol, gt, case.mask.array, lesion, layout="volume"))
        assert math.isclose(row["ADC_mae"], direct["ADC_mae"], rel_tol=1e-6), row["model"]
        assert math.isclose(row["DWI_mae"], direct["DWI_mae"], rel_tol=1e-6), row["model"]
    assert rows[0]["DWI_mae"] != rows[1]["DWI_mae"] and rows[0]["ADC_mae"] == rows[1]["ADC_mae"]
    assert rows[0]["DWI_mae"] == rows[2]["DWI_mae"] and rows[0]["ADC_mae"] != rows[2]["ADC_mae"]


def test_several_seeds_give_a_row_per_case_and_seed(result, data, tiny_cldm, tmp_path, capsys):
    """--seed 3 4: seed 3's rows are the single-seed run's, and the summary is over all rows."""
    single, _, _, _ = result
    calls = []
    rows, summary = evaluate(tiny_cldm, data, "test", n_steps=STEPS, seed=[3, 4], batch_size=8,
                             device="cpu", progress=lambda *c: calls.append(c))
    assert [(r["case"], r["seed"]) for r in rows] == [(c, s) for c in CASES for s in (3, 4)]
    for row in rows[::2]:
        one = next(r for r in single if r["case"] == row["case"])
        assert {k: v for k, v in row.items() if k != "seed"} == pytest.approx(
            {k: v for k, v in one.items() if k != "seed"}, nan_ok=True)
    assert rows[0]["DWI_mae"] != rows[1]["DWI_mae"]  # another draw
    assert summary["cLDM"]["DWI_mae"]["n"] == 4
    assert summary["cLDM"]["DWI_mae"]["mean"] == pytest.approx(np.mean([r["DWI_mae"] for r in rows]))
    assert calls[-1][0] == calls[-1][1] == 2 * sum(r["n_slices"] for r in single) * STEPS
    text = format_report(summary, rows, n_steps=STEPS, eta=0.0, seed=[3, 4], split="test")
    assert "seeds 3, 4" in text and "over cases and seeds" in text
    with pytest.raises(InputError, match="different sampling seeds"):
        evaluate(tiny_cldm, data, "test", n_steps=STEPS, seed=[3, 3], device="cpu")
    # the CLI takes them after one --seed and writes one CSV row per case and seed
    from ctp2mri.cli import main

    assert main(["evaluate", "--model", str(tiny_cldm), "--data", str(data), "--steps", "1",
                 "--seed", "5", "6", "--device", "cpu", "--max-cases", "1", "--out",
                 str(tmp_path / "r.csv"), "--table", str(tmp_path / "t.md")]) == 0
    with open(tmp_path / "r.csv", newline="") as f:
        assert [r["seed"] for r in csv.DictReader(f)] == ["5", "6"]
    with open(tmp_path / "t.csv", newline="") as f:
        assert next(csv.DictReader(f))["seed"] == "5 6"
    assert "seeds 5, 6" in capsys.readouterr().out


def test_samples_scores_the_mean_of_k_draws_as_synthesize_outputs_it(data, tiny_cldm, tmp_path, capsys):
    """--samples K: each slice's K draws (the seeds synthesize gives them) averaged, then scored;
    the progress counts every draw, and the report and CSVs say how it was sampled."""
    name = CASES[1]
    calls = []
    rows, _ = evaluate(tiny_cldm, data, "test", n_steps=STEPS, seed=3, batch_size=8, device="cpu", max_cases=2,
                       samples=3, progress=lambda *c: calls.append(c))
    row = rows[1]
    model = load_model(tiny_cldm, "cpu")
    case = read_case(data / name, require=("ctp", "dwi", "adc", "mask", "lesion"))
    part = normalise_case(case, name, "demo", min_brain_fraction=0.0)
    draws = sample_slices(model, torch.from_numpy(part.cond), n_steps=STEPS, seed=case_seed(3, name), batch_size=32,
                          ids=part.slices.tolist(), samples=3).numpy()
    n = len(part.slices)
    assert not np.allclose(draws[0::3], draws[1::3])  # the draws differ
    mean = draws.reshape(n, 3, *draws.shape[1:]).mean(axis=1) * part.brain
    direct, _ = score_case(name, "cLDM", case, part, mean, {})
    one, _ = score_case(name, "cLDM", case, part, draws[0::3] * part.brain, {})
    for key in ("DWI_mae", "ADC_mae", "ADC_lesion_mae", "core_dice", "ADC_lesion_auc"):
        assert row[key] == pytest.approx(direct[key], rel=1e-6, nan_ok=True), key
    assert row["DWI_mae"] != pytest.approx(one["DWI_mae"], rel=1e-4)
    assert row["samples"] == 3 and calls[-1][0] == calls[-1][1] == 3 * STEPS * sum(r["n_slices"] for r in rows)
    text = format_report(summarise(rows), rows, n_steps=STEPS, eta=0.0, seed=3, split="test")
    assert f"DDIM, {STEPS} steps, mean of 3 samples" in text
    from ctp2mri.cli import main

    assert main(["evaluate", "--model", str(tiny_cldm), "--data", str(data), "--steps", "1", "--samples", "2",
                 "--device", "cpu", "--max-cases", "1", "--out", str(tmp_path / "r.csv"),
                 "--table", str(tmp_path / "t.md")]) == 0
    with open(tmp_path / "t.csv", newline="") as f:
        assert next(csv.DictReader(f))["samples"] == "2"
    assert "mean of 2 samples" in (tmp_path / "t.md").read_text()
    capsys.readouterr()
    assert main(["evaluate", "--model", str(tiny_cldm), "--data", str(data), "--samples", "0",
                 "--device", "cpu"]) != 0
    with pytest.raises(InputError, match="samples must be a whole number"):
        evaluate(tiny_cldm, data, "test", n_steps=1, device="cpu", samples=1.5)


def test_cancel_leaves_no_output(data, tiny_cldm, tmp_path):
    token = CancelToken()

    def progress(step, total, info):
        if info["case"] == CASES[1]:
            token.cancel()  # during the second case, after the first was scored

    with pytest.raises(Cancelled):
        evaluate(tiny_cldm, data, "test", n_steps=STEPS, device="cpu", out_csv=tmp_path / "r.csv",
                 figure=tmp_path / "f.png", progress=progress, cancel=token)
    assert list(tmp_path.iterdir()) == []


def test_cli_prints_the_table_and_writes_the_csv(data, tiny_cldm, tmp_path, capsys):
    from ctp2mri.cli import main

    assert main(["evaluate", "--model", str(tiny_cldm), "--data", str(data), "--steps", "1",
                 "--device", "cpu", "--max-cases", "1", "--out", str(tmp_path / "r.csv")]) == 0
    printed = capsys.readouterr().out
    assert "| cLDM |" in printed and "FID skipped" in printed and "DDIM, 1 steps" in printed
    assert len((tmp_path / "r.csv").read_text().strip().splitlines()) == 2
    # --out naming the CSV that --table writes beside its Markdown: refused before any sampling
    kept = (tmp_path / "r.csv").read_text()
    for table in ("r.md", "r"):
        assert main(["evaluate", "--model", str(tiny_cldm), "--data", str(data), "--steps", "1", "--device", "cpu",
                     "--out", str(tmp_path / "r.csv"), "--table", str(tmp_path / table)]) == 2
        assert "is a file that --table" in capsys.readouterr().err
    assert (tmp_path / "r.csv").read_text() == kept and not (tmp_path / "r.md").exists()


# bad input ---------------------------------------------------------------------------------------
def test_data_folder_without_cases_or_split(tiny_cldm, data, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="splits.json"):
        evaluate(tiny_cldm, empty, "test", n_steps=1, device="cpu")
    with pytest.raises(InputError, match="no case folders"):
        evaluate(tiny_cldm, empty, None, n_steps=1, device="cpu")
    with pytest.raises(InputError, match="no split 'holdout'"):
        evaluate(tiny_cldm, data, "holdout", n_steps=1, device="cpu")
    with pytest.raises(InputError, match="split 'train' .* is empty"):
        evaluate(tiny_cldm, data, "train", n_steps=1, device="cpu")
    with pytest.raises(InputError, match="no model"):
        evaluate({}, data, "test")


def test_model_of_another_profile_asks_for_preprocess(data, tmp_path):
    paper = save_tiny_cldm(tmp_path / "paper-model", profile="paper")
    with pytest.raises(InputError, match=r"'paper' profile.*ctp2mri preprocess --profile paper"):
        evaluate(paper, data, "test", n_steps=1, device="cpu", out_csv=tmp_path / "r.csv")
    assert not (tmp_path / "r.csv").exists()


def test_checkpoint_missing_a_file(data, tiny_cldm, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_cldm, broken)
    (broken / "ema.safetensors").unlink()
    with pytest.raises(InputError, match="ema.safetensors is missing"):
        evaluate(broken, data, "test", n_steps=1, device="cpu")


def test_fid_weights_named_but_absent(data, tiny_cldm, tmp_path, monkeypatch):
    with pytest.raises(InputError, match="does not exist"):
        evaluate(tiny_cldm, data, "test", n_steps=1, device="cpu", fid_weights=tmp_path / "inception.pt")
    monkeypatch.delenv("CTP2MRI_FID_WEIGHTS", raising=False)
    assert fid_status().startswith("FID skipped: Inception weights not available offline")
    weights = tmp_path / "inception.safetensors"
    weights.write_bytes(b"x")
    assert "pytorch-fid" in fid_status(weights)
