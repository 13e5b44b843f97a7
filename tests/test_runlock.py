"""One run per output folder: a second run is refused while the first runs, stale locks (a dead
process on this host, an earlier start of the same Slurm job) are taken over, the lock goes at exit."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from advdit.trainer.loop import train
from advdit.trainer.runtime.runlock import LOCK_NAME, RunLock, RunLockedError

from helpers import tiny_config, tiny_overrides

ADVDIT = str(Path(sys.executable).with_name("advdit"))


def write_lock(folder: Path, **holder: object) -> None:
    """A lock file as a run that is gone left it: its content, and no process holding it."""
    folder.mkdir(parents=True, exist_ok=True)
    record = {"host": socket.gethostname(), "pid": 999999, "slurm_job_id": None, "started": "earlier"}
    (folder / LOCK_NAME).write_text(json.dumps({**record, **holder}))


def test_lock_refuses_a_second_holder_and_is_released(tmp_path: Path) -> None:
    with RunLock(tmp_path):
        holder = json.loads((tmp_path / LOCK_NAME).read_text())
        assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid()
        with pytest.raises(RunLockedError, match=rf"in use by another run \(PID {os.getpid()}"):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_NAME).exists()
    with RunLock(tmp_path):  # free again
        pass


def test_a_killed_holder_leaves_a_lock_that_is_taken_over(tmp_path: Path, tiny_shards: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """A real second process holds the lock: refused, whatever its file says; once that process
    is SIGKILLed (no clean-up), the next run takes the lock over with a warning."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    (tmp_path / LOCK_NAME).write_text("garbage")  # the flock, not the content, decides on this host
    with pytest.raises(RunLockedError, match="held by a live process on this host"):
        RunLock(tmp_path).acquire()
    holder.kill()
    holder.wait()
    write_lock(tmp_path, pid=holder.pid)
    caplog.set_level(logging.WARNING)
    result = train(tiny_config(tmp_path, tiny_shards, "train.steps=2"), progress=False)
    assert result.step == 2
    assert f"left by PID {holder.pid}" in caplog.text and "no process holds it any more" in caplog.text
    assert not (tmp_path / LOCK_NAME).exists()


HOLD = """
import sys, time
from advdit.trainer.runtime.runlock import RunLock
lock = RunLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_lock_of_another_host_is_refused_unless_an_earlier_start_of_this_job(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_lock(tmp_path, host="node-elsewhere", pid=4242, slurm_job_id="77", slurm_restart_count=0)
    with pytest.raises(RunLockedError, match=rf"host node-elsewhere.*delete {tmp_path / LOCK_NAME}"):
        RunLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    with pytest.raises(RunLockedError):
        RunLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "77")  # the same job, same start: another step of it
    with pytest.raises(RunLockedError):
        RunLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the job requeued onto another node
    with RunLock(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["slurm_restart_count"] == 1


@pytest.mark.slow
def test_second_run_on_the_same_folder_is_refused_and_the_first_is_untouched(tmp_path: Path,
                                                                             tiny_shards: Path) -> None:
    args = [ADVDIT, "train", *tiny_overrides(tmp_path, tiny_shards), "train.steps=300", "train.ckpt_every=50"]
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert first.poll() is None and time.monotonic() < deadline, "the first run did not start"
        time.sleep(0.05)
    # Paused while the second run starts, so the first surely still holds the folder (a tiny run
    # could otherwise finish its 300 steps before the second has imported torch).
    os.kill(first.pid, signal.SIGSTOP)
    try:
        second = subprocess.run(args, capture_output=True, text=True, timeout=300)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 2
    message = second.stderr.strip().splitlines()[-1]
    assert message.startswith(f"advdit: error: {tmp_path} is in use by another run (PID {first.pid} on host")
    _, errors = first.communicate(timeout=600)
    assert first.returncode == 0, errors[-2000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 301))  # one run's rows, each once
    assert not (tmp_path / LOCK_NAME).exists()
