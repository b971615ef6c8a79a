"""The tracker against a real MLflow server over HTTP: secrets are redacted, and an outage in the
middle of a run loses no metric (they wait in the buffer and arrive when the server is back)."""

from __future__ import annotations

import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from tests.helpers import free_port
from trainer import stack
from trainer.tracking import Tracker, redact


def test_redact_secret_looking_keys() -> None:
    out = redact(
        {"aws.secret_access_key": "abc", "db.password": "p", "train.lr": 0.1, "api_token": "t"}
    )
    assert out == {
        "aws.secret_access_key": "***",
        "db.password": "***",
        "train.lr": 0.1,
        "api_token": "***",
    }


def test_outage_mid_run_loses_no_metric(tmp_path: Path) -> None:
    ports = {"s3_port": free_port(), "mlflow_port": free_port()}
    info = stack.up(**ports, state_dir=tmp_path / "stack", timeout=180)
    try:
        tracker = Tracker(info.mlflow_uri, "outage", "outage-run")
        tracker.retry_s = 0.5
        tracker.log_params({"train.lr": 0.1, "storage.secret_key": "hunter2"})
        for step in range(1, 6):
            tracker.log_metrics(step, {"loss": 1.0 / step})
        tracker.flush()
        stack.down(tmp_path / "stack")  # the server goes away mid-run
        t0 = time.perf_counter()
        for step in range(6, 11):
            tracker.log_metrics(step, {"loss": 1.0 / step})
        assert time.perf_counter() - t0 < 0.5  # logging never blocks the training thread
        time.sleep(1.5)  # at least one failed send while the server is down
        stack.up(**ports, state_dir=tmp_path / "stack", timeout=180)  # same database, same run
        tracker.finish()
        client = MlflowClient(tracking_uri=info.mlflow_uri)
        steps = sorted(m.step for m in client.get_metric_history(tracker.run_id, "loss"))
        assert steps == list(range(1, 11))
        run = client.get_run(tracker.run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params["storage.secret_key"] == "***"
        assert "hunter2" not in str(run.data.params)
    finally:
        stack.down(tmp_path / "stack")
