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
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Queue metrics; never blocks the training step."""
        self._queue.put((step, int(time.time() * 1000), metrics))

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, d: dict[str, Any], artifact_file: str) -> None:
        self.log_text(json.dumps(d, indent=2, sort_keys=True), artifact_file)

    def _send_loop(self) -> None:
        from mlflow.entities import Metric

        while True:
            item = self._queue.get()
            batch = [item]
            while not self._queue.empty() and len(batch) < 200:
                batch.append(self._queue.get_nowait())
            stop = any(b is None for b in batch)
            metrics = [
                Metric(k, float(v), ts, step)
                for b in batch
                if b is not None
                for step, ts, values in [b]
                for k, v in values.items()
            ]
            if metrics:
                try:
                    self.client.log_batch(self.run_id, metrics=metrics)
                except Exception as e:  # training goes on; issue the warning once per failure
                    log.warning("MLflow log_batch failed (%d metrics dropped): %s", len(metrics), e)
            for _ in batch:
                self._queue.task_done()
            if stop:
                return

    def flush(self) -> None:
        self._queue.join()

    def finish(self, status: str = "FINISHED") -> None:
        self._queue.put(None)
        self._thread.join(timeout=60)
        self.client.set_terminated(self.run_id, status=status)


def resolve_uri(configured: str) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI", "")
