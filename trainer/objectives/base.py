"""What every training objective shares: the step's context and random streams, the denoiser and
adversary players, the adversarial round (adversary step, freeze, denoiser step), the base class.

An objective gets a batch of latents and labels from the loop, runs forward, backward and the
optimizer step(s) of the networks it trains, and returns its metrics as tensors (read back only
when the loop logs, so a step has no host-device sync).

Every random draw of a step (timesteps, noise, label dropout, flips) comes from a generator seeded
by (seed, step, stream), as EDM2 reseeds per step: a resumed run draws exactly what the
uninterrupted run drew, without having to restore generator states. Each process draws for the
whole global batch and keeps its rows (``BatchDraws``), so the draws of a sample do not depend on
the number of processes either: a run resumed on another number of GPUs continues as it would have.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from accelerate import Accelerator
from torch import nn

from ...models.diffusion import BatchDraws, GaussianDiffusion, Generators, build_diffusion, rand
from ..config import Config, DiscConfig
from ..runtime.engines import global_grad_norm, prepare_adversary
from ..runtime.seeding import seeded_rng

# Independent random streams of one step, so adding draws to one never shifts another.
OBJECTIVE_STREAM, VAE_STREAM, ADVERSARY_STREAM, SHARED_STREAM, FLIP_STREAM = 0, 1, 2, 3, 4

Terms = dict[str, torch.Tensor]  # named loss terms of one player; "loss" is what it descends
Metrics = dict[str, torch.Tensor]  # what a step returns for logging, still on the device


def drop_labels(labels: torch.Tensor, probability: float, null_class: int,
                rng: Generators) -> torch.Tensor:
    """Replace a random ``probability`` fraction of labels by the null class (for CFG)."""
    if probability <= 0:
        return labels
    drop = rand(labels.shape[0], rng, labels.device) < probability
    return torch.where(drop, torch.full_like(labels, null_class), labels)


def diffusion_of(cfg: Config, respacing: str | int | None = None) -> GaussianDiffusion:
    """The DiT diffusion process of ``cfg`` (respaced for sampling when ``respacing`` is given)."""
    d = cfg.diffusion
    return build_diffusion(d.steps, d.beta_start, d.beta_end, cfg.model.learn_sigma, respacing=respacing)


@dataclass
class StepContext:
    """What an objective needs from the loop for one step."""

    accelerator: Accelerator
    seed: int
    step: int

    def draws(self, rows: int, device: torch.device, stream: int = OBJECTIVE_STREAM) -> BatchDraws:
        """This process's ``rows`` of the step's draws on ``stream``; every process's batch has
        ``rows`` samples, so the global batch is ``rows`` times the number of processes."""
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        return BatchDraws(seeded_rng(self.seed, self.step, stream, device=device), rank * rows, world * rows)

    def shared_rng(self) -> torch.Generator:
        """A CPU generator that is the same on every rank, for state all ranks must agree on."""
        return seeded_rng(self.seed, 0, self.step, SHARED_STREAM)


def check_finite(loss: torch.Tensor, label: str, step: int) -> None:
    """Stop before an optimizer step would write a non-finite update into the weights.

    This reads the loss back (one host sync per call): the price of never stepping on NaN.
    """
    if not torch.isfinite(loss).item():
        raise FloatingPointError(
            f"{label} is {loss.item()} at step {step}; the step was not applied, and the last "
            "good checkpoint is kept"
        )


# --------------------------------------------------------------------------- players

class Player(Protocol):
    """One side of an adversarial game: it descends its loss and can be frozen for the other."""

    role: str  # "discriminator", "encoder", "denoiser", "generator": named in errors

    def step(self, loss: torch.Tensor, at_step: int, method: str) -> torch.Tensor | None: ...

    def frozen(self) -> AbstractContextManager[None]: ...


@contextmanager
def frozen_parameters(net: nn.Module) -> Iterator[None]:
    """No gradients into ``net`` while the other player's loss is backpropagated (under ZeRO this
    also keeps its gradients from being reduced twice)."""
    params = [p for p in net.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class Adversary:
    """A trained discriminator (or encoder) with its Adam optimizer, prepared by its own
    Accelerator (its own DeepSpeed engine under ZeRO), which also checkpoints it."""

    def __init__(self, accelerator: Accelerator, net: nn.Module, cfg: DiscConfig,
                 role: str = "discriminator") -> None:
        optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                     weight_decay=cfg.weight_decay)
        self.accelerator, self.net, self.optimizer = prepare_adversary(accelerator, net, optimizer)
        self.role = role

    def step(self, loss: torch.Tensor, at_step: int, method: str) -> None:
        check_finite(loss, f"{method} {self.role} loss", at_step)
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        self.optimizer.step()

    def frozen(self) -> AbstractContextManager[None]:
        return frozen_parameters(self.net)


@dataclass
class Denoiser:
    """The prepared DiT with its optimizer and LR schedule, and what objectives need to know about
    its inputs. As a player it is the "denoiser" (or DDGAN's "generator")."""

    accelerator: Accelerator
    model: nn.Module
    optimizer: torch.optim.Optimizer | None  # None where a denoiser is only sampled
    scheduler: Any
    diffusion: GaussianDiffusion
    channels: int  # of the latents (or pixels) it denoises
    latent_size: int
    grad_clip: float = 0.0  # 0 turns clipping off, as in DiT's own recipe
    role: str = "denoiser"

    def update(self, loss: torch.Tensor) -> torch.Tensor | None:
        """Backward, clip, optimizer and LR steps; returns the gradient norm before clipping."""
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        grad_norm = None
        if self.grad_clip > 0:
            # Under DeepSpeed this returns None: the engine clips (gradient_clipping) in step().
            grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return grad_norm if grad_norm is not None else global_grad_norm(self.model)

    def step(self, loss: torch.Tensor, at_step: int, method: str) -> torch.Tensor | None:
        check_finite(loss, f"{method} {self.role} loss", at_step)
        return self.update(loss)

    def frozen(self) -> AbstractContextManager[None]:
        return frozen_parameters(self.model)


def grad_norm_metric(grad_norm: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """``{"grad_norm": ...}``, or nothing where the engine did not compute one."""
    return {} if grad_norm is None else {"grad_norm": torch.as_tensor(grad_norm).detach()}


@dataclass
class Round:
    """What one round of the game computed: each player's loss terms, the denoiser's grad norm."""

    adversary: Terms
    denoiser: Terms
    grad_norm: torch.Tensor | None

    def metrics(self, denoiser_names: dict[str, str], adversary_names: dict[str, str]) -> Metrics:
        """The named terms (metric -> term, where present) of both players, and the grad norm."""
        def pick(terms: Terms, names: dict[str, str]) -> Metrics:
            return {metric: terms[term].detach() for metric, term in names.items() if term in terms}

        return {**pick(self.denoiser, denoiser_names), **pick(self.adversary, adversary_names),
                **grad_norm_metric(self.grad_norm)}


def adversarial_round(adversary: Player, adversary_terms: Callable[[], Terms], denoiser: Player,
                      denoiser_terms: Callable[[], Terms], at_step: int, method: str) -> Round:
    """One round of the game, the same for the three methods and the 25-Gaussians benchmark: the
    adversary descends its loss, then the denoiser descends its own with the adversary frozen.

    Each ``*_terms`` computes that player's loss terms when called (``"loss"`` is the one it
    descends).
    """
    adversary_side = adversary_terms()
    adversary.step(adversary_side["loss"], at_step, method)
    with adversary.frozen():
        denoiser_side = denoiser_terms()
        grad_norm = denoiser.step(denoiser_side["loss"], at_step, method)
    return Round(adversary_side, denoiser_side, grad_norm)


# --------------------------------------------------------------------------- objectives

LatentSampler = Callable[[nn.Module, torch.Tensor, Generators, bool], torch.Tensor]


class Objective(ABC):
    """A training objective: its losses and update order for one step.

    Subclasses set ``name`` (the ``objective`` config value), ``adversary_names`` (the attributes
    holding its ``Adversary`` players, each checkpointed in a sub-folder of that name),
    ``config_sections`` (the sections it reads beyond the common ones) and implement
    ``train_step``; ``sampler`` says how a denoiser trained this way samples.
    """

    name: ClassVar[str]
    adversary_names: ClassVar[tuple[str, ...]] = ()
    # The config sections only this kind of objective reads (their schema is in trainer/config.py,
    # which refuses their keys for other objectives).
    config_sections: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: Config, denoiser: Denoiser) -> None:
        self.cfg = cfg
        self.denoiser = denoiser

    @staticmethod
    def denoiser_kwargs(cfg: Config) -> dict[str, Any]:
        """Extra arguments of ``build_dit`` this objective needs."""
        return {}

    @staticmethod
    @abstractmethod
    def sampler(cfg: Config, channels: int, latent_size: int) -> LatentSampler:
        """``sample(model, labels, rng, clip_denoised) -> latents`` for a denoiser of this kind;
        needs no adversary, so ``advdit sample`` builds none."""

    def adversaries(self) -> dict[str, Adversary]:
        """The trained adversaries by name."""
        return {name: getattr(self, name) for name in self.adversary_names}

    def checkpoint_objects(self) -> dict[str, Any]:
        """State beyond networks and optimizers that a checkpoint must hold, by name (objects with
        ``state_dict`` / ``load_state_dict`` of numbers and lists, saved as JSON in meta.json)."""
        return {}

    @abstractmethod
    def train_step(self, latents: torch.Tensor, labels: torch.Tensor, ctx: StepContext) -> Metrics:
        """One step: forward, backward and optimizer steps; returns metrics as tensors."""
