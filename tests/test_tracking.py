"""MLflow tracking against a real `mlflow server` (sqlite backend) and the embedded store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from advdit.trainer.loop import train
from advdit.trainer.tracking import TrackingError

from helpers import free_port, tiny_config

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
