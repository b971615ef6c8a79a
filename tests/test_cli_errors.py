"""Bad input gets one clear error line naming the problem and a non-zero exit, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

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
    assert "objective 'mae' trains on image" in line and "holds text shards" in line
