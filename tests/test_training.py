"""Training loops: exact resume, refusal of changed settings, cancel, DDP, overfit sanity."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _helpers_cldm import TINY_AE, TINY_CLDM, TINY_D

from ctp2mri.checkpoints import load_checkpoint, load_training_state, read_config
from ctp2mri.data import SliceDataset
from ctp2mri.diffusion import NoiseSchedule
from ctp2mri.errors import Cancelled, InputError
from ctp2mri.losses import latent_loss
from ctp2mri.models import ConditionalLDM, VQAutoencoder
from ctp2mri.progress import CancelToken
from ctp2mri.training import TrainSettings, train_autoencoder, train_ldm
from ctp2mri.training.batches import BatchStream
from ctp2mri.training.distributed import DistInfo

# TINY_AE, TINY_D, TINY_CLDM: networks far smaller than the demo profile's (the loops are under test)
COMMON = {"device": "cpu", "num_workers": 0, "seed": 3, "log_every": 2}


@pytest.fixture(scope="module")
def dataset(phantom_data) -> SliceDataset:
    """The train split with augmentation (``plain``, from conftest, is the same slices without:
    cheaper where augmentation is not under test)."""
    return SliceDataset(phantom_data, split="train", seed=3)


@pytest.fixture(scope="module")
def ae_dir(plain, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "ae"
    return train_autoencoder(plain, out, steps=2, batch_size=4, lr=1e-3, disc_start=1,
                             autoencoder_config=TINY_AE, discriminator_config=TINY_D, **COMMON)


def _losses(out: Path, column: str = "loss") -> list[float]:
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, len(rows) + 1))  # one row per step, none twice
    return [float(r[column]) if r[column] else math.nan for r in rows]


def _cancel_at(step: int) -> tuple[CancelToken, callable]:
    token = CancelToken()

    def progress(s, total, info):
        if s == step:
            token.cancel()

    return token, progress


def _no_partial_files(folder: Path) -> None:
    leftovers = [p.name for p in folder.parent.iterdir() if ".partial" in p.name or p.name.endswith(".old")]
    leftovers += [p.name for p in folder.iterdir() if ".partial" in p.name]
    assert leftovers == []


# --------------------------------------------------------------------------- data stream
def test_batch_stream_restarts_mid_epoch_where_it_left_off(dataset):
    """Same slices, same augmentation draws: what exact resume relies on (augmented data)."""
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    full = BatchStream(dataset, 16, info, seed=1)
    it = iter(full)
    first = [next(it) for _ in range(4)]  # 58 slices → 3 batches per epoch: crosses an epoch
    resumed = BatchStream(dataset, 16, info, seed=1, epoch=0, batch_in_epoch=2)
    it2 = iter(resumed)
    again = [next(it2) for _ in range(2)]
    for a, b in zip(first[2:], again):
        assert a["slice"].tolist() == b["slice"].tolist() and a["case"] == b["case"]
        assert torch.equal(a["target"], b["target"]) and torch.equal(a["cond"], b["cond"])
    assert resumed.position() == {"epoch": 1, "batch_in_epoch": 1}
    assert not torch.equal(first[0]["target"], first[3]["target"])  # epochs differ


def test_batch_stream_refuses_a_batch_larger_than_the_data(dataset):
    with pytest.raises(InputError, match="fewer than one batch"):
        BatchStream(dataset, len(dataset) + 1, DistInfo(0, 1, 0, torch.device("cpu")), seed=0)


# --------------------------------------------------------------------------- exact resume
def test_autoencoder_resume_retraces_the_uninterrupted_run(plain, tmp_path):
    # Codebook restarts at steps 1, 2 and 4: the usage counted in step 3 must survive the cut.
    kwargs = dict(steps=5, batch_size=4, lr=1e-3, disc_start=2, checkpoint_every=2, codebook_restart=2,
                  autoencoder_config=TINY_AE, discriminator_config=TINY_D, **COMMON)
    train_autoencoder(plain, tmp_path / "full", **kwargs)
    token, progress = _cancel_at(2)
    with pytest.raises(Cancelled):
        train_autoencoder(plain, tmp_path / "cut", progress=progress, cancel=token, **kwargs)
    assert load_training_state(tmp_path / "cut")["step"] == 3  # cancelled at the next step boundary
    _no_partial_files(tmp_path / "cut")
    train_autoencoder(plain, tmp_path / "cut", resume=True, **kwargs)
    restarted = _losses(tmp_path / "full", "codes_restarted")
    assert restarted[0] > 0 and math.isnan(restarted[2]) and not math.isnan(restarted[3])
    for column in ("loss", "rec_loss", "d_loss", "codes_restarted"):  # d_loss: the discriminator resumed too
        full, cut = _losses(tmp_path / "full", column), _losses(tmp_path / "cut", column)
        assert len(full) == 5
        assert torch.allclose(torch.tensor(cut), torch.tensor(full), atol=1e-6, rtol=0, equal_nan=True), column
    a, _ = load_checkpoint(tmp_path / "full", build=False)
    b, _ = load_checkpoint(tmp_path / "cut", build=False)
    for name in ("model", "discriminator"):
        assert all(torch.allclose(a[name][k], b[name][k], atol=1e-6) for k in a[name])


def test_ldm_resume_retraces_the_uninterrupted_run(plain, ae_dir, tmp_path):
    # (that augmentation restarts identically is tested on the BatchStream above)
    # 58 slices, 7 batches of 8 per epoch: the resumed run crosses an epoch boundary
    kwargs = dict(steps=9, batch_size=8, lr=1e-3, ema_decay=0.9, checkpoint_every=4, cldm_config=TINY_CLDM,
                  **COMMON)
    train_ldm(plain, ae_dir, tmp_path / "full", **kwargs)
    token, progress = _cancel_at(5)
    with pytest.raises(Cancelled, match="--resume"):
        train_ldm(plain, ae_dir, tmp_path / "cut", progress=progress, cancel=token, **kwargs)
    _no_partial_files(tmp_path / "cut")
    # what was cancelled is a complete, loadable checkpoint of step 6
    assert read_config(tmp_path / "cut")["provenance"]["steps"] == 6
    assert len(_losses(tmp_path / "cut")) == 6
    train_ldm(plain, ae_dir, tmp_path / "cut", resume=True, **kwargs)
    full, cut = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
    assert len(full) == 9 and _losses(tmp_path / "full", "epoch")[-1] == 1
    assert torch.allclose(torch.tensor(cut), torch.tensor(full), atol=1e-6, rtol=0)
    a, _ = load_checkpoint(tmp_path / "full", names=["model", "ema"], build=False)
    b, _ = load_checkpoint(tmp_path / "cut", names=["model", "ema"], build=False)
    for name in ("model", "ema"):
        assert all(torch.allclose(a[name][k], b[name][k], atol=1e-6) for k in a[name]), name


def test_ldm_checkpoint_is_one_self_contained_folder(plain, ae_dir, tmp_path):
    out = train_ldm(plain, ae_dir, tmp_path / "ldm", steps=2, batch_size=4, lr=1e-3, cldm_config=TINY_CLDM,
                    **COMMON)
    nets, config = load_checkpoint(out, kind="cldm")
    assert set(nets) == {"model", "ema", "autoencoder"}
    assert config["schedule"] == NoiseSchedule().config()
    assert set(config["normalisation"]) >= {"dwi", "adc"}
    assert config["training"]["lr"] == 1e-3 and config["provenance"]["steps"] == 2
    assert config["training"]["data"]["cases"] == plain.case_names
    ae_nets, _ = load_checkpoint(ae_dir, names=["model"])
    for k, v in ae_nets["model"].state_dict().items():  # the frozen autoencoder, unchanged
        assert torch.equal(v, nets["autoencoder"].state_dict()[k])


def test_ldm_follows_its_autoencoder_adc_scale(plain, phantom_data, ae_dir, tmp_path):
    """A latent model learns its autoencoder's latents, so its data are normalised as the
    autoencoder's were: the fixed ADC window, or per-case quantiles for an autoencoder from
    before the window (a dataset built on the other scale is refused, naming both)."""
    assert read_config(ae_dir)["normalisation"]["adc_window"] == [200.0, 2600.0]
    legacy = tmp_path / "legacy_ae"
    shutil.copytree(ae_dir, legacy)
    config = json.loads((legacy / "config.json").read_text())
    del config["normalisation"]["adc_window"]
    (legacy / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="per-case quantiles"):
        train_ldm(plain, legacy, tmp_path / "refused", steps=1, batch_size=4, cldm_config=TINY_CLDM, **COMMON)
    assert not (tmp_path / "refused" / "config.json").exists()
    out = train_ldm(phantom_data, legacy, tmp_path / "ldm", steps=1, batch_size=4, cldm_config=TINY_CLDM, **COMMON)
    assert read_config(out)["normalisation"]["adc_window"] is None


def test_a_run_started_on_per_case_adc_quantiles_does_not_resume_on_the_window(plain, tmp_path):
    kwargs = dict(steps=2, batch_size=4, lr=1e-3, disc_start=1, autoencoder_config=TINY_AE,
                  discriminator_config=TINY_D, **COMMON)
    token, progress = _cancel_at(1)
    with pytest.raises(Cancelled):
        train_autoencoder(plain, tmp_path / "ae", progress=progress, cancel=token, **kwargs)
    config = json.loads((tmp_path / "ae" / "config.json").read_text())
    assert config["training"]["data"]["adc_window"] == [200.0, 2600.0]
    del config["training"]["data"]["adc_window"]  # as a run from before the window saved it
    (tmp_path / "ae" / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="adc_window: saved '<absent>'"):
        train_autoencoder(plain, tmp_path / "ae", resume=True, **kwargs)


def test_ldm_checkpoint_records_its_train_settings_and_resumes_from_them(plain, ae_dir, tmp_path):
    settings = TrainSettings(steps=2, batch_size=4, lr=1e-3, grad_accum=2, grad_clip=1.0, ema_decay=0.9,
                             lesion_oversample=2.0, loss_weighting="min-snr", snr_gamma=4.0, lesion_latent_weight=0.5,
                             num_workers=0, seed=3, log_every=2)
    out = train_ldm(plain, ae_dir, tmp_path / "ldm", settings, cldm_config=TINY_CLDM, device="cpu")
    training = read_config(out)["training"]
    record = settings.record(plain.profile.name, "fp32", DistInfo(0, 1, 0, torch.device("cpu")))
    assert {k: training[k] for k in record} == record
    for name in ("lesion_oversample", "loss_weighting", "snr_gamma", "lesion_latent_weight"):
        assert training[name] == getattr(settings, name), name
    assert "condition_loss_weight" not in training  # the paper's 0: not recorded, as before the option existed
    # the settings object and its fields as keywords are one request: resume with either
    train_ldm(plain, ae_dir, out, settings, steps=3, cldm_config=TINY_CLDM, device="cpu", resume=True)
    with pytest.raises(InputError, match=r"snr_gamma: saved 4.0, now 5.0"):
        train_ldm(plain, ae_dir, out, dataclasses.replace(settings, steps=4, snr_gamma=5.0), cldm_config=TINY_CLDM,
                  device="cpu", resume=True)
    assert len(_losses(out)) == 3


def test_auto_scale_factor_is_one_over_the_latent_std_and_survives_resume(plain, ae_dir, tmp_path):
    kwargs = dict(batch_size=4, lr=1e-3, cldm_config=TINY_CLDM, scale_factor="auto", **COMMON)
    out = train_ldm(plain, ae_dir, tmp_path / "ldm", steps=1, **kwargs)
    nets, _ = load_checkpoint(out)
    with torch.no_grad():
        std = float(nets["autoencoder"].encode(plain.target.float()).std())
    assert nets["model"].scale_factor == nets["ema"].scale_factor == pytest.approx(1 / std, rel=1e-4)
    assert nets["model"].scale_factor != 1.0
    train_ldm(plain, ae_dir, out, steps=2, resume=True, **kwargs)  # the same measured value: accepted
    assert load_checkpoint(out)[0]["model"].scale_factor == nets["model"].scale_factor
    with pytest.raises(InputError, match=r"cldm\.scale_factor"):  # another scale is another model
        train_ldm(plain, ae_dir, out, steps=3, resume=True, **{**kwargs, "scale_factor": 2.0})
    for bad in ("big", -1.0, float("nan")):
        with pytest.raises(InputError, match="positive number or 'auto'"):
            train_ldm(plain, ae_dir, tmp_path / "bad", steps=1, **{**kwargs, "scale_factor": bad})


def test_scaled_latents_diffuse_scale_times_the_encoding(ae_dir):
    from ctp2mri.training.ldm import diffuse

    ae = load_checkpoint(ae_dir, names=["model"])[0]["model"].eval()
    x = torch.rand((2, 2, 96, 112)) * 2 - 1
    schedule = NoiseSchedule()
    z1, t1, e1, _ = diffuse(ae, schedule, x, torch.Generator().manual_seed(0), "fp32")
    z3, t3, e3, zt3 = diffuse(ae, schedule, x, torch.Generator().manual_seed(0), "fp32", scale=3.0)
    assert torch.equal(t1, t3) and torch.equal(e1, e3)
    torch.testing.assert_close(z3, 3.0 * z1)
    torch.testing.assert_close(zt3, schedule.q_sample(3.0 * z1, t1, e1))


# --------------------------------------------------------------------------- refusals
def test_resume_with_changed_settings_is_refused_naming_them(plain, ae_dir, tmp_path):
    kwargs = dict(steps=2, batch_size=4, cldm_config=TINY_CLDM, **COMMON)
    out = train_ldm(plain, ae_dir, tmp_path / "ldm", lr=1e-3, **kwargs)
    with pytest.raises(InputError, match=r"lr: saved 0.001, now 0.002"):
        train_ldm(plain, ae_dir, out, lr=2e-3, resume=True, **{**kwargs, "steps": 4})
    bigger = {**TINY_CLDM, "channels": [16, 32]}
    with pytest.raises(InputError, match=r"cldm\.channels"):
        train_ldm(plain, ae_dir, out, lr=1e-3, resume=True, **{**kwargs, "steps": 4, "cldm_config": bigger})
    with pytest.raises(InputError, match="already trained 2 steps"):
        train_ldm(plain, ae_dir, out, lr=1e-3, resume=True, **kwargs)
    # more steps, other workers and logging: allowed
    train_ldm(plain, ae_dir, out, lr=1e-3, resume=True, **{**kwargs, "steps": 3, "log_every": 1})
    assert len(_losses(out)) == 3


def test_new_run_refuses_a_used_folder_and_resume_needs_a_checkpoint(plain, ae_dir, tmp_path):
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="--resume"):
        train_ldm(plain, ae_dir, used, steps=1, batch_size=4, cldm_config=TINY_CLDM, **COMMON)
    with pytest.raises(InputError, match="no checkpoint"):
        train_ldm(plain, ae_dir, tmp_path / "empty", steps=1, batch_size=4, resume=True, cldm_config=TINY_CLDM,
                  **COMMON)
    assert (used / "notes.txt").read_text() == "mine"


def test_ldm_refuses_a_cldm_checkpoint_as_autoencoder_and_mixed_precision_on_cpu(plain, ae_dir, tmp_path):
    out = train_ldm(plain, ae_dir, tmp_path / "ldm", steps=1, batch_size=4, cldm_config=TINY_CLDM, **COMMON)
    with pytest.raises(InputError, match="'autoencoder' checkpoint"):
        train_ldm(plain, out, tmp_path / "x", steps=1, batch_size=4, cldm_config=TINY_CLDM, **COMMON)
    with pytest.raises(InputError, match="CUDA"):
        train_ldm(plain, ae_dir, tmp_path / "y", steps=1, precision="bf16", cldm_config=TINY_CLDM, **COMMON)


# --------------------------------------------------------------------------- learning
def test_ldm_training_lowers_the_eq4_loss_on_a_fixed_batch(plain, ae_dir, tmp_path):
    dataset = plain
    out = train_ldm(dataset, ae_dir, tmp_path / "ldm", steps=20, batch_size=4, lr=3e-3, ema_decay=0.5,
                    checkpoint_every=20, cldm_config=TINY_CLDM, **COMMON)
    nets, _ = load_checkpoint(out)
    torch.manual_seed(3)
    untrained = ConditionalLDM(**TINY_CLDM)  # the run's initial weights (same seed, same constructor)
    batch = [dataset[i] for i in range(0, len(dataset), 4)][:12]
    x = torch.stack([b["target"] for b in batch])
    c = torch.stack([b["cond"] for b in batch])
    schedule = NoiseSchedule()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        z0 = nets["autoencoder"].encode(x)
        t = torch.randint(0, 1000, (4, len(x)), generator=gen)
        eps = torch.randn((4, *z0.shape), generator=gen)

        def loss(model):
            return sum(latent_loss(e, model(schedule.q_sample(z0, tt, e), tt, c)) for tt, e in zip(t, eps)) / 4

        before, after = float(loss(untrained)), float(loss(nets["model"].eval()))
    print(f"Eq. 4 loss on a fixed batch: {before:.3f} untrained, {after:.3f} after 20 steps")
    assert before == pytest.approx(1.0, abs=0.1)  # zero-initialised output: ε̂ = 0, loss = E[ε²]
    assert after < 0.8 * before


def test_dead_codes_restart_onto_encoder_outputs():
    torch.manual_seed(0)
    ae = VQAutoencoder(**TINY_AE)
    quantizer = ae.quantizer
    before = quantizer.embedding.weight.detach().clone()
    usage = torch.zeros(quantizer.num_embeddings, dtype=torch.int64)
    usage[:10] = 3  # ten codes in use stay where they are
    z = torch.randn(500, quantizer.embedding_dim) * 2.0
    dead = quantizer.restart_dead_codes(usage, z, noise=0.0)
    after = quantizer.embedding.weight.detach()
    assert dead.tolist() == list(range(10, quantizer.num_embeddings))
    assert torch.equal(after[:10], before[:10])
    # every restarted code is one of the encoder outputs (noise 0), so it is used at once
    distance = torch.cdist(after[10:], z, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
    assert distance.max() < 1e-5
    assert quantizer.restart_dead_codes(torch.ones_like(usage), z).numel() == 0


def test_autoencoder_training_lowers_the_reconstruction_loss(plain, tmp_path):
    out = train_autoencoder(plain, tmp_path / "ae", steps=8, batch_size=4, lr=3e-3, disc_start=100,
                            autoencoder_config=TINY_AE, discriminator_config=TINY_D, **COMMON)
    rec = _losses(out, "rec_loss")
    assert sum(rec[-2:]) / 2 < 0.7 * sum(rec[:2]) / 2
    assert all(math.isnan(v) for v in _losses(out, "d_loss"))  # discriminator not started


# --------------------------------------------------------------------------- DDP
DDP_SCRIPT = """
import sys
import torch.distributed as dist
from ctp2mri.training import train_autoencoder, train_ldm
data, out = sys.argv[1], sys.argv[2]
tiny_ae, tiny_d, tiny_cldm = {ae!r}, {d!r}, {cldm!r}
# One process group for both runs (as a caller embedding the trainers would): re-creating the
# default group in one torchrun job can meet the previous group's keys in torchrun's store.
dist.init_process_group("gloo")
train_autoencoder(data, out + "/ae", steps=1, batch_size=2, lr=1e-3, disc_start=0, autoencoder_config=tiny_ae,
                  discriminator_config=tiny_d, device="cpu", num_workers=0, seed=3)
