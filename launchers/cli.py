"""The ``advdit`` command line.

    advdit train --config configs/demo.yaml train.steps=200 [--resume auto|none|PATH]
    advdit train --config imagenet/base --config imagenet/256 --config methods/sadm
    advdit config show --config imagenet/base --config imagenet/512 data.batch_size=16
    advdit data demo --out data/demo
"""

from __future__ import annotations

import argparse
import errno
import faulthandler
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from ..trainer.checkpointing.store import CheckpointError
from ..trainer.config import ConfigError, dump_yaml, load_config
from ..trainer.data import DataError
from ..trainer.runtime.preemption import PREEMPTED_EXIT_CODE
from ..trainer.runtime.runlock import RunLockedError
from ..trainer.tracking import TrackingError
from .bench import add_training_bench_parser
from .data import add_data_parser
from .digits import add_digits_parser
from .fid import add_fid_parser
from .options import add_config_option
from .quality import add_quality_parser
from .relaunch import relaunch
from .sample import add_sample_parser
from .slurm import SlurmError, add_slurm_parser
from .toy import add_toy_parser

# Errors that describe a user's input; shown as one line instead of a traceback.
USER_ERRORS = (ConfigError, DataError, TrackingError, CheckpointError, FileNotFoundError, SlurmError,
               RunLockedError)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _train(args: argparse.Namespace) -> int:
    from ..trainer.loop import train
    from ..trainer.runtime.distributed import end_process_group

    if (status := relaunch(args.nproc)) is not None:
        return status
    cfg = load_config(args.config, args.overrides)
    try:
        result = train(cfg, resume=args.resume, allow_config_change=args.allow_config_change)
    finally:
        end_process_group()
    if result.preempted:  # on every rank, so launchers and the sbatch script see it
        if os.environ.get("RANK", "0") == "0":
            print(f"preempted at step {result.step}: checkpoint {result.checkpoint}; the same "
                  "command continues the run")
        return PREEMPTED_EXIT_CODE
    if os.environ.get("RANK", "0") != "0":
        return 0
    print(f"finished at step {result.step}; outputs in {result.output_dir}")
    if result.grid:
        print(f"sample grid: {result.grid}")
    if result.mlflow_run_id:
        print(f"MLflow run: {result.mlflow_run_id}")
    return 0


def _config_show(args: argparse.Namespace) -> int:
    print(dump_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def _export(args: argparse.Namespace) -> int:
    from ..trainer.checkpointing.export import export_diffusers, export_weights

    if args.format == "diffusers":
        out = export_diffusers(args.checkpoint, args.out, args.weights)
        print(f"wrote the {args.weights} weights of {args.checkpoint} as a diffusers DiTTransformer2DModel "
              f"folder {out} (with scheduler/); diffusers computes the timestep frequencies as advdit's "
              "model.timestep_freq_shift=1, see docs/pretrained.md")
        return 0
    out = export_weights(args.checkpoint, args.out, args.weights)
    print(f"wrote the {args.weights} weights of {args.checkpoint} to {out}")
    return 0


def _convert_checkpoint(args: argparse.Namespace) -> int:
    from ..trainer.checkpointing.store import convert_legacy

    for path in args.checkpoints:
        convert_legacy(path)
        print(f"converted {path}: ema.safetensors written, counters in meta.json, pickles removed")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="advdit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a DiT (plus adversarial objectives)")
    add_config_option(train)
    train.add_argument("--resume", default="auto",
                       help="auto: newest complete checkpoint of run.output_dir (default); "
                            "none: fresh start; or a checkpoint folder")
    train.add_argument("--nproc", type=int, default=1,
                       help="processes on this machine (one per GPU; on CPU they talk over gloo)")
    train.add_argument("--allow-config-change", action="store_true",
                       help="resume although the config differs from the checkpoint's")
    train.add_argument("overrides", nargs="*", metavar="key=value",
                       help="dotted overrides, e.g. train.steps=200 data.batch_size=64")
    train.set_defaults(func=_train)

    config = commands.add_parser("config", help="inspect configs")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    show = config_commands.add_parser(
        "show", help="print the resolved config (every key, validated) as YAML")
    add_config_option(show)
    show.add_argument("overrides", nargs="*", metavar="key=value",
                      help="dotted overrides, e.g. train.steps=200")
    show.set_defaults(func=_config_show)

    export = commands.add_parser("export", help="consolidate a checkpoint's denoiser into one file, or a "
                                                "diffusers model folder")
    export.add_argument("checkpoint", help="a checkpoint folder, e.g. runs/demo/checkpoints/step_00000700")
    export.add_argument("--out", required=True, help="the .safetensors file (advdit) or folder (diffusers)")
    export.add_argument("--weights", choices=("ema", "raw"), default="ema")
    export.add_argument("--format", choices=("advdit", "diffusers"), default="advdit",
                        help="advdit: one safetensors file with the run's config; diffusers: a "
                             "DiTTransformer2DModel folder (config.json, safetensors, scheduler/)")
    export.set_defaults(func=_export)

    checkpoint = commands.add_parser("checkpoint", help="maintain checkpoints")
    checkpoint_commands = checkpoint.add_subparsers(dest="checkpoint_command", required=True)
    convert = checkpoint_commands.add_parser(
        "convert", help="rewrite a checkpoint of the old pickled format (custom_checkpoint_*.pkl) "
                        "without pickles; its pickles are read with torch's weights-only loader")
    convert.add_argument("checkpoints", nargs="+", help="checkpoint folders, e.g. runs/x/checkpoints/step_*")
    convert.set_defaults(func=_convert_checkpoint)

    add_data_parser(commands)
    add_toy_parser(commands)
    add_quality_parser(commands)
    add_sample_parser(commands)
    add_fid_parser(commands)
    add_digits_parser(commands)
    add_training_bench_parser(commands)
    add_slurm_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    if not is_rank_of_many():
        return run_command(argv)
    # A rank that aborts or crashes in C++ prints every Python thread's stack instead of nothing.
    faulthandler.enable(all_threads=True)
    exit_without_teardown(run_command(argv))


def is_rank_of_many() -> bool:
    """Whether this process is one rank of a multi-process run (torchrun, accelerate launch and
    the Slurm script all set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def exit_without_teardown(status: int) -> NoReturn:
    """End a rank of a multi-process run once its command has returned, skipping the interpreter's
    teardown. By then the command has finished its work, closed its tracking and destroyed its
    process group. The teardown has nothing left to do but free C++ objects (gloo's, DeepSpeed's)
    in whatever order the interpreter reaches them; it aborted a rank now and then ("terminate
    called without an active exception", exit -6, after the run had finished and checkpointed),
    which torchrun then reported as a failed run."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def run_command(argv: Sequence[str] | None) -> int:
    """Parse ``argv`` and run its command; an error in the user's input becomes one line."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    # Overrides may stand anywhere, also after an option (argparse alone stops collecting them).
    args, extra = parser.parse_known_args(argv)
    stray = [arg for arg in extra if arg.startswith("-") or "=" not in arg or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args)
    except USER_ERRORS as err:
        print(f"advdit: error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # training diverged; the last good checkpoint is kept
        print(f"advdit: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        if err.errno not in DISK_FULL:
            raise
        print(f"advdit: error: disk full writing {err.filename or 'a file'} ({err.strerror}); free "
              "space there and run the command again", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
