"""MLflow tracking: params, per-step metrics and artifacts, on the main process only.

Where runs go, in order of precedence: ``MLFLOW_TRACKING_URI``, ``tracking.uri`` in the config, or an
embedded sqlite store in the run's output folder (``<output_dir>/mlflow.db``, artifacts under
``<output_dir>/mlartifacts``). A resumed run passes the run id saved in its checkpoint, so all its
metrics land in the same MLflow run.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class TrackingError(RuntimeError):
    """The tracking store cannot be used; raised before any training time is spent."""


def resolve_uri(configured: str | None, output_dir: Path) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if configured:
        return configured
    return f"sqlite:///{(output_dir / 'mlflow.db').resolve()}"


def check_reachable(uri: str, timeout: float = 10.0) -> None:
    """For an http(s) server, ask its /health endpoint; fail with the URI and the reason."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            if response.status == 200:
                return
            reason = f"HTTP {response.status}"
    except (urllib.error.URLError, OSError) as err:
        reason = str(getattr(err, "reason", err))
    raise TrackingError(
        f"MLflow tracking server {uri} is not reachable ({reason}). Start it (e.g. `mlflow server "
        "--backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000`), fix "
        "MLFLOW_TRACKING_URI / tracking.uri, or set tracking.enabled=false"
    )


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


class MlflowTracker:
    """One MLflow run. Create with :meth:`open`; all calls are no-ops on ``None`` trackers."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    @classmethod
    def open(cls, uri: str, experiment: str, run_name: str, output_dir: Path,
             resume_run_id: str | None = None) -> MlflowTracker:
        from mlflow.tracking import MlflowClient

        check_reachable(uri)
        client = MlflowClient(tracking_uri=uri)
        if resume_run_id:
            try:
                client.get_run(resume_run_id)
            except Exception as err:  # noqa: BLE001 - mlflow raises several types here
                raise TrackingError(
                    f"the checkpoint's MLflow run {resume_run_id} is not in store {uri}: {err}"
                ) from err
            client.update_run(resume_run_id, status="RUNNING")
            logger.info("continuing MLflow run %s in %s", resume_run_id, uri)
            return cls(client, resume_run_id)
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            # An embedded store keeps its artifacts beside the database, in the run's folder.
            location = None if uri.startswith("http") else (output_dir / "mlartifacts").resolve().as_uri()
            experiment_id = client.create_experiment(experiment, artifact_location=location)
        run = client.create_run(experiment_id, run_name=run_name)
        logger.info("MLflow run %s in %s", run.info.run_id, uri)
        return cls(client, run.info.run_id)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(key, _param_value(value)) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        items = [Metric(key, float(value), stamp, step) for key, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)
