"""The local stack: real SeaweedFS (S3) and MLflow servers over HTTP on 127.0.0.1."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
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


def test_load_env_defaults_takes_a_service_whole_or_not_at_all(
    stack: stack_mod.StackInfo, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The caller names another MLflow server, and left the S3 variables unset.
    for key in stack_mod.SERVICE_VARS["s3"] + stack_mod.SERVICE_VARS["mlflow"]:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://elsewhere:1")
    monkeypatch.setattr(stack_mod, "_taken", {})
    with caplog.at_level(logging.INFO, logger=stack_mod.__name__):
        assert stack_mod.load_env_defaults(stack.state_dir)
    assert os.environ["AWS_ENDPOINT_URL"] == stack.s3_endpoint
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == stack.env["AWS_SECRET_ACCESS_KEY"]
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://elsewhere:1"
    # The stack's MLflow credentials never go to another server.
    assert "MLFLOW_TRACKING_PASSWORD" not in os.environ
    lines = [r.getMessage() for r in caplog.records]
    assert any("AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY" in ln for ln in lines)
    assert any("MLFLOW_TRACKING_URI is set: its mlflow is not used" in ln for ln in lines)
    assert not stack_mod.load_env_defaults(Path(stack.state_dir) / "nothing-here")


def test_credentials_of_a_real_endpoint_get_no_local_endpoint_beside_them(
    stack: stack_mod.StackInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A user who set keys for their real S3 and forgot AWS_ENDPOINT_URL: nothing is filled in,
    # so the keys go to AWS (and fail there, loudly), never to localhost.
    for key in stack_mod.SERVICE_VARS["s3"]:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAREALKEY")
    monkeypatch.setattr(stack_mod, "_taken", {})
    assert stack_mod.load_env_defaults(stack.state_dir)
    assert "AWS_ENDPOINT_URL" not in os.environ
    assert os.environ["AWS_ACCESS_KEY_ID"] == "AKIAREALKEY"
    assert os.environ["MLFLOW_TRACKING_URI"] == stack.mlflow_uri


def test_config_naming_another_tracking_server_releases_the_stacks(
    stack: stack_mod.StackInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in stack_mod.SERVICE_VARS["mlflow"]:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(stack_mod, "_taken", {})
    assert stack_mod.load_env_defaults(stack.state_dir)
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == stack.env["MLFLOW_TRACKING_PASSWORD"]
    stack_mod.release_unless("mlflow", stack.mlflow_uri + "/")  # the stack itself: kept
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == stack.env["MLFLOW_TRACKING_PASSWORD"]
    stack_mod.release_unless("mlflow", "https://mlflow.example.org")
    assert "MLFLOW_TRACKING_PASSWORD" not in os.environ
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_mlflow_refuses_requests_without_credentials(stack: stack_mod.StackInfo) -> None:
    import requests

    search = stack.mlflow_uri + "/api/2.0/mlflow/experiments/search?max_results=1"
    assert requests.get(search, timeout=10).status_code == 401
    wrong = (stack.env["MLFLOW_TRACKING_USERNAME"], "not-the-password")
    assert requests.get(search, auth=wrong, timeout=10).status_code == 401
    right = (stack.env["MLFLOW_TRACKING_USERNAME"], stack.env["MLFLOW_TRACKING_PASSWORD"])
    assert requests.get(search, auth=right, timeout=10).status_code == 200
    assert requests.get(stack.mlflow_uri + "/health", timeout=10).status_code == 200
    # S3 too: anonymous and wrongly signed requests are refused.
    assert (
        requests.get(f"{stack.s3_endpoint}/{stack_mod.DEFAULT_BUCKET}", timeout=10).status_code
        == 403
    )


# A client that writes objects of mixed sizes (one multipart) without pause and records each
# one only after the server acknowledged it: "key sha256" lines, fsync'd.
_WRITER = textwrap.dedent("""
    import hashlib, os, sys, boto3
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    with open(sys.argv[1], "a") as log:
        for i in range(100000):
            body = os.urandom([1000, 300_000, 9 * 2**20][i % 3])
            s3.upload_fileobj(__import__("io").BytesIO(body), "darkmatter", f"w/{i:06d}")
            log.write(f"w/{i:06d} {hashlib.sha256(body).hexdigest()}\\n")
            log.flush()
            os.fsync(log.fileno())
