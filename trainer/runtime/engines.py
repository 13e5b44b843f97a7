"""Accelerate / DeepSpeed set-up for the denoiser and its adversaries.

``distributed.strategy``:
- ``ddp``: plain data parallel (also what a single process runs);
- ``zero2``: DeepSpeed ZeRO stage 2 (optimizer states and gradients sharded) for every network;
- ``zero3``: ZeRO stage 3 (parameters sharded too) for the denoiser; the adversaries run at
  stage 2, because R1's double backward through a stage-3 partitioned conv fails in DeepSpeed
  (seen with 0.19.8 on 2 CPU ranks: "expected stride to be a single integer value") and the
  adversaries are small.

Each network is its own engine with its own optimizer, through accelerate's multi-plugin API: the
denoiser is prepared by the main Accelerator under plugin "denoiser", each adversary by a second
Accelerator under plugin "adversary" (docs/architecture.md, "DeepSpeed notes"). The adversary's
Accelerator also saves and loads the adversary's part of a checkpoint (a sub-folder), for ddp and
ZeRO alike.
On CPU, processes talk over gloo.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.utils import DeepSpeedPlugin, DistributedType
from torch import nn

from ..config import Config

ZERO_STAGES = {"zero2": 2, "zero3": 3}
DENOISER, ADVERSARY = "denoiser", "adversary"


def mixed_precision(cfg: Config) -> str:
    precision = cfg.train.mixed_precision
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return precision


def deepspeed_plugin(cfg: Config, stage: int, grad_clip: float) -> DeepSpeedPlugin:
    precision = mixed_precision(cfg)
    zero: dict[str, Any] = {
        "stage": stage,
        # R1's double backward breaks ZeRO-1/2's contiguous gradient buffer ("list index out of
        # range" in reduce_ipg_grads; docs/architecture.md, "DeepSpeed notes"); off costs some
        # memory locality only.
        "contiguous_gradients": False,
    }
    if cfg.distributed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    config = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        # The optimizers are torch's (AdamW / Adam), also when offloading.
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
    }
    return DeepSpeedPlugin(hf_ds_config=config)


def make_accelerator(cfg: Config) -> Accelerator:
    """The main Accelerator; under ZeRO it carries a plugin for the denoiser and one for adversaries."""
    on_cpu = not torch.cuda.is_available()
    precision = mixed_precision(cfg)
    stage = ZERO_STAGES.get(cfg.distributed.strategy)
    if stage is None:
        # cpu=True is what makes accelerate treat several CPU processes as MULTI_CPU (DDP over
        # gloo); without it they would train as independent single processes.
        return Accelerator(mixed_precision=precision, cpu=on_cpu)
    if "WORLD_SIZE" not in os.environ:
        _single_process_rendezvous()
    # DeepSpeed, though, is switched off by cpu=True: name the gloo backend instead.
    handlers = [InitProcessGroupKwargs(backend="gloo")] if on_cpu else []
    # accelerate reads this when it sets up its state; without it CPU ranks run as single processes.
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    plugins = {DENOISER: deepspeed_plugin(cfg, stage, cfg.optim.grad_clip),
               ADVERSARY: deepspeed_plugin(cfg, min(stage, 2), 0.0)}
    return Accelerator(mixed_precision=precision, deepspeed_plugins=plugins, kwargs_handlers=handlers)


def _single_process_rendezvous() -> None:
    """Environment of a one-process group, so DeepSpeed need not look for MPI (mpi4py)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        os.environ.setdefault(key, value)


def uses_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


@contextmanager
def selected(accelerator: Accelerator, plugin: str) -> Iterator[None]:
    """Make ``plugin`` the active DeepSpeed plugin for the block (a no-op without DeepSpeed)."""
    if not uses_deepspeed(accelerator):
        yield
        return
    accelerator.state.select_deepspeed_plugin(plugin)
    try:
        yield
    finally:
        accelerator.state.select_deepspeed_plugin(DENOISER)


def prepare_adversary(accelerator: Accelerator, net: nn.Module,
                      optimizer: torch.optim.Optimizer) -> tuple[Accelerator, nn.Module, Any]:
    """Prepare an adversary with its own Accelerator (and DeepSpeed engine under ZeRO)."""
    with selected(accelerator, ADVERSARY):
        adversary_accelerator = Accelerator()
        net, optimizer = adversary_accelerator.prepare(net, optimizer)
    return adversary_accelerator, net, optimizer


def global_grad_norm(model: nn.Module) -> torch.Tensor | None:
    """The gradient norm DeepSpeed computed while clipping, if the model is an engine."""
    norm = getattr(model, "get_global_grad_norm", lambda: None)()
    return None if norm is None else torch.as_tensor(float(norm))
