"""Bad input gets one clear error line naming the problem and a non-zero exit, no traceback."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from darkmatter import cli
from darkmatter.data_pipeline.prepare import prepare
from tests.helpers import free_port, run_darkmatter, synthetic_corpus, write_config


def error_line(proc) -> str:  # type: ignore[no-untyped-def]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ": error: " in ln]
    assert len(errors) == 1, proc.stderr[-2000:]
    line: str = errors[0]
    return line


def test_missing_bucket(stack, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    corpus = synthetic_corpus(tmp_path / "c.txt", n=20)
    out = run_darkmatter(
        "prepare", str(corpus), "--output", "s3://no-such-bucket-dm/x", "--modality", "text"
    )
    assert "bucket 'no-such-bucket-dm' does not exist" in error_line(out)
    cfg = write_config(tmp_path / "c.yaml", "s3://no-such-bucket-dm/ds", tmp_path / "run")
    line = error_line(run_darkmatter("pretrain", str(cfg), "--nproc", "2"))
    assert "bucket 'no-such-bucket-dm' does not exist (from s3://no-such-bucket-dm/ds)" in line


def test_empty_input_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    out = run_darkmatter(
        "prepare", str(tmp_path / "empty"), "--output", str(tmp_path / "o"), "--modality", "image"
    )
    line = error_line(out)
    assert "no images found" in line and str(tmp_path / "empty") in line


def test_malformed_config(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("objective: mlm\ntrain: {steps: 3\n")
    line = error_line(run_darkmatter("pretrain", str(p)))
    assert "bad.yaml" in line and "malformed YAML" in line


def test_unreachable_mlflow(tmp_path: Path) -> None:
    corpus = synthetic_corpus(tmp_path / "c.txt", n=50)
    prepare([str(corpus)], str(tmp_path / "ds"), modality="text", vocab_size=100)
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cfg = write_config(tmp_path / "c.yaml", str(tmp_path / "ds"), tmp_path / "run",
                       tracking={"enabled": True, "tracking_uri": uri})  # fmt: skip
    line = error_line(run_darkmatter("pretrain", str(cfg), "--nproc", "2"))
    assert f"MLflow tracking server at {uri} is unreachable" in line
    assert not (tmp_path / "run").exists()  # nothing was started


@pytest.mark.parametrize(
    ("device", "says"),
    [("cuda", "evaluation.device: cuda asked for, but torch sees no GPU"),
     ("tpu", "evaluation.device: 'tpu' is not auto, cpu, cuda or cuda:N")],
)  # fmt: skip
def test_evaluation_device_that_is_not_there(tmp_path: Path, device: str, says: str) -> None:
    """Before anything is read (the checkpoint named does not even exist)."""
    if device == "cuda":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    out = run_darkmatter("evaluate", str(tmp_path / "nothing"), "--task", "t.parquet",
                         "--device", device)  # fmt: skip
    assert says in error_line(out)


def test_dataset_not_prepared(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", str(tmp_path / "nothing"), tmp_path / "run")
    line = error_line(run_darkmatter("pretrain", str(cfg)))
    assert "no manifest.json" in line and str(tmp_path / "nothing") in line


@pytest.mark.parametrize("objective", ["mae"])
def test_objective_modality_mismatch(tmp_path: Path, objective: str) -> None:
    corpus = synthetic_corpus(tmp_path / "c.txt", n=50)
    prepare([str(corpus)], str(tmp_path / "ds"), modality="text", vocab_size=100)
    cfg = write_config(
        tmp_path / "c.yaml", str(tmp_path / "ds"), tmp_path / "run", objective=objective
    )
    line = error_line(run_darkmatter("pretrain", str(cfg)))
    assert f"objective: '{objective}' trains on image data, but data.url" in line
    assert "holds text data" in line


# -- storage and MLflow out of reach, crashes, out of memory: in process, through cli.main ----


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """A clean environment for darkmatter.cli.main in this process: no local stack to find,
    no AWS files or instance metadata, one try per S3 request (botocore would retry a refused
    connection for seconds), crash logs under tmp_path; restored afterwards."""
    saved = dict(os.environ)
    monkeypatch.chdir(tmp_path)
    os.environ.update(
        DARKMATTER_STACK_DIR=str(tmp_path / "no-stack"), AWS_MAX_ATTEMPTS="1",
        AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_DEFAULT_REGION="us-east-1",
        AWS_ACCESS_KEY_ID="id", AWS_SECRET_ACCESS_KEY="secret", DARKMATTER_DEBUG="",
    )  # fmt: skip
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "MLFLOW_TRACKING_URI",
                "RANK", "WORLD_SIZE"):  # fmt: skip
        os.environ.pop(var, None)
    yield tmp_path
    os.environ.clear()
    os.environ.update(saved)


def main_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """(exit code, the one line on stderr) of `darkmatter ARGV`, run in this process."""
    code = cli.main(argv)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("darkmatter ")]
    assert len(lines) == 1, lines
    return code, lines[0]


def test_storage_out_of_reach_is_one_line_per_command(
    cli_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    corpus = synthetic_corpus(cli_env / "c.txt", n=20)
    cfg = write_config(cli_env / "c.yaml", "s3://dm-data/ds", cli_env / "run")
    commands = {
        "prepare": ["prepare", str(corpus), "--output", "s3://dm-data/x", "--modality", "text"],
        "pretrain": ["pretrain", str(cfg), "--nproc", "2"],  # the launcher's checks, no ranks
        "evaluate": [
            "evaluate",
            "s3://dm-data/run",
            "--task",
            "s3://dm-data/t.parquet",
            "--no-mlflow",
        ],  # the task is checked first: on the same storage
        "export": ["export", "s3://dm-data/run", str(cli_env / "out")],
    }
    for name, argv in commands.items():
        code, line = main_line(argv, capsys)
        assert code == 2, (name, line)
        assert line.startswith(f"darkmatter {name}: error: cannot reach object storage at "
                               f"{endpoint} (AWS_ENDPOINT_URL) to access s3://dm-data/"), line  # fmt: skip
        assert "connection refused" in line and "`darkmatter stack up` starts it" in line, line
    assert not (cli_env / ".darkmatter").exists()  # user errors leave no crash log


def test_missing_credentials_name_the_variables(
    cli_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = synthetic_corpus(cli_env / "c.txt", n=20)
    argv = ["prepare", str(corpus), "--output", "s3://dm-data/x", "--modality", "text"]
    os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
    del os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
    code, line = main_line(argv, capsys)
    assert code == 2
    assert ("no credentials to access s3://dm-data/x: AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY are not set") in line  # fmt: skip
    assert "`darkmatter stack up` starts it and sets them" in line
    # One of the two: botocore's PartialCredentialsError, named the same way.
    os.environ["AWS_ACCESS_KEY_ID"] = "id"
    os.environ["AWS_ENDPOINT_URL"] = "https://s3.example.com"  # not local: no stack hint
    code, line = main_line(argv, capsys)
    assert code == 2 and line.endswith(": AWS_SECRET_ACCESS_KEY is not set"), line


def test_describe_storage_error_tells_unreachable_from_other_failures(
    cli_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from botocore.exceptions import EndpointConnectionError

    from darkmatter.storage import StorageUnreachable, describe_storage_error, is_permanent

    refused = EndpointConnectionError(endpoint_url="https://b.s3.amazonaws.com/k")
    refused.__cause__ = ConnectionRefusedError(111, "Connection refused")
    err = describe_storage_error(refused, "s3://b/k")
    # Never answered this process: a setting to fix, reported at once (not retried).
    assert isinstance(err, StorageUnreachable) and not err.transient and is_permanent(err)
    from darkmatter.storage import errors

    monkeypatch.setattr(errors, "_answered", {""})  # AWS's default endpoint answered before
    err = describe_storage_error(refused, "s3://b/k")
    assert isinstance(err, StorageUnreachable) and err.transient and not is_permanent(err)
    assert str(err) == (  # no endpoint set: botocore's, and no stack hint (not this machine)
        "cannot reach object storage at https://b.s3.amazonaws.com/k (AWS_ENDPOINT_URL is not "
        "set) to access s3://b/k: connection refused (nothing listens there)"
    )
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://user:pw@localhost:9000")
    assert describe_storage_error(ValueError("bad header"), "s3://b/k") is None
    wrapped = OSError("reading failed")
    wrapped.__context__ = refused
    line = str(describe_storage_error(wrapped, "s3://b/k"))
    assert line.startswith("cannot reach object storage at http://***@localhost:9000 "
                           "(AWS_ENDPOINT_URL_S3) to access s3://b/k")  # fmt: skip
    assert line.endswith("; if that is the local stack, `darkmatter stack up` starts it")


def test_unreachable_mlflow_for_runs_and_in_any_error_chain(
    cli_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    code, line = main_line(["runs", "list"], capsys)
    assert code == 2
    assert line == (f"darkmatter runs: error: MLflow tracking server at {uri} is unreachable "
                    "(ConnectionError, from MLFLOW_TRACKING_URI); if that is the local stack, "
                    "`darkmatter stack up` starts it")  # fmt: skip
    # MLflow's client giving up after its retries, deep inside some command: the same line.
    from mlflow.exceptions import MlflowException

    deep = MlflowException(f"API request to {uri}/api/2.0/mlflow/runs/get failed with exception "
                           "HTTPConnectionPool(host='127.0.0.1'): Max retries exceeded")  # fmt: skip
    try:
        raise KeyError("outer") from deep
    except KeyError as e:
        assert cli.user_error(e) == (f"MLflow tracking server at {uri} is unreachable (from "
                                     "MLFLOW_TRACKING_URI); if that is the local stack, "
                                     "`darkmatter stack up` starts it")  # fmt: skip
    assert not (cli_env / ".darkmatter").exists()


def _boom(argv: list[str]) -> int:
    return {"known": 1}[argv[0]]  # a bug: KeyError, raised outside darkmatter's own raises


def test_crash_prints_a_line_and_keeps_the_traceback(
    cli_env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "pretrain_main", _boom)
    code, line = main_line(["pretrain", "cfg.yaml", "train.tracking_uri=http://u:pw@h/"], capsys)
    assert code == 1
    m = re.fullmatch(r"darkmatter pretrain: crashed: KeyError: 'cfg.yaml' \(full traceback in "
                     r"(\S+); --debug prints it\)", line)  # fmt: skip
    assert m, line
    log = Path(m.group(1))
    assert log.parent == cli_env / ".darkmatter" and re.fullmatch(
        r"crash-pretrain-\d{8}-\d{6}\.log", log.name
    )
    text = log.read_text()
    assert "command: darkmatter pretrain cfg.yaml train.tracking_uri=http://***@h/" in text
    assert "Traceback (most recent call last)" in text and "in _boom" in text
    assert "pw" not in text and [p.name for p in log.parent.iterdir()] == [log.name]
    # A RuntimeError from inside torch is a crash too; one raised by our code is a user error.
    monkeypatch.setattr(cli, "pretrain_main", lambda argv: (torch.zeros(2) @ torch.zeros(3)).item())
    code, line = main_line(["pretrain", "cfg.yaml"], capsys)
    assert code == 1 and line.startswith("darkmatter pretrain: crashed: RuntimeError: "), line
    assert len(list(log.parent.iterdir())) == 2  # a second crash in the same second: its own log
    # --debug, before or after the command, and DARKMATTER_DEBUG=1: the traceback itself.
    monkeypatch.setattr(cli, "pretrain_main", _boom)
    for argv in (["--debug", "pretrain", "cfg.yaml"], ["pretrain", "cfg.yaml", "--debug"]):
        os.environ["DARKMATTER_DEBUG"] = ""
        with pytest.raises(KeyError, match="cfg.yaml"):
            cli.main(argv)
        assert os.environ["DARKMATTER_DEBUG"] == "1"  # torchrun's workers inherit it


def test_out_of_memory_names_rank_step_and_memory(
    cli_env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from darkmatter.trainer import train

    gib = 2**30  # a GPU, as torch.cuda would describe it mid-step
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev=None: 70 * gib)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda dev=None: int(77.5 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev=None: 78 * gib)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda dev: SimpleNamespace(total_memory=80 * gib))  # fmt: skip

    class FakeTrainer:  # what run_worker uses of a Trainer; its step runs out of memory
        def __init__(self, cfg: Any, objective: Any, rank: int, world_size: int) -> None:
            self.pos, self.tracker = SimpleNamespace(step=16), None
            self.stream = SimpleNamespace(close=lambda: None)

        def train(self) -> Any:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 "
                                         "has a total capacity of 80.00 GiB")  # fmt: skip

    monkeypatch.setattr(train, "preflight", lambda cfg: None)
    monkeypatch.setattr(train.eng, "init_distributed", lambda timeout_s: (3, 4, 3))
    monkeypatch.setattr(train.eng, "shutdown", lambda: None)
    monkeypatch.setattr(train, "Trainer", FakeTrainer)
    cfg = SimpleNamespace(
        faults=SimpleNamespace(collective_timeout_s=60.0),
        train=SimpleNamespace(deterministic=False),
    )
    monkeypatch.setattr(cli, "pretrain_main", lambda argv: train.run_worker(cfg))  # type: ignore[arg-type]
    code, line = main_line(["pretrain", "cfg.yaml"], capsys)
    assert code == 1
    assert line.startswith(
        "darkmatter pretrain: error: out of memory on rank 3 at step 17: 70.00 GiB allocated "
        "(peak 77.50 GiB), 78.00 GiB reserved, of 80.00 GiB on cuda:0; tried to allocate "
        "2.50 GiB; lower train.micro_batch_size"
    ), line
    log = Path(re.search(r"\(traceback: (\S+)\)$", line).group(1))  # type: ignore[union-attr]
    assert "torch.OutOfMemoryError: CUDA out of memory" in log.read_text()
