"""`ctp2mri train-demo` (the bundled models' recipe), the bundled-model registry, `ctp2mri demo`."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from ctp2mri import bundled
from ctp2mri.checkpoints import read_config
from ctp2mri.cli import main
from ctp2mri.errors import InputError
from ctp2mri.models.case_context import CONTEXT_THRESHOLD
from ctp2mri.recipes.train_demo import RECIPES, train_demo


def test_resolve_model_takes_folders_and_bundled_names(tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    assert bundled.resolve_model(folder) == folder
    with pytest.raises(InputError, match="does not exist, and .* is not a bundled model"):
        bundled.resolve_model(tmp_path / "missing")
    with pytest.raises(InputError, match="no bundled model called"):
        bundled.bundled_model("nope")
    # A resources folder named by the environment wins, and only complete checkpoints count.
    resources = tmp_path / "resources"
    post = resources / "models" / "demo" / "cldm_post_trained"
    post.mkdir(parents=True)
    (resources / "models" / "demo" / "cldm_base").mkdir()
    (post / "config.json").write_text("{}")
    monkeypatch.setenv(bundled.RESOURCES_ENV, str(resources))
    assert bundled.bundled_models() == {"demo": post}
    assert bundled.resolve_model("demo") == post
    with pytest.raises(InputError, match="not installed.*train-demo"):
        bundled.resolve_model("demo-base")


@pytest.mark.slow
def test_train_demo_smoke_recipe_bundles_evaluates_and_feeds_the_demo(tmp_path, capsys):
    torch.set_num_threads(1)
    work, bundle = tmp_path / "work", tmp_path / "bundle"
    said: list[str] = []
    result = train_demo(work, "smoke", bundle=bundle, device="cpu", on_stage=said.append)
    rec = RECIPES["smoke"]
    for name, steps in (("autoencoder", rec.ae_steps), ("cldm_base", rec.ldm_steps),
                        ("cldm_post_trained", rec.pt_steps), ("reference_unet", rec.reference_steps)):
        assert read_config(work / name)["provenance"]["steps"] == steps
    # the v7 levers reached their trainers; the reference is the L1-only U-Net
    base_training = read_config(work / "cldm_base")["training"]
    assert base_training["parameterization"] == rec.parameterization == "z0-residual"
    assert base_training["condition_loss_weight"] == rec.condition_loss_weight
    assert base_training["condition_lesion_weight"] == rec.condition_lesion_weight == 0.0  # a calibrated base
    assert "lesion_latent_weight" not in base_training and rec.lesion_latent_weight == 0.0  # off: not recorded
    post_training = read_config(work / "cldm_post_trained")["training"]
    assert post_training["ema_decay"] == rec.pt_ema_decay != rec.ema_decay
    assert (post_training["lambda_image"], post_training["lambda_lesion"]) == (rec.lambda_image, rec.lambda_lesion)
    assert post_training["lambda_core"] == rec.lambda_core > 0  # the core term reached post-training
    assert rec.pt_case_context and post_training["case_context"] == CONTEXT_THRESHOLD  # and the case context
    assert read_config(work / "cldm_post_trained")["networks"]["ema"]["config"]["case_context"]["scale"] > 0
    assert read_config(work / "autoencoder")["training"]["lesion_weight"] == rec.ae_lesion_weight
    assert read_config(work / "reference_unet")["training"]["adversarial"] is False
    for name in ("autoencoder", "cldm_base", "cldm_post_trained", "reference_unet"):  # DWI on its quantiles
        assert read_config(work / name)["normalisation"]["dwi_hi_median"] is None, name
    assert "timings_s" in result and "reference" in result["timings_s"]
    for name, factor in (("autoencoder", rec.ae_lesion_oversample), ("cldm_base", rec.ldm_lesion_oversample)):
        assert factor and read_config(work / name)["training"]["lesion_oversample"] == factor  # reached the trainer
    # The bundle ships weights only: no optimiser state, no discriminator, EMA + autoencoder.
    for name, networks in (("autoencoder", {"model"}), ("cldm_base", {"ema", "autoencoder"}),
                           ("cldm_post_trained", {"ema", "autoencoder"}), ("reference_unet", {"model"})):
        files = {p.name for p in (bundle / name).iterdir()}
        assert set(read_config(bundle / name)["networks"]) == networks
        assert {f"{n}.safetensors" for n in networks} <= files
        assert not any(f.startswith(("training_state", "discriminator")) for f in files)
    post = read_config(bundle / "cldm_post_trained")
    assert post["post_training"]["lambda_image"] == rec.lambda_image
    # the base diffuses unit-variance latents (scale 1 / std, measured), and post-training keeps it
    from ctp2mri.checkpoints import load_checkpoint

    scales = [load_checkpoint(bundle / name, names=["ema"])[0]["ema"].scale_factor
              for name in ("cldm_base", "cldm_post_trained")]
    assert rec.ldm_scale_factor == "auto" and scales[0] == scales[1] != 1.0
    # Base, post-trained and reference were evaluated alike on the test split.
    rows = (work / "evaluation" / "per_case.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 * len(json.loads((work / "data" / "splits.json").read_text())["test"])
    assert set(result["summary"]) == {"cLDM (base)", "cLDM-PT (λ_image 0.5, λ_lesion 4, λ_core 0.3)",
                                      "U-Net (L1), reference"}
    assert "lesion_auc" in rows[0] and "perfusion_core_dice" in rows[0]
    # A second run finds every stage done and trains nothing.
    said.clear()
    train_demo(work, "smoke", device="cpu", evaluate_models=False, on_stage=said.append)
    assert sum("done" in line for line in said) == 4

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--model", str(bundle / "cldm_post_trained"), "--steps", "2",
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "lesion MAE" in printed and "figure:" in printed
    assert (out / "demo.png").stat().st_size > 10_000
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert np.isfinite(metrics["DWI_mae"]) and np.isfinite(metrics["ADC_lesion_mae"])
    ctp = nib.load(out / "case" / "ctp.nii.gz")
    for name in ("dwi", "adc", "core"):
        img = nib.load(out / "synthetic" / f"{name}.nii.gz")
        assert img.shape == ctp.shape[:3] and np.array_equal(img.affine, ctp.affine)


@pytest.mark.slow
def test_the_dwi_anchor_of_a_recipe_reaches_every_stage(tmp_path):
    """demo-dwi-anchor's setting: the autoencoder and the reference are trained on DWI scaled to
    1.6 × the brain median, and the base and post-training follow the autoencoder's record."""
    from dataclasses import replace

    torch.set_num_threads(1)
    assert RECIPES["demo-dwi-anchor"].dwi_hi_median == 1.6 and RECIPES["demo"].dwi_hi_median is None
    rec = replace(RECIPES["smoke"], dwi_hi_median=1.6)
    train_demo(tmp_path / "work", rec, device="cpu", evaluate_models=False)
    for name in ("autoencoder", "cldm_base", "cldm_post_trained", "reference_unet"):
        assert read_config(tmp_path / "work" / name)["normalisation"]["dwi_hi_median"] == 1.6, name


