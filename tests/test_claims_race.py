"""Claims under races, on the test stack's real S3 server and on a local folder: simultaneous
acquires give one holder; a holder that stalls past its lease can neither release, complete nor
renew the claim of the harness that took over; and two harnesses (one a real process frozen
with SIGSTOP past its lease, twice) evaluate each checkpoint of a real MLflow run exactly once.

The evaluation itself is a stand-in that counts its calls (the checkpoint reading and the
protocols have their own tests): what is under test is who evaluates and who reports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from darkmatter import storage
from darkmatter.evaluation import claims
from tests.helpers import REPO_ROOT

FIRST = "eval/toy/linear_probe/accuracy"  # the harness's first metric key for SPEC
VALUE = {"a": 0.25, "b": 0.75}  # what each harness's stand-in evaluation reports


@pytest.fixture(params=["s3", "local"])
def state(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The harness state folder: a prefix on the stack's S3 server, or a local folder."""
    if request.param == "s3":
        return str(request.getfixturevalue("bucket")) + "/eval"
    return str(tmp_path / "eval")


def _record(url: str) -> dict[str, Any]:
    got = storage.read_versioned(url)
    assert got is not None, url
    parsed: dict[str, Any] = json.loads(got[0])
    return parsed


def test_a_stale_holder_cannot_release_complete_or_renew(state: str) -> None:
    url = storage.join(state, "claims", "run", "step00000010.json")
    a = claims.try_claim(url, "harness-a", ttl_s=0.5)
    assert a is not None
    time.sleep(0.7)  # a stalls (its renewals stop) past its lease
    b = claims.try_claim(url, "harness-b", ttl_s=30.0)
    assert b is not None
    held = storage.read_versioned(url)
    # a wakes up and finishes in every way it can: each write is refused, b's claim stands.
    assert not a.release() and a.lost
    assert not a.complete() and not a.renew()
    assert storage.read_versioned(url) == held
    assert claims.try_claim(url, "harness-c", ttl_s=30.0) is None  # b's claim is live
    assert b.renew() and b.complete()
    assert {k: _record(url)[k] for k in ("owner", "state", "token")} == {
        "owner": "harness-b", "state": "done", "token": b.token}  # fmt: skip
    assert not b.release()  # completed: releasing does not rewrite it
    c = claims.try_claim(url, "harness-c", ttl_s=30.0)  # done frees it (MLflow's tag decides)
    assert c is not None and c.release()
    assert _record(url)["owner"] == "harness-c" and _record(url)["state"] == "released"


def test_a_restart_under_the_same_id_keeps_its_claim_from_the_old_process(state: str) -> None:
    url = storage.join(state, "claims", "run", "step00000020.json")
    old = claims.try_claim(url, "pod-0", ttl_s=30.0)
    new = claims.try_claim(url, "pod-0", ttl_s=30.0)  # the pod restarted; the old one stalled
    assert old is not None and new is not None
    assert not old.release() and not old.complete()  # same name, other claim: refused
    assert _record(url)["token"] == new.token and _record(url)["state"] == "held"
    assert claims.try_claim(url, "harness-c", ttl_s=30.0) is None


@pytest.mark.parametrize("existing", ["none", "expired"])
def test_simultaneous_acquires_give_one_holder(state: str, existing: str) -> None:
    url = storage.join(state, "claims", "run", f"race-{existing}.json")
    if existing == "expired":
        assert claims.try_claim(url, "gone", ttl_s=0.01) is not None
        time.sleep(0.05)
    n = 8
    start = threading.Barrier(n)
    won: list[str] = []

    def contend(i: int) -> None:
        start.wait()
        if claims.try_claim(url, f"harness-{i}", ttl_s=30.0) is not None:
            won.append(f"harness-{i}")

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(won) == 1, won
    assert _record(url)["owner"] == won[0]


# -- two harnesses, one frozen past its lease ---------------------------------------------------


def install_fakes(setattr: Any, label: str, counts: str, stall: dict[int, str], gate: Any) -> None:
    """Stand-ins for the checkpoint reading and the evaluation. `stall[step]` ("locate" or
    "evaluate"): freeze this whole process there (SIGSTOP, every thread: a GC pause, a stopped
    VM), after writing `counts`.stalled; `gate(step)`: called before evaluating."""
    from types import SimpleNamespace

    from darkmatter.evaluation import harness

    def freeze(step: int, where: str) -> None:
        if stall.get(step) == where:
            Path(counts + ".stalled").write_text(f"{step} {where}")
            os.kill(os.getpid(), signal.SIGSTOP)

    def locate(uri: str) -> Any:
        step = int(uri.rstrip("/").rsplit("step", 1)[1])
        freeze(step, "locate")
        return SimpleNamespace(step=step, tag=f"step{step:08d}")

    def evaluate(ref: Any, *args: Any, **kwargs: Any) -> Any:
        gate(ref.step)
        with open(counts, "a") as f:  # one line per evaluation, from either process
            f.write(f"{label}:{ref.step}\n")
        freeze(ref.step, "evaluate")
        metrics = {FIRST: VALUE[label], FIRST + "_random_init": 0.5}
        return harness.Outcome(ref.step, metrics, [], {})

    setattr(harness.reader, "locate", locate)
    setattr(harness.reader, "fetch", lambda loc, cache_dir="", weights="master": loc)
    setattr(harness, "evaluation_weights", lambda loc, ref, cache_dir="", store=None: {})
    setattr(harness, "forget_weights", lambda loc, ref, cache_dir="": None)
    setattr(harness, "evaluate_checkpoint", evaluate)


