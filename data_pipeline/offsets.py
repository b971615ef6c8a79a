"""Sample offsets: where each sample of a tar shard starts, so the reader can fetch a few samples
of a remote shard with ranged reads instead of the whole shard (reader/ranged.py).

`prepare` and `darkmatter index` (for each shard whose headers it walks) write one small object
per shard beside the manifest, `offsets/<shard identity>.bin`, and set the manifest's `offsets`
key. Sample j's tar bytes (its headers, data and padding) are [starts[j], starts[j + 1]); where
the writer saw every byte (prepare), `crc32[j]` is the CRC-32 of the sample's member data in tar
order, which each sample read by range must match (a transfer check).

The object names the shard identity it describes, and the ETag the object had when it was
written (prepare) or indexed; it ends with the sha256 of what precedes it. The reader reads a
shard by range only after one HEAD finds that ETag and the manifest's size: the object is then
the one whose sha256 (or identity) the manifest holds, so a sample read by range is one the
whole-shard fetch would accept. A torn, foreign or stale file is refused (decode returns None)
and the reader fetches the whole shard instead: a wrong offsets file costs time, never a wrong
sample.

    b"DMOFFS02" · identity (64 ASCII hex) · ETag (64 bytes, ASCII, NUL-padded) · n (uint64)
    · flags (uint64; 1: crc32 present) · starts (uint64 x n + 1) · crc32 (uint32 x n, with
    flag 1) · sha256 of the above (32 bytes)
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from darkmatter import storage

FOLDER = "offsets"
MAGIC = b"DMOFFS02"
_HEAD = struct.Struct("<8s64s64sQQ")
_CRC = 1


@dataclass(frozen=True)
class SampleOffsets:
    """Sample byte ranges of one shard, and each sample's CRC-32 where the writer computed it."""

    identity: str
    etag: str  # the object's when written or indexed ("": unknown, never read by range)
    starts: np.ndarray  # uint64, n + 1
    crc32: np.ndarray | None = None  # uint32, n

    @property
    def samples(self) -> int:
        return len(self.starts) - 1

    def encode(self) -> bytes:
        flags = _CRC if self.crc32 is not None else 0
        etag = self.etag.encode()
        body = _HEAD.pack(MAGIC, self.identity.encode(), etag, self.samples, flags)
        body += np.asarray(self.starts, "<u8").tobytes()
        if self.crc32 is not None:
            body += np.asarray(self.crc32, "<u4").tobytes()
        return body + hashlib.sha256(body).digest()


def decode(data: bytes, identity: str, samples: int) -> SampleOffsets | None:
    """The offsets in `data` if they are whole and describe this shard (identity and sample
    count), else None."""
    if len(data) < _HEAD.size + 32 or hashlib.sha256(data[:-32]).digest() != data[-32:]:
        return None
    magic, ident, etag, n, flags = _HEAD.unpack_from(data)
    if magic != MAGIC or ident != identity.encode() or n != samples:
        return None
    at = _HEAD.size
    starts = np.frombuffer(data, "<u8", n + 1, at)
    at += 8 * (n + 1)
    crc = np.frombuffer(data, "<u4", n, at) if flags & _CRC else None
    if at + (4 * n if crc is not None else 0) + 32 != len(data):
        return None
    if n and (np.any(np.diff(starts.astype(np.int64)) <= 0)):
        return None
    return SampleOffsets(identity, etag.rstrip(b"\0").decode("ascii", "replace"), starts, crc)


def url(dataset_url: str, identity: str) -> str:
    """Where the offsets of the shard with this identity lie, beside the manifest."""
    return storage.join(dataset_url, FOLDER, f"{identity}.bin")


def write(dataset_url: str, offsets: SampleOffsets) -> None:
    if len(offsets.etag.encode()) > 64:
        return  # no store's ETag is this long: nothing to prove the object by, so no offsets
    storage.write_bytes(url(dataset_url, offsets.identity), offsets.encode())


def etag_of(info: dict[str, Any]) -> str:
    """The ETag in an fsspec `info()` result, unquoted ("" if the store gives none)."""
    return str(info.get("ETag") or info.get("etag") or "").strip('"')


def from_members(members: Iterable[tuple[str, int, int]]) -> np.ndarray:
    """Sample starts (n + 1 of them) from a tar's (name, data offset, size) members in order,
    grouped into samples as the reader groups them (consecutive members with one key). A sample
    starts where the one before it ends (its last member's data, padded to 512 bytes), so its
    range holds its own headers, long-name and pax records included."""
    from darkmatter.data_pipeline.reader.shards import _split_name

    starts, key, end = [0], None, 0
    for name, offset, size in members:
        k, _ = _split_name(name)
        if k != key and key is not None:
            starts.append(end)
        key, end = k, offset + (size + 511) // 512 * 512
    if key is not None:
        starts.append(end)
    return np.asarray(starts, np.uint64)


def crc32(parts: Iterable[bytes]) -> int:
    """The CRC-32 of a sample's member data, in tar order."""
    c = 0
    for p in parts:
        c = zlib.crc32(p, c)
    return c
