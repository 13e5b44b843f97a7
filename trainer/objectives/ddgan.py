"""DDGAN's few-step VP process: schedule, real pairs, posterior sampling and the NFE = T sampler.

Follows the official ``train_ddgan.py`` (``get_sigma_schedule``, ``Diffusion_Coefficients``,
``Posterior_Coefficients``, ``q_sample_pairs``, ``sample_posterior``, ``sample_from_model``;
docs/methods.md: DDGAN):

- levels k = 0..T on tau_k = k / T * (1 - 1e-3) + 1e-3; acp(tau) = exp(-tau^2 (beta_max -
  beta_min) / 2 - tau beta_min); betas_k = 1 - acp(tau_k) / acp(tau_{k-1}) for k >= 1, with
  betas_0 = 1e-8 prepended, so level 0 is (almost) clean data;
- q(x_k | x_0) uses the cumulative products of all T + 1 betas (``marginal_mean_coef`` = the
  code's ``a_s_cum``, ``marginal_std`` = ``sigmas_cum``);
- the posterior tables use ``betas[1:]``: index k describes q(x_k | x_{k+1}, x_0), the step from
  level k + 1 to level k, with no noise added at k = 0;
- time labels: the same integer k in [0, T) is given to G and D for the pair (x_k, x_{k+1}),
  although G's input sits at level k + 1 (docs/methods.md: DDGAN). ``sample`` uses the
  same convention, so G trained with these pairs samples correctly; keep it in both places.

Deviation: the tables are float64 numpy, cast to the input's dtype only on lookup. The code keeps
them in float32, where 1 - 1e-8 rounds to 1, so its level-0 noise std is exactly 0; here it is
1e-4 (the official schedule's value). Every random draw comes from an explicit generator.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch
from torch import nn

from ...models.diffusion import DeviceTables, Generators, generator_device, randint, randn
from ...models.discriminators import PairDiscriminator
from ..config import Config
from .base import (
    Adversary,
    Denoiser,
    LatentSampler,
    Metrics,
    Objective,
    StepContext,
    adversarial_round,
    diffusion_of,
    drop_labels,
)
from .gan import DISC_METRICS, discriminator_terms, g_loss_nonsaturating

# generator_fn(x_t, t, z, y) -> x0' : the DDGAN generator, t the step index in [0, T).
GeneratorFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]

_EPS_SMALL = 1e-3  # the time grid starts at tau = 1e-3, not 0
_FIRST_BETA = 1e-8
_MIN_POSTERIOR_VARIANCE = 1e-20  # where the code clips the posterior variance before its log


def vp_alphas_cumprod(tau: np.ndarray, beta_min: float, beta_max: float) -> np.ndarray:
    """1 - sigma^2(tau) of the VP-SDE: exp(-tau^2 (beta_max - beta_min) / 2 - tau beta_min)."""
    return np.exp(-0.5 * tau**2 * (beta_max - beta_min) - tau * beta_min)


class DDGANSchedule:
    """The tables of a T-step DDGAN process and the operations that use them."""

    def __init__(self, num_steps: int = 4, beta_min: float = 0.1, beta_max: float = 20.0) -> None:
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if not 0 <= beta_min <= beta_max or beta_max <= 0:
            raise ValueError(f"beta_min, beta_max must satisfy 0 <= beta_min <= beta_max, beta_max > 0, "
                             f"got {beta_min}, {beta_max}")
        self.num_steps = num_steps
        tau = np.arange(num_steps + 1, dtype=np.float64) / num_steps * (1.0 - _EPS_SMALL) + _EPS_SMALL
        grid_acp = vp_alphas_cumprod(tau, beta_min, beta_max)
        self.betas = np.append(_FIRST_BETA, 1.0 - grid_acp[1:] / grid_acp[:-1])  # (T + 1,)
        self._forward_tables()
        self._posterior_tables()
        self._device_tables = DeviceTables()

    def _forward_tables(self) -> None:
        # Level-indexed (T + 1,): one forward step x_{k+1} = a_{k+1} x_k + sqrt(beta_{k+1}) eps.
        self.step_mean_coef = np.sqrt(1.0 - self.betas)  # the code's a_s
        self.step_std = np.sqrt(self.betas)  # the code's sigmas
        self.alphas_cumprod = np.cumprod(1.0 - self.betas)
        self.marginal_mean_coef = np.sqrt(self.alphas_cumprod)  # a_s_cum
        self.marginal_std = np.sqrt(1.0 - self.alphas_cumprod)  # sigmas_cum

    def _posterior_tables(self) -> None:
        # Step-indexed (T,): built from betas[1:], as the code's Posterior_Coefficients.
        betas = self.betas[1:]
        acp = np.cumprod(1.0 - betas)
        acp_prev = np.append(1.0, acp[:-1])
        self.posterior_alphas_cumprod = acp
        self.posterior_variance = betas * (1.0 - acp_prev) / (1.0 - acp)
        self.posterior_log_variance_clipped = np.log(np.maximum(self.posterior_variance,
                                                                _MIN_POSTERIOR_VARIANCE))
        self.posterior_mean_coef1 = betas * np.sqrt(acp_prev) / (1.0 - acp)
        self.posterior_mean_coef2 = (1.0 - acp_prev) * np.sqrt(1.0 - betas) / (1.0 - acp)

    # ----------------------------------------------------------------------- lookups

    def extract(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] as (B, 1, ..., 1) in like's dtype and device; device copies are cached."""
        if t.ndim != 1 or t.shape[0] != like.shape[0]:
            raise ValueError(f"t has shape {tuple(t.shape)}, expected ({like.shape[0]},) to match the batch")
        table = self._device_tables.get(getattr(self, name), like.device, like.dtype)
        values = table[t.to(device=like.device, dtype=torch.long)]
        return values.reshape(-1, *([1] * (like.ndim - 1)))

    # ----------------------------------------------------------------------- forward process

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = a_cum[t] x0 + sigma_cum[t] noise, t a level in [0, T]."""
        return self.extract("marginal_mean_coef", t, x0) * x0 + self.extract("marginal_std", t, x0) * noise

    def q_sample_pairs(self, x0: torch.Tensor, t: torch.Tensor,
                       generator: Generators) -> tuple[torch.Tensor, torch.Tensor]:
        """A real pair (x_t, x_{t+1}) for steps t in [0, T): x_t ~ q(x_t | x0), then one forward step.

        Draw order as in the code: the noise of the step, then that of x_t.
        """
        step_noise = _randn_like(x0, generator)
        x_t = self.q_sample(x0, t, _randn_like(x0, generator))
        next_level = t + 1
        x_next = (self.extract("step_mean_coef", next_level, x0) * x_t
                  + self.extract("step_std", next_level, x0) * step_noise)
        return x_t, x_next

    # ----------------------------------------------------------------------- reverse process

    def posterior_mean_variance(self, x0_pred: torch.Tensor, x_next: torch.Tensor,
                                t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log variance of q(x_t | x_{t+1}, x0 = x0_pred), t in [0, T)."""
        mean = (self.extract("posterior_mean_coef1", t, x_next) * x0_pred
                + self.extract("posterior_mean_coef2", t, x_next) * x_next)
        variance = self.extract("posterior_variance", t, x_next)
        log_variance = self.extract("posterior_log_variance_clipped", t, x_next)
        return mean, variance, log_variance

    def posterior_sample(self, x0_pred: torch.Tensor, x_next: torch.Tensor, t: torch.Tensor,
                         generator: Generators) -> torch.Tensor:
        """x_t ~ q(x_t | x_{t+1}, x0_pred); the mean alone where t == 0. Differentiable in x0_pred.

        The noise is drawn for the whole batch even where t == 0 (masked out), as in the code.
        """
        mean, _, log_variance = self.posterior_mean_variance(x0_pred, x_next, t)
        noise = _randn_like(x_next, generator)
        nonzero = (t != 0).to(x_next.dtype).reshape(-1, *([1] * (x_next.ndim - 1)))
        return mean + nonzero * torch.exp(0.5 * log_variance) * noise

    @torch.no_grad()
    def sample(self, generator_fn: GeneratorFn, shape: tuple[int, ...], labels: torch.Tensor | None,
               generator: Generators, latent_dim: int,
               device: torch.device | str | None = None) -> torch.Tensor:
        """NFE = T sampling: x ~ N(0, I), then for t = T-1 .. 0: z ~ N(0, I_latent_dim),
        x0' = generator_fn(x, t, z, labels), x ~ q(x_t | x, x0').

        ``device`` defaults to the labels', else the generator's. Draw order per step: z, then the
        posterior noise, as in the code's ``sample_from_model``. ``generator`` may be one generator
        per sample (see ``models.diffusion.randn``).
        """
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {latent_dim}")
        if labels is not None and labels.shape != (shape[0],):
            raise ValueError(f"labels has shape {tuple(labels.shape)}, expected ({shape[0]},)")
        if device is None:
            device = labels.device if labels is not None else generator_device(generator)
        x = randn(shape, generator, device)
        for step in reversed(range(self.num_steps)):
            t = torch.full((shape[0],), step, dtype=torch.long, device=device)
            z = randn((shape[0], latent_dim), generator, device)
            x0_pred = generator_fn(x, t, z, labels).to(x.dtype)
            x = self.posterior_sample(x0_pred, x, t, generator)
        return x


