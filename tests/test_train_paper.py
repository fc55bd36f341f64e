"""`ctp2mri train-demo --recipe paper|paper-smoke --data CASES`: the paper recipe on the user's cases."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from ctp2mri.casefolder import Case, write_case
from ctp2mri.checkpoints import read_config
from ctp2mri.cli import main
from ctp2mri.io.volume import Volume
from ctp2mri.recipes.paper_plan import forward_gflops, plan, torchrun_commands
from ctp2mri.recipes.paper_recipe import PAPER_RECIPES
from ctp2mri.recipes.train_paper import train_paper


def _write_cases(root, names, shape=(192, 224), spacing=(1.0, 1.0, 5.0), n_slices=4, splits=None):
    """Tiny case folders (a few axial slices) with a brain, a lesion and a bolus passage."""
    nx, ny = shape
    affine = np.diag([*spacing, 1.0])
    x, y = np.meshgrid(np.linspace(-1, 1, nx), np.linspace(-1, 1, ny), indexing="ij")
    brain2d = (x / 0.8) ** 2 + (y / 0.85) ** 2 < 1
    times = np.arange(15) * 3.0
    curve = 30.0 * np.exp(-(((times - 15.0) / 7.0) ** 2))  # tissue enhancement, HU
    arterial = 350.0 * np.exp(-(((times - 9.0) / 4.0) ** 2))  # an early, high arterial bolus
    for i, name in enumerate(names):
        lesion2d = ((x - 0.3 + 0.1 * i) / 0.2) ** 2 + ((y + 0.1) / 0.25) ** 2 < 1
        brain = np.repeat(brain2d[..., None], n_slices, axis=2)
        lesion = np.zeros_like(brain)
        lesion[..., 1:3] = lesion2d[..., None]
        lesion &= brain
        dwi = np.where(brain, 100.0, 0.0) + 90.0 * lesion
        adc = np.where(brain, 800.0, 0.0) - 350.0 * lesion
        flow = np.where(lesion, 0.2, 1.0) * brain
        ctp = np.where(brain, 30.0, 5.0)[..., None] + flow[..., None] * curve
        artery = np.repeat((((x + 0.05) / 0.04) ** 2 + (y / 0.04) ** 2 < 1)[..., None], n_slices, axis=2)
        ctp[artery] = 40.0 + arterial
        ctp = ctp.astype(np.int16)
        case = Case(ctp=Volume(ctp, affine, frame_times=times), dwi=Volume(dwi.astype(np.float32), affine),
                    adc=Volume(adc.astype(np.float32), affine), lesion=Volume(lesion.astype(np.uint8), affine),
                    mask=Volume(brain.astype(np.uint8), affine), info={"source": "tests/test_train_paper.py"})
        write_case(case, root / name)
    splits = splits if splits is not None else {"train": list(names[1:]), "val": [], "test": list(names[:1])}
    (root / "splits.json").write_text(json.dumps(splits))
    return root


@pytest.mark.slow
def test_paper_smoke_recipe_trains_every_stage_on_the_paper_grid_and_resumes(tmp_path, capsys):
    torch.set_num_threads(1)
    data = _write_cases(tmp_path / "cases", ["p000", "p001", "p002"])
    work = tmp_path / "work"
    start = time.perf_counter()
    assert main(["train-demo", "--recipe", "paper-smoke", "--data", str(data), "--out", str(work),
                 "--threads", "1"]) == 0
    seconds = time.perf_counter() - start
    printed = capsys.readouterr().out
    # the plan came first, with every stage's FLOP-based estimate
    assert printed.index("expected time from the FLOP count") < printed.index("autoencoder: training")
    for name in ("autoencoder", "base", "post_trained", "evaluation"):
        assert f"  {name} " in printed
    rec = PAPER_RECIPES["paper-smoke"]
    for name, steps in (("autoencoder", rec.ae_steps), ("cldm_base", rec.ldm_steps),
                        ("cldm_post_trained", rec.pt_steps)):
        config = read_config(work / name)
        assert config["provenance"]["steps"] == steps
        assert config["profile"] == "paper"
    post = read_config(work / "cldm_post_trained")["post_training"]
    assert (post["lambda_image"], post["lambda_lesion"]) == (0.01, 0.02)
    assert read_config(work / "autoencoder")["training"]["disc_start"] == rec.ae_disc_start  # adversarial phase ran
    rows = (work / "evaluation" / "per_case.csv").read_text().splitlines()
    assert len(rows) == 1 + 2  # base and post-trained on the one test case
    recorded = json.loads((work / "plan.json").read_text())
    assert all(stage["gflops"] > 0 for stage in recorded["stages"])
    # a rerun finds every stage done
    said: list[str] = []
    train_paper(work, data, "paper-smoke", device="cpu", evaluate_models=False, on_stage=said.append)
    assert sum(": done (" in line for line in said) == 3
    print(f"paper-smoke run: {seconds:.1f} s")


def test_paper_plan_counts_the_real_networks_and_scales_with_the_steps():
    g = forward_gflops("paper")
    # the paper's networks: a 192×224 VQGAN pass costs more than a 48×56 UNet pass, both hundreds of GFLOPs
    assert 100 < g["cldm"] < g["autoencoder"] and g["encode"] + g["decode"] == pytest.approx(g["autoencoder"], 0.05)
    one, two = plan("paper", steps_scale=1.0), plan("paper", steps_scale=2.0)
    for a, b in zip(one["stages"], two["stages"]):
        assert a["gflops"] > 0 and a["seconds"] > 0
        if a["stage"] != "evaluation":
            assert b["steps"] == 2 * a["steps"]
            assert b["gflops"] == pytest.approx(2 * a["gflops"], rel=1e-3)
    assert plan("paper", gpus=4)["total_seconds"] == pytest.approx(one["total_seconds"] / 4)
    commands = torchrun_commands("paper", "cases", "work", gpus=4)
    assert len(commands) == 5 and all("--nproc_per_node=4" in c for c in commands[:3])
    assert "post-training 6 → 8" in commands[4]  # 4 GPUs cannot split 6 slices evenly: said, not hidden
    assert "--batch-size 12" in commands[1] and "--lambda-lesion 0.02" in commands[2]


def test_paper_recipe_refuses_bad_input_with_one_line(tmp_path, capsys):
    work = str(tmp_path / "work")
    assert main(["train-demo", "--recipe", "paper", "--out", work]) == 2
    err = capsys.readouterr().err
    assert "--data CASES" in err and err.count("\n") == 1
    demo_grid = _write_cases(tmp_path / "demo_grid", ["d0", "d1"], shape=(96, 112), spacing=(2.0, 2.0, 5.0),
                             n_slices=2)
    assert main(["train-demo", "--recipe", "paper", "--data", str(demo_grid), "--out", work]) == 2
    err = capsys.readouterr().err
    assert "not on the paper grid" in err and "96×112" in err and err.count("\n") == 1
    no_train = _write_cases(tmp_path / "no_train", ["n0"], n_slices=2, splits={"train": [], "test": ["n0"]})
    assert main(["train-demo", "--recipe", "paper-smoke", "--data", str(no_train), "--out", work]) == 2
    err = capsys.readouterr().err
    assert "no train cases" in err and err.count("\n") == 1
    assert main(["train-demo", "--recipe", "demo", "--data", str(no_train), "--out", work]) == 2
    assert "--data is for the paper recipes" in capsys.readouterr().err
    assert not (tmp_path / "work" / "autoencoder").exists()
