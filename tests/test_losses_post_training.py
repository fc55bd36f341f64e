"""Paper Eq. 6–8 (lesion-aware post-training losses) against direct computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctp2mri.diffusion import NoiseSchedule
from ctp2mri.losses import image_loss, latent_loss, lesion_loss, total_loss


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((3, 2, 5, 6), generator=g) * 2 - 1
    x_hat = torch.rand((3, 2, 5, 6), generator=g) * 2 - 1
    brain = (torch.rand((3, 1, 5, 6), generator=g) > 0.3).float()
    lesion = brain * (torch.rand((3, 1, 5, 6), generator=g) > 0.7).float()
    return x, x_hat, brain, lesion


def _direct(x, x_hat, mask) -> float:
    """Σ_b Σ_c Σ_hw M[b,hw] (x − x̂)² / Σ M, written out element by element in numpy."""
    x, x_hat, mask = (np.asarray(a, dtype=np.float64) for a in (x, x_hat, mask))
    num = 0.0
    for b in range(x.shape[0]):
        for c in range(x.shape[1]):
            for i in range(x.shape[2]):
                for j in range(x.shape[3]):
                    num += mask[b, 0, i, j] * (x[b, c, i, j] - x_hat[b, c, i, j]) ** 2
    return num / mask.sum()


def test_eq6_image_loss_is_the_squared_error_in_the_brain_per_brain_voxel():
    x, x_hat, brain, _ = _batch()
    assert float(image_loss(x, x_hat, brain)) == pytest.approx(_direct(x, x_hat, brain), rel=1e-6)
    # outside the brain nothing counts
    x_out = x_hat + (1 - brain) * 5.0
    assert float(image_loss(x_out, x_hat, brain)) == 0.0
    # whole slice as "brain": Σ over channels / pixels = C × the element mean
    ones = torch.ones_like(brain)
    assert float(image_loss(x, x_hat, ones)) == pytest.approx(2 * float(((x - x_hat) ** 2).mean()), rel=1e-6)


def test_eq7_lesion_loss_is_the_squared_error_in_the_lesion_per_lesion_voxel():
    x, x_hat, _, lesion = _batch(1)
    assert lesion.sum() > 0
    assert float(lesion_loss(x, x_hat, lesion)) == pytest.approx(_direct(x, x_hat, lesion), rel=1e-6)
    # one lesion voxel with error d in both channels → 2 d²
    x2, one = torch.zeros(1, 2, 4, 4), torch.zeros(1, 1, 4, 4)
    one[0, 0, 1, 2] = 1
    x2_hat = x2.clone()
    x2_hat[0, :, 1, 2] = 0.5
    x2_hat[0, :, 3, 3] = 9.0  # not in the lesion
    assert float(lesion_loss(x2, x2_hat, one)) == pytest.approx(2 * 0.25)


def test_a_batch_without_lesion_voxel_gives_exactly_zero_with_finite_zero_gradient():
    x, x_hat, brain, _ = _batch(2)
    x_hat = x_hat.clone().requires_grad_(True)
    empty = torch.zeros_like(brain)
    les = lesion_loss(x, x_hat, empty)
    assert les.item() == 0.0 and torch.isfinite(les)
    total = total_loss(torch.tensor(0.7), image_loss(x, x_hat, brain), les, 0.01, 0.02)
    assert torch.isfinite(total)
    total.backward()
    assert torch.isfinite(x_hat.grad).all() and x_hat.grad.abs().sum() > 0  # the image term still acts
    x_hat.grad = None
    lesion_loss(x, x_hat, empty).backward()
    assert torch.equal(x_hat.grad, torch.zeros_like(x_hat))


def test_eq8_total_weights_the_terms_and_lambda_zero_is_eq4_itself():
    latent, image, les = torch.tensor(0.9), torch.tensor(0.3), torch.tensor(2.0)
    assert float(total_loss(latent, image, les, 0.01, 0.02)) == pytest.approx(0.9 + 0.003 + 0.04)
    assert float(total_loss(latent, image, les, 0.1, 0.0)) == pytest.approx(0.93)
    eps, eps_hat = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    l4 = latent_loss(eps, eps_hat)
    assert total_loss(l4, None, None, 0.0, 0.0) is l4  # bit for bit the Eq. 4 objective
    assert total_loss(l4, torch.tensor(float("nan")), None, 0.0, 0.0) is l4  # a λ = 0 term never leaks
    with pytest.raises(ValueError, match="λ_image"):
        total_loss(latent, None, les, 0.01, 0.02)
    with pytest.raises(ValueError, match="≥ 0"):
        total_loss(latent, image, les, -0.01, 0.0)


def test_masks_of_the_wrong_shape_are_refused():
    x, x_hat, brain, _ = _batch()
    with pytest.raises(ValueError):
        image_loss(x, x_hat, brain[:, :, :4])
    with pytest.raises(ValueError):
        image_loss(x, x_hat[:, :1], brain)


def test_eq5_then_eq6_gradient_reaches_eps_hat_through_a_decoder():
    """Eq. 5 (`NoiseSchedule.predict_z0`) feeding Eq. 6: the gradient w.r.t. ε̂ is the chain rule's."""
    schedule = NoiseSchedule()
    g = torch.Generator().manual_seed(4)
    z_t, x = torch.randn(1, 1, 2, 2, generator=g), torch.randn(1, 1, 2, 2, generator=g)
    eps_hat = torch.randn(1, 1, 2, 2, generator=g, requires_grad=True)
    t = 500
    brain = torch.ones(1, 1, 2, 2)
    x_hat = 3.0 * schedule.predict_z0(z_t, t, eps_hat)  # a linear "decoder" D(z) = 3z
    image_loss(x, x_hat, brain).backward()
    abar = schedule.alphas_cumprod[t].item()
    expected = 2 * (x_hat.detach() - x) / 4 * 3.0 * (-np.sqrt(1 - abar) / np.sqrt(abar))
    assert torch.allclose(eps_hat.grad, expected.float(), rtol=1e-5, atol=1e-7)