# --------------------------------------------------------------------------- the game
# One place for DDGAN's losses, used by the DiT objective and the 25-Gaussians benchmark alike.

def discriminator_loss(disc: nn.Module, real_prev: torch.Tensor, fake_prev: torch.Tensor,
                       x_next: torch.Tensor, t: torch.Tensor, r1_weight: float = 0.0,
                       **cond: torch.Tensor) -> dict[str, torch.Tensor]:
    """Non-saturating loss of D(x_t, x_{t+1}, t) on a real and a generated x_t, plus R1.

    R1 is taken with respect to the real x_t only, x_{t+1} being a detached condition, and DDGAN
    does not rescale it by the lazy interval (docs/methods.md: DDGAN): ``r1_weight`` is gamma / 2.
    """
    real_prev = real_prev.detach().requires_grad_(r1_weight > 0)
    x_next = x_next.detach()
    real_logits = disc(real_prev, x_next, t, **cond)
    fake_logits = disc(fake_prev.detach(), x_next, t, **cond)
    return discriminator_terms(real_logits, fake_logits, real_prev, r1_weight)


def generator_loss(disc: nn.Module, fake_prev: torch.Tensor, x_next: torch.Tensor, t: torch.Tensor,
                   **cond: torch.Tensor) -> torch.Tensor:
    """softplus(-D(x_t', x_{t+1}, t)) for a generated x_t' drawn from the posterior."""
    return g_loss_nonsaturating(disc(fake_prev, x_next.detach(), t, **cond))


