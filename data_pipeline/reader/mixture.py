"""MixtureStream: one rank's steps of a weighted mixture of datasets (data.sources), with the
interface of DataStream, exact on resume and elastic over world size and worker count.

The order, a pure function of the sources (name, manifest, weight), seed, partitions P, the global
batch B and the granularity n = W·max(1, workers) (world size W):
  * Each source s is an endless sequence of its own epochs. Source epoch e is an EpochPlan of its
    manifest seeded by (seed, sha256 of the source's name) and e, so renaming or reordering the
    other sources never changes its order. It takes E_s = P·floor(N_s / P) samples (every
    partition-aligned one). Sample k of the source (counted across its epochs) is, with K the k
    at which its epoch began, in-epoch index i = k − K: output i // P of partition i % P.
  * A step's B samples are handed out in B/n chunks of n samples by `apportion`: each chunk to
    the source with the largest deficit w_s·(T + B) − (C_s + given this step), ties to the lower
    source index, where C_s counts the samples taken from s so far and T = Σ C_s. A pure
    function of (C, weights, B, n): a resume continues it exactly, every source stays within
    about n samples of its share at every step, and a resume on another world size simply
    continues from the saved C with the new n.
  * Source s gives the step its indices [C_s, C_s + b_s), b_s a multiple of n. Slot q of n takes
    those k ≡ q (mod n): b_s/n of them. K and E_s are multiples of P, a multiple of n, so all of
    them lie in partitions p ≡ q (mod n), which slot q owns in every source epoch: every slot
    gets B/n samples a step, and a slot owns the same partitions of every source.
  * A slot keeps, per source, the partition streams of the source's current epoch and opens
    the next epoch's (fresh) as soon as C_s reaches its end, mid-step if need be. The rank merges
    its slots' samples in step position order (source by source in source order, then k) and
    cuts grad_accum micro-batches of micro_batch_size.
State: {"version", "kind": "mixture", "seed", "partitions", "global_batch", "step", "sources":
{name: {"digest", "weight", "consumed", "epoch", "start" (K), "parts": {p: partition state},
"epoch_digest" (only while the epoch in progress reads an older prefix of a grown dataset)}}}.
A resume needs the same source names and weights (a changed mixture is a new run) and each
source's digest, or an earlier version of it with allow_growth (order.resume_manifest). The
partition states of every rank that saved are merged, as DataStream does.
Bad data: holes and the quarantine as in DataStream. A source whose samples are all bad stops
the job once this rank has taken min(256, E_s) of them without a good one (a rank sees only its
own slots' samples, so the count is the rank's).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

from darkmatter.data_pipeline.manifest import Manifest
from darkmatter.data_pipeline.reader.cache import IOStats, ShardCache
from darkmatter.data_pipeline.reader.decode import Sample
from darkmatter.data_pipeline.reader.options import DataError, ReaderOptions
from darkmatter.data_pipeline.reader.order import (
    EpochPlan,
    PartitionStream,
    needed_shards,
    resume_manifest,
)
from darkmatter.data_pipeline.reader.quarantine import Quarantine
from darkmatter.data_pipeline.reader.shards import Hole
from darkmatter.data_pipeline.reader.slots import decode_raw, transform
from darkmatter.data_pipeline.reader.steps import (
    SAMPLE_LOG_ENV,
    check_shape,
    io_summary,
    log_samples,
    micro_batches,
)
from darkmatter.data_pipeline.reader.workers import Workers

MIXTURE_STATE_VERSION = 1
ALL_BAD_AFTER = 256  # samples of a source a rank takes before an all-bad source stops the job


def source_seed(seed: int, name: str) -> int:
    """A source's own seed: a function of the run's seed and the source's name only."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little")


