"""Running unit functions in parallel: a spawn process pool (s3fs is not fork-safe), or this
process for one worker or task, with progress counts sent back from workers to a bar on stderr.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from darkmatter.data_pipeline.manifest import PrepareError

_REPORT_SECONDS = 0.25  # how often a worker sends progress to the parent
_IN_FLIGHT = 4  # tasks submitted per worker ahead of the results: workers never wait for work
_report: Callable[[int, int], None] | None = None  # (samples, bytes) -> progress bar, per process


class Ticker:
    """Batches a unit's progress into a message every _REPORT_SECONDS."""

    def __init__(self) -> None:
        self.samples = self.bytes = 0
        self.last = time.monotonic()

    def add(self, samples: int, nbytes: int, flush: bool = False) -> None:
        self.samples, self.bytes = self.samples + samples, self.bytes + nbytes
        now = time.monotonic()
        if _report is not None and (flush or now - self.last >= _REPORT_SECONDS):
            if self.samples or self.bytes:
                _report(self.samples, self.bytes)
            self.samples = self.bytes = 0
            self.last = now


def _init_worker(queue: Any) -> None:
    global _report
    # The processes are the parallelism; a Rust thread pool per process would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if queue is not None:
        # Progress may be lost, but a worker must never hang at exit flushing it into a pipe
        # the parent has stopped reading (after another unit failed).
        queue.cancel_join_thread()
        _report = lambda samples, nbytes: queue.put((samples, nbytes))  # noqa: E731


def progress_bar(enabled: bool, desc: str, unit: str, total: int | None = None) -> Any:
    from tqdm import tqdm

    # Counted units (a known total) read best unscaled; samples and documents as 12.3k.
    return tqdm(
        desc=desc,
        unit=unit,
        total=total,
        disable=not enabled,
        file=sys.stderr,
        unit_scale=total is None,
    )


class Runner:
    """Runs unit functions in a spawn process pool, or in this process for one worker or task.

    Results come back as tasks finish, with their task number; the order of completion never
    matters to the output. A failed task cancels the tasks not yet started; running ones finish
    (and record their units), so a re-run loses nothing.
    """

    def __init__(self, workers: int, show: bool):
        self.workers, self.show = workers, show
        self._pool: ProcessPoolExecutor | None = None
        self._queue: Any = None

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _start(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn: workers must not inherit the parent's s3fs client or tokenizer threads.
            ctx = multiprocessing.get_context("spawn")
            self._queue = ctx.Queue() if self.show else None
            self._pool = ProcessPoolExecutor(
                self.workers, mp_context=ctx, initializer=_init_worker, initargs=(self._queue,)
            )
        return self._pool

    def run(
        self, fn: Callable[..., Any], tasks: Iterable[tuple[Any, ...]], bar: Any = None
    ) -> Iterator[tuple[int, Any]]:
        """(task number, result) as tasks finish. Tasks are drawn from the iterable as workers
        free up (at most _IN_FLIGHT per worker queued), so a plan of millions of units is never
        held as a list of futures."""
        global _report
        rest = iter(tasks)
        head = list(itertools.islice(rest, 2))  # one task alone runs here: no pool to spawn
        if self.workers == 1 or len(head) <= 1:
            _report = self._bar_updater(bar)
            try:
                for i, args in enumerate(itertools.chain(head, rest)):
                    yield i, fn(*args)
            finally:
                _report = None
            return
        todo = enumerate(itertools.chain(head, rest))
        index: dict[Future[Any], int] = {}
        pending: set[Future[Any]] = set()
        try:
            while True:
                while len(pending) < _IN_FLIGHT * self.workers:
                    nxt = next(todo, None)
                    if nxt is None:
                        break
                    future = self._start().submit(fn, *nxt[1])
                    index[future] = nxt[0]
                    pending.add(future)
                if not pending:
                    return
                done, pending = wait(pending, timeout=_REPORT_SECONDS, return_when=FIRST_COMPLETED)
                self._drain(bar)
                for future in sorted(done, key=index.__getitem__):
                    yield index.pop(future), _result(future)
        finally:
            for future in pending:
                future.cancel()
            self._drain(bar)

    def _bar_updater(self, bar: Any) -> Callable[[int, int], None] | None:
        if bar is None or not self.show:
            return None

        def update(samples: int, nbytes: int) -> None:
            _bar_add(bar, samples, nbytes)

        return update

    def _drain(self, bar: Any) -> None:
        if self._queue is None or bar is None:
            return
        import queue

        while True:
            try:
                samples, nbytes = self._queue.get_nowait()
            except queue.Empty:
                return
            _bar_add(bar, samples, nbytes)


def _result(future: Future[Any]) -> Any:
    try:
        return future.result()
    except BrokenProcessPool:
        raise PrepareError(
            "a worker process died (killed, or out of memory?); finished units "
            "are kept: run the same command again to resume"
        ) from None


def _bar_add(bar: Any, samples: int, nbytes: int) -> None:
    bar.written = getattr(bar, "written", 0) + nbytes
    bar.set_postfix_str(f"{bar.written / 2**20:.1f} MiB written", refresh=False)
    bar.update(samples)
