"""Training objectives: each owns its losses and its update order for one training step.

The loop hands an objective a batch of latents and labels; the objective runs forward, backward and
the optimizer step(s) of the networks it trains, and returns its metrics as tensors (read back
only when the loop logs, so the step has no host-device sync).

Every random draw of a step (timesteps, noise, label dropout) comes from a generator seeded by
(seed, rank, step), as EDM2 does: a resumed run draws exactly what the uninterrupted run drew,
without having to restore generator states.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from ..models.diffusion import GaussianDiffusion

# Independent random streams of one step, so adding draws to one never shifts another.
OBJECTIVE_STREAM, VAE_STREAM = 0, 1


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


class DiffusionObjective:
    """Plain DiT training: the hybrid loss (MSE on eps + VLB on the learned variance)."""

    name = "dit"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, diffusion: GaussianDiffusion,
                 class_dropout: float, null_class: int) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.diffusion = diffusion
        self.class_dropout = class_dropout
        self.null_class = null_class

    def train_step(self, latents: torch.Tensor, labels: torch.Tensor,
                   ctx: StepContext) -> dict[str, torch.Tensor]:
        accelerator = ctx.accelerator
        generator = step_generator(ctx.seed, accelerator.process_index, ctx.step, latents.device)
        t = torch.randint(0, self.diffusion.num_timesteps, (latents.shape[0],),
                          generator=generator, device=latents.device)
        noise = torch.randn(latents.shape, generator=generator, device=latents.device)
        labels = drop_labels(labels, self.class_dropout, self.null_class, generator)

        with accelerator.autocast():
            terms = self.diffusion.training_losses(self.model, latents, t, noise, {"y": labels})
        loss = terms["loss"].mean()
        self.optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), ctx.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        metrics = {"loss": loss.detach(), "loss_mse": terms["mse"].mean().detach()}
        if "vb" in terms:
            metrics["loss_vb"] = terms["vb"].mean().detach()
        if grad_norm is not None:
            metrics["grad_norm"] = torch.as_tensor(grad_norm).detach()
        return metrics
