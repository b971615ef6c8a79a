"""A remote tar shard streamed by ranged GETs of its samples, never fetched whole unless in doubt.

Where the manifest has sample offsets (offsets.py, written by prepare and index), ShardCache
hands out a RangedShard for a remote tar shard that is not in the shared cache: each partition
streams its own segment of it, so every byte of an epoch is fetched once, by the one slot that
reads it, and the first sample of a start or resume waits for a few kilobytes, not a shard.

  * `want(js, ahead_from)`: ranged GETs of the samples js (what a partition reads before its
    first output: its buffer's samples and the inputs that fill it), nearby ones coalesced
    into one *span* (gaps up to GAP bytes, at most SPAN_MAX). Spans are fetched by the cache's
    range threads, in the order they were wanted.
  * `bound(stop)`: a partition's segment ends before sample `stop` (the next one is another
    partition's): no span reaches past it, and no read-ahead starts there.
  * `ahead(j)`: fetch the span from sample j now (a partition's next segment, shortly before
    it gets there).
  * `read(j)`: sample j from the span holding it (a new span of AHEAD bytes from j if none
    does). Once half of the span holding `ahead_from`, or of one made by a read, is read, the
    span after it is fetched, up to the segment's end, each twice the last up to ahead_max
    (8 MiB, less where a slot streams many partitions): a partition streams its segment one
    GET ahead, and a slot holds about SPAN_BUDGET of spans.

Checks: the offsets file must name this shard and be whole, and one HEAD must find the object
it was written for (its ETag and the manifest's size), so the object is the one the manifest's
sha256 or identity describes (a single-part upload's ETag is its MD5); where the offsets carry
each sample's CRC-32, every sample read by range must match it. Any doubt (a missing or foreign
offsets file, a changed object, a header, key or CRC that does not match, a member the
whole-shard reader would refuse, a failed GET) fetches the whole shard (ShardCache's verified
fetch, which then serves every later read of it) and reads the sample there: its checks decide
what a bad sample is, so ranged reads change what is fetched, not which samples or holes a
step gets.
"""

from __future__ import annotations

import bisect
import threading
import time
from concurrent.futures import Future
from typing import Any, Protocol

from darkmatter import storage
from darkmatter.data_pipeline import offsets as sample_offsets
from darkmatter.data_pipeline.manifest import ShardInfo
from darkmatter.data_pipeline.reader.options import ReaderOptions
from darkmatter.data_pipeline.reader.shards import (
    Hole,
    TarCursor,
    TarFormatError,
    UnitReader,
    _split_name,
    member_refused,
    parse_window,
)


class ShardCache(Protocol):
    """What a RangedShard needs of reader/cache.py's ShardCache (named here, not imported:
    the cache imports this module)."""

    url: str
    opts: ReaderOptions
    span_max: int  # ahead_max of the partitions that read through the cache

    def submit_range(self, fn: Any, *args: Any) -> Future[Any]: ...

    def fetch_whole(self, shard: int) -> Future[UnitReader]: ...

    def _count(self, **deltas: float) -> None: ...


GAP = 256 << 10  # wanted samples at most this far apart share one GET (a GET costs more)
SPAN_MAX = 8 << 20  # and one GET holds at most this much
AHEAD = 1 << 20  # a partition's next inputs: one GET of about this much at first,
AHEAD_MAX = 8 << 20  # doubling along a segment up to this (fewer GETs) or to the budget:
SPAN_BUDGET = 64 << 20  # a slot's spans in memory, about (each partition holds up to two)


