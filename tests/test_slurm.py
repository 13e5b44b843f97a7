"""``advdit slurm``: the rendered script, and real jobs on a two-node Slurm cluster on this host
(tests/slurm_cluster.py; skipped with the reason where Slurm cannot be installed).

On the cluster: a 2-node ZeRO-2 CPU job trains the tiny config to its end; the same job preempted
mid-run with ``scancel --signal=USR1 --batch`` checkpoints, requeues itself, resumes and ends with
the uninterrupted job's per-step losses, in one MLflow run; an invalid config is refused before
anything is queued.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster, slurm_cluster_fixture  # noqa: F401 - the fixture

from advdit.launchers.cli import main

from helpers import tiny_overrides

ADVDIT = str(Path(sys.executable).with_name("advdit"))
DOCS = Path(__file__).resolve().parent.parent / "docs" / "slurm.md"
STEPS = 40
JOB_TIMEOUT = 900.0  # seconds; a job start costs about a minute of imports on 2 shared cores


# ---------------------------------------------------------------------- rendering (no Slurm needed)
def rendered(capsys: pytest.CaptureFixture, args: list[str]) -> str:
    assert main(["slurm", "submit", "--dry-run", *args]) == 0
    return capsys.readouterr().out


def test_a_job_moved_to_more_nodes_may_resume_with_a_smaller_per_process_batch(
        capsys: pytest.CaptureFixture) -> None:
    script = rendered(capsys, ["--nodes", "8", "--allow-config-change", "--config", "imagenet256_dit_xl2_dit",
                               "data.batch_size=4"])
    launch = shlex.split(re.search(r"exec (accelerate launch .*?)\n\}", script, re.DOTALL).group(1)
                         .replace("\\\n", " "))
    assert launch[launch.index("--num_processes") + 1] == "64"
    preset = "imagenet256_dit_xl2_dit"
    assert launch[-4:] == ["--config", preset, "--allow-config-change", "data.batch_size=4"]
    assert "--allow-config-change" not in rendered(capsys, ["--nodes", "4", "--config", preset])


def test_dry_run_renders_a_requeueable_four_node_job(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    script = rendered(capsys, ["--nodes", "4", "--gpus-per-node", "8", "--time", "24:00:00",
                               "--partition", "gpu", "--env", "NCCL_SOCKET_IFNAME=ib0",
                               "--config", "configs/imagenet256_dit_xl2_sadm.yaml",
                               "distributed.strategy=zero2", "run.output_dir=runs/x"])
    directives = re.findall(r"^#SBATCH (.*)$", script, re.MULTILINE)
    for expected in ("--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--time=24:00:00",
                     "--partition=gpu", "--requeue", "--signal=B:USR1@300",
                     "--output=runs/x/slurm/%j.out", "--open-mode=append",
                     "--cpus-per-task=72"):  # 8 processes x (8 loader workers + 1)
        assert expected in directives, expected
    launch = re.search(r"exec (accelerate launch .*?)\n\}", script, re.DOTALL).group(1)
    words = shlex.split(launch.replace("\\\n", " "))
    assert words[words.index("--num_machines") + 1] == "4"
    assert words[words.index("--num_processes") + 1] == "32"
    assert "--multi_gpu" in words and "--use_deepspeed" not in words  # torchrun, not pdsh
    assert words[words.index("--machine_rank") + 1] == "$SLURM_NODEID"
    assert words[-3:] == ["configs/imagenet256_dit_xl2_sadm.yaml", "distributed.strategy=zero2",
                          "run.output_dir=runs/x"]
    assert "export NCCL_SOCKET_IFNAME=ib0" in script
    assert "final_checkpoint=step_00400000" in script
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


def test_cpu_nodes_get_no_gpus_and_one_process_alone_no_multi_gpu(capsys: pytest.CaptureFixture) -> None:
    script = rendered(capsys, ["--nodes", "2", "--gpus-per-node", "0", "--procs-per-node", "2"])
    assert "--num_processes 4" in script and "--gpus-per-node" not in script
    assert "--mixed_precision no" in script and "--cpus-per-task=6" in script  # 2 x (2 workers + 1)
    script = rendered(capsys, ["--nodes", "1", "--gpus-per-node", "1"])
    assert "--num_processes 1" in script and "--multi_gpu" not in script


def test_every_config_file_reaches_the_job_in_order_and_quoted(capsys: pytest.CaptureFixture,
                                                               tmp_path: Path) -> None:
    odd = tmp_path / "my recipe's $(touch FILE).yaml"  # would run touch in the job if left unquoted
    odd.write_text("train: {steps: 7}\n")
    configs = ["--config", "imagenet/base", "--config", "methods/ddgan", "--config", str(odd)]
    script = rendered(capsys, ["--gpus-per-node", "0", *configs, "train.log_every=5"])
    assert "final_checkpoint=step_00000007" in script  # the last file's value, as the job reads it
    # The words bash makes of the rendered training command (the last line of the launch).
    command = re.search(r"exec accelerate launch .*?\n +(-m advdit.*?)\n\}", script, re.DOTALL).group(1)
    words = subprocess.run(["bash", "-c", f"printf '%s\\n' {command}"], cwd=tmp_path, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    assert words == ["-m", "advdit.launchers.cli", "train", *configs, "train.log_every=5"]
    assert not (tmp_path / "FILE").exists()


def documented_command() -> tuple[list[str], str]:
    """The dry-run command in docs/slurm.md and the script shown after it."""
    text = DOCS.read_text()
    match = re.search(r"```bash\n(advdit slurm submit --dry-run.*?)\n```.*?```bash\n(.*?)```", text,
                      re.DOTALL)
    assert match, "docs/slurm.md shows an advdit slurm submit --dry-run command and its script"
    return shlex.split(match.group(1).replace("\\\n", " "))[3:], match.group(2)


INJECTION = "j\ntouch {target}\n#"  # ends the #SBATCH line, runs touch, comments out the rest


def test_newline_in_the_job_name_is_refused_naming_the_option(capsys: pytest.CaptureFixture,
                                                             tmp_path: Path) -> None:
    target = tmp_path / "FILE"
    assert main(["slurm", "submit", "--dry-run", "--job-name", INJECTION.format(target=target)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no script
    assert captured.err.startswith("advdit: error: --job-name holds the control character '\\n'")
    options = ("--partition", "--time", "--setup", "--env", "--sbatch-option", "--srun-option", "--chdir",
               "--config")
    for option in options:
        value = "X=1\rY" if option == "--env" else "a\rb"
        assert main(["slurm", "submit", "--dry-run", option, value]) == 2
        assert capsys.readouterr().err.startswith(f"advdit: error: {option} holds the control character")
    assert not target.exists()


def test_newline_in_a_config_value_is_refused_naming_the_key(capsys: pytest.CaptureFixture,
                                                            tmp_path: Path) -> None:
    target = tmp_path / "FILE"
    config = tmp_path / "evil.yaml"
    config.write_text(json.dumps({"run": {"name": INJECTION.format(target=target)}}))
    assert main(["slurm", "submit", "--dry-run", "--config", str(config)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("advdit: error: config key 'run.name' holds the control character")
    assert main(["slurm", "submit", "--dry-run", "run.output_dir=\"runs/x\\ny\""]) == 2
    assert "'run.output_dir' holds the control character" in capsys.readouterr().err
    assert not target.exists()


def test_docs_show_the_script_that_is_rendered(capsys: pytest.CaptureFixture) -> None:
    args, shown = documented_command()
    assert rendered(capsys, args) == shown


def test_status_of_a_folder_without_jobs_is_a_one_line_error(capsys: pytest.CaptureFixture,
                                                             tmp_path: Path) -> None:
    assert main(["slurm", "status", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("advdit: error: no Slurm jobs were submitted for run folder")
    assert error.count("\n") == 1


# ---------------------------------------------------------------------- jobs on the cluster
def submit_command(out: Path, shards: Path, *extra: str) -> list[str]:
    return [ADVDIT, "slurm", "submit", "--nodes", "2", "--gpus-per-node", "0", "--time", "20",
            "--signal-seconds", "60", *tiny_overrides(out, shards), "tracking.enabled=true",
            "distributed.strategy=zero2", f"train.steps={STEPS}", "train.ckpt_every=1000", *extra]


def submit(cluster: SlurmCluster, out: Path, shards: Path) -> str:
    done = subprocess.run(submit_command(out, shards), capture_output=True, text=True,
                          env=cluster.env, timeout=120)
    assert done.returncode == 0, done.stderr
    return re.search(r"submitted job (\d+)", done.stdout).group(1)


def wait_for(cluster: SlurmCluster, job_id: str, done, what: str) -> dict[str, str]:
    deadline = time.monotonic() + JOB_TIMEOUT
    while True:
        state = cluster.job(job_id)
        if done(state):
            return state
        assert time.monotonic() < deadline, f"job {job_id}: no {what} within {JOB_TIMEOUT:.0f} s: {state}"
        assert state["JobState"] not in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), (
            f"job {job_id} {state['JobState']} ({state['Reason']}); log in {state.get('StdOut')}")
        time.sleep(0.5)


def finished(state: dict[str, str]) -> bool:
    return state["JobState"] == "COMPLETED"


def metric_rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def advdit_slurm(cluster: SlurmCluster, *args: str) -> str:
    done = subprocess.run([ADVDIT, "slurm", *args], capture_output=True, text=True, env=cluster.env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory,
                  tiny_shards: Path) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("slurm-whole")
    job_id = submit(slurm_cluster, out, tiny_shards)
    wait_for(slurm_cluster, job_id, finished, "completion")
    return out, job_id


@pytest.mark.slow
def test_two_node_zero2_job_trains_to_the_end(slurm_cluster: SlurmCluster,
                                              uninterrupted: tuple[Path, str]) -> None:
    out, job_id = uninterrupted
    state = slurm_cluster.job(job_id)
    assert state["ExitCode"] == "0:0" and state["Restarts"] == "0" and state["NodeList"] == "node[1-2]"
    assert [row["step"] for row in metric_rows(out)] == list(range(1, STEPS + 1))
    # Two ranks, one per node, each with its own ZeRO-2 shard in the final checkpoint.
    final = out / "checkpoints" / f"step_{STEPS:08d}" / "pytorch_model"
    assert sorted(path.name for path in final.glob("*optim*")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    log = (out / "slurm" / f"{job_id}.out").read_text()
    assert "rendezvous 127.0.0.1:" in log and f"advdit: finished (step_{STEPS:08d})" in log
    assert "requeueing" not in log
    status = advdit_slurm(slurm_cluster, "status", str(out))
    assert f"job {job_id}: COMPLETED on node[1-2]" in status
    assert f"newest: step_{STEPS:08d}" in status and f"step:        {STEPS} of {STEPS}" in status
    last_line = advdit_slurm(slurm_cluster, "logs", str(out), "-n", "1")
    assert last_line == f"advdit: finished (step_{STEPS:08d})\n"


@pytest.mark.slow
def test_preempted_job_requeues_and_resumes_exactly(slurm_cluster: SlurmCluster,
                                                    uninterrupted: tuple[Path, str], tmp_path: Path,
                                                    tiny_shards: Path) -> None:
    from mlflow.tracking import MlflowClient

    job_id = submit(slurm_cluster, tmp_path, tiny_shards)
    wait_for(slurm_cluster, job_id, lambda state: len(metric_rows(tmp_path)) >= 3, "third step")
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job_id)
    # Requeued, and held (Reason=BeginTime) until the revoked credentials of its first run expire:
    # about 20 s on this cluster (cred_expire=10), 2 minutes with Slurm's default.
    wait_for(slurm_cluster, job_id, lambda state: (state["JobState"], state["Reason"], state["Restarts"])
             == ("PENDING", "BeginTime", "1"), "requeue")
    stopped_at = metric_rows(tmp_path)[-1]["step"]
    assert stopped_at < STEPS, "the run ended before the signal reached it"
    meta = json.loads((tmp_path / "checkpoints" / f"step_{stopped_at:08d}" / "meta.json").read_text())
    assert meta["stopped_by"] == "SIGUSR1"  # what the script's requeue decision reads
    wait_for(slurm_cluster, job_id, finished, "completion after the requeue")

    log = (tmp_path / "slurm" / f"{job_id}.out").read_text()
    assert f"preempted at step {stopped_at}:" in log and "requeueing job" in log
    assert "restart 1, nodes node[1-2], rendezvous 127.0.0.1:" in log
    assert f"resumed from {tmp_path / 'checkpoints' / f'step_{stopped_at:08d}'}" in log
    # Every step logged once: the resumed job started exactly where the preempted one stopped.
    rows = metric_rows(tmp_path)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    expected = metric_rows(uninterrupted[0])
    for got, want in zip(rows, expected, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-6), got["step"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("advdit").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    history = client.get_metric_history(runs[0].info.run_id, "loss")
    assert sorted(metric.step for metric in history) == list(range(1, STEPS + 1))
    assert "restarts 1" in advdit_slurm(slurm_cluster, "status", str(tmp_path))


@pytest.mark.slow
def test_invalid_config_is_refused_before_anything_is_queued(slurm_cluster: SlurmCluster, tmp_path: Path,
                                                              tiny_shards: Path) -> None:
    queued = slurm_cluster.run("squeue", "-h", "-o", "%i").stdout
    done = subprocess.run(submit_command(tmp_path, tiny_shards, "train.steps=0"), capture_output=True,
                          text=True, env=slurm_cluster.env, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == "advdit: error: config key 'train.steps' must be positive"
    assert slurm_cluster.run("squeue", "-h", "-o", "%i").stdout == queued
    assert not (tmp_path / "slurm").exists()


@pytest.mark.slow
def test_a_config_that_would_inject_a_command_is_never_queued(slurm_cluster: SlurmCluster, tmp_path: Path,
                                                              tiny_shards: Path) -> None:
    target = tmp_path / "FILE"
    config = tmp_path / "evil.yaml"
    config.write_text(json.dumps({"run": {"name": INJECTION.format(target=target)}}))
    queued = slurm_cluster.run("squeue", "-h", "-o", "%i").stdout
    command = [arg for arg in submit_command(tmp_path, tiny_shards) if not arg.startswith("run.name=")]
    done = subprocess.run([*command, "--config", str(config)],
                          capture_output=True, text=True, env=slurm_cluster.env, timeout=120)
    assert done.returncode == 2 and "'run.name' holds the control character" in done.stderr
    assert slurm_cluster.run("squeue", "-h", "-o", "%i").stdout == queued
    time.sleep(2)  # a job, had one been queued, would have had time to run its first lines
    assert not target.exists()
