"""Exact deduplication with bounded memory: sorted hash runs on disk.

Workers hash every item of their unit (sha256 of a document's UTF-8 or of a file's bytes,
before any decode check). The parent appends a 40-byte record (hash, unit, item; big-endian
numbers, so byte order is (hash, unit, item) order) per item to a buffer, sorts it and spills it
to a run file every SPILL_RECORDS records (40 MiB); a k-way merge of the runs (heapq.merge)
brings equal hashes together, and every record after the first of a hash (the first occurrence
in (unit, item) order) is a duplicate. The parent's memory is the buffer plus the numbers of the
dropped items, whatever the number of items.

Runs are plain files of sorted records, so those of several `--part` runs merge the same way:
`--merge` finds the duplicates across parts from all parts' runs (see parts.py).
"""

from __future__ import annotations

import hashlib
import heapq
import os
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

import numpy as np

from darkmatter import storage
from darkmatter.data_pipeline.prepare.runner import Runner, progress_bar
from darkmatter.data_pipeline.prepare.sources import Options, Unit, unit_items

RECORD = 40  # sha256 (32) + unit (4) + item (4)
SPILL_RECORDS = 1 << 20  # records per sorted run: 40 MiB of buffer
_READ_RECORDS = 1 << 12  # records read from a run at a time during the merge (160 KiB)


def hash_unit(unit: Unit, opts: Options) -> bytes:
    """The unit's records (hash, unit, item), in item order."""
    out = bytearray()
    head = unit.index.to_bytes(4, "big")
    for i, item in enumerate(unit_items(unit, opts)):
        data = item.data.encode() if isinstance(item.data, str) else item.data
        out += hashlib.sha256(data).digest() + head + i.to_bytes(4, "big")
    return bytes(out)


class RunWriter:
    """Spills records into sorted run files `{prefix}KKKKKK.bin` under a URL (local or not)."""

    def __init__(self, url: str, prefix: str, spill: int | None = None):
        self.url, self.prefix = url, prefix
        self.spill = spill or SPILL_RECORDS
        self.names: list[str] = []
        self._buf = bytearray()

    def add(self, records: bytes) -> None:
        self._buf += records
        if len(self._buf) >= self.spill * RECORD:
            self.flush()

    def flush(self) -> None:
        if not self._buf:
            return
        # Fixed-width byte strings sort as memcmp does: (hash, unit, item) order.
        ordered = np.sort(np.frombuffer(bytes(self._buf), dtype=f"S{RECORD}"))
        name = f"{self.prefix}{len(self.names):06d}.bin"
        storage.write_bytes(storage.join(self.url, name), ordered.tobytes())
        self.names.append(name)
        self._buf = bytearray()


def _records(f: BinaryIO) -> Iterator[bytes]:
    while chunk := f.read(RECORD * _READ_RECORDS):
        for k in range(0, len(chunk), RECORD):
            yield chunk[k : k + RECORD]


def duplicates(run_urls: Iterable[str]) -> Iterator[tuple[int, int]]:
    """(unit, item) of every record whose hash an earlier record in (unit, item) order has."""
    files: list[Any] = [storage.open_url(u, "rb") for u in run_urls]
    try:
        last = b""
        for rec in heapq.merge(*(_records(f) for f in files)):
            if rec[:32] == last:
                yield int.from_bytes(rec[32:36], "big"), int.from_bytes(rec[36:], "big")
            last = rec[:32]
    finally:
        for f in files:
            f.close()


def dropped_by_unit(pairs: Iterable[tuple[int, int]]) -> dict[int, frozenset[int]]:
    out: dict[int, set[int]] = {}
    for u, i in pairs:
        out.setdefault(u, set()).add(i)
    return {u: frozenset(items) for u, items in out.items()}


def hash_units(
    units: Iterable[Unit], opts: Options, runner: Runner, runs: RunWriter, show: bool, total: int
) -> int:
    """Hash the units in parallel into `runs` (order does not matter: runs are sorted); the
    number of items."""
    items = 0
    with progress_bar(show, "hashing", "unit", total) as bar:
        for _, records in runner.run(hash_unit, ((unit, opts) for unit in units)):
            bar.update(1)
            items += len(records) // RECORD
            runs.add(records)
    runs.flush()
    return items


def find_duplicates(
    units: Iterable[Unit], opts: Options, runner: Runner, show: bool, total: int, tmp: str
) -> tuple[dict[int, frozenset[int]], int]:
    """Item numbers to drop per unit (a hash seen earlier in input order), and the item count;
    the runs are spilled into the local folder `tmp`."""
    runs = RunWriter(tmp, "hashes-")
    items = hash_units(units, opts, runner, runs, show, total)
    dropped = dropped_by_unit(duplicates(os.path.join(tmp, n) for n in runs.names))
    return dropped, items
