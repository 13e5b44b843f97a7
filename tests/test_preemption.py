"""Preemption without Slurm: a signal to a running ``advdit train`` checkpoints the current step and
exits with the preemption status; running the command again reproduces the uninterrupted losses."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from accelerate import Accelerator

from advdit.trainer.checkpointing.store import complete_checkpoints, read_meta
from advdit.trainer.loop import train
from advdit.trainer.runtime.preemption import PREEMPTED_EXIT_CODE, PreemptionGuard

from helpers import save_tiny_net, tiny_config, tiny_overrides

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


def signal_during_evaluation(out: Path, args: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``advdit train`` ``args``, send SIGUSR1 a second after step 2 is logged (the evaluation of
    step 2 is then under way); returns the finished process and the seconds it took to exit."""
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while len(metric_rows(out)) < 2:
        assert process.poll() is None and time.monotonic() < deadline, "the run did not reach step 2"
        time.sleep(0.02)
    time.sleep(1.0)
    process.send_signal(signal.SIGUSR1)
    signalled = time.monotonic()
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr), time.monotonic() - signalled


def assert_checkpointed_at_step_2(out: Path, done: subprocess.CompletedProcess) -> None:
    assert done.returncode == PREEMPTED_EXIT_CODE, done.stderr[-3000:]
    checkpoints = complete_checkpoints(out / "checkpoints")
    assert [path.name for path in checkpoints] == ["step_00000002"]
    assert read_meta(checkpoints[0])["stopped_by"] == "SIGUSR1"
    assert [row["step"] for row in metric_rows(out)] == [1, 2]


@pytest.mark.slow
def test_signal_during_a_sample_grid_stops_between_rows(tmp_path: Path, tiny_shards: Path) -> None:
    """An 8-row grid of 1000-step DDPM samples takes many seconds: the signal is honoured after
    the row being drawn, with a checkpoint of step 2 that records the signal, and no grid."""
    # The step is checkpointed before its grid (ckpt_every=2): the signal is noted in that checkpoint.
    args = [ADVDIT, "train", *tiny_overrides(tmp_path, tiny_shards), *SETTINGS, "train.sample_every=2",
            "train.ckpt_every=2", "sample.sampler=ddpm", "sample.steps=1000", "sample.grid_rows=8"]
    done, seconds = signal_during_evaluation(tmp_path, args)
    assert_checkpointed_at_step_2(tmp_path, done)
    assert "sample grid of step 2 abandoned" in done.stderr
    assert not (tmp_path / "samples" / "step_00000002.png").exists()
    drawn = re.search(r"abandoned: stopped by a signal after (\d) of 8 rows", done.stderr).group(1)
    print(f"\nSIGUSR1 1 s into an 8-row grid: checkpoint and exit 75 after {seconds:.1f} s, "
          f"{drawn} row(s) drawn")


@pytest.mark.slow
def test_signal_during_an_fid_evaluation_stops_between_batches(tmp_path: Path, tiny_shards: Path) -> None:
    weights, spec = save_tiny_net(tmp_path)
    out = tmp_path / "run"
    args = [ADVDIT, "train", *tiny_overrides(out, tiny_shards), *SETTINGS, "eval.fid_every=2",
            "eval.fid_samples=4000", "eval.batch_size=10", f"eval.reference={tiny_shards}",
            f"eval.inception_weights={weights}", f"eval.feature_net={spec}",
            f"eval.cache_dir={tmp_path / 'cache'}", "sample.steps=100"]
    done, seconds = signal_during_evaluation(out, args)
    assert_checkpointed_at_step_2(out, done)
    assert "FID at step 2 abandoned" in done.stderr
    assert not (out / "fid.jsonl").exists()
    rounds = re.search(r"after (\d+) of (\d+) rounds", done.stderr).groups()
    print(f"\nSIGUSR1 1 s into a 4000-sample FID: checkpoint and exit 75 after {seconds:.1f} s, "
          f"{rounds[0]} of {rounds[1]} rounds of batches drawn")


@pytest.mark.slow
def test_a_final_fid_cut_short_is_measured_when_the_run_is_resumed(tmp_path: Path, tiny_shards: Path) -> None:
    """The signal lands in the last step's final FID: the final checkpoint records it (so Slurm's
    job script requeues), and running the command again measures the final FID it lacks."""
    weights, spec = save_tiny_net(tmp_path)
    out = tmp_path / "run"
    args = [ADVDIT, "train", *tiny_overrides(out, tiny_shards), "train.steps=2", "eval.batch_size=10",
            f"eval.reference={tiny_shards}", f"eval.inception_weights={weights}", f"eval.feature_net={spec}",
            f"eval.cache_dir={tmp_path / 'cache'}", "sample.steps=100"]
    done, _ = signal_during_evaluation(out, [*args, "eval.final_fid_samples=4000"])
    assert_checkpointed_at_step_2(out, done)
    assert "FID at step 2 abandoned" in done.stderr
    again = subprocess.run([*args, "eval.final_fid_samples=20"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "fid.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2] and rows[0]["fid20"] > 0
