"""One run per output folder: an exclusive lock on ``<output_dir>/run.lock``.

Two runs writing one folder would corrupt each other (the second removes the first's half-written
checkpoint, their metrics.jsonl lines interleave). The main process of a run holds an ``flock`` on
the lock file while it runs and writes its host, PID, Slurm job id and restart count into it.

- A lock held on this host is refused: the flock answers for it, whatever the file says. A lock
  whose process died (SIGKILL, a lost node) holds no flock any more and is simply taken.
- A file naming another host is trusted as written, because an flock may not reach across hosts
  (NFS mounted with local locks): it is refused, unless it was written by an earlier start of
  this same Slurm job (same job id, lower restart count: a requeued job may land on another node).
  Its message says which file to delete if that run is known to be gone.

The file is never unlinked by anyone but its holder, and only while it is the file the holder
locked, so two starters can never both believe they hold it.
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
    """The output folder belongs to another run that is (or may be) alive, or cannot be locked."""


def _owner() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _earlier_start_of_this_job(holder: dict[str, Any]) -> bool:
    job = os.environ.get("SLURM_JOB_ID")
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    return bool(job) and holder.get("slurm_job_id") == job and holder.get("slurm_restart_count", 0) < restarts


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
        try:
            self._acquire()
        except OSError as err:
            raise RunLockedError(f"cannot lock {self.path}: {err.strerror or err}") from err

    def _acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._refusal(self._holder(), "it is held by a live process on this host") from None
            if self._same_file(fd):
                break
            os.close(fd)  # its holder released (unlinked) it between our open and our flock: again
        holder = self._holder()
        if holder and holder.get("host") != socket.gethostname() and not _earlier_start_of_this_job(holder):
            os.close(fd)
            raise self._refusal(holder, "its host cannot be checked from here")
        if holder:
            logger.warning("taking over %s, left by PID %s on %s (no process holds it any more)",
                           self.path, holder.get("pid"), holder.get("host"))
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(_owner()).encode())
        os.fsync(fd)
        self._fd = fd

    def _same_file(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _holder(self) -> dict[str, Any]:
        try:
            holder = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _refusal(self, holder: dict[str, Any], why: str) -> RunLockedError:
        return RunLockedError(
            f"{self.path.parent} is in use by another run (PID {holder.get('pid', '?')} on host "
            f"{holder.get('host', '?')}, Slurm job {holder.get('slurm_job_id') or 'none'}, since "
            f"{holder.get('started', '?')}; {why}); stop that run or choose another run.output_dir. "
            f"If it is no longer running, delete {self.path}"
        )

    def release(self) -> None:
        if self._fd is None:
            return
        if self._same_file(self._fd):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None
