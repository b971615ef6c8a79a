"""Getting shards to the slot: fetch, verify and the machine's shared shard cache.

Each shard a slot touches is fetched whole into a cache folder shared by the machine's
processes (read-ahead threads; retries within the storage.retry budget that resume the body
where it broke off; a 403, refused credentials or a missing bucket end the job at once, naming
the bucket), checked against the manifest's size and sha256, and indexed by its tar headers
(shards.py). The folder (data.cache_dir, default $XDG_CACHE_HOME/darkmatter/shards) is kept
under a byte cap (data.cache_gb) by evicting the least recently used shards and their lock
files. IOStats counts what this costs.

Where the manifest has sample offsets, a remote tar shard that is not here already is handed out
as a RangedShard (ranged.py): its samples are streamed by range, and the whole shard is fetched
only where something is in doubt. Such a shard costs no disk, and is fetched again each epoch.

A shard lies at `Manifest.shard_url` (beside the manifest, or under the manifest's `root` for
data indexed in place). A shard without a sha256 (`darkmatter index` without --checksum) is
cached under its identity as `<identity>.unverified.tar` and checked by size, and by ETag where
the store gives one and the manifest recorded it: `verify` means nothing for such a shard.
Units that are not tar files (Parquet row groups, jsonl/text byte ranges) are opened by
reader/formats.py, which reads them in place into memory (up to 64 MiB each): a slot keeps at
most max(2, readahead) of them open once released, where it keeps 256 local or 64 remote tar
shards (an index and an open file each).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from darkmatter import storage
from darkmatter.data_pipeline import offsets
from darkmatter.data_pipeline.manifest import Manifest, ShardInfo
from darkmatter.data_pipeline.reader import ranged
from darkmatter.data_pipeline.reader.options import DataError, ReaderOptions, default_cache_dir
from darkmatter.data_pipeline.reader.ranged import RangedShard
from darkmatter.data_pipeline.reader.shards import Hole, LocalShard, UnitReader, reason_kind


@dataclass
class IOStats:
    """Per-slot counters, summed by the rank."""

    bytes_read: int = 0
    fetch_s: float = 0.0  # time spent fetching shards (in read-ahead threads too)
    wait_s: float = 0.0  # time the slot waited for a shard it needed
    decode_s: float = 0.0
    retries: int = 0
    samples: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    def add(self, other: IOStats, sign: int = 1) -> None:
        self.bytes_read += sign * other.bytes_read
        self.fetch_s += sign * other.fetch_s
        self.wait_s += sign * other.wait_s
        self.decode_s += sign * other.decode_s
        self.retries += sign * other.retries
        self.samples += sign * other.samples
        for k, v in other.skipped.items():
            self.skipped[k] += sign * v

    def copy(self) -> IOStats:
        out = IOStats()
        out.add(self)
        return out


class ShardCache:
    """One slot's shards, verified and indexed, fetched ahead by threads.

    Remote shards go into a folder shared by every process of the machine (ranks and their
    workers), named by their sha256: a shard is fetched once per machine however many slots
    read it, under a file lock, and moved into place only once verified. The folder is kept
    under `cache_bytes` by deleting the least recently used shards (a reader holds its shard
    open, so a deletion never breaks it). Local shards are read in place.
    """

    def __init__(self, url: str, manifest: Manifest, opts: ReaderOptions, stats: IOStats):
        self.url, self.manifest, self.opts, self.stats = url, manifest, opts, stats
        self.local = not storage.is_remote(manifest.root or url)  # where the shards lie
        self._pool: ThreadPoolExecutor | None = None
        self._futures: dict[int, Future[UnitReader]] = {}
        self._refs: Counter[int] = Counter()
        # Released shards stay a little while: a neighbouring partition or a resumed stream's
        # input often wants the shard its shuffle buffer was just read back from.
        self._idle: deque[int] = deque()
        # Local shards cost only their index to keep: later epochs skip re-verifying them.
        # Remote ones are on disk anyway; the index and an open file are what is kept. Raw
        # units (Parquet row groups, jsonl/text ranges) are held in memory, up to 64 MiB each:
        # keeping 64 or 256 of them idle would hold gigabytes per slot, so only a few are kept.
        if any(s.format != "tar" for s in manifest.shards):
            self._keep_idle = max(2, opts.readahead)
        else:
            self._keep_idle = 256 if self.local else max(64, opts.readahead)
        self._shipped = IOStats()
        self._lock = threading.Lock()
        # Shards with sample offsets, read by range (ranged.py).
        self._ranged = (
            opts.range_reads and manifest.offsets and not self.local
            and storage.is_remote(manifest.root or url)
        )  # fmt: skip
        self._views: dict[int, RangedShard] = {}
        self._range_pool: ThreadPoolExecutor | None = None
        self.span_max = ranged.ahead_max(1)  # streams(): the partitions reading through it

    def _folder(self) -> str:
        root = self.opts.cache_dir or default_cache_dir()
        os.makedirs(root, exist_ok=True)
        return root

    def count_samples(self, good: int, holes: list[Hole]) -> None:
        with self._lock:
            self.stats.samples += good
            for h in holes:
                self.stats.skipped[reason_kind(h.reason)] += 1

    def take_stats(self) -> IOStats:
        """The counters' change since the last call (pieces carry deltas)."""
        with self._lock:
            now = self.stats.copy()
        delta = now.copy()
        delta.add(self._shipped, sign=-1)
        self._shipped = now
        return delta

    def _count(self, **deltas: float) -> None:
        with self._lock:  # fetch threads and the slot's own thread both count
            for name, value in deltas.items():
                setattr(self.stats, name, getattr(self.stats, name) + value)

    def _future(self, shard: int) -> Future[UnitReader]:
        with self._lock:
            fut = self._futures.get(shard)
            if fut is None:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(
                        max(4, self.opts.readahead), thread_name_prefix="darkmatter-fetch"
                    )
                fut = self._futures[shard] = self._pool.submit(self._load, shard)
            return fut

    def prefetch(self, shard: int, stop: int | None = None) -> None:
        """Fetch the shard ahead of its first read: whole, or where it is read by range its
        offsets (and `stop`, the end of the segment a partition will read, bounds its spans)."""
        view = self._view(shard)
        if view is None:
            self._future(shard)
        elif stop is not None:
            view.bound(stop)

    def ahead(self, shard: int, start: int, stop: int) -> None:
        """A partition reads samples [start, stop) of the shard soon: where the shard is read
        by range, their first span is fetched now (prefetch fetches a whole shard)."""
        view = self._view(shard)
        if view is not None:
            view.bound(stop)
            view.ahead(start)

    def streams(self, partitions: int) -> None:
        """An epoch's `partitions` partitions start reading through this cache: their
        read-ahead spans shrink so that together they hold about ranged.SPAN_BUDGET bytes, and
        the last epoch's segment ends no longer bound them."""
        self.span_max = ranged.ahead_max(partitions)
        with self._lock:
            views = list(self._views.values())
        for view in views:
            view.unbound()

    def fetch_whole(self, shard: int) -> Future[UnitReader]:
        """The whole shard's fetch (a RangedShard's, where a ranged read is in doubt)."""
        return self._future(shard)

    def submit_range(self, fn: Any, *args: Any) -> Future[Any]:
        with self._lock:
            if self._range_pool is None:
                self._range_pool = ThreadPoolExecutor(
                    RANGE_THREADS, thread_name_prefix="darkmatter-range"
                )
            return self._range_pool.submit(fn, *args)

    def _view(self, shard: int) -> RangedShard | None:
        """The shard read by range, where it can be (not in the shared cache already)."""
        with self._lock:
            view = self._views.get(shard)
        if view is not None:
            return view
        info = self.manifest.shards[shard]
        if not self._rangeable(info):
            return None
        url = self.manifest.shard_url(self.url, info)
        view = RangedShard(self, info, url, shard)
        with self._lock:
            return self._views.setdefault(shard, view)

    def _rangeable(self, info: ShardInfo) -> bool:
        """Whether the shard may be read by range: a remote tar shard with sample offsets, too
        large to just fetch whole before its first sample, and not in the shared cache."""
        return (
            self._ranged and info.format == "tar" and info.bytes > ranged.MIN_SHARD
            and not os.path.exists(self._cache_path(info))
        )  # fmt: skip

    def _cache_path(self, info: ShardInfo) -> str:
        """The shard's file in the shared cache folder."""
        verified = self.opts.verify and info.sha256 is not None
        return os.path.join(
            self._folder(), f"{info.identity}{'' if verified else '.unverified'}.tar"
        )

    def want(self, shard: int, samples: list[int], ahead_from: int | None = None) -> None:
        """Fetch these samples of the shard by range now, if it is read by range (ranged.py)."""
        view = self._view(shard)
        if view is not None:
            view.want(samples, ahead_from)

    def acquire(self, shard: int, stop: int | None = None) -> UnitReader:
        """The shard's reader, for a partition that reads it up to sample `stop` (a bound on
        ranged reads; None: as far as the shard goes)."""
        view = self._view(shard)
        local: UnitReader
        if view is not None:
            if stop is not None:
                view.bound(stop)
            local = view
        else:
            fut = self._future(shard)
            t0 = time.perf_counter()
            local = fut.result()
            self._count(wait_s=time.perf_counter() - t0)
        with self._lock:
            self._refs[shard] += 1
            if shard in self._idle:
                self._idle.remove(shard)
        return local

    def release(self, shard: int) -> None:
        with self._lock:
            self._refs[shard] -= 1
            if self._refs[shard] > 0:
                return
            del self._refs[shard]
            self._idle.append(shard)
            if len(self._idle) <= self._keep_idle:
                return
            gone = self._idle.popleft()
            fut = self._futures.pop(gone, None)
            view = self._views.pop(gone, None)
        if view is not None:
            view.close()
        if fut is not None:
            fut.add_done_callback(self._discard_done)  # at once if done; else when it is

    def _discard_done(self, fut: Future[UnitReader]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self._discard(fut.result())

    def _discard(self, local: UnitReader) -> None:
        local.close()  # the file stays in the shared cache until evicted

    def close(self) -> None:
        if self._range_pool is not None:
            self._range_pool.shutdown(wait=True, cancel_futures=True)
        for view in self._views.values():
            view.close()
        self._views.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        for fut in self._futures.values():
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._discard(fut.result())
        self._futures.clear()

    # -- fetching --------------------------------------------------------------------------
    def _load(self, shard: int) -> UnitReader:
        info = self.manifest.shards[shard]
        url = self.manifest.shard_url(self.url, info)
        if info.format != "tar":
            # Imported here: only datasets of raw files need it.
            from darkmatter.data_pipeline.reader.formats import open_unit

            return open_unit(url, info, self.manifest, self.opts)
        # Another process may evict the shard between its fetch and its opening (a cache too
        # small for what the machine reads at once): fetch it again, a few times at most.
        for _ in range(_REOPENS):
            local = self._fetch(url, info)
            if local.bad is not None:
                return local
            try:
                local.index(self.opts.max_member_bytes)
                return local
            except FileNotFoundError:
                continue
        raise DataError(
            f"{url}: evicted from the shard cache {_REOPENS} times before it could be opened; "
            f"raise data.cache_gb ({self.opts.cache_bytes / 2**30:g} GB now)"
        )

    def _fetch(self, url: str, info: ShardInfo) -> LocalShard:
        """The shard as a verified local file, or with `bad` set to why it is unusable."""
        t0 = time.perf_counter()
        local = LocalShard(info.name, None, info.samples)
        try:
            local.path, local.bad = (
                self._cached(url, info) if storage.is_remote(url) else self._local(url, info)
            )
        except FileNotFoundError:
            local.bad = "missing shard"
        finally:
            self._count(fetch_s=time.perf_counter() - t0)
        return local

    def _check(self, size: int, digest: str | None, info: ShardInfo) -> str | None:
        """Why a fetched shard does not match its manifest entry, or None."""
        if size == 0:
            return "zero-byte shard"
        if size != info.bytes:
            return f"size mismatch: {size} bytes, the manifest says {info.bytes}"
        if digest is not None and info.sha256 is not None and digest != info.sha256:
            return f"sha256 mismatch: {digest[:12]}…, the manifest says {info.sha256[:12]}…"
        return None

    def _local(self, url: str, info: ShardInfo) -> tuple[str, str | None]:
        path = url.removeprefix("file://")
        size = os.path.getsize(path)
        digest = None
        if self.opts.verify and info.sha256 is not None:
            sha = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    sha.update(chunk)
            digest = sha.hexdigest()
        self._count(bytes_read=size)
        return path, self._check(size, digest, info)

    def _cached(self, url: str, info: ShardInfo) -> tuple[str | None, str | None]:
        """(path in the shared cache, None), or (None, why the shard is bad)."""
        root = self._folder()
        path = self._cache_path(info)
        if _fresh(path, info.bytes):
            return path, None
        try:
            return self._fetch_locked(url, info, path)
        finally:
            # After every fetch that took the lock (done here, found done by another process,
            # refused as bad, or failed): the folder back under its cap, stray locks removed.
            _evict(root, self.opts.cache_bytes, keep=path)

    def _fetch_locked(self, url: str, info: ShardInfo, path: str) -> tuple[str | None, str | None]:
        """_cached's fetch, under the shard's lock file: downloaded, verified, moved in."""
        with open(path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one fetch per machine; the others wait for it
            try:
                if _fresh(path, info.bytes):
                    return path, None
                if info.sha256 is None and (changed := self._etag_changed(url, info)):
                    return None, changed
                tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
                try:
                    check = self.opts.verify and info.sha256 is not None
                    size, digest = self._download(url, tmp, info.bytes, check)
                    bad = self._check(size, digest, info)
                    if bad:
                        return None, bad
                    os.replace(tmp, path)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(tmp)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return path, None

    def _etag_changed(self, url: str, info: ShardInfo) -> str | None:
        """Why a shard without a sha256 is not the object that was indexed (its ETag differs
        from the version recorded), or None; also None where the store gives no ETag (the size
        is then the only check). One HEAD request, within the retry budget."""
        fs, path = storage.filesystem(url)
        try:
            head = storage.with_retries(lambda: fs.info(path), f"fetch of {url}", self.opts.retry)
        except storage.StorageError as e:
            raise DataError(str(e)) from None
        etag = offsets.etag_of(head)
        if etag and info.version and etag != info.version:
            return f"changed since indexed: ETag {etag}, the manifest says {info.version}"
        return None

    def _download(
        self, url: str, tmp: str, expected: int, checksum: bool
    ) -> tuple[int, str | None]:
        """Copy the object to `tmp` within the storage.retry budget, each retry resuming where
        the body broke off; its sha256 with `checksum` (else None: nothing to check it by). A
        missing object raises FileNotFoundError (the shard is a hole); a 403, refused
        credentials, a missing bucket or a spent budget raise DataError."""
        sha = hashlib.sha256() if checksum else None
        with open(tmp, "wb") as out:
            try:
                done = storage.with_retries(
                    lambda: self._copy(url, out, sha, expected), f"fetch of {url}",
                    self.opts.retry, on_retry=lambda: self._count(retries=1),
                )  # fmt: skip
            except storage.StorageError as e:
                raise DataError(str(e)) from None
        return done, sha.hexdigest() if sha is not None else None

    def _copy(self, url: str, out: Any, sha: Any, expected: int) -> int:
        """Append the object's bytes from offset `out.tell()` on to `out`; returns the new
        offset. `out` and `sha` only ever take whole chunks, so a retry resumes exactly."""
        done = out.tell()
        # cache_type none: each read is one ranged GET, and a retry restarts at `done`.
        with storage.open_url(url, "rb", cache_type="none") as f:
            if done:
                f.seek(done)
            while chunk := f.read(_CHUNK):
                out.write(chunk)
                if sha is not None:
                    sha.update(chunk)
                done += len(chunk)
                self._count(bytes_read=len(chunk))
        if 0 < done < expected:
            # A body that ended early reads like a short file; fsspec's size says what it is.
            fs, p = storage.filesystem(url)
            if fs.size(p) > done:
                raise OSError(f"body ended at byte {done} of {expected}")
        return done


_CHUNK = 8 << 20
RANGE_THREADS = 16  # a slot's ranged GETs in flight (ranged.py)
_REOPENS = 5  # fetches of one shard that another process may evict before it is opened


def _fresh(path: str, size: int) -> bool:
    """A cached shard of the right size exists; mark it recently used."""
    try:
        if os.path.getsize(path) != size:
            return False
        os.utime(path)
        return True
    except FileNotFoundError:
        return False


def _evict(root: str, cap: int, keep: str) -> None:
    """Delete the least recently used shards until the folder holds at most `cap` bytes, the
    lock files of shards no longer there, and temporary files of processes that are gone."""
    shards, locks = [], []
    for entry in os.scandir(root):
        if entry.name.endswith(".tmp"):
            pid = entry.name.rsplit(".", 3)[-3]
            if pid.isdigit() and not _alive(int(pid)):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(entry.path)
        elif entry.name.endswith(".tar"):
            with contextlib.suppress(FileNotFoundError):
                st = entry.stat()
                shards.append((st.st_mtime, st.st_size, entry.path))
        elif entry.name.endswith(".tar.lock"):
            locks.append(entry.path)
    total = sum(size for _, size, _ in shards)
    for _, size, path in sorted(shards):
        if total <= cap:
            break
        if path != keep:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            total -= size
    for lock in locks:
        if not os.path.exists(lock.removesuffix(".lock")):
            _remove_lock(lock)


def _remove_lock(path: str) -> None:
    """Delete a shard's lock file unless a fetch holds it. A process that opened it just before
    may then fetch beside another one: a second download of the same verified bytes, moved into
    place atomically, so the cost of a race is time, never a wrong shard."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.remove(path)
    except (BlockingIOError, FileNotFoundError):
        pass  # a fetch holds it (or another process removed it)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
