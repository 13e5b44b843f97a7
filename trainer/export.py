"""Consolidate a checkpoint's denoiser weights into one safetensors file, whatever the strategy.

- ``ema`` (default): the EMA weights, saved in full as a custom object of the checkpoint (under
  ZeRO-3 the ranks' EMA slices are gathered before every checkpoint).
- ``raw``: the trained weights; under ZeRO the per-rank shards are merged with DeepSpeed's
  ``get_fp32_state_dict_from_zero_checkpoint``, under DDP they are read from ``model.safetensors``.

The file's metadata holds the run's resolved config (``advdit_config``, JSON), so sampling can
rebuild the network without the original YAML.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .checkpoint import META, CheckpointError, read_meta

DEEPSPEED_TAG = "pytorch_model"  # the sub-folder accelerate gives the first DeepSpeed engine


def ema_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The EMA's state dict, found among the checkpoint's custom objects by its keys."""
    for path in sorted(checkpoint.glob("custom_checkpoint_*.pkl")):
        state = torch.load(path, map_location="cpu", weights_only=False)
        if isinstance(state, dict) and {"decay", "model"} <= set(state):
            return state["model"]
    raise CheckpointError(f"{checkpoint} holds no EMA state (custom_checkpoint_*.pkl with an EMA)")


def raw_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    if (checkpoint / DEEPSPEED_TAG).is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=DEEPSPEED_TAG)
    weights = checkpoint / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{checkpoint} holds neither {DEEPSPEED_TAG}/ (ZeRO) nor model.safetensors")
    return load_file(weights)


def export_weights(checkpoint: str | Path, out: str | Path, weights: str = "ema") -> Path:
    """Write ``weights`` ('ema' or 'raw') of ``checkpoint`` to the safetensors file ``out``."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / META).is_file():
        raise CheckpointError(f"{checkpoint} is not a complete checkpoint folder (no {META})")
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    state = ema_state(checkpoint) if weights == "ema" else raw_state(checkpoint)
    # safetensors refuses shared or non-contiguous storage: store plain contiguous copies.
    tensors = {name: tensor.detach().float().contiguous().clone() for name, tensor in state.items()}
    meta = read_meta(checkpoint)
    metadata = {"advdit_config": json.dumps(meta["config"]), "step": str(meta["step"]), "weights": weights}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=metadata)
    return out

