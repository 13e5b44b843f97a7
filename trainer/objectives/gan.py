"""GAN losses shared by the adversarial objectives (docs/methods.md, "GAN losses and R1").

D outputs logits, as in both official codebases. Every function casts the logits to float32
first, so under bf16/fp16 autocast the softplus, the means and the R1 gradient norms are still
computed in float32 (docs/methods.md: GAN losses and R1); the results are float32 scalars.

- Non-saturating (DDGAN and Diffusion-StyleGAN2): L_D = E softplus(-D(real)) + E softplus(D(fake)),
  L_G = E softplus(-D(fake)).
- Hinge (Diffusion-ProjectedGAN): L_D = E relu(1 - D(real)) + E relu(1 + D(fake)), L_G = -E D(fake).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _as_float32(logits: torch.Tensor, name: str) -> torch.Tensor:
    if logits.numel() == 0:
        raise ValueError(f"{name} is empty; expected at least one logit")
    if not logits.is_floating_point():
        raise ValueError(f"{name} has dtype {logits.dtype}; expected floating-point logits")
    return logits.float()


def d_loss_nonsaturating(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """mean softplus(-real) + mean softplus(fake), i.e. -log sigma(real) - log(1 - sigma(fake))."""
    real = _as_float32(real_logits, "real_logits")
    fake = _as_float32(fake_logits, "fake_logits")
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def g_loss_nonsaturating(fake_logits: torch.Tensor) -> torch.Tensor:
    """mean softplus(-fake), i.e. -log sigma(fake)."""
    return F.softplus(-_as_float32(fake_logits, "fake_logits")).mean()


def d_loss_hinge(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """mean relu(1 - real) + mean relu(1 + fake)."""
    real = _as_float32(real_logits, "real_logits")
    fake = _as_float32(fake_logits, "fake_logits")
    return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()


def g_loss_hinge(fake_logits: torch.Tensor) -> torch.Tensor:
    """-mean fake."""
    return -_as_float32(fake_logits, "fake_logits").mean()


def r1_penalty(real_logits: torch.Tensor, real_inputs: torch.Tensor) -> torch.Tensor:
    """Batch mean of ||d sum(real_logits) / d real_inputs_i||^2, with the graph kept for backward.

    The caller multiplies by ``gamma / 2`` (and, for StyleGAN2-style lazy regularisation, by the
    interval; DDGAN does not, docs/methods.md: DDGAN). Which tensor ``real_inputs`` is decides the
    penalty: DDGAN takes the real x_{t-1} only, with x_t a detached condition (docs/methods.md: DDGAN);
    Diffusion-GAN takes the clean real image *before* the diffusion, so the gradient passes through
    sqrt(alphas_cumprod_t) (docs/methods.md: Diffusion-GAN). ``real_inputs`` must require grad and
    ``real_logits`` must have been computed from it.
    """
    if not real_inputs.requires_grad:
        raise ValueError("real_inputs must require grad (set requires_grad before computing real_logits)")
    logits = _as_float32(real_logits, "real_logits")
    (grad,) = torch.autograd.grad(logits.sum(), real_inputs, create_graph=True)
    return grad.float().square().reshape(grad.shape[0], -1).sum(dim=1).mean()


def sign_statistic(real_logits: torch.Tensor) -> torch.Tensor:
    """Mean of sign(real_logits), Diffusion-GAN's overfitting statistic r_d (float32, 0-dim)."""
    return torch.sign(_as_float32(real_logits, "real_logits").detach()).mean()


# Metric name -> term of ``discriminator_terms``: what the loop logs of a discriminator's step.
DISC_METRICS = {"loss_d": "loss", "d_real": "d_real", "d_fake": "d_fake", "r1": "r1"}


def discriminator_terms(real_logits: torch.Tensor, fake_logits: torch.Tensor, real_inputs: torch.Tensor,
                        r1_weight: float) -> dict[str, torch.Tensor]:
    """D's non-saturating loss plus ``r1_weight`` * R1 w.r.t. ``real_inputs``, with the mean logits.

    Returns ``loss`` (with its graph), ``d_real`` and ``d_fake`` (detached float32 means) and, when
    ``r1_weight > 0``, ``r1`` (the unweighted penalty, with its graph).
    """
    terms = {"loss": d_loss_nonsaturating(real_logits, fake_logits),
             "d_real": real_logits.detach().float().mean(),
             "d_fake": fake_logits.detach().float().mean()}
    if r1_weight > 0:
        terms["r1"] = r1_penalty(real_logits, real_inputs)
        terms["loss"] = terms["loss"] + r1_weight * terms["r1"]
    return terms
