"""The chaos soak (`make soak`, CI's slow tier): a 2-rank pretraining job of a few hundred steps
meets every fault of docs/RELIABILITY.md at once and must come out as an uninterrupted run.

From one seed (`python -m tests.soak --seed 1 --steps 300`), on a private local stack:
  * SIGKILLs at random steps: of one rank or both (torchrun restarts the group under
    --max-restarts), or of the whole job, launcher, agent, ranks and data workers alike (a lost
    node: the soak starts the job again, on an empty shard cache, and it resumes from the newest
    committed checkpoint in S3);
  * S3 faults on all of the trainer's traffic, through tests/faultproxy.py: 503 SlowDown,
    connection resets and truncated bodies on object GETs and PUTs at a seeded rate, and slow
    bodies (a clean response trickled out over `--slow-s` seconds);
  * a restart of the stack's MLflow server mid-run (the trainer buffers its metrics meanwhile);
  * bad inputs planted in the dataset: an undecodable member, a pickle member, an oversized
    member, a shard whose bytes fail its checksum and a truncated tar (the reader quarantines
    them);
  * the evaluator, `darkmatter evaluate --watch`, watching all along (and started again if it
    dies, as its Deployment would).
A reference run (same seed, same data, no faults) gives every step's loss and samples first.
What must hold at the end (each failure is one line in "failures"; the exit code is then 1):
  * every step's loss == the reference's, bit for bit: metrics.jsonl, and every point of the
    MLflow `loss` history;
  * one MLflow run, FINISHED, whose `loss` history has every step 1..N exactly once (a step
    redone after a kill is not sent again; one the dead job never sent is sent at the restart);
  * every committed checkpoint evaluated exactly once: its `eval.<tag>` tag is "done" and each
    eval metric has exactly one point at its step, none elsewhere;
  * per epoch, no sample trained on twice and none lost (every sample of the epoch trained on
    or quarantined), and every step, replays included, handed out the reference's samples
    (the reader's per-rank sample log, DARKMATTER_SAMPLE_LOG);
  * the job never exited on its own with an error (only the soak's kills end it).
The last line printed is one JSON object of figures: kills survived, faults injected, MLflow
restarts, bad inputs tried, samples lost, checkpoints, evaluated once, losses equal, wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from darkmatter import storage
from darkmatter.quickstart import stack as stack_mod
from darkmatter.trainer import checkpoint as ckpt
from tests.faultproxy import FAULT_KINDS, FaultProxy, _ProxyHandler, is_object_get
from tests.helpers import (
    REPO_ROOT,
    descendants,
    metrics,
    rank_pid,
    synthetic_corpus,
    toy_text_task,
    write_config,
)

SHARDS, SHARD_SAMPLES = 16, 40  # 640 samples: 16 partitions of one shard each
MICRO_BATCH, RANKS = 8, 2  # a global batch of 16: 40 steps an epoch, no sample left over
STEPS_PER_EPOCH = SHARDS * SHARD_SAMPLES // (MICRO_BATCH * RANKS)
EXPERIMENT = "soak"
BUCKET = f"s3://{stack_mod.DEFAULT_BUCKET}/soak"
KILL_KINDS = ("rank0", "rank1", "both", "job")
MAX_MEMBER_MB = 0.004  # 4 KiB: the planted 5,000-byte member is over it, real members are not
EVAL_KEY = "eval/toy/linear_probe/accuracy"


class SoakError(RuntimeError):
    """The soak could not go on (a timeout, a job that cannot start); one line."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seeds the kills, faults and training")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of the job")
    p.add_argument("--every", type=int, default=20, help="steps between checkpoints")
    p.add_argument("--kills", type=int, default=6, help="SIGKILLs (at least one of each kind)")
    p.add_argument("--fault-rate", type=float, default=0.08,
                   help="share of object GETs/PUTs answered with a fault")  # fmt: skip
    p.add_argument("--slow-rate", type=float, default=0.05, help="share of slow bodies")
    p.add_argument("--slow-s", type=float, default=1.0, help="seconds a slow body takes")
    p.add_argument("--outage-s", type=float, default=5.0, help="seconds MLflow stays down")
    p.add_argument("--timeout-s", type=float, default=1500.0, help="the whole soak's limit")
    p.add_argument("--stall-s", type=float, default=300.0,
                   help="no new step for this long while the job runs: it hangs (a failure)")  # fmt: skip
    p.add_argument("--workdir", default="", help="keep everything here (default: a temp dir, "
                   "removed after a soak that passed)")  # fmt: skip
    args = p.parse_args(argv)
    if args.kills < len(KILL_KINDS) or args.steps < args.every * (args.kills + 1):
        p.error(f"--kills must be >= {len(KILL_KINDS)} and --steps large enough to space them "
                f"(>= every x (kills + 1)); got --kills {args.kills}, --steps {args.steps}")  # fmt: skip
    return args


