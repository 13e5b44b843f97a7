"""MLflow tracking against a real `mlflow server` (sqlite backend) and the embedded store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from advdit.trainer.loop import train
from advdit.trainer.runtime.preemption import PREEMPTED_EXIT_CODE
from advdit.trainer.tracking import TrackingError

from helpers import free_port, stop_process, tiny_config, tiny_overrides, wait_healthy

ADVDIT = str(Path(sys.executable).with_name("advdit"))

pytestmark = pytest.mark.slow


def test_run_metrics_params_and_artifacts_reach_the_server(tracking_uri: str, tmp_path: Path,
                                                           tiny_shards: Path) -> None:
    cfg = tiny_config(tmp_path, tiny_shards, "tracking.enabled=true", "train.steps=4",
                      "train.ckpt_every=2", "train.sample_every=2", "tracking.experiment=server-test")
    result = train(cfg, progress=False)
    client = MlflowClient(tracking_uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "4"
    assert run.data.params["model.depth"] == "2"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert [m.value for m in history] == pytest.approx([r["loss"] for r in result.history])
    for key in ("loss_mse", "loss_vb", "grad_norm", "lr", "images_per_sec", "data/corrupt_samples"):
        assert key in run.data.metrics, key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in artifacts
    samples = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert samples == {"samples/step_00000002.png", "samples/step_00000004.png"}
    local = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path / "dl"))
    assert "steps: 4" in Path(local).read_text()


def test_resumed_run_logs_into_the_same_run(tracking_uri: str, tmp_path: Path,
                                            tiny_shards: Path) -> None:
    first = train(tiny_config(tmp_path, tiny_shards, "tracking.enabled=true", "train.steps=3"),
                  progress=False)
    second = train(tiny_config(tmp_path, tiny_shards, "tracking.enabled=true", "train.steps=6"),
                   progress=False)
    assert second.mlflow_run_id == first.mlflow_run_id
    history = MlflowClient(tracking_uri).get_metric_history(first.mlflow_run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]


def test_unreachable_server_fails_before_training(tmp_path: Path, tiny_shards: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    out = tmp_path / "run"
    with pytest.raises(TrackingError, match=f"{dead} is not reachable"):
        train(tiny_config(out, tiny_shards, "tracking.enabled=true"), progress=False)
    assert not out.exists()  # nothing was built or written


def test_embedded_sqlite_store_in_the_run_folder(tmp_path: Path, tiny_shards: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = train(tiny_config(tmp_path, tiny_shards, "tracking.enabled=true", "train.steps=2"),
                   progress=False)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(result.mlflow_run_id)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(tmp_path)
    assert "config.yaml" in os.listdir(run.info.artifact_uri.removeprefix("file://"))


def start_server(root: Path, port: int) -> subprocess.Popen:
    """A tracking server of its own (this test kills it), on ``port`` over the store in ``root``."""
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    process = subprocess.Popen(
        [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_healthy(f"http://127.0.0.1:{port}", process)
    return process


def wait_for_step(metrics: Path, step: int, process: subprocess.Popen, timeout: float = 300) -> float:
    """Wait until metrics.jsonl holds ``step``; returns the time it appeared."""
    deadline = time.monotonic() + timeout
    while True:
        rows = metrics.read_text().splitlines() if metrics.is_file() else []
        if rows and json.loads(rows[-1])["step"] >= step:
            return time.monotonic()
        assert process.poll() is None, f"the run ended before step {step}"
        assert time.monotonic() < deadline, f"no step {step} within {timeout} s"
        time.sleep(0.005)


@pytest.mark.slow
def test_server_death_never_stops_training_and_missed_rows_are_sent_later(tmp_path: Path,
                                                                          tiny_shards: Path) -> None:
    """The server is killed mid-run: the steps go on, a signal during the outage still checkpoints
    and exits 75 within seconds, metrics.jsonl has every step; once the server is back, the resumed
    run sends MLflow the rows it missed, and every step is in MLflow exactly once."""
    root, port = tmp_path / "store", free_port()
    root.mkdir()
    uri = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    out = tmp_path / "run"
    args = [ADVDIT, "train", *tiny_overrides(out, tiny_shards), "tracking.enabled=true",
            "tracking.flush_seconds=3", "train.ckpt_every=1000"]
    server = start_server(root, port)
    run = subprocess.Popen([*args, "train.steps=100000"], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    wait_for_step(metrics, 3, run)
    os.killpg(server.pid, signal.SIGKILL)
    server.wait()
    killed_at, step_at_kill = time.monotonic(), json.loads(metrics.read_text().splitlines()[-1])["step"]
    next_step_after = wait_for_step(metrics, step_at_kill + 1, run) - killed_at
    wait_for_step(metrics, step_at_kill + 20, run)
    run.send_signal(signal.SIGUSR1)
    signalled = time.monotonic()
    stdout, stderr = run.communicate(timeout=120)
    exit_seconds = time.monotonic() - signalled
    assert run.returncode == PREEMPTED_EXIT_CODE, stderr[-3000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    stopped = steps[-1]
    assert steps == list(range(1, stopped + 1))
    assert (out / "checkpoints" / f"step_{stopped:08d}" / "meta.json").is_file()
    assert stderr.count("failed to take") == 1  # warned once, not per step
    print(f"\nserver killed after step {step_at_kill}; the next step was logged {next_step_after:.3f} s "
          f"later; SIGUSR1 at step ~{step_at_kill + 20} during the outage: checkpoint at step {stopped} "
          f"and exit 75 after {exit_seconds:.1f} s (tracking.flush_seconds=3)")
    server = start_server(root, port)
    try:
        resumed = subprocess.run([*args, f"train.steps={stopped + 5}", "tracking.flush_seconds=60"],
                                 env=env, capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        client = MlflowClient(uri)
        meta = out / "checkpoints" / f"step_{stopped:08d}" / "meta.json"
        run_id = json.loads(meta.read_text())["mlflow_run_id"]
        logged = sorted(metric.step for metric in client.get_metric_history(run_id, "loss"))
        assert logged == list(range(1, stopped + 6))  # the outage's rows sent once, nothing twice
        assert client.get_run(run_id).info.status == "FINISHED"
    finally:
        stop_process(server)


@pytest.mark.slow
def test_fallback_resume_logs_each_step_once(tracking_uri: str, tmp_path: Path, tiny_shards: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """Resumed from an older checkpoint (the newest is damaged), the run recomputes steps it had
    logged: metrics.jsonl keeps each step once, and MLflow gets nothing twice."""
    first = train(tiny_config(tmp_path, tiny_shards, "tracking.enabled=true"), progress=False)
    (tmp_path / "checkpoints" / "step_00000006" / "meta.json").write_text("garbage")
    caplog.set_level("INFO")
    train(tiny_config(tmp_path, tiny_shards, "tracking.enabled=true", "train.steps=8"), progress=False)
    assert f"resumed from {tmp_path / 'checkpoints' / 'step_00000003'} (step 3)" in caplog.text
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 9))
    history = MlflowClient(tracking_uri).get_metric_history(first.mlflow_run_id, "loss")
    assert sorted(metric.step for metric in history) == list(range(1, 9))


def test_mlflow_telemetry_is_off_so_no_thread_edits_the_environment() -> None:
    """MLflow's telemetry thread pops a variable from os.environ when its server is unreachable,
    racing every thread that reads the environment; advdit turns it off before mlflow loads."""
    ci_markers = {"PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK"}
    env = {key: value for key, value in os.environ.items() if key not in ci_markers}
    check = "import mlflow; from mlflow.telemetry.client import get_telemetry_client as g; print(g() is None)"

    def telemetry_off(first: str) -> str:
        done = subprocess.run([sys.executable, "-c", f"{first}{check}"], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()[-1]

    assert telemetry_off("") == "False"  # MLflow on its own starts its telemetry client
    assert telemetry_off("import advdit.trainer.tracking; ") == "True"
