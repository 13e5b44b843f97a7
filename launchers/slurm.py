"""``advdit slurm submit | status | logs``: training as a requeueable multi-node Slurm job.

``submit`` validates the config (a mistake is reported before anything is queued), renders
``slurm/train.sbatch`` and hands it to ``sbatch`` (``--dry-run`` prints it instead). The script
runs one srun task per node, and each task starts its node's processes through ``accelerate
launch`` with torch's standard launcher; on SIGUSR1 the trainer checkpoints and exits
(trainer/runtime/preemption.py) and the script requeues the job unless the run reached its final step.
Every submission is recorded in ``<output_dir>/slurm/jobs.jsonl``, with its script
(``<job id>.sbatch``) and log (``<job id>.out``) beside it; ``status`` and ``logs`` read them.

Paths in the config and in the rendered script are relative to the job's working folder
(``--chdir``, by default the folder ``submit`` runs in), as they are for ``advdit train`` there.
See docs/slurm.md.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..trainer.checkpointing.store import checkpoint_dir
from ..trainer.config import Config, ConfigError, control_character, load_config, package_folder
from .options import add_config_option

# slurm/train.sbatch of the repository, shipped as package data.
TEMPLATE = ("advdit.slurm", "train.sbatch")
# JobSpec fields whose command-line option is not simply the field's name with dashes.
OPTION_OF_FIELD = {"sbatch_options": "--sbatch-option", "srun_options": "--srun-option"}
PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
JOBS = "jobs.jsonl"


class SlurmError(RuntimeError):
    """A Slurm command failed or is missing, or a run folder has no jobs; the message says which."""


@dataclass
class JobSpec:
    """What the sbatch script asks Slurm for, besides the training command."""

    nodes: int = 1
    gpus_per_node: int = 8
    procs_per_node: int | None = None  # default: one per GPU, one on a CPU-only node
    cpus_per_task: int | None = None  # default: (data.num_workers + 1) per process
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    job_name: str | None = None  # default: run.name
    chdir: str | None = None
    signal_seconds: int = 300
    setup: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    sbatch_options: list[str] = field(default_factory=list)
    srun_options: list[str] = field(default_factory=list)
    # Resume a checkpoint whose config differs (e.g. data.batch_size after a move to more nodes).
    allow_config_change: bool = False

    def processes_per_node(self) -> int:
        return self.procs_per_node or max(self.gpus_per_node, 1)

    def check(self) -> None:
        at_least_one = {"--nodes": self.nodes, "--procs-per-node": self.processes_per_node(),
                        "--signal-seconds": self.signal_seconds, "--cpus-per-task": self.cpus_per_task or 1}
        for option, value in at_least_one.items():
            if value < 1:
                raise ConfigError(f"{option} must be at least 1, got {value}")
        if self.gpus_per_node < 0:
            raise ConfigError(f"--gpus-per-node must be 0 (CPU nodes) or more, got {self.gpus_per_node}")
        self._check_printable()
        for item in self.env:
            name, sep, _ = item.partition("=")
            if not sep or not name.isidentifier():
                raise ConfigError(f"--env {item!r}: expected NAME=VALUE, e.g. NCCL_SOCKET_IFNAME=eth0")


    def _check_printable(self) -> None:
        """Every value that reaches the script is one line of printable text: a newline in, say,
        a job name would end its #SBATCH line and run the rest as a command."""
        for name, value in vars(self).items():
            flag = OPTION_OF_FIELD.get(name, "--" + name.replace("_", "-"))
            for item in value if isinstance(value, list) else [value]:
                check_printable(flag, item)


def check_printable(key: str, value: object) -> None:
    """Refuse a string with a control character, naming ``key``."""
    if isinstance(value, str) and (bad := control_character(value)):
        raise ConfigError(f"{key} holds the control character {bad!r} ({value!r}); values that go into "
                          "the job script must be printable text")


def job_folder(spec: JobSpec) -> Path:
    """The job's working folder, against which the config's relative paths are read."""
    return Path(spec.chdir or ".")


def read_config(spec: JobSpec, configs: list[str], overrides: list[str]) -> Config:
    """The validated config, read as the job will read it: config files relative to its working
    folder (else presets of advdit, by name), in order, then the overrides."""
    spec.check()
    for config in configs:
        check_printable("--config", config)
    for override in overrides:
        check_printable("the override", override)
    return load_config(configs, overrides, folder=Path(spec.chdir) if spec.chdir else None)