def _randn_like(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    return randn(x.shape, generator, x.device, x.dtype)


# --------------------------------------------------------------------------- the DiT as G

Autocast = Callable[[], AbstractContextManager[Any]]


class FewStepDiT:
    """A DiT read as DDGAN's generator G(x_{t+1}, z, t) -> x0', and its NFE = T sampler.

    G is given the DiT timestep whose alphas_cumprod is nearest to that of the DDGAN level, with z
    entering through the DiT's zero-initialised z embedding. Its first C output channels are x0'
    (``parameterization: x0``, as DDGAN; squashed by tanh with ``x0_tanh``, as its official
    generator), or eps turned into x0' (``eps``, so a pretrained DiT
    starts as a sensible denoiser; ill-conditioned at the noisiest level, where x0 = (x - sigma
    eps) / a divides by a ~ 0.007) [INFERRED].
    """

    def __init__(self, cfg: Config, channels: int, latent_size: int,
                 autocast: Autocast = nullcontext) -> None:
        dd = cfg.ddgan
        self.schedule = DDGANSchedule(dd.num_steps, dd.beta_min, dd.beta_max)
        self.parameterization, self.z_dim, self.x0_tanh = dd.parameterization, dd.z_dim, dd.x0_tanh
        self.channels, self.latent_size = channels, latent_size
        self.autocast = autocast
        gaps = np.abs(diffusion_of(cfg).alphas_cumprod[None, :] - self.schedule.alphas_cumprod[:, None])
        self.dit_timesteps = torch.as_tensor(gaps.argmin(axis=1), dtype=torch.long)  # per DDGAN level

    def predict_x0(self, model: nn.Module, x_next: torch.Tensor, t: torch.Tensor, z: torch.Tensor,
                   labels: torch.Tensor | None) -> torch.Tensor:
        """G(x_{t+1}, z, t): x0' from the DiT's output at level t + 1."""
        level = t + 1
        dit_t = self.dit_timesteps.to(t.device)[level]
        with self.autocast():
            output = model(x_next, dit_t, labels, z)[:, : self.channels].float()
        if self.parameterization == "x0":
            return torch.tanh(output) if self.x0_tanh else output
        eps = output
        signal = self.schedule.extract("marginal_mean_coef", level, x_next)
        noise = self.schedule.extract("marginal_std", level, x_next)
        return (x_next - noise * eps) / signal

    @torch.no_grad()
    def sample(self, model: nn.Module, labels: torch.Tensor, rng: Generators,
               clip_denoised: bool) -> torch.Tensor:
        """NFE = num_steps posterior sampling (x0' clipped to [-1, 1] in pixel space), no guidance."""
        def generator_fn(x: torch.Tensor, t: torch.Tensor, z: torch.Tensor,
                         y: torch.Tensor | None) -> torch.Tensor:
            x0 = self.predict_x0(model, x, t, z, y)
            return x0.clamp(-1, 1) if clip_denoised else x0

        shape = (len(labels), self.channels, self.latent_size, self.latent_size)
        return self.schedule.sample(generator_fn, shape, labels, rng, self.z_dim)


def few_step_sampler(cfg: Config, channels: int, latent_size: int) -> LatentSampler:
    return FewStepDiT(cfg, channels, latent_size).sample


# --------------------------------------------------------------------------- the objective

class DDGANObjective(Objective):
    """A few-step DiT whose every reverse step is a conditional GAN (docs/methods.md: DDGAN).

    Per step, as the official loop: a D step on a real pair and a generated x_t drawn from the
    posterior q(x_t | x_{t+1}, x0'), with R1 on the real x_t every ``r1_interval`` steps; then a G
    step on freshly drawn t, pairs and z. ``mse_weight`` adds an optional ||x0' - x0||^2 term (not
    in DDGAN). Sampling takes NFE = num_steps and no classifier-free guidance.
    """

    name = "ddgan"
    adversary_names = ("disc",)
    config_sections = ("ddgan", "disc")
    sampler = staticmethod(few_step_sampler)

    def __init__(self, cfg: Config, denoiser: Denoiser) -> None:
        super().__init__(cfg, denoiser)
        denoiser.role = "generator"
        self.chain = FewStepDiT(cfg, denoiser.channels, denoiser.latent_size, denoiser.accelerator.autocast)
        disc = PairDiscriminator(denoiser.channels, denoiser.latent_size, cfg.model.num_classes,
                                 cfg.disc.base_channels, cfg.disc.num_blocks, num_steps=cfg.ddgan.num_steps)
        self.disc = Adversary(denoiser.accelerator, disc, cfg.disc)

    @staticmethod
    def denoiser_kwargs(cfg: Config) -> dict[str, Any]:
        return {"z_dim": cfg.ddgan.z_dim}

    def fake_pair(self, latents: torch.Tensor, labels: torch.Tensor, rng: Generators,
                  ) -> tuple[torch.Tensor, ...]:
        """(t, real x_t, x_{t+1}, x0', generated x_t) for fresh t, pairs and z."""
        schedule = self.chain.schedule
        t = randint(schedule.num_steps, latents.shape[0], rng, latents.device)
        real_prev, x_next = schedule.q_sample_pairs(latents, t, rng)
        z = randn((latents.shape[0], self.chain.z_dim), rng, latents.device)
        x0_pred = self.chain.predict_x0(self.denoiser.model, x_next, t, z, labels)
        fake_prev = schedule.posterior_sample(x0_pred, x_next, t, rng)
        return t, real_prev, x_next, x0_pred, fake_prev

    def train_step(self, latents: torch.Tensor, labels: torch.Tensor, ctx: StepContext) -> Metrics:
        dd = self.cfg.ddgan
        rng = ctx.draws(len(latents), latents.device)
        labels = drop_labels(labels, self.cfg.model.class_dropout, self.cfg.model.num_classes, rng)
        r1_weight = dd.r1_gamma / 2 if dd.r1_gamma > 0 and ctx.step % dd.r1_interval == 0 else 0.0
        autocast = self.denoiser.accelerator.autocast

        def disc_terms() -> dict[str, torch.Tensor]:
            with torch.no_grad():
                t, real_prev, x_next, _, fake_prev = self.fake_pair(latents, labels, rng)
            with autocast():
                return discriminator_loss(self.disc.net, real_prev, fake_prev, x_next, t, r1_weight, y=labels)

        def generator_terms() -> dict[str, torch.Tensor]:  # fresh t, pairs and z
            t, _, x_next, x0_pred, fake_prev = self.fake_pair(latents, labels, rng)
            with autocast():
                g_loss = generator_loss(self.disc.net, fake_prev, x_next, t, y=labels)
            mse = (x0_pred - latents).square().mean()
            return {"loss": g_loss + dd.mse_weight * mse, "g": g_loss, "mse": mse}

        played = adversarial_round(self.disc, disc_terms, self.denoiser, generator_terms, ctx.step, self.name)
        return played.metrics({"loss": "loss", "loss_g": "g", "loss_x0_mse": "mse"}, DISC_METRICS)