train_ldm(data, out + "/ae", out + "/ldm", steps=2, batch_size=2, lr=1e-3, cldm_config=tiny_cldm,
          device="cpu", num_workers=0, seed=3)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_ddp_two_cpu_processes_write_the_single_process_checkpoint_format(phantom_data, ae_dir, tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(ae=TINY_AE, d=TINY_D, cldm=TINY_CLDM)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                               "2", str(script), str(phantom_data), str(tmp_path)],
                              check=False, capture_output=True, text=True, timeout=150, env=env)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"torchrun did not finish in 150 s; its output: {str(exc.stderr)[-3000:]}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    single = train_ldm(phantom_data, ae_dir, tmp_path / "single", steps=2, batch_size=2, lr=1e-3,
                       cldm_config=TINY_CLDM, **COMMON)
    for kind, ddp_out, one_out in (("cldm", tmp_path / "ldm", single), ("autoencoder", tmp_path / "ae", ae_dir)):
        ddp_nets, ddp_cfg = load_checkpoint(ddp_out, build=False, kind=kind)
        one_nets, one_cfg = load_checkpoint(one_out, build=False, kind=kind)
        assert set(ddp_nets) == set(one_nets)
        for name in one_nets:  # same keys and shapes: no "module." prefix from the DDP wrapper
            assert {k: v.shape for k, v in ddp_nets[name].items()} == {k: v.shape for k, v in one_nets[name].items()}
        assert ddp_cfg["training"]["world_size"] == 2 and one_cfg["training"]["world_size"] == 1
        assert len(load_training_state(ddp_out)["rng"]) == 2  # every rank's RNG state, for exact resume
    assert len(_losses(tmp_path / "ldm")) == 2


