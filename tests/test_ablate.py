"""`ablate`: a 2-pair λ grid on the phantom with a tiny cLDM, written as Table 2."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from ctp2mri.evaluation.ablate import PAPER_GRID, ablate, parse_grid
from ctp2mri.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_paper_grid_is_table2_and_the_cli_form_parses():
    assert len(PAPER_GRID) == 11 and PAPER_GRID[0] == (0, 0) and (0.01, 0.02) in PAPER_GRID
    assert parse_grid("paper") == PAPER_GRID
    assert parse_grid("0.01:0.02, 0.05:0") == ((0.01, 0.02), (0.05, 0.0))
    for bad in ("0.01", "a:b", "", "0.01:-1", "0.01:0.02,0.01:0.02"):
        with pytest.raises(InputError):
            parse_grid(bad)


@pytest.mark.slow
def test_ablate_post_trains_each_pair_and_writes_table2(phantom_data, tiny_cldm, tmp_path):
    data, base = phantom_data, tiny_cldm
    out = tmp_path / "ablation"
    kwargs = {"grid": [(0, 0), (0.01, 0.02)], "steps": 1, "batch_size": 2, "eval_steps": 2,
              "eval_batch_size": 8, "seed": 1, "device": "cpu", "max_cases": 1,
              "post_train_options": {"num_workers": 0}}
    rows = ablate(base, data, out, **kwargs)

    assert [(r["lambda_image"], r["lambda_lesion"]) for r in rows] == [(0, 0), (0.01, 0.02)]
    assert Path(rows[0]["checkpoint"]) == base  # Table 2's 0/0 row is the base model itself
    run = out / "runs" / "li0.01_ll0.02"
    assert Path(rows[1]["checkpoint"]) == run and (run / "config.json").exists()
    assert not (out / "runs" / "li0_ll0").exists()
    # The table's means are the means of the per-case rows of the same pair.
    with open(out / "ablation_cases.csv") as f:
        cases = list(csv.DictReader(f))
    assert len(cases) == 2 and {c["model"] for c in cases} == {"li0_ll0", "li0.01_ll0.02"}
    for r in rows:
        (case,) = [c for c in cases if c["model"] == r["model"]]
        assert r["DWI_mae_mean"] == pytest.approx(float(case["DWI_mae"]))
        assert math.isfinite(r["ADC_psnr_mean"])
    # Post-training changed the weights, so the two rows' samples differ.
    assert rows[0]["DWI_mae_mean"] != rows[1]["DWI_mae_mean"]
    with open(out / "table2.csv") as f:
        assert [row["model"] for row in csv.DictReader(f)] == ["li0_ll0", "li0.01_ll0.02"]
    table = (out / "table2.md").read_text().splitlines()
    assert table[0].startswith("| λ_image | λ_lesion | DWI MAE↓ | DWI Lesion MAE↓ | DWI PSNR↑ | DWI MS-SSIM↑ | ADC")
    assert table[2].startswith("| 0 | 0 |") and table[3].startswith("| 0.01 | 0.02 |")

    # A finished run is reused, not trained again: rerunning the grid gives the same table.
    stamp = (run / "config.json").stat().st_mtime_ns
    again = ablate(base, data, out, **kwargs)
    assert (run / "config.json").stat().st_mtime_ns == stamp
    assert again[1]["DWI_mae_mean"] == rows[1]["DWI_mae_mean"]


def test_ablate_cli_passes_lr_and_ema_decay_to_every_post_training_run(phantom_data, tiny_cldm, tmp_path, capsys):
    from ctp2mri.checkpoints import read_config
    from ctp2mri.cli import main

    data, base = phantom_data, tiny_cldm
    out = tmp_path / "ablation"
    assert main(["ablate", "--from", str(base), "--data", str(data), "--out", str(out), "--grid", "0:0,0.01:0.02",
                 "--steps", "1", "--batch-size", "2", "--eval-steps", "1", "--max-cases", "1", "--device", "cpu",
                 "--lr", "3e-4", "--ema-decay", "0.95", "--post-train-base"]) == 0
    assert "| 0.01 | 0.02 |" in capsys.readouterr().out
    for run in ("li0_ll0", "li0.01_ll0.02"):  # --post-train-base: the 0:0 pair is trained too
        training = read_config(out / "runs" / run)["training"]
        assert training["lr"] == 3e-4 and training["ema_decay"] == 0.95
