"""MLflow tracking: params, per-step metrics and artifacts, on the main process only.

Where runs go, in order of precedence: ``MLFLOW_TRACKING_URI``, ``tracking.uri`` in the config, or an
embedded sqlite store in the run's output folder (``<output_dir>/mlflow.db``, artifacts under
``<output_dir>/mlartifacts``). A resumed run passes the run id saved in its checkpoint, so all its
metrics land in the same MLflow run.

Tracking never stops training. The store is checked when a run starts (a wrong address fails before
any training time is spent); after that, :class:`BackgroundTracker` sends every record from a
thread, so the loop only appends to a queue. When the server stops answering, the thread warns
once, keeps the records in order and retries with backoff; when it answers again, it sends what
was missed. At the end of the run it waits at most ``tracking.flush_seconds`` for the queue; what
is still unsent is named in a warning, and since ``metrics.jsonl`` in the run folder holds every
logged row, a resumed run sends MLflow the rows it lacks before it trains (:func:`unsent_rows`).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .runtime.files import write_text_atomic

logger = logging.getLogger(__name__)

# MLflow's client retries a failed request 7 times with growing waits and a 120 s timeout: minutes
# per call against a dead server. The background thread does its own retrying, so each call may
# fail fast (the user's own settings of these variables win).
# MLflow's telemetry starts a thread at import which, when it cannot reach its server (clusters and
# this project's machines have no internet), removes a variable from os.environ while other threads
# may be reading the environment (requests does on every call): a race that failed a run's MLflow
# calls with KeyError. advdit sends nothing to third parties; a user may still turn it on.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
MAX_BACKOFF = 30.0
MAX_PENDING = 100_000  # records held while the server is away (a row is ~1 KB)
MAX_BATCH_METRICS = 1000  # MLflow's limit per log_batch request


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
    """One MLflow run, called synchronously. Create with :meth:`open`."""

    def __init__(self, client: Any, run_id: str, uri: str) -> None:
        self.client = client
        self.run_id = run_id
        self.uri = uri

    @classmethod
    def open(cls, uri: str, experiment: str, run_name: str, output_dir: Path,
             resume_run_id: str | None = None) -> MlflowTracker:
        from mlflow.tracking import MlflowClient

        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
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
            return cls(client, resume_run_id, uri)
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            # An embedded store keeps its artifacts beside the database, in the run's folder.
            location = None if uri.startswith("http") else (output_dir / "mlartifacts").resolve().as_uri()
            experiment_id = client.create_experiment(experiment, artifact_location=location)
        run = client.create_run(experiment_id, run_name=run_name)
        logger.info("MLflow run %s in %s", run.info.run_id, uri)
        return cls(client, run.info.run_id, uri)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(key, _param_value(value)) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_rows(self, rows: list[tuple[dict[str, float], int]]) -> None:
        """Several steps' metrics in one request (MLflow takes up to 1000 metrics per batch)."""
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        items = [Metric(key, float(value), stamp, step)
                 for metrics, step in rows for key, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def last_step(self, key: str) -> int:
        """The highest step MLflow holds for metric ``key`` (0 when none)."""
        return max((metric.step for metric in self.client.get_metric_history(self.run_id, key)), default=0)


@dataclass
class _Record:
    """One queued call: a row of metrics (sent in batches with its neighbours) or another call."""

    what: str
    row: tuple[dict[str, float], int] | None = None
    send: Callable[[], None] | None = None


class BackgroundTracker:
    """Sends records to an :class:`MlflowTracker` from a thread; calls return at once.

    ``sent_through`` maps a series name (``metrics``, ``fid``) to the last step MLflow already
    holds for it: rows of a replay up to that step (a run resumed from an older checkpoint recomputes
    steps it had logged) are not sent twice. Consecutive metric rows waiting in the queue go out in
    one request, so a backlog after an outage is sent in a few calls.
    """

    def __init__(self, tracker: MlflowTracker, flush_seconds: float) -> None:
        self.tracker = tracker
        self.flush_seconds = flush_seconds
        self.sent_through: dict[str, int] = {}
        self._pending: collections.deque[_Record] = collections.deque()
        self._wake = threading.Condition()
        self._deadline: float | None = None  # set by finish(): stop trying after this time
        self._failing_since: float | None = None
        self.dropped = 0
        self._thread = threading.Thread(target=self._send_loop, name="mlflow-sender", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------- called by the training loop
    def log_metrics(self, metrics: dict[str, float], step: int, series: str = "metrics") -> None:
        if step <= self.sent_through.get(series, 0):
            return
        self._put(_Record(f"{series} of step {step}", row=(dict(metrics), step)))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._put(_Record(f"artifact {path}", send=lambda: self.tracker.log_artifact(path, artifact_path)))

    def set_tag(self, key: str, value: str) -> None:
        self._put(_Record(f"tag {key}", send=lambda: self.tracker.set_tag(key, value)))

    def finish(self, status: str = "FINISHED") -> None:
        """Mark the run ended and wait up to ``flush_seconds`` for everything to be sent."""
        self._put(_Record(f"run status {status}", send=lambda: self.tracker.finish(status)))
        with self._wake:
            self._deadline = time.monotonic() + self.flush_seconds
            self._wake.notify_all()
        self._thread.join(timeout=self.flush_seconds + 1.0)
        self._report_unsent()

    def _put(self, record: _Record) -> None:
        with self._wake:
            if len(self._pending) >= MAX_PENDING:  # the newest goes: the sender may be sending the oldest
                self.dropped += 1
                return
            self._pending.append(record)
            self._wake.notify_all()

    # -------------------------------------------------------------- the sending thread
    def _next_batch(self) -> list[_Record]:
        """The head of the queue, with the metric rows right behind it if it is one (under the
        lock)."""
        head = self._pending[0]
        if head.row is None:
            return [head]
        batch, count = [], 0
        for record in self._pending:
            if record.row is None or count + len(record.row[0]) > MAX_BATCH_METRICS:
                break
            batch.append(record)
            count += len(record.row[0])
        return batch or [head]

    def _send(self, batch: list[_Record]) -> None:
        if batch[0].row is None:
            batch[0].send()
        else:
            self.tracker.log_rows([record.row for record in batch])

    def _send_loop(self) -> None:
        backoff = 1.0
        while True:
            with self._wake:
                while not self._pending and self._deadline is None:
                    self._wake.wait()
                if not self._pending or self._past_deadline():
                    return
                batch = self._next_batch()
            try:
                self._send(batch)
            except Exception as err:  # noqa: BLE001 - any failure of the side service is survived
                self._note_failure(batch[0].what, err)
                if self._deadline is None:  # waits out the backoff, or until finish() is called
                    with self._wake:
                        self._wake.wait_for(lambda: self._deadline is not None, timeout=backoff)
                else:  # flushing: try again each second until the deadline
                    time.sleep(min(1.0, max(0.0, self._deadline - time.monotonic())))
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            backoff = 1.0
            with self._wake:
                for _ in batch:
                    self._pending.popleft()
                left = len(self._pending)
            if self._failing_since is not None:
                logger.warning("MLflow at %s answers again after %.0f s; sending the %d record(s) it missed",
                               self.tracker.uri, time.monotonic() - self._failing_since, left + len(batch))
                self._failing_since = None

    def _past_deadline(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def _note_failure(self, what: str, err: Exception) -> None:
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            logger.warning("MLflow at %s failed to take %s (%s); training continues, metrics.jsonl keeps "
                           "every row, and the records are sent when the server answers again",
                           self.tracker.uri, what, reason[:300])

    def _report_unsent(self) -> None:
        with self._wake:
            unsent = list(self._pending)
        if not (unsent or self.dropped):
            return
        steps = [record.row[1] for record in unsent if record.row is not None]
        span = f", steps {min(steps)}-{max(steps)}" if steps else ""
        logger.warning("MLflow at %s did not take %d record(s) before the run ended%s (%d more dropped "
                       "while it was away); metrics.jsonl holds them, and resuming this run sends "
                       "them", self.tracker.uri, len(unsent), span, self.dropped)


# ---------------------------------------------------------------------- the run's own record

class JsonLines:
    """A run's append-only record of rows with a ``step`` (metrics.jsonl, fid.jsonl)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        rows = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
        return rows

    def append(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")

    def truncate(self, step: int) -> int:
        """Keep the rows up to ``step`` (a resumed run recomputes the rest); returns how many went."""
        if not self.path.is_file():
            return 0
        rows = self.rows()
        kept = [row for row in rows if row["step"] <= step]
        if len(kept) == len(self.path.read_text().splitlines()):
            return 0  # nothing to drop (and no line cut short by a crash)
        write_text_atomic(self.path, "".join(json.dumps(row) + "\n" for row in kept))
        return len(rows) - len(kept)


def unsent_rows(tracker: MlflowTracker, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """(rows of ``rows`` MLflow lacks, the last step it holds): rows after the last step MLflow has
    for the rows' first metric."""
    if not rows:
        return [], 0
    key = next(key for key in rows[-1] if key != "step")
    held = tracker.last_step(key)
    return [row for row in rows if row["step"] > held], held