# --------------------------------------------------------------------------- benchmark
@pytest.mark.parametrize("kind", ["ldm", "autoencoder"])
def test_bench_train_reports_speed_and_memory(kind):
    from ctp2mri.bench import bench_train, format_bench_train

    result = bench_train("demo", kind, batch_size=1, steps=1, warmup=0, device="cpu")
    assert result["steps_per_s"] > 0 and result["seconds_per_step"] == pytest.approx(1 / result["steps_per_s"])
    assert result["peak_memory_bytes"] > 50 * 2**20  # a torch process holds more than 50 MiB
    assert result["slice_shape"] == [96, 112] and result["precision"] == "fp32"
    assert "steps/s" in format_bench_train(result)
    with pytest.raises(InputError, match="CUDA"):
        bench_train("demo", kind, device="cpu", precision="bf16")


def test_ema_follows_litema_with_warmup_and_lr_scaling_follows_compvis():
    from ctp2mri.training import EMA, effective_lr

    net = torch.nn.Linear(2, 1)
    ema = EMA(net, decay=0.9)
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)  # first update: d = min(0.9, (1 + 1) / (10 + 1))
    d = 2 / 11
    assert torch.allclose(ema.module.weight, d * start + (1 - d) * net.weight)
    ema.num_updates = 1000
    before = ema.module.weight.clone()
    ema.update(net)  # warm: d = 0.9
    assert torch.allclose(ema.module.weight, 0.9 * before + 0.1 * net.weight)
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert effective_lr(2e-6, 48, 1) == pytest.approx(9.6e-5)  # the paper: batch 48, one GPU
    assert effective_lr(4.5e-6, 2, 4, accumulate=2) == pytest.approx(7.2e-5)
    assert effective_lr(2e-6, 48, 1, scale_lr=False) == 2e-6 and effective_lr(2e-6, 48, 1, lr=1e-4) == 1e-4
    with pytest.raises(InputError):
        effective_lr(2e-6, 48, 1, lr=-1.0)


