"""Training objectives: each owns its losses and its update order for one training step.

The loop hands an objective a batch of latents and labels; the objective runs forward, backward and
the optimizer step(s) of the networks it trains, and returns its metrics as tensors (read back
only when the loop logs, so the step has no host-device sync). ``dit`` lives here; each
adversarial method lives in its own module (``sadm.py``, ``diffusion_gan.py``, ``ddgan.py``) with
everything else of that method, and builds on :class:`DiffusionObjective`.

Every random draw of a step (timesteps, noise, label dropout) comes from a generator seeded by
(seed, rank, step), as EDM2 does: a resumed run draws exactly what the uninterrupted run drew,
without having to restore generator states.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from ..models.diffusion import GaussianDiffusion, Generators, build_diffusion, cfg_model_fn
from ..models.dit import build_dit
from .config import Config, DiscConfig
from .engines import global_grad_norm, prepare_adversary

# Independent random streams of one step, so adding draws to one never shifts another.
OBJECTIVE_STREAM, VAE_STREAM, ADVERSARY_STREAM, SHARED_STREAM = 0, 1, 2, 3


def step_generator(seed: int, rank: int, step: int, device: torch.device,
                   stream: int = OBJECTIVE_STREAM) -> torch.Generator:
    """A generator whose state depends only on (seed, rank, step, stream)."""
    state = np.random.SeedSequence([seed, rank, step, stream]).generate_state(2)
    seed64 = int(state[0]) << 32 | int(state[1])
    return torch.Generator(device=device).manual_seed(seed64 & ((1 << 63) - 1))


def drop_labels(labels: torch.Tensor, probability: float, null_class: int,
                generator: torch.Generator) -> torch.Tensor:
    """Replace a random ``probability`` fraction of labels by the null class (for CFG)."""
    if probability <= 0:
        return labels
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < probability
    return torch.where(drop, torch.full_like(labels, null_class), labels)


@dataclass
class StepContext:
    """What an objective needs from the loop for one step."""

    accelerator: Accelerator
    seed: int
    step: int
    grad_clip: float

    def generator(self, device: torch.device, stream: int = OBJECTIVE_STREAM) -> torch.Generator:
        return step_generator(self.seed, self.accelerator.process_index, self.step, device, stream)

    def shared_generator(self) -> torch.Generator:
        """A CPU generator that is the same on every rank, for state all ranks must agree on."""
        return step_generator(self.seed, 0, self.step, torch.device("cpu"), SHARED_STREAM)


def check_finite(loss: torch.Tensor, term: str, step: int) -> None:
    """Stop before an optimizer step would write a non-finite update into the weights.

    This reads the loss back (one host sync per call): the price of never stepping on NaN.
    """
    if not torch.isfinite(loss).item():
        raise FloatingPointError(
            f"{term} is {loss.item()} at step {step}; the step was not applied, and the last "
            "good checkpoint is kept"
        )


class Adversary:
    """A trained discriminator (or encoder) with its Adam optimizer, prepared by its own
    Accelerator (its own DeepSpeed engine under ZeRO), which also checkpoints it."""

    def __init__(self, accelerator: Accelerator, net: nn.Module, cfg: DiscConfig) -> None:
        optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                     weight_decay=cfg.weight_decay)
        self.accelerator, self.net, self.optimizer = prepare_adversary(accelerator, net, optimizer)

    def step(self, loss: torch.Tensor, term: str, ctx: StepContext) -> None:
        check_finite(loss, term, ctx.step)
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        self.optimizer.step()

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """No gradients into the adversary while the denoiser's loss is backpropagated (this also
        keeps ZeRO from reducing its gradients twice)."""
        params = list(self.net.parameters())
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)


@dataclass
class Denoised:
    """One forward pass of the denoiser on a noised batch."""

    terms: dict[str, torch.Tensor]  # per-sample loss, mse, vb
    x0_pred: torch.Tensor  # the x0 implied by the predicted eps (carries the eps gradient only)
    t: torch.Tensor
    labels: torch.Tensor  # after label dropout


@dataclass
class Denoiser:
    """The prepared denoiser and what every objective needs to know about its inputs."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    diffusion: GaussianDiffusion
    channels: int  # of the latents (or pixels) it denoises
    latent_size: int


