"""Diffusion-GAN's adaptive forward diffusion used as instance noise (docs/methods.md: Diffusion-GAN).

Follows the official ``diffusion-stylegan2/training/diffusion.py`` and the ADA-style update of its
training loop:

- T = clip(t_min + round(p * (t_max - t_min)), t_min, t_max), p starts at 0 so T starts at t_min;
- the linear beta schedule is re-stretched to T (``linspace(beta_start, beta_end, T)``), with
  alphas_cumprod[0] = 1 prepended so that t = 0 means clean;
- the exploration list t_epl holds round(clean_fraction * epl_size) zeros (32 of 64 in the code)
  and the rest drawn from {1..T}, with P(k) proportional to k - 1 ('priority', so t = 1 is never
  drawn) or uniform; it is redrawn only when T is updated;
- y = sqrt(acp_t) x + sqrt(1 - acp_t) * noise_std * eps with t drawn with replacement from t_epl;
- every ``ada_interval`` updates: p += sign(mean sign(D(real)) - target) * B * ada_interval /
  (ada_kimg * 1000), clipped to [0, 1], where B is the global batch size.

Deviations, all deliberate: every random draw comes from an explicit ``torch.Generator`` (the code
uses the global numpy RNG), so a resumed run draws what the uninterrupted one drew; t is returned
with shape (B,) (the code returns (B, 1)); t_epl is int64 (the code's ``np.int`` no longer exists,
docs/methods.md: Diffusion-GAN); the sign statistic is all-reduced here rather than by a stats collector.
"""

from __future__ import annotations

from typing import Any, NamedTuple, get_args

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ...models.diffusion import DeviceTables, Generators, randint, randn
from ...models.discriminators import TimestepClassDiscriminator
from ..config import Config, TimestepDistribution
from ..runtime.distributed import initialized
from .base import ADVERSARY_STREAM, Adversary, Denoiser, Metrics, Objective, StepContext, adversarial_round
from .dit import denoise, denoising_metrics, diffusion_sampler
from .gan import DISC_METRICS, discriminator_terms, g_loss_nonsaturating

T_DISTRIBUTIONS = get_args(TimestepDistribution)  # the config's choices
PIXEL_NOISE_STD = 0.05  # diffusion_gan.noise_std: null in pixel space
LATENT_NOISE_STD = 0.5  # and on SD-VAE latents


class AdaStats(NamedTuple):
    """What one controller update saw and decided, for logging."""

    r_d: float  # mean sign of D's real logits over the interval, all ranks (nan if none were seen)
    p: float
    T: int


