"""Time to the first batch after a resume, at 1% and at 90% of an epoch, of our reader.

A text dataset on the local S3 server (SeaweedFS, started here on free ports); DataStream with 2
DataLoader workers, world size 1, 64 partitions with a shuffle buffer of 16 samples each (1024
in all), global batch 64. One pass over the epoch records the state_dict() after 1% and after
90% of its steps, and the keys of the step that follows each. A timed resume builds a fresh
DataStream, calls load_state_dict([state]) and waits for next_step(): the time from the
constructor (which reads manifest.json) to the batch, worker start-up and shard fetches
included, with a cold shard cache as after a restart. The batch must be the one the
uninterrupted pass got. For context, a fresh epoch start (no state) is timed the same way.
Repetitions of the three are interleaved (rotating order), and medians are reported; the ratio
is at_90 / at_1 (the reader's claim: a resume costs what the buffer holds, not how far the
epoch had got).

`--quick` is a small run for smoke tests.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from _common import log  # noqa: E402

PARTITIONS = 64
MICRO_BATCH = 64
WORKERS = 2


def make_stream(url: str, shuffle_buffer: int, cache: Path):  # type: ignore[no-untyped-def]
    from darkmatter.data_pipeline.reader import DataStream, ReaderOptions

    return DataStream(
        url, rank=0, world_size=1, micro_batch_size=MICRO_BATCH, num_workers=WORKERS, seed=7,
        partitions=PARTITIONS,
        options=ReaderOptions(shuffle_buffer=shuffle_buffer, cache_dir=str(cache)),
    )  # fmt: skip


def keys(step: list[list[dict[str, Any]]]) -> list[str]:
    return [s["__key__"] for micro in step for s in micro]


def record_states(url: str, shuffle_buffer: int, cache: Path, at: dict[str, float]) -> dict:  # type: ignore[type-arg]
    """One uninterrupted pass: {name: (step, state after it, keys of the next step)}."""
    stream = make_stream(url, shuffle_buffer, cache)
    try:
        total = stream.steps_per_epoch
        targets = {name: max(1, round(frac * total)) for name, frac in at.items()}
        out = {}
        for step in range(1, max(targets.values()) + 1):
            stream.next_step()
            for name, target in targets.items():
                if step == target:
                    state = stream.state_dict()
                    out[name] = (step, state, keys(stream.next_step()))
                    # The extra step moved the stream on: restore, so later points stay exact.
                    stream.load_state_dict([state])
    finally:
        stream.close()
    return out | {"steps_per_epoch": total}


def time_first_batch(url: str, shuffle_buffer: int, cache: Path, state: Any) -> tuple[float, float, list[str]]:  # fmt: skip
    """(seconds to the first batch, MiB the workers had fetched by then, the batch's keys)."""
    cache = Path(tempfile.mkdtemp(dir=cache))  # cold, as on a machine that just restarted
    t0 = time.perf_counter()
    stream = make_stream(url, shuffle_buffer, cache)
    try:
        if state is not None:
            stream.load_state_dict([state])
        batch = stream.next_step()
        dt = time.perf_counter() - t0
        fetched = stream.summary()["bytes_read"] / 2**20
    finally:
        stream.close()
        shutil.rmtree(cache, ignore_errors=True)
    return dt, fetched, keys(batch)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small, fast run (smoke test)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions of each point")
    ap.add_argument("--docs", type=int, default=None, help="text samples to generate")
    ap.add_argument("--shard-mib", type=float, default=None, help="prepare's shard size")
    ap.add_argument("--shuffle-buffer", type=int, default=16, help="per partition (64 of them)")
    args = ap.parse_args(argv)
    docs, shard_mib, reps = (6_000, 0.5, 1) if args.quick else (40_000, 1.0, 5)
    docs, reps = args.docs or docs, args.reps or reps
    shard_bytes = int((args.shard_mib or shard_mib) * 2**20)
    started = time.perf_counter()
    from darkmatter.data_pipeline.prepare import prepare
    from darkmatter.data_pipeline.reader import Manifest

    with _common.workdir("darkmatter-bench-resume-") as root, _common.local_stack(root):
        log(f"writing {docs} synthetic documents")
        corpus = _common.write_text_corpus(root / "corpus.txt", docs)
        url = "s3://darkmatter/bench/resume-text"
        prepare([str(corpus)], url, modality="text", vocab_size=4000, shard_bytes=shard_bytes)
        manifest = Manifest.load(url)
        mib = sum(s.bytes for s in manifest.shards) / 2**20
        log(
            f"prepared: {manifest.num_samples} samples in {len(manifest.shards)} shards, {mib:.1f} MiB"
        )
        cache = root / "cache"
        log("one uninterrupted pass to record the states at 1% and 90% of the epoch")
        rec = record_states(url, args.shuffle_buffer, cache, {"at_1pct": 0.01, "at_90pct": 0.90})
        points: dict[str, tuple[int, Any, list[str] | None]] = {
            "fresh": (0, None, None),
            "at_1pct": rec["at_1pct"],
            "at_90pct": rec["at_90pct"],
        }
        log("warm-up: one of each")
        for _name, (_, state, _) in points.items():
            time_first_batch(url, args.shuffle_buffer, cache, state)
        times: dict[str, list[float]] = {name: [] for name in points}
        fetched: dict[str, float] = {}
        names = list(points)
        for rep in range(reps):
            order = names[rep % 3 :] + names[: rep % 3]
            for name in order:
                step, state, expected = points[name]
                dt, fetched[name], got = time_first_batch(url, args.shuffle_buffer, cache, state)
                if expected is not None and got != expected:
                    raise RuntimeError(f"{name}: the resumed batch differs from the original")
                times[name].append(dt)
                log(
                    f"  rep {rep} {name} (after step {step}): {dt:.2f} s to the first batch, "
                    f"{fetched[name]:.1f} MiB of shards fetched"
                )
    med = {name: _common.median(ts) for name, ts in times.items()}
    _common.emit(
        {
            "bench": "resume_latency",
            "at_1pct_s": round(med["at_1pct"], 3),
            "at_90pct_s": round(med["at_90pct"], 3),
            "ratio": round(med["at_90pct"] / med["at_1pct"], 3),
            "fresh_start_s": round(med["fresh"], 3),
            "steps": {
                "at_1pct": rec["at_1pct"][0],
                "at_90pct": rec["at_90pct"][0],
                "per_epoch": rec["steps_per_epoch"],
            },  # fmt: skip
            # Shard bytes the workers had fetched (whole shards, read-ahead included) by the
            # first batch, last repetition; the dataset's size is dataset_mib.
            "fetched_mib": {name: round(v, 1) for name, v in fetched.items()},
            "runs_s": {name: [round(t, 3) for t in ts] for name, ts in times.items()},
            "workers": WORKERS,
            "partitions": PARTITIONS,
            "shuffle_buffer_total": PARTITIONS * args.shuffle_buffer,
            "global_batch": MICRO_BATCH,
            "samples": manifest.num_samples,
            "shards": len(manifest.shards),
            "dataset_mib": round(mib, 1),
            "reps": reps,
            "quick": args.quick,
            "machine": _common.machine(),
            "wall_s": round(time.perf_counter() - started, 1),
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
