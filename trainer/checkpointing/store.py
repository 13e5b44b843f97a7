"""Checkpoints: everything a restart needs, written atomically, verified when read, the last K kept.

Layout under ``<output_dir>/checkpoints``::

    step_00001000/          one complete checkpoint
        model.safetensors | pytorch_model/   the denoiser, its optimizer and LR schedule (accelerate)
        <adversary>/        each adversary with its optimizer, saved by its own Accelerator
        ema.safetensors     the EMA weights; decay, warmup and update count in its metadata
        meta.json           written last: config, counters, the objective's state, SHA-256 per file
    step_00002000.tmp/      being written; never read, removed at the next start
    latest                  text file naming the newest complete checkpoint

Every rank writes into ``step_N.tmp``; after a barrier the ranks hash the files, the main process
writes ``meta.json`` and renames the folder, then moves ``latest``. A checkpoint is complete exactly
when a ``step_N`` folder with ``meta.json`` exists, so a crash at any moment leaves the previous
checkpoint usable. ``--resume auto`` takes the newest complete one and, if it cannot be used (an
unreadable meta.json, a file whose checksum differs, a file that fails to load), warns and falls
back to the one before.

Nothing read from a checkpoint can run code: the EMA is safetensors, counters and the objective's
state are JSON, and the files accelerate and DeepSpeed write with ``torch.save`` (optimizer states,
random states, ZeRO shards) are read only inside :func:`weights_only_loads`, which holds every
``torch.load`` to torch's weights-only unpickler (tensors, containers, numbers and a short list of
DeepSpeed's plain record classes).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..config import Config, flatten, resume_changeable_keys
from ..ema import EMA
from ..runtime.distributed import all_ranks, from_main, merged, world
from ..runtime.files import file_sha256, write_json_atomic, write_text_atomic
from .elastic import needs_resharding, reshard_dir, universal_loading, universal_view
from .safe_load import DEEPSPEED_TAG, CheckpointError, weights_only_loads

logger = logging.getLogger(__name__)

META = "meta.json"
EMA_FILE = "ema.safetensors"
DENOISER_FILE = "model.safetensors"  # accelerate's name for model 0 outside DeepSpeed
FORMAT = 2  # 1: EMA and counters as pickles (custom_checkpoint_*.pkl), refused since they can run code
LEGACY_PICKLES = "custom_checkpoint_*.pkl"
STEP_DIR = re.compile(r"^step_(\d+)$")
@dataclass
class TrainState:
    """The loop's counters, stored in every checkpoint's meta.json."""

    step: int = 0
    images_seen: int = 0
    corrupt_samples: int = 0
    skipped_shards: int = 0
    mlflow_run_id: str | None = None

    def load(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            if not hasattr(self, key):
                raise CheckpointError(f"unknown train state {key!r} in {META}")
            setattr(self, key, value)


@dataclass
class Checkpointed:
    """Everything a checkpoint holds: the denoiser's Accelerator (network, optimizer, LR schedule),
    each adversary's Accelerator by sub-folder name, the EMA, the counters, and objects with JSON
    state (``state_dict`` of numbers and lists; a Diffusion-GAN's T controller)."""

    accelerator: Accelerator
    parts: dict[str, Accelerator]
    ema: EMA
    state: TrainState
    objects: dict[str, Any] = field(default_factory=dict)  # by name, e.g. {"controller": ...}

    def manifest(self) -> dict[str, Any]:
        """What the checkpoint holds and where, as meta.json's ``contents``: the denoiser's weights
        (a file, or DeepSpeed's folder of shards), each adversary's sub-folder, the EMA file, and
        the names of the counters and of the objective's states kept in meta.json itself."""
        sharded = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        return {"denoiser": {"weights": DEEPSPEED_TAG if sharded else DENOISER_FILE},
                "adversaries": {name: {"folder": name} for name in self.parts},
                "ema": EMA_FILE, "counters": sorted(asdict(self.state)),
                "objective_state": sorted(self.objects)}


class Checkpointer:
    """The run's checkpoint writer, which also decides when one is due: every ``every`` steps, at
    the last step and when the run stops on a signal, and never twice for the same step."""

    def __init__(self, content: Checkpointed, output_dir: str | Path, every: int, keep_last: int,
                 estimate: int) -> None:
        self.content, self.output_dir = content, output_dir
        self.every, self.keep_last, self.estimate = every, keep_last, estimate
        self.last_step = -1  # the step of the checkpoint this run wrote last

    def due(self, step: int, last: bool, stop: bool) -> bool:
        return (step % self.every == 0 or last or stop) and self.last_step != step

    def save(self, step: int, meta: dict[str, Any]) -> Path:
        """Write the checkpoint of ``step`` on every rank (see ``save_checkpoint``)."""
        path = save_checkpoint(self.content, self.output_dir, step, meta, self.keep_last, self.estimate)
        self.last_step = step
        return path


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
    """A checkpoint's meta.json; a CheckpointError names the file when it is not a JSON object."""
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{path / META} is unreadable ({err})") from err
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise CheckpointError(f"{path / META} holds no checkpoint record (a JSON object with a step)")
    return meta


def remove_stale_tmp(output_dir: str | Path) -> None:
    """Remove ``step_N.tmp`` folders that a crash or a full disk left behind (with a warning)."""
    for stale in sorted(checkpoint_dir(output_dir).glob("step_*.tmp")):
        logger.warning("removing %s, left by a run that stopped while writing it", stale)
        shutil.rmtree(stale, ignore_errors=True)


# ---------------------------------------------------------------------------------- safe reading

def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; a CheckpointError names it when unreadable."""
    try:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
        return load_file(str(path)), metadata
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err})") from err


def load_ema(ema: EMA, path: Path) -> None:
    tensors, metadata = read_safetensors(path)
    try:
        ema.load_state_dict({"decay": float(metadata["decay"]), "warmup": metadata["warmup"] == "true",
                             "updates": int(metadata["updates"]), "model": tensors})
    except (KeyError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path} is not a readable EMA file ({err})") from err


def write_ema_state(state: dict[str, Any], path: Path) -> None:
    """An EMA state dict (``decay``, ``warmup``, ``updates``, ``model``) as ``ema.safetensors``."""
    # safetensors refuses shared or non-contiguous storage: store plain contiguous copies.
    tensors = {name: tensor.detach().contiguous().clone().cpu() for name, tensor in state["model"].items()}
    metadata = {"decay": repr(float(state["decay"])), "warmup": "true" if state["warmup"] else "false",
                "updates": str(int(state["updates"]))}
    save_file(tensors, str(path), metadata=metadata)


def json_state(state: dict[str, Any]) -> dict[str, Any]:
    """A state dict of numbers and tensors as JSON values (tensors become nested lists)."""
    return {key: value.tolist() if isinstance(value, torch.Tensor) else value for key, value in state.items()}


# ---------------------------------------------------------------------------------- checksums

def listed_files(folder: Path) -> list[str]:
    """Every file under ``folder`` but meta.json, by relative path, as the main process sees them."""
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != META)
    return from_main(names)


def checksums(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` (but meta.json), by relative path; each rank hashes
    every world-th file, so a large sharded checkpoint is read once, spread over the ranks."""
    files = listed_files(folder)
    rank, size = world()
    return merged({name: file_sha256(folder / name) for name in files[rank::size]})


def verify_checksums(folder: Path, expected: dict[str, str], prefix: str = "") -> list[str]:
    """Files of ``folder`` whose path starts with ``prefix`` (all by default) that are missing,
    unreadable, differ from ``expected`` or are not listed in it; the same list on every rank."""
    rank, size = world()
    wanted = sorted(name for name in expected if name.startswith(prefix))
    bad = {name: "not listed in meta.json" for name in listed_files(folder)
           if name.startswith(prefix) and name not in expected}
    for name in wanted[rank::size]:
        try:
            if file_sha256(folder / name) != expected[name]:
                bad[name] = "checksum differs"
        except FileNotFoundError:
            bad[name] = "missing"
        except OSError as err:
            bad[name] = f"unreadable: {err.strerror or err}"
    return [f"{name} ({why})" for name, why in sorted(merged(bad).items())]


# ---------------------------------------------------------------------------------- writing

def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _disk_full(folder: Path, needed: int, last_good: Path | None) -> CheckpointError:
    free = shutil.disk_usage(folder).free if folder.exists() else 0
    kept = f"the last good checkpoint {last_good.name} is kept" if last_good else "no checkpoint was kept"
    return CheckpointError(
        f"disk full: a checkpoint needs about {needed / 2**20:.1f} MiB ({needed} bytes) in {folder}, "
        f"{free / 2**20:.1f} MiB are free; {kept}. Free space there or set run.output_dir elsewhere"
    )


def save_checkpoint(content: Checkpointed, output_dir: str | Path, step: int, meta: dict[str, Any],
                    keep_last: int, estimate: int) -> Path:
    """Write a checkpoint on every rank; returns its final path once it is complete.

    ``estimate`` is the bytes a checkpoint takes when no earlier one tells: a full disk is reported
    before anything is written (and a write that still fails leaves the previous checkpoint)."""
    accelerator = content.accelerator
    root = checkpoint_dir(output_dir)
    final = root / f"step_{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    existing = complete_checkpoints(root) if accelerator.is_main_process else []
    last_good = existing[0] if existing else None
    needed = folder_bytes(last_good) if last_good else estimate
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash while writing this step before
    room = not accelerator.is_main_process or shutil.disk_usage(root).free >= needed
    if not all_ranks(accelerator, room):
        raise _disk_full(root, needed, last_good)
    failure = _write_state(content, tmp)
    if not all_ranks(accelerator, failure is None):
        _abandon(accelerator, tmp)
        raise _write_error(failure, root, needed, last_good)
    files = checksums(tmp)
    if accelerator.is_main_process:
        try:
            record = {**meta, "format": FORMAT, "step": step, "saved_at": time.time(),
                      "contents": content.manifest(), "state": asdict(content.state),
                      "objective_state": {name: json_state(holder.state_dict())
                                          for name, holder in content.objects.items()},
                      "files": files}
            (tmp / META).write_text(json.dumps(record, indent=2))
            _publish(root, tmp, final)
        except Exception as err:  # noqa: BLE001 - every rank must learn of it, whatever it is
            failure = err
    if not all_ranks(accelerator, failure is None):
        _abandon(accelerator, tmp)
        raise _write_error(failure, root, needed, last_good)
    if accelerator.is_main_process:
        for old in complete_checkpoints(root)[keep_last:]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _write_state(content: Checkpointed, tmp: Path) -> Exception | None:
    """This rank's files of the checkpoint; a failure is returned, not raised, so that every rank
    goes on to the agreement that follows (a rank that raised would leave the others waiting)."""
    accelerator = content.accelerator
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        for name, part in content.parts.items():
            part.save_state(str(tmp / name))
        if accelerator.is_main_process:
            write_ema_state(content.ema.state_dict(), tmp / EMA_FILE)
    except Exception as err:  # noqa: BLE001 - reported once every rank has agreed
        return err
    return None


def record_stop(checkpoint: Path, stopped_by: str) -> None:
    """Note in a checkpoint written earlier in the step that the run stopped on a signal after it
    (Slurm's job script requeues on that note). meta.json is outside the checksums it lists."""
    meta = read_meta(checkpoint)
    meta["stopped_by"] = stopped_by
    write_json_atomic(checkpoint / META, meta)


def _publish(root: Path, tmp: Path, final: Path) -> None:
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_text_atomic(root / "latest", final.name + "\n")


def _abandon(accelerator: Accelerator, tmp: Path) -> None:
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()


def _write_error(err: Exception | None, root: Path, needed: int, last_good: Path | None) -> CheckpointError:
    if err is None:  # another rank failed: it reports the cause
        return CheckpointError(f"another process failed to write its part of a checkpoint in {root}")
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return _disk_full(root, needed, last_good)
    return CheckpointError(f"writing a checkpoint in {root} failed: {err}")


# ---------------------------------------------------------------------------------- resuming

def changed_keys(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Flattened config keys whose values differ, excluding harmless ones. A key the checkpoint
    lacks counts as its default: keys are added with the default that keeps the old behaviour."""
    defaults = flatten(Config())
    keys = set(saved) | set(current)
    return {
        key: (saved.get(key, defaults.get(key)), current.get(key))
        for key in sorted(keys)
        if saved.get(key, defaults.get(key)) != current.get(key) and key not in resume_changeable_keys()
    }


def legacy_message(path: Path) -> str:
    return (f"checkpoint {path} stores its EMA and counters as pickles ({LEGACY_PICKLES}), which can run "
            f"code when loaded, so advdit no longer reads it as is. Convert it once with `advdit "
            f"checkpoint convert {path}` (it reads those files with torch's weights-only loader, which "
            "refuses anything but tensors and plain values)")


def check_format(path: Path, meta: dict[str, Any]) -> None:
    """Refuse checkpoints of the pickled format (with how to convert them) and unknown formats."""
    if meta.get("format", 1) == 1:
        raise CheckpointError(legacy_message(path))
    if meta["format"] != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {meta['format']}; this advdit reads format "
                              f"{FORMAT} (a newer advdit wrote it?)")


def verify(path: Path, meta: dict[str, Any], prefix: str = "") -> None:
    """Raise unless the checkpoint's files under ``prefix`` are exactly those meta.json lists,
    with the SHA-256 it records."""
    if not isinstance(meta.get("files"), dict) or not meta["files"]:
        raise CheckpointError(f"{path / META} lists no files with their SHA-256")
    bad = verify_checksums(path, meta["files"], prefix)
    if bad:
        raise CheckpointError(f"{len(bad)} file(s) of {path} fail their SHA-256 check: {', '.join(bad[:3])}")


def load_checkpoint(content: Checkpointed, path: Path, meta: dict[str, Any]) -> None:
    """Verify ``path`` against its checksums, then load it into ``content`` (on every rank)."""
    verify(path, meta)
    accelerators = [content.accelerator, *content.parts.values()]
    resharding = needs_resharding(content.accelerator, meta)
    source = reshard_dir(path) if resharding else path
    if resharding:
        logger.info("re-partitioning the ZeRO state of %s (written by %d processes) for %d",
                    path, meta["world_size"], content.accelerator.num_processes)
        failure = None
        if content.accelerator.is_main_process:
            try:
                universal_view(path, list(content.parts), source)
            except CheckpointError as err:
                failure = str(err)
        if (failure := from_main(failure)) is not None:  # every rank learns of it, and waits for it
            raise CheckpointError(failure)
    try:
        with weights_only_loads(), universal_loading(accelerators if resharding else []):
            content.accelerator.load_state(str(source))
            for name, part in content.parts.items():
                part.load_state(str(source / name))
    finally:
        if resharding:
            content.accelerator.wait_for_everyone()
            if content.accelerator.is_main_process:
                shutil.rmtree(source, ignore_errors=True)
                with contextlib.suppress(OSError):  # the .reshard folder, once it is empty
                    source.parent.rmdir()
    load_ema(content.ema, path / EMA_FILE)
    content.state.load(meta["state"])
    states = saved_objective_states(meta, content)
    for name, holder in content.objects.items():
        holder.load_state_dict(states[name])


def saved_objective_states(meta: dict[str, Any], content: Checkpointed) -> dict[str, Any]:
    """The objective's states of a checkpoint by name; those written before the manifest list
    them in order (``objects``)."""
    if "objective_state" in meta:
        return meta["objective_state"]
    return dict(zip(content.objects, meta.get("objects", []), strict=False))


def check_contents(path: Path, meta: dict[str, Any], content: Checkpointed) -> None:
    """The checkpoint holds the adversaries and objective states ``content`` expects (another
    objective's checkpoint is a user's mistake, named with both sides, not damage to skip)."""
    adversaries = sorted(meta.get("contents", {}).get("adversaries", content.parts))
    if adversaries != sorted(content.parts):
        raise CheckpointError(f"{path} holds the adversaries {adversaries}, this objective trains "
                              f"{sorted(content.parts)}")
    listed = meta.get("objective_state", meta.get("objects", []))
    by_name = isinstance(listed, dict)
    held = sorted(listed) if by_name else len(listed)
    expected = sorted(content.objects) if by_name else len(content.objects)
    if held != expected:
        raise CheckpointError(f"{path / META} holds the objective states {held}, this objective "
                              f"keeps {expected}")


def resume_from(content: Checkpointed, resume: str, output_dir: str | Path,
                check_config: Callable[[dict[str, Any]], None]) -> Path | None:
    """Load the checkpoint ``resume`` asks for; returns its path, or None for a fresh start.

    ``resume`` is ``"auto"`` (newest usable checkpoint, if any), ``"none"`` (fresh start, which
    refuses to mix with existing checkpoints) or a checkpoint folder. ``check_config`` receives the
    checkpoint's meta and raises if the run may not continue from it: a config that differs is a
    decision for the user, not damage, so it is never skipped over.
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
    if resume != "auto":
        if not (Path(resume) / META).is_file():
            raise CheckpointError(f"--resume {resume}: not a complete checkpoint folder (no {META})")
        _load_checked(content, Path(resume), check_config)
        logger.info("resumed from %s (step %d)", resume, content.state.step)
        _set_aside_newer(content, existing)
        return Path(resume)
    failures = []
    for path in existing:
        try:
            _load_checked(content, path, check_config)
            logger.info("resumed from %s (step %d)", path, content.state.step)
            _set_aside_newer(content, existing)
            return path
        except _Unusable as err:
            logger.warning("checkpoint %s cannot be used (%s); trying an older one", path, err.reason)
            failures.append(f"{path.name}: {err.reason}")
    if failures:
        raise CheckpointError(f"none of the {len(failures)} checkpoint(s) in {root} can be used "
                              f"({'; '.join(failures)}); move them away to start afresh")
    return None


def _set_aside_newer(content: Checkpointed, existing: list[Path]) -> None:
    """Rename checkpoints newer than the resumed step (ones that could not be used, or of a run
    resumed from an older one on purpose) to ``step_N.set-aside``: left in place, they would be
    resumed next time instead of this run's, and keep_last would delete this run's in their
    favour."""
    if not content.accelerator.is_main_process:
        return
    for path in existing:
        if int(STEP_DIR.match(path.name).group(1)) > content.state.step:
            aside = path.with_name(path.name + ".set-aside")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(path, aside)
            logger.warning("set %s aside as %s: it is newer than the resumed step %d", path.name,
                           aside.name, content.state.step)


class _Unusable(CheckpointError):
    """A damaged checkpoint: --resume auto falls back to an older one."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"checkpoint {path} cannot be used: {reason}")
        self.reason = reason


def _load_checked(content: Checkpointed, path: Path, check_config: Callable[[dict[str, Any]], None]) -> None:
    try:
        meta = read_meta(path)
    except CheckpointError as err:
        raise _Unusable(path, str(err)) from err
    check_format(path, meta)
    check_config(meta)
    check_contents(path, meta, content)
    error: Exception | None = None
    try:
        load_checkpoint(content, path, meta)
    except Exception as err:  # noqa: BLE001 - any unreadable file makes this checkpoint unusable
        error = err
    # Every rank must make the same choice, also when only one rank's shard failed to load.
    if not all_ranks(content.accelerator, error is None):
        reason = (f"{type(error).__name__}: {error}".splitlines()[0] if error
                  else "another process could not load its part")
        raise _Unusable(path, reason) from error


# ---------------------------------------------------------------------------------- conversion

def convert_legacy(path: str | Path) -> Path:
    """Rewrite a checkpoint of the pickled format in place: the EMA to ema.safetensors, the
    counters and objective state into meta.json, checksums added, the pickles removed.

    The pickles are read with torch's weights-only loader, so a crafted one is refused (nothing in
    it runs) and the checkpoint is left as it was."""
    path = Path(path)
    meta = read_meta(path)
    pickles = sorted(path.glob(LEGACY_PICKLES), key=lambda p: int(re.sub(r"\D", "", p.name)))
    if meta.get("format", 1) != 1:
        if meta.get("files") and pickles:  # converted, but stopped before the pickles were removed
            for pickle_file in pickles:
                pickle_file.unlink()
            return path
        raise CheckpointError(f"checkpoint {path} is already in format {meta['format']}")
    if not pickles:
        raise CheckpointError(f"checkpoint {path} holds no {LEGACY_PICKLES} to convert")
    ema_state, state, objects = None, None, []
    for pickle_file in pickles:
        try:
            value = torch.load(pickle_file, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - whatever the unpickler refuses
            raise CheckpointError(f"{pickle_file} cannot be read safely ({str(err).splitlines()[0]}); "
                                  "the checkpoint was left unchanged") from err
        if not isinstance(value, dict):
            raise CheckpointError(f"{pickle_file} holds {type(value).__name__}, expected a state dict")
        if {"decay", "model"} <= set(value):
            ema_state = value
        elif {"step", "images_seen"} <= set(value):
            state = value
        else:
            objects.append(json_state(value))
    if ema_state is None or state is None:
        raise CheckpointError(f"checkpoint {path} lacks the EMA or the counters among {LEGACY_PICKLES}")
    write_ema_state(ema_state, path / EMA_FILE)
    known = {key: state[key] for key in asdict(TrainState()) if key in state}
    names = {pickle_file.name for pickle_file in pickles}
    meta.update(format=FORMAT, state={**asdict(TrainState()), **known}, objects=objects,
                files={name: digest for name, digest in checksums(path).items() if name not in names})
    write_json_atomic(path / META, meta)
    for pickle_file in pickles:  # last: a crash before this leaves a converted checkpoint
        pickle_file.unlink()
    return path
