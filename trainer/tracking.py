"""The one training-side module that imports mlflow.

One MLflow run per training job: its id is kept in the run folder and in every checkpoint, so a
restarted job continues the same run. A synchronous `log_metric` costs tens of milliseconds, so
metrics go through a queue to a background thread that sends them with `log_batch`.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections import deque
from typing import Any

import requests

log = logging.getLogger(__name__)

_SECRET_WORDS = ("key", "secret", "token", "password", "credential")


class TrackingError(RuntimeError):
    """The tracking server cannot be used; the message names its URI."""


def redact(params: dict[str, Any]) -> dict[str, Any]:
    """Replace values whose key looks secret, so credentials never reach MLflow."""
    return {
        k: ("***" if any(w in k.lower() for w in _SECRET_WORDS) else v) for k, v in params.items()
    }


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    if not uri.startswith(("http://", "https://")):
        return
    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout_s).raise_for_status()
    except requests.RequestException as e:
        reason = type(e).__name__
        raise TrackingError(f"MLflow tracking server at {uri} is unreachable ({reason})") from None


class Tracker:
    """Rank 0's MLflow run. Metrics are batched and sent off the training thread."""

    def __init__(self, uri: str, experiment: str, run_name: str, run_id: str | None = None):
        from mlflow.tracking import MlflowClient

        check_reachable(uri)
        # Our own loop retries during outages; MLflow's default backoff would stall it minutes.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        if run_id:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            self.resumed = True
        else:
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
            self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
            self.resumed = False
        self.experiment_id = self.client.get_run(self.run_id).info.experiment_id
        self.retry_s = 2.0  # seconds between attempts while the server is unreachable
        self.max_buffer = 1_000_000  # metrics kept during an outage (~100 bytes each)
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._send_loop, name="mlflow-logger", daemon=True)
        self._thread.start()

    @property
    def run_url(self) -> str:
        return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        items = [
            Param(k, str(v)[:6000])
            for k, v in redact(params).items()
            if k not in existing  # params are immutable in MLflow; a resume logs only new ones
        ]
        for i in range(0, len(items), 100):  # the server's limit per batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Queue metrics; never blocks the training step."""
        self._queue.put((step, int(time.time() * 1000), metrics))

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, d: dict[str, Any], artifact_file: str) -> None:
        self.log_text(json.dumps(d, indent=2, sort_keys=True), artifact_file)

    def _send_loop(self) -> None:
        """Drain the queue into `pending` and send it in batches. While the server is down,
        metrics wait in `pending` (bounded: the oldest are dropped, with a warning) and sending
        is retried every `retry_s` seconds, so an outage loses nothing that fits the bound."""
        pending: deque[Any] = deque()
        stopping, failing = False, False
        while True:
            items = self._take(block_s=self.retry_s if pending else None)
            for item in items:
                if item is None:
                    stopping = True
                else:
                    pending.extend(_metrics(*item))
            if len(pending) > self.max_buffer:
                dropped = len(pending) - self.max_buffer
                for _ in range(dropped):
                    pending.popleft()
                log.warning("MLflow buffer full: dropped the %d oldest metrics", dropped)
            failing = not self._send(pending, already_failing=failing)
            for _ in items:
                self._queue.task_done()
            if stopping and (not pending or failing):
                return

    def _take(self, block_s: float | None) -> list[Any]:
        try:
            items = [self._queue.get(timeout=block_s)]
        except queue.Empty:
            return []
        while len(items) < 1000:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return items

    def _send(self, pending: deque[Any], already_failing: bool) -> bool:
        """Send what is pending, 1000 metrics a request (the server's limit). True on success."""
        while pending:
            chunk = [pending[i] for i in range(min(1000, len(pending)))]
            try:
                self.client.log_batch(self.run_id, metrics=chunk)
            except Exception as e:  # any failure means: keep the metrics, try again later
                if not already_failing:
                    log.warning(
                        "MLflow unreachable, buffering metrics (%d pending): %s", len(pending), e
                    )
                return False
            for _ in chunk:
                pending.popleft()
        if already_failing:
            log.warning("MLflow reachable again: buffered metrics sent")
        return True

    def flush(self) -> None:
        self._queue.join()

    def finish(self, status: str = "FINISHED") -> None:
        self._queue.put(None)
        self._thread.join(timeout=120)
        try:
            self.client.set_terminated(self.run_id, status=status)
        except Exception as e:  # the server is down at the very end: say so, do not crash
            log.warning("could not mark MLflow run %s %s: %s", self.run_id, status, e)


def _metrics(step: int, ts: int, values: dict[str, float]) -> list[Any]:
    from mlflow.entities import Metric

    return [Metric(k, float(v), ts, step) for k, v in values.items()]


def resolve_uri(configured: str) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI", "")