# --------------------------------------------------------------------------- lesion over-sampling
@pytest.mark.parametrize("trainer", ["autoencoder", "ldm"])
def test_base_training_oversamples_lesion_slices_and_resume_keeps_the_factor(trainer, plain, ae_dir, tmp_path,
                                                                              monkeypatch):
    from ctp2mri.training import autoencoder, latent_run

    drawn: list[torch.Tensor | None] = []

    class Recording(BatchStream):
        def __init__(self, *args, weights=None, **kwargs):
            drawn.append(weights)
            super().__init__(*args, weights=weights, **kwargs)

    monkeypatch.setattr(autoencoder if trainer == "autoencoder" else latent_run, "BatchStream", Recording)
    if trainer == "autoencoder":
        def train(out, **kw):
            return train_autoencoder(plain, out, steps=kw.pop("steps", 2), batch_size=4, lr=1e-3,
                                     autoencoder_config=TINY_AE, discriminator_config=TINY_D, **COMMON, **kw)
    else:
        def train(out, **kw):
            return train_ldm(plain, ae_dir, out, steps=kw.pop("steps", 2), batch_size=4, lr=1e-3,
                             cldm_config=TINY_CLDM, **COMMON, **kw)

    out = train(tmp_path / "run", lesion_oversample=6)
    weights = drawn[-1]
    lesion = plain.has_lesion
    assert 0 < int(lesion.sum()) < len(plain)
    assert set(weights[lesion].tolist()) == {6.0} and set(weights[~lesion].tolist()) == {1.0}
    config = read_config(out)
    assert config["training"]["lesion_oversample"] == 6.0
    natural = config["sampling"]["lesion_slice_fraction"]
    assert config["sampling"]["effective_lesion_slice_fraction"] == pytest.approx(6 * natural / (6 * natural + 1 - natural))
    with pytest.raises(InputError, match=r"lesion_oversample: saved 6.0, now 3.0"):
        train(out, steps=3, resume=True, lesion_oversample=3)
    with pytest.raises(InputError, match="lesion_oversample"):
        train(out, steps=3, resume=True)  # uniform draws are another run too
    train(out, steps=3, resume=True, lesion_oversample=6)
    assert len(_losses(out)) == 3

    uniform = train(tmp_path / "uniform")
    assert drawn[-1] is None  # the paper's uniform draw: no weights, and no setting recorded
    assert "lesion_oversample" not in read_config(uniform)["training"]
    for bad in (0, -2, math.nan, "x"):
        with pytest.raises(InputError, match="--lesion-oversample must be a positive factor"):
            train(tmp_path / "bad", lesion_oversample=bad)


