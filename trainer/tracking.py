"""The one training-side module that imports mlflow.

One MLflow run per training job: its id is kept in the run folder and in every checkpoint, so a
restarted job continues the same run. A synchronous call to the server costs tens of
milliseconds, so the training thread only queues: metrics, tags and text artifacts go to a
background thread that sends them with `log_batch`, at most once per `flush_s`. While the server
is unreachable they wait (metrics in a bounded buffer, tags and artifacts latest-wins) and are
sent when it is back. Whatever reaches the server passes `redact` first.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import requests

log = logging.getLogger(__name__)

# A key is secret when one of its words is one of these (`aws.secret_access_key`, `api_token`,
# `db.password`), not when a word merely contains one (`tokenizer`, `keep_last`).
_SECRET_WORDS = {
    "key", "secret", "token", "password", "passwd", "credential", "credentials", "apikey",
}  # fmt: skip
_USERINFO = re.compile(r"(?<=://)[^/@\s:]+:[^/@\s]+@")  # scheme://user:password@host
REDACTED = "***"


class TrackingError(RuntimeError):
    """The tracking server cannot be used; the message names its URI."""


def is_secret(key: str) -> bool:
    return any(w in _SECRET_WORDS for w in re.split(r"[^a-z0-9]+", str(key).lower()))


def redact(value: Any, key: str = "") -> Any:
    """`value` with every entry under a secret-looking key replaced by "***", recursively, and
    credentials inside URLs (scheme://user:password@host) removed."""
    if key and is_secret(key.rsplit(".", 1)[-1]) and value not in (None, "", {}):
        return REDACTED
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    if isinstance(value, str):
        return _USERINFO.sub(REDACTED + "@", value)
    return value


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    if not uri.startswith(("http://", "https://")):
        return
    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout_s).raise_for_status()
    except requests.RequestException as e:
        from darkmatter.storage import stack_hint

        source = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") == uri else (
            "tracking.tracking_uri"
        )  # fmt: skip
        raise TrackingError(
            f"MLflow tracking server at {redact(uri)} is unreachable ({type(e).__name__}, "
            f"from {source}){stack_hint(uri)}"
        ) from None


_FLUSH = object()  # queue marker: send what is pending now
_STOP = object()  # queue marker: send what is pending, then end the thread


