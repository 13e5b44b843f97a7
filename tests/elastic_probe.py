"""Run by tests/test_elastic.py under torchrun: resume the checkpoint CHECKPOINT in this many
processes, with the config it records, and write the state it resumed, without a training step,
as a checkpoint under OUT (so the test can compare it with the one it came from)."""

from __future__ import annotations

import sys
from pathlib import Path

from advdit.trainer.checkpointing.store import read_meta, resume_from, save_checkpoint
from advdit.trainer.config import load_config, unflatten
from advdit.trainer.loop import Trainer
from advdit.trainer.runtime.distributed import end_process_group


def main(checkpoint: str, out: str) -> None:
    recorded = read_meta(Path(checkpoint))["config"]
    cfg = load_config(None, base=unflatten(recorded))
    trainer = Trainer(cfg, resume=checkpoint, progress=False)
    trainer.build()
    content = trainer.checkpointer.content
    resume_from(content, checkpoint, cfg.run.output_dir, trainer._check_resumed_config)
    meta = {"world_size": trainer.accelerator.num_processes, "config": recorded}
    save_checkpoint(content, out, trainer.state.step, meta, keep_last=1, estimate=1 << 20)
    end_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
