"""Exact deduplication: workers hash every item of their unit (sha256 of a document's UTF-8 or
of a file's bytes, before any decode check); the parent walks the units in input order, keeps the
first occurrence of each hash and returns, per unit, the item numbers to drop.
"""

from __future__ import annotations

import hashlib

from darkmatter.data_pipeline.prepare.runner import Runner, progress_bar
from darkmatter.data_pipeline.prepare.sources import Options, Unit, unit_items


def hash_unit(unit: Unit, opts: Options) -> bytes:
    """The sha256 of every item of a unit, concatenated (32 bytes each, in item order)."""
    out = bytearray()
    for item in unit_items(unit, opts):
        data = item.data.encode() if isinstance(item.data, str) else item.data
        out += hashlib.sha256(data).digest()
    return bytes(out)


def find_duplicates(
    units: list[Unit], opts: Options, runner: Runner, show: bool
) -> tuple[dict[int, frozenset[int]], int]:
    """Item numbers to drop per unit (a hash seen earlier in input order), and the item count.

    Units hash in parallel; their results are consumed strictly in unit order, so the first
    occurrence wins whatever order the workers finish in.
    """
    seen: set[bytes] = set()
    dropped: dict[int, frozenset[int]] = {}
    waiting: dict[int, bytes] = {}
    cursor = items = 0
    with progress_bar(show, "hashing", "unit", len(units)) as bar:
        for u, digests in runner.run(hash_unit, [(unit, opts) for unit in units]):
            bar.update(1)
            waiting[u] = digests
            while cursor in waiting:
                digests = waiting.pop(cursor)
                drop = []
                for i in range(len(digests) // 32):
                    d = digests[32 * i : 32 * i + 32]
                    if d in seen:
                        drop.append(i)
                    else:
                        seen.add(d)
                items += len(digests) // 32
                if drop:
                    dropped[cursor] = frozenset(drop)
                cursor += 1
    return dropped, items