def final_checkpoint_name(cfg: Config) -> str:
    # trainer/checkpointing/store.py names checkpoint folders step_<8 digits>; the last step always saves.
    return f"step_{cfg.train.steps:08d}"


def _directives(spec: JobSpec, cfg: Config) -> str:
    cpus = spec.cpus_per_task or spec.processes_per_node() * (cfg.data.num_workers + 1)
    options = [f"--job-name={spec.job_name or cfg.run.name}", f"--nodes={spec.nodes}",
               "--ntasks-per-node=1", f"--cpus-per-task={cpus}"]
    if spec.gpus_per_node:
        options.append(f"--gpus-per-node={spec.gpus_per_node}")
    for name in ("time", "partition", "account", "qos", "constraint", "chdir"):
        if getattr(spec, name):
            options.append(f"--{name}={getattr(spec, name)}")
    options += [f"--output={Path(cfg.run.output_dir) / 'slurm'}/%j.out", "--open-mode=append",
                "--requeue", f"--signal=B:USR1@{spec.signal_seconds}", *spec.sbatch_options]
    return "\n".join(f"#SBATCH {shlex.quote(option)}" for option in options)


def _launch_command(spec: JobSpec, cfg: Config, configs: list[str], overrides: list[str]) -> str:
    """``accelerate launch`` of ``advdit train`` on one node (what every srun task runs)."""
    total = spec.nodes * spec.processes_per_node()
    precision = cfg.train.mixed_precision
    if precision == "auto":  # what the trainer will pick; it passes its choice to the Accelerator
        precision = "bf16" if spec.gpus_per_node else "no"
    launcher = ["accelerate", "launch", "--num_machines", str(spec.nodes), "--num_processes", str(total),
                "--mixed_precision", precision, "--dynamo_backend", "no"]
    if total > 1:
        # torch's standard launcher (torchrun) on every node, for every strategy: the trainer sets
        # up DeepSpeed itself (trainer/runtime/engines.py), so accelerate's DeepSpeed launch path, whose
        # multi-node default (pdsh) fails under srun, is not needed. On CPU nodes ranks use gloo.
        launcher.append("--multi_gpu")
    rendezvous = ('--machine_rank "$SLURM_NODEID" --main_process_ip "$MASTER_ADDR" '
                  '--main_process_port "$MASTER_PORT"')
    config_options = [word for config in configs for word in ("--config", config)]
    allow = ["--allow-config-change"] if spec.allow_config_change else []
    train = ["-m", "advdit.launchers.cli", "train", *config_options, *allow, *overrides]
    return f"{shlex.join(launcher)} \\\n        {rendezvous} \\\n        {shlex.join(train)}"


def _setup(spec: JobSpec) -> str:
    if spec.setup:
        return "\n".join(spec.setup)
    bin_dir = shlex.quote(str(Path(sys.executable).parent))
    return f"# The Python environment advdit slurm submit ran in.\nexport PATH={bin_dir}:\"$PATH\""


def render_script(spec: JobSpec, cfg: Config, configs: list[str], overrides: list[str]) -> str:
    """The sbatch script of this job: slurm/train.sbatch filled in."""
    exports = []
    for item in spec.env:
        name, _, value = item.partition("=")
        exports.append(f"export {name}={shlex.quote(value)}")
    values = {
        "directives": _directives(spec, cfg),
        "procs_per_node": str(spec.processes_per_node()),
        "setup": _setup(spec),
        "environment": "\n".join(exports) or "# (none)",
        "checkpoints": shlex.quote(str(checkpoint_dir(cfg.run.output_dir))),
        "final_checkpoint": final_checkpoint_name(cfg),
        "launch": _launch_command(spec, cfg, configs, overrides),
        "srun_options": "".join(f" {shlex.quote(option)}" for option in spec.srun_options),
    }
    template = (package_folder(TEMPLATE[0]) / TEMPLATE[1]).read_text()
    return PLACEHOLDER.sub(lambda match: values[match.group(1)], template)


