"""The core's before/after check and post-train-then-compare pipeline, without Qt: a tiny real
cLDM, phantom cases in folders and in memory."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ctp2mri.casefolder import read_case, write_case
from ctp2mri.checkpoints import load_checkpoint
from ctp2mri.errors import Cancelled, InputError
from ctp2mri.evaluation.before_after import BASE_LABEL, NEW_LABEL, before_after, metric_rows
from ctp2mri.evaluation.post_train_compare import post_train_and_compare
from ctp2mri.progress import CancelToken
from ctp2mri.training.post_train import PostTrainSettings

pytestmark = pytest.mark.usefixtures("one_thread")

EVAL_STEPS = 2
SETTINGS = PostTrainSettings(steps=2, batch_size=2, seed=0)  # the paper's λs: 0.01, 0.02


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two demo-profile phantom case folders, ``p001`` and ``p002``."""
    from ctp2mri.phantom import generate_case

    root = tmp_path_factory.mktemp("post_train_compare") / "cases"
    return [write_case(generate_case(seed, profile="demo"), root / f"p00{seed}") for seed in (1, 2)]


def _in_memory(folder):
    """The case of ``folder`` in memory, named as the folder (as a case built in napari is)."""
    case = read_case(folder)
    case.path, case.info["case"] = None, folder.name
    return case


def test_before_after_scores_in_memory_cases_as_their_folders(tiny_cldm, folders, monkeypatch):
    def no_writing(*args, **kwargs):
        raise AssertionError("an in-memory case was written to disk")

    with monkeypatch.context() as patch:
        patch.setattr("ctp2mri.casefolder.save_nifti", no_writing)
        memory = before_after(tiny_cldm, tiny_cldm, [_in_memory(folders[0]), folders[1]], n_steps=EVAL_STEPS,
                              device="cpu")
    on_disk = before_after(tiny_cldm, tiny_cldm, folders, n_steps=EVAL_STEPS, device="cpu")
    assert [(r["case"], r["model"]) for r in memory] == [
        (f.name, model) for f in folders for model in (BASE_LABEL, NEW_LABEL)]
    np.testing.assert_equal(memory, on_disk)  # to the last digit
    # one model twice, from the same noise: nothing changes, and nothing is called better
    table = metric_rows(memory)
    assert table[0]["key"] == "DWI_lesion_mae" and table[0]["base"] > 0
    for row in table:
        assert row["base"] == row["new"] or (math.isnan(row["base"]) and math.isnan(row["new"])), row
        assert row["better"] is None, row


def test_post_train_and_compare_trains_then_scores_both_models_on_the_training_cases(tiny_cldm, folders,
                                                                                     tmp_path):
    sources = [folders[0], _in_memory(folders[1])]
    events = []
    result = post_train_and_compare(tiny_cldm, tmp_path / "out", sources, SETTINGS, device="cpu",
                                    compare_steps=EVAL_STEPS, progress=lambda *e: events.append(e))
    assert result.out == tmp_path / "out" and result.steps == 2 and result.seconds > 0 and result.note == ""
    phases = [phase for phase, *_ in events]
    assert phases.index("data") < phases.index("train") < phases.index("eval") and phases[-1] == "eval"
    assert [step for phase, step, _, _ in events if phase == "train"] == [1, 2]
    _, config = load_checkpoint(result.out, names=["ema"], kind="cldm")
    training = config["training"]
    assert training["steps"] == 2 and training["num_workers"] == 0 and training["data"]["cases"] == ["p001", "p002"]
    assert config["post_training"]["lambda_lesion"] == 0.02

    # the rows are the core's before/after of base and new model on the training cases
    assert [(r["case"], r["model"]) for r in result.rows] == [
        (name, model) for name in ("p001", "p002") for model in (BASE_LABEL, NEW_LABEL)]
    np.testing.assert_equal(result.rows, before_after(tiny_cldm, result.out, sources, n_steps=EVAL_STEPS,
                                                      device="cpu"))
    lesion_mae = metric_rows(result.rows)[0]
    assert lesion_mae["key"] == "DWI_lesion_mae" and lesion_mae["new"] != lesion_mae["base"]
    assert lesion_mae["better"] is (lesion_mae["new"] < lesion_mae["base"])


def test_a_cancelled_comparison_keeps_the_trained_model(tiny_cldm, folders, tmp_path):
    token = CancelToken()

    def progress(phase, step, total, info):
        if phase == "eval":
            token.cancel()

    result = post_train_and_compare(tiny_cldm, tmp_path / "out", folders[:1], SETTINGS, device="cpu",
                                    compare_steps=EVAL_STEPS, progress=progress, cancel=token)
    assert result.rows is None and result.note == "metrics cancelled"
    assert load_checkpoint(result.out, names=["ema"], kind="cldm")[1]["training"]["steps"] == 2
    # cancelled before the comparison: the run stops
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        post_train_and_compare(tiny_cldm, tmp_path / "cancelled", folders[:1], SETTINGS, device="cpu",
                               compare_steps=None, cancel=token)


