"""The baselines end to end with tiny networks: cBBDM training (exact resume), its lesion-aware
post-training, Pix2Pix training, and `ctp2mri evaluate` comparing several models."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from _helpers_cldm import TINY_AE, TINY_CLDM, TINY_D

from ctp2mri.checkpoints import load_checkpoint, read_config
from ctp2mri.data import SliceDataset
from ctp2mri.diffusion import BrownianBridge
from ctp2mri.errors import Cancelled, InputError
from ctp2mri.evaluation.evaluate import evaluate, named_models
from ctp2mri.evaluation.report import write_comparison
from ctp2mri.synthesis.inference import sample_slices
from ctp2mri.synthesis.loading import LoadedBridge, LoadedPix2Pix, load_model, model_label
from ctp2mri.models import BrownianBridgeLDM
from ctp2mri.progress import CancelToken
from ctp2mri.training import post_train, train_autoencoder, train_bbdm, train_pix2pix
from ctp2mri.training.bbdm import bridge_post_training_loss

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_BB = TINY_CLDM  # the cBBDM's U-Net and rescaler: the tiny cLDM's widths
TINY_G = {"in_channels": 15, "out_channels": 2, "channels": [8, 16, 16], "num_res_units": 0, "norm": "instance",
          "dropout": 0.0}
TINY_PD = {"in_channels": 17, "channels": 8, "num_layers": 2}
COMMON = {"device": "cpu", "num_workers": 0, "seed": 3, "log_every": 1}


@pytest.fixture(scope="module")
def ae_dir(plain, tmp_path_factory) -> Path:
    return train_autoencoder(plain, tmp_path_factory.mktemp("runs") / "ae", steps=2, batch_size=4, lr=1e-3,
                             disc_start=100, autoencoder_config=TINY_AE, discriminator_config=TINY_D, **COMMON)


@pytest.fixture(scope="module")
def cbbdm_dir(plain, ae_dir, tmp_path_factory) -> Path:
    return train_bbdm(plain, ae_dir, tmp_path_factory.mktemp("runs") / "cbbdm", steps=3, batch_size=4, lr=1e-3,
                      ema_decay=0.9, cbbdm_config=TINY_BB, **COMMON)


@pytest.fixture(scope="module")
def pix2pix_dir(plain, tmp_path_factory) -> Path:
    return train_pix2pix(plain, tmp_path_factory.mktemp("runs") / "pix2pix", steps=3, batch_size=4,
                         generator_config=TINY_G, discriminator_config=TINY_PD, **COMMON)


def _log(out: Path, column: str = "loss") -> list[float]:
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, len(rows) + 1))
    return [float(r[column]) if r[column] else math.nan for r in rows]


def _cancel_at(step: int) -> tuple[CancelToken, callable]:
    token = CancelToken()

    def progress(s, total, info):
        if s == step:
            token.cancel()

    return token, progress


def _same_weights(a: Path, b: Path, names: list[str]) -> None:
    sa, _ = load_checkpoint(a, names=names, build=False)
    sb, _ = load_checkpoint(b, names=names, build=False)
    for name in names:
        assert all(torch.allclose(sa[name][k], sb[name][k], atol=1e-6) for k in sa[name]), name


# --------------------------------------------------------------------------- cBBDM
def test_cbbdm_resume_retraces_the_uninterrupted_run(plain, ae_dir, tmp_path):
    kwargs = dict(steps=5, batch_size=8, lr=1e-3, ema_decay=0.9, checkpoint_every=2, cbbdm_config=TINY_BB, **COMMON)
    train_bbdm(plain, ae_dir, tmp_path / "full", **kwargs)
    token, progress = _cancel_at(2)
    with pytest.raises(Cancelled, match="--resume"):
        train_bbdm(plain, ae_dir, tmp_path / "cut", progress=progress, cancel=token, **kwargs)
    assert read_config(tmp_path / "cut")["provenance"]["steps"] == 3
    train_bbdm(plain, ae_dir, tmp_path / "cut", resume=True, **kwargs)
    full, cut = _log(tmp_path / "full"), _log(tmp_path / "cut")
    assert len(full) == 5 and all(math.isfinite(v) and v > 0 for v in full)
    assert torch.allclose(torch.tensor(cut), torch.tensor(full), atol=1e-6, rtol=0)
    _same_weights(tmp_path / "full", tmp_path / "cut", ["model", "ema"])
    nets, config = load_checkpoint(tmp_path / "full", kind="cbbdm")
    assert set(nets) == {"model", "ema", "autoencoder"} and isinstance(nets["ema"], BrownianBridgeLDM)
    assert config["schedule"] == BrownianBridge().config()
    assert config["training"]["loss_type"] == "l1" and config["training"]["parameterization"] == "grad"
    with pytest.raises(InputError, match="loss_type"):
        train_bbdm(plain, ae_dir, tmp_path / "cut", resume=True, loss_type="l2", **{**kwargs, "steps": 6})


def test_cbbdm_training_lowers_the_bridge_objective_on_a_fixed_batch(plain, ae_dir, tmp_path):
    out = train_bbdm(plain, ae_dir, tmp_path / "bb", steps=20, batch_size=4, lr=3e-3, ema_decay=0.5,
                     checkpoint_every=20, cbbdm_config=TINY_BB, **COMMON)
    nets, _ = load_checkpoint(out)
    torch.manual_seed(3)
    untrained = BrownianBridgeLDM(**TINY_BB)  # the run's initial weights (same seed, same constructor)
    batch = {k: torch.stack([plain[i][k] for i in range(0, len(plain), 5)][:12]) for k in ("target", "cond")}
    bridge = BrownianBridge()

    def loss(model):
        from ctp2mri.training.bbdm import bridge_training_loss

        gen = torch.Generator().manual_seed(0)
        return sum(float(bridge_training_loss(model, nets["autoencoder"], bridge, batch, gen)[0]) for _ in range(4)) / 4

    with torch.no_grad():
        before, after = loss(untrained), loss(nets["model"].eval())
    print(f"bridge L1 objective on a fixed batch: {before:.3f} untrained, {after:.3f} after 20 steps")
    assert after < 0.8 * before


def test_demo_baselines_are_the_size_of_the_demo_cldm():
    from ctp2mri.models import model_config, parameter_count

    cldm = parameter_count("cldm", model_config("demo", "cldm"))
    for kind in ("cbbdm", "pix2pix"):
        assert 0.3 * cldm < parameter_count(kind, model_config("demo", kind)) < 1.5 * cldm, kind
    assert parameter_count("pix2pix_discriminator", model_config("demo", "pix2pix_discriminator")) < 1_000_000
    assert model_config("demo", "pix2pix_discriminator")["in_channels"] == 15 + 2


def test_cbbdm_checkpoint_samples_from_the_ctp_latent(cbbdm_dir, plain):
    model = load_model(cbbdm_dir, "cpu")
    assert isinstance(model, LoadedBridge) and model.weights == "ema" and model_label(model.config) == "cBBDM"
    cond = torch.stack([plain[i]["cond"] for i in range(5)])
    stats = {}
    out = sample_slices(model, cond, n_steps=3, batch_size=2, stats=stats)
    assert out.shape == (5, 2, 96, 112) and torch.isfinite(out).all() and out.abs().max() <= 1
    assert stats["network_calls"] == 3 * 3  # 3 batches of 3 bridge steps
    # η = 0 is deterministic: no dependence on seed or batch; η > 0 is seeded per slice
    torch.testing.assert_close(sample_slices(model, cond, n_steps=3, batch_size=5, seed=9), out, rtol=1e-5,
                               atol=1e-5)
    noisy = sample_slices(model, cond, n_steps=3, eta=1.0, seed=1, batch_size=5)
    torch.testing.assert_close(sample_slices(model, cond[3:], n_steps=3, eta=1.0, seed=1, ids=[3, 4]), noisy[3:],
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(noisy, out, atol=1e-4)
    with pytest.raises(InputError, match="sampler 'ddim' for a cbbdm"):
        sample_slices(model, cond, n_steps=3, sampler="ddim")


def _bridge_batch(dataset: SliceDataset, lesion: bool) -> dict:
    idx = torch.nonzero(dataset.has_lesion == lesion).flatten()[:4].tolist()
    samples = [dataset[i] for i in idx]
    return {k: torch.stack([s[k] for s in samples]) for k in ("target", "cond", "brain", "lesion")}


def test_bridge_post_training_terms_reach_unet_and_rescaler_and_an_empty_lesion_is_zero(cbbdm_dir, plain):
    nets, _ = load_checkpoint(cbbdm_dir)
    model, autoencoder = nets["model"].train(), nets["autoencoder"].eval().requires_grad_(False)
    for p in model.unet.out.parameters():  # give the zero-initialised output a say, as a trained one has
        torch.nn.init.normal_(p, std=0.3)
    bridge = BrownianBridge()

    def grads(batch, li, ll):
        model.zero_grad(set_to_none=True)
        loss, parts = bridge_post_training_loss(model, autoencoder, bridge, batch, torch.Generator().manual_seed(0),
                                                li, ll)
        loss.backward()
        return loss, parts, {n: p.grad.clone() for n, p in model.named_parameters()}

    empty = _bridge_batch(plain, lesion=False)
    loss, parts, g = grads(empty, 0.01, 0.02)
    assert empty["lesion"].sum() == 0 and parts["lesion_loss"] == 0.0 and parts["image_loss"] > 0
    assert torch.isfinite(loss) and all(torch.isfinite(v).all() for v in g.values())
    with_lesion = _bridge_batch(plain, lesion=True)
    _, _, plain_grads = grads(with_lesion, 0.0, 0.0)
    _, parts, pt_grads = grads(with_lesion, 0.5, 1.0)
    assert parts["lesion_loss"] > 0 and "core_loss" not in parts
    for prefix in ("unet.", "rescaler."):
        diff = sum(float((pt_grads[n] - plain_grads[n]).abs().sum()) for n in pt_grads if n.startswith(prefix))
        assert diff > 0, prefix
    assert all(p.grad is None for p in autoencoder.parameters())
    # the core term (not in the paper) joins the bridge's Eq. 8 as the cLDM's
    model.zero_grad(set_to_none=True)
    loss, parts = bridge_post_training_loss(model, autoencoder, bridge, with_lesion, torch.Generator().manual_seed(0),
                                            0.5, 1.0, lambda_core=0.5, core=(-0.65, 1 / 30))
    assert 0 < parts["core_loss"] <= 1
    assert float(loss.detach()) == pytest.approx(parts["latent_loss"] + 0.5 * parts["image_loss"] + parts["lesion_loss"]
                                        + 0.5 * parts["core_loss"], rel=1e-5)


def test_post_train_continues_a_cbbdm_as_a_cbbdm(cbbdm_dir, plain, tmp_path):
    out = post_train(plain, cbbdm_dir, tmp_path / "pt", steps=2, batch_size=4, lr=1e-3, lesion_oversample=20.0,
                     **COMMON)
    nets, config = load_checkpoint(out, kind="cbbdm")
    base, base_cfg = load_checkpoint(cbbdm_dir)
    assert config["post_training"]["lambda_image"] == 0.01 and config["post_training"]["base"]["kind"] == "cbbdm"
    assert config["training"]["loss_type"] == base_cfg["training"]["loss_type"]
    assert config["schedule"] == base_cfg["schedule"] and config["normalisation"] == base_cfg["normalisation"]
    assert model_label(config) == "cBBDM-PT"
    for k, v in base["autoencoder"].state_dict().items():
        assert torch.equal(v, nets["autoencoder"].state_dict()[k]), k
    with open(out / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:  # Eq. 8 with the bridge objective as the latent term
        expected = float(r["latent_loss"]) + 0.01 * float(r["image_loss"]) + 0.02 * float(r["lesion_loss"])
        assert float(r["loss"]) == pytest.approx(expected, rel=1e-5)
    assert any(float(r["lesion_loss"]) > 0 for r in rows)


def test_a_cbbdm_is_post_trained_and_compared_as_a_cldm_is(cbbdm_dir, phantom_data, tmp_path):
    from ctp2mri.evaluation.post_train_compare import post_train_and_compare
    from ctp2mri.training.post_train import PostTrainSettings

    result = post_train_and_compare(cbbdm_dir, tmp_path / "pt", [phantom_data / "case_001"],
                                    PostTrainSettings(steps=1, batch_size=2, lr=1e-3), device="cpu",
                                    compare_steps=1)
    assert model_label(load_checkpoint(result.out, names=["ema"], kind="cbbdm")[1]) == "cBBDM-PT"
    assert [(r["case"], r["model"], r["sampler"]) for r in result.rows] == [
        ("case_001", "base", "bbdm"), ("case_001", "post-trained", "bbdm")]


# --------------------------------------------------------------------------- Pix2Pix
def test_pix2pix_resume_retraces_and_its_checkpoint_evaluates(plain, phantom_data, pix2pix_dir, tmp_path):
    kwargs = dict(steps=4, batch_size=4, checkpoint_every=10, generator_config=TINY_G,
                  discriminator_config=TINY_PD, **COMMON)
    train_pix2pix(plain, tmp_path / "full", **kwargs)
    token, progress = _cancel_at(1)
    with pytest.raises(Cancelled):
        train_pix2pix(plain, tmp_path / "cut", progress=progress, cancel=token, **kwargs)
    train_pix2pix(plain, tmp_path / "cut", resume=True, **kwargs)
    for column in ("loss", "l1_loss", "d_loss"):
        assert _log(tmp_path / "cut", column) == pytest.approx(_log(tmp_path / "full", column), abs=1e-6), column
    _same_weights(tmp_path / "full", tmp_path / "cut", ["model", "discriminator"])

    model = load_model(pix2pix_dir, "cpu")
    assert isinstance(model, LoadedPix2Pix) and model.weights == "model" and model_label(model.config) == "Pix2Pix"
    rows, summary = evaluate(pix2pix_dir, phantom_data, "test", n_steps=50, device="cpu")
    assert [r["model"] for r in rows] == ["Pix2Pix"] and rows[0]["sampler"] == "generator" and rows[0]["steps"] == 1
    for key in ("DWI_mae", "ADC_mae", "DWI_psnr", "ADC_ms_ssim", "DWI_lesion_mae"):
        assert math.isfinite(rows[0][key]) and summary["Pix2Pix"][key]["n"] == 1, key
    assert 0 < rows[0]["DWI_mae"] < 2


# --------------------------------------------------------------------------- comparison
def test_several_kinds_are_scored_alike_and_written_as_one_table(phantom_data, cbbdm_dir, pix2pix_dir, tiny_cldm,
                                                                 tmp_path):
    models = {"Pix2Pix": pix2pix_dir, "cBBDM": cbbdm_dir, "cLDM": tiny_cldm}
    rows, summary = evaluate(models, phantom_data, "test", n_steps=2, seed=4, device="cpu")
    assert [r["model"] for r in rows] == list(models) and len({r["case"] for r in rows}) == 1
    assert [(r["sampler"], r["steps"]) for r in rows] == [("generator", 1), ("bbdm", 2), ("ddim", 2)]
    assert all(r["seed"] == 4 and r["eta"] == 0.0 for r in rows)
    md, table = write_comparison(summary, rows, tmp_path / "table1.md", n_steps=2, eta=0.0, seed=4, split="test",
                                 checkpoints=models)
    text = md.read_text()
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| Model | DWI MAE↓ | DWI Lesion MAE↓")
    assert [line.split(" | ")[0][2:] for line in lines[1:4]] == list(models)  # Table 1 rows, in order
    assert "cBBDM: BBDM bridge sampler, 2 steps" in text and "seed 4" in text and str(pix2pix_dir) in text
    with open(table, newline="") as f:
        written = list(csv.DictReader(f))
    assert [r["model"] for r in written] == list(models)
    for r in written:
        assert int(r["n_cases"]) == 1
        assert float(r["ADC_mae_mean"]) == pytest.approx(summary[r["model"]]["ADC_mae"]["mean"], rel=1e-12)


def test_cli_trains_the_baselines_and_compares_named_models(phantom_data, ae_dir, cbbdm_dir, pix2pix_dir, tmp_path,
                                                            capsys):
    from ctp2mri.cli import main

    assert main(["evaluate", "--model", f"P2P={pix2pix_dir}", "--model", str(cbbdm_dir), "--data", str(phantom_data),
                 "--steps", "1", "--device", "cpu", "--table", str(tmp_path / "cmp.md")]) == 0
    printed = capsys.readouterr().out
    assert "| P2P |" in printed and "| cBBDM |" in printed and "comparison:" in printed
    assert (tmp_path / "cmp.md").is_file() and (tmp_path / "cmp.csv").is_file()
    assert list(named_models([str(cbbdm_dir), f"other={cbbdm_dir}"])) == ["cBBDM", "other"]
    with pytest.raises(InputError, match="NAME=PATH"):
        named_models([str(cbbdm_dir), str(cbbdm_dir)])
    # the training subcommands reach their trainers: resuming the tiny runs with the CLI's
    # demo-profile networks is refused naming the network the trainer built (and trains nothing)
    assert main(["train-ldm", "--model-type", "cbbdm", "--data", str(phantom_data), "--autoencoder", str(ae_dir),
                 "--out", str(cbbdm_dir), "--steps", "4", "--resume", "--device", "cpu", "--num-workers", "0"]) == 2
    assert "cbbdm.channels: saved [16, 16], now [32, 64, 64]" in capsys.readouterr().err
    assert main(["train-pix2pix", "--data", str(phantom_data), "--out", str(pix2pix_dir), "--steps", "4", "--resume",
                 "--device", "cpu", "--num-workers", "0"]) == 2
    assert "pix2pix.channels: saved [8, 16, 16], now [32, 64, 128, 256, 256]" in capsys.readouterr().err
