"""Training objectives as plug-ins: each method's module declares its class (name, adversaries,
sampler, extra DiT inputs) and this file registers them; nothing else lists the methods.

Adding a method: a module here with an ``Objective`` subclass, one line in ``_REGISTERED``, and
its config section in trainer/config.py (the config test checks both name lists agree).
"""

from __future__ import annotations

from torch import nn

from ...models.dit import build_dit
from ..config import Config
from .base import Objective
from .ddgan import DDGANObjective
from .diffusion_gan import DiffusionGANObjective
from .dit import DiTObjective
from .sadm import SADMObjective

_REGISTERED: tuple[type[Objective], ...] = (
    DiTObjective, SADMObjective, DiffusionGANObjective, DDGANObjective)
OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in _REGISTERED}


def objective_class(name: str) -> type[Objective]:
    """The class of the configured objective ``name``."""
    if name not in OBJECTIVES:
        raise ValueError(f"objective must be one of {sorted(OBJECTIVES)}, got {name!r}")
    return OBJECTIVES[name]


def build_denoiser(cfg: Config, channels: int, latent_size: int) -> nn.Module:
    """The DiT of ``cfg`` for inputs of ``channels`` x ``latent_size``^2, with the extra inputs its
    objective needs (for training, and for sampling a checkpoint)."""
    m = cfg.model
    return build_dit(m.arch, input_size=latent_size, in_channels=channels, depth=m.depth,
                     hidden_size=m.hidden_size, num_heads=m.num_heads, num_classes=m.num_classes,
                     learn_sigma=m.learn_sigma, attention=m.attention,
                     grad_checkpointing=m.grad_checkpointing, timestep_freq_shift=m.timestep_freq_shift,
                     **objective_class(cfg.objective).denoiser_kwargs(cfg))
