"""The tracker against a real MLflow server over HTTP: secrets are redacted, an outage in the
middle of a run loses no metric, tag or artifact (they wait and arrive when the server is back),
the buffer's bound drops the oldest metrics with a warning; and `darkmatter runs` reads runs back:
where the time went, health, config differences, metric deltas, a plot."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from darkmatter.evaluation import runs
from darkmatter.quickstart import stack
from darkmatter.trainer.tracking import Tracker, redact
from tests.helpers import free_port


def test_redact_secret_looking_keys_nested_and_urls() -> None:
    out = redact({
        "aws.secret_access_key": "abc", "db.password": "p", "train.lr": 0.1, "api_token": "t",
        "deepspeed": {"comet": {"api_key": "k", "project": "x"}, "credentials": ["a", "b"]},
        "data.tokenizer": "tok.json", "checkpoint.keep_last": 3, "empty_key": "",
        "tracking_uri": "https://alice:s3cret@mlflow.example.com/x",
    })  # fmt: skip
    assert out == {
        "aws.secret_access_key": "***", "db.password": "***", "train.lr": 0.1, "api_token": "***",
        "deepspeed": {"comet": {"api_key": "***", "project": "x"}, "credentials": "***"},
        "data.tokenizer": "tok.json", "checkpoint.keep_last": 3, "empty_key": "",
        "tracking_uri": "https://***@mlflow.example.com/x",
    }  # fmt: skip


def test_outage_mid_run_loses_no_metric(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ports = {"s3_port": free_port(), "mlflow_port": free_port()}
    info = stack.up(**ports, state_dir=tmp_path / "stack", timeout=180)
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # this stack's login
        monkeypatch.setenv(key, info.env[key])
    try:
        tracker = Tracker(info.mlflow_uri, "outage", "outage-run", flush_s=0.2)
        tracker.retry_s = 0.5
        tracker.log_params({"train.lr": 0.1, "storage.secret_key": "hunter2"})
        for step in range(1, 6):
            tracker.log_metrics(step, {"loss": 1.0 / step})
        tracker.flush()
        stack.down(tmp_path / "stack")  # the server goes away mid-run
        t0 = time.perf_counter()
        for step in range(6, 11):
            tracker.log_metrics(step, {"loss": 1.0 / step})
        tracker.set_tags({"checkpoint.latest_step": "10"})
        tracker.log_dict({"checkpoints": [10]}, "checkpoints/index.json")
        assert time.perf_counter() - t0 < 0.5  # logging never blocks the training thread
        time.sleep(1.5)  # at least one failed send while the server is down
        # A restart during the outage continues its run: no error, everything waits.
        restarted = Tracker(info.mlflow_uri, "outage", "outage-run", run_id=tracker.run_id)
        assert restarted.resumed and restarted.run_url.endswith(f"/#/runs/{tracker.run_id}")
        restarted.retry_s = 0.5
        restarted.log_params({"train.lr": 0.1, "train.steps": 12})
        restarted.log_metrics(11, {"loss": 1.0 / 11})
        stack.up(**ports, state_dir=tmp_path / "stack", timeout=180)  # same database, same run
        tracker.finish()
        restarted.finish()
        client = MlflowClient(tracking_uri=info.mlflow_uri)
        steps = sorted(m.step for m in client.get_metric_history(tracker.run_id, "loss"))
        assert steps == list(range(1, 12))
        run = client.get_run(tracker.run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params["storage.secret_key"] == "***"
        assert run.data.params["train.steps"] == "12"  # the restart's new param, sent late
        assert "hunter2" not in str(run.data.params)
        assert run.data.tags["checkpoint.latest_step"] == "10"
        got = client.download_artifacts(tracker.run_id, "checkpoints/index.json", str(tmp_path))
        assert json.loads(Path(got).read_text()) == {"checkpoints": [10]}
    finally:
        stack.down(tmp_path / "stack")


class _FlakyClient:
    """Stands in for MlflowClient where only the sender's retry logic is under test."""

    def __init__(self) -> None:
        self.up = threading.Event()
        self.metrics: list[Any] = []

    def log_batch(self, run_id: str, metrics: Any = (), tags: Any = ()) -> None:
        if not self.up.is_set():
            raise ConnectionError("connection refused")
        self.metrics.extend(metrics)


