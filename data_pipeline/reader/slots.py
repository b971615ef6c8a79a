"""A slot: one reader of the rank (a worker process, or the rank itself without workers) and the
*pieces* it yields, one per step.

Slot q of n_slots owns the partitions p ≡ q (mod n_slots), and so the global samples
g ≡ q (mod n_slots) of every step. Its piece of a step is its samples of the step in increasing
g, decoded (an undecodable sample becomes a hole), plus the state of its partitions after them
and its I/O counters' change.

A grown dataset (allow_growth) finishes the epoch in progress on its old prefix: slot_pieces then
takes that epoch's spec (`first`) apart from the spec of every later epoch.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from darkmatter.data_pipeline.manifest import Manifest
from darkmatter.data_pipeline.reader.cache import IOStats, ShardCache
from darkmatter.data_pipeline.reader.decode import Sample, decode
from darkmatter.data_pipeline.reader.options import DataError, ReaderOptions
from darkmatter.data_pipeline.reader.order import (
    EpochPlan,
    PartitionStream,
    first_reads,
    needed_shards,
)
from darkmatter.data_pipeline.reader.shards import Hole


@dataclass
class Piece:
    """What one slot contributes to one step."""

    epoch: int
    step: int
    slot: int
    items: list[tuple[int, Sample | None]]  # (global index g, sample or None for a hole)
    states: dict[int, dict[str, Any]]  # partition -> state after this step
    holes: list[Hole]
    stats: IOStats


@dataclass(frozen=True)
class StreamSpec:
    """Everything a slot needs, picklable."""

    url: str
    manifest: Manifest
    seed: int
    partitions: int
    global_batch: int
    n_slots: int
    opts: ReaderOptions


class Slot:
    """One slot's partitions for one epoch, from a step on, reading through `cache`."""

    def __init__(
        self,
        spec: StreamSpec,
        epoch: int,
        slot: int,
        states: dict[int, Any],
        cache: ShardCache | None = None,
    ):
        self.spec, self.epoch, self.slot = spec, epoch, slot
        self.plan = EpochPlan(spec.manifest, spec.seed, epoch, spec.partitions, spec.global_batch)
        self._own_cache = cache is None
        self.cache = cache or ShardCache(spec.url, spec.manifest, spec.opts, IOStats())
        owned = range(slot % spec.n_slots, spec.partitions, spec.n_slots)
        self.cache.streams(len(owned))
        # Ask for every shard the partitions start with (and their buffers, on a resume) before
        # any partition blocks on one: the fetch threads then work in parallel. Where shards
        # are read by range, that is the samples the first piece needs.
        for p in owned:
            for shard in needed_shards(self.plan, p, states.get(p)):
                self.cache.prefetch(shard)
        buffer = spec.opts.shuffle_buffer
        for p in owned:
            for shard, (js, last) in first_reads(self.plan, p, states.get(p), buffer).items():
                self.cache.want(shard, js, last)
        self.parts = {
            p: PartitionStream(self.plan, p, self.cache, spec.opts, states.get(p)) for p in owned
        }

    def piece(self, step: int) -> Piece:
        holes: list[Hole] = []
        items: list[tuple[int, Sample | None]] = []
        modality = self.spec.manifest.modality
        for g in self.plan.slot_indices(step, self.slot, self.spec.n_slots):
            part = self.parts[g % self.spec.partitions]
            if part.out != g // self.spec.partitions:  # the contract above, checked
                raise DataError(f"partition {part.p} is at output {part.out}, step needs {g}")
            _, raw = part.next()
            if isinstance(raw, Hole):
                holes.append(raw)
                items.append((g, None))
                continue
            t0 = time.perf_counter()
            try:
                sample = decode_raw(raw, modality, self.spec.opts)
            except Exception as e:  # PIL, numpy and soundfile raise many types on bad bytes
                holes.append(Hole(raw["__shard__"], raw["__key__"], f"undecodable: {e}"))
                items.append((g, None))
                continue
            finally:
                self.cache._count(decode_s=time.perf_counter() - t0)
            sample = transform(sample, raw, self.spec.opts)
            sample["__index__"] = g
            items.append((g, sample))
        if holes and self.spec.opts.strict:
            h = holes[0]
            raise DataError(f"shard {h.shard}, sample {h.key}: {h.reason} (data.strict is on)")
        self.cache.count_samples(len(items) - len(holes), holes)
        states = {p: part.state() for p, part in self.parts.items()}
        return Piece(self.epoch, step, self.slot, items, states, holes, self.cache.take_stats())

    def close(self) -> None:
        for part in self.parts.values():
            part.close()
        if self._own_cache:
            self.cache.close()


def decode_raw(raw: dict[str, Any], modality: str, opts: ReaderOptions) -> Sample:
    """Raw members -> a sample: the one place slots decode (DataStream's and the mixture's)."""
    return decode(raw, modality, text=opts.text)


def transform(sample: Sample, raw: dict[str, Any], opts: ReaderOptions) -> Sample:
    """The user's per-sample transform (ReaderOptions.transform), run where the sample was
    decoded. Its error is not a bad sample but a bug to see: DataError naming the sample."""
    if opts.transform is None:
        return sample
    try:
        return opts.transform(sample)
    except Exception as e:
        name = getattr(opts.transform, "__qualname__", type(opts.transform).__name__)
        raise DataError(
            f"shard {raw['__shard__']}, sample {raw['__key__']}: data transform {name} "
            f"failed: {type(e).__name__}: {e}"
        ) from e


def slot_pieces(
    spec: StreamSpec,
    slot: int,
    epoch: int,
    start_step: int,
    states: dict[int, Any],
    first: StreamSpec | None = None,
) -> Generator[Piece, None, None]:
    """One slot's pieces from (epoch, start_step) on, epoch after epoch: a worker lives on, so
    an epoch boundary costs no process start and local shards stay verified. `first`: the spec
    of the epoch in progress when it differs (a grown dataset's old prefix, whose shards are the
    first of spec.manifest's, so one cache serves both)."""
    cache = ShardCache(spec.url, spec.manifest, spec.opts, IOStats())
    current = first or spec
    try:
        while True:
            s = Slot(current, epoch, slot, states, cache)
            try:
                for step in range(start_step, s.plan.steps):
                    yield s.piece(step)
            finally:
                s.close()
            epoch, start_step, states, current = epoch + 1, 0, {}, spec
    finally:
        cache.close()
