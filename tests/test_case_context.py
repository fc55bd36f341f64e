"""The case context (not in the paper): the lesion burden of the whole case, read by a frozen copy
of the base's perfusion encoder and given to every slice as one more input channel."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers_cldm import TINY_AE, TINY_CLDM, TINY_D

from ctp2mri.checkpoints import load_checkpoint, read_config, save_checkpoint
from ctp2mri.errors import InputError
from ctp2mri.models import ConditionalLDM, build_network
from ctp2mri.models.case_context import (
    CONTEXT_SCALE,
    CONTEXT_THRESHOLD,
    add_case_context,
    burden_value,
    lesion_burden,
)
from ctp2mri.recipes.train_demo import RECIPES
from ctp2mri.synthesis.inference import sample_slices
from ctp2mri.synthesis.loading import load_model
from ctp2mri.training import post_train, train_autoencoder, train_ldm
from ctp2mri.training.case_context import case_contexts, with_context

TINY_ENCODER = {"out_channels": 8, "hidden_channels": 8, "down_channels": 8, "sigmas": [1.0], "latent_channels": 3}
COMMON = {"device": "cpu", "num_workers": 0, "seed": 3, "log_every": 1}


def _perfusion_cldm(seed: int = 0) -> ConditionalLDM:
    torch.manual_seed(seed)
    net = ConditionalLDM(**TINY_CLDM, condition_encoder="perfusion", condition_options=TINY_ENCODER,
                         parameterization="z0-residual").eval()
    for p in net.unet.out.parameters():  # MONAI zero-initialises it: give the UNet an output
        torch.nn.init.normal_(p, std=0.3)
    return net


def _cond(n: int = 3, size: int = 16) -> torch.Tensor:
    c = torch.rand(n, 15, size, size) * 2 - 1
    c[:, :, :3] = 0.0  # outside the brain
    return c


def _set_head(encoder: torch.nn.Module, bias: float) -> None:
    """A lesion head that says p ≈ 1 (bias +20) or p ≈ 0 (bias −20) everywhere."""
    with torch.no_grad():
        encoder.lesion_head.weight.zero_()
        encoder.lesion_head.bias.fill_(bias)


# the number ------------------------------------------------------------------------------------
def test_burden_value_is_log1p_of_the_percentage():
    assert burden_value(0.0) == 0.0
    assert burden_value(0.01) == pytest.approx(math.log(2.0))
    torch.testing.assert_close(burden_value(torch.tensor([0.0, 0.01])), torch.tensor([0.0, math.log(2.0)]))


def test_lesion_burden_counts_confident_brain_voxels_only():
    encoder = _perfusion_cldm().encoder
    c = _cond()
    _set_head(encoder, 20.0)
    assert lesion_burden(encoder, c) == pytest.approx(1.0)
    c[1] = 0.0  # a slice without brain adds nothing to either count
    assert lesion_burden(encoder, c) == pytest.approx(1.0)
    assert lesion_burden(encoder, torch.zeros(2, 15, 16, 16)) == 0.0
    _set_head(encoder, -20.0)
    assert lesion_burden(encoder, c) == 0.0
    # a head with an opinion per voxel: the count is over the slice grid, inside the brain
    torch.manual_seed(1)
    with torch.no_grad():
        torch.nn.init.normal_(encoder.lesion_head.weight, std=3.0)
        c = _cond()
        _, logit = encoder.heads(encoder(c))
        p = torch.sigmoid(torch.nn.functional.interpolate(logit, size=(16, 16), mode="bilinear", align_corners=False))
    inside = (c != 0).any(dim=1, keepdim=True)
    threshold = float(p[inside].median())
    expected = float(((p > threshold) & inside).sum() / inside.sum())
    assert 0.3 < expected < 0.7
    assert lesion_burden(encoder, c, threshold=threshold, batch_size=2) == pytest.approx(expected)
    with pytest.raises(InputError, match="slices, frames"):
        lesion_burden(encoder, _cond()[0])


# the network -----------------------------------------------------------------------------------
def test_adding_the_context_changes_nothing_until_trained_and_survives_a_checkpoint(tmp_path):
    base = _perfusion_cldm()
    net = add_case_context(base).eval()
    assert net.takes_context and not base.takes_context
    assert net.config["case_context"] == {"threshold": CONTEXT_THRESHOLD, "scale": CONTEXT_SCALE,
                                          "encoder": base.encoder.config}
    assert not any(p.requires_grad for p in net.context_encoder.parameters())
    c = _cond(2)
    with torch.no_grad():  # the context is the last channel of c̃, times its scale
        c_tilde = net.encode_condition(c, torch.tensor([0.5, 2.0]))
        torch.testing.assert_close(c_tilde[:, :-1], base.encode_condition(c))
    assert c_tilde[0, -1].unique().tolist() == [0.5 * CONTEXT_SCALE]
    assert c_tilde[1, -1].unique().tolist() == [2.0 * CONTEXT_SCALE]
    z = torch.randn(2, 3, 4, 4)
    t = torch.tensor([10, 500])
    a = torch.tensor([0.9, 0.3])
    with torch.no_grad():
        expected = base.predict_noise(z, t, base.encode_condition(c), a)
        for context in (0.0, 2.5, torch.tensor([0.1, 1.7])):
            torch.testing.assert_close(net.predict_noise(z, t, net.encode_condition(c, context), a), expected)
        # once the first convolution reads the channel, the context moves the output
        net.unet.conv_in.conv.weight[:, -1].fill_(0.5)
        moved = net.predict_noise(z, t, net.encode_condition(c, 2.0), a)
    assert not torch.allclose(moved, expected)
    rebuilt = build_network("cldm", net.config)
    rebuilt.load_state_dict(net.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval().predict_noise(z, t, rebuilt.encode_condition(c, 2.0), a), moved)
    # the context encoder is the source's, frozen: the case context is the base's reading
    _set_head(base.encoder, 20.0)
    assert add_case_context(base).case_context_of(c) == pytest.approx(burden_value(1.0))


def test_the_context_is_checked():
    base = _perfusion_cldm()
    net = add_case_context(base)
    c = _cond(2)
    with pytest.raises(InputError, match="takes the case context"):
        net.encode_condition(c)
    with pytest.raises(InputError, match="does not take"):
        base.encode_condition(c, 1.0)
    with pytest.raises(InputError, match="one per row"):
        net.encode_condition(c, torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(InputError, match="finite"):
        net.encode_condition(c, float("nan"))
    with pytest.raises(InputError, match="already takes"):
        add_case_context(net)
    with pytest.raises(InputError, match="threshold"):
        add_case_context(base, threshold=1.0)
    with pytest.raises(InputError, match="scale"):
        add_case_context(base, scale=0.0)
    with pytest.raises(InputError, match="perfusion encoder"):
        add_case_context(ConditionalLDM(**TINY_CLDM))
    with pytest.raises(InputError, match="perfusion encoder"):  # no heads, no lesion to count
        add_case_context(ConditionalLDM(**TINY_CLDM, condition_encoder="perfusion",
                                        condition_options={**TINY_ENCODER, "latent_channels": 0}))


def test_batches_get_their_cases_context(plain):
    net = add_case_context(_perfusion_cldm())
    contexts = case_contexts(net, plain)
    assert set(contexts) == set(plain.case_names)
    for i, name in enumerate(plain.case_names):
        rows = torch.nonzero(plain.case_index == i).flatten()
        assert contexts[name] == pytest.approx(net.case_context_of(plain.cond[rows].float()))
    batch = {"case": [plain.case_names[1], plain.case_names[0], plain.case_names[1]], "cond": None}
    out = with_context(batch, contexts)
    assert out["context"].tolist() == pytest.approx([contexts[plain.case_names[1]], contexts[plain.case_names[0]],
                                                     contexts[plain.case_names[1]]])
    with pytest.raises(InputError, match="no case context for case 'other'"):
        with_context({"case": ["other"]}, contexts)
    with pytest.raises(InputError, match="does not take"):
        case_contexts(_perfusion_cldm(), plain)


# post-training adds it; synthesis reads it -----------------------------------------------------
@pytest.fixture(scope="module")
def base_dir(plain, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    ae = train_autoencoder(plain, runs / "ae", steps=2, batch_size=4, lr=1e-3, disc_start=10,
                           autoencoder_config=TINY_AE, discriminator_config=TINY_D, **COMMON)
    config = {**TINY_CLDM, "condition_options": {k: v for k, v in TINY_ENCODER.items() if k != "latent_channels"}}
    return train_ldm(plain, ae, runs / "base", steps=2, batch_size=4, lr=1e-3, cldm_config=config,
                     condition="perfusion", condition_loss_weight=1.0, parameterization="z0-residual", **COMMON)


def _confident_base(base_dir, tmp_path):
    """``base_dir`` with an EMA lesion head that calls every brain voxel lesion (a 2-step base's
    head calls none, and a context of 0 everywhere would leave its input weights untrained)."""
    nets, config = load_checkpoint(base_dir, names=["model", "ema", "autoencoder"])
    with torch.no_grad():
        nets["ema"].encoder.lesion_head.bias.fill_(20.0)
    kept = {k: v for k, v in config.items() if k not in ("format", "version", "networks", "training_state")}
    return save_checkpoint(tmp_path / "confident_base", nets, kept)


def test_post_training_adds_the_context_and_synthesis_reads_it_from_the_whole_case(plain, base_dir, tmp_path):
    base = _confident_base(base_dir, tmp_path)
    out = post_train(plain, base, tmp_path / "pt", steps=2, batch_size=4, lr=1e-2, lambda_image=0.5,
                     lambda_lesion=1.0, case_context=True, **COMMON)
    cfg = read_config(out)
    assert cfg["training"]["case_context"] == CONTEXT_THRESHOLD
    for name in ("model", "ema"):
        assert cfg["networks"][name]["config"]["case_context"]["threshold"] == CONTEXT_THRESHOLD
    nets, _ = load_checkpoint(out, names=["model", "ema"])
    base_nets, _ = load_checkpoint(base, names=["ema"])
    # both networks read the context with the base's EMA encoder, unchanged by training
    for net in nets.values():
        for key, value in base_nets["ema"].encoder.state_dict().items():
            torch.testing.assert_close(net.context_encoder.state_dict()[key], value)
    contexts = cfg["post_training"]["case_contexts"]
    assert set(contexts) == set(plain.case_names)
    assert contexts == pytest.approx(case_contexts(nets["ema"], plain))
    assert contexts == pytest.approx(dict.fromkeys(plain.case_names, burden_value(1.0)))
    # the channel was trained (its weights start at 0)
    assert float(nets["model"].unet.conv_in.conv.weight[:, -1].detach().abs().sum()) > 0

    model = load_model(out, "cpu")
    rows = torch.nonzero(plain.case_index == 0).flatten()
    cond = plain.cond[rows].float()
    stats: dict = {}
    images = sample_slices(model, cond, n_steps=2, stats=stats)
    assert stats["context"] == pytest.approx(contexts[plain.case_names[0]])
    # one slice alone reads another context unless the case's is given: what synthesis passes
    torch.testing.assert_close(sample_slices(model, cond[:1], n_steps=2, context=stats["context"]), images[:1])
    with torch.no_grad():
        model.cldm.unet.conv_in.conv.weight[:, -1].fill_(1.0)
    assert not torch.allclose(sample_slices(model, cond[:1], n_steps=2, context=stats["context"]),
                              sample_slices(model, cond[:1], n_steps=2, context=stats["context"] + 3.0))

    # continuing it keeps the context; a cLDM without the perfusion heads cannot have one
    again = post_train(plain, out, tmp_path / "pt2", steps=1, batch_size=4, lr=1e-3, **COMMON)
    assert read_config(again)["networks"]["ema"]["config"]["case_context"]["threshold"] == CONTEXT_THRESHOLD
    paper = train_ldm(plain, base_dir.parent / "ae", tmp_path / "paper", steps=1, batch_size=4, cldm_config=TINY_CLDM,
                      **COMMON)
    with pytest.raises(InputError, match="perfusion encoder"):
        post_train(plain, paper, tmp_path / "bad", steps=1, batch_size=4, case_context=True, **COMMON)
    assert not (tmp_path / "bad").exists()  # refused before the run folder is made


def test_the_demo_recipe_is_v8s_with_the_context():
    assert RECIPES["demo"].pt_case_context and not RECIPES["demo-v8"].pt_case_context
    assert {k: v for k, v in vars(RECIPES["demo"]).items() if k != "pt_case_context"} == \
        {k: v for k, v in vars(RECIPES["demo-v8"]).items() if k != "pt_case_context"}
