"""Checkpoint folders: config.json + safetensors, exact round trip, no pickle, clear errors."""

from __future__ import annotations

import copy
import json
import pickle
import random

import numpy as np
import pytest
import torch
from _helpers_cldm import SMALL_AE
from safetensors.torch import save_file

from ctp2mri import checkpoints
from ctp2mri.checkpoints import load_checkpoint, load_training_state, read_config, save_checkpoint
from ctp2mri.errors import InputError
from ctp2mri.models import ConditionalLDM, PatchGANDiscriminator, VQAutoencoder
from ctp2mri.training.rng import capture_rng_state, restore_rng_state

CONFIG = {
    "kind": "autoencoder",
    "profile": "demo",
    "normalisation": {"ctp_hu": [0.0, 200.0], "dwi": [12.5, 840.0], "adc": [0.0, 2900.0]},
    "provenance": {"command": "ctp2mri train-autoencoder --data x", "data": "x", "steps": 3},
}


def _trained_ae():
    """A tiny autoencoder, its critic and an Adam optimizer after two steps (non-trivial state)."""
    torch.manual_seed(0)
    ae = VQAutoencoder(**SMALL_AE)
    disc = PatchGANDiscriminator(in_channels=2, channels=8, num_layers=2)
    opt = torch.optim.AdamW(ae.parameters(), lr=1e-3, betas=(0.5, 0.9))
    x = torch.randn(2, 2, 32, 32)
    for _ in range(2):
        x_rec, q = ae(x)
        loss = (x_rec - x).abs().mean() + q - disc(x_rec).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    disc(x)  # update BatchNorm running statistics (buffers travel too)
    return ae, disc, opt, x


@pytest.fixture(scope="module")
def trained():
    return _trained_ae()


@pytest.fixture
def saved(tmp_path, trained):
    ae, disc, opt, x = trained
    state = {
        "step": 2,
        "optimizers": {"ae": opt.state_dict()},
        "rng": capture_rng_state(),
        "losses": [0.5, 0.25],
    }
    path = save_checkpoint(tmp_path / "ckpt", {"model": ae, "discriminator": disc}, CONFIG, state)
    return path, ae, disc, opt, x


def _forbid_pickle(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle was used while loading a checkpoint")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)


def test_round_trip_weights_buffers_and_config(saved, monkeypatch):
    path, ae, disc, _, x = saved
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json",
        "discriminator.safetensors",
        "model.safetensors",
        "training_state.json",
        "training_state.safetensors",
    ]
    _forbid_pickle(monkeypatch)
    nets, config = load_checkpoint(path)
    for name, original in (("model", ae), ("discriminator", disc)):
        loaded = nets[name].state_dict()
        assert loaded.keys() == original.state_dict().keys()
        for k, v in original.state_dict().items():
            assert torch.equal(loaded[k], v), k
        assert nets[name].config == original.config
    assert type(nets["model"]) is VQAutoencoder
    for key in ("kind", "profile", "normalisation"):
        assert config[key] == CONFIG[key]
    assert config["networks"]["model"] == {
        "type": "autoencoder",
        "config": ae.config,
        "bytes": (path / "model.safetensors").stat().st_size,
    }
    prov = config["provenance"]
    assert prov["command"] == CONFIG["provenance"]["command"] and prov["steps"] == 3
    assert prov["created"] and "torch_version" in prov and "git_commit" in prov
    assert config == read_config(path) == json.loads((path / "config.json").read_text())
    ae.eval(), nets["model"].eval()
    with torch.no_grad():
        assert torch.equal(nets["model"](x)[0], ae(x)[0])


def test_training_state_resumes_optimizer_and_rng_exactly(saved, monkeypatch):
    path, ae, _, opt, x = saved
    ae, opt = copy.deepcopy((ae, opt))  # the module-scoped originals stay as saved
    _forbid_pickle(monkeypatch)
    state = load_training_state(path)
    nets, _ = load_checkpoint(path, names=["model"])
    ae2 = nets["model"]
    opt2 = torch.optim.AdamW(ae2.parameters(), lr=1e-3, betas=(0.5, 0.9))
    opt2.load_state_dict(state["optimizers"]["ae"])
    assert state["step"] == 2 and state["losses"] == [0.5, 0.25]
    assert opt2.state_dict()["param_groups"][0]["betas"] == (0.5, 0.9)
    # One more step on both copies gives identical weights: moments and step counts came back.
    for model, optim in ((ae, opt), (ae2, opt2)):
        x_rec, q = model(x)
        optim.zero_grad()
        ((x_rec - x).abs().mean() + q).backward()
        optim.step()
    for (k, a), b in zip(ae.state_dict().items(), ae2.state_dict().values()):
        assert torch.equal(a, b), k
    # RNG streams continue where they were captured.
    restore_rng_state(state["rng"])
    expected = (random.random(), np.random.rand(3), torch.rand(3))
    restore_rng_state(state["rng"])
    again = (random.random(), np.random.rand(3), torch.rand(3))
    assert expected[0] == again[0]
    assert np.array_equal(expected[1], again[1]) and torch.equal(expected[2], again[2])


def test_load_without_building_returns_state_dicts(saved):
    path, ae, *_ = saved
    states, config = load_checkpoint(path, names=["model"], build=False)
    assert list(states) == ["model"] and states["model"].keys() == ae.state_dict().keys()


