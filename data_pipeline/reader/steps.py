"""What every stream of the reader shares (DataStream over one dataset, MixtureStream over
weighted sources): the checks of its shape, the cutting of a rank's step into micro-batches, and
the I/O counters it reports."""

from __future__ import annotations

import json
import os

from darkmatter.data_pipeline.reader.cache import IOStats
from darkmatter.data_pipeline.reader.decode import Sample
from darkmatter.data_pipeline.reader.options import DataError
from darkmatter.data_pipeline.reader.shards import Hole


def check_shape(
    rank: int, world_size: int, micro_batch_size: int, grad_accum: int, partitions: int,
    num_workers: int, seed: int,
) -> tuple[int, int]:  # fmt: skip
    """(global batch, slots of the job): ranks x max(1, workers) slots must divide both the
    partitions and the global batch, so that every slot owns whole partitions and takes an
    equal share of every step."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if min(micro_batch_size, grad_accum, partitions) < 1 or num_workers < 0 or seed < 0:
        raise ValueError(
            "need micro_batch_size, grad_accum, partitions >= 1, num_workers, seed >= 0"
        )
    global_batch = micro_batch_size * grad_accum * world_size
    n_slots = world_size * max(1, num_workers)
    if partitions % n_slots or global_batch % n_slots:
        raise ValueError(
            f"data.partitions ({partitions}) and the global batch ({global_batch}) must both "
            f"be multiples of world_size x max(1, num_workers) = {n_slots}"
        )
    return global_batch, n_slots


def micro_batches(
    samples: list[Sample | None], micro_batch_size: int, grad_accum: int, where: str, why: str
) -> list[list[Sample]]:
    """The step's samples, in step order (None: a hole), as grad_accum micro-batches by
    position, holes dropped; a micro-batch left empty is an error `where` (rank, step) `why`."""
    m = micro_batch_size
    micro = [[s for s in samples[k * m : (k + 1) * m] if s is not None] for k in range(grad_accum)]
    for k, batch in enumerate(micro):
        if not batch:
            raise DataError(f"{where}: every sample of micro-batch {k} was bad data{why}")
    return micro


def io_summary(s: IOStats, wait_s: float) -> dict[str, float]:
    """The reader's cumulative counters, as the trainer logs them."""
    out: dict[str, float] = {
        "samples": s.samples, "bytes_read": s.bytes_read, "retries": s.retries,
        "fetch_s": s.fetch_s, "shard_wait_s": s.wait_s, "decode_s": s.decode_s,
        "wait_s": wait_s, "skipped": sum(s.skipped.values()),
    }  # fmt: skip
    out.update({f"skipped/{k}": v for k, v in s.skipped.items()})
    return out


# Tests only (the chaos soak, tests/soak.py): a folder where every rank appends the keys and the
# holes of each step it hands out, so that a soak can prove no sample is seen twice in an epoch.
SAMPLE_LOG_ENV = "DARKMATTER_SAMPLE_LOG"


def log_samples(
    rank: int, epoch: int, step: int, micro: list[list[Sample]], holes: list[Hole]
) -> None:
    folder = os.environ.get(SAMPLE_LOG_ENV)
    if not folder:
        return
    rec = {"epoch": epoch, "step": step, "keys": [s["__key__"] for b in micro for s in b],
           "holes": [[h.shard, h.key] for h in holes]}  # fmt: skip
    # One O_APPEND write per line: a SIGKILL leaves whole lines (at worst a torn last one).
    path = os.path.join(folder, f"samples-rank{rank}.jsonl")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(rec) + "\n").encode())
    finally:
        os.close(fd)
