"""Training losses against direct computation."""

import pytest
import torch

from ctp2mri.losses import (
    adaptive_gan_weight,
    autoencoder_loss,
    core_loss,
    discriminator_factor,
    generator_adversarial_loss,
    hinge_discriminator_loss,
    latent_loss,
    reconstruction_loss,
    total_loss,
)


def test_latent_loss_is_the_mean_squared_noise_error_of_eq4():
    g = torch.Generator().manual_seed(0)
    eps, eps_hat = torch.randn(4, 3, 6, 7, generator=g), torch.randn(4, 3, 6, 7, generator=g)
    expected = sum(float((eps[i] - eps_hat[i]).pow(2).sum()) for i in range(4)) / eps.numel()
    assert float(latent_loss(eps, eps_hat)) == pytest.approx(expected, rel=1e-6)
    assert float(latent_loss(eps, eps)) == 0.0
    # ε̂ = 0 gives E[ε²] ≈ 1: the loss of a zero-initialised network
    big = torch.randn(200_000, generator=g)
    assert float(latent_loss(big, torch.zeros_like(big))) == pytest.approx(1.0, abs=0.01)


def test_reconstruction_loss_is_l1():
    x = torch.tensor([[[[1.0, -1.0], [0.5, 0.0]]]])
    y = torch.tensor([[[[0.0, 0.0], [0.5, 2.0]]]])
    assert float(reconstruction_loss(x, y)) == pytest.approx((1 + 1 + 0 + 2) / 4)


def test_hinge_losses():
    real = torch.tensor([2.0, 0.5, -1.0])  # margins: 0, 0.5, 2
    fake = torch.tensor([-2.0, 0.0, 1.0])  # margins: 0, 1, 2
    assert float(hinge_discriminator_loss(real, fake)) == pytest.approx(0.5 * (2.5 / 3 + 3.0 / 3))
    assert float(generator_adversarial_loss(fake)) == pytest.approx(1.0 / 3)
    # a perfect critic (real ≥ 1, fake ≤ −1) has zero loss
    assert float(hinge_discriminator_loss(torch.full((5,), 3.0), torch.full((5,), -1.5))) == 0.0


def test_adaptive_weight_is_the_ratio_of_last_layer_gradient_norms():
    w = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    rec = (w ** 2).sum()  # ∇ = 2w → ‖·‖ = 2‖w‖
    g = 5.0 * w.sum()  # ∇ = 5·1 → ‖·‖ = 5√3
    expected = 2 * float(torch.linalg.vector_norm(w.detach())) / (5 * 3 ** 0.5 + 1e-4) * 0.2
    weight = adaptive_gan_weight(rec, g, w, disc_weight=0.2)
    assert float(weight) == pytest.approx(expected, rel=1e-6)
    assert not weight.requires_grad
    # the graphs survive (retain_graph): the losses can still be back-propagated
    (rec + g).backward()
    assert torch.allclose(w.grad, 2 * w.detach() + 5)
    # clamped at max_weight when the adversarial gradient vanishes
    v = torch.ones(3, requires_grad=True)
    assert float(adaptive_gan_weight((v ** 2).sum(), 0.0 * v.sum(), v, 1.0, max_weight=10.0)) == 10.0


def test_discriminator_switches_on_at_disc_start():
    assert discriminator_factor(29_999, 30_001) == 0.0
    assert discriminator_factor(30_001, 30_001) == 1.0
    assert discriminator_factor(5, 0, factor=0.5) == 0.5


def test_autoencoder_loss_assembles_the_official_terms():
    torch.manual_seed(0)
    last = torch.nn.Conv2d(2, 2, 3, padding=1)
    z = torch.randn(2, 2, 8, 8)
    x = torch.randn(2, 2, 8, 8)
    x_rec = last(z)
    logits = (x_rec ** 2).mean(dim=1, keepdim=True)  # stands in for D(x̂)
    codebook = torch.tensor(0.3)
    before, parts = autoencoder_loss(x, x_rec, codebook, logits, last.weight, step=4, disc_start=5)
    assert before.item() == pytest.approx((x - x_rec).abs().mean().item() + 0.3, rel=1e-6)
    assert "g_loss" not in parts
    after, parts = autoencoder_loss(x, x_rec, codebook, logits, last.weight, step=5, disc_start=5,
                                    disc_weight=0.2, codebook_weight=2.0)
    rec = (x - x_rec).abs().mean()
    g = -logits.mean()
    weight = adaptive_gan_weight(rec, g, last.weight, 0.2)
    assert after.item() == pytest.approx((rec + weight * g + 2.0 * 0.3).item(), rel=1e-5)
    assert parts["d_weight"] == pytest.approx(float(weight), rel=1e-6)


