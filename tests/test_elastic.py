"""Elastic resume: a checkpoint written by 2 processes resumes in 1 and one written by 1 in 2, for
DDP, ZeRO-2 and ZeRO-3 with an adversary (Diffusion-GAN's discriminator and T controller). The
state every rank resumed, written out again, is the saved state: weights, Adam's moments and
step (gathered over the partitions), EMA, LR schedule and the controller. And with the same global
batch (2 x 8 <-> 1 x 16) the continued run logs the losses of the run that was never moved."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from advdit.trainer.checkpointing.elastic import _convert
from advdit.trainer.checkpointing.safe_load import DEEPSPEED_TAG, weights_only_loads

from helpers import tiny_overrides

pytestmark = pytest.mark.slow
ADVDIT = str(Path(sys.executable).with_name("advdit"))
HERE = Path(__file__).resolve().parent
STEPS = 3  # checkpoints every STEPS steps
TOTAL = 3 * STEPS  # the run that is never moved goes on to here


def train_command(out: Path, shards: Path, strategy: str, nproc: int) -> list[str]:
    """A run of 2 x 8 or 1 x 16 samples per step (the same global batch) to step TOTAL."""
    return [ADVDIT, "train", "--nproc", str(nproc), *tiny_overrides(out, shards),
            f"distributed.strategy={strategy}", "objective=diffusion_gan", "disc.base_channels=8",
            "disc.num_blocks=2", "diffusion_gan.ada_interval=1", "diffusion_gan.ada_kimg=0.01",
            f"data.batch_size={16 // nproc}", f"train.steps={TOTAL}", f"train.ckpt_every={STEPS}",
            "train.keep_last=5"]


def run(args: list[str]) -> None:
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def engine_state(checkpoint: Path, part: str, scratch: Path) -> dict[str, torch.Tensor]:
    """One engine's weights and optimizer state, whole: DeepSpeed's universal form of ZeRO shards
    (per parameter: fp32 weights, exp_avg, exp_avg_sq, step), or accelerate's DDP files."""
    folder = checkpoint / part
    if (folder / DEEPSPEED_TAG).is_dir():
        _convert(folder / DEEPSPEED_TAG, scratch)
        state = {}
        with weights_only_loads():
            for file in sorted((scratch / "zero").glob("*/*.pt")):  # one folder per parameter
                loaded = torch.load(file)  # {"param": tensor, "cat_dim": 0}, or the step as a tensor
                name = f"{file.parent.name}/{file.stem}"
                state[name] = loaded["param"] if isinstance(loaded, dict) else loaded
        return state
    state = {f"weights/{k}": v for k, v in load_file(folder / "model.safetensors").items()}
    with weights_only_loads():
        optimizer = torch.load(folder / "optimizer.bin")
    for index, moments in optimizer["state"].items():
        state |= {f"{index}/{name}": torch.as_tensor(value) for name, value in moments.items()}
    return state


def resume_and_resave(checkpoint: Path, out: Path, nproc: int) -> Path:
    """The checkpoint resumed in ``nproc`` processes and written again without a step."""
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         str(HERE / "elastic_probe.py"), str(checkpoint), str(out)])
    resaved = out / "checkpoints" / checkpoint.name
    assert json.loads((resaved / "meta.json").read_text())["world_size"] == nproc
    assert not (checkpoint.parent / ".reshard").exists()  # the conversion is cleaned up
    return resaved


def assert_same_state(saved: Path, resaved: Path, scratch: Path) -> None:
    for part in (".", "disc"):
        expected = engine_state(saved, part, scratch / f"saved-{part}")
        got = engine_state(resaved, part, scratch / f"resaved-{part}")
        assert expected.keys() == got.keys() and len(expected) > 4, part
        for key, tensor in expected.items():
            assert torch.equal(got[key], tensor), f"{part}: {key}"
    ema, ema_again = load_file(saved / "ema.safetensors"), load_file(resaved / "ema.safetensors")
    assert ema.keys() == ema_again.keys() and all(torch.equal(ema[k], ema_again[k]) for k in ema)
    with weights_only_loads():
        assert torch.load(saved / "scheduler.bin") == torch.load(resaved / "scheduler.bin")
    meta = json.loads((saved / "meta.json").read_text())
    again = json.loads((resaved / "meta.json").read_text())
    assert meta["objective_state"] == again["objective_state"] and meta["state"] == again["state"]


def moved(run_dir: Path, out: Path, step: int, shards: Path, strategy: str, nproc: int) -> dict[int, dict]:
    """The run in ``run_dir`` continued from its checkpoint at ``step`` in ``nproc`` processes (a
    copy, so the original stays): its logged metrics by step."""
    shutil.copytree(run_dir, out)
    for later in (out / "checkpoints").glob("step_*"):
        if later.name > f"step_{step:08d}":
            shutil.rmtree(later)
    run([*train_command(out, shards, strategy, nproc), "--allow-config-change"])
    return logged(out)


def logged(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in rows}


def assert_same_losses(got: dict[int, dict], expected: dict[int, dict], steps: range) -> None:
    """Every loss and discriminator statistic of ``steps`` within 1e-3 relative: the same data in
    the same places and the same draws; only the order of float sums differs."""
    for step in steps:
        names = [name for name in expected[step] if name.startswith(("loss", "d_", "ada/", "grad_norm"))]
        assert len(names) >= 10, sorted(expected[step])
        for name in names:
            assert got[step][name] == pytest.approx(expected[step][name], rel=1e-3, abs=1e-6), (step, name)


@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero3"])
def test_a_checkpoint_resumes_with_another_world_size_to_the_state_it_saved(
        tmp_path: Path, tiny_shards: Path, strategy: str) -> None:
    """2 processes -> 1 -> 2 again: each resumed state, written out, is the state it came from;
    and the run moved 2 -> 1 at step 3 and 1 -> 2 at step 6 logs the never-moved run's losses."""
    run(train_command(tmp_path / "run", tiny_shards, strategy, 2))
    never_moved = logged(tmp_path / "run")
    moved_to_one = moved(tmp_path / "run", tmp_path / "to-one", STEPS, tiny_shards, strategy, 1)
    assert_same_losses(moved_to_one, never_moved, range(STEPS + 1, TOTAL + 1))
    back_to_two = moved(tmp_path / "to-one", tmp_path / "to-two", 2 * STEPS, tiny_shards, strategy, 2)
    assert_same_losses(back_to_two, never_moved, range(2 * STEPS + 1, TOTAL + 1))

    saved = tmp_path / "run" / "checkpoints" / f"step_{STEPS:08d}"
    in_one = resume_and_resave(saved, tmp_path / "one", 1)
    assert_same_state(saved, in_one, tmp_path / "2-1")
    in_two = resume_and_resave(in_one, tmp_path / "two", 2)
    assert_same_state(in_one, in_two, tmp_path / "1-2")