class DiffusionObjective:
    """Plain DiT training: the hybrid loss (MSE on eps + VLB on the learned variance)."""

    name = "dit"

    def __init__(self, cfg: Config, accelerator: Accelerator, denoiser: Denoiser) -> None:
        self.cfg = cfg
        self.accelerator = accelerator
        self.model = denoiser.model
        self.optimizer = denoiser.optimizer
        self.scheduler = denoiser.scheduler
        self.diffusion = denoiser.diffusion
        self.channels = denoiser.channels
        self.latent_size = denoiser.latent_size

    @staticmethod
    def denoiser_kwargs(cfg: Config) -> dict[str, Any]:
        """Extra arguments of ``build_dit`` this objective needs."""
        return {}

    def checkpoint_objects(self) -> list[Any]:
        """State beyond networks and optimizers that a checkpoint must hold."""
        return []

    def adversaries(self) -> dict[str, Adversary]:
        """The trained adversaries by name (each is saved in a checkpoint sub-folder of that name)."""
        return {name: value for name, value in vars(self).items() if isinstance(value, Adversary)}

    def denoise(self, latents: torch.Tensor, labels: torch.Tensor,
                generator: torch.Generator) -> Denoised:
        t = torch.randint(0, self.diffusion.num_timesteps, (latents.shape[0],),
                          generator=generator, device=latents.device)
        noise = torch.randn(latents.shape, generator=generator, device=latents.device)
        labels = drop_labels(labels, self.cfg.model.class_dropout, self.cfg.model.num_classes, generator)
        outputs: list[torch.Tensor] = []

        def model_fn(x: torch.Tensor, timesteps: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            outputs.append(self.model(x, timesteps, **kwargs))
            return outputs[-1]

        with self.accelerator.autocast():
            terms = self.diffusion.training_losses(model_fn, latents, t, noise, {"y": labels})
        x_t = self.diffusion.q_sample(latents, t, noise)
        eps = outputs[-1][:, : self.channels].float()
        return Denoised(terms, self.diffusion.predict_xstart_from_eps(x_t, t, eps), t, labels)

    def step_denoiser(self, loss: torch.Tensor, ctx: StepContext) -> torch.Tensor | None:
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        grad_norm = None
        if ctx.grad_clip > 0:  # 0 turns clipping off, as in DiT's own recipe
            # Under DeepSpeed this returns None: the engine clips (gradient_clipping) in step().
            grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), ctx.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return grad_norm if grad_norm is not None else global_grad_norm(self.model)

    def base_metrics(self, denoised: Denoised, loss: torch.Tensor,
                     grad_norm: torch.Tensor | None) -> dict[str, torch.Tensor]:
        metrics = {"loss": loss.detach(), "loss_mse": denoised.terms["mse"].mean().detach()}
        if "vb" in denoised.terms:
            metrics["loss_vb"] = denoised.terms["vb"].mean().detach()
        if grad_norm is not None:
            metrics["grad_norm"] = torch.as_tensor(grad_norm).detach()
        return metrics

    def train_step(self, latents: torch.Tensor, labels: torch.Tensor,
                   ctx: StepContext) -> dict[str, torch.Tensor]:
        denoised = self.denoise(latents, labels, ctx.generator(latents.device))
        loss = denoised.terms["loss"].mean()
        grad_norm = self.step_denoiser(loss, ctx)
        return self.base_metrics(denoised, loss, grad_norm)

    @torch.no_grad()
    def sample(self, model: nn.Module, labels: torch.Tensor, generator: Generators,
               clip_denoised: bool) -> torch.Tensor:
        """Latents for ``labels`` with the configured sampler, steps and CFG scale; ``generator``
        may be one generator per sample."""
        cfg = self.cfg
        respacing = f"ddim{cfg.sample.steps}" if cfg.sample.sampler == "ddim" else cfg.sample.steps
        diffusion = build_diffusion(cfg.diffusion.steps, cfg.diffusion.beta_start,
                                    cfg.diffusion.beta_end, cfg.model.learn_sigma, respacing=respacing)
        guided = cfg_model_fn(model, cfg.sample.cfg_scale, cfg.model.num_classes, self.channels)
        loop = diffusion.ddim_sample_loop if cfg.sample.sampler == "ddim" else diffusion.p_sample_loop
        shape = (len(labels), self.channels, self.latent_size, self.latent_size)
        return loop(guided, shape, {"y": labels}, generator=generator, device=labels.device,
                    clip_denoised=clip_denoised)


def build_denoiser(cfg: Config, channels: int, latent_size: int) -> nn.Module:
    """The DiT of ``cfg`` for inputs of ``channels`` x ``latent_size``^2, with the extra inputs its
    objective needs (for training, and for sampling a checkpoint)."""
    return build_dit(cfg.model.arch, input_size=latent_size, in_channels=channels, depth=cfg.model.depth,
                     hidden_size=cfg.model.hidden_size, num_heads=cfg.model.num_heads,
                     num_classes=cfg.model.num_classes, learn_sigma=cfg.model.learn_sigma,
                     attention=cfg.model.attention, grad_checkpointing=cfg.model.grad_checkpointing,
                     **objective_class(cfg.objective).denoiser_kwargs(cfg))


def objective_class(name: str) -> type[DiffusionObjective]:
    """The class of a configured objective; each adversarial one lives with its method's code."""
    from .ddgan import DDGANObjective
    from .diffusion_gan import DiffusionGANObjective
    from .sadm import SADMObjective

    classes = {cls.name: cls for cls in (DiffusionObjective, SADMObjective, DiffusionGANObjective,
                                         DDGANObjective)}
    return classes[name]
