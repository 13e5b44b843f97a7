"""--nproc: train, sample and fid rerun themselves through torchrun, without their --nproc."""

from __future__ import annotations

import sys

import pytest

from advdit.launchers import relaunch as relaunch_module
from advdit.launchers.relaunch import relaunch


def test_relaunch_runs_torchrun_without_nproc(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["advdit", "sample", "ckpt", "--nproc", "4", "--npz", "a.npz", "--nproc=4"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(relaunch_module.subprocess, "call", lambda command: calls.append(command) or 7)
    assert relaunch(4) == 7
    (command,) = calls
    assert command == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
                       "-m", "advdit.launchers.cli", "sample", "ckpt", "--npz", "a.npz"]


@pytest.mark.parametrize(("nproc", "world_size"), [(1, None), (4, "4")])
def test_no_relaunch_for_one_process_or_under_torchrun(monkeypatch: pytest.MonkeyPatch, nproc: int,
                                                        world_size: str | None) -> None:
    if world_size is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world_size)
    monkeypatch.setattr(relaunch_module.subprocess, "call", lambda command: pytest.fail(f"ran {command}"))
    assert relaunch(nproc) is None
