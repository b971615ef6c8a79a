"""The trainer's streaming reader: an epoch's sample order that no world size can change.

The order (a pure function of manifest, seed, epoch, `partitions` P and the global batch B):
  * Epoch e permutes the manifest's shards with a RNG seeded by (seed, e). The shards in that
    order, samples in tar order, form the epoch's sequence of N samples; it is cut into P equal
    contiguous *partitions* of L = N // P samples (the < P left over are dropped).
  * Each partition is a stream of its own: its L samples in order through a shuffle buffer of
    `shuffle_buffer` samples, seeded by (seed, e, p). Output number i of partition p is its
    sample i.
  * Global sample g of the epoch is output number g // P of partition g % P. Step t of the
    epoch trains on global samples [t·B, (t+1)·B); an epoch has T = floor(P·L / B) steps.
Who reads what (any world size W, any number of data workers per rank):
  * A rank runs S = max(1, num_workers) *slots* (worker processes; one in-process slot without
    workers); slot q = rank·S + worker of W·S owns the partitions p ≡ q (mod W·S) and so the
    global samples g ≡ q (mod W·S): B / (W·S) per step for every slot, equal by construction
    (W·S must divide both P and B). A slot yields one *piece* per step: its samples of the step
    in increasing g, decoded, plus the state of its partitions after them.
  * The rank takes one piece from each worker in turn, which is its share of the step; it
    merges them by g and cuts the result into grad_accum micro-batches by position.
Resume: a partition's state is (next input, outputs so far, the shuffle buffer as partition
indices, its RNG state). A checkpoint keeps every partition's state; a resume, with the same or
another world size or worker count, rebuilds each partition from it by reading only the samples
its buffer held: the cost depends on the buffer, never on how far the epoch had got.
Shards: each one a slot touches is fetched whole into a cache folder shared by the machine's
processes (read-ahead threads, retries with backoff that resume the body where it broke off),
checked against the manifest's size and sha256, and indexed by its tar headers; samples are
then read by offset. Raw bytes travel
through the shuffle buffer; samples are decoded as they leave it. Bad data (a missing, empty,
truncated or corrupt shard, an undecodable or oversized member) becomes a *hole* at that
sample's place in the order, so no other sample moves; holes are counted by reason and listed
(shard, key, reason) in a quarantine list, or raise in strict mode. Members are only ever read
into memory (never extracted to a path), and pickle members (.pyd, .pkl, .pth) are never
decoded.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import hashlib
import io
import json
import mmap
import multiprocessing as mp
import os
import queue
import re
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from darkmatter import storage
from darkmatter.data_pipeline.prepare import Manifest

Sample = dict[str, Any]
STATE_VERSION = 2
PICKLE_EXTENSIONS = frozenset({"pyd", "pkl", "pickle", "pth", "pt"})
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
AUDIO_EXTENSIONS = ("flac", "wav")
FRAME_MEMBER = re.compile(r"(\d+)\.(png|jpg|jpeg|webp)")  # a video sample's frames: 0000.png ...


class DataError(ValueError):
    """Bad data in strict mode, or a stream that cannot go on; the message names the shard."""


# -- options ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReaderOptions:
    """How shards are read; none of these changes the sample order."""

    shuffle_buffer: int = 256
    """Samples held by each partition's shuffle buffer (0 or 1: partition order)."""
    strict: bool = False
    """Raise on the first bad shard or sample instead of skipping it."""
    verify: bool = True
    """Check each shard's sha256 against the manifest before using it."""
    max_member_bytes: int = 64 * 2**20
    """A member larger than this is refused (the sample becomes a hole)."""
    readahead: int = 2
    """Shards per partition fetched ahead of the one being read."""
    retries: int = 5
    """Attempts per shard fetch after the first, with exponential backoff."""
    backoff_s: float = 0.2
    """First retry delay; doubles per attempt, capped at 10 s."""
    cache_dir: str = ""
    """Folder for fetched shards, shared by the machine's processes (empty: a folder in the
    system temp folder)."""
    cache_bytes: int = 16 * 2**30
    """The shared folder is kept under this size (least recently used shards go first)."""


# -- the order -------------------------------------------------------------------------------


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


# -- shards: fetch, verify, index ------------------------------------------------------------


class Hole(NamedTuple):
    """A sample that could not be used: where it was and why."""

    shard: str
    key: str
    reason: str


