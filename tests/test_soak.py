"""The chaos soak (tests/soak.py): its checks catch what they must (fast, no processes), its
proxy trickles slow bodies, and, in the slow tier, a seeded soak whose invariants all hold."""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from tests import soak
from tests.helpers import REPO_ROOT

KEYS = {"a.tar": ["k0", "k1", "k2", "k3"], "b.tar": ["k4", "k5", "k6", "k7"]}
DATA = soak.Dataset("s3://b/data", KEYS, {"sha256_mismatch": 1})


def epoch(rank0: list[list[str]], rank1: list[list[str]], holes: dict[tuple[int, int], list]):  # type: ignore[no-untyped-def, type-arg]
    """Sample-log records of epoch 0: rank r's keys at each step, and the holes of some."""
    out: soak.Records = {}
    for rank, steps in enumerate((rank0, rank1)):
        for step, keys in enumerate(steps):
            rec = {"epoch": 0, "step": step, "keys": keys, "holes": holes.get((rank, step), [])}
            out[(rank, 0, step)] = [rec]
    return out


def test_sample_checks_catch_a_sample_seen_twice_a_lost_one_and_a_replay_that_differs() -> None:
    # k5 is a hole of a shard that could not be read (the reader names it #1 of b.tar).
    good = epoch([["k0", "k1"], ["k4"]], [["k2", "k3"], ["k6", "k7"]], {(0, 1): [["b.tar", "#1"]]})
    figures, failures = soak.check_samples(good, good, DATA, steps_per_epoch=2)
    assert failures == []
    assert figures == {"bad_inputs": 1, "samples_lost": 0, "samples_seen_twice": 0,
                       "epochs_checked": 1, "replayed_steps": 0}  # fmt: skip

    # k0 trained on again in place of k7: one sample twice, one lost (the reference agrees, so
    # only the epoch checks can see it).
    twice = epoch([["k0", "k1"], ["k4"]], [["k2", "k3"], ["k6", "k0"]], {(0, 1): [["b.tar", "#1"]]})
    figures, failures = soak.check_samples(twice, twice, DATA, steps_per_epoch=2)
    assert (figures["samples_seen_twice"], figures["samples_lost"]) == (1, 1)
    assert failures == ["samples: 1 seen twice within an epoch, 1 lost"]

    # A step replayed after a kill that handed out other samples than the first time.
    replayed = epoch(
        [["k0", "k1"], ["k4"]], [["k2", "k3"], ["k6", "k7"]], {(0, 1): [["b.tar", "#1"]]}
    )
    replayed[(1, 0, 1)].append({**replayed[(1, 0, 1)][0], "keys": ["k7", "k6"]})
    figures, failures = soak.check_samples(replayed, good, DATA, steps_per_epoch=2)
    assert figures["replayed_steps"] == 1
    assert len(failures) == 1 and failures[0].startswith(
        "samples: 1 steps handed out other samples than the reference (first [(1, 0, 1)])"
    )

    # An epoch the run did not finish is checked for duplicates only, never for losses.
    partial_epoch = {k: v for k, v in good.items() if k != (1, 0, 1)}
    figures, failures = soak.check_samples(partial_epoch, partial_epoch, DATA, steps_per_epoch=2)
    assert (figures["epochs_checked"], figures["samples_lost"], failures) == (0, 0, [])


def test_the_reader_logs_each_steps_samples_and_holes_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from darkmatter.data_pipeline.reader import SAMPLE_LOG_ENV, DataStream, ReaderOptions
    from tests.test_bad_data import PER_SHARD, SHARDS, build, key

    (tmp_path / "ds").mkdir()
    url = build(tmp_path / "ds", special={(2, 3): {"input_ids.npy": b"\x93NUMPY garbage"}})
    monkeypatch.setenv(SAMPLE_LOG_ENV, str(tmp_path))
    stream = DataStream(url, rank=0, world_size=1, micro_batch_size=8, partitions=4,
                        options=ReaderOptions(shuffle_buffer=4))  # fmt: skip
    handed = [[s["__key__"] for micro in stream.next_step() for s in micro] for _ in range(5)]
    stream.close()
    records = soak.read_sample_log(tmp_path)
    assert sorted(records) == [(0, 0, step) for step in range(5)]
    assert [records[(0, 0, t)][0]["keys"] for t in range(5)] == handed
    holes = [h for recs in records.values() for h in recs[0]["holes"]]
    assert holes == [["shard-000002.tar", key(2, 3)]]
    seen = {k for keys in handed for k in keys}
    assert len(seen) == SHARDS * PER_SHARD - 1 and key(2, 3) not in seen