def ahead_max(partitions: int) -> int:
    """The largest read-ahead span of a slot that streams `partitions` partitions: its spans
    then hold about SPAN_BUDGET bytes (a partition reads one while the next comes)."""
    return max(AHEAD, min(AHEAD_MAX, SPAN_BUDGET // (2 * max(1, partitions))))


MIN_SHARD = 4 << 20  # smaller shards are fetched whole at once: a span would be most of one


class _Span:
    """Samples [lo, hi) of the shard, fetched as one ranged GET."""

    def __init__(self, lo: int, hi: int, fut: Future[bytes], ahead: int):
        self.lo, self.hi, self.fut = lo, hi, fut
        self.ahead = ahead  # bytes of the span to fetch after it once half read (0: none)
        self.left = hi - lo  # samples not yet read: at 0 the bytes are dropped


class RangedShard:
    """UnitReader of a remote tar shard: its samples by range, the whole shard where in doubt."""

    def __init__(self, cache: ShardCache, info: ShardInfo, url: str, shard: int):
        self.cache, self.info, self.url, self.shard = cache, info, url, shard
        self.name = info.name
        self.bad: str | None = None  # never set: a bad shard is the whole reader's to name
        self._lock = threading.Lock()
        self._spans: dict[int, _Span] = {}  # by first sample
        self._los: list[int] = []  # their first samples, sorted
        self._stops: list[int] = []  # segment ends (bound), sorted
        self._whole_fut: Future[UnitReader] | None = None  # fetched at the first doubt
        self._offsets: Future[sample_offsets.SampleOffsets | None] = cache.submit_range(
            self._load_offsets
        )

    # -- the offsets and the object's identity ----------------------------------------------
    def _load_offsets(self) -> sample_offsets.SampleOffsets | None:
        """The shard's offsets, once one HEAD finds the object they were written for (its ETag
        and the manifest's size); None otherwise, and the whole-shard fetch then decides."""
        info, retry = self.info, self.cache.opts.retry
        where = sample_offsets.url(self.cache.url, info.identity)
        try:
            data = storage.with_retries(
                lambda: storage.read_bytes(where), f"read of {where}", retry
            )
            found = sample_offsets.decode(data, info.identity, info.samples)
            if found is None or not found.etag:
                return None
            fs, path = storage.filesystem(self.url)
            head = storage.with_retries(lambda: fs.info(path), f"fetch of {self.url}", retry)
        except Exception:  # noqa: BLE001 - missing, unreadable, refused: the whole shard decides
            return None
        if head.get("size") != info.bytes or sample_offsets.etag_of(head) != found.etag:
            return None
        return found

    def _ready(self) -> sample_offsets.SampleOffsets | None:
        t0 = time.perf_counter()
        found = self._offsets.result()
        self.cache._count(wait_s=time.perf_counter() - t0)
        return found

    def _done(self) -> UnitReader | None:
        """The whole shard, if a doubt fetched it and it has arrived (spans are then dropped)."""
        fut = self._whole_fut
        if fut is None or not fut.done():
            return None
        if self._spans:
            with self._lock:
                self._spans.clear()
                self._los.clear()
        return fut.result()

    # -- spans ------------------------------------------------------------------------------
    def want(self, js: list[int], ahead_from: int | None = None) -> None:
        """Fetch samples js by range, nearby ones in one GET; the span holding `ahead_from`
        (a partition's last input before its first output) reads ahead once half read."""
        if self._done() is not None or not js:
            return
        off = self._ready()
        if off is None:
            return
        starts = off.starts
        js = sorted(j for j in set(js) if not self._holding(j))
        groups: list[list[int]] = []
        for j in js:
            if not groups or (
                int(starts[j]) - int(starts[groups[-1][-1] + 1]) > GAP
                or int(starts[j + 1]) - int(starts[groups[-1][0]]) > SPAN_MAX
            ):
                groups.append([])
            groups[-1].append(j)
        for group in groups:
            self._span(group[0], group[-1] + 1, AHEAD if ahead_from in group else 0, group)

    def bound(self, stop: int) -> None:
        """A partition reading this shard stops before sample `stop`: spans stop there too."""
        with self._lock:
            if stop not in self._stops:
                bisect.insort(self._stops, stop)

    def unbound(self) -> None:
        """Forget the segment ends: a new epoch cuts the shard's samples in other places."""
        with self._lock:
            self._stops.clear()

    def ahead(self, j: int) -> None:
        """Start fetching the span from sample j (a partition's next segment begins there)."""
        if self._done() is not None or self._holding(j) is not None:
            return
        off = self._ready()
        if off is not None and j < off.samples:
            self._span_from(off, j)

    def _span_from(self, off: sample_offsets.SampleOffsets, j: int) -> _Span:
        """The span holding sample j, or a new one of AHEAD bytes from it that reads ahead."""
        return self._holding(j) or self._span(j, self._end_of(off, j, AHEAD), AHEAD)

    def _end_of(self, off: sample_offsets.SampleOffsets, lo: int, nbytes: int) -> int:
        """The first sample at or after `nbytes` past sample lo's start (at least lo + 1), or
        the end of lo's segment if that comes first."""
        target = int(off.starts[lo]) + nbytes
        hi = min(max(bisect.bisect_left(off.starts, target, lo + 1), lo + 1), off.samples)
        k = bisect.bisect_right(self._stops, lo)
        return min(hi, self._stops[k]) if k < len(self._stops) else hi

    def _holding(self, j: int) -> _Span | None:
        k = bisect.bisect_right(self._los, j) - 1
        if k >= 0:
            span = self._spans[self._los[k]]
            if j < span.hi:
                return span
        return None

    def _span(self, lo: int, hi: int, ahead: int, wanted: list[int] | None = None) -> _Span:
        with self._lock:
            if (held := self._holding(lo)) is not None:
                return held
            off = self._offsets.result()
            assert off is not None
            a, b = int(off.starts[lo]), int(off.starts[hi])
            span = _Span(lo, hi, self.cache.submit_range(self._get, a, b), ahead)
            if wanted is not None:
                span.left = len(wanted)
            self._spans[lo] = span
            bisect.insort(self._los, lo)
            return span

    def _get(self, start: int, end: int) -> bytes:
        t0 = time.perf_counter()
        fs, path = storage.filesystem(self.url)
        data: bytes = storage.with_retries(
            lambda: fs.cat_file(path, start=start, end=end), f"read of {self.url}",
            self.cache.opts.retry, on_retry=lambda: self.cache._count(retries=1),
        )  # fmt: skip
        self.cache._count(bytes_read=len(data), fetch_s=time.perf_counter() - t0)
        return data

    def _drop(self, span: _Span) -> None:
        with self._lock:
            if self._spans.get(span.lo) is span:
                del self._spans[span.lo]
                self._los.remove(span.lo)

    # -- UnitReader -------------------------------------------------------------------------
    def read(self, j: int) -> dict[str, Any] | Hole:
        whole = self._done()
        if whole is not None:
            return whole.read(j)
        off = self._ready()
        if off is None:
            return self._whole().read(j)
        span = self._span_from(off, j)
        t0 = time.perf_counter()
        try:
            data = span.fut.result()
        except Exception:  # a failed GET: the whole-shard fetch retries, or names the error
            return self._whole().read(j)
        finally:
            self.cache._count(wait_s=time.perf_counter() - t0)
        raw = self._sample(off, j, data, int(off.starts[span.lo]))
        span.left -= 1
        if span.left <= 0:
            self._drop(span)
        if (
            span.ahead and j + 1 >= (span.lo + span.hi) / 2
            and span.hi < off.samples and span.hi not in self._stops
        ):  # fmt: skip
            size = min(2 * span.ahead, self.cache.span_max)
            self._span(span.hi, self._end_of(off, span.hi, span.ahead), size)
        return raw if raw is not None else self._whole().read(j)

    def _sample(
        self, off: sample_offsets.SampleOffsets, j: int, data: bytes, base: int
    ) -> dict[str, Any] | None:
        """Sample j from its span's bytes, or None where anything is in doubt."""
        lo, hi = int(off.starts[j]), int(off.starts[j + 1])
        buf = data[lo - base : hi - base]
        cur = TarCursor(pos=lo)
        try:
            members = list(parse_window(buf, lo, cur))
        except (TarFormatError, ValueError, IndexError):
            return None
        if not members or cur.pos != hi:
            return None
        key = _split_name(members[0][0])[0]
        raw: dict[str, Any] = {"__key__": key, "__shard__": self.name}
        parts = []
        for name, offset, size in members:
            k, ext = _split_name(name)
            if (
                k != key
                or offset + size > hi
                or member_refused(name, ext, size, self.cache.opts.max_member_bytes, raw)
            ):
                return None  # the whole-shard reader decides what such a sample is
            raw[ext] = buf[offset - lo : offset - lo + size]
            parts.append(raw[ext])
        if off.crc32 is not None and sample_offsets.crc32(parts) != int(off.crc32[j]):
            return None
        return raw

    def _whole(self) -> UnitReader:
        """The whole shard, fetched (and verified) now if no doubt has fetched it yet."""
        with self._lock:
            if self._whole_fut is None:
                self._whole_fut = self.cache.fetch_whole(self.shard)
            fut = self._whole_fut
        t0 = time.perf_counter()
        whole = fut.result()
        self.cache._count(wait_s=time.perf_counter() - t0)
        return whole

    def key(self, j: int) -> str:
        return self._whole().key(j)

    def close(self) -> None:
        with self._lock:
            self._spans.clear()
            self._los.clear()