class Tracker:
    """Rank 0's MLflow run. Everything after the run's creation is sent off the training thread."""

    # A new run's (see __init__): nothing sent before, nothing to hold back.
    backfill: Callable[[set[int]], list[tuple[int, dict[str, float]]]] | None = None
    _have: frozenset[int] | set[int] | None = frozenset()
    _redone_differ = False

    def __init__(
        self, uri: str, experiment: str, run_name: str, run_id: str | None = None,
        flush_s: float = 1.0, max_buffer: int = 1_000_000,
    ):  # fmt: skip
        from mlflow.tracking import MlflowClient

        # Our own loop retries during outages; MLflow's default backoff would stall it minutes.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self._queue: queue.Queue[Any] = queue.Queue()
        self.resumed = bool(run_id)
        self.experiment_id = ""
        if run_id:
            # A restart continues its run even while the server is down: the status change and
            # everything after it wait in the queue.
            self.run_id = run_id
            self._queue.put(("status", "RUNNING"))
            try:
                check_reachable(uri)
                self.experiment_id = self.client.get_run(run_id).info.experiment_id
            except Exception as e:
                log.warning("MLflow unreachable at start (%s): run %s goes on, everything is "
                            "buffered until the server is back", redact(str(e)), run_id)  # fmt: skip
        else:
            check_reachable(uri)  # a new run needs the server: fail fast, naming it
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
            self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
            self.experiment_id = exp_id
        self.flush_s = flush_s  # the least time between two sends: one request a second at most
        self.retry_s = 2.0  # seconds between attempts while the server is unreachable
        self.max_buffer = max_buffer  # metrics kept during an outage (~100 bytes each)
        self.dropped = 0  # metrics lost to the bound
        # A continued run keeps one step axis with every step once. Before its first metrics
        # go (so after an outage at the restart too), the sender reads which steps the run has
        # (its `loss` history): the dead job's unsent rows that `backfill(have)` returns are
        # sent first, and steps it has are not sent again when this job redoes them.
        self._have = None if self.resumed else frozenset()
        self._thread = threading.Thread(target=self._send_loop, name="mlflow-logger", daemon=True)
        self._thread.start()

    @property
    def run_url(self) -> str:
        base = redact(self.uri.rstrip("/"))
        exp = f"experiments/{self.experiment_id}/" if self.experiment_id else ""
        return f"{base}/#/{exp}runs/{self.run_id}"

    def log_params(self, params: dict[str, Any]) -> None:
        """Queue params. They are immutable in MLflow: a resumed run sends only the ones it does
        not have yet."""
        self._queue.put(("params", {k: str(v)[:6000] for k, v in redact(params).items()}))

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._queue.put(("tags", redact({k: str(v) for k, v in tags.items()})))

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Queue metrics; never blocks the training step."""
        self._queue.put(("metrics", (step, int(time.time() * 1000), metrics)))

    def log_text(self, text: str, artifact_file: str) -> None:
        """Queue a text artifact; a newer text for the same file replaces one not yet sent."""
        self._queue.put(("artifact", (artifact_file, text)))

    def log_dict(self, d: dict[str, Any], artifact_file: str) -> None:
        self.log_text(json.dumps(redact(d), indent=2, sort_keys=True, default=str), artifact_file)

    # -- the sender thread ---------------------------------------------------------------
    def _send_loop(self) -> None:
        """Take what the training thread queued, send it, and wait at least `flush_s` before the
        next send so that logging every step costs one request a second, not one a step."""
        pend = _Pending()
        failing, stopping, last_send = False, False, 0.0
        while True:
            if pend.empty() and not stopping:
                wait: float | None = None  # nothing to do until something is queued
            else:
                gap = self.retry_s if failing else self.flush_s
                wait = max(0.0, last_send + gap - time.monotonic())
            taken, now_please, stopping = self._take(wait, pend, stopping)
            due = time.monotonic() >= last_send + (self.retry_s if failing else self.flush_s)
            if not pend.empty() and (due or now_please or stopping):
                self._bound(pend)
                failing = not self._send(pend, already_failing=failing)
                last_send = time.monotonic()
            for _ in range(taken):
                self._queue.task_done()
            if stopping and (pend.empty() or failing):
                if not pend.empty():
                    log.warning("MLflow unreachable at the end of the run: %d metrics, %d "
                                "tags and %d artifacts not sent", len(pend.metrics),
                                len(pend.tags), len(pend.artifacts))  # fmt: skip
                return

    def _take(self, wait: float | None, pend: _Pending, stopping: bool) -> tuple[int, bool, bool]:
        """Move queued items into `pend`, blocking up to `wait` seconds for the first one.
        Returns (items taken, whether a flush was asked for, whether to stop)."""
        taken, now_please = 0, False
        block: float | None = wait
        while taken < 10_000:
            try:
                item = self._queue.get(timeout=block) if block != 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            taken += 1
            block = 0
            if item is _FLUSH:
                now_please = True
            elif item is _STOP:
                stopping = True
            else:
                pend.add(*item)
        return taken, now_please, stopping

    def _bound(self, pend: _Pending) -> None:
        extra = len(pend.metrics) - self.max_buffer
        if extra > 0:
            for _ in range(extra):
                pend.metrics.popleft()
            self.dropped += extra
            log.warning("MLflow buffer full (tracking.max_buffer=%d): dropped the %d oldest "
                        "metrics", self.max_buffer, extra)  # fmt: skip

    def _send(self, pend: _Pending, already_failing: bool) -> bool:
        """Send tags, then metrics (1000 a request, the server's limit), then artifacts.
        True when everything went."""
        from mlflow.entities import Param, RunTag

        try:
            if pend.status:
                self.client.update_run(self.run_id, status=pend.status)
                pend.status = ""
            if pend.params:
                existing = self.client.get_run(self.run_id).data.params
                items = [Param(k, v) for k, v in pend.params.items() if k not in existing]
                for i in range(0, len(items), 100):  # the server's limit per batch
                    self.client.log_batch(self.run_id, params=items[i : i + 100])
                pend.params.clear()
            if pend.tags:
                tags = [RunTag(k, v) for k, v in pend.tags.items()]
                self.client.log_batch(self.run_id, tags=tags)
                pend.tags.clear()
            if pend.metrics:
                self._reconcile(pend)
            while pend.metrics:
                chunk = [pend.metrics[i] for i in range(min(1000, len(pend.metrics)))]
                self.client.log_batch(self.run_id, metrics=chunk)
                for _ in chunk:
                    pend.metrics.popleft()
            while pend.artifacts:
                path, text = next(iter(pend.artifacts.items()))
                self.client.log_text(self.run_id, text, path)
                del pend.artifacts[path]
        except Exception as e:  # any failure means: keep it all, try again later
            if not already_failing:
                log.warning("MLflow unreachable, buffering (%d metrics pending): %s",
                            len(pend.metrics), redact(str(e)))  # fmt: skip
            return False
        if already_failing:
            log.warning("MLflow reachable again: buffered metrics sent")
        return True

    def _reconcile(self, pend: _Pending) -> None:
        from mlflow.entities import Metric

        if self._have is None:  # raises while the server is down: tried again with the send
            self._have = {m.step for m in self.client.get_metric_history(self.run_id, "loss")}
            rows = self.backfill(set(self._have)) if self.backfill else []
            ts = int(time.time() * 1000)
            old = [
                Metric(k, float(v), ts, step) for step, values in rows for k, v in values.items()
            ]
            pend.metrics.extendleft(reversed(old))
            if rows:
                log.info("MLflow run %s lacked %d logged steps (%d-%d): sent from metrics.jsonl",
                         self.run_id, len(rows), rows[0][0], rows[-1][0])  # fmt: skip
        if self._have and not self._redone_differ:  # the backfill's steps are not in it
            pend.metrics = deque(m for m in pend.metrics if m.step not in self._have)

    def redone_steps_differ(self) -> None:
        """After a rollback (the data moves on), redone steps are new values: send them."""
        self._redone_differ = True

    def flush(self) -> None:
        """Send everything queued so far now; returns after the attempt."""
        self._queue.put(_FLUSH)
        self._queue.join()

    def finish(self, status: str = "FINISHED") -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout=120)
        try:
            self.client.set_terminated(self.run_id, status=status)
        except Exception as e:  # the server is down at the very end: say so, do not crash
            log.warning("could not mark MLflow run %s %s: %s", self.run_id, status, e)


class _Pending:
    """What the sender holds until the server takes it."""

    def __init__(self) -> None:
        self.metrics: deque[Any] = deque()
        self.tags: dict[str, str] = {}
        self.artifacts: dict[str, str] = {}
        self.params: dict[str, str] = {}
        self.status = ""

    def empty(self) -> bool:
        return not (self.metrics or self.tags or self.artifacts or self.params or self.status)

    def add(self, kind: str, payload: Any) -> None:
        from mlflow.entities import Metric

        if kind == "metrics":
            step, ts, values = payload
            self.metrics.extend(Metric(k, float(v), ts, step) for k, v in values.items())
        elif kind == "tags":
            self.tags.update(payload)
        elif kind == "params":
            self.params.update(payload)
        elif kind == "status":
            self.status = payload
        else:
            path, text = payload
            self.artifacts[path] = text


def resolve_uri(configured: str) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI", "")


def download_model(uri: str, dst: str, tracking_uri: str) -> str:
    """A registered model version (`models:/NAME/VERSION`, or `models:/NAME@ALIAS`) downloaded
    into the folder `dst`; returns the folder its artifacts are in. Raises TrackingError naming
    the URI when the registry cannot give it."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    if not tracking_uri:
        raise TrackingError(f"{uri}: no MLflow server to resolve it (set MLFLOW_TRACKING_URI "
                            "or tracking.tracking_uri)")  # fmt: skip
    try:
        path = mlflow.artifacts.download_artifacts(
            artifact_uri=uri, dst_path=dst, tracking_uri=tracking_uri, registry_uri=tracking_uri
        )
        return str(path)
    except (MlflowException, OSError, requests.RequestException) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrackingError(
            f"{uri}: cannot download it from {redact(tracking_uri)}: {first}"
        ) from None
