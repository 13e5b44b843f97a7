"""Short training runs through the real loop: loss, checkpoints, exact resume, bad resumes."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from advdit.trainer.checkpointing.store import CheckpointError, complete_checkpoints
from advdit.trainer.config import ConfigError
from advdit.trainer.loop import train

from helpers import corrupt_copy, tiny_config


def losses(result) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in result.history}


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory: pytest.TempPathFactory, tiny_shards: Path):
    """An uninterrupted 6-step run, checkpointing at steps 3 and 6."""
    out = tmp_path_factory.mktemp("uninterrupted")
    return train(tiny_config(out, tiny_shards), progress=False)


def test_run_leaves_checkpoints_grid_and_metrics(six_steps) -> None:
    root = six_steps.output_dir / "checkpoints"
    assert [p.name for p in complete_checkpoints(root)] == ["step_00000006", "step_00000003"]
    assert (root / "latest").read_text().strip() == "step_00000006"
    meta = json.loads((root / "step_00000006" / "meta.json").read_text())
    assert meta["step"] == 6 and meta["config"]["train.steps"] == 6
    grid = Image.open(six_steps.grid)
    assert grid.size == (10 * 16 * 8, 16 * 8)  # 10 classes x 1 row of 16px images, upscaled 8x
    rows = [json.loads(line) for line in (six_steps.output_dir / "metrics.jsonl").open()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "loss_mse", "loss_vb", "grad_norm", "lr", "images_per_sec"} <= set(rows[0])


def test_resume_continues_with_identical_losses(six_steps, tmp_path: Path, tiny_shards: Path) -> None:
    first = train(tiny_config(tmp_path, tiny_shards, "train.steps=3"), progress=False)
    assert first.step == 3
    resumed = train(tiny_config(tmp_path, tiny_shards), resume="auto", progress=False)
    assert resumed.step == 6
    expected = losses(six_steps)
    got = {**losses(first), **losses(resumed)}
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step


def test_keep_last_prunes_old_checkpoints(tmp_path: Path, tiny_shards: Path) -> None:
    train(tiny_config(tmp_path, tiny_shards, "train.ckpt_every=1", "train.keep_last=2",
                      "train.steps=4"), progress=False)
    names = [p.name for p in complete_checkpoints(tmp_path / "checkpoints")]
    assert names == ["step_00000004", "step_00000003"]


def test_incomplete_and_corrupt_checkpoints_are_skipped(six_steps, tmp_path: Path, tiny_shards: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    shutil.copytree(six_steps.output_dir / "checkpoints", tmp_path / "checkpoints")
    root = tmp_path / "checkpoints"
    # A folder a crash left without its meta.json, and a complete-looking one with broken weights.
    shutil.copytree(root / "step_00000006", root / "step_00000009")
    (root / "step_00000009" / "meta.json").unlink()
    shutil.copytree(root / "step_00000006", root / "step_00000008")
    (root / "step_00000008" / "model.safetensors").write_bytes(b"truncated")
    caplog.set_level(logging.WARNING)
    result = train(tiny_config(tmp_path, tiny_shards), resume="auto", progress=False)
    assert result.checkpoint == root / "step_00000006"
    assert result.step == 6
    assert "ignoring incomplete checkpoint" in caplog.text and "step_00000009" in caplog.text
    assert "step_00000008 cannot be used" in caplog.text
    assert "model.safetensors (checksum differs)" in caplog.text


def test_changed_config_is_refused_unless_allowed(six_steps, tmp_path: Path, tiny_shards: Path) -> None:
    shutil.copytree(six_steps.output_dir / "checkpoints", tmp_path / "checkpoints")
    changed = tiny_config(tmp_path, tiny_shards, "optim.lr=5e-4", "train.steps=7")
    with pytest.raises(CheckpointError, match=r"optim\.lr: 0\.001 -> 0\.0005"):
        train(changed, resume="auto", progress=False)
    result = train(changed, resume="auto", allow_config_change=True, progress=False)
    assert result.step == 7


def test_fresh_start_over_existing_checkpoints_is_refused(six_steps, tmp_path: Path,
                                                          tiny_shards: Path) -> None:
    shutil.copytree(six_steps.output_dir / "checkpoints", tmp_path / "checkpoints")
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        train(tiny_config(tmp_path, tiny_shards), resume="none", progress=False)


@pytest.mark.slow
def test_loss_falls(tmp_path: Path, tiny_shards: Path) -> None:
    result = train(tiny_config(tmp_path, tiny_shards, "train.steps=60", "train.ckpt_every=60",
                               "data.batch_size=16"), progress=False)
    values = [losses(result)[step] for step in range(1, 61)]
    assert np.mean(values[-10:]) < 0.5 * np.mean(values[:10])


def test_corrupt_samples_are_counted_and_training_goes_on(tmp_path: Path, tiny_shards: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    for name in ("train-000000.tar", "train-000001.tar"):
        shutil.copy(tiny_shards / name, shards / name)
    corrupt_copy(tiny_shards / "train-000002.tar", shards / "train-000002.tar", "000170")
    cfg = tiny_config(tmp_path / "run", shards, "data.batch_size=40", "train.steps=6",
                      "train.ckpt_every=6", "data.shuffle_buffer=1")
    result = train(cfg, progress=False)
    assert result.step == 6  # 240 samples: every sample of the 3 shards passed once
    assert result.history[-1]["data/corrupt_samples"] == 1
    assert all(np.isfinite(row["loss"]) for row in result.history)


def test_shards_of_another_image_size_are_refused_up_front(tmp_path: Path) -> None:
    from advdit.trainer.data import DataError
    from advdit.trainer.data.demo import write_demo_shards

    shards = tmp_path / "shards32"
    write_demo_shards(shards, num_images=20, image_size=32, samples_per_shard=10, progress=False)
    with pytest.raises(DataError, match=r"hold 32x32 images.*data.image_size is 16"):
        train(tiny_config(tmp_path / "run", shards), progress=False)
    assert not (tmp_path / "run").exists()


def test_max_minutes_ends_the_run_as_its_last_step(tmp_path: Path, tiny_shards: Path) -> None:
    # A budget of 1.2 s, far short of the 100,000 steps asked for: the run ends where the budget
    # ran out as it would at train.steps (checkpoint, sample grid, last log row), not as a preemption.
    result = train(tiny_config(tmp_path, tiny_shards, "train.steps=100000", "train.max_minutes=0.02",
                               "train.ckpt_every=100000", "train.sample_every=100000"), progress=False)
    assert 1 <= result.step < 100000 and not result.preempted
    assert [p.name for p in complete_checkpoints(tmp_path / "checkpoints")] == [f"step_{result.step:08d}"]
    assert result.grid is not None and result.grid.name == f"step_{result.step:08d}.png"
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert rows[-1]["step"] == result.step
    meta = json.loads((result.checkpoint / "meta.json").read_text())
    assert meta["stopped_by"] is None


def test_max_minutes_must_be_positive(tmp_path: Path, tiny_shards: Path) -> None:
    with pytest.raises(ConfigError, match="train.max_minutes' must be positive"):
        tiny_config(tmp_path, tiny_shards, "train.max_minutes=0")