def harness_for(state: str, ttl_s: float) -> Any:
    """A harness named like its twin: a pod restarted under the same id while the old one,
    frozen, still lives (names cannot tell them apart; only the claim's version can)."""
    from mlflow.tracking import MlflowClient

    from darkmatter.evaluation.harness import Harness
    from darkmatter.evaluation.tasks import TaskSpec

    spec = TaskSpec(name="toy", data="unused.parquet")
    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    return Harness(client, [spec], state=state, owner="pod-0", ttl_s=ttl_s)


def main(argv: list[str]) -> None:
    """Harness a, in its own process: every pending checkpoint of the run, in order."""
    run_id, state, counts, stalls = argv
    install_fakes(setattr, "a", counts, {int(k): v for k, v in json.loads(stalls).items()},
                  lambda step: None)  # fmt: skip
    h = harness_for(state, ttl_s=1.0)
    print(json.dumps([h.process(p) for p in h.pending(h.client.get_run(run_id))]), flush=True)


def make_run(client: Any, root: str, steps: list[int]) -> str:
    """An MLflow run whose checkpoint root is `root` and whose index lists `steps` under it."""
    exp = client.create_experiment(f"claims-{uuid.uuid4().hex[:8]}")
    run_id = str(client.create_run(exp).info.run_id)
    client.log_param(run_id, "checkpoint.root", root)
    index = {"root": root, "checkpoints": [
        {"step": s, "tag": f"step{s:08d}", "uri": storage.join(root, f"step{s:08d}")}
        for s in steps]}  # fmt: skip
    client.log_text(run_id, json.dumps(index), "checkpoints/index.json")
    return run_id


def _frozen(proc: subprocess.Popen, flag: Path, what: str) -> None:  # type: ignore[type-arg]
    """Wait until `proc` has stopped itself (state T) after writing `flag` saying `what`."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        stat = Path(f"/proc/{proc.pid}/stat").read_text()
        if flag.is_file() and flag.read_text() == what and stat.rsplit(")", 1)[1].split()[0] == "T":
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"harness a never stalled at {what}")


def _expire(url: str) -> None:
    """Sleep until the frozen holder's claim at `url` has expired."""
    time.sleep(max(0.0, _record(url)["expires_at"] - time.time()) + 0.3)


@pytest.mark.e2e
def test_a_harness_stalled_past_its_lease_never_evaluates_twice(
    stack: Any, state: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=stack.mlflow_uri)
    root = storage.join(state.rsplit("/", 1)[0], "ckpt")
    run_id = make_run(client, root, [10, 20])
    counts = tmp_path / "evaluations.txt"
    flag = Path(str(counts) + ".stalled")
    # a freezes after claiming step 10 (before reading it) and in the middle of evaluating 20.
    stalls = json.dumps({"10": "locate", "20": "evaluate"})
    code = "import sys; from tests.test_claims_race import main; main(sys.argv[1:])"
    a = subprocess.Popen([sys.executable, "-c", code, run_id, state, str(counts), stalls],
                         cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        in_10, release_b = threading.Event(), threading.Event()

        def gate(step: int) -> None:  # b holds step 10 in the middle of its evaluation
            if step == 10:
                in_10.set()
                release_b.wait(120)

        install_fakes(monkeypatch.setattr, "b", str(counts), {}, gate)
        b = harness_for(state, ttl_s=30.0)
        claim = {s: storage.join(state, "claims", run_id, f"step{s:08d}.json") for s in (10, 20)}
        pending = {p.step: p for p in b.pending(client.get_run(run_id))}

        # Step 10: b takes the expired claim and is still evaluating when a wakes up.
        _frozen(a, flag, "10 locate")
        _expire(claim[10])
        got: dict[int, str] = {}
        worker = threading.Thread(target=lambda: got.update({10: b.process(pending[10])}))
        worker.start()
        assert in_10.wait(120)
        held = _record(claim[10])
        assert held["state"] == "held"
        a.send_signal(signal.SIGCONT)
        # a goes on: its step 10 ends (stale release included), it claims 20 and freezes.
        _frozen(a, flag, "20 evaluate")
        now = _record(claim[10])  # b's renewals may have moved expires_at, nothing else
        assert [now[k] for k in ("token", "state")] == [held["token"], "held"]
        assert claims.try_claim(claim[10], "c", ttl_s=30.0) is None
        release_b.set()
        worker.join(timeout=120)

        # Step 20: a froze mid-evaluation; b takes over, evaluates and reports, then a wakes.
        _expire(claim[20])
        got[20] = b.process(pending[20])
        done = {s: storage.read_versioned(claim[s]) for s in (10, 20)}
        a.send_signal(signal.SIGCONT)
        out, err = a.communicate(timeout=120)
    finally:
        if a.poll() is None:
            a.send_signal(signal.SIGCONT)
            a.kill()
    assert a.returncode == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1]) == ["claimed elsewhere"] * 2
    assert got == {10: "done", 20: "done"}
    # a never evaluated 10; it had started 20 when it froze, and its result was dropped.
    assert sorted(counts.read_text().split()) == ["a:20", "b:10", "b:20"]
    for s in (10, 20):
        assert storage.read_versioned(claim[s]) == done[s]  # a's late release changed nothing
        assert _record(claim[s])["state"] == "done"
    history = client.get_metric_history(run_id, FIRST)
    assert sorted((m.step, m.value) for m in history) == [(10, VALUE["b"]), (20, VALUE["b"])]
    tags = client.get_run(run_id).data.tags
    assert [tags.get(f"eval.step{s:08d}") for s in (10, 20)] == ["done", "done"]