def slurm_command(command: list[str], stdin: str | None = None) -> str:
    """Run a Slurm client command; its stdout, or a SlurmError with its message."""
    try:
        done = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=120)
    except FileNotFoundError as err:
        raise SlurmError(f"{command[0]} not found: Slurm's commands are not on PATH here "
                         "(--dry-run prints the script without submitting it)") from err
    if done.returncode != 0:
        message = " ".join((done.stderr or done.stdout).split())
        raise SlurmError(f"{command[0]} failed ({done.returncode}): {message}")
    return done.stdout


def submit(spec: JobSpec, cfg: Config, script: str) -> dict[str, Any]:
    """Queue ``script``; returns the record appended to ``<output_dir>/slurm/jobs.jsonl``."""
    folder = (job_folder(spec) / cfg.run.output_dir / "slurm").resolve()
    folder.mkdir(parents=True, exist_ok=True)  # Slurm would not create the log's folder
    job_id = slurm_command(["sbatch", "--parsable"], stdin=script).strip().split(";")[0]
    (folder / f"{job_id}.sbatch").write_text(script)
    record = {"job_id": job_id, "submitted": time.strftime("%Y-%m-%d %H:%M:%S"),
              "script": str(folder / f"{job_id}.sbatch"), "log": str(folder / f"{job_id}.out"),
              "train_steps": cfg.train.steps, "nodes": spec.nodes,
              "procs_per_node": spec.processes_per_node()}
    with (folder / JOBS).open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    return record


# ---------------------------------------------------------------------- status and logs
def job_record(run_dir: Path, job_id: str | None = None) -> dict[str, Any]:
    """The submission record of ``job_id`` (default: the newest job) from ``run_dir``."""
    path = run_dir / "slurm" / JOBS
    if not path.is_file():
        raise SlurmError(f"no Slurm jobs were submitted for run folder {run_dir} ({path} does not "
                         "exist); pass the run.output_dir of a submitted run")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if job_id is None:
        return records[-1]
    for record in records:
        if record["job_id"] == job_id:
            return record
    known = ", ".join(record["job_id"] for record in records)
    raise SlurmError(f"job {job_id} was not submitted for {run_dir} (its jobs: {known})")


def job_state(job_id: str) -> dict[str, str] | None:
    """``scontrol show job`` as a dict, or None when Slurm does not know the job (any more)."""
    try:
        text = slurm_command(["scontrol", "show", "job", "--oneliner", job_id])
    except SlurmError:
        return None
    return dict(item.split("=", 1) for item in text.split() if "=" in item)


