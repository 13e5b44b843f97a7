"""GAN losses against their formulas, float32 under low precision, R1 against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from advdit.trainer.objectives.gan import (
    d_loss_hinge,
    d_loss_nonsaturating,
    g_loss_hinge,
    g_loss_nonsaturating,
    r1_penalty,
    sign_statistic,
)

REAL = [2.0, -1.0, 0.5]
FAKE = [-3.0, 0.25]


def _softplus(v: float) -> float:
    return math.log1p(math.exp(v))


def test_nonsaturating_losses_equal_softplus_formulas() -> None:
    real, fake = torch.tensor(REAL), torch.tensor(FAKE)
    expected_d = (sum(_softplus(-r) for r in REAL) / len(REAL)
                  + sum(_softplus(f) for f in FAKE) / len(FAKE))
    expected_g = sum(_softplus(-f) for f in FAKE) / len(FAKE)
    assert d_loss_nonsaturating(real, fake).item() == pytest.approx(expected_d, rel=1e-6)
    assert g_loss_nonsaturating(fake).item() == pytest.approx(expected_g, rel=1e-6)
    # The same as -log sigma(real) - log(1 - sigma(fake)).
    sigmoid = torch.sigmoid
    log_form = -torch.log(sigmoid(real)).mean() - torch.log(1 - sigmoid(fake)).mean()
    assert d_loss_nonsaturating(real, fake).item() == pytest.approx(log_form.item(), rel=1e-5)


def test_hinge_losses_equal_their_formulas() -> None:
    real, fake = torch.tensor(REAL), torch.tensor(FAKE)
    expected_d = (sum(max(0.0, 1 - r) for r in REAL) / len(REAL)
                  + sum(max(0.0, 1 + f) for f in FAKE) / len(FAKE))
    assert d_loss_hinge(real, fake).item() == pytest.approx(expected_d, rel=1e-6)
    assert g_loss_hinge(fake).item() == pytest.approx(-sum(FAKE) / len(FAKE), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_losses_are_float32_for_low_precision_logits(dtype: torch.dtype) -> None:
    # Computed in bf16/fp16, softplus(40.3) and the means would be off by far more than 1e-7.
    real = torch.tensor([40.3, -0.01, 7.1]).to(dtype)
    fake = torch.tensor([-0.02, 3.3]).to(dtype)
    for loss in (d_loss_nonsaturating(real, fake), d_loss_hinge(real, fake),
                 g_loss_nonsaturating(fake), g_loss_hinge(fake), sign_statistic(real)):
        assert loss.dtype == torch.float32 and loss.ndim == 0
    # Value: the float32 formula applied to the (rounded) low-precision logits.
    expected = torch.nn.functional.softplus(-real.float()).mean() + torch.nn.functional.softplus(
        fake.float()).mean()
    assert d_loss_nonsaturating(real, fake).item() == pytest.approx(expected.item(), rel=1e-7)


def test_r1_of_a_linear_discriminator_is_the_squared_weight_norm() -> None:
    # D(x) = <w, x> + b for every sample: the gradient is w, so the penalty is ||w||^2 whatever x.
    w = torch.tensor([[1.0, -2.0], [0.5, 3.0]], requires_grad=True)  # acting on (B, 2, 2) inputs
    x = torch.randn(5, 2, 2, generator=torch.Generator().manual_seed(0)).requires_grad_()
    logits = (x * w).sum(dim=(1, 2)) + 0.7
    penalty = r1_penalty(logits, x)
    assert penalty.item() == pytest.approx(1 + 4 + 0.25 + 9, rel=1e-6)
    # create_graph: the penalty can be back-propagated into D's parameters, d||w||^2/dw = 2w.
    penalty.backward()
    assert torch.allclose(w.grad, 2 * w.detach())


def test_r1_of_a_quadratic_discriminator_matches_the_closed_form() -> None:
    # D(x) = 1/2 sum_j a_j x_j^2: grad_j = a_j x_j, penalty = mean_i sum_j (a_j x_ij)^2.
    a = torch.tensor([1.0, -3.0, 0.5], requires_grad=True)
    x = torch.tensor([[1.0, 2.0, -1.0], [0.0, -1.0, 4.0]], requires_grad=True)
    penalty = r1_penalty(0.5 * (a * x.square()).sum(dim=1), x)
    expected = ((1 + 36 + 0.25) + (0 + 9 + 4)) / 2
    assert penalty.item() == pytest.approx(expected, rel=1e-6)
    penalty.backward()
    # d penalty / d a_j = mean_i 2 a_j x_ij^2
    assert torch.allclose(a.grad, (2 * a.detach() * x.detach().square()).mean(dim=0))


def test_r1_through_a_diffusion_scales_with_the_signal_coefficient() -> None:
    # Diffusion-GAN takes R1 w.r.t. the clean x: y = s x + noise, D(y) = <w, y> -> grad s w.
    w, scale = torch.tensor([3.0, 4.0]), 0.6
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(1)).requires_grad_()
    y = scale * x + 0.05 * torch.randn(4, 2, generator=torch.Generator().manual_seed(2))
    assert r1_penalty(y @ w, x).item() == pytest.approx(scale**2 * 25.0, rel=1e-6)


def test_r1_with_bf16_logits_is_float32() -> None:
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0)).requires_grad_()
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    logits = (x.to(torch.bfloat16) * w.to(torch.bfloat16)).sum(dim=1)
    penalty = r1_penalty(logits, x)
    assert penalty.dtype == torch.float32
    assert penalty.item() == pytest.approx(30.0, rel=1e-6)  # weights exact in bf16


def test_r1_needs_an_input_that_requires_grad() -> None:
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="real_inputs must require grad"):
        r1_penalty(x.sum(dim=1), x)


def test_sign_statistic_and_bad_logits() -> None:
    assert sign_statistic(torch.tensor([2.0, -1.0, 0.5, 4.0])).item() == pytest.approx(0.5)
    assert sign_statistic(torch.tensor([2.0, 0.0, 0.0])).item() == pytest.approx(1 / 3)  # sign(0) = 0
    with pytest.raises(ValueError, match="real_logits is empty"):
        sign_statistic(torch.zeros(0))
    with pytest.raises(ValueError, match="fake_logits has dtype torch.int64"):
        g_loss_nonsaturating(torch.tensor([1, 2]))
