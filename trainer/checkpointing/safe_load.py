"""What every reader of checkpoint files shares: the error they raise, the name of DeepSpeed's
shard folder, and the guard that holds ``torch.load`` to the weights-only unpickler."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

DEEPSPEED_TAG = "pytorch_model"  # the sub-folder accelerate gives the first DeepSpeed engine
# Plain record classes inside DeepSpeed's ZeRO optimizer states: an enum, a dataclass of two ints
# and the loss scalers (static, and dynamic for fp16), whose state is numbers and a dtype. The
# weights-only unpickler may build these and nothing else of DeepSpeed's.
DEEPSPEED_RECORDS = (
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used for the requested resume, or cannot be written."""


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Hold every ``torch.load`` in the block to the weights-only unpickler, whatever its caller
    asks for: accelerate reads custom objects and DeepSpeed reads its shards with
    ``weights_only=False``, which would run any code a crafted file carries."""
    original = torch.load

    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    allowed = []
    # Only a run that uses DeepSpeed has its files; importing it otherwise would cost seconds.
    for module, name in DEEPSPEED_RECORDS if "deepspeed" in sys.modules else ():
        try:
            allowed.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # another DeepSpeed version
            continue
    torch.load = load
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    finally:
        torch.load = original
