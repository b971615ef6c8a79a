"""End to end against the real local stack (SeaweedFS S3 + MLflow servers over HTTP): shards in a
bucket, a 2-process job killed with SIGKILL and started again, which continues from its
checkpoint and the same MLflow run (with the metrics, tags and artifacts a run must have, and
no trace of a secret from its config), then an evaluation logged into that run, `runs show`,
and the export registered in MLflow's model registry."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from darkmatter.storage import write_bytes
from tests.helpers import REPO_ROOT, descendants, run_darkmatter, synthetic_corpus, write_config

pytestmark = [pytest.mark.e2e, pytest.mark.distributed]


def wait_for_checkpoint(root: Path, proc: subprocess.Popen, timeout: float = 240) -> str:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        latest = root / "latest"
        if latest.is_file():
            return latest.read_text().strip()
        if proc.poll() is not None:
            raise AssertionError(
                f"training ended (rc {proc.returncode}) before its first checkpoint"
            )
        time.sleep(0.05)
    raise AssertionError("no checkpoint within the timeout")


def test_sigkill_restart_continues_checkpoint_and_mlflow_run(
    stack, bucket: str, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    corpus = synthetic_corpus(tmp_path / "corpus.txt", n=2000)
    data_url = f"{bucket}/text"
    prep = run_darkmatter(
        "prepare", str(corpus), "--output", data_url, "--modality", "text", "--vocab-size", "200"
    )
    assert prep.returncode == 0, prep.stderr[-2000:]

    run_dir = tmp_path / "run"
    steps = 120
    cfg = write_config(
        tmp_path / "c.yaml", data_url, run_dir,
        train={"steps": steps, "log_every": 5, "micro_batch_size": 16, "zero_stage": 2},
        checkpoint={"every": 20},
        tracking={"enabled": True, "experiment": "e2e", "run_name": "killed-and-resumed"},
        deepspeed={"comet": {"enabled": False, "api_key": SECRET}},  # a secret in the config
    )  # fmt: skip
    cmd = [sys.executable, "-m", "darkmatter.cli", "pretrain", str(cfg), "--nproc", "2"]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO_ROOT,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        tag = wait_for_checkpoint(run_dir / "checkpoints", proc)
    finally:
        tree = descendants(proc.pid)
        for pid in [proc.pid, *tree]:  # the CLI, torchrun and both ranks: no chance to clean up
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert len(tree) >= 3, tree  # torchrun's agent and two workers were running
    killed_at = int(tag.removeprefix("step"))
    assert 0 < killed_at < steps
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]

    again = run_darkmatter("pretrain", str(cfg), "--nproc", "2")
    assert again.returncode == 0, again.stderr[-4000:]
    assert f"resuming from {run_dir / 'checkpoints'}" in again.stderr

    # Every logged step exactly once, continuing across the kill.
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(5, steps + 1, 5))
    assert json.loads((run_dir / "mlflow_run.json").read_text())["run_id"] == run_id
    final = json.loads(
        (run_dir / f"checkpoints/step{steps:08d}/trainer_state_rank1.json").read_text()
    )
    assert final["restarts"] == 1 and final["step"] == steps

    client = MlflowClient(tracking_uri=stack.mlflow_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["restarts"] == "1"
    assert run.data.params["train.steps"] == str(steps)
    history = client.get_metric_history(run_id, "loss")
    logged = sorted({m.step for m in history})
    assert logged[-1] == steps and killed_at + 5 in logged
    runs = client.search_runs([run.info.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # the restart did not open a second run
    _check_run_contents(client, run, run_dir, tmp_path / "artifacts")
    assert SECRET not in again.stderr

    # The evaluation harness logs into the same run at the checkpoint's step.
    texts = [
        f"the red fox number {i}" if i % 2 else f"the blue owl near the river {i}"
        for i in range(100)
    ]
    import io

    buf = io.BytesIO()
    pq.write_table(pa.table({"text": texts, "label": [i % 2 for i in range(100)]}), buf)
    write_bytes(f"{bucket}/tasks/toy.parquet", buf.getvalue())
    ev = run_darkmatter("evaluate", str(run_dir), "--task", f"{bucket}/tasks/toy.parquet")
    assert ev.returncode == 0, ev.stderr[-3000:]
    acc = client.get_metric_history(run_id, "eval/toy/linear_probe/accuracy")
    assert [m.step for m in acc] == [steps] and 0.0 <= acc[0].value <= 1.0
    assert client.get_metric_history(run_id, "eval/toy/linear_probe/accuracy_random_init")

    from darkmatter.evaluation.runs import show_run

    shown = "\n".join(show_run(str(run_dir)))
    assert "where the time went" in shown and "restarted 1 time(s)" in shown, shown
    assert f"eval/toy/linear_probe/accuracy = {acc[0].value:.4f} at step {steps}" in shown

    # The export, registered: a model version linked to the run and step, loadable by MLflow.
    out = tmp_path / "export"
    reg = run_darkmatter("export", str(run_dir), str(out), "--register", "e2e-encoder")
    assert reg.returncode == 0, reg.stderr[-3000:]
    version = client.get_model_version("e2e-encoder", "1")
    assert version.run_id == run_id and version.tags["step"] == str(steps)
    import mlflow.transformers
    import torch
    from transformers import AutoModel

    mlflow.set_tracking_uri(stack.mlflow_uri)
    loaded = mlflow.transformers.load_model("models:/e2e-encoder/1", return_type="components")
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    with torch.no_grad():
        want = AutoModel.from_pretrained(out)(input_ids=ids).last_hidden_state
        assert torch.equal(loaded["model"](input_ids=ids).last_hidden_state, want)


SECRET = "sekrit-6f1d0c"


def _check_run_contents(client: MlflowClient, run, run_dir: Path, dest: Path) -> None:  # type: ignore[no-untyped-def]
    """What every training run in MLflow holds, and the secret nowhere in it."""
    m, tags, params = run.data.metrics, run.data.tags, run.data.params
    for key in ("loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "mfu",
                "model_tflops_per_s", "time/data_s", "time/forward_s", "time/backward_s",
                "time/optimizer_s", "memory/max_gb", "memory/min_gb", "data_mb_per_s",
                "checkpoint/write_s", "skipped_steps"):  # fmt: skip
        assert key in m, key
    assert 0 < m["mfu"] < 1 and m["memory/max_gb"] >= m["memory/min_gb"] > 0
    assert 0 < m["time/forward_s"] < m["time/step_s"]
    assert tags["world_size"] == "2" and tags["num_nodes"] == "1" and tags["nodes"]
    assert len(tags["git_sha"]) == 40 and tags["objective"] == "mlm"
    assert int(tags["parameters"]) > 0 and tags["deepspeed"] and tags["torch"]
    assert params["mfu.peak_source"] == "measured" and float(params["mfu.peak_flops"]) > 0
    assert params["deepspeed.comet.api_key"] == "***"
    root = client.download_artifacts(run.info.run_id, "", str(dest))
    files = {str(p.relative_to(root)): p.read_text() for p in Path(root).rglob("*") if p.is_file()}
    assert {"config.yaml", "deepspeed_config.json", "environment.json",
            "checkpoints/index.json"} <= set(files)  # fmt: skip
    index = json.loads(files["checkpoints/index.json"])["checkpoints"]
    committed = sorted(p.parent.name for p in (run_dir / "checkpoints").glob("step*/COMMIT.json"))
    assert [e["tag"] for e in index] == committed
    assert index[-1]["uri"] == str(run_dir / "checkpoints" / committed[-1])
    assert tags["checkpoint.latest"] == index[-1]["uri"]
    env = json.loads(files["environment.json"])
    assert env["world_size"] == 2 and env["versions"]["deepspeed"] == tags["deepspeed"]
    everything = [*params.values(), *tags.values(), *files.values()]
    assert not [x for x in everything if SECRET in x]
    # The credentials the trainer authenticated with (the stack's MLflow and S3) are nowhere.
    for var in ("MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY"):
        assert not [x for x in everything if os.environ[var] in x], var
    assert "AWS_SECRET_ACCESS_KEY" not in files["environment.json"]
