"""One shard file, indexed: its tar headers parsed into samples (key and members by offset), and
the *holes* it holds.

Bad data (an empty, truncated or corrupt tar, a sample count that disagrees with the manifest,
an oversized member, two members of a sample with one extension) becomes a Hole at that sample's place in the order, so no other sample
moves. Members are only ever read into memory by offset (never extracted to a path), and a
sample with a pickle member (.pyd, .pkl, .pickle, .pth, .pt) is a hole whose reason names the
member: its bytes are never read, so nothing can unpickle them.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

PICKLE_EXTENSIONS = frozenset({"pyd", "pkl", "pickle", "pth", "pt"})


class Hole(NamedTuple):
    """A sample that could not be used: where it was and why."""

    shard: str
    key: str
    reason: str


class UnitReader(Protocol):
    """What the reader needs of one unit of a dataset (a tar shard: LocalShard; a Parquet row
    group or a jsonl/text byte range: reader/formats.py): samples by index, or their holes."""

    name: str
    bad: str | None

    def read(self, j: int) -> dict[str, Any] | Hole: ...

    def key(self, j: int) -> str: ...

    def close(self) -> None: ...


def reason_kind(reason: str) -> str:
    """A short counter name for a hole's reason ('sha256 mismatch: ...' -> 'sha256_mismatch')."""
    head = reason.split(":", 1)[0]
    for kind in ("member", "holds"):
        if head.startswith(kind):
            return {"member": "oversized_member", "holds": "count_mismatch"}[kind]
    return head.replace(" ", "_").replace("-", "_")


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


@dataclass
class TarCursor:
    """Where a tar walk stands between windows: the next header's offset and the long name or
    pax records that header inherits."""

    pos: int = 0
    long_name: bytes | None = None
    pax: dict[bytes, bytes] = field(default_factory=dict)
    ended: bool = False  # the end-of-archive marker was read


def _parse_tar(buf: Any) -> Iterator[tuple[str, int, int]]:
    yield from parse_window(buf, 0, TarCursor())


def parse_window(buf: Any, base: int, cur: TarCursor) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of each regular member whose header lies wholly in `buf`,
    which holds the file's bytes [base, base + len(buf)), from header `cur.pos` on. Leaves
    `cur.pos` at the first header not wholly in the window (or whose long-name or pax record
    is not): the next window starts there. Offsets are the file's, not the window's."""
    assert cur.pos >= base, (cur.pos, base)
    pos, end = cur.pos, base + len(buf)
    long_name, pax = cur.long_name, cur.pax
    try:
        while pos + 512 <= end:
            at = pos - base
            hdr = buf[at : at + 512]
            if hdr == _ZERO_BLOCK:
                cur.ended = True
                return  # end-of-archive marker
            size = _header_size(hdr, pos)
            kind = hdr[156:157]
            data = pos + 512
            if kind in (b"L", b"x", b"X") and data + size > end:
                break  # the record runs past the window: the next one starts at its header
            if kind == b"L":  # GNU long name of the next member
                long_name = buf[at + 512 : at + 512 + size].split(b"\0", 1)[0]
            elif kind in (b"x", b"X"):  # pax extended header of the next member
                pax = _pax_records(buf[at + 512 : at + 512 + size])
            elif kind != b"g":
                name = hdr[0:100].split(b"\0", 1)[0]
                if hdr[257:262] == b"ustar" and hdr[345] != 0:
                    name = hdr[345:500].split(b"\0", 1)[0] + b"/" + name
                name = pax.get(b"path", long_name or name)
                if b"size" in pax:
                    size = int(pax[b"size"])
                    if size < 0:
                        raise TarFormatError(f"negative pax size at byte {pos}")
                if kind in (b"0", b"\0", b"7"):
                    yield name.decode("utf-8", "surrogateescape"), data, size
                long_name, pax = None, {}
            pos = data + (size + 511) // 512 * 512
    finally:
        cur.pos, cur.long_name, cur.pax = pos, long_name, pax


def _header_size(hdr: Any, pos: int) -> int:
    """The size field of the header at byte `pos`, after checking the header's checksum."""
    stored = hdr[148:156].split(b"\0", 1)[0].strip()
    if not stored or int(stored, 8) != sum(hdr) - sum(hdr[148:156]) + 8 * 32:
        raise TarFormatError(f"bad header checksum at byte {pos}")
    raw = hdr[124:136]
    size = (
        int.from_bytes(raw[1:], "big")
        if raw[0] & 0x80
        else int(raw.split(b"\0", 1)[0].strip() or b"0", 8)
    )
    if size < 0:  # int() takes a sign: the next header would be looked for behind this one
        raise TarFormatError(f"negative size at byte {pos}")
    return size


def _pax_records(block: bytes) -> dict[bytes, bytes]:
    """'LEN key=value\\n' records."""
    out: dict[bytes, bytes] = {}
    i = 0
    while i < len(block) and block[i : i + 1] != b"\0":
        space = block.index(b" ", i)
        length = int(block[i:space])
        if length <= space - i:  # shorter than its own length field: the loop would not advance
            raise TarFormatError(f"pax record of length {length}")
        key, _, value = block[space + 1 : i + length - 1].partition(b"=")
        out[key] = value
        i += length
    return out


def member_refused(
    name: str, ext: str, length: int, max_member_bytes: int, seen: Iterable[str]
) -> str | None:
    """Why a member makes its sample a hole (a pickle, over the size cap, an extension the
    sample already has: which one is the sample?), or None."""
    if ext.rsplit(".", 1)[-1].lower() in PICKLE_EXTENSIONS:
        return f"pickle member: {name} refused (the reader never unpickles)"
    if length > max_member_bytes:
        return f"member {ext} of {length} bytes over the {max_member_bytes} cap"
    if ext in seen:
        return f"duplicate member: {ext} appears twice"
    return None


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
                elif why := member_refused(
                    name, ext, length, max_member_bytes, (e for e, _, _ in self.members[n])
                ):
                    self.sample_bad.setdefault(n, why)
                else:
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