def test_cldm_round_trip_and_kind_check(tmp_path):
    torch.manual_seed(1)
    ldm = ConditionalLDM(
        channels=[32, 32, 32], attention_levels=[False, False, True], num_res_blocks=1
    )
    config = {"kind": "cldm", "profile": "demo"}
    path = save_checkpoint(tmp_path / "ldm", {"model": ldm, "ema": ldm}, config)
    nets, config = load_checkpoint(path, names=["ema"], kind="cldm")
    mapper = ldm.rescaler.channel_mapper.weight
    assert torch.equal(nets["ema"].rescaler.channel_mapper.weight, mapper)
    with pytest.raises(InputError, match="'cldm' checkpoint; this needs a 'autoencoder'"):
        load_checkpoint(path, kind="autoencoder")
    with pytest.raises(InputError, match="no discriminator weights; it holds: model, ema"):
        load_checkpoint(path, names=["discriminator"])


def test_pickle_checkpoints_are_refused(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "last.ckpt")
    with pytest.raises(InputError, match="pickle.*save_checkpoint") as refused:
        load_checkpoint(tmp_path / "last.ckpt")
    assert "convert-checkpoint" not in str(refused.value)  # no such command: the advice must be real
    with pytest.raises(InputError, match="last.ckpt.*pickle"):
        load_checkpoint(tmp_path)  # a folder with a .ckpt but no config.json
    with pytest.raises(InputError, match="pickle"):
        load_checkpoint(tmp_path / "model.pth")  # refused by name, before anything is read


def test_missing_and_truncated_files_are_named(saved):
    path = saved[0]
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="model.safetensors.*truncated"):
        load_checkpoint(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(InputError, match="model.safetensors is missing"):
        load_checkpoint(path)
    (path / "config.json").unlink()
    with pytest.raises(InputError, match="config.json is missing"):
        load_checkpoint(path)
    with pytest.raises(InputError, match="does not exist"):
        load_checkpoint(path.parent / "nowhere")


def test_mismatched_shapes_are_listed(saved):
    path = saved[0]
    config = json.loads((path / "config.json").read_text())
    config["networks"]["model"]["config"]["num_embeddings"] = 128
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError) as err:
        load_checkpoint(path, names=["model"])
    assert "quantizer.embedding.weight: file (64, 3), model (128, 3)" in str(err.value)


def test_unexpected_and_missing_tensors_are_listed(saved):
    path = saved[0]
    from safetensors.torch import load_file

    state = load_file(str(path / "model.safetensors"))
    state["extra.weight"] = state.pop("quant_conv.weight")
    save_file(state, str(path / "model.safetensors"))
    config = json.loads((path / "config.json").read_text())
    config["networks"]["model"]["bytes"] = (path / "model.safetensors").stat().st_size
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="missing quant_conv.weight; unexpected extra.weight"):
        load_checkpoint(path, names=["model"])


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"version": 2}, "version 2, newer than"),
        ({"version": 0}, "unknown checkpoint format version 0"),
        ({"format": "something-else"}, "not a ctp2mri checkpoint config"),
        ({"networks": {}}, "lists no networks"),
    ],
)
def test_bad_config_json_is_refused(saved, edit, message):
    path = saved[0]
    config = {**json.loads((path / "config.json").read_text()), **edit}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=message):
        load_checkpoint(path)


def test_existing_checkpoint_is_replaced_only_with_overwrite(saved):
    path, ae, disc, *_ = saved
    with pytest.raises(InputError, match="already exists"):
        save_checkpoint(path, {"model": ae}, CONFIG)
    save_checkpoint(path, {"model": ae}, CONFIG, overwrite=True)  # e.g. "latest"
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    assert load_training_state(path) is None


def test_shared_tensors_are_stored_separately():
    w = torch.arange(6.0).reshape(2, 3)
    out = checkpoints._tensors_for_file({"a": w, "tied": w, "view": w.T})
    assert out["a"].data_ptr() != out["tied"].data_ptr() and out["view"].is_contiguous()
    assert torch.equal(out["tied"], w) and torch.equal(out["view"], w.T)


def test_training_state_without_a_pickle_free_form_is_refused(tmp_path):
    ae = VQAutoencoder(**SMALL_AE)
    with pytest.raises(TypeError, match="cannot be stored without pickle"):
        save_checkpoint(tmp_path / "c", {"model": ae}, CONFIG, {"sampler": object()})
    assert not (tmp_path / "c").exists()


def test_wrappers_are_unwrapped_and_numpy_settings_stored(tmp_path, trained):
    ae = trained[0]
    ema = torch.optim.swa_utils.AveragedModel(ae)
    config = {
        **CONFIG,
        "normalisation": {"dwi": np.array([12.5, 840.0], dtype=np.float32)},
        "lr": np.float32(2e-6),
    }
    path = save_checkpoint(tmp_path / "c", {"model": ae, "ema": ema}, config)
    nets, loaded = load_checkpoint(path)
    assert loaded["networks"]["ema"]["type"] == "autoencoder"
    assert torch.equal(nets["ema"].quantizer.embedding.weight, ae.quantizer.embedding.weight)
    assert loaded["normalisation"]["dwi"] == [12.5, 840.0] and loaded["lr"] == pytest.approx(2e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_request_without_gpu_is_explained(saved):
    with pytest.raises(InputError, match="no usable CUDA GPU"):
        load_checkpoint(saved[0], map_location="cuda")