""")


def _s3(info: stack_mod.StackInfo):  # type: ignore[no-untyped-def]
    """A client with this stack's keys (boto3's default session keeps the first keys it saw)."""
    import boto3

    return boto3.client(
        "s3", endpoint_url=info.s3_endpoint, aws_access_key_id=info.env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=info.env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1",
    )  # fmt: skip


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.slow  # make test keeps under 20 min; CI runs it in the slow tier
def test_data_survives_down_up_and_a_sigkill_mid_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import mlflow

    sdir = tmp_path / "stack"
    with stack_mod.private(sdir) as info:
        s3 = _s3(info)
        before = {f"a/{i}": os.urandom(n) for i, n in enumerate((0, 1, 5000, 12 * 2**20))}
        for key, body in before.items():
            s3.put_object(Bucket="darkmatter", Key=key, Body=body)
        # Named: mlflow.set_tracking_uri by an earlier test would win over the variable.
        client = mlflow.MlflowClient(tracking_uri=info.mlflow_uri)
        run_id = client.create_run("0").info.run_id
        client.log_metric(run_id, "loss", 1.5, step=7)
    assert not any(s.healthy for s in stack_mod.status(sdir))  # `down` stopped both

    acked = tmp_path / "acked.txt"
    with stack_mod.private(sdir) as info:
        s3 = _s3(info)
        for key, body in before.items():  # down, up: every object, byte for byte
            assert s3.get_object(Bucket="darkmatter", Key=key)["Body"].read() == body
        client = mlflow.MlflowClient(tracking_uri=info.mlflow_uri)
        assert client.get_run(run_id).data.metrics == {"loss": 1.5}
        writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(acked)], env=os.environ)
        try:
            while _lines(acked) < 8:
                assert writer.poll() is None, "the writer died before the kill"
                time.sleep(0.05)
            server = int((sdir / "s3.pid").read_text())
            os.killpg(server, signal.SIGKILL)  # mid-write: the writer is in a PUT right now
            assert writer.wait(timeout=60) != 0  # its PUT in flight failed
        finally:
            writer.kill()
    lines = acked.read_text().splitlines()
    with stack_mod.private(sdir) as info:
        s3 = _s3(info)
        for line in lines:  # every acknowledged object is there with the same bytes
            key, digest = line.split()
            got = s3.get_object(Bucket="darkmatter", Key=key)["Body"].read()
            assert hashlib.sha256(got).hexdigest() == digest, key
        assert s3.get_object(Bucket="darkmatter", Key="a/3")["Body"].read() == before["a/3"]
    assert len(lines) >= 8

    # Only --purge deletes, and it says what.
    assert stack_mod.cli(["down", "--purge", "--state-dir", str(sdir)]) == 0
    out = capsys.readouterr().out
    assert "deleted all stack data" in out and str(sdir / "s3") in out
    assert not (sdir / "s3").exists() and not (sdir / "mlflow.db").exists()


def test_status_shows_where_the_data_lives(
    stack: stack_mod.StackInfo, bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    storage.write_bytes(storage.join(bucket, "blob"), os.urandom(3 * 2**20))
    assert stack_mod.cli(["status"]) == 0
    out = capsys.readouterr().out
    data_line = next(
        ln for ln in out.splitlines() if ln.endswith(str(Path(stack.state_dir) / "s3"))
    )
    number, unit = data_line.split()[:2]
    assert unit == "MiB" and float(number) >= 3.0


def test_outside_the_stack_a_missing_tracking_uri_is_one_line_naming_it(
    text_ds: str, tmp_path: Path
) -> None:
    from tests.helpers import write_config

    cfg = write_config(tmp_path / "c.yaml", text_ds, tmp_path / "run", tracking={"enabled": True})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DARKMATTER_STACK"))}
    env["DARKMATTER_STACK_DIR"] = str(tmp_path / "no-stack")  # no stack up there
    out = subprocess.run(
        [sys.executable, "-m", "darkmatter.cli", "pretrain", str(cfg)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert out.returncode == 2
    err = [ln for ln in out.stderr.splitlines() if "error" in ln]
    assert len(err) == 1 and "MLFLOW_TRACKING_URI is not set" in err[0], out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "run" / "mlflow_run.json").exists()
