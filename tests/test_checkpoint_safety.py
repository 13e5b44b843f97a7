"""Checkpoints a hostile or broken disk hands over: crafted pickles run nothing, the old pickled
format is refused with a conversion path, bit rot and garbage meta.json fall back to the previous
checkpoint, non-finite weights are never checkpointed, and a full disk keeps the last good one."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from advdit.launchers.cli import main
from advdit.trainer.checkpointing.store import (
    EMA_FILE,
    META,
    CheckpointError,
    checksums,
    complete_checkpoints,
    read_meta,
    save_checkpoint,
)
from advdit.trainer.loop import Trainer, train

from helpers import tiny_config, tiny_overrides

ADVDIT = str(Path(sys.executable).with_name("advdit"))


class Payload:
    """Unpickled by a loader that runs code, it creates ``target``: what an attacker would ship."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.target}",)


def plant(file: Path, target: Path) -> None:
    """Replace ``file`` by a crafted pickle and re-sign the checkpoint's checksums, as an attacker
    who hands over a whole folder would."""
    torch.save({"state": Payload(target)}, file)
    checkpoint = next(parent for parent in file.parents if (parent / META).is_file())
    resign(checkpoint)


def resign(checkpoint: Path) -> None:
    meta = read_meta(checkpoint)
    meta["files"] = checksums(checkpoint)
    (checkpoint / META).write_text(json.dumps(meta))


def losses(result) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in result.history}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, tiny_shards: Path):
    """A 6-step run with checkpoints at steps 3 and 6."""
    return train(tiny_config(tmp_path_factory.mktemp("finished"), tiny_shards), progress=False)


def copy_run(finished, folder: Path) -> Path:
    shutil.copytree(finished.output_dir / "checkpoints", folder / "checkpoints")
    return folder / "checkpoints"


def test_the_payload_runs_code_when_unpickled_unsafely(tmp_path: Path) -> None:
    """The control: the crafted file would create its target under a plain unpickler."""
    torch.save({"state": Payload(tmp_path / "pwned")}, tmp_path / "bad.pkl")
    torch.load(tmp_path / "bad.pkl", weights_only=False)
    assert (tmp_path / "pwned").exists()


@pytest.mark.parametrize("name", ["optimizer.bin", "scheduler.bin", "random_states_0.pkl",
                                  "custom_checkpoint_0.pkl"])
def test_crafted_pickle_in_a_checkpoint_runs_nothing_on_resume(name: str, finished, tmp_path: Path,
                                                               tiny_shards: Path) -> None:
    root = copy_run(finished, tmp_path / "run")
    target = tmp_path / "pwned"
    plant(root / "step_00000003" / name, target)
    config = tiny_config(tmp_path / "run", tiny_shards, "train.steps=4")
    try:
        result = train(config, resume=str(root / "step_00000003"), progress=False)
    except CheckpointError as err:  # refused: the file is named as unusable
        assert "step_00000003 cannot be used" in str(err)
    else:  # accelerate skips random states it cannot read; the rest resumed
        assert name == "random_states_0.pkl" and result.step == 4
    assert not target.exists()


def test_export_and_sample_read_no_pickle(finished, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = copy_run(finished, tmp_path)
    checkpoint = root / "step_00000006"
    target = tmp_path / "pwned"
    plant(checkpoint / "custom_checkpoint_0.pkl", target)  # where the EMA used to be
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "ema.safetensors")]) == 0
    exported, stored = load_file(tmp_path / "ema.safetensors"), load_file(checkpoint / EMA_FILE)
    assert exported.keys() == stored.keys()
    assert all(torch.equal(exported[key], stored[key].float()) for key in stored)
    assert main(["sample", str(checkpoint), "--num-samples", "2", "--batch-size", "2",
                 "--npz", str(tmp_path / "s.npz")]) == 0
    assert not target.exists()