def test_the_output_folder_and_the_training_set_are_checked_before_the_cases_are_read(tiny_cldm, folders,
                                                                                      tmp_path):
    events = []
    full = tmp_path / "full"
    full.mkdir()
    (full / "old.txt").write_text("x")
    with pytest.raises(InputError, match="is not empty"):
        post_train_and_compare(tiny_cldm, full, folders, SETTINGS, progress=lambda *e: events.append(e))
    with pytest.raises(InputError, match="holds no checkpoint"):
        post_train_and_compare(tiny_cldm, tmp_path / "new", folders, SETTINGS, resume=True,
                               progress=lambda *e: events.append(e))
    with pytest.raises(InputError, match="training set is empty"):
        post_train_and_compare(tiny_cldm, tmp_path / "new", [], SETTINGS)
    with pytest.raises(InputError, match="does not exist"):
        post_train_and_compare(tmp_path / "no_such_model", tmp_path / "new", folders, SETTINGS)
    assert events == []  # no case was read
    assert sorted(p.name for p in full.iterdir()) == ["old.txt"]


def test_metric_rows_average_cases_and_say_which_way_is_better():
    rows = [{"case": c, "model": m, "DWI_lesion_mae": v, "DWI_psnr": p}
            for c, m, v, p in (("a", "base", 0.4, 20.0), ("b", "base", 0.2, 22.0),
                               ("a", "post-trained", 0.3, 19.0), ("b", "post-trained", 0.1, 21.0))]
    table = {row["key"]: row for row in metric_rows(rows)}
    mae, psnr = table["DWI_lesion_mae"], table["DWI_psnr"]
    assert mae["base"] == pytest.approx(0.3) and mae["new"] == pytest.approx(0.2)
    assert mae["change"] == pytest.approx(-0.1) and mae["better"] is True  # lower MAE: better
    assert psnr["change"] == pytest.approx(-1.0) and psnr["better"] is False  # lower PSNR: worse
    assert np.isnan(table["ADC_mae"]["base"]) and table["ADC_mae"]["better"] is None
    assert [row["key"] for row in metric_rows(rows)][:4] == [
        "DWI_lesion_mae", "ADC_lesion_mae", "DWI_lesion_contrast", "ADC_lesion_contrast"]


def test_lesion_contrast_rows_are_better_when_closer_to_the_truth():
    rows = [{"case": c, "model": m, "ADC_lesion_contrast": v, "ADC_lesion_contrast_true": 0.6,
             "DWI_lesion_contrast": d, "DWI_lesion_contrast_true": 1.3}
            for c, m, v, d in (("a", "base", 1.1, 1.0), ("b", "base", 0.9, 1.0),
                               ("a", "post-trained", 0.8, 1.7), ("b", "post-trained", 0.8, 1.7))]
    table = {row["key"]: row for row in metric_rows(rows)}
    adc, dwi = table["ADC_lesion_contrast"], table["DWI_lesion_contrast"]
    assert adc["label"] == "Lesion contrast ADC (true 0.60)" and adc["digits"] == 3
    assert adc["base"] == pytest.approx(1.0) and adc["change"] == pytest.approx(-0.2)
    assert adc["better"] is True  # 0.8 is nearer 0.6 than 1.0 is
    assert dwi["change"] == pytest.approx(0.7) and dwi["better"] is False  # 1.7 overshoots 1.3 by more


def test_cli_post_train_compare_prints_the_before_after_table(tiny_cldm, phantom_data, tmp_path, capsys):
    from ctp2mri.checkpoints import read_config
    from ctp2mri.cli import main
    from ctp2mri.data import resolve_cases
    from ctp2mri.evaluation.before_after import format_metric_rows

    out = tmp_path / "pt"
    assert main(["post-train", "--data", str(phantom_data), "--from", str(tiny_cldm), "--out", str(out),
                 "--steps", "2", "--batch-size", "2", "--device", "cpu", "--compare", str(EVAL_STEPS),
                 "--lambda-core", "0.25"]) == 0
    printed = capsys.readouterr().out
    assert read_config(out)["post_training"]["lambda_core"] == 0.25
    train = resolve_cases(phantom_data, "train")
    assert f"post-trained checkpoint: {out}" in printed
    assert f"base vs post-trained on the {len(train)} training cases (DDIM {EVAL_STEPS} steps, seed 0):" in printed
    # the table is the core's before/after of the two models on the data's train split
    expected = format_metric_rows(metric_rows(before_after(tiny_cldm, out, train, n_steps=EVAL_STEPS,
                                                           device="cpu")))
    assert expected.splitlines()[1].startswith("Lesion MAE DWI") and expected in printed
