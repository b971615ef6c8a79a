"""The worker pool: a rank's slots in forked worker processes, each running ahead into a bounded
queue, read round-robin by a receiver thread of the rank.

What a worker runs is a *pieces factory*: a picklable callable that, given the slot number,
returns that slot's endless iterator of pieces (one per step): slots.slot_pieces for a
DataStream, mixture.mixture_pieces for a MixtureStream. The pool only moves pieces: their large arrays through shared memory (Arena), the rest pickled
through each worker's queue."""

from __future__ import annotations

import mmap
import multiprocessing as mp
import queue
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from darkmatter.data_pipeline.reader.options import DataError

# slot number -> that slot's pieces, step after step (forked: it is inherited, not sent).
PiecesFactory = Callable[[int], Iterator[Any]]


@dataclass(frozen=True)
class _WorkerFailure:
    message: str


def _worker_main(pieces: PiecesFactory, slot: int, out: Any, stop: Any, arena: Arena) -> None:
    """A worker process: one slot's pieces into a bounded queue until told to stop."""
    _die_with_parent()
    # A scheduler may signal every process of the job (SLURM does, for --signal and scancel):
    # preemption is the rank's business. The worker ends when told to, or with its rank.
    import signal

    for name in ("SIGTERM", "SIGUSR1", "SIGUSR2"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    last: Any = None
    try:
        for piece in pieces(slot):
            if not _put(out, arena.pack(piece), stop):
                break
    except DataError as e:
        last = _WorkerFailure(str(e))
    except Exception:  # a bug: the main process re-raises it with this traceback
        last = _WorkerFailure(f"data worker of slot {slot} failed:\n{traceback.format_exc()}")
    if last is not None and _put(out, last, stop):
        out.close()
        out.join_thread()  # the failure reaches the pipe before the process exits
    else:
        out.cancel_join_thread()  # told to stop: nobody reads what is left


def _put(out: Any, item: Any, stop: Any) -> bool:
    """Put into the bounded queue, waiting for room; False once told to stop."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.2)
            return True
        except queue.Full:
            continue
    return False


def _die_with_parent() -> None:
    """Ask Linux to kill this worker when its rank dies (no orphans reading shards)."""
    if sys.platform != "linux":
        return
    import ctypes
    import signal

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Workers:
    """A rank's slots in worker processes, read round-robin: one piece per worker per step.

    Not a torch DataLoader: its per-item round trip (an index sent to the worker, a result
    back, both through feeder threads) measured 1-6 ms per step here, several percent of a short
    step. Workers here run ahead on their own into a bounded queue, so a ready piece costs the
    rank one unpickle. Forked like DataLoader workers: fsspec resets its event loop and
    filesystem cache in a forked child, and no worker inherits an open shard.
    """

    def __init__(self, pieces: PiecesFactory, rank: int, slots: int, depth: int = 2):
        ctx = mp.get_context("fork")
        self.stop = ctx.Event()
        self.queues = [ctx.Queue(maxsize=depth) for _ in range(slots)]
        self.arenas = [Arena(depth + 3) for _ in range(slots)]  # made before the fork: shared
        self.procs = [
            ctx.Process(
                target=_worker_main,
                name=f"darkmatter-data-{rank}-{w}",
                daemon=True,
                args=(pieces, rank * slots + w, self.queues[w], self.stop, self.arenas[w]),
            )
            for w in range(slots)
        ]
        for proc in self.procs:
            proc.start()
        self._next = 0
        # A thread of the rank receives and unpickles whole steps while the training thread
        # is inside torch (which releases the GIL): a ready step then costs a deque pop.
        self._steps: queue.Queue[list[Any] | BaseException] = queue.Queue(maxsize=depth)
        self._receiver: threading.Thread | None = threading.Thread(
            target=self._receive, name=f"darkmatter-data-recv-{rank}", daemon=True
        )
        self._receiver.start()

    def _receive(self) -> None:
        try:
            while not self.stop.is_set():
                step = [next(self) for _ in self.procs]
                while not self.stop.is_set():
                    try:
                        self._steps.put(step, timeout=0.5)
                        break
                    except queue.Full:
                        continue
        except StopIteration:
            return
        except BaseException as e:  # handed to the training thread, which raises it
            if not self.stop.is_set():  # closing: nobody takes it, and _steps may be full
                self._steps.put(e)

    def next_step(self) -> list[Any]:
        """The pieces of every worker for the next step, received ahead by the thread."""
        while True:
            try:
                item = self._steps.get(timeout=0.5)
            except queue.Empty:
                if self._receiver is None or not self._receiver.is_alive():
                    raise DataError("the data receiver thread stopped") from None
                continue
            if isinstance(item, BaseException):
                raise item
            return item

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        w = self._next
        while True:
            try:
                item = self.queues[w].get(timeout=0.5)
                break
            except queue.Empty:
                if self.stop.is_set():
                    raise StopIteration from None
                if not self.procs[w].is_alive():
                    raise DataError(
                        f"data worker {w} died (exit code {self.procs[w].exitcode})"
                    ) from None
        self._next = (w + 1) % len(self.procs)
        if isinstance(item, _WorkerFailure):
            raise DataError(item.message)
        return self.arenas[w].unpack(item)

    def close(self) -> None:
        """Stop the workers, then the receiver. In that order: a worker told to stop exits
        without finishing the piece its queue's feeder thread was writing (a step of images is
        megabytes), and the receiver, reading that piece, would wait for the rest forever,
        since this process holds a write end of every queue's pipe too. With the workers gone,
        closing that write end turns the half-read piece into an EOFError, which ends the
        receiver."""
        self.stop.set()
        for proc in self.procs:
            proc.join(timeout=2.0)
            if proc.is_alive():
                proc.kill()  # it ignores SIGTERM (see _worker_main) and holds nothing to save
                proc.join()
        for q in self.queues:
            q._writer.close()  # type: ignore[attr-defined]  # multiprocessing's pipe end
        if self._receiver is not None:
            self._receiver.join()
        for q in self.queues:
            q.close()
            q.cancel_join_thread()


# -- large arrays through shared memory ----------------------------------------------------------
SHARED_MIN_BYTES = 64 << 10  # arrays at least this large travel through the worker's arena
ARENA_SLOT_BYTES = 32 << 20  # one piece's arrays; what does not fit is pickled as before


@dataclass(frozen=True)
class _InArena:
    """Where an array of a piece lies in its worker's arena."""

    offset: int
    dtype: str
    shape: tuple[int, ...]