class AdaptiveDiffusion:
    """The controller state (p, T, t_epl, schedule) and the diffusion it applies to D's inputs.

    Usage per training iteration: ``y, t = diffuse(x, generator)`` for real and fake D inputs,
    ``accumulate(real_logits)`` after D's forward on real data, then ``update(global_batch,
    generator)`` once; every ``ada_interval``-th call of ``update`` adjusts p and T. All ranks must
    call ``update`` equally often: the adjusting calls all-reduce the statistic.
    ``seed`` only sets the initial t_epl (the code draws it from the global RNG at construction);
    give each rank its own, as the code's per-rank draws differ too. The defaults are the code's,
    for [-1, 1] pixels; on SD-VAE latents (std ~ 1) ``noise_std`` = 0.05 is a much weaker
    corruption, and we suggest starting between 0.5 and 1.0 ([INFERRED]).
    """

    def __init__(self, beta_start: float = 1e-4, beta_end: float = 2e-2, t_min: int = 10, t_max: int = 1000,
                 noise_std: float = PIXEL_NOISE_STD, ts_dist: str = "priority", clean_fraction: float = 0.5,
                 target: float = 0.6, ada_interval: int = 4, ada_kimg: float = 100, epl_size: int = 64,
                 seed: int = 0) -> None:
        _check_config(beta_start, beta_end, t_min, t_max, noise_std, ts_dist, clean_fraction,
                      ada_interval, ada_kimg, epl_size)
        self.beta_start, self.beta_end = beta_start, beta_end
        self.t_min, self.t_max = t_min, t_max
        self.noise_std = noise_std
        self.ts_dist = ts_dist
        self.clean_fraction = clean_fraction
        self.target = target
        self.ada_interval = ada_interval
        self.ada_kimg = ada_kimg
        self.epl_size = epl_size
        self.p = 0.0
        self._calls = 0
        # (sum of signs, count) since the last adjustment; float64 keeps counts exact.
        self._sign_stats = torch.zeros(2, dtype=torch.float64)
        # Device copies of the tables, rebuilt when T or t_epl change (every ada_interval steps).
        self._device_tables = DeviceTables()
        self._set_T(self._T_from_p())
        self._draw_t_epl(torch.Generator().manual_seed(seed))

    # ----------------------------------------------------------------------- schedule

    def _T_from_p(self) -> int:
        return int(np.clip(self.t_min + round(self.p * (self.t_max - self.t_min)), self.t_min, self.t_max))

    def _set_T(self, T: int) -> None:
        self.T = T
        betas = np.linspace(self.beta_start, self.beta_end, T, dtype=np.float64)
        self.alphas_cumprod = np.append(1.0, np.cumprod(1.0 - betas))  # index 0: clean
        # Square roots taken in float64: in bf16, 1 - acp near t = 0 would round to 0.
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self._device_tables.clear()

    def _draw_t_epl(self, generator: torch.Generator) -> None:
        num_clean = round(self.clean_fraction * self.epl_size)
        draws = torch.zeros(0, dtype=torch.int64)
        if num_clean < self.epl_size:
            steps = torch.arange(1, self.T + 1, dtype=torch.float64, device=generator.device)
            # 'priority': P(k) proportional to k - 1, the code's arange(T) / sum (t = 1 never drawn).
            weights = steps - 1.0 if self.ts_dist == "priority" else torch.ones_like(steps)
            indices = torch.multinomial(weights, self.epl_size - num_clean, replacement=True,
                                        generator=generator)
            draws = (indices + 1).cpu()
        self.t_epl = torch.cat([torch.zeros(num_clean, dtype=torch.int64), draws])
        self._device_tables.clear()

    def _table(self, name: str, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self._device_tables.get(getattr(self, name), like.device, dtype)

    # ----------------------------------------------------------------------- diffusion

    def diffuse(self, x: torch.Tensor, generator: Generators) -> tuple[torch.Tensor, torch.Tensor]:
        """(y, t): x diffused to steps t (B,) drawn with replacement from t_epl; differentiable in x.

        Draw order: the t_epl indices, then the noise.
        """
        if x.ndim < 1 or x.shape[0] == 0:
            raise ValueError(f"x must be a non-empty batch (B, ...), got shape {tuple(x.shape)}")
        index = randint(self.epl_size, x.shape[0], generator, x.device)
        t = self._table("t_epl", x, torch.int64)[index]
        eps = randn(x.shape, generator, x.device, x.dtype)
        shape = (-1, *([1] * (x.ndim - 1)))
        signal = self._table("sqrt_alphas_cumprod", x, x.dtype)[t].reshape(shape)
        noise = self._table("sqrt_one_minus_alphas_cumprod", x, x.dtype)[t].reshape(shape)
        return signal * x + noise * self.noise_std * eps, t

    # ----------------------------------------------------------------------- controller

    def accumulate(self, real_logits: torch.Tensor) -> None:
        """Add sign(D(real)) of this step to the statistic (no host sync)."""
        if real_logits.numel() == 0:
            raise ValueError("real_logits is empty; expected at least one logit")
        signs = torch.sign(real_logits.detach().to(torch.float64))
        self._sign_stats = self._sign_stats.to(signs.device)
        self._sign_stats[0] += signs.sum()
        self._sign_stats[1] += signs.numel()  # a Python scalar: no host-to-device copy, no sync

    def update(self, batch_size: int, generator: torch.Generator) -> AdaStats | None:
        """Count a call; on every ``ada_interval``-th, adjust p, T, the schedule and t_epl.

        ``batch_size`` is the global batch (all ranks) of one iteration. The (sum, count) of signs
        is all-reduced when torch.distributed is initialised, so every rank moves p identically.
        If no logits were accumulated anywhere, p is kept (r_d is nan); T's schedule and t_epl are
        still rebuilt, as the code's ``update_T`` runs regardless. Returns None between adjustments.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._calls += 1
        if self._calls % self.ada_interval:
            return None
        sign_sum, count = _all_reduced(self._sign_stats)
        r_d = sign_sum / count if count else float("nan")
        if count:
            step = batch_size * self.ada_interval / (self.ada_kimg * 1000)
            self.p = float(np.clip(self.p + np.sign(r_d - self.target) * step, 0.0, 1.0))
        self._sign_stats = torch.zeros(2, dtype=torch.float64, device=self._sign_stats.device)
        self._set_T(self._T_from_p())
        self._draw_t_epl(generator)
        return AdaStats(r_d=r_d, p=self.p, T=self.T)

    # ----------------------------------------------------------------------- checkpointing

    def state_dict(self) -> dict[str, Any]:
        return {
            "p": self.p,
            "T": self.T,
            "t_epl": self.t_epl.clone(),
            "sign_stats": self._sign_stats.cpu().clone(),  # a copy: accumulate() works in place
            "calls": self._calls,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"p", "T", "t_epl", "sign_stats", "calls"} - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}; expected AdaptiveDiffusion.state_dict()")
        t_epl = torch.as_tensor(state["t_epl"], dtype=torch.int64).cpu()
        if t_epl.shape != (self.epl_size,):
            raise ValueError(f"state t_epl has shape {tuple(t_epl.shape)}, expected ({self.epl_size},)")
        T = int(state["T"])
        if not self.t_min <= T <= self.t_max:
            raise ValueError(f"state T = {T} is outside [t_min, t_max] = [{self.t_min}, {self.t_max}]")
        self.p = float(state["p"])
        self._calls = int(state["calls"])
        self._sign_stats = torch.as_tensor(state["sign_stats"], dtype=torch.float64).clone()
        self._set_T(T)
        self.t_epl = t_epl.clone()


# --------------------------------------------------------------------------- the game
# One place for Diffusion-GAN's losses, used by the DiT objective (fake = the denoiser's x0
# prediction) and by the 25-Gaussians benchmark (fake = G(z)) alike.

def discriminator_loss(disc: nn.Module, controller: AdaptiveDiffusion, real: torch.Tensor,
                       fake: torch.Tensor, generator: Generators, r1_weight: float = 0.0,
                       **cond: torch.Tensor) -> dict[str, torch.Tensor]:
    """D's non-saturating loss on diffused real and fake samples, plus ``r1_weight`` * R1.

    Real and fake get independent diffusion draws (docs/methods.md: Diffusion-GAN). R1 is taken with respect
    to the clean real input, through the diffusion (3.3). ``r1_weight`` is gamma / 2 times the lazy
    interval on regularisation steps and 0 otherwise. The real logits feed the controller's
    statistic. ``cond`` goes to D unchanged (e.g. ``y=labels``).
    """
    real = real.detach().requires_grad_(r1_weight > 0)
    real_y, real_t = controller.diffuse(real, generator)
    real_logits = disc(real_y, real_t, **cond)
    fake_y, fake_t = controller.diffuse(fake.detach(), generator)
    fake_logits = disc(fake_y, fake_t, **cond)
    controller.accumulate(real_logits)
    return discriminator_terms(real_logits, fake_logits, real, r1_weight)


def generator_loss(disc: nn.Module, controller: AdaptiveDiffusion, fake: torch.Tensor,
                   generator: Generators, **cond: torch.Tensor) -> torch.Tensor:
    """softplus(-D(diffuse(fake))): the gradient reaches the generator through the diffusion."""
    fake_y, fake_t = controller.diffuse(fake, generator)
    return g_loss_nonsaturating(disc(fake_y, fake_t, **cond))


def _all_reduced(stats: torch.Tensor) -> tuple[float, float]:
    if initialized():
        stats = stats.clone()
        # NCCL reduces only CUDA tensors; a rank that accumulated nothing still holds a CPU tensor.
        if dist.get_backend() == "nccl" and stats.device.type != "cuda":
            stats = stats.cuda()
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
    sign_sum, count = stats.tolist()
    return sign_sum, count


def noise_std_of(cfg: Config) -> float:
    """``diffusion_gan.noise_std``, or where it is null the data space's: the paper's 0.05 for
    [-1, 1] pixels (on the digits it beat 0.5 at both adversarial weights tried, docs/methods.md)
    and 0.5 for SD-VAE latents, whose std is about 1 [INFERRED]."""
    if cfg.diffusion_gan.noise_std is not None:
        return cfg.diffusion_gan.noise_std
    return PIXEL_NOISE_STD if cfg.vae == "none" else LATENT_NOISE_STD


def _check_config(beta_start: float, beta_end: float, t_min: int, t_max: int, noise_std: float,
                  ts_dist: str, clean_fraction: float, ada_interval: int, ada_kimg: float,
                  epl_size: int) -> None:
    if ts_dist not in T_DISTRIBUTIONS:
        raise ValueError(f"ts_dist must be one of {T_DISTRIBUTIONS}, got {ts_dist!r}")
    if not 0 < beta_start <= beta_end < 1:
        raise ValueError(f"beta_start, beta_end must satisfy 0 < beta_start <= beta_end < 1, "
                         f"got {beta_start}, {beta_end}")
    min_t_min = 2 if ts_dist == "priority" else 1  # priority gives t = 1 weight 0: T = 1 has no draws
    if not min_t_min <= t_min <= t_max:
        raise ValueError(f"t_min, t_max must satisfy {min_t_min} <= t_min <= t_max for ts_dist={ts_dist!r}, "
                         f"got {t_min}, {t_max}")
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    if not 0.0 <= clean_fraction <= 1.0:
        raise ValueError(f"clean_fraction must lie in [0, 1], got {clean_fraction}")
    if ada_interval < 1 or epl_size < 1:
        raise ValueError(f"ada_interval and epl_size must be >= 1, got {ada_interval}, {epl_size}")
    if ada_kimg <= 0:
        raise ValueError(f"ada_kimg must be > 0, got {ada_kimg}")


# --------------------------------------------------------------------------- the objective

class DiffusionGANObjective(Objective):
    """DiT + a Diffusion-GAN discriminator as an adversarial regulariser (docs/methods.md).

    The generator's sample is the denoiser's x0 prediction at its random t. Per step, with one
    forward pass of the denoiser:
    1. D step on the adaptively diffused real x0 and (detached) x0 prediction, with lazy R1 every
       ``r1_interval`` steps (weight gamma / 2 * interval, StyleGAN2's convention);
    2. denoiser step, D frozen: L_denoise + weight * softplus(-D(diffuse(x0_pred))), the adversarial
       gradient reaching the DiT through the diffusion and the predicted eps;
    3. the controller's update (every ``ada_interval`` steps it moves p and T from r_d).
    """

    name = "diffusion_gan"
    adversary_names = ("disc",)
    config_sections = ("diffusion_gan", "disc")
    sampler = staticmethod(diffusion_sampler)

    def __init__(self, cfg: Config, denoiser: Denoiser) -> None:
        super().__init__(cfg, denoiser)
        dg = cfg.diffusion_gan
        disc = TimestepClassDiscriminator(denoiser.channels, denoiser.latent_size, cfg.model.num_classes,
                                          cfg.disc.base_channels, cfg.disc.num_blocks, t_max=dg.t_max)
        self.disc = Adversary(denoiser.accelerator, disc, cfg.disc)
        self.controller = AdaptiveDiffusion(t_min=dg.t_min, t_max=dg.t_max, noise_std=noise_std_of(cfg),
                                            ts_dist=dg.ts_dist, clean_fraction=dg.clean_fraction,
                                            target=dg.target, ada_interval=dg.ada_interval,
                                            ada_kimg=dg.ada_kimg, seed=cfg.run.seed)

    def checkpoint_objects(self) -> dict[str, Any]:
        return {"controller": self.controller}

    def train_step(self, latents: torch.Tensor, labels: torch.Tensor, ctx: StepContext) -> Metrics:
        dg = self.cfg.diffusion_gan
        denoised = denoise(self.denoiser, self.cfg, latents, labels, ctx.draws(len(latents), latents.device))
        adversary_rng = ctx.draws(len(latents), latents.device, ADVERSARY_STREAM)
        lazy_r1 = dg.r1_gamma > 0 and ctx.step % dg.r1_interval == 0
        autocast = self.denoiser.accelerator.autocast

        def disc_terms() -> dict[str, torch.Tensor]:
            with autocast():
                return discriminator_loss(self.disc.net, self.controller, latents, denoised.x0_pred,
                                          adversary_rng, dg.r1_gamma / 2 * dg.r1_interval * lazy_r1,
                                          y=denoised.labels)

        def denoiser_terms() -> dict[str, torch.Tensor]:
            with autocast():
                g_loss = generator_loss(self.disc.net, self.controller, denoised.x0_pred, adversary_rng,
                                        y=denoised.labels)
            denoise_loss = denoised.terms["loss"].mean()
            return {"loss": denoise_loss + dg.weight * g_loss, "denoise": denoise_loss, "g": g_loss}

        played = adversarial_round(self.disc, disc_terms, self.denoiser, denoiser_terms, ctx.step, self.name)
        return {**played.metrics({"loss": "loss", "loss_denoise": "denoise", "loss_g": "g"}, DISC_METRICS),
                **denoising_metrics(denoised), **self._controller_step(latents.shape[0], ctx)}

    def _controller_step(self, local_batch: int, ctx: StepContext) -> dict[str, torch.Tensor]:
        # The exploration list is redrawn identically on every rank, so the checkpoint (written by
        # rank 0) restores every rank exactly (the official code draws it per rank).
        world_batch = local_batch * self.denoiser.accelerator.num_processes
        stats = self.controller.update(world_batch, ctx.shared_rng())
        metrics = {"ada/p": torch.tensor(self.controller.p), "ada/T": torch.tensor(float(self.controller.T))}
        if stats is not None:  # r_d exists only on the steps that adjust p
            metrics["ada/r_d"] = torch.tensor(stats.r_d)
        return metrics