# -- the dataset: prepared once, bad inputs planted, uploaded to the stack's S3 ---------------


@dataclasses.dataclass
class Dataset:
    """The soak's dataset in S3 and what the checks need to know of it."""

    url: str
    keys: dict[str, list[str]]  # shard file -> its sample keys in tar order, as prepared
    planted: dict[str, int]  # bad input kind -> samples it spoils (per epoch)


def _members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]  # type: ignore[union-attr]


def _key(name: str) -> str:
    return name.split(".", 1)[0]


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))


def _replace_sample(path: Path, j: int, new: dict[str, bytes]) -> None:
    """Sample j of the shard gets the members `new` (extension -> bytes) instead of its own."""
    members = _members(path)
    key = list(dict.fromkeys(_key(n) for n, _ in members))[j]
    out, done = [], False
    for name, data in members:
        if _key(name) != key:
            out.append((name, data))
        elif not done:
            out += [(f"{key}.{ext}", blob) for ext, blob in new.items()]
            done = True
    _write_tar(path, out)


def _original(path: Path, j: int, ext: str) -> bytes:
    members = _members(path)
    key = list(dict.fromkeys(_key(n) for n, _ in members))[j]
    return next(data for name, data in members if name == f"{key}.{ext}")


def _cut_inside(path: Path, j: int) -> None:
    """Truncate the shard inside sample j: j and every sample after it are lost."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    key = list(dict.fromkeys(_key(m.name) for m in members))[j]
    first = next(m for m in members if _key(m.name) == key)
    path.write_bytes(path.read_bytes()[: first.offset_data + 10])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))


def plant_bad_inputs(folder: Path, names: list[str]) -> tuple[dict[str, int], set[str]]:
    """Spoil samples of five shards; returns (kind -> samples spoiled, the shards whose manifest
    entry must describe the new bytes: all but the one that must fail its checksum)."""
    npy = _original(folder / names[5], 5, "input_ids.npy")
    big = _original(folder / names[9], 7, "input_ids.npy")
    _replace_sample(folder / names[2], 3, {"input_ids.npy": b"\x93NUMPY garbage"})
    _replace_sample(folder / names[5], 5, {"input_ids.npy": npy, "pkl": pickle.dumps([1, 2])})
    _replace_sample(folder / names[9], 7, {"input_ids.npy": big, "txt": b"x" * 5000})
    _flip_a_byte(folder / names[12])
    _cut_inside(folder / names[14], 30)
    planted = {"undecodable": 1, "pickle_member": 1, "oversized_member": 1,
               "sha256_mismatch": SHARD_SAMPLES, "truncated_tar": SHARD_SAMPLES - 30}  # fmt: skip
    return planted, {names[i] for i in (2, 5, 9, 14)}


def build_dataset(work: Path, url: str) -> Dataset:
    import hashlib

    from darkmatter.data_pipeline.manifest import ShardInfo
    from darkmatter.data_pipeline.prepare import prepare

    local = work / "dataset"
    corpus = synthetic_corpus(work / "corpus.txt", n=SHARDS * SHARD_SAMPLES)
    manifest = prepare([str(corpus)], str(local), modality="text", vocab_size=200,
                       shard_samples=SHARD_SAMPLES, workers=1, progress=False)  # fmt: skip
    names = [s.name for s in manifest.shards]
    assert manifest.num_samples == SHARDS * SHARD_SAMPLES and len(names) == SHARDS, manifest
    keys = {n: list(dict.fromkeys(_key(m) for m, _ in _members(local / n))) for n in names}
    planted, rewritten = plant_bad_inputs(local, names)
    shards = [
        ShardInfo(s.name, s.samples, (local / s.name).stat().st_size,
                  hashlib.sha256((local / s.name).read_bytes()).hexdigest())
        if s.name in rewritten else s
        for s in manifest.shards
    ]  # fmt: skip
    dataclasses.replace(manifest, shards=shards).save(str(local))
    for path in sorted(local.iterdir()):
        if path.is_file():
            storage.write_bytes(storage.join(url, path.name), path.read_bytes())
    return Dataset(url, keys, planted)


def write_tasks(work: Path) -> Path:
    """A tiny labeled text task in S3 and the tasks file naming it (the evaluator's work)."""
    return toy_text_task(BUCKET, work, 80)


def job_config(path: Path, data_url: str, run_dir: Path, args: argparse.Namespace,
               root: str, tracking: bool) -> Path:  # fmt: skip
    """The job's config; the reference and the soak differ only where nothing numeric is."""
    return write_config(
        path, data_url, run_dir,
        data={"partitions": SHARDS, "shuffle_buffer": 16, "max_member_mb": MAX_MEMBER_MB},
        train={"steps": args.steps, "log_every": 1, "seed": args.seed, "zero_stage": 2,
               "micro_batch_size": MICRO_BATCH},
        checkpoint={"every": args.every, "root": root, "keep_last": 10_000},
        # A rank whose peer was killed must not wait out the defaults (120 s, 30 min).
        faults={"grace_s": 20.0, "collective_timeout_s": 120.0},
        tracking={"enabled": tracking, "experiment": EXPERIMENT, "run_name": "soak",
                  "flush_s": 0.5},
    )  # fmt: skip


# -- the fault proxy, with slow bodies ------------------------------------------------------


class SlowBodies(_ProxyHandler):
    """The proxy's handler, trickling out some clean object GET bodies over `slow_s` seconds."""

    proxy: SoakProxy

    def _copy_body(self, resp: Any, chunked: bool) -> None:
        if not (is_object_get(self.command, self.path) and self.proxy.draw_slow()):
            super()._copy_body(resp, chunked)
            return
        self.proxy._bump("slow", self.path)
        data = resp.read()
        pieces = 8
        size = max(1, -(-len(data) // pieces))
        for i in range(0, len(data), size):
            time.sleep(self.proxy.slow_s / pieces)
            block = data[i : i + size]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
            self.wfile.flush()
        if chunked:
            self.wfile.write(b"0\r\n\r\n")


class SoakProxy(FaultProxy):
    """A FaultProxy with a seeded fault plan over object GETs and PUTs, plus slow bodies."""

    def __init__(self, upstream: str, seed: int, rate: float, slow_rate: float, slow_s: float):
        rng = random.Random(seed)
        plan = [rng.choice(FAULT_KINDS) if rng.random() < rate else None for _ in range(50_000)]
        super().__init__(upstream, plan=plan, methods=("GET", "PUT"))
        self._slow_rng, self.slow_rate, self.slow_s = random.Random(seed + 1), slow_rate, slow_s

    def draw_slow(self) -> bool:
        with self._lock:
            return self._slow_rng.random() < self.slow_rate

    def start(self) -> SoakProxy:
        super().start()
        assert self._server is not None
        base: type = self._server.RequestHandlerClass  # type: ignore[assignment]
        # Before the first client connects: every request is served by the slow-body handler.
        self._server.RequestHandlerClass = type("Handler", (SlowBodies, base), {})
        return self

    def __enter__(self) -> SoakProxy:
        return self.start()

    def injected_by_kind(self) -> dict[str, int]:
        counts = self.counts
        return {k: counts.get(k, 0) for k in (*FAULT_KINDS, "slow")}


# -- processes: the job, the evaluator, the MLflow server ------------------------------------


def last_step(run_dir: Path) -> int:
    """The newest step in metrics.jsonl (0: none yet); reads only the file's tail."""
    path = run_dir / "metrics.jsonl"
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
            lines = f.read().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        with contextlib.suppress(ValueError):
            return int(json.loads(line)["step"])
    return 0


class Job:
    """The training job as an operator runs it: launched, killed, launched again."""

    def __init__(self, cfg: Path, run_dir: Path, env: dict[str, str], work: Path,
                 args: argparse.Namespace):  # fmt: skip
        self.cfg, self.run_dir, self.env, self.work = cfg, run_dir, env, work
        self.max_restarts, self.stall_s = args.kills + 2, args.stall_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.launches = 0
        self.unexpected: list[str] = []  # exits nobody caused: one line each
        self._progress = (0, time.monotonic())  # (newest step seen, when it was first seen)

    @property
    def log(self) -> Path:
        return self.work / f"job-{self.launches}.log"

    def launch(self) -> None:
        """A new launch, as a rescheduled job on a new node: an empty shard cache."""
        self.launches += 1
        cache = self.work / "cache" / f"launch-{self.launches}"
        cmd = [sys.executable, "-m", "darkmatter.cli", "pretrain", str(self.cfg),
               f"data.cache_dir={cache}", "--nproc", str(RANKS),
               "--max-restarts", str(self.max_restarts)]  # fmt: skip
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
                                         env=self.env)  # fmt: skip

    def poll(self) -> int | None:
        """The exit code of a job that ended (0: done); one that failed is launched again."""
        assert self.proc is not None
        rc = self.proc.poll()
        if rc is None or rc == 0:
            return rc
        tail = self.log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        self.unexpected.append(f"launch {self.launches} exited {rc}: {tail[0][:300]}")
        self.launch()
        return None

    def wait_step(self, step: int, deadline: float) -> None:
        """Until metrics.jsonl shows `step` (the job may be restarting meanwhile)."""
        while self._watch(deadline, f"step {step}") < step:
            if self.poll() == 0:
                raise SoakError(f"the job finished before step {step}")
            time.sleep(0.02)

    def _watch(self, deadline: float, what: str) -> int:
        """The newest step; raises when the soak's time is up or the job hangs: no new step for
        --stall-s seconds (a restart under load takes a minute or two, a hang forever)."""
        _check(deadline, what)
        now, step = time.monotonic(), last_step(self.run_dir)
        if step != self._progress[0]:
            self._progress = (step, now)
        elif now - self._progress[1] > self.stall_s:
            raise SoakError(f"the job hangs: no step after step {step} for {self.stall_s:.0f} s, "
                            f"waiting for {what} (py-spy dump --pid shows where; log {self.log})")  # fmt: skip
        return step

    def kill(self, kind: str, deadline: float) -> None:
        """SIGKILL one rank, both, or every process of the job (then launch it again)."""
        assert self.proc is not None
        if kind == "job":
            for pid in [self.proc.pid, *descendants(self.proc.pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.wait(timeout=60)
            self.launch()
            return
        ranks = {"rank0": [0], "rank1": [1], "both": [0, 1]}[kind]
        pids = [self._rank(r, deadline) for r in ranks]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _rank(self, rank: int, deadline: float) -> int:
        assert self.proc is not None
        while (pid := rank_pid(self.proc.pid, rank)) is None:
            _check(deadline, f"rank {rank}'s process")
            time.sleep(0.05)
        return pid

    def finish(self, deadline: float) -> None:
        while self.poll() is None:
            self._watch(deadline, "the job's end")
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGKILL whatever is left of the job (the soak is ending, passed or not)."""
        if self.proc is not None and self.proc.poll() is None:
            for pid in [self.proc.pid, *descendants(self.proc.pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.wait(timeout=60)


class Evaluator:
    """`darkmatter evaluate --watch` in the background, started again whenever it dies."""

    def __init__(self, tasks: Path, work: Path):
        self.tasks, self.work = tasks, work
        self.restarts = 0
        self.stopping = threading.Event()
        self.proc = self._start()
        self._thread = threading.Thread(target=self._supervise, daemon=True)
        self._thread.start()

    def _start(self) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "darkmatter.cli", "evaluate", "--watch", EXPERIMENT,
               "--tasks", str(self.tasks), "--poll-s", "2", "--claim-ttl-s", "60",
               "--id", "soak-evaluator"]  # fmt: skip
        with open(self.work / "evaluator.log", "ab") as out:
            return subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT)

    def _supervise(self) -> None:
        while not self.stopping.is_set():
            if self.proc.poll() is not None and not self.stopping.is_set():
                self.restarts += 1
                self.proc = self._start()
            time.sleep(0.5)

    def stop(self) -> int:
        """SIGTERM it (the claim in hand is released); its exit code."""
        self.stopping.set()
        self._thread.join()
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)


def restart_mlflow(info: stack_mod.StackInfo, outage_s: float) -> float:
    """Stop the stack's MLflow server, keep it down `outage_s`, start it again on its port (the
    stack's own helpers: `up` would restart the S3 server too); the seconds it was down."""
    sdir = Path(info.state_dir)
    t0 = time.monotonic()
    pid = stack_mod._read_pid(sdir, "mlflow")
    assert pid is not None, "the stack's MLflow server has no pid file"
    stack_mod._stop_pid(pid, timeout=10.0)
    time.sleep(outage_s)
    port = int(info.mlflow_uri.rsplit(":", 1)[1])
    proc = stack_mod._spawn("mlflow", port, sdir, stack_mod.DEFAULT_BUCKET)
    stack_mod._wait_healthy("mlflow", proc, info.mlflow_uri, sdir, time.monotonic() + 180)
    return time.monotonic() - t0


def _check(deadline: float, what: str) -> None:
    if time.monotonic() > deadline:
        raise SoakError(f"timed out waiting for {what} (--timeout-s)")


# -- the chaos: a seeded schedule, played against the job ------------------------------------


def schedule(seed: int, steps: int, kills: int) -> list[tuple[int, str]]:
    """(step, event) in step order: `kills` SIGKILLs, at least one of each kind, one in each of
    `kills` equal spans of the run (so each kill finds the job trained past the one before),
    and one MLflow restart early in the second span."""
    rng = random.Random(seed)
    kinds = [*KILL_KINDS, *(rng.choice(KILL_KINDS) for _ in range(kills - len(KILL_KINDS)))]
    rng.shuffle(kinds)
    span = (steps - 10) // kills
    events = [(5 + i * span + rng.randrange(span // 3, span), k) for i, k in enumerate(kinds)]
    events.append((5 + span + rng.randrange(0, span // 3), "mlflow"))
    return sorted(events)


@dataclasses.dataclass
class Chaos:
    """What the soak did to the job."""

    kills: Counter[str] = dataclasses.field(default_factory=Counter)
    mlflow_down_s: list[float] = dataclasses.field(default_factory=list)


def play(job: Job, events: list[tuple[int, str]], info: stack_mod.StackInfo,
         args: argparse.Namespace, deadline: float) -> Chaos:  # fmt: skip
    chaos = Chaos()
    outage: threading.Thread | None = None
    job.launch()
    for step, event in events:
        job.wait_step(step, deadline)
        if event == "mlflow":  # in the background: the job trains on meanwhile
            outage = threading.Thread(
                target=lambda: chaos.mlflow_down_s.append(restart_mlflow(info, args.outage_s))
            )
            outage.start()
        else:
            job.kill(event, deadline)
            chaos.kills[event] += 1
        print(f"soak: step {step}: {event}", file=sys.stderr, flush=True)
    if outage is not None:
        outage.join(timeout=max(1.0, deadline - time.monotonic()))
    job.finish(deadline)
    return chaos


# -- the checks -----------------------------------------------------------------------------


Records = dict[tuple[int, int, int], list[dict[str, Any]]]  # (rank, epoch, step) -> its lines


def read_sample_log(folder: Path) -> Records:
    out: Records = {}
    for path in sorted(folder.glob("samples-rank*.jsonl")):
        rank = int(path.stem.removeprefix("samples-rank"))
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):  # a line torn by a SIGKILL
                rec = json.loads(line)
                out.setdefault((rank, rec["epoch"], rec["step"]), []).append(rec)
    return out


def check_samples(
    soak: Records, ref: Records, data: Dataset, steps_per_epoch: int = STEPS_PER_EPOCH
) -> tuple[dict[str, int], list[str]]:
    """Figures and failures of the sample logs: every record (replays too) equal to the
    reference's, no sample twice in an epoch, none lost in a complete epoch."""
    failures = []
    content = [(k, [(r["keys"], r["holes"]) for r in recs]) for k, recs in soak.items()]
    differ = sorted(k for k, got in content if k not in ref or any(
        c != (ref[k][0]["keys"], ref[k][0]["holes"]) for c in got))  # fmt: skip
    if differ or set(soak) != set(ref):
        failures.append(f"samples: {len(differ)} steps handed out other samples than the "
                        f"reference (first {differ[:3]}); steps only in one of them: "
                        f"{sorted(set(soak) ^ set(ref))[:3]}")  # fmt: skip
    seen: dict[int, list[str]] = {}
    holes: dict[int, set[str]] = {}
    for (_, epoch, _), recs in soak.items():
        seen.setdefault(epoch, []).extend(recs[-1]["keys"])
        holes.setdefault(epoch, set()).update(_hole_key(data, *h) for h in recs[-1]["holes"])
    every = {k for keys in data.keys.values() for k in keys}
    twice = sum(len(keys) - len(set(keys)) for keys in seen.values())
    complete = [e for e in seen if sum(1 for k in soak if k[1] == e) == RANKS * steps_per_epoch]
    lost = sum(len(every - set(seen[e]) - holes[e]) for e in complete)
    if twice or lost:
        failures.append(f"samples: {twice} seen twice within an epoch, {lost} lost")
    bad = set().union(*holes.values()) if holes else set()
    return {"bad_inputs": len(bad), "samples_lost": lost, "samples_seen_twice": twice,
            "epochs_checked": len(complete),
            "replayed_steps": sum(len(v) - 1 for v in soak.values())}, failures  # fmt: skip


def _hole_key(data: Dataset, shard: str, key: str) -> str:
    """A hole's sample key; a shard that could not be read names its samples #j."""
    return data.keys[shard][int(key[1:])] if key.startswith("#") else key


def check_losses(run_dir: Path, reference: dict[int, float], steps: int) -> list[str]:
    got = {r["step"]: r["loss"] for r in metrics(run_dir)}
    if sorted(got) != list(range(1, steps + 1)):
        return [f"metrics.jsonl: steps {min(got, default=0)}..{max(got, default=0)}, "
                f"{len(got)} of {steps}"]  # fmt: skip
    differ = [s for s in got if got[s] != reference[s]]
    if differ:
        return [f"losses: {len(differ)} steps differ from the reference, first {differ[:5]}"]
    return []


def check_mlflow(client: Any, run_id: str, reference: dict[int, float],
                 steps: int) -> tuple[dict[str, Any], list[str]]:  # fmt: skip
    """One FINISHED run; its loss history covers 1..steps and every point equals the reference."""
    failures = []
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id])
    if [r.info.run_id for r in runs] != [run_id]:
        failures.append(f"mlflow: {len(runs)} runs in experiment {EXPERIMENT!r}, expected one")
    status = client.get_run(run_id).info.status
    if status != "FINISHED":
        failures.append(f"mlflow: run {run_id} is {status}, not FINISHED")
    by_step: dict[int, list[float]] = {}
    for m in client.get_metric_history(run_id, "loss"):
        by_step.setdefault(m.step, []).append(m.value)
    gaps = sorted(set(range(1, steps + 1)) - set(by_step))
    extra = sorted(set(by_step) - set(range(1, steps + 1)))
    if gaps or extra:
        failures.append(f"mlflow: loss history misses steps {gaps[:5]} ({len(gaps)}), "
                        f"has steps {extra[:5]} beyond 1..{steps}")  # fmt: skip
    differ = sorted(s for s, vs in by_step.items() if any(v != reference.get(s) for v in vs))
    if differ:
        failures.append(f"mlflow: loss at {len(differ)} steps differs from the reference, "
                        f"first {differ[:5]}")  # fmt: skip
    duplicates = sum(len(vs) - 1 for vs in by_step.values())
    if duplicates:  # a step redone after a kill was sent again
        failures.append(f"mlflow: {duplicates} steps have more than one loss point")
    return {"step_axis_continuous": not (gaps or extra), "mlflow_losses_equal": not differ,
            "mlflow_replayed_points": duplicates}, failures  # fmt: skip


def wait_evaluated(client: Any, run_id: str, tags: list[str], deadline: float) -> None:
    """Until the run has an `eval.<tag>` tag for every committed checkpoint."""
    while True:
        have = client.get_run(run_id).data.tags
        if all(f"eval.{t}" in have for t in tags):
            return
        _check(deadline, f"the evaluation of {[t for t in tags if f'eval.{t}' not in have]}")
        time.sleep(2)


def check_evaluations(client: Any, run_id: str, tags: list[str]) -> tuple[int, list[str]]:
    """How many committed checkpoints were evaluated exactly once, and the failures."""
    run = client.get_run(run_id)
    steps = [ckpt.step_of(t) for t in tags]
    keys = sorted(k for k in run.data.metrics if k.startswith("eval/"))
    points = {k: Counter(m.step for m in client.get_metric_history(run_id, k)) for k in keys}
    once = [
        s for t, s in zip(tags, steps, strict=True)
        if run.data.tags.get(f"eval.{t}") == "done" and all(points[k][s] == 1 for k in keys)
    ]  # fmt: skip
    failures = []
    if EVAL_KEY not in keys or len(once) != len(tags):
        failures.append(f"evaluation: {len(once)} of {len(tags)} committed checkpoints "
                        f"evaluated exactly once; not: {sorted(set(steps) - set(once))[:5]}")  # fmt: skip
    stray = sorted({s for c in points.values() for s in c} - set(steps))
    if stray:
        failures.append(f"evaluation: metrics at steps {stray[:5]} with no committed checkpoint")
    return len(once), failures


# -- the soak -------------------------------------------------------------------------------


def reference_run(work: Path, data: Dataset, args: argparse.Namespace) -> dict[int, float]:
    """The same job, uninterrupted, with no faults: every step's loss (and, in the sample log,
    every step's samples)."""
    run_dir = work / "reference"
    (work / "samples-ref").mkdir()
    cfg = job_config(work / "reference.yaml", data.url, run_dir, args,
                     root=str(run_dir / "checkpoints"), tracking=False)  # fmt: skip
    env = {**os.environ, "DARKMATTER_SAMPLE_LOG": str(work / "samples-ref")}
    out = subprocess.run(
        [sys.executable, "-m", "darkmatter.cli", "pretrain", str(cfg),
         f"data.cache_dir={work / 'cache' / 'reference'}", "--nproc", str(RANKS)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=args.timeout_s,
    )  # fmt: skip
    if out.returncode != 0:
        raise SoakError(f"the reference run failed ({out.returncode}): {out.stderr[-2000:]}")
    return {r["step"]: r["loss"] for r in metrics(run_dir)}


def soak_run(work: Path, data: Dataset, info: stack_mod.StackInfo, args: argparse.Namespace,
             deadline: float) -> tuple[Job, Chaos, SoakProxy]:  # fmt: skip
    """The job under chaos, with the evaluator watching; returns what happened."""
    run_dir = work / "run"
    (work / "samples").mkdir()
    cfg = job_config(work / "soak.yaml", data.url, run_dir, args, root=f"{BUCKET}/ckpt",
                     tracking=True)  # fmt: skip
    proxy = SoakProxy(info.s3_endpoint, args.seed, args.fault_rate, args.slow_rate, args.slow_s)
    with proxy:
        env = {**os.environ, "AWS_ENDPOINT_URL": proxy.url,
               "DARKMATTER_SAMPLE_LOG": str(work / "samples")}  # fmt: skip
        job = Job(cfg, run_dir, env, work, args)
        events = schedule(args.seed, args.steps, args.kills)
        print(f"soak: schedule {events}", file=sys.stderr, flush=True)
        try:
            chaos = play(job, events, info, args, deadline)
        finally:
            job.stop()
    return job, chaos, proxy


def soak(work: Path, info: stack_mod.StackInfo, args: argparse.Namespace) -> dict[str, Any]:
    """The reference run, the soak run with the evaluator, the checks; the figures."""
    from mlflow.tracking import MlflowClient

    t0 = time.monotonic()
    deadline = t0 + args.timeout_s
    data = build_dataset(work, f"{BUCKET}/data")
    tasks = write_tasks(work)
    reference = reference_run(work, data, args)
    evaluator = Evaluator(tasks, work)
    try:
        job, chaos, proxy = soak_run(work, data, info, args, deadline)
        client = MlflowClient(tracking_uri=info.mlflow_uri)
        run_id = json.loads((work / "run" / "mlflow_run.json").read_text())["run_id"]
        tags = ckpt.committed_tags(f"{BUCKET}/ckpt")
        wait_evaluated(client, run_id, tags, deadline)
    finally:
        evaluator_rc = evaluator.stop()
    checked, failures = check_all(work, data, reference, client, run_id, tags, args.steps)
    failures = [f"job: {line}" for line in job.unexpected] + failures
    if evaluator_rc != 0:
        failures.append(f"evaluator: exited {evaluator_rc} on SIGTERM")
    injected = proxy.injected_by_kind()
    return {
        "seed": args.seed, "steps": args.steps, "kills": sum(chaos.kills.values()),
        "kills_by_kind": dict(chaos.kills), "relaunches": job.launches - 1,
        "faults_injected": sum(injected.values()), "faults_by_kind": injected,
        "s3_requests": proxy.counts["requests"], "mlflow_restarts": len(chaos.mlflow_down_s),
        "mlflow_down_s": [round(s, 1) for s in chaos.mlflow_down_s],
        "bad_inputs_planted": data.planted, "evaluator_restarts": evaluator.restarts,
        "unexpected_exits": len(job.unexpected), **checked,
        "wall_s": round(time.monotonic() - t0, 1), "failures": failures,
    }  # fmt: skip


def check_all(work: Path, data: Dataset, reference: dict[int, float], client: Any, run_id: str,
              tags: list[str], steps: int) -> tuple[dict[str, Any], list[str]]:  # fmt: skip
    """Every invariant: (figures, failures)."""
    loss_failures = check_losses(work / "run", reference, steps)
    axis, mlflow_failures = check_mlflow(client, run_id, reference, steps)
    evaluated, eval_failures = check_evaluations(client, run_id, tags)
    samples, sample_failures = check_samples(read_sample_log(work / "samples"),
                                             read_sample_log(work / "samples-ref"), data)  # fmt: skip
    figures = {
        **samples, "checkpoints": len(tags), "evaluated_once": evaluated,
        "losses_equal": not loss_failures and axis.pop("mlflow_losses_equal"), **axis,
    }  # fmt: skip
    return figures, loss_failures + mlflow_failures + eval_failures + sample_failures


@contextlib.contextmanager
def workdir(path: str) -> Iterator[tuple[Path, list[bool]]]:
    """The soak's folder; a temporary one is removed if the soak passed (`passed[0]`)."""
    passed = [False]
    if path:
        Path(path).mkdir(parents=True, exist_ok=False)
        yield Path(path), passed
        return
    tmp = Path(tempfile.mkdtemp(prefix="darkmatter-soak-"))
    try:
        yield tmp, passed
    finally:
        if passed[0]:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"soak: logs kept in {tmp}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    t0 = time.monotonic()
    with workdir(args.workdir) as (work, passed):
        try:
            with stack_mod.private(work / "stack", timeout=180) as info:
                figures = soak(work, info, args)
        except (SoakError, stack_mod.StackError) as e:
            figures = {"seed": args.seed, "steps": args.steps, "failures": [str(e)],
                       "wall_s": round(time.monotonic() - t0, 1)}  # fmt: skip
        figures["ok"] = passed[0] = not figures["failures"]
    for line in figures["failures"]:
        print(f"soak: FAILED: {line}", file=sys.stderr)
    print(json.dumps(figures), flush=True)
    return 0 if figures["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