# --------------------------------------------------------------------------- the core term
def _core_case():
    lesion = torch.zeros(2, 1, 8, 8)
    lesion[0, 0, 2:5, 2:5] = 1.0  # 9 voxels in the first slice, none in the second
    brain = torch.ones_like(lesion)
    brain[:, :, 0] = 0.0  # a row outside the brain
    return lesion, brain


def test_core_loss_is_one_minus_the_soft_dice_of_the_thresholded_adc():
    lesion, brain = _core_case()
    tau, width = -0.65, 0.03
    exact = torch.where(lesion > 0, tau - 1.0, tau + 1.0)  # every lesion voxel far under τ, the rest far above
    assert float(core_loss(exact, lesion, brain, tau, width)) == pytest.approx(1 - 19 / 19, abs=1e-6)
    # every brain voxel drawn as core: Dice = 2·9 / (112 + 9) (the row outside the brain never counts)
    everywhere = torch.full_like(lesion, tau - 1.0)
    assert float(core_loss(everywhere, lesion, brain, tau, width)) == pytest.approx(1 - 19 / 122, rel=1e-5)
    nothing = torch.full_like(lesion, tau + 1.0)
    assert float(core_loss(nothing, lesion, brain, tau, width)) == pytest.approx(1 - 1 / 10, rel=1e-5)
    # at τ each voxel is core with probability ½
    at = torch.full_like(lesion, tau)
    assert float(core_loss(at, lesion, brain, tau, width)) == pytest.approx(1 - (9 + 1) / (56 + 9 + 1), rel=1e-5)


def test_core_loss_pushes_a_false_core_up_and_a_missed_core_down_and_is_finite_without_lesion():
    lesion, brain = _core_case()
    tau, width = -0.65, 0.03
    adc = torch.full_like(lesion, tau + 0.02)  # just above τ everywhere: a missed core …
    adc[0, 0, 5, 2:5] = tau - 0.02  # … and a false one beside it
    adc.requires_grad_(True)
    core_loss(adc, lesion, brain, tau, width).backward()
    assert bool((adc.grad[0, 0, 2:5, 2:5] > 0).all())  # gradient descent lowers the missed core's ADC
    assert bool((adc.grad[0, 0, 5, 2:5] < 0).all())  # and raises the false core's
    assert bool((adc.grad[:, :, 0] == 0).all())  # outside the brain: nothing
    empty = torch.zeros_like(lesion)
    free = torch.full_like(lesion, tau + 1.0)
    value = core_loss(free, empty, brain, tau, width)
    assert float(value) == pytest.approx(0.0, abs=1e-3) and torch.isfinite(value)
    with pytest.raises(ValueError, match="width"):
        core_loss(adc, lesion, brain, tau, 0.0)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        core_loss(adc.detach().repeat(1, 2, 1, 1), lesion, brain, tau, width)


def test_total_loss_adds_the_core_term_only_with_a_positive_lambda():
    latent, image, lesion, core = (torch.tensor(v) for v in (0.5, 0.1, 0.2, 0.4))
    assert float(total_loss(latent, image, lesion, 0.5, 2.0, core, 0.25)) == pytest.approx(0.5 + 0.05 + 0.4 + 0.1)
    assert float(total_loss(latent, image, lesion, 0.5, 2.0)) == pytest.approx(0.95)
    assert float(total_loss(latent, image, lesion, 0.5, 2.0, None, 0.0)) == pytest.approx(0.95)
    with pytest.raises(ValueError, match="no core loss"):
        total_loss(latent, image, lesion, 0.5, 2.0, None, 0.1)
