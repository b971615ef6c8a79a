"""The trainer's streaming reader: one rank's steps of an epoch order that no world size can change.

The order (order.py) is a pure function of manifest, seed, epoch, `partitions` P and the global
batch B: global sample g of an epoch is output number g // P of partition g % P, each partition
its own seeded shuffle stream, and step t of the epoch trains on global samples [t·B, (t+1)·B).
Who reads what (any world size W, any number of data workers per rank):
  * A rank runs S = max(1, num_workers) *slots* (worker processes; one in-process slot without
    workers); slot q = rank·S + worker of W·S owns the partitions p ≡ q (mod W·S) and so the
    global samples g ≡ q (mod W·S): B / (W·S) per step for every slot, equal by construction
    (W·S must divide both P and B). A slot yields one *piece* per step: its samples of the step
    in increasing g, decoded, plus the state of its partitions after them.
  * The rank takes one piece from each worker in turn, which is its share of the step; it
    merges them by g and cuts the result into grad_accum micro-batches by position.
Resume: a checkpoint keeps every partition's state; a resume, with the same or another world
size or worker count, rebuilds each partition from it by reading only the samples its buffer
held: the cost depends on the buffer, never on how far the epoch had got.
Bad data (a missing, empty, truncated or corrupt shard, an undecodable or oversized member)
becomes a *hole* at that sample's place in the order, so no other sample moves; holes are
counted by reason and listed (shard, key, reason) in the rank's quarantine (quarantine.py: bounded
memory, new entries taken by the trainer's log each interval), or raise in strict mode.
Growth: a resume onto a dataset that grew (its manifest lists the saved one in `history`) is
refused unless allow_growth; with it, the epoch in progress ends on the old prefix (order.py).
Several weighted sources: MixtureStream (mixture.py), the same interface over many datasets.

The layers, lowest first: options.py (ReaderOptions, DataError); shards.py (a shard's tar index
and its holes); cache.py (fetch, verify, the machine's shared shard cache); order.py (the order
and the partition streams); decode.py (raw members -> arrays); quarantine.py (the bad samples
met, in bounded memory); slots.py (a slot's pieces);
workers.py (slots in worker processes); mixture.py (MixtureStream); and this module, which owns DataStream (a rank's steps
and its versioned state) and iter_dataset. The names other code imports from here are
re-exported from those modules.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Generator, Iterator
from typing import Any

from darkmatter.data_pipeline.manifest import Manifest
from darkmatter.data_pipeline.reader.cache import IOStats, ShardCache
from darkmatter.data_pipeline.reader.decode import Sample, decode
from darkmatter.data_pipeline.reader.mixture import MixtureStream
from darkmatter.data_pipeline.reader.options import DataError, ReaderOptions
from darkmatter.data_pipeline.reader.order import EpochPlan, resume_manifest
from darkmatter.data_pipeline.reader.quarantine import Quarantine
from darkmatter.data_pipeline.reader.shards import Hole, LocalShard, tar_members
from darkmatter.data_pipeline.reader.slots import Piece, Slot, StreamSpec, slot_pieces
from darkmatter.data_pipeline.reader.steps import (
    SAMPLE_LOG_ENV,
    check_shape,
    io_summary,
    log_samples,
    micro_batches,
)
from darkmatter.data_pipeline.reader.workers import Workers

__all__ = [
    "SAMPLE_LOG_ENV",
    "DataError",
    "DataStream",
    "EpochPlan",
    "Hole",
    "IOStats",
    "LocalShard",
    "Manifest",
    "MixtureStream",
    "Quarantine",
    "ReaderOptions",
    "Sample",
    "Slot",
    "decode",
    "iter_dataset",
    "tar_members",
]

STATE_VERSION = 2


class DataStream:
    """One rank's steps: `next_step()` returns grad_accum micro-batches (lists of samples).

    `state_dict()` after step t describes this rank's partitions after step t; resume with
    `load_state_dict([state of every rank of the checkpoint])`, any world size or worker count.
    """

    def __init__(
        self,
        url: str,
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
        self.url, self.rank, self.world_size = url, rank, world_size
        self.micro_batch_size, self.grad_accum = micro_batch_size, grad_accum
        self.num_workers, self.slots = num_workers, max(1, num_workers)
        self.allow_growth = allow_growth
        self.opts = options or ReaderOptions()
        self.manifest = Manifest.load(url)
        self.spec = StreamSpec(
            url, self.manifest, seed, partitions, global_batch, n_slots, self.opts
        )
        plan = EpochPlan(self.manifest, seed, 0, partitions, global_batch)
        if plan.steps == 0:
            raise ValueError(
                f"{url} holds {self.manifest.num_samples} samples: {partitions} partitions of "
                f"{plan.part_len} give no full global batch of {global_batch}"
            )
        self.steps_per_epoch = plan.steps
        # The spec of the epoch in progress when it is not self.spec: a grown dataset's old
        # prefix, after a resume with allow_growth (order.py); None from the next epoch on.
        self._epoch_spec: StreamSpec | None = None
        self.epoch, self.step = 0, 0  # the next step to hand out
        self._states: dict[int, dict[str, Any]] = {}  # partition -> state after self.step - 1
        self._loader: Generator[Piece, None, None] | Workers | None = None
        self.stats = IOStats()
        self.wait_s = 0.0  # time next_step() waited for pieces
        self.quarantine = Quarantine(self.opts.quarantine_entries)

    # -- state ---------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "dataset_digest": self.manifest.digest,
            "seed": self.spec.seed,
            "partitions": self.spec.partitions,
            "global_batch": self.spec.global_batch,
        }

    def state_dict(self) -> dict[str, Any]:
        out = {
            **self._identity(),
            "epoch": self.epoch,
            "step": self.step,
            "parts": {str(p): s for p, s in self._states.items()},
        }
        if self._epoch_spec is not None:  # the epoch in progress reads an older prefix
            out["epoch_digest"] = self._epoch_spec.manifest.digest
        return out

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        """Continue from the states every rank of a checkpoint saved (any world size)."""
        if not states:
            raise ValueError("no data stream state to resume from")
        if any(s.get("kind") == "mixture" for s in states):
            raise ValueError(
                "cannot resume the data stream: the checkpoint read a mixture (data.sources), "
                "this run reads one dataset: a changed mixture is a new run"
            )
        mine = self._identity()
        epoch_manifest = self._saved_manifest(states)
        for name, value in mine.items():
            if name == "dataset_digest":  # checked by _saved_manifest (growth)
                continue
            theirs = {s.get(name) for s in states}
            if theirs != {value}:
                was = ", ".join(repr(v) for v in sorted(theirs, key=repr))
                raise ValueError(
                    f"cannot resume the data stream: {name} was {was}, is {value!r} now"
                )
        positions = {(int(s["epoch"]), int(s["step"])) for s in states}
        if len(positions) != 1:
            raise ValueError(f"cannot resume the data stream: ranks saved positions {positions}")
        epoch, step = positions.pop()
        parts = {
            int(p): st for s in states for p, st in s["parts"].items()
        }  # ranks own disjoint sets
        missing = sorted(set(range(self.spec.partitions)) - set(parts))
        if step > 0 and missing:
            raise ValueError(
                f"cannot resume the data stream: no state for partitions {missing[:8]}"
                f"{'…' if len(missing) > 8 else ''} (a rank's state file is missing)"
            )
        self._close_loader()
        self._use_epoch_manifest(epoch_manifest)
        self.epoch, self.step = epoch, step
        self._states = {p: st for p, st in parts.items() if self._owns(p)} if step > 0 else {}
        if self.step >= self.steps_per_epoch:
            self._next_epoch()

    def _saved_manifest(self, states: list[dict[str, Any]]) -> Manifest:
        """The manifest the saved epoch in progress reads (this one, or a prefix of it)."""
        pairs = {(s.get("dataset_digest"), s.get("epoch_digest")) for s in states}
        if len(pairs) != 1:
            raise ValueError(f"cannot resume the data stream: ranks saved datasets {pairs}")
        saved, epoch_digest = pairs.pop()
        return resume_manifest(self.url, self.manifest, str(saved), epoch_digest, self.allow_growth)

    def _use_epoch_manifest(self, manifest: Manifest) -> None:
        spec = (
            self.spec
            if manifest is self.manifest
            else dataclasses.replace(self.spec, manifest=manifest)
        )
        self._epoch_spec = None if spec is self.spec else spec
        self.steps_per_epoch = EpochPlan(
            manifest, spec.seed, 0, spec.partitions, spec.global_batch
        ).steps  # the same for every epoch of one manifest

    def _next_epoch(self) -> None:
        self.epoch, self.step, self._states = self.epoch + 1, 0, {}
        if self._epoch_spec is not None:  # a grown dataset: new shards join from now on
            self._use_epoch_manifest(self.manifest)

    # -- iteration -----------------------------------------------------------------------
    def _owns(self, partition: int) -> bool:
        return partition % self.spec.n_slots // self.slots == self.rank

    def _open_loader(self) -> Generator[Piece, None, None] | Workers:
        pieces = functools.partial(
            slot_pieces, self.spec, epoch=self.epoch, start_step=self.step,
            states=self._states, first=self._epoch_spec,
        )  # fmt: skip
        if self.num_workers == 0:  # the single slot runs in this process, synchronously
            return pieces(self.rank)
        return Workers(pieces, self.rank, self.slots)

    def _close_loader(self) -> None:
        it, self._loader = self._loader, None
        if it is not None:
            it.close()

    def next_step(self) -> list[list[Sample]]:
        """The rank's grad_accum micro-batches of the next step (holes dropped)."""
        if self.step >= self.steps_per_epoch:  # the slots go on into the next epoch themselves
            self._next_epoch()
        if self._loader is None:
            self._loader = self._open_loader()
        t0 = time.perf_counter()
        if isinstance(self._loader, Workers):
            pieces = self._loader.next_step()
        else:
            pieces = [next(self._loader)]
        self.wait_s += time.perf_counter() - t0
        items: list[tuple[int, Sample | None]] = []
        holes: list[Hole] = []
        for piece in pieces:
            if (piece.epoch, piece.step) != (self.epoch, self.step):
                raise DataError(
                    f"rank {self.rank}: got step {piece.step} of epoch {piece.epoch} from slot "
                    f"{piece.slot}, expected step {self.step} of epoch {self.epoch}"
                )
            items += piece.items
            self._states.update(piece.states)
            self.stats.add(piece.stats)
            holes += piece.holes
            for h in piece.holes:
                self.quarantine.add(h)
        items.sort(key=lambda it: it[0])
        where = f"rank {self.rank}, step {self.step} of epoch {self.epoch}"
        why = f" ({holes[-1].reason})" if holes else ""
        micro = micro_batches([s for _, s in items], self.micro_batch_size, self.grad_accum,
                              where, why)  # fmt: skip
        log_samples(self.rank, self.epoch, self.step, micro, holes)
        self.step += 1
        return micro

    def close(self) -> None:
        self._close_loader()

    def summary(self) -> dict[str, float]:
        """Cumulative counters for the trainer to log."""
        return io_summary(self.stats, self.wait_s)


def iter_dataset(url: str, options: ReaderOptions | None = None) -> Iterator[Sample]:
    """Every sample of a dataset in manifest order, decoded, through the same checks as
    training (verification, size caps, strictness); bad samples are skipped unless strict."""
    opts = options or ReaderOptions()
    manifest = Manifest.load(url)
    cache = ShardCache(url, manifest, opts, IOStats())
    try:
        for shard, info in enumerate(manifest.shards):
            local = cache.acquire(shard)
            for j in range(info.samples):
                raw = local.read(j)
                try:
                    if isinstance(raw, Hole):
                        raise DataError(raw.reason)
                    sample = decode(raw, manifest.modality, text=opts.text)
                except ValueError as e:
                    if opts.strict:
                        raise DataError(f"shard {info.name}, sample {local.key(j)}: {e}") from None
                    continue
                yield sample
            cache.release(shard)
    finally:
        cache.close()
