"""The epoch's sample order, which no world size or worker count can change, and the partition
streams that produce it.

The order is a pure function of manifest, seed, epoch, `partitions` P and the global batch B:
  * Epoch e permutes the manifest's shards with a RNG seeded by (seed, e). The shards in that
    order, samples in tar order, form the epoch's sequence of N samples; it is cut into P equal
    contiguous *partitions* of L = N // P samples (the < P left over are dropped).
  * Each partition is a stream of its own: its L samples in order through a shuffle buffer of
    `shuffle_buffer` samples, seeded by (seed, e, p). Output number i of partition p is its
    sample i.
  * Global sample g of the epoch is output number g // P of partition g % P. Step t of the
    epoch trains on global samples [t·B, (t+1)·B); an epoch has T = floor(P·L / B) steps.
A partition's state is (next input, outputs so far, the shuffle buffer as partition indices,
its RNG state); PartitionStream rebuilds itself from it by reading back only the samples its
buffer held. Raw bytes travel through the buffer; they are decoded as they leave it (slots.py).

A growable dataset (manifest `history`: earlier versions, each a prefix of its shard list): an
epoch's order is a function of the manifest *it* uses. A resume onto a grown manifest (with
allow_growth) keeps the epoch in progress on the old prefix, so no consumed sample is replayed
and that epoch's order is the uninterrupted one; the next epoch uses the whole manifest.
resume_manifest decides which manifest the epoch in progress uses.
"""

from __future__ import annotations

import bisect
from typing import Any, NamedTuple

import numpy as np

from darkmatter.data_pipeline.manifest import Manifest
from darkmatter.data_pipeline.reader.cache import ShardCache
from darkmatter.data_pipeline.reader.options import DataError, ReaderOptions
from darkmatter.data_pipeline.reader.shards import Hole, UnitReader


def resume_manifest(
    url: str, manifest: Manifest, saved: str, epoch_digest: str | None, allow_growth: bool
) -> Manifest:
    """The manifest the epoch in progress at a resume uses: `manifest`, or the earlier version
    of it (from its history) that the saved state's epoch was reading. `saved` is the digest
    of the dataset the state was saved with, `epoch_digest` that of its epoch in progress."""
    history = {h["digest"]: (v, h) for v, h in enumerate(manifest.history)}
    if saved != manifest.digest:
        if saved not in history:
            raise ValueError(
                f"cannot resume the data stream: dataset (manifest digest) was {saved!r}, "
                f"is {manifest.digest!r} now ({url}; not an earlier version of it)"
            )
        if not allow_growth:
            version, old = history[saved]
            raise ValueError(
                f"cannot resume the data stream: {url} grew from {old['shards']} to "
                f"{len(manifest.shards)} shards (manifest version {version + 1} -> "
                f"{len(history) + 1}): set data.allow_growth=true to continue onto it"
            )
    want = epoch_digest or saved
    if want == manifest.digest:
        return manifest
    if want not in history:
        raise ValueError(
            f"cannot resume the data stream: the epoch in progress read {url} at manifest "
            f"digest {want!r}, which is not in its history"
        )
    prefix = manifest.prefix(int(history[want][1]["shards"]))
    if prefix.digest != want:
        raise ValueError(
            f"{url}: manifest history entry {want!r} is not a prefix of its shard list"
        )
    return prefix


class Segment(NamedTuple):
    """Samples [start, stop) of the manifest's shard number `shard`."""

    shard: int
    start: int
    stop: int


class EpochPlan:
    """The epoch's order: which shard sample is output i of partition p, which g a step takes."""

    def __init__(
        self, manifest: Manifest, seed: int, epoch: int, partitions: int, global_batch: int
    ):
        self.manifest, self.seed, self.epoch = manifest, seed, epoch
        self.partitions, self.global_batch = partitions, global_batch
        rng = np.random.default_rng([seed, epoch])
        self.shard_order = [int(i) for i in rng.permutation(len(manifest.shards))]
        self.part_len = manifest.num_samples // partitions
        self.steps = partitions * self.part_len // global_batch
        # Epoch-sequence offset of each shard in epoch order, for locating partition samples.
        self._starts = [0]
        for i in self.shard_order:
            self._starts.append(self._starts[-1] + manifest.shards[i].samples)

    def locate(self, p: int, i: int) -> tuple[int, int]:
        """(manifest shard index, sample index in that shard) of input i of partition p."""
        pos = p * self.part_len + i
        k = bisect.bisect_right(self._starts, pos) - 1
        return self.shard_order[k], pos - self._starts[k]

    def segments(self, p: int, start: int = 0) -> list[Segment]:
        """Partition p's inputs from `start` on, as shard segments in stream order."""
        out: list[Segment] = []
        lo, hi = p * self.part_len + start, (p + 1) * self.part_len
        for k, shard in enumerate(self.shard_order):
            a, b = self._starts[k], self._starts[k + 1]
            if b <= lo:
                continue
            if a >= hi:
                break
            out.append(Segment(shard, max(lo, a) - a, min(hi, b) - a))
        return out

    def slot_indices(self, step: int, slot: int, n_slots: int) -> range:
        """The global indices g of `step` owned by `slot` of n_slots, increasing."""
        lo = step * self.global_batch
        first = lo + (slot - lo) % n_slots
        return range(first, lo + self.global_batch, n_slots)