def test_buffer_bound_drops_the_oldest_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    tracker = Tracker.__new__(Tracker)  # no server: the sender loop alone
    tracker.client, tracker.run_id = _FlakyClient(), "r"
    tracker.flush_s, tracker.retry_s, tracker.max_buffer, tracker.dropped = 0.0, 0.05, 4, 0
    import queue

    tracker._queue = queue.Queue()
    tracker._thread = threading.Thread(target=tracker._send_loop, daemon=True)
    tracker._thread.start()
    with caplog.at_level(logging.WARNING, logger="darkmatter.trainer.tracking"):
        for step in range(1, 7):
            tracker.log_metrics(step, {"loss": float(step)})
        tracker.flush()
        tracker.client.up.set()
        tracker._queue.put(__import__("darkmatter.trainer.tracking", fromlist=["_STOP"])._STOP)
        tracker._thread.join(timeout=10)
    assert [m.step for m in tracker.client.metrics] == [3, 4, 5, 6]
    assert tracker.dropped == 2
    assert "dropped the 2 oldest metrics" in caplog.text
    assert "MLflow unreachable, buffering" in caplog.text


def _fake_run(tracker: Tracker, lr: float, forward_s: float) -> None:
    tracker.log_params({"train.lr": lr, "train.steps": 20, "train.zero_stage": 2})
    tracker.set_tags({"objective": "mlm", "parameters": 1_500_000, "world_size": 2,
                      "num_nodes": 1, "nodes": "n1", "restarts": 1,
                      "checkpoint.latest": "s3://b/ckpt/step00000020",
                      "checkpoint.latest_step": 20})  # fmt: skip
    for step in (10, 20):
        tracker.log_metrics(step, {
            "loss": 5.0 - step / 10 - lr, "samples_per_s": 100.0 * step, "lr": lr,
            "time/data_s": 0.001, "time/batch_s": 0.004, "time/forward_s": forward_s,
            "time/backward_s": 0.06, "time/optimizer_s": 0.02, "time/other_s": 0.005,
            "checkpoint/committed": 1.0 if step == 10 else 0.0, "checkpoint/step": step,
            "checkpoint/stall_s": 0.01, "memory/max_gb": 1.5, "memory/min_gb": 1.25,
            "skipped_steps": 2.0,
        })  # fmt: skip
    for step in (10, 20):  # as the harness logs them: at the checkpoint's step
        tracker.log_metrics(step, {"eval/topics/linear_probe/accuracy": 0.5 + step / 200 + lr,
                                   "eval/topics/linear_probe/accuracy_random_init": 0.3})  # fmt: skip
    tracker.finish()


