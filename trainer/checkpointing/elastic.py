"""Resuming a ZeRO checkpoint with another number of processes.

DeepSpeed writes ZeRO-2/3 state as one flat partition per rank, which only a run of the same world
size can read. For another one, each DeepSpeed part of the checkpoint (the denoiser and every
adversary) is first converted by DeepSpeed's own ``ds_to_universal`` into its *universal* form:
per parameter, the full fp32 master weights and Adam's two moments and step. Every rank then loads
that through DeepSpeed's universal loader, which cuts out its partition for the new world size.
The conversion is written next to the checkpoint (``checkpoints/.reshard/step_N``, on the shared
filesystem every rank reads) by the main process, and removed once every rank has loaded it; the
checkpoint itself is never changed (its checksums stay valid).

DDP checkpoints hold the full optimizer state already and load with any world size as they are.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import DistributedType

from .safe_load import DEEPSPEED_TAG, CheckpointError, weights_only_loads

RESHARD_DIR = ".reshard"


def needs_resharding(accelerator: Accelerator, meta: dict[str, Any]) -> bool:
    """Whether the checkpoint of ``meta`` holds ZeRO partitions for another world size."""
    saved = meta.get("world_size", accelerator.num_processes)
    return accelerator.distributed_type == DistributedType.DEEPSPEED and saved != accelerator.num_processes


def deepspeed_parts(path: Path, parts: list[str]) -> list[Path]:
    """The folders of ``path`` that hold a DeepSpeed engine's state: the denoiser's, then each
    adversary's sub-folder."""
    folders = [path, *(path / name for name in parts)]
    return [folder for folder in folders if (folder / DEEPSPEED_TAG).is_dir()]


def _convert(shards: Path, out: Path) -> None:
    """DeepSpeed's ``ds_to_universal`` on one engine's folder of shards, in this process (its
    torch.load calls held to the weights-only unpickler)."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    args = argparse.Namespace(input_folder=str(shards), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    with weights_only_loads(), contextlib.redirect_stdout(None):
        ds_to_universal(args)


def universal_view(path: Path, parts: list[str], out: Path) -> Path:
    """A folder laid out as the checkpoint ``path``, whose DeepSpeed shard folders are universal
    checkpoints and whose other files link to the originals (run on the main process only)."""
    shutil.rmtree(out, ignore_errors=True)
    for source in sorted(p for p in path.rglob("*") if p.is_file()):
        relative = source.relative_to(path)
        if DEEPSPEED_TAG in relative.parts:
            continue
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        (out / relative).symlink_to(source.resolve())
    for folder in deepspeed_parts(path, parts):
        target = out / folder.relative_to(path) / DEEPSPEED_TAG
        try:
            _convert(folder / DEEPSPEED_TAG, target)
        except Exception as err:  # noqa: BLE001 - DeepSpeed's converter raises assertions and more
            raise CheckpointError(f"the ZeRO shards in {folder / DEEPSPEED_TAG} could not be re-partitioned "
                                  f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
                                  ) from err
    return out


@contextlib.contextmanager
def universal_loading(accelerators: list[Accelerator]) -> Iterator[None]:
    """Within the block, the DeepSpeed engines of ``accelerators`` read universal checkpoints (the
    flag DeepSpeed otherwise takes from its config at start-up)."""
    engines = [model for accelerator in accelerators for model in accelerator._models
               if hasattr(model, "load_universal_checkpoint")]
    for engine in engines:
        engine._config.load_universal_checkpoint = True
    try:
        yield
    finally:
        for engine in engines:
            engine._config.load_universal_checkpoint = False


def reshard_dir(path: Path) -> Path:
    """Where the universal form of the checkpoint ``path`` is written."""
    return path.parent / RESHARD_DIR / path.name
