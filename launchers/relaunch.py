"""``--nproc N`` of ``advdit train``, ``sample`` and ``fid``: the same command rerun in N processes
on this machine through torchrun, which sets WORLD_SIZE (so the processes it starts run the
command themselves)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence


def relaunch(nproc: int) -> int | None:
    """torchrun's exit status after running this command (``sys.argv``, its --nproc removed) in
    ``nproc`` processes; None where the command should run in this process: one process asked for,
    or already started by torchrun."""
    if nproc <= 1 or "WORLD_SIZE" in os.environ:
        return None
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "advdit.launchers.cli", *without_nproc(sys.argv[1:])]
    return subprocess.call(command)


def without_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc N`` or ``--nproc=N``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out