def test_losses_must_cover_every_step_and_equal_the_reference(tmp_path: Path) -> None:
    reference = {1: 5.0, 2: 4.5, 3: 4.25}
    rows = [{"step": s, "loss": v} for s, v in reference.items()]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert soak.check_losses(tmp_path, reference, 3) == []
    rows[1]["loss"] = 4.5 + 2**-40  # one ulp-sized difference is a difference
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert soak.check_losses(tmp_path, reference, 3) == [
        "losses: 1 steps differ from the reference, first [2]"
    ]
    assert soak.check_losses(tmp_path, reference, 4) == ["metrics.jsonl: steps 1..3, 3 of 4"]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_the_schedule_spaces_the_kills_and_puts_mlflow_down_before_the_second(seed: int) -> None:
    events = soak.schedule(seed, 300, 6)
    assert events == soak.schedule(seed, 300, 6)  # a function of the seed
    kills = [(s, e) for s, e in events if e != "mlflow"]
    (mlflow,) = [s for s, e in events if e == "mlflow"]
    assert len(kills) == 6 and set(soak.KILL_KINDS) <= {e for _, e in kills}
    steps = [s for s, _ in kills]
    assert all(b - a > 15 for a, b in zip(steps, steps[1:], strict=False)), steps
    assert steps[0] < mlflow < steps[1] and steps[0] > 0 and steps[-1] < 300


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[str]:
    """A plain HTTP server holding /bucket/key (64 KiB), as an S3 object store would."""
    (tmp_path / "bucket").mkdir()
    (tmp_path / "bucket" / "key").write_bytes(bytes(range(256)) * 256)
    handler = partial(_Quiet, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_the_proxy_trickles_slow_bodies_whole_and_injects_seeded_faults(upstream: str) -> None:
    with soak.SoakProxy(upstream, seed=0, rate=0.0, slow_rate=1.0, slow_s=0.8) as proxy:
        t0 = time.monotonic()
        body = urllib.request.urlopen(f"{proxy.url}/bucket/key", timeout=10).read()
        took = time.monotonic() - t0
        assert body == bytes(range(256)) * 256 and took >= 0.7, took
        assert proxy.injected_by_kind() == {"slowdown": 0, "reset": 0, "truncate": 0, "slow": 1}
    with soak.SoakProxy(upstream, seed=0, rate=1.0, slow_rate=0.0, slow_s=0.8) as proxy:
        for _ in range(6):
            with contextlib.suppress(OSError, http.client.HTTPException):  # 503, reset, cut
                urllib.request.urlopen(f"{proxy.url}/bucket/key", timeout=10).read()
        assert sum(proxy.injected_by_kind().values()) == 6
        assert proxy.injected_by_kind()["slow"] == 0


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.distributed
@pytest.mark.timeout(1800)
def test_soak_every_invariant_holds() -> None:
    """120 steps, a checkpoint every 10, 4 kills (one of each kind), an MLflow restart, S3
    faults and the evaluator: the figures the soak prints, and every invariant."""
    out = subprocess.run(
        [sys.executable, "-m", "tests.soak", "--seed", "7", "--steps", "120", "--every", "10",
         "--kills", "4"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=1700,
    )  # fmt: skip
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["failures"] == [] and out.returncode == 0, (figures, out.stderr[-3000:])
    assert figures["ok"] and figures["losses_equal"] and figures["step_axis_continuous"]
    assert figures["kills"] == 4 and set(figures["kills_by_kind"]) == set(soak.KILL_KINDS)
    assert figures["relaunches"] == figures["kills_by_kind"]["job"]
    assert figures["faults_injected"] > 0 and figures["mlflow_restarts"] == 1
    assert figures["bad_inputs"] == sum(figures["bad_inputs_planted"].values()) == 53
    assert figures["samples_lost"] == 0 and figures["samples_seen_twice"] == 0
    assert figures["epochs_checked"] == 120 // soak.STEPS_PER_EPOCH
    assert figures["checkpoints"] == figures["evaluated_once"] == 12
    assert figures["unexpected_exits"] == 0