def last_logged_step(run_dir: Path) -> int | None:
    """The step of the last line of ``metrics.jsonl`` (read from the end: the file grows long)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    with path.open("rb") as handle:
        handle.seek(max(handle.seek(0, 2) - 65536, 0))
        lines = handle.read().splitlines()
    for line in reversed(lines):
        try:
            return json.loads(line)["step"]
        except (ValueError, KeyError):
            continue  # a line cut by the seek, or one being written
    return None


def status_lines(run_dir: Path, job_id: str | None = None) -> list[str]:
    record = job_record(run_dir, job_id)
    state = job_state(record["job_id"])
    if state is None:
        lines = [f"job {record['job_id']}: not known to Slurm now (it ended longer ago than the "
                 "cluster's MinJobAge, or Slurm is not reachable from here)"]
    else:
        reason, nodes = state.get("Reason", "None"), state.get("NodeList", "")
        lines = [f"job {record['job_id']}: {state.get('JobState')}"
                 + ("" if reason == "None" else f" ({reason})")
                 + ("" if nodes in ("", "(null)") else f" on {nodes}, run time {state.get('RunTime')}")
                 + f", restarts {state.get('Restarts', '0')}"]
    checkpoints = checkpoint_dir(run_dir)
    latest = checkpoints / "latest"
    newest = latest.read_text().strip() if latest.is_file() else "none yet"
    step = last_logged_step(run_dir)
    lines += [
        f"log:         {record['log']}",
        f"script:      {record['script']}",
        f"checkpoints: {checkpoints} (newest: {newest})",
        f"step:        {'none logged yet' if step is None else step} of {record['train_steps']}",
    ]
    return lines


def log_tail(run_dir: Path, job_id: str | None, lines: int) -> str:
    log = Path(job_record(run_dir, job_id)["log"])
    if not log.is_file():
        return f"(no log yet at {log}: the job has not started)"
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


# ---------------------------------------------------------------------- command line
def _spec(args: argparse.Namespace) -> JobSpec:
    return JobSpec(nodes=args.nodes, gpus_per_node=args.gpus_per_node, procs_per_node=args.procs_per_node,
                   cpus_per_task=args.cpus_per_task, time=args.time, partition=args.partition,
                   account=args.account, qos=args.qos, constraint=args.constraint,
                   job_name=args.job_name, chdir=args.chdir, signal_seconds=args.signal_seconds,
                   setup=args.setup, env=args.env, sbatch_options=args.sbatch_option,
                   srun_options=args.srun_option, allow_config_change=args.allow_config_change)


def _submit(args: argparse.Namespace) -> int:
    spec = _spec(args)
    cfg = read_config(spec, args.config, args.overrides)
    script = render_script(spec, cfg, args.config, args.overrides)
    if args.dry_run:
        print(script, end="")
        return 0
    record = submit(spec, cfg, script)
    print(f"submitted job {record['job_id']}: {spec.nodes} node(s) x {spec.processes_per_node()} "
          f"process(es); log {record['log']}")
    return 0


def _status(args: argparse.Namespace) -> int:
    print("\n".join(status_lines(Path(args.run_dir), args.job)))
    return 0


def _logs(args: argparse.Namespace) -> int:
    print(log_tail(Path(args.run_dir), args.job, args.lines))
    return 0


def _add_submit_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("submit", help="render the sbatch script of a training run and queue it")
    add_config_option(parser, relative_to="the job's folder, --chdir")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8, help="0 for CPU-only nodes (default 8)")
    parser.add_argument("--procs-per-node", type=int,
                        help="training processes per node (default: one per GPU, or 1)")
    parser.add_argument("--cpus-per-task", type=int,
                        help="CPUs of each node's task (default: (data.num_workers + 1) per process)")
    parser.add_argument("--time", help="time limit, e.g. 24:00:00")
    for name in ("partition", "account", "qos", "constraint"):
        parser.add_argument(f"--{name}")
    parser.add_argument("--job-name", help="default: run.name")
    parser.add_argument("--chdir", help="the job's working folder (default: this one)")
    parser.add_argument("--signal-seconds", type=int, default=300,
                        help="SIGUSR1 this long before the time limit: time to finish a step and "
                             "write a checkpoint (default 300)")
    parser.add_argument("--setup", action="append", default=[], metavar="LINE",
                        help="a shell line run before training, e.g. 'module load cuda/12.4' or "
                             "'source /shared/advdit/.venv/bin/activate' (repeatable; default: put "
                             "this Python environment first on PATH)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="an exported variable, e.g. NCCL_SOCKET_IFNAME=ib0 (repeatable)")
    parser.add_argument("--sbatch-option", action="append", default=[], metavar="OPTION",
                        help="an extra #SBATCH option, e.g. --exclusive or --mem=0 (repeatable)")
    parser.add_argument("--srun-option", action="append", default=[], metavar="OPTION",
                        help="an extra srun option, e.g. --container-image=... (repeatable)")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume a checkpoint whose config differs (advdit train's flag), e.g. a smaller "
                             "data.batch_size after moving to more nodes")
    parser.add_argument("--dry-run", action="store_true", help="print the script instead of submitting it")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    parser.set_defaults(func=_submit)


def add_slurm_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``advdit slurm submit | status | logs``."""
    slurm = commands.add_parser("slurm", help="train as a requeueable Slurm job (docs/slurm.md)")
    slurm_commands = slurm.add_subparsers(dest="slurm_command", required=True)
    _add_submit_parser(slurm_commands)
    for name, handler, text in (("status", _status, "state, log, checkpoints and step of a run's job"),
                                ("logs", _logs, "the end of a run's job log")):
        parser = slurm_commands.add_parser(name, help=text)
        parser.add_argument("run_dir", help="the run's folder (run.output_dir)")
        parser.add_argument("--job", help="a job id (default: the newest job of the run)")
        if name == "logs":
            parser.add_argument("-n", "--lines", type=int, default=40)
        parser.set_defaults(func=handler)
    return slurm
