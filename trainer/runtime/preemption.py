"""Preemption: stop after the current step, checkpoint on every rank and exit, when told to.

Slurm warns a job ``--signal=B:USR1@<seconds>`` before its time limit (slurm/train.sbatch forwards
the signal to the training processes) and sends SIGTERM when it cancels or preempts one, with
``KillWait`` seconds (30 by default) before SIGKILL. Either signal only sets a flag here. After
each step the loop calls :meth:`PreemptionGuard.should_stop`: one all-reduce (MAX) of the signal
number, so a signal that reached any rank stops every rank after the same step; the loop then logs,
checkpoints and returns, and the command exits with :data:`PREEMPTED_EXIT_CODE`. Running the same
command again (``--resume auto``) continues exactly from that checkpoint.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
# EX_TEMPFAIL (sysexits.h): stopped early with a checkpoint; the same command continues the run.
PREEMPTED_EXIT_CODE = 75


class PreemptionGuard:
    """Signal handlers for :data:`SIGNALS` while the block runs (``with guard: ...``), and the
    per-step agreement between ranks on whether to stop."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        self.received = 0  # the signal number this process caught, 0 for none
        self.stopped_by: str | None = None  # the signal's name, once the ranks agreed to stop
        self._previous: dict[int, Any] = {}
        self._group: Any = None

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():  # Python allows no other
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._catch)
        if self.accelerator.num_processes > 1 and dist.get_backend() != "gloo":
            # The flag is a CPU tensor: on NCCL it travels on a gloo group of its own, so the
            # check never waits for the GPU's queue of work.
            self._group = dist.new_group(backend="gloo")
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _catch(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: the step in progress finishes, and the loop decides at its end.
        self.received = self.received or signum

    @property
    def stopped(self) -> bool:
        return self.stopped_by is not None

    def should_stop(self) -> bool:
        """Whether any rank caught a signal; the same answer on every rank (a collective with more
        than one process: every rank calls it after the same steps)."""
        received = self.max_over_ranks(self.received)
        if received:
            self.stopped_by = signal.Signals(received).name
            logger.warning("%s received: checkpointing after this step and exiting", self.stopped_by)
        return bool(received)

    def max_over_ranks(self, value: int) -> int:
        """The largest ``value`` of all ranks, on every rank (a collective with more than one
        process, on the guard's CPU group, so it never waits for the GPU)."""
        if self.accelerator.num_processes == 1:
            return value
        flag = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return int(flag.item())
