"""One run per output folder: an exclusive lock file, ``<output_dir>/run.lock``.

Two runs writing one folder would corrupt each other (the second removes the first's half-written
checkpoint, their metrics.jsonl lines interleave). The main process of a run creates the lock
file atomically (``O_EXCL``) with its host, PID, process start time and Slurm job id, holds an
``flock`` on it while it runs, and removes it on exit. A lock left behind by a process that died
(SIGKILL, a lost node) is stale and taken over with a warning when:

- it names this host and its process is gone (the PID is not running, or runs another program:
  its start time differs), or
- it names this Slurm job (a requeued job runs again under its old id, perhaps on another node).

A lock held by a live run, or by another host's run that cannot be checked from here, is refused
with who holds it and how to remove it if that run is known to be gone.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LOCK_NAME = "run.lock"


class RunLockedError(RuntimeError):
    """The output folder belongs to another run that is (or may be) alive."""


def _process_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (/proc), None where it cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return fields[19] if len(fields) > 19 else None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    current = _process_start(pid)
    return start is None or current is None or current == start


def _owner() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "process_start": _process_start(os.getpid()),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _stale_reason(holder: dict[str, Any]) -> str | None:
    """Why the lock ``holder`` describes is stale, or None when its run may be alive."""
    job = os.environ.get("SLURM_JOB_ID")
    if job and holder.get("slurm_job_id") == job:
        return f"it was taken by an earlier start of this Slurm job ({job})"
    if holder.get("host") == socket.gethostname():
        pid = holder.get("pid")
        if not isinstance(pid, int) or not _alive(pid, holder.get("process_start")):
            return f"process {pid} on this host is gone"
    return None


class RunLock:
    """``with RunLock(folder):`` holds the folder for this process; raises RunLockedError if busy."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a stale lock is removed, then taken like a free one
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_or_refuse()
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, json.dumps(_owner()).encode())
            os.fsync(fd)
            self._fd = fd
            return
        raise RunLockedError(f"could not lock {self.path}: another run keeps taking it")

    def _take_over_or_refuse(self) -> None:
        try:
            holder = json.loads(self.path.read_text() or "{}")
        except FileNotFoundError:
            return  # released meanwhile
        except (OSError, ValueError):
            holder = {}  # half written by a process that died at once
        reason = _stale_reason(holder) if holder else "it is empty or unreadable"
        if reason is None or self._held_here():
            raise RunLockedError(
                f"{self.path.parent} is in use by another run (PID {holder.get('pid')} on host "
                f"{holder.get('host')}, Slurm job {holder.get('slurm_job_id') or 'none'}, since "
                f"{holder.get('started')}); stop that run or choose another run.output_dir. If it is "
                f"no longer running, delete {self.path}"
            )
        logger.warning("taking over the stale lock %s: %s", self.path, reason)
        self.path.unlink(missing_ok=True)

    def _held_here(self) -> bool:
        """Whether a live process on this machine holds the lock's flock (whatever its file says)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops a lock this probe took
        return False

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