def test_cli_training_commands_pass_lesion_oversample_to_their_trainers(dataset, phantom_data, ae_dir, tmp_path,
                                                                       capsys):
    """Resuming a uniform-draw run with --lesion-oversample is refused, naming exactly that setting:
    the option reached the trainer (and nothing is trained)."""
    from ctp2mri.cli import main

    same = ["--data", str(phantom_data), "--steps", "3", "--batch-size", "4", "--lr", "1e-3", "--seed", "3",
            "--device", "cpu", "--num-workers", "0", "--resume", "--lesion-oversample", "3"]
    ae_run = train_autoencoder(dataset, tmp_path / "ae", steps=1, batch_size=4, lr=1e-3, disc_start=2, **COMMON)
    assert main(["train-autoencoder", "--out", str(ae_run), "--disc-start", "2", *same]) == 2
    assert "(lesion_oversample: saved '<absent>', now 3.0)" in capsys.readouterr().err
    ldm_run = train_ldm(dataset, ae_dir, tmp_path / "ldm", steps=1, batch_size=4, lr=1e-3, **COMMON)
    assert main(["train-ldm", "--autoencoder", str(ae_dir), "--out", str(ldm_run), *same]) == 2
    assert "(lesion_oversample: saved '<absent>', now 3.0)" in capsys.readouterr().err
    assert load_training_state(ldm_run)["step"] == 1
