"""Consolidate a checkpoint's denoiser weights into one safetensors file, whatever the strategy.

- ``ema`` (default): the EMA weights, ``ema.safetensors`` of the checkpoint (under ZeRO-3 the
  ranks' EMA slices are gathered before every checkpoint).
- ``raw``: the trained weights; under ZeRO the per-rank shards are merged with DeepSpeed's
  ``get_fp32_state_dict_from_zero_checkpoint`` (reading them through the weights-only loader),
  under DDP they are read from ``model.safetensors``.

Every file is checked against the SHA-256 that meta.json records before it is read. The output's
metadata holds the run's resolved config (``advdit_config``, JSON), so sampling can rebuild the
network without the original YAML.

``export_diffusers`` writes the same weights as a diffusers ``DiTTransformer2DModel`` folder, with
the DDPM scheduler of the run's noise schedule under ``scheduler/``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ...models.dit import resolve_size
from ...models.weight_layouts import WeightLayoutError, advdit_to_diffusers, diffusers_config, shape_of
from .store import (
    DEEPSPEED_TAG,
    DENOISER_FILE,
    EMA_FILE,
    META,
    CheckpointError,
    check_format,
    read_meta,
    read_safetensors,
    verify,
    weights_only_loads,
)


def verified_meta(checkpoint: Path, prefix: str = "") -> dict:
    """meta.json of a complete checkpoint of the current format whose files under ``prefix`` (a
    file name or folder; all by default) are those it lists, with their checksums."""
    if not (checkpoint / META).is_file():
        raise CheckpointError(f"{checkpoint} is not a complete checkpoint folder (no {META})")
    meta = read_meta(checkpoint)
    check_format(checkpoint, meta)
    verify(checkpoint, meta, prefix)
    return meta


def ema_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The EMA weights of a checkpoint."""
    verified_meta(checkpoint, EMA_FILE)
    return read_safetensors(checkpoint / EMA_FILE)[0]


def raw_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The trained weights of a checkpoint, consolidated from ZeRO shards when sharded; its
    manifest says which (checkpoints written before the manifest: whichever is there)."""
    contents = read_meta(checkpoint).get("contents", {}) if (checkpoint / META).is_file() else {}
    stored = contents.get("denoiser", {}).get("weights")
    sharded = stored == DEEPSPEED_TAG if stored else (checkpoint / DEEPSPEED_TAG).is_dir()
    verified_meta(checkpoint, DEEPSPEED_TAG if sharded else DENOISER_FILE)
    if sharded:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            with weights_only_loads():
                return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=DEEPSPEED_TAG)
        except Exception as err:  # noqa: BLE001 - DeepSpeed and the unpickler raise many types
            raise CheckpointError(f"the ZeRO shards of {checkpoint} cannot be read "
                                  f"({str(err).splitlines()[0]})") from err
    weights = checkpoint / DENOISER_FILE
    if not weights.is_file():
        raise CheckpointError(f"{checkpoint} holds neither {DEEPSPEED_TAG}/ (ZeRO) nor model.safetensors")
    return read_safetensors(weights)[0]


def export_weights(checkpoint: str | Path, out: str | Path, weights: str = "ema") -> Path:
    """Write ``weights`` ('ema' or 'raw') of ``checkpoint`` to the safetensors file ``out``."""
    checkpoint = Path(checkpoint)
    tensors = contiguous(checkpoint_weights(checkpoint, weights))
    meta = read_meta(checkpoint)
    metadata = {"advdit_config": json.dumps(meta["config"]), "step": str(meta["step"]), "weights": weights}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=metadata)
    return out


def checkpoint_weights(checkpoint: Path, weights: str) -> dict[str, torch.Tensor]:
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    return ema_state(checkpoint) if weights == "ema" else raw_state(checkpoint)


def contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fp32 contiguous copies: safetensors refuses shared or non-contiguous storage."""
    return {name: tensor.detach().float().contiguous().clone() for name, tensor in state.items()}


DIFFUSERS_WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


def ddpm_scheduler_config(config: dict) -> dict:
    """diffusers' DDPMScheduler for the run's linear schedule, predicting eps; DiTPipeline drops a
    learned variance and uses the scheduler's fixed one."""
    return {"_class_name": "DDPMScheduler", "num_train_timesteps": config["diffusion.steps"],
            "beta_start": config["diffusion.beta_start"], "beta_end": config["diffusion.beta_end"],
            "beta_schedule": "linear", "variance_type": "fixed_small", "clip_sample": False,
            "prediction_type": "epsilon"}


def export_diffusers(checkpoint: str | Path, out: str | Path, weights: str = "ema") -> Path:
    """Write ``weights`` of ``checkpoint`` as a folder ``DiTTransformer2DModel.from_pretrained``
    loads (config.json + safetensors), with ``scheduler/scheduler_config.json``."""
    checkpoint, out = Path(checkpoint), Path(out)
    meta = read_meta(checkpoint)
    config = meta["config"]
    state = contiguous(checkpoint_weights(checkpoint, weights))
    try:
        converted = advdit_to_diffusers(state)
    except WeightLayoutError as err:
        raise CheckpointError(f"{checkpoint} cannot be exported to diffusers: {err}") from err
    size, _ = resolve_size(config["model.arch"], config.get("model.depth"), config.get("model.hidden_size"),
                           config.get("model.num_heads"))
    freq_shift = config.get("model.timestep_freq_shift", 0)
    model_config = diffusers_config(shape_of(state), size.num_heads, freq_shift)
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    save_file(converted, str(out / DIFFUSERS_WEIGHTS_FILE),
              metadata={"format": "pt", "step": str(meta["step"]), "weights": weights})
    (out / "config.json").write_text(json.dumps(model_config, indent=2) + "\n")
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(ddpm_scheduler_config(config),
                                                                        indent=2) + "\n")
    return out
