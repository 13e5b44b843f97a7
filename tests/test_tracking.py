"""MLflow tracking against a real `mlflow server` (sqlite backend) and the embedded store."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from advdit.trainer.loop import train
from advdit.trainer.tracking import TrackingError

from helpers import tiny_config

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(uri: str, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"mlflow server at {uri} did not answer /health within {timeout:.0f} s")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real tracking server on 127.0.0.1, proxying artifacts; stopped after the module."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    log = (root / "server.log").open("w")
    process = subprocess.Popen(
        [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_healthy(uri, process)
        yield uri
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture
def tracking_uri(mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    return mlflow_server


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
