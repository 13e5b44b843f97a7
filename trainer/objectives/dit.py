"""Plain DiT training (the hybrid loss: MSE on eps + VLB on the learned variance) and DiT's
sampling (DDPM or DDIM with classifier-free guidance), which SADM and Diffusion-GAN share.

``denoise`` is DiT's forward pass with its draws; the adversarial objectives that regularise a
DiT (SADM, Diffusion-GAN) start their step from it and use its x0 prediction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...models.diffusion import Generators, cfg_model_fn, randint, randn
from ..config import Config, ConfigError
from .base import (
    Denoiser,
    LatentSampler,
    Metrics,
    Objective,
    StepContext,
    diffusion_of,
    drop_labels,
    grad_norm_metric,
)


@dataclass
class DenoisingPass:
    """One forward pass of the denoiser on a noised batch."""

    terms: dict[str, torch.Tensor]  # per-sample loss, mse, vb; the batch's x_t and predicted eps
    x0_pred: torch.Tensor  # the x0 implied by the predicted eps (carries the eps gradient only)
    t: torch.Tensor
    labels: torch.Tensor  # after label dropout


def denoise(denoiser: Denoiser, cfg: Config, latents: torch.Tensor, labels: torch.Tensor,
            rng: Generators) -> DenoisingPass:
    """DiT's training forward: uniform t, Gaussian noise, label dropout (drawn in that order)."""
    diffusion = denoiser.diffusion
    t = randint(diffusion.num_timesteps, latents.shape[0], rng, latents.device)
    noise = randn(latents.shape, rng, latents.device)
    labels = drop_labels(labels, cfg.model.class_dropout, cfg.model.num_classes, rng)
    with denoiser.accelerator.autocast():
        terms = diffusion.training_losses(denoiser.model, latents, t, noise, {"y": labels})
    x0_pred = diffusion.predict_xstart_from_eps(terms["x_t"], t, terms["eps"])
    return DenoisingPass(terms, x0_pred, t, labels)


def denoising_metrics(denoised: DenoisingPass) -> dict[str, torch.Tensor]:
    """The batch means of DiT's loss terms, as every objective built on ``denoise`` logs them."""
    return {name: denoised.terms[term].mean().detach() for name, term in
            (("loss_mse", "mse"), ("loss_vb", "vb"))}


def diffusion_sampler(cfg: Config, channels: int, latent_size: int) -> LatentSampler:
    """DDPM or DDIM sampling with ``sample.steps`` steps and CFG at ``sample.cfg_scale`` on
    ``sample.cfg_channels`` of the eps channels (3, as the official DiT, or all; never more than
    the denoiser has: pixels have 3)."""
    ddim = cfg.sample.sampler == "ddim"
    diffusion = diffusion_of(cfg, respacing=f"ddim{cfg.sample.steps}" if ddim else cfg.sample.steps)
    loop = diffusion.ddim_sample_loop if ddim else diffusion.p_sample_loop
    asked = cfg.sample.cfg_channels
    if asked != "all" and asked > channels:
        raise ConfigError(f"config key 'sample.cfg_channels' is {asked}, but the denoiser's eps has "
                          f"{channels} channels; use at most {channels}, or all")
    guided_channels = channels if asked == "all" else asked

    @torch.no_grad()
    def sample(model: nn.Module, labels: torch.Tensor, rng: Generators, clip_denoised: bool) -> torch.Tensor:
        guided = cfg_model_fn(model, cfg.sample.cfg_scale, cfg.model.num_classes, channels, guided_channels)
        shape = (len(labels), channels, latent_size, latent_size)
        return loop(guided, shape, {"y": labels}, generator=rng, device=labels.device,
                    clip_denoised=clip_denoised)

    return sample


class DiTObjective(Objective):
    """Plain DiT: one forward, the hybrid loss, one optimizer step."""

    name = "dit"
    sampler = staticmethod(diffusion_sampler)

    def train_step(self, latents: torch.Tensor, labels: torch.Tensor, ctx: StepContext) -> Metrics:
        denoised = denoise(self.denoiser, self.cfg, latents, labels, ctx.draws(len(latents), latents.device))
        loss = denoised.terms["loss"].mean()
        grad_norm = self.denoiser.update(loss)
        return {"loss": loss.detach(), **denoising_metrics(denoised), **grad_norm_metric(grad_norm)}