def needed_shards(plan: EpochPlan, p: int, state: dict[str, Any] | None) -> list[int]:
    """The shards partition p reads first: its buffer's (from a state) and its next input's."""
    return list(first_reads(plan, p, state, 1))


def first_reads(
    plan: EpochPlan, p: int, state: dict[str, Any] | None, buffer: int
) -> dict[int, tuple[list[int], int | None]]:
    """What partition p reads before its first output, by shard: the samples its buffer held
    (from a state) and the inputs that fill a buffer of `buffer` samples, plus one; with the
    sample of the last of those inputs where the shard holds it (reading goes on from there)."""
    start = int(state["next_in"]) if state else 0
    held = [int(i) for i in state["buf"]] if state else []
    stop = min(plan.part_len, start + max(1, buffer) - len(held) + 1)
    out: dict[int, tuple[list[int], int | None]] = {}
    for i in held:
        shard, j = plan.locate(p, i)
        out.setdefault(shard, ([], None))[0].append(j)
    for i in range(start, stop):
        shard, j = plan.locate(p, i)
        js, _ = out.setdefault(shard, ([], None))
        js.append(j)
        out[shard] = (js, j)
    return out


LEAD = 64  # inputs before a segment's end at which the next segment's first span is fetched


class PartitionStream:
    """Partition p of an epoch: its inputs in order through a seeded shuffle buffer.

    State: `next_in` (inputs read), `out` (outputs emitted), `buf` (partition indices held, in
    buffer order) and the RNG state: enough to rebuild the stream at any output.
    """

    def __init__(
        self,
        plan: EpochPlan,
        p: int,
        cache: ShardCache,
        opts: ReaderOptions,
        state: dict[str, Any] | None = None,
    ):
        self.plan, self.p, self.cache, self.opts = plan, p, cache, opts
        self.size = max(1, opts.shuffle_buffer)
        self.rng = np.random.default_rng([plan.seed, plan.epoch, p])
        self.next_in = self.out = 0
        self.buf: list[tuple[int, dict[str, Any] | Hole]] = []
        self._held: dict[int, UnitReader] = {}  # units this partition is reading
        if state is not None:
            self._restore(state)
        self._segments = plan.segments(p, self.next_in)
        self._seg = 0  # current segment, and the next sample of it:
        self._j = self._segments[0].start if self._segments else 0

    def state(self) -> dict[str, Any]:
        return {
            "next_in": self.next_in,
            "out": self.out,
            "buf": [i for i, _ in self.buf],
            "rng": self.rng.bit_generator.state,
        }

    def _restore(self, state: dict[str, Any]) -> None:
        self.next_in, self.out = int(state["next_in"]), int(state["out"])
        self.rng.bit_generator.state = state["rng"]
        # Read back exactly the samples the buffer held, shard by shard.
        wanted = [(self.plan.locate(self.p, int(i)), int(i)) for i in state["buf"]]
        by_shard: dict[int, list[tuple[int, int]]] = {}
        for (shard, j), i in wanted:
            by_shard.setdefault(shard, []).append((j, i))
        stops = {seg.shard: seg.stop for seg in self.plan.segments(self.p)}
        got: dict[int, dict[str, Any] | Hole] = {}
        for shard, items in by_shard.items():
            local = self.cache.acquire(shard, stops[shard])
            try:
                for j, i in sorted(items):
                    got[i] = local.read(j)
            finally:
                self.cache.release(shard)
        self.buf = [(int(i), got[int(i)]) for i in state["buf"]]

    def _read_input(self) -> tuple[int, dict[str, Any] | Hole] | None:
        """The next input of the partition, or None at its end."""
        while self._seg < len(self._segments):
            seg = self._segments[self._seg]
            local = self._held.get(seg.shard)
            if local is None:
                local = self._held[seg.shard] = self.cache.acquire(seg.shard, seg.stop)
                for ahead in self._segments[self._seg + 1 : self._seg + 1 + self.opts.readahead]:
                    self.cache.prefetch(ahead.shard, ahead.stop)
            if self._j < seg.stop:
                i, j = self.next_in, self._j
                self.next_in, self._j = i + 1, j + 1
                if j == max(seg.start, seg.stop - LEAD) and self._seg + 1 < len(self._segments):
                    nxt = self._segments[self._seg + 1]  # a shard read by range: its first span
                    self.cache.ahead(nxt.shard, nxt.start, nxt.stop)
                return i, local.read(j)
            self.cache.release(seg.shard)
            del self._held[seg.shard]
            self._seg += 1
            if self._seg < len(self._segments):
                self._j = self._segments[self._seg].start
        return None

    def next(self) -> tuple[int, dict[str, Any] | Hole]:
        """Output number `out`: (partition index, raw sample or Hole)."""
        while len(self.buf) < self.size:
            item = self._read_input()
            if item is None:
                break
            self.buf.append(item)
        if not self.buf:
            raise DataError(f"partition {self.p} of epoch {self.plan.epoch} ran out of samples")
        k = int(self.rng.integers(len(self.buf)))
        item = self.buf[k]
        self.buf[k] = self.buf[-1]
        self.buf.pop()
        self.out += 1
        return item

    def close(self) -> None:
        for shard in list(self._held):
            self.cache.release(shard)
        self._held.clear()