def test_old_pickled_format_is_refused_then_converted(finished, tmp_path: Path, tiny_shards: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    root = copy_run(finished, tmp_path)
    checkpoint = make_legacy(root / "step_00000003")
    with pytest.raises(CheckpointError, match=r"advdit checkpoint convert .*step_00000003"):
        train(tiny_config(tmp_path, tiny_shards), resume=str(checkpoint), progress=False)
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "advdit checkpoint convert" in capsys.readouterr().err
    assert main(["checkpoint", "convert", str(checkpoint)]) == 0
    assert not list(checkpoint.glob("custom_checkpoint_*.pkl"))
    (root / "step_00000006").rename(root / "elsewhere")  # resume from the converted one
    resumed = train(tiny_config(tmp_path, tiny_shards), progress=False)
    assert resumed.checkpoint is not None and resumed.step == 6
    for step in (4, 5, 6):
        assert losses(resumed)[step] == pytest.approx(losses(finished)[step], rel=1e-6, abs=1e-7)


def make_legacy(checkpoint: Path) -> Path:
    """Rewrite a checkpoint as advdit wrote it before: EMA and counters as custom_checkpoint pickles."""
    meta = read_meta(checkpoint)
    ema = {"decay": 0.9, "warmup": False, "updates": meta["step"], "model": load_file(checkpoint / EMA_FILE)}
    torch.save(ema, checkpoint / "custom_checkpoint_0.pkl")
    torch.save(meta["state"], checkpoint / "custom_checkpoint_1.pkl")
    (checkpoint / EMA_FILE).unlink()
    for key in ("format", "files", "state", "objective_state", "contents"):  # none existed then
        meta.pop(key)
    (checkpoint / META).write_text(json.dumps(meta))
    return checkpoint


def test_converting_a_crafted_old_checkpoint_runs_nothing(finished, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    checkpoint = make_legacy(copy_run(finished, tmp_path) / "step_00000003")
    target = tmp_path / "pwned"
    torch.save({"decay": 0.9, "model": Payload(target)}, checkpoint / "custom_checkpoint_0.pkl")
    before = sorted(p.name for p in checkpoint.iterdir())
    assert main(["checkpoint", "convert", str(checkpoint)]) == 2
    assert "cannot be read safely" in capsys.readouterr().err
    assert not target.exists() and sorted(p.name for p in checkpoint.iterdir()) == before


@pytest.mark.slow
def test_crafted_zero_shards_run_nothing(tmp_path: Path, tiny_shards: Path) -> None:
    """DeepSpeed reads its shards with weights_only=False; through advdit it never unpickles code."""
    out = tmp_path / "zero"
    args = [ADVDIT, "train", *tiny_overrides(out, tiny_shards), "distributed.strategy=zero2", "train.steps=2",
            "train.ckpt_every=2"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    checkpoint = out / "checkpoints" / "step_00000002"
    target = tmp_path / "pwned"
    plant(checkpoint / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", target)
    resumed = subprocess.run([*args[:-2], "train.steps=3", "--resume", str(checkpoint)],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 2 and "step_00000002 cannot be used" in resumed.stderr.splitlines()[-1]
    export = subprocess.run([ADVDIT, "export", str(checkpoint), "--out", str(tmp_path / "raw.safetensors"),
                             "--weights", "raw"], capture_output=True, text=True, timeout=300)
    assert export.returncode == 2 and "ZeRO shards" in export.stderr.splitlines()[-1]
    assert not target.exists()


def test_bit_rot_is_detected_and_auto_resume_falls_back(finished, tmp_path: Path, tiny_shards: Path,
                                                       caplog: pytest.LogCaptureFixture,
                                                       capsys: pytest.CaptureFixture) -> None:
    root = copy_run(finished, tmp_path)
    weights = root / "step_00000006" / "model.safetensors"
    with weights.open("r+b") as handle:  # 4 KiB of 0xFF inside the tensor data
        handle.seek(weights.stat().st_size // 2)
        handle.write(b"\xff" * 4096)
    with pytest.raises(CheckpointError, match=r"model\.safetensors \(checksum differs\)"):
        train(tiny_config(tmp_path, tiny_shards), resume=str(root / "step_00000006"), progress=False)
    assert main(["export", str(root / "step_00000006"), "--out", str(tmp_path / "x.safetensors"),
                 "--weights", "raw"]) == 2
    assert "fail their SHA-256 check" in capsys.readouterr().err
    caplog.set_level(logging.INFO)
    resumed = train(tiny_config(tmp_path, tiny_shards, "train.steps=7"), progress=False)
    assert resumed.step == 7 and f"resumed from {root / 'step_00000003'} (step 3)" in caplog.text
    assert "step_00000006 cannot be used" in caplog.text


@pytest.mark.parametrize("content", ["", "{not json", "[1, 2]"])
def test_garbage_meta_json_falls_back_to_the_older_checkpoint(content: str, finished, tmp_path: Path,
                                                             tiny_shards: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    root = copy_run(finished, tmp_path)
    (root / "step_00000006" / META).write_text(content)
    caplog.set_level(logging.INFO)
    resumed = train(tiny_config(tmp_path, tiny_shards), progress=False)
    assert resumed.step == 6 and f"resumed from {root / 'step_00000003'} (step 3)" in caplog.text
    assert losses(resumed)[6] == pytest.approx(losses(finished)[6], rel=1e-6, abs=1e-7)


def test_no_usable_checkpoint_is_an_error_not_a_fresh_start(finished, tmp_path: Path,
                                                            tiny_shards: Path) -> None:
    root = copy_run(finished, tmp_path)
    for checkpoint in complete_checkpoints(root):
        (checkpoint / META).write_text("garbage")
    with pytest.raises(CheckpointError, match=r"none of the 2 checkpoint\(s\) .* can be used"):
        train(tiny_config(tmp_path, tiny_shards), progress=False)


def test_non_finite_weights_are_never_checkpointed(tmp_path: Path, tiny_shards: Path) -> None:
    """lr = 1e30 (finite, so the config allows it): step 1's update is huge but finite, step 2's
    forward overflows. Only step 1 is checkpointed, and keep_last=1 keeps it."""
    cfg = tiny_config(tmp_path, tiny_shards, "optim.lr=1e30", "optim.grad_clip=0", "train.ckpt_every=1",
                      "train.keep_last=1", "train.log_every=100")
    with pytest.raises(FloatingPointError, match=r"at step 2: no checkpoint .*step_00000001, is kept"):
        train(cfg, progress=False)
    (kept,) = complete_checkpoints(tmp_path / "checkpoints")
    assert kept.name == "step_00000001"
    for name in ("model.safetensors", EMA_FILE):
        assert all(torch.isfinite(t).all() for t in load_file(kept / name).values())


# ------------------------------------------------------------------------------- full disk

@pytest.fixture
def small_disk(tmp_path: Path):
    """A 16 MiB tmpfs: a real filesystem that fills up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave: int) -> None:
    """Write a filler file that leaves ``leave`` bytes free."""
    free = shutil.disk_usage(disk).free
    with (disk / "filler").open("wb") as handle:
        handle.truncate(0)
        handle.write(b"\0" * max(free - leave, 0))


@pytest.mark.slow
def test_full_disk_is_one_clear_line_and_keeps_the_last_checkpoint(small_disk: Path,
                                                                   tiny_shards: Path) -> None:
    out = small_disk / "run"
    args = [ADVDIT, "train", *tiny_overrides(out, tiny_shards), "train.ckpt_every=3", "train.log_every=3"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    first = subprocess.run([*args, "train.steps=3"], capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    size = sum(p.stat().st_size for p in (out / "checkpoints" / "step_00000003").rglob("*") if p.is_file())
    fill(small_disk, size // 2)
    # With MLflow's sqlite store on the same full disk: its trouble must not hide the cause.
    full = subprocess.run([*args, "tracking.enabled=true"], capture_output=True, text=True, timeout=300,
                          env=env)
    last = full.stderr.strip().splitlines()[-1]
    assert full.returncode == 2, full.stderr[-3000:]
    assert last.startswith("advdit: error: disk full: a checkpoint needs about")
    assert str(out / "checkpoints") in last
    assert "the last good checkpoint step_00000003 is kept" in last
    assert [p.name for p in (out / "checkpoints").glob("step_*")] == ["step_00000003"]
    (small_disk / "filler").unlink()
    (out / "checkpoints" / "step_00000009.tmp").mkdir()  # as a crash mid-write leaves it
    again = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "removing" in again.stderr and "step_00000009.tmp" in again.stderr
    assert not (out / "checkpoints" / "step_00000009.tmp").exists()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000006"


def test_disk_full_while_writing_removes_the_partial_checkpoint(small_disk: Path, tiny_shards: Path) -> None:
    """The write itself fails (meta.json is larger than the space left): the half-written folder
    goes, the previous checkpoint and the ``latest`` pointer stay."""
    trainer = Trainer(tiny_config(small_disk / "run", tiny_shards, "train.steps=3"), progress=False)
    trainer.run()
    root = small_disk / "run" / "checkpoints"
    huge = {"padding": "x" * (shutil.disk_usage(small_disk).free + (1 << 20))}
    with pytest.raises(CheckpointError, match="disk full: .* the last good checkpoint step_00000003 is kept"):
        save_checkpoint(trainer.checkpointer.content, small_disk / "run", 4, huge, keep_last=3, estimate=0)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000003"]
    assert (root / "latest").read_text().strip() == "step_00000003"


def test_a_write_failing_on_one_rank_stops_every_rank(tmp_path: Path) -> None:
    """Before, the failing rank went on to a collective the others never reached: both waited."""
    script = Path(__file__).with_name("two_rank_save.py")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(script), str(tmp_path)],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    root = tmp_path / "checkpoints"
    assert (tmp_path / "rank0.txt").read_text().startswith(f"disk full: a checkpoint needs about 1.0 MiB "
                                                           f"(1048576 bytes) in {root}")
    other = (tmp_path / "rank1.txt").read_text()
    assert other == f"another process failed to write its part of a checkpoint in {root}"
    assert not list((tmp_path / "checkpoints").iterdir())  # the half-written folder is gone


def test_files_must_be_the_ones_meta_json_lists(finished, tmp_path: Path, tiny_shards: Path) -> None:
    root = copy_run(finished, tmp_path)
    checkpoint = root / "step_00000006"
    (checkpoint / "pytorch_model.bin").write_bytes(b"planted")  # accelerate would read it
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin \(not listed in meta\.json\)"):
        train(tiny_config(tmp_path, tiny_shards), resume=str(checkpoint), progress=False)
    meta = read_meta(checkpoint)
    meta.pop("files")
    (checkpoint / META).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="lists no files with their SHA-256"):
        train(tiny_config(tmp_path, tiny_shards), resume=str(checkpoint), progress=False)


def test_checkpoints_newer_than_a_fallback_are_set_aside(finished, tmp_path: Path, tiny_shards: Path) -> None:
    """Left in place, the damaged step 6 would be resumed again next time, and keep_last=1 would
    delete the checkpoint this run writes in its favour."""
    root = copy_run(finished, tmp_path)
    (root / "step_00000006" / META).write_text("garbage")
    result = train(tiny_config(tmp_path, tiny_shards, "train.steps=5", "train.ckpt_every=5",
                               "train.keep_last=1"), progress=False)
    assert result.checkpoint == root / "step_00000005" and result.checkpoint.is_dir()
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000005", "step_00000006.set-aside"]
    assert (root / "latest").read_text().strip() == "step_00000005"


def test_deepspeed_loss_scalers_load_and_other_classes_do_not() -> None:
    """fp16 ZeRO optimizer states hold a DynamicLossScaler: allowed, as plain numbers; anything
    else of DeepSpeed's is still refused. (In a process of its own: DeepSpeed, once imported,
    leaves threads that upset the forked loader workers of later tests.)"""
    done = subprocess.run([sys.executable, "-c", LOSS_SCALERS], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    outcomes = [line for line in done.stdout.splitlines() if line.startswith(("scaler-", "other-"))]
    assert outcomes == ["scaler-loaded", "other-refused"]


LOSS_SCALERS = """
import io, torch
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
from advdit.trainer.checkpointing.store import weights_only_loads

scaler = DynamicLossScaler(init_scale=2**16, scale_window=1000, min_scale=1, delayed_shift=1,
                           consecutive_hysteresis=False)
for name, value in (("scaler", scaler), ("other", DeepSpeedZeroConfig())):
    buffer = io.BytesIO()
    torch.save({"value": value}, buffer)
    buffer.seek(0)
    try:
        with weights_only_loads():
            loaded = torch.load(buffer, weights_only=False)["value"]
    except Exception as err:
        print(name + ("-refused" if "Weights only load failed" in str(err) else "-other-error"))
    else:
        print(name + ("-loaded" if vars(loaded) == vars(value) else "-differs"))
"""
