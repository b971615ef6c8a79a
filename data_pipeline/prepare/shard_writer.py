"""The tar shard writer: samples become `key.ext` members with fixed headers (mtime 0, fixed
owner), so the bytes of a shard depend on its samples only; each shard is hashed as it streams
out, and a new one starts at `shard_bytes` of tar or `max_samples` samples. Each shard's sample
offsets and CRC-32s go beside it (offsets.py), for the reader's ranged reads.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import tarfile
from typing import Any

import numpy as np

from darkmatter import storage
from darkmatter.data_pipeline import offsets
from darkmatter.data_pipeline.manifest import ShardInfo

TAR_BLOCK = 512


class _HashingWriter:
    """A write-only file object that counts and hashes what it forwards."""

    def __init__(self, f: Any):
        self.f, self.bytes, self.sha = f, 0, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.bytes += len(data)
        self.f.write(data)
        return len(data)

    def flush(self) -> None:
        self.f.flush()


def _member_bytes(sample: dict[str, Any]) -> int:
    """Tar bytes a sample adds: a header block plus the data padded to whole blocks."""
    sizes = [len(v) for k, v in sample.items() if not k.startswith("_")]
    return sum(TAR_BLOCK + -(-n // TAR_BLOCK) * TAR_BLOCK for n in sizes)


def _add_sample(tar: tarfile.TarFile, sample: dict[str, Any]) -> int:
    """Members `key.ext` in sorted order, with the fixed headers webdataset's TarWriter writes
    with mtime=0: the tar bytes depend on the sample only. Returns the CRC-32 of the data."""
    key = sample["__key__"]
    datas = []
    for ext in sorted(k for k in sample if not k.startswith("_")):
        data = sample[ext]
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        info.uname = info.gname = "bigdata"
        tar.addfile(info, io.BytesIO(data))
        datas.append(data)
    return offsets.crc32(datas)


class ShardWriter:
    """Writes samples into `{prefix}KKKKKK.tar` files under a URL, rolling over at
    `shard_bytes` of tar or `max_samples` samples, and each shard's offsets under the URL's
    offsets/ folder."""

    def __init__(
        self,
        url: str,
        shard_bytes: int,
        prefix: str = "shard-",
        max_samples: int | None = None,
    ):
        self.url, self.shard_bytes, self.prefix = url, shard_bytes, prefix
        self.max_samples = max_samples
        self.shards: list[ShardInfo] = []
        self.bytes_written = 0  # closed shards plus the open one's bytes so far
        self._file: Any = None
        self._hasher: _HashingWriter | None = None
        self._tar: tarfile.TarFile | None = None
        self._samples = self._size = 0
        self._starts: list[int] = []
        self._crcs: list[int] = []

    def _name(self) -> str:
        return f"{self.prefix}{len(self.shards):06d}.tar"

    def _open(self) -> None:
        self._file = storage.open_url(storage.join(self.url, self._name()), "wb")
        self._hasher = _HashingWriter(self._file)
        # Stream mode only ever writes; the tar outlives this call and is closed by close().
        fileobj: Any = self._hasher
        fmt = tarfile.USTAR_FORMAT  # as webdataset's TarWriter
        self._tar = tarfile.open(fileobj=fileobj, mode="w|", format=fmt)  # noqa: SIM115
        self._samples = self._size = 0
        self._starts, self._crcs = [], []

    def write(self, sample: dict[str, Any]) -> None:
        if self._tar is None:
            self._open()
        assert self._tar is not None and self._hasher is not None
        before = self._hasher.bytes
        self._starts.append(self._tar.offset)
        self._crcs.append(_add_sample(self._tar, sample))
        self.bytes_written += self._hasher.bytes - before
        self._samples += 1
        self._size += _member_bytes(sample)
        if self._size >= self.shard_bytes or self._samples == self.max_samples:
            self.close()

    def close(self) -> None:
        if self._tar is None:
            return
        assert self._hasher is not None
        before = self._hasher.bytes
        self._starts.append(self._tar.offset)
        self._tar.close()  # end-of-archive blocks; a caller's file object stays open
        self._file.close()  # the upload happens here for object stores
        self.bytes_written += self._hasher.bytes - before
        info = ShardInfo(
            self._name(), self._samples, self._hasher.bytes, self._hasher.sha.hexdigest()
        )
        if storage.is_remote(self.url):  # the ETag that proves the object to a ranged read
            fs, path = storage.filesystem(storage.join(self.url, info.name))
            etag = offsets.etag_of(fs.info(path))
            starts, crcs = np.asarray(self._starts, np.uint64), np.asarray(self._crcs, np.uint32)
            offsets.write(self.url, offsets.SampleOffsets(info.identity, etag, starts, crcs))
        self.shards.append(info)
        self._tar = self._hasher = self._file = None
        self._samples = self._size = 0

    def abort(self) -> None:
        """Close an unfinished shard without listing it: its unit has no record and is redone.
        (Left open, the tar stream would try to finish itself at garbage collection.)"""
        for obj in (self._tar, self._file):
            with contextlib.suppress(Exception):
                if obj is not None:
                    obj.close()
        self._tar = self._hasher = self._file = None
