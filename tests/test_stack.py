"""The local stack: real moto and MLflow servers over HTTP on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from darkmatter import storage
from darkmatter.quickstart import stack as stack_mod
from tests.helpers import free_port


def test_s3_round_trip_through_storage(stack: stack_mod.StackInfo, bucket: str) -> None:
    url = storage.join(bucket, "shards", "hello.bin")
    storage.write_bytes(url, b"dark\x00matter")
    assert storage.read_bytes(url) == b"dark\x00matter"
    assert storage.exists(url)
    storage.check_bucket(f"s3://{stack_mod.DEFAULT_BUCKET}")  # `up` created the default bucket


def test_mlflow_run_is_logged(stack: stack_mod.StackInfo, tmp_path: Path) -> None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=stack.mlflow_uri)
    exp_id = client.create_experiment(f"test-stack-{time.time_ns()}")
    run = client.create_run(exp_id)
    client.log_metric(run.info.run_id, "loss", 0.25, step=3)
    artifact = tmp_path / "note.txt"
    artifact.write_text("proxied over HTTP")
    client.log_artifact(run.info.run_id, str(artifact))
    client.set_terminated(run.info.run_id)

    found = client.search_runs([exp_id])
    assert [r.info.run_id for r in found] == [run.info.run_id]
    assert found[0].data.metrics["loss"] == 0.25
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert [f.path for f in client.list_artifacts(run.info.run_id)] == ["note.txt"]
    assert (Path(stack.state_dir) / "artifacts").is_dir()


def test_up_on_taken_port_names_the_port(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        with pytest.raises(
            stack_mod.StackError, match=f"port {taken} on 127.0.0.1 is already in use"
        ):
            stack_mod.up(s3_port=taken, mlflow_port=free_port(), state_dir=tmp_path, timeout=5)
    assert not list(tmp_path.glob("*.pid"))  # nothing was started


def test_up_again_is_a_no_op(stack: stack_mod.StackInfo) -> None:
    again = stack_mod.up(state_dir=stack.state_dir)
    assert again.already_running
    assert (again.s3_endpoint, again.mlflow_uri) == (stack.s3_endpoint, stack.mlflow_uri)


def test_cli_status_names_both_services(
    stack: stack_mod.StackInfo, capsys: pytest.CaptureFixture[str]
) -> None:
    assert stack_mod.cli(["status"]) == 0  # DARKMATTER_STACK_DIR points at the session stack
    out = capsys.readouterr().out
    for line_start, url in (("s3", stack.s3_endpoint), ("mlflow", stack.mlflow_uri)):
        line = next(ln for ln in out.splitlines() if ln.startswith(line_start))
        assert url in line and "healthy: yes" in line


def test_cli_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = str(holder.getsockname()[1])
        args = [
            "up",
            "--state-dir",
            str(tmp_path),
            "--s3-port",
            str(free_port()),
            "--mlflow-port",
            taken,
        ]
        assert stack_mod.cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("darkmatter stack: error: port " + taken)
    assert "DARKMATTER_MLFLOW_PORT" in err


def test_load_env_defaults_keeps_callers_values(
    stack: stack_mod.StackInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://elsewhere:1")
    assert stack_mod.load_env_defaults(stack.state_dir)
    assert os.environ["AWS_ENDPOINT_URL"] == stack.s3_endpoint
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://elsewhere:1"
    assert not stack_mod.load_env_defaults(Path(stack.state_dir) / "nothing-here")
