"""Exponential moving average of the denoiser's weights."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class EMA:
    """Holds a frozen copy of a model whose weights trail the live model's by ``decay``.

    Like DiT, the copy starts equal to the model. With ``warmup`` the decay used at update ``n`` is
    ``min(decay, (1 + n) / (10 + n))``, so a short run's average is not dominated by its random
    initial weights. It is checkpointed through ``state_dict`` / ``load_state_dict``
    (accelerate's ``register_for_checkpointing`` protocol).
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False) -> None:
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_params = list(self.model.parameters())
        live_params = [p.detach() for p in model.parameters()]
        # lerp towards the live weights: ema += (1 - decay) * (live - ema)
        torch._foreach_lerp_(ema_params, live_params, 1.0 - self.current_decay())
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "warmup": self.warmup, "updates": self.updates,
                "model": self.model.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay, self.warmup, self.updates = state["decay"], state["warmup"], state["updates"]
        self.model.load_state_dict(state["model"])