def test_runs_show_compare_list_and_plot(stack: Any, tmp_path: Path) -> None:
    a = Tracker(stack.mlflow_uri, "runs-cli", "run-a")
    _fake_run(a, lr=0.001, forward_s=0.01)
    b = Tracker(stack.mlflow_uri, "runs-cli", "run-b")
    _fake_run(b, lr=0.002, forward_s=0.03)

    shown = "\n".join(runs.show_run("run-b"))  # by name
    # forward 30 ms of a 120 ms step: 25.0%
    assert "forward         30.0 ms   25.0%" in shown, shown
    assert "step           120.0 ms" in shown
    assert "restarted 1 time(s)" in shown and "2 step(s) skipped" in shown
    assert "checkpoint(s) not committed at step(s) [20]" in shown
    assert "max 1.50 GB, min 1.25 GB" in shown
    assert "latest checkpoint: step 20 s3://b/ckpt/step00000020" in shown
    assert "eval/topics/linear_probe/accuracy = 0.6020 at step 20 (random init 0.3000)" in shown

    compared = "\n".join(runs.compare_runs(a.run_id, b.run_id))
    assert "train.lr: 0.001 → 0.002" in compared and "train.steps" not in compared
    rows = {ln.split()[0]: ln.split()[1:] for ln in compared.splitlines() if ln.startswith("  ")}
    assert rows["samples_per_s"] == ["2000", "2000", "+0", "(+0.0%)"]
    assert rows["topics/linear_probe/accuracy"] == ["0.6010@20", "0.6020@20"]

    listed = runs.list_runs("runs-cli")
    assert listed[0].split()[:3] == ["RUN", "NAME", "STATUS"]
    assert [ln.split()[1] for ln in listed[1:]] == ["run-b", "run-a"]  # newest first
    assert "topics/linear_probe/accuracy=0.602@20" in listed[1]

    # Three runs, one never evaluated: the latest evaluation of each, side by side.
    c = Tracker(stack.mlflow_uri, "runs-cli", "run-c")
    c.log_params({"train.lr": 0.004, "train.steps": 20, "train.zero_stage": 2})
    c.log_metrics(10, {"loss": 4.0, "samples_per_s": 50.0})
    c.finish()
    three = runs.compare_runs("run-a", "run-b", "run-c")
    assert "  train.lr: 0.001 → 0.002 → 0.004" in three
    header = three.index("evaluation, latest value @ step (task/protocol/metric)")
    assert three[header + 1].split() == ["A", "B", "C"]
    assert three[header + 2].split() == ["topics/linear_probe/accuracy", "0.6010@20",
                                         "0.6020@20", "-"]  # fmt: skip
    assert [ln.split()[:4] for ln in three if ln.startswith("  samples_per_s")] == [
        ["samples_per_s", "2000", "2000", "50"]]  # fmt: skip
    with pytest.raises(ValueError, match="two runs or more"):
        runs.compare_runs("run-a")

    # The plot: loss, throughput and, evaluations logged, the probe's accuracy against step.
    import matplotlib.image

    png = runs.plot([a.run_id, b.run_id, c.run_id], str(tmp_path / "p.png"))
    data = Path(png).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert matplotlib.image.imread(png).shape[1] == 1600  # three panels, 16 inches at 100 dpi
    two = matplotlib.image.imread(runs.plot([c.run_id], str(tmp_path / "c.png")))
    assert two.shape[1] == 1100  # no evaluation: loss and throughput only
    with pytest.raises(ValueError, match="no run folder, run id or run name matches"):
        runs.show_run("no-such-run")


def test_measuring_the_cpu_peak_leaves_the_global_rng_alone() -> None:
    """Measured after a resume restored the RNG state: touching it would change every dropout
    mask that follows, and the resume would no longer be bit-exact."""
    import torch

    from darkmatter.trainer import perf

    state = torch.get_rng_state()
    assert perf.measured_matmul_flops(torch.float32, n=64, seconds=0.01) > 0
    assert torch.equal(state, torch.get_rng_state())


def test_a_continued_run_has_every_step_once(stack: Any) -> None:
    """The dead job logged steps 1-5 and 8-10 (6 and 7 were still queued when it was killed at
    step 10); the new job resumes from the checkpoint at step 8, sends 6 and 7 from
    metrics.jsonl, redoes 9 and 10 without sending them again, and goes on to 12."""
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri=stack.mlflow_uri)
    exp = client.create_experiment(f"every-step-once-{time.time_ns()}")
    run_id = client.create_run(exp).info.run_id
    client.log_batch(
        run_id, metrics=[Metric("loss", 1.0 / s, 0, s) for s in (1, 2, 3, 4, 5, 8, 9, 10)]
    )
    jsonl = {s: {"loss": 1.0 / s, "lr": 0.1} for s in range(1, 11)}  # the dead job's file

    def backfill(have: set[int]) -> list[tuple[int, dict[str, float]]]:
        return [(s, row) for s, row in jsonl.items() if s <= 8 and s not in have]

    tracker = Tracker(stack.mlflow_uri, "unused", "unused", run_id=run_id, flush_s=0.1)
    tracker.backfill = backfill
    for step in (9, 10, 11, 12):  # redone bit for bit, then new
        tracker.log_metrics(step, {"loss": 1.0 / step, "lr": 0.1})
    tracker.finish()
    loss = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
    assert loss == [(s, 1.0 / s) for s in range(1, 13)]  # every step once
    # A step the run has is not sent again, whole: the dead job sent its rows whole (here,
    # only its loss was put in), so redone steps 9 and 10 add no point of any metric.
    assert sorted(m.step for m in client.get_metric_history(run_id, "lr")) == [6, 7, 11, 12]
