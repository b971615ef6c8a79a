"""launch/slurm/pretrain.sbatch on a real single-host SLURM (tests/slurm_cluster.py): SIGUSR1
delivered by SLURM to the job's tasks, a preemption checkpoint, `scontrol requeue` from rank 0,
and the requeued job resuming in the same run folder and MLflow run until it completes.

Skipped where SLURM is not installed (launch/ensure_slurm.sh installs it) or cannot run here.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from darkmatter.trainer import checkpoint as ckpt
from tests import slurm_cluster
from tests.helpers import REPO_ROOT, free_port, metrics, write_config

pytestmark = pytest.mark.distributed

SCRIPT = REPO_ROOT / "launch" / "slurm" / "pretrain.sbatch"
STEPS = 120
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


@pytest.fixture
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[slurm_cluster.SlurmCluster]:
    """A running single-host cluster; skips when SLURM is missing or cannot start here."""
    reason = slurm_cluster.unavailable()
    if reason:
        pytest.skip(reason)
    with contextlib.ExitStack() as running:
        try:
            c = running.enter_context(slurm_cluster.cluster(tmp_path_factory.mktemp("slurm")))
        except slurm_cluster.SlurmError as e:
            pytest.skip(f"a test SLURM cluster cannot start here: {e}")
        yield c


def last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return json.loads(lines[-1])["step"] if lines else 0


def wait_for(what: str, cond: Any, c: slurm_cluster.SlurmCluster, job: int, timeout: float,
             output: Path) -> None:  # fmt: skip
    deadline = time.monotonic() + timeout
    checked = 0.0
    while time.monotonic() < deadline:
        if cond():
            return
        if time.monotonic() - checked > 1:  # scontrol is a process: not 20 a second on 2 cores
            checked = time.monotonic()
            state = c.job(job).get("JobState", "")
            if state in TERMINAL:
                log = output.read_text()[-3000:] if output.is_file() else "no output"
                raise AssertionError(f"job {job} ended ({state}) before {what}: {log}")
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.mark.slow  # make test keeps under 20 min; CI runs it in the slow tier
def test_usr1_checkpoints_requeues_and_the_job_resumes_to_completion(
    slurm: slurm_cluster.SlurmCluster, stack: Any, text_ds: str, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    work = tmp_path / "work"  # the job's working folder: RUN_DIR defaults to runs/slurm-JOBID
    work.mkdir()
    cfg = write_config(
        tmp_path / "c.yaml", text_ds, Path("unused"),
        train={"zero_stage": 2, "steps": STEPS, "log_every": 1},
        checkpoint={"every": 1000},  # only the preemption checkpoint and the final one
        tracking={"enabled": True, "tracking_uri": stack.mlflow_uri, "experiment": "slurm"},
    )  # fmt: skip
    output = tmp_path / "job.out"
    job = slurm.sbatch(
        "--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1", f"--output={output}", str(SCRIPT), str(cfg),
        env={"DARKMATTER": f"{sys.executable} -m darkmatter.cli", "MASTER_PORT": str(free_port())},
        cwd=work,
    )  # fmt: skip
    run_dir = work / "runs" / f"slurm-{job}"
    info = slurm.job(job)
    assert info["NumTasks"] == "2" and info["Requeue"] == "1"
    assert info["TresPerNode"] == "gres:gpu:2"  # --gpus-per-node (stand-in GPUs: a count)

    wait_for("step 5", lambda: last_step(run_dir) >= 5, slurm, job, 90, output)
    slurm.run("scancel", "--signal=USR1", str(job))  # what --signal=USR1@300 sends at grace time
    requeued = lambda: "requeued SLURM job" in output.read_text()  # noqa: E731
    wait_for("the requeue", requeued, slurm, job, 60, output)
    stopped = last_step(run_dir)
    before = (run_dir / "metrics.jsonl").read_text()  # the first start's lines
    root = run_dir / "checkpoints"
    assert ckpt.committed_tags(str(root)) == [ckpt.tag_for(stopped)]  # the preemption checkpoint
    for rank in (0, 1):  # both ranks saved the same step
        assert ckpt.read_rank_state(root / ckpt.tag_for(stopped), rank, False)["step"] == stopped
    assert 5 <= stopped < STEPS

    info = slurm.wait_state(job, TERMINAL, 120)
    log = output.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    assert info["Restarts"] == "1"
    # Both starts in one file (--open-mode=append), the second resuming where the first stopped.
    assert log.count(f"darkmatter-slurm: job {job} start") == 2, log[-3000:]
    assert (
        f"job {job} start 2 on localhost: 2 tasks, run dir runs/slurm-{job}, rendezvous "
        "localhost:" in log
    )  # MASTER_ADDR: the first host of the job's node list
    assert log.count("SIGUSR1 received") >= 2  # every rank got it from SLURM
    assert f"requeued SLURM job {job}" in log
    assert log.count("resuming from") == 1 and f"(step {stopped})" in log  # rank 0 says it

    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # each step once
    assert (run_dir / "metrics.jsonl").read_text().startswith(before)  # nothing redone
    assert ckpt.committed_tags(str(root)) == [ckpt.tag_for(stopped), ckpt.tag_for(STEPS)]
    final = ckpt.read_rank_state(root / ckpt.tag_for(STEPS), 0, False)
    assert final["restarts"] == 1

    client = MlflowClient(tracking_uri=stack.mlflow_uri)
    experiment = client.get_experiment_by_name("slurm")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # one MLflow run across both starts
    run = runs[0]
    assert run.info.run_id == json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    assert run.info.run_name == f"slurm-{job}"
    assert run.info.status == "FINISHED"
    assert run.data.tags["restarts"] == "1"
    assert run.data.tags["preempted"] == "true" and run.data.tags["preempt_signal"] == "SIGUSR1"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))