@pytest.mark.slow
def test_reference_stage_gives_the_base_its_threads_back_once_the_reference_ends(tmp_path):
    """The reference trains in a child process with one thread; the base, which trained on the
    others meanwhile, takes them back at its next step, and a failed child is reported."""
    from dataclasses import asdict

    from ctp2mri.recipes.reference_stage import ReferenceStage

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        said: list[str] = []
        stage = ReferenceStage(tmp_path / "reference_unet", None, tmp_path / "no-data", asdict(RECIPES["smoke"]),
                               "cpu", said.append, {}, lambda _name, fn: fn())
        stage.start()
        assert torch.get_num_threads() == 1 and "beside the base" in said[0]
        seen: list[int] = []
        report = stage.watch(lambda step, total, info: seen.append(torch.get_num_threads()))
        report(1, 3, {})  # the child is still starting: the base keeps one thread
        stage.process.join(timeout=300)
        assert stage.process.exitcode is not None
        report(2, 3, {})
        assert seen == [1, 2]
        with pytest.raises(InputError, match="reference U-Net's training failed.*no-data"):
            stage.result()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_synthesis_widget_lists_the_bundled_models_first(tmp_path, monkeypatch):
    import napari_ctp2mri._models as widget_module

    resources = tmp_path / "resources"
    for sub in ("cldm_post_trained", "cldm_base", "autoencoder", "reference_unet"):
        (resources / "models" / "demo" / sub).mkdir(parents=True)
        (resources / "models" / "demo" / sub / "config.json").write_text("{}")
    monkeypatch.setenv(bundled.RESOURCES_ENV, str(resources))
    monkeypatch.setattr(widget_module, "_MODELS", {})
    widget_module.register_bundled_models()
    choices = widget_module.model_choices()
    assert [label for label, _ in choices] == list(widget_module.BUNDLED_LABELS.values())
    assert choices[0][1] == resources / "models" / "demo" / "cldm_post_trained"