class Arena:
    """Shared memory between a worker and its rank for the large arrays of pieces (decoded
    images, audio, video frames): an anonymous shared mapping made before the fork, cut into
    `slots` slots of ARENA_SLOT_BYTES that the worker fills in turn.

    Pickled through the queue's pipe, a piece's arrays cost four copies and a write and read
    per 64 KiB (0.4-0.5 ms of CPU per 147 KiB image here, more than the decode); through the
    arena, one copy in (worker) and one out (the rank's receiver thread: the rank's arrays are
    its own, so a slot is free again once received). A slot is reused `slots` pieces later:
    the queue holds at most `depth` pieces, and the receiver copies a piece out before it takes
    the next, so with depth + 2 slots or more the one being filled was already copied out."""

    def __init__(self, slots: int):
        self.slots = slots
        self.mem = mmap.mmap(-1, slots * ARENA_SLOT_BYTES)
        self._next = 0

    def pack(self, piece: Any) -> Any:
        """The piece with its large arrays written to the next slot, each replaced by where it
        lies (worker side)."""
        items = getattr(piece, "items", None)
        if not items:
            return piece
        flat = np.frombuffer(self.mem, np.uint8)
        base = self._next * ARENA_SLOT_BYTES
        at, used = base, False
        for *_, sample in items:
            if not isinstance(sample, dict):
                continue
            for key, a in sample.items():
                if (
                    isinstance(a, np.ndarray) and a.nbytes >= SHARED_MIN_BYTES
                    and not a.dtype.hasobject and at + a.nbytes <= base + ARENA_SLOT_BYTES
                ):  # fmt: skip
                    flat[at : at + a.nbytes].view(a.dtype).reshape(a.shape)[...] = a
                    sample[key] = _InArena(at, a.dtype.str, a.shape)
                    at += -(-a.nbytes // 64) * 64  # aligned
                    used = True
        if used:
            self._next = (self._next + 1) % self.slots
        return piece

    def unpack(self, piece: Any) -> Any:
        """The piece with its arrays copied back out of the arena (rank side)."""
        flat = None
        for *_, sample in getattr(piece, "items", None) or []:
            if not isinstance(sample, dict):
                continue
            for key, where in sample.items():
                if isinstance(where, _InArena):
                    if flat is None:
                        flat = np.frombuffer(self.mem, np.uint8)
                    dtype = np.dtype(where.dtype)
                    n = int(np.prod(where.shape, dtype=np.int64)) * dtype.itemsize
                    out = np.empty(where.shape, dtype)
                    out.reshape(-1).view(np.uint8)[...] = flat[where.offset : where.offset + n]
                    sample[key] = out
        return piece