def _split_name(name: str) -> tuple[str, str]:
    """'dir/000001-00000002.input_ids.npy' -> ('dir/000001-00000002', 'input_ids.npy'), as webdataset."""
    head, _, base = name.rpartition("/")
    key, _, ext = base.partition(".")
    return (f"{head}/{key}" if head else key), ext


class TarFormatError(ValueError):
    """A tar header that is not one."""


_ZERO_BLOCK = bytes(512)


def tar_members(f: Any) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of each regular member of an open tar file, in order.

    Written here because `tarfile` builds a TarInfo per member (about 40 us each, the largest
    cost of opening a text shard): this reads only the fields an index needs, straight from the
    mapped file, and understands ustar prefixes, GNU long names and pax `path`/`size` records.
    A member whose data runs past the end of the file is still yielded (the caller decides);
    a header with a bad checksum raises TarFormatError.
    """
    if os.fstat(f.fileno()).st_size == 0:
        raise TarFormatError("empty file")
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            yield from _parse_tar(buf)
        except (ValueError, IndexError) as e:  # a number or record that is not one
            raise TarFormatError(f"malformed header: {e}") from None


def _parse_tar(buf: Any) -> Iterator[tuple[str, int, int]]:
    pos, end = 0, len(buf)
    long_name: bytes | None = None
    pax: dict[bytes, bytes] = {}
    while pos + 512 <= end:
        hdr = buf[pos : pos + 512]
        if hdr == _ZERO_BLOCK:
            return  # end-of-archive marker
        stored = hdr[148:156].split(b"\0", 1)[0].strip()
        if not stored or int(stored, 8) != sum(hdr) - sum(hdr[148:156]) + 8 * 32:
            raise TarFormatError(f"bad header checksum at byte {pos}")
        raw = hdr[124:136]
        size = (
            int.from_bytes(raw[1:], "big")
            if raw[0] & 0x80
            else int(raw.split(b"\0", 1)[0].strip() or b"0", 8)
        )
        kind = hdr[156:157]
        data = pos + 512
        if kind == b"L":  # GNU long name of the next member
            long_name = buf[data : data + size].split(b"\0", 1)[0]
        elif kind in (b"x", b"X"):  # pax extended header of the next member
            pax = _pax_records(buf[data : data + size])
        elif kind != b"g":
            name = hdr[0:100].split(b"\0", 1)[0]
            if hdr[257:262] == b"ustar" and hdr[345] != 0:
                name = hdr[345:500].split(b"\0", 1)[0] + b"/" + name
            name = pax.get(b"path", long_name or name)
            if b"size" in pax:
                size = int(pax[b"size"])
            if kind in (b"0", b"\0", b"7"):
                yield name.decode("utf-8", "surrogateescape"), data, size
            long_name, pax = None, {}
        pos = data + (size + 511) // 512 * 512


def _pax_records(block: bytes) -> dict[bytes, bytes]:
    """'LEN key=value\\n' records."""
    out: dict[bytes, bytes] = {}
    i = 0
    while i < len(block) and block[i : i + 1] != b"\0":
        space = block.index(b" ", i)
        length = int(block[i:space])
        key, _, value = block[space + 1 : i + length - 1].partition(b"=")
        out[key] = value
        i += length
    return out


@dataclass
class LocalShard:
    """A fetched (or local) shard file indexed by sample: key and (ext, offset, size) members."""

    name: str
    path: str | None
    expected: int
    bad: str | None = None  # the whole shard is unusable: why
    keys: list[str] = field(default_factory=list)
    members: list[list[tuple[str, int, int]]] = field(default_factory=list)
    sample_bad: dict[int, str] = field(default_factory=dict)
    _file: Any = None

    def index(self, max_member_bytes: int) -> None:
        """Read the tar headers; samples beyond a truncation or corruption become holes."""
        assert self.path is not None
        # Opened now and kept: a shared cache may delete the file, an open one stays readable.
        self._file = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        size = os.fstat(self._file.fileno()).st_size
        key = None
        try:
            for name, offset, length in tar_members(self._file):
                k, ext = _split_name(name)
                if k != key:
                    key = k
                    self.keys.append(k)
                    self.members.append([])
                n = len(self.keys) - 1
                if offset + length > size:
                    self.sample_bad.setdefault(n, "truncated tar")
                elif length > max_member_bytes:
                    self.sample_bad.setdefault(
                        n, f"member {ext} of {length} bytes over the {max_member_bytes} cap"
                    )
                elif ext.rsplit(".", 1)[-1] not in PICKLE_EXTENSIONS:
                    self.members[n].append((ext, offset, length))
        except TarFormatError as e:
            if not self.keys:
                self.bad = f"not a tar file: {e}"
                return
            self.sample_bad.setdefault(len(self.keys) - 1, f"corrupt tar: {e}")
        if len(self.keys) > self.expected:
            self.bad = f"holds {len(self.keys)} samples, the manifest says {self.expected}"

    def reason(self, j: int) -> str | None:
        """Why sample j is unusable, or None."""
        if self.bad:
            return self.bad
        if j >= len(self.keys):
            return f"truncated tar: {len(self.keys)} of {self.expected} samples present"
        return self.sample_bad.get(j)

    def key(self, j: int) -> str:
        return self.keys[j] if j < len(self.keys) else f"#{j}"

    def read(self, j: int) -> dict[str, Any] | Hole:
        """Raw sample j: {__key__, ext: bytes, ...}, or the Hole it is."""
        why = self.reason(j)
        if why:
            return Hole(self.name, self.key(j), why)
        if self._file is None:
            assert self.path is not None  # a shard without a file is `bad`
            self._file = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        raw: dict[str, Any] = {"__key__": self.keys[j], "__shard__": self.name}
        for ext, offset, size in self.members[j]:
            self._file.seek(offset)
            raw[ext] = self._file.read(size)
        return raw

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


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


def _reason_kind(reason: str) -> str:
    """A short counter name for a hole's reason ('sha256 mismatch: ...' -> 'sha256_mismatch')."""
    head = reason.split(":", 1)[0]
    for kind in ("member", "holds"):
        if head.startswith(kind):
            return {"member": "oversized_member", "holds": "count_mismatch"}[kind]
    return head.replace(" ", "_").replace("-", "_")


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
        self.local = "://" not in url or url.startswith("file://")
        self._pool: ThreadPoolExecutor | None = None
        self._futures: dict[int, Future[LocalShard]] = {}
        self._refs: Counter[int] = Counter()
        # Released shards stay a little while: a neighbouring partition or a resumed stream's
        # input often wants the shard its shuffle buffer was just read back from.
        self._idle: deque[int] = deque()
        # Local shards cost only their index to keep: later epochs skip re-verifying them.
        # Remote ones are on disk anyway; the index and an open file are what is kept.
        self._keep_idle = 256 if self.local else max(64, opts.readahead)
        self._shipped = IOStats()
        self._lock = threading.Lock()

    def _folder(self) -> str:
        default = os.path.join(tempfile.gettempdir(), f"darkmatter-shards-{os.getuid()}")
        root = self.opts.cache_dir or default  # per user: another user's files are not ours
        os.makedirs(root, exist_ok=True)
        return root

    def count_samples(self, good: int, holes: list[Hole]) -> None:
        with self._lock:
            self.stats.samples += good
            for h in holes:
                self.stats.skipped[_reason_kind(h.reason)] += 1

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

    def _future(self, shard: int) -> Future[LocalShard]:
        with self._lock:
            fut = self._futures.get(shard)
            if fut is None:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(
                        max(4, self.opts.readahead), thread_name_prefix="darkmatter-fetch"
                    )
                fut = self._futures[shard] = self._pool.submit(self._load, shard)
            return fut

    def prefetch(self, shard: int) -> None:
        self._future(shard)

    def acquire(self, shard: int) -> LocalShard:
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
            fut = self._futures.pop(self._idle.popleft(), None)
        if fut is not None:
            self._discard(fut.result())

    def _discard(self, local: LocalShard) -> None:
        local.close()  # the file stays in the shared cache until evicted

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        for fut in self._futures.values():
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._discard(fut.result())
        self._futures.clear()

    # -- fetching --------------------------------------------------------------------------
    def _load(self, shard: int) -> LocalShard:
        info = self.manifest.shards[shard]
        url = storage.join(self.url, info.name)
        t0 = time.perf_counter()
        local = LocalShard(info.name, None, info.samples)
        try:
            local.path, local.bad = (
                self._local(url, info) if self.local else self._cached(url, info)
            )
        except FileNotFoundError:
            local.bad = "missing shard"
        finally:
            self._count(fetch_s=time.perf_counter() - t0)
        if local.bad is None:
            try:
                local.index(self.opts.max_member_bytes)
            except FileNotFoundError:  # evicted by another process between check and open
                return self._load(shard)
        return local

    def _check(self, size: int, digest: str | None, info: Any) -> str | None:
        """Why a fetched shard does not match its manifest entry, or None."""
        if size == 0:
            return "zero-byte shard"
        if size != info.bytes:
            return f"size mismatch: {size} bytes, the manifest says {info.bytes}"
        if digest is not None and digest != info.sha256:
            return f"sha256 mismatch: {digest[:12]}…, the manifest says {info.sha256[:12]}…"
        return None

    def _local(self, url: str, info: Any) -> tuple[str, str | None]:
        path = url.removeprefix("file://")
        size = os.path.getsize(path)
        digest = None
        if self.opts.verify:
            sha = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    sha.update(chunk)
            digest = sha.hexdigest()
        self._count(bytes_read=size)
        return path, self._check(size, digest, info)

    def _cached(self, url: str, info: Any) -> tuple[str | None, str | None]:
        """(path in the shared cache, None), or (None, why the shard is bad)."""
        root = self._folder()
        path = os.path.join(root, f"{info.sha256}{'' if self.opts.verify else '.unverified'}.tar")
        if _fresh(path, info.bytes):
            return path, None
        with open(path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one fetch per machine; the others wait for it
            try:
                if _fresh(path, info.bytes):
                    return path, None
                tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
                try:
                    size, digest = self._download(url, tmp, info.bytes)
                    bad = self._check(size, digest if self.opts.verify else None, info)
                    if bad:
                        return None, bad
                    os.replace(tmp, path)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(tmp)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        _evict(root, self.opts.cache_bytes, keep=path)
        return path, None

    def _download(self, url: str, tmp: str, expected: int) -> tuple[int, str]:
        """Copy the object to `tmp` with retries that resume where the body broke off."""
        sha = hashlib.sha256()
        done, attempt = 0, 0
        with open(tmp, "wb") as out:
            while True:
                try:
                    done = self._copy(url, out, sha, done, expected)
                    return done, sha.hexdigest()
                except FileNotFoundError:
                    raise
                except Exception as e:  # 5xx, SlowDown, resets, truncated bodies: all transient
                    attempt += 1
                    if attempt > self.opts.retries:
                        raise DataError(
                            f"{url}: giving up after {attempt} attempts: {type(e).__name__}: {e}"
                        ) from None
                    self._count(retries=1)
                    time.sleep(min(10.0, self.opts.backoff_s * 2 ** (attempt - 1)))

    def _copy(self, url: str, out: Any, sha: Any, done: int, expected: int) -> int:
        """Append the object's bytes from offset `done` on to `out`; returns the new offset."""
        # cache_type none: each read is one ranged GET, and a retry restarts at `done`.
        with storage.open_url(url, "rb", cache_type="none") as f:
            if done:
                f.seek(done)
            while chunk := f.read(_CHUNK):
                out.write(chunk)
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
    """Delete the least recently used shards until the folder holds at most `cap` bytes, and
    temporary files of processes that are gone."""
    shards = []
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
    total = sum(size for _, size, _ in shards)
    for _, size, path in sorted(shards):
        if total <= cap:
            break
        if path != keep:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            total -= size


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- partitions ------------------------------------------------------------------------------


def needed_shards(plan: EpochPlan, p: int, state: dict[str, Any] | None) -> list[int]:
    """The shards partition p reads first: its buffer's (from a state) and its next input's."""
    start = int(state["next_in"]) if state else 0
    shards = [plan.locate(p, int(i))[0] for i in state["buf"]] if state else []
    if start < plan.part_len:
        shards.append(plan.locate(p, start)[0])
    return list(dict.fromkeys(shards))


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
        self._held: dict[int, LocalShard] = {}  # shards this partition is reading
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
        got: dict[int, dict[str, Any] | Hole] = {}
        for shard, items in by_shard.items():
            local = self.cache.acquire(shard)
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
                local = self._held[seg.shard] = self.cache.acquire(seg.shard)
                for ahead in self._segments[self._seg + 1 : self._seg + 1 + self.opts.readahead]:
                    self.cache.prefetch(ahead.shard)
            if self._j < seg.stop:
                i, j = self.next_in, self._j
                self.next_in, self._j = i + 1, j + 1
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


# -- decoding --------------------------------------------------------------------------------


def decode(raw: dict[str, Any], modality: str) -> Sample:
    """Raw tar members -> model inputs. Text: input_ids int32[n]; image: image uint8[H, W, 3];
    audio: audio float32[n] (channels averaged) and sample_rate; video: frames uint8[T, H, W, 3]
    (and fps when its json has it). Raises ValueError if it can't."""
    key = raw["__key__"]
    out: Sample = {"__key__": key}
    if modality == "text":
        if "input_ids.npy" not in raw:
            raise ValueError("no input_ids.npy member")
        ids = np.load(io.BytesIO(raw["input_ids.npy"]), allow_pickle=False)
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise ValueError(f"input_ids.npy holds {ids.dtype}{list(ids.shape)}, not int[n]")
        out["input_ids"] = ids.astype(np.int32, copy=False)
    elif modality == "image":
        ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
        if ext is None:
            raise ValueError(f"no image member ({'/'.join(IMAGE_EXTENSIONS)})")
        from PIL import Image, ImageOps

        with Image.open(io.BytesIO(raw[ext])) as im:
            # Original camera bytes: honour the EXIF orientation so the pixels are upright.
            out["image"] = np.array(ImageOps.exif_transpose(im).convert("RGB"), dtype=np.uint8)
    elif modality == "audio":
        ext = next((e for e in AUDIO_EXTENSIONS if e in raw), None)
        if ext is None:
            raise ValueError(f"no audio member ({'/'.join(AUDIO_EXTENSIONS)})")
        import soundfile

        wave, rate = soundfile.read(io.BytesIO(raw[ext]), dtype="float32", always_2d=True)
        out["audio"], out["sample_rate"] = wave.mean(axis=1), int(rate)
    elif modality == "video":
        out.update(_decode_frames(raw))
    else:
        raise ValueError(f"unknown modality {modality!r}")
    return out


def _decode_frames(raw: dict[str, Any]) -> Sample:
    """A frame-sequence sample (prepare's video layout) -> frames uint8[T, H, W, 3] in frame
    order; its json's frame count, when given, must match what is there."""
    from PIL import Image

    numbered = sorted((int(m.group(1)), ext) for ext in raw
                      if (m := FRAME_MEMBER.fullmatch(ext)))  # fmt: skip
    if not numbered:
        raise ValueError("no frame members (0000.png, 0001.png ... or .jpg)")
    info = json.loads(raw["json"]) if "json" in raw else {}
    if not isinstance(info, dict):
        raise ValueError("json member is not an object")
    if "frames" in info and info["frames"] != len(numbered):
        raise ValueError(f"json says {info['frames']} frames, {len(numbered)} are present")
    frames = []
    for _, ext in numbered:
        with Image.open(io.BytesIO(raw[ext])) as im:
            frames.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
    if len({f.shape for f in frames}) > 1:
        raise ValueError(f"frames of different sizes {sorted({f.shape for f in frames})[:2]}")
    out: Sample = {"frames": np.stack(frames)}
    if isinstance(info.get("fps"), (int, float)):
        out["fps"] = float(info["fps"])
    return out


# -- slots and pieces ------------------------------------------------------------------------


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
        # Ask for every shard the partitions start with (and their buffers, on a resume) before
        # any partition blocks on one: the fetch threads then work in parallel.
        for p in owned:
            for shard in needed_shards(self.plan, p, states.get(p)):
                self.cache.prefetch(shard)
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
                sample = decode(raw, modality)
            except Exception as e:  # PIL, numpy and soundfile raise many types on bad bytes
                holes.append(Hole(raw["__shard__"], raw["__key__"], f"undecodable: {e}"))
                items.append((g, None))
                continue
            finally:
                self.cache._count(decode_s=time.perf_counter() - t0)
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


def slot_pieces(
    spec: StreamSpec, slot: int, epoch: int, start_step: int, states: dict[int, Any]
) -> Iterator[Piece]:
    """One slot's pieces from (epoch, start_step) on, epoch after epoch: a worker lives on, so
    an epoch boundary costs no process start and local shards stay verified."""
    cache = ShardCache(spec.url, spec.manifest, spec.opts, IOStats())
    try:
        while True:
            s = Slot(spec, epoch, slot, states, cache)
            try:
                for step in range(start_step, s.plan.steps):
                    yield s.piece(step)
            finally:
                s.close()
            epoch, start_step, states = epoch + 1, 0, {}
    finally:
        cache.close()


@dataclass(frozen=True)
class _WorkerFailure:
    message: str


def _worker_main(
    spec: StreamSpec, slot: int, epoch: int, step: int, states: Any, out: Any, stop: Any
) -> None:
    """A worker process: one slot's pieces into a bounded queue until told to stop."""
    _die_with_parent()
    # A scheduler may signal every process of the job (SLURM does, for --signal and scancel):
    # preemption is the rank's business. The worker ends when told to, or with its rank.
    import signal

    for name in ("SIGTERM", "SIGUSR1", "SIGUSR2"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    last: Any = None
    try:
        for piece in slot_pieces(spec, slot, epoch, step, states):
            if not _put(out, piece, stop):
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


class _Workers:
    """A rank's slots in worker processes, read round-robin: one piece per worker per step.

    Not a torch DataLoader: its per-item round trip (an index sent to the worker, a result
    back, both through feeder threads) measured 1-6 ms per step here, several percent of a short
    step. Workers here run ahead on their own into a bounded queue, so a ready piece costs the
    rank one unpickle. Forked like DataLoader workers: fsspec resets its event loop and
    filesystem cache in a forked child, and no worker inherits an open shard.
    """

    def __init__(
        self, spec: StreamSpec, rank: int, slots: int, epoch: int, step: int, states: Any,
        depth: int = 2,
    ):  # fmt: skip
        ctx = mp.get_context("fork")
        self.stop = ctx.Event()
        self.queues = [ctx.Queue(maxsize=depth) for _ in range(slots)]
        self.procs = [
            ctx.Process(
                target=_worker_main,
                name=f"darkmatter-data-{rank}-{w}",
                daemon=True,
                args=(spec, rank * slots + w, epoch, step, states, self.queues[w], self.stop),
            )  # fmt: skip
            for w in range(slots)
        ]
        for proc in self.procs:
            proc.start()
        self._next = 0
        # A thread of the rank receives and unpickles whole steps while the training thread
        # is inside torch (which releases the GIL): a ready step then costs a deque pop.
        self._steps: queue.Queue[list[Piece] | BaseException] = queue.Queue(maxsize=depth)
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
            self._steps.put(e)

    def next_step(self) -> list[Piece]:
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

    def __iter__(self) -> Iterator[Piece]:
        return self

    def __next__(self) -> Piece:
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
        return item  # type: ignore[no-any-return]

    def close(self) -> None:
        self.stop.set()
        if self._receiver is not None:
            self._receiver.join()
        for proc in self.procs:
            proc.join(timeout=2.0)
            if proc.is_alive():
                proc.kill()  # it ignores SIGTERM (see _worker_main) and holds nothing to save
                proc.join()
        for q in self.queues:
            q.close()
            q.cancel_join_thread()


# -- the rank's view -------------------------------------------------------------------------


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
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if min(micro_batch_size, grad_accum, partitions) < 1 or num_workers < 0 or seed < 0:
            raise ValueError(
                "need micro_batch_size, grad_accum, partitions >= 1, num_workers, seed >= 0"
            )
        self.url, self.rank, self.world_size = url, rank, world_size
        self.micro_batch_size, self.grad_accum = micro_batch_size, grad_accum
        self.num_workers, self.slots = num_workers, max(1, num_workers)
        self.opts = options or ReaderOptions()
        self.manifest = Manifest.load(url)
        global_batch = micro_batch_size * grad_accum * world_size
        n_slots = world_size * self.slots
        if partitions % n_slots or global_batch % n_slots:
            raise ValueError(
                f"data.partitions ({partitions}) and the global batch ({global_batch}) must both "
                f"be multiples of world_size x max(1, num_workers) = {n_slots}"
            )
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
        self.epoch, self.step = 0, 0  # the next step to hand out
        self._states: dict[int, dict[str, Any]] = {}  # partition -> state after self.step - 1
        self._loader: Iterator[Piece] | _Workers | None = None
        self.stats = IOStats()
        self.wait_s = 0.0  # time next_step() waited for pieces
        self.quarantine: list[Hole] = []
        self._quarantined: set[Hole] = set()

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
        return {
            **self._identity(),
            "epoch": self.epoch,
            "step": self.step,
            "parts": {str(p): s for p, s in self._states.items()},
        }

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        """Continue from the states every rank of a checkpoint saved (any world size)."""
        if not states:
            raise ValueError("no data stream state to resume from")
        mine = self._identity()
        for name, value in mine.items():
            theirs = {s.get(name) for s in states}
            if theirs != {value}:
                was = ", ".join(repr(v) for v in sorted(theirs, key=repr))
                what = "dataset (manifest digest)" if name == "dataset_digest" else name
                raise ValueError(
                    f"cannot resume the data stream: {what} was {was}, is {value!r} now"
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
        self.epoch, self.step = epoch, step
        self._states = {p: st for p, st in parts.items() if self._owns(p)} if step > 0 else {}
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step, self._states = self.epoch + 1, 0, {}

    # -- iteration -----------------------------------------------------------------------
    def _owns(self, partition: int) -> bool:
        return partition % self.spec.n_slots // self.slots == self.rank

    def _open_loader(self) -> Iterator[Piece] | _Workers:
        if self.num_workers == 0:  # the single slot runs in this process, synchronously
            return slot_pieces(self.spec, self.rank, self.epoch, self.step, self._states)
        return _Workers(self.spec, self.rank, self.slots, self.epoch, self.step, self._states)

    def _close_loader(self) -> None:
        it, self._loader = self._loader, None
        if it is not None:
            it.close()  # type: ignore[attr-defined]  # a generator or _Workers: both close

    def next_step(self) -> list[list[Sample]]:
        """The rank's grad_accum micro-batches of the next step (holes dropped)."""
        if self.step >= self.steps_per_epoch:  # the slots go on into the next epoch themselves
            self.epoch, self.step, self._states = self.epoch + 1, 0, {}
        if self._loader is None:
            self._loader = self._open_loader()
        t0 = time.perf_counter()
        if isinstance(self._loader, _Workers):
            pieces = self._loader.next_step()
        else:
            pieces = [next(self._loader)]
        self.wait_s += time.perf_counter() - t0
        items: list[tuple[int, Sample | None]] = []
        for piece in pieces:
            if (piece.epoch, piece.step) != (self.epoch, self.step):
                raise DataError(
                    f"rank {self.rank}: got step {piece.step} of epoch {piece.epoch} from slot "
                    f"{piece.slot}, expected step {self.step} of epoch {self.epoch}"
                )
            items += piece.items
            self._states.update(piece.states)
            self.stats.add(piece.stats)
            for h in piece.holes:
                if h not in self._quarantined:
                    self._quarantined.add(h)
                    self.quarantine.append(h)
        items.sort(key=lambda it: it[0])
        m = self.micro_batch_size
        micro = [[s for _, s in items[k * m : (k + 1) * m] if s is not None] for k in
                 range(self.grad_accum)]  # fmt: skip
        for k, batch in enumerate(micro):
            if not batch:
                raise DataError(
                    f"rank {self.rank}, step {self.step} of epoch {self.epoch}: every sample of "
                    f"micro-batch {k} was bad data ({self.quarantine[-1].reason})"
                )
        self.step += 1
        return micro

    def close(self) -> None:
        self._close_loader()

    def summary(self) -> dict[str, float]:
        """Cumulative counters for the trainer to log."""
        s = self.stats
        out: dict[str, float] = {
            "samples": s.samples, "bytes_read": s.bytes_read, "retries": s.retries,
            "fetch_s": s.fetch_s, "shard_wait_s": s.wait_s, "decode_s": s.decode_s,
            "wait_s": self.wait_s, "skipped": sum(s.skipped.values()),
        }  # fmt: skip
        out.update({f"skipped/{k}": v for k, v in s.skipped.items()})
        return out


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
                    sample = decode(raw, manifest.modality)
                except ValueError as e:
                    if opts.strict:
                        raise DataError(f"shard {info.name}, sample {local.key(j)}: {e}") from None
                    continue
                yield sample
            cache.release(shard)
    finally:
        cache.close()