def test_the_repository_ships_the_demo_models_small_loadable_and_documented():
    found = bundled.bundled_models()
    assert set(found) == set(bundled.BUNDLED_MODELS)
    root = found["demo"].parent
    size = sum(p.stat().st_size for p in root.rglob("*.safetensors"))
    assert size <= 50 * 2**20  # the budget for all bundled weights
    assert not list(root.rglob("training_state*"))  # weights only
    for doc in ("MODEL_CARD.md", "REPORT.md"):
        assert (root / doc).is_file(), doc
    from ctp2mri.synthesis.loading import load_model

    model = load_model("demo", device="cpu")
    base = read_config(found["demo-base"])
    post = read_config(found["demo"])
    # The bundle is what one run of the demo recipe made (REPORT.md §D7): its recipe.json is
    # RECIPES["demo"], and every model's step count is that recipe's. A setting added after the
    # run (the DWI anchor) is absent from its record and at its default, which is the old behaviour.
    from dataclasses import asdict, fields

    from ctp2mri.recipes.train_demo import DemoRecipe

    recipe = RECIPES["demo"]
    recorded = json.loads((root / "recipe.json").read_text())["recipe"]
    later = {f.name: f.default for f in fields(DemoRecipe) if f.name not in recorded}
    assert set(later) <= {"dwi_hi_median"} and all(v is None for v in later.values())
    assert {**recorded, **later} == asdict(recipe)
    for name, steps in (("autoencoder", recipe.ae_steps), ("cldm_base", recipe.ldm_steps),
                        ("cldm_post_trained", recipe.pt_steps), ("reference_unet", recipe.reference_steps)):
        assert read_config(root / name)["provenance"]["steps"] == steps, name
    # The post-trained model records its base and the recipe's λs (REPORT.md §D6); both share one autoencoder.
    assert (post["post_training"]["lambda_image"], post["post_training"]["lambda_lesion"]) == (recipe.lambda_image,
                                                                                                recipe.lambda_lesion)
    assert post["post_training"].get("lambda_core", 0.0) == recipe.lambda_core
    assert base["training"]["condition_lesion_weight"] == recipe.condition_lesion_weight == 0.0
    assert post["networks"]["autoencoder"] == base["networks"]["autoencoder"]
    for name in ("autoencoder", "cldm_base", "cldm_post_trained", "reference_unet"):  # the recipe's DWI scale
        assert read_config(root / name)["normalisation"].get("dwi_hi_median") == recipe.dwi_hi_median, name
    assert model.profile == "demo"
