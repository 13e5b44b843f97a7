"""Exponential moving average of the denoiser's weights."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def zero3_partitioned(params: list[nn.Parameter]) -> bool:
    """Whether DeepSpeed ZeRO-3 holds ``params`` as per-rank slices (``ds_tensor``)."""
    return bool(params) and all(getattr(p, "ds_tensor", None) is not None for p in params)


def local_slice(full: torch.Tensor, live: nn.Parameter) -> torch.Tensor:
    """This rank's slice of ``full`` laid out as ZeRO-3 lays out ``live``: the flattened tensor,
    zero-padded to a multiple of the world size, rank r holding the r-th equal part."""
    group = live.ds_process_group
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    size = live.ds_tensor.numel()
    flat = F.pad(full.detach().reshape(-1), (0, size * world - full.numel()))
    return flat[rank * size:(rank + 1) * size].to(live.ds_tensor.device).clone()


class EMA:
    """Holds a frozen copy of a model whose weights trail the live model's by ``decay``.

    Like DiT, the copy starts equal to the model. With ``warmup`` the decay used at update ``n`` is
    ``min(decay, (1 + n) / (10 + n))``, so a short run's average is not dominated by its random
    initial weights. It is checkpointed through ``state_dict`` / ``load_state_dict``
    (accelerate's ``register_for_checkpointing`` protocol).

    Under ZeRO-3 each rank averages only its own slice of every parameter (the partition the
    optimizer has just updated), so a step gathers nothing and the EMA takes 1/world of its size
    per rank: the full copy is freed after an update and rebuilt by :meth:`gather` when it is read
    (checkpoints, sample grids, FID). Gathering the whole model every step instead would cost one
    all-gather of every parameter per step, as much communication again as a forward pass under
    ZeRO-3, and a full copy on every rank.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False) -> None:
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._slices: list[torch.Tensor] | None = None  # ZeRO-3: this rank's part of each parameter
        self._group: Any = None  # and the process group the parts are spread over
        self._shapes: list[torch.Size] = []  # of the full parameters, while the copy is freed
        self._gathered = True  # whether self.model holds every update

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        live = list(model.parameters())
        weight = 1.0 - self.current_decay()
        if zero3_partitioned(live):
            self._update_slices(live, weight)
        else:
            # lerp towards the live weights: ema += (1 - decay) * (live - ema)
            torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in live], weight)
        self.updates += 1

    def _update_slices(self, live: list[nn.Parameter], weight: float) -> None:
        if self._slices is None:  # first update, or after a checkpoint was loaded into the copy
            self._group = live[0].ds_process_group
            self._shapes = [ema.shape for ema in self.model.parameters()]
            self._slices = [local_slice(ema, p) for ema, p in zip(self.model.parameters(), live, strict=True)]
        partitions = [p.ds_tensor.to(s.dtype) for s, p in zip(self._slices, live, strict=True)]
        torch._foreach_lerp_(self._slices, partitions, weight)
        if self._gathered:  # the full copy is stale now: free it until the next gather
            for ema in self.model.parameters():
                ema.data = ema.data.new_empty(0)
            self._gathered = False

    @torch.no_grad()
    def gather(self) -> None:
        """Rebuild the full copy from every rank's slices. Under ZeRO-3 a collective: every rank
        calls it at the same point; elsewhere (and when nothing changed) it does nothing."""
        if self._gathered or self._slices is None:
            return
        world = dist.get_world_size(self._group)
        for ema, piece, shape in zip(self.model.parameters(), self._slices, self._shapes, strict=True):
            padded = piece.new_empty(piece.numel() * world)
            dist.all_gather(list(padded.chunk(world)), piece, group=self._group)
            ema.data = padded[:shape.numel()].view(shape)
        self._gathered = True

    def state_dict(self) -> dict[str, Any]:
        if not self._gathered:
            raise RuntimeError("EMA.state_dict: the ZeRO-3 slices were not gathered; call gather() "
                               "on every rank first")
        return {"decay": self.decay, "warmup": self.warmup, "updates": self.updates,
                "model": self.model.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay, self.warmup, self.updates = state["decay"], state["warmup"], state["updates"]
        if not self._gathered:  # the copy was freed under ZeRO-3: give it back its shapes
            for ema, shape in zip(self.model.parameters(), self._shapes, strict=True):
                ema.data = ema.data.new_empty(shape)
        self.model.load_state_dict(state["model"])
        self._slices, self._gathered = None, True  # sliced again from the loaded copy