def apportion(
    consumed: Sequence[int], weights: Sequence[float], batch: int, chunk: int
) -> list[int]:
    """Samples each source gives the next step: batch // chunk chunks of `chunk` samples, each
    to the source furthest below its share of the total after the step (ties: lower index)."""
    after = sum(consumed) + batch
    given = [0] * len(consumed)
    for _ in range(batch // chunk):
        deficit = [w * after - (c + g) for w, c, g in zip(weights, consumed, given, strict=True)]
        given[max(range(len(deficit)), key=lambda s: (deficit[s], -s))] += chunk
    return given


@dataclass
class Cursor:
    """Where a source is: `consumed` samples taken (the next is k = consumed), the epoch they
    are in, the k at which that epoch began (`start`) and the manifest the epoch reads."""

    consumed: int
    epoch: int
    start: int
    manifest: Manifest

    def epoch_len(self, partitions: int) -> int:
        return partitions * (self.manifest.num_samples // partitions)

    def roll(self, k: int, full: Manifest, partitions: int) -> bool:
        """Step into the next epoch (on the whole manifest) if sample k is past this one."""
        length = self.epoch_len(partitions)
        if k - self.start < length:
            return False
        self.epoch, self.start, self.manifest = self.epoch + 1, self.start + length, full
        return True


@dataclass(frozen=True)
class SourceSpec:
    """One source, picklable: name, dataset URL, its (whole) manifest and its own seed."""

    name: str
    url: str
    manifest: Manifest
    seed: int


@dataclass(frozen=True)
class MixSpec:
    """Everything a mixture slot needs, picklable. Weights are normalized to sum to 1."""

    sources: tuple[SourceSpec, ...]
    weights: tuple[float, ...]
    partitions: int
    global_batch: int
    n_slots: int
    opts: ReaderOptions


@dataclass
class MixPiece:
    """What one slot contributes to one step of the mixture."""

    step: int
    slot: int
    items: list[tuple[int, int, Sample | None]]  # (position in the step, source, sample|None)
    holes: list[tuple[int, Hole]]  # (source, hole)
    states: dict[int, tuple[int, dict[int, Any]]]  # source -> (its epoch, partition -> state)
    stats: IOStats


class SourceSlot:
    """One slot's partitions of one source, epoch after epoch."""

    def __init__(self, src: SourceSpec, spec: MixSpec, slot: int, cursor: Cursor, states: Any):
        self.src, self.spec, self.slot = src, spec, slot
        self.cursor = dataclasses.replace(cursor)  # this slot's own copy: it advances it
        self.cache = ShardCache(src.url, src.manifest, spec.opts, IOStats())
        self.parts: dict[int, PartitionStream] = {}
        self._open(states)

    def _open(self, states: dict[int, Any]) -> None:
        """Open the cursor's epoch: this slot's partitions, from `states` or fresh."""
        self._close_parts()
        c, spec = self.cursor, self.spec
        plan = EpochPlan(c.manifest, self.src.seed, c.epoch, spec.partitions, spec.partitions)
        owned = range(self.slot % spec.n_slots, spec.partitions, spec.n_slots)
        self.cache.streams(len(owned))
        for p in owned:  # ask for every first shard before any partition blocks on one
            for shard in needed_shards(plan, p, states.get(p)):
                self.cache.prefetch(shard)
        self.parts = {
            p: PartitionStream(plan, p, self.cache, spec.opts, states.get(p)) for p in owned
        }

    def take(self, count: int) -> list[tuple[int, dict[str, Any] | Hole]]:
        """This slot's share of the source's next `count` samples: (k, raw sample or Hole)."""
        c, n, parts = self.cursor, self.spec.n_slots, self.spec.partitions
        out: list[tuple[int, dict[str, Any] | Hole]] = []
        for k in range(c.consumed + (self.slot - c.consumed) % n, c.consumed + count, n):
            while c.roll(k, self.src.manifest, parts):
                self._open({})
            i = k - c.start
            part = self.parts[i % parts]
            if part.out != i // parts:  # the contract in the module docstring, checked
                raise DataError(f"source {self.src.name}: partition {part.p} is at output "
                                f"{part.out}, sample {k} needs {i // parts}")  # fmt: skip
            out.append((k, part.next()[1]))
        c.consumed += count
        # The state after the step describes the epoch of the next sample: open it now.
        while c.roll(c.consumed, self.src.manifest, parts):
            self._open({})
        return out

    def states(self) -> dict[int, Any]:
        return {p: part.state() for p, part in self.parts.items()}

    def _close_parts(self) -> None:
        for part in self.parts.values():
            part.close()
        self.parts = {}

    def close(self) -> None:
        self._close_parts()
        self.cache.close()


class MixSlot:
    """One slot of a mixture: its partitions of every source, one piece per step."""

    def __init__(
        self, spec: MixSpec, slot: int, cursors: list[Cursor], states: list[dict[int, Any]]
    ):
        self.spec, self.slot = spec, slot
        self.sources = [
            SourceSlot(src, spec, slot, c, st)
            for src, c, st in zip(spec.sources, cursors, states, strict=True)
        ]

    def piece(self, step: int) -> MixPiece:
        spec = self.spec
        counts = apportion([s.cursor.consumed for s in self.sources], spec.weights,
                           spec.global_batch, spec.n_slots)  # fmt: skip
        items: list[tuple[int, int, Sample | None]] = []
        holes: list[tuple[int, Hole]] = []
        offset = 0  # the step's positions: source by source, then k
        for j, (source, count) in enumerate(zip(self.sources, counts, strict=True)):
            first = source.cursor.consumed
            got = [self._decode(source, k, raw) for k, raw in source.take(count)]
            for k, sample in got:
                items.append((offset + k - first, j, sample if isinstance(sample, dict) else None))
                if isinstance(sample, Hole):
                    holes.append((j, sample))
            source.cache.count_samples(
                sum(isinstance(s, dict) for _, s in got), [h for _, h in got if isinstance(h, Hole)]
            )
            offset += count
        if holes and spec.opts.strict:
            h = holes[0][1]
            raise DataError(f"shard {h.shard}, sample {h.key}: {h.reason} (data.strict is on)")
        stats = IOStats()
        for source in self.sources:
            stats.add(source.cache.take_stats())
        states = {j: (s.cursor.epoch, s.states()) for j, s in enumerate(self.sources)}
        return MixPiece(step, self.slot, items, holes, states, stats)

    def _decode(
        self, source: SourceSlot, k: int, raw: dict[str, Any] | Hole
    ) -> tuple[int, Sample | Hole]:
        if isinstance(raw, Hole):
            return k, raw
        t0 = time.perf_counter()
        try:
            sample = decode_raw(raw, source.src.manifest.modality, self.spec.opts)
        except Exception as e:  # PIL, numpy and soundfile raise many types on bad bytes
            return k, Hole(raw["__shard__"], raw["__key__"], f"undecodable: {e}")
        finally:
            source.cache._count(decode_s=time.perf_counter() - t0)
        sample = transform(sample, raw, self.spec.opts)
        sample["__index__"], sample["__source__"] = k, source.src.name
        return k, sample

    def close(self) -> None:
        for source in self.sources:
            source.close()


def mixture_pieces(
    spec: MixSpec, slot: int, *, step: int, cursors: list[Cursor], states: list[dict[int, Any]]
) -> Generator[MixPiece, None, None]:
    """One slot's pieces from `step` on, for ever (the Workers' pieces factory)."""
    s = MixSlot(spec, slot, cursors, states)
    try:
        while True:
            yield s.piece(step)
            step += 1
    finally:
        s.close()


class MixtureStream:
    """One rank's steps of a weighted mixture: DataStream's interface over several datasets.

    `sources`: (name, dataset URL, weight) each; weights are relative. `steps_per_epoch` is a
    nominal epoch: the steps the slowest source (largest E_s / w_s) takes to go once through its
    epoch; each source has epochs of its own (summary(): source/<name>/epoch).
    """

    def __init__(
        self,
        sources: Sequence[tuple[str, str, float]],
        *,
        rank: int,
        world_size: int,
        micro_batch_size: int,
        grad_accum: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        partitions: int = 64,
        options: ReaderOptions | None = None,
        allow_growth: bool = False,
    ):
        global_batch, n_slots = check_shape(
            rank, world_size, micro_batch_size, grad_accum, partitions, num_workers, seed
        )
        self.rank, self.world_size, self.allow_growth = rank, world_size, allow_growth
        self.micro_batch_size, self.grad_accum = micro_batch_size, grad_accum
        self.num_workers, self.slots = num_workers, max(1, num_workers)
        self.opts = options or ReaderOptions()
        specs, weights = _load_sources(sources, seed, partitions)
        self.spec = MixSpec(specs, weights, partitions, global_batch, n_slots, self.opts)
        self.seed = seed
        self.cursors = [Cursor(0, 0, 0, s.manifest) for s in specs]
        lengths = [c.epoch_len(partitions) for c in self.cursors]
        self.steps_per_epoch = max(
            1, *(int(n / (w * global_batch)) for n, w in zip(lengths, weights, strict=True))
        )
        self.step = 0  # the next step to hand out
        self._states: list[dict[int, Any]] = [{} for _ in specs]  # this rank's partitions
        self._loader: Generator[MixPiece, None, None] | Workers | None = None
        self.stats = IOStats()
        self.wait_s = 0.0
        self.quarantine = Quarantine(self.opts.quarantine_entries)
        self._taken = [0] * len(specs)  # this rank's samples of each source, since opened
        self._good = [0] * len(specs)
        self._skipped = [0] * len(specs)

    @property
    def epoch(self) -> int:
        """The nominal epoch of the next step (see steps_per_epoch)."""
        return self.step // self.steps_per_epoch

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sources = {}
        for src, w, c, st in zip(self.spec.sources, self.spec.weights, self.cursors,
                                 self._states, strict=True):  # fmt: skip
            entry = {"digest": src.manifest.digest, "weight": w, "consumed": c.consumed,
                     "epoch": c.epoch, "start": c.start,
                     "parts": {str(p): s for p, s in st.items()}}  # fmt: skip
            if c.manifest is not src.manifest:  # the epoch in progress reads an older prefix
                entry["epoch_digest"] = c.manifest.digest
            sources[src.name] = entry
        return {"version": MIXTURE_STATE_VERSION, "kind": "mixture", "seed": self.seed,
                "partitions": self.spec.partitions, "global_batch": self.spec.global_batch,
                "step": self.step, "sources": sources}  # fmt: skip

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        """Continue from the states every rank of a checkpoint saved (any world size)."""
        if not states:
            raise ValueError("no data stream state to resume from")
        if any(s.get("kind") != "mixture" for s in states):
            raise ValueError(
                "cannot resume the data stream: the checkpoint read one dataset (data.url), "
                "this run reads a mixture (data.sources): a changed mixture is a new run"
            )
        mine = {"version": MIXTURE_STATE_VERSION, "seed": self.seed, "step": None,
                "partitions": self.spec.partitions, "global_batch": self.spec.global_batch}  # fmt: skip
        for key, value in mine.items():
            theirs = {s.get(key) for s in states}
            if len(theirs) != 1 or (value is not None and theirs != {value}):
                was = ", ".join(repr(v) for v in sorted(theirs, key=repr))
                raise ValueError(
                    f"cannot resume the data stream: {key} was {was}, is {value!r} now"
                )
        names = [src.name for src in self.spec.sources]
        for s in states:
            if set(s["sources"]) != set(names):
                raise ValueError(
                    f"cannot resume the data stream: the checkpoint mixed the sources "
                    f"{sorted(s['sources'])}, data.sources now names {sorted(names)}: a changed "
                    "mixture is a new run"
                )
        resumed = [self._resume_source(j, [s["sources"][n] for s in states])
                   for j, n in enumerate(names)]  # fmt: skip
        self._close_loader()
        self.step = int(states[0]["step"])
        for j, (cursor, parts) in enumerate(resumed):
            self.cursors[j] = cursor
            self._states[j] = {p: st for p, st in parts.items() if self._owns(p)}

    def _resume_source(self, j: int, saved: list[dict[str, Any]]) -> tuple[Cursor, dict[int, Any]]:
        """Source j's cursor and partition states, from what every rank saved of it."""
        src, weight, parts_n = self.spec.sources[j], self.spec.weights[j], self.spec.partitions
        if any(not math.isclose(float(s["weight"]), weight, rel_tol=1e-9) for s in saved):
            raise ValueError(
                f"cannot resume the data stream: source {src.name} had the weight share "
                f"{float(saved[0]['weight']):.6g}, has {weight:.6g} now: a changed mixture is "
                "a new run"
            )
        keys = ("digest", "epoch_digest", "consumed", "epoch", "start")
        positions: set[tuple[Any, ...]] = {tuple(s.get(k) for k in keys) for s in saved}
        if len(positions) != 1:
            raise ValueError(f"cannot resume the data stream: ranks saved source {src.name} at "
                             f"{sorted(positions, key=repr)}")  # fmt: skip
        digest, epoch_digest, consumed, epoch, start = positions.pop()
        manifest = resume_manifest(src.url, src.manifest, str(digest), epoch_digest,
                                   self.allow_growth)  # fmt: skip
        cursor = Cursor(int(consumed), int(epoch), int(start), manifest)
        parts = {int(p): st for s in saved for p, st in s["parts"].items()}
        missing = sorted(set(range(min(parts_n, cursor.consumed - cursor.start))) - set(parts))
        if missing:
            raise ValueError(
                f"cannot resume the data stream: no state for partitions {missing[:8]} of "
                f"source {src.name} (a rank's state file is missing)"
            )
        return cursor, parts

    # -- iteration -----------------------------------------------------------------------
    def _owns(self, partition: int) -> bool:
        return partition % self.spec.n_slots // self.slots == self.rank

    def _open_loader(self) -> Generator[MixPiece, None, None] | Workers:
        pieces = functools.partial(mixture_pieces, self.spec, step=self.step,
                                   cursors=self.cursors, states=self._states)  # fmt: skip
        if self.num_workers == 0:  # the single slot runs in this process, synchronously
            return pieces(self.rank)
        return Workers(pieces, self.rank, self.slots)

    def _close_loader(self) -> None:
        it, self._loader = self._loader, None
        if it is not None:
            it.close()

    def _pieces(self) -> list[MixPiece]:
        if self._loader is None:
            self._loader = self._open_loader()
        t0 = time.perf_counter()
        if isinstance(self._loader, Workers):
            pieces: list[MixPiece] = self._loader.next_step()
        else:
            pieces = [next(self._loader)]
        self.wait_s += time.perf_counter() - t0
        for piece in pieces:
            if piece.step != self.step:
                raise DataError(f"rank {self.rank}: got step {piece.step} from slot "
                                f"{piece.slot}, expected step {self.step}")  # fmt: skip
        return pieces

    def next_step(self) -> list[list[Sample]]:
        """The rank's grad_accum micro-batches of the next step (holes dropped)."""
        counts = apportion([c.consumed for c in self.cursors], self.spec.weights,
                           self.spec.global_batch, self.spec.n_slots)  # fmt: skip
        pieces = self._pieces()
        self._advance(counts)
        items: list[tuple[int, int, Sample | None]] = []
        for piece in pieces:
            items += piece.items
            self.stats.add(piece.stats)
            for j, (epoch, states) in piece.states.items():
                if epoch != self.cursors[j].epoch:
                    raise DataError(f"slot {piece.slot} is in epoch {epoch} of source "
                                    f"{self.spec.sources[j].name}, the rank in "
                                    f"{self.cursors[j].epoch}")  # fmt: skip
                self._states[j].update(states)
            for j, hole in piece.holes:
                self.quarantine.add(hole)
                self._skipped[j] += 1
        for _, j, sample in items:
            self._taken[j] += 1
            self._good[j] += sample is not None
        self._check_sources(pieces)
        items.sort(key=lambda it: it[0])
        micro = micro_batches([s for _, _, s in items], self.micro_batch_size, self.grad_accum,
                              f"rank {self.rank}, step {self.step}", "")  # fmt: skip
        if os.environ.get(SAMPLE_LOG_ENV):  # keys qualified by source: two may share a key
            names = [src.name for src in self.spec.sources]
            log_samples(self.rank, self.epoch, self.step,
                        [[{"__key__": f"{s['__source__']}/{s['__key__']}"} for s in b] for b in micro],
                        [h._replace(shard=f"{names[j]}/{h.shard}") for p in pieces
                         for j, h in p.holes])  # fmt: skip
        self.step += 1
        return micro

    def _advance(self, counts: list[int]) -> None:
        """Move the rank's cursors past the step (the slots move their own copies alike)."""
        for j, (src, cursor) in enumerate(zip(self.spec.sources, self.cursors, strict=True)):
            cursor.consumed += counts[j]
            while cursor.roll(cursor.consumed, src.manifest, self.spec.partitions):
                self._states[j] = {}

    def _check_sources(self, pieces: list[MixPiece]) -> None:
        """Stop on a source none of whose first samples (on this rank) was good."""
        for j, src in enumerate(self.spec.sources):
            need = min(ALL_BAD_AFTER, self.cursors[j].epoch_len(self.spec.partitions))
            if self._good[j] == 0 and self._taken[j] >= need:
                last = next((h.reason for p in pieces for i, h in p.holes if i == j), "?")
                raise DataError(f"source {src.name} ({src.url}): its first {self._taken[j]} "
                                f"samples were all bad ({last})")  # fmt: skip

    def close(self) -> None:
        self._close_loader()

    def summary(self) -> dict[str, float]:
        """Cumulative counters for the trainer to log, DataStream's and per source."""
        out = io_summary(self.stats, self.wait_s)
        for j, src in enumerate(self.spec.sources):
            out[f"source/{src.name}/samples"] = self._good[j]
            out[f"source/{src.name}/epoch"] = self.cursors[j].epoch
            # The whole run's, resumes included: the same position on every rank.
            out[f"source/{src.name}/consumed"] = self.cursors[j].consumed
            out[f"source/{src.name}/skipped"] = self._skipped[j]
        return out


def _load_sources(
    sources: Sequence[tuple[str, str, float]], seed: int, partitions: int
) -> tuple[tuple[SourceSpec, ...], tuple[float, ...]]:
    """Each source's manifest and seed, and the normalized weights; a user error names it."""
    if not sources:
        raise ValueError("data.sources: no sources")
    names = [name for name, _, _ in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"data.sources: the names {names} are not unique")
    specs = []
    for name, url, weight in sources:
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"data.sources: source {name}: weight must be > 0, got {weight}")
        manifest = Manifest.load(url)
        if manifest.num_samples < partitions:
            raise ValueError(
                f"data.sources: source {name} ({url}) holds {manifest.num_samples} samples, "
                f"fewer than data.partitions ({partitions})"
            )
        specs.append(SourceSpec(name, url, manifest, source_seed(seed, name)))
    modalities = {s.manifest.modality for s in specs}
    if len(modalities) > 1:
        each = ", ".join(f"{s.name} ({s.manifest.modality})" for s in specs)
        raise ValueError(f"data.sources: the sources are not all of one modality: {each}")
    total = sum(w for _, _, w in sources)
    return tuple(specs), tuple(w / total for _, _, w in sources)
