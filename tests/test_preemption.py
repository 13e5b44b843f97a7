"""Preemption without Slurm: a signal to a running ``advdit train`` checkpoints the current step and
exits with the preemption status; running the command again reproduces the uninterrupted losses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from accelerate import Accelerator

from advdit.trainer.checkpoint import complete_checkpoints, read_meta
from advdit.trainer.loop import train
from advdit.trainer.preemption import PREEMPTED_EXIT_CODE, PreemptionGuard

from helpers import tiny_config, tiny_overrides

ADVDIT = str(Path(sys.executable).with_name("advdit"))
# Long enough that the signal lands mid-run at any speed; checkpoints only from the signal and the end.
STEPS = 40
SETTINGS = (f"train.steps={STEPS}", "train.ckpt_every=1000")


def test_guard_catches_a_signal_and_restores_the_handlers() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    guard = PreemptionGuard(Accelerator(cpu=True))
    with guard:
        assert not guard.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert guard.should_stop() and guard.stopped_by == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before


def metric_rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def assert_signal_checkpoints_the_current_step(out: Path, shards: Path, signum: signal.Signals) -> None:
    """Start ``advdit train``, send ``signum`` after its second step: it checkpoints the step it is
    at and exits with the preemption status."""
    process = subprocess.Popen([ADVDIT, "train", *tiny_overrides(out, shards), *SETTINGS],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 300
    while len(metric_rows(out)) < 2:
        assert process.poll() is None, "the run ended before its second step"
        assert time.monotonic() < deadline, "no second step within the time limit"
        time.sleep(0.02)
    process.send_signal(signum)
    stdout, _ = process.communicate(timeout=300)
    assert process.returncode == PREEMPTED_EXIT_CODE
    stopped_at = metric_rows(out)[-1]["step"]
    assert 2 <= stopped_at < STEPS
    checkpoints = complete_checkpoints(out / "checkpoints")
    assert [path.name for path in checkpoints] == [f"step_{stopped_at:08d}"]
    assert read_meta(checkpoints[0])["stopped_by"] == signum.name
    assert f"preempted at step {stopped_at}: checkpoint" in stdout


@pytest.mark.slow
def test_sigusr1_checkpoints_exits_and_resumes_to_the_same_losses(tmp_path: Path, tiny_shards: Path) -> None:
    whole = train(tiny_config(tmp_path / "whole", tiny_shards, *SETTINGS), progress=False)
    out = tmp_path / "preempted"
    assert_signal_checkpoints_the_current_step(out, tiny_shards, signal.SIGUSR1)
    done = subprocess.run([ADVDIT, "train", *tiny_overrides(out, tiny_shards), *SETTINGS],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = metric_rows(out)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))  # each step once: no gap, no repeat
    for got, want in zip(rows, whole.history, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6, abs=1e-7), got["step"]


@pytest.mark.slow
def test_sigterm_checkpoints_the_current_step_too(tmp_path: Path, tiny_shards: Path) -> None:
    assert_signal_checkpoints_the_current_step(tmp_path, tiny_shards, signal.SIGTERM)
