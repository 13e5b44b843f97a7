"""Run by tests/test_checkpoint_safety.py under torchrun with 2 processes: rank 0's part of a
checkpoint fails to write (ENOSPC); both ranks must get an error rather than wait for each other.
Each rank writes what happened to FOLDER/rank<r>.txt."""

from __future__ import annotations

import errno
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from advdit.trainer.checkpointing.store import Checkpointed, CheckpointError, TrainState, save_checkpoint
from advdit.trainer.ema import EMA


class PartThatFailsOnRankZero:
    """An adversary's share of the checkpoint whose write hits a full disk on rank 0 only."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def save_state(self, path: str) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            raise OSError(errno.ENOSPC, "No space left on device", path)


def main(folder: str) -> None:
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(torch.nn.Linear(4, 4), torch.optim.SGD([torch.zeros(1)], lr=0.1))
    ema = EMA(accelerator.unwrap_model(model), 0.9)
    content = Checkpointed(accelerator, {"disc": PartThatFailsOnRankZero(accelerator.process_index)}, ema,
                           TrainState())
    outcome = "saved"
    try:
        save_checkpoint(content, folder, 1, {}, keep_last=2, estimate=1 << 20)
    except CheckpointError as err:
        outcome = str(err)
    (Path(folder) / f"rank{accelerator.process_index}.txt").write_text(outcome)


if __name__ == "__main__":
    main(sys.argv[1])
