"""Checkpoints: everything a restart needs, written atomically, the last K kept.

Layout under ``<output_dir>/checkpoints``::

    step_00001000/          one complete checkpoint (accelerate's save_state files + meta.json)
    step_00002000.tmp/      being written; never read
    latest                  text file naming the newest complete checkpoint

Every rank writes into ``step_N.tmp``; after a barrier the main process adds ``meta.json`` (step,
config, MLflow run id) and renames the folder, then moves ``latest``. A checkpoint is complete
exactly when a ``step_N`` folder with ``meta.json`` exists, so a crash at any moment leaves the
previous checkpoint usable. ``--resume auto`` takes the newest complete one and, if loading it
fails, warns and falls back to the one before.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator

logger = logging.getLogger(__name__)

META = "meta.json"
STEP_DIR = re.compile(r"^step_(\d+)$")
# Keys that may differ between a checkpoint's config and the resuming run's without changing what
# the run computes: its name and folder (runs get moved), how long to train, how often to log and save.
RESUMABLE_CHANGES = {
    "run.name", "run.output_dir", "train.steps", "train.log_every", "train.ckpt_every",
    "train.keep_last", "train.sample_every", "tracking.uri", "tracking.enabled", "tracking.experiment",
    # evaluation only reads the weights (and checkpoints made before the eval section lack these keys)
    "eval.fid_every", "eval.fid_samples", "eval.final_fid_samples", "eval.reference",
    "eval.inception_weights", "eval.feature_net", "eval.batch_size", "eval.cache_dir",
    # how fast the step runs, not what it computes (checkpoints made before these keys lack them)
    "model.compile", "train.tf32", "optim.fused",
}


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used for the requested resume."""


@dataclass
class TrainState:
    """Counters saved with every checkpoint (accelerate's custom-object protocol)."""

    step: int = 0
    images_seen: int = 0
    corrupt_samples: int = 0
    mlflow_run_id: str | None = None

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, newest first; incomplete folders are reported and ignored."""
    found = []
    for path in root.glob("step_*") if root.is_dir() else []:
        match = STEP_DIR.match(path.name)
        if not match or not path.is_dir():
            continue
        if not (path / META).is_file():
            logger.warning("ignoring incomplete checkpoint %s (no %s)", path, META)
            continue
        found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found, reverse=True)]


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((path / META).read_text())


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, meta: dict[str, Any],
                    parts: dict[str, Accelerator], keep_last: int) -> Path:
    """Write a checkpoint on every rank; returns its final path once it is complete.

    ``parts`` are further Accelerators (the adversaries'), each saved in a sub-folder of its name.
    """
    root = checkpoint_dir(output_dir)
    final = root / f"step_{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash while writing this step before
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    for name, part in parts.items():
        part.save_state(str(tmp / name))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / META).write_text(json.dumps({**meta, "step": step, "saved_at": time.time()}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = root / "latest.tmp"
        pointer.write_text(final.name + "\n")
        os.replace(pointer, root / "latest")
        for old in complete_checkpoints(root)[keep_last:]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def changed_keys(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Flattened config keys whose values differ, excluding harmless ones."""
    keys = set(saved) | set(current)
    return {
        key: (saved.get(key), current.get(key))
        for key in sorted(keys)
        if saved.get(key) != current.get(key) and key not in RESUMABLE_CHANGES
    }


def resume_from(accelerator: Accelerator, resume: str, output_dir: str | Path,
                parts: dict[str, Accelerator],
                check_config: Callable[[dict[str, Any]], None]) -> Path | None:
    """Load the checkpoint ``resume`` asks for; returns its path, or None for a fresh start.

    ``resume`` is ``"auto"`` (newest complete checkpoint, if any), ``"none"`` (fresh start, which
    refuses to mix with existing checkpoints) or a checkpoint folder. ``check_config`` receives the
    checkpoint's meta and raises if the run may not continue from it.
    """
    root = checkpoint_dir(output_dir)
    existing = complete_checkpoints(root)
    if resume == "none":
        if existing:
            raise CheckpointError(
                f"{root} already holds checkpoints (newest {existing[0].name}); resume with "
                "--resume auto, or choose another run.output_dir"
            )
        return None
    candidates = existing if resume == "auto" else [Path(resume)]
    if resume != "auto" and not (Path(resume) / META).is_file():
        raise CheckpointError(f"--resume {resume}: not a complete checkpoint folder (no {META})")
    for path in candidates:
        meta = read_meta(path)
        check_config(meta)
        try:
            accelerator.load_state(str(path))
            for name, part in parts.items():
                part.load_state(str(path / name))
        except Exception as err:  # noqa: BLE001 - any unreadable file makes this one unusable
            if resume != "auto":
                raise CheckpointError(f"checkpoint {path} could not be loaded: {err}") from err
            logger.warning("checkpoint %s could not be loaded (%s); trying an older one", path, err)
            continue
        logger.info("resumed from %s (step %d)", path, meta["step"])
        return path
    return None
