"""A rank's quarantine: the bad samples (holes) it met, in bounded memory.

Every distinct hole is counted by reason and queued once for the trainer, which takes the new
entries each log interval and appends them to its log (RUN_DIR/quarantine.jsonl, and one part
object per interval in MLflow): what is uploaded grows with the new entries, never with the
whole list. Memory holds at most `max_entries` of each of: the newest entries, the entries
not yet taken, and the set that tells a hole already seen (so a sample bad in every epoch is
logged once). Past the cap a hole seen before may be logged again, and entries queued faster
than the trainer takes them are counted as unlogged instead of kept.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterator

from darkmatter.data_pipeline.reader.shards import Hole, reason_kind


class Quarantine:
    """Distinct holes: counts by reason kind, the newest `max_entries`, the ones not yet taken."""

    def __init__(self, max_entries: int = 10_000):
        if max_entries < 1:
            raise ValueError(f"quarantine_entries: expected >= 1, got {max_entries}")
        self.max_entries = max_entries
        self.counts: Counter[str] = Counter()  # distinct holes by reason kind, all of them
        self.total = 0
        self.unlogged = 0  # queued beyond the cap before the trainer took them (not logged)
        self._recent: deque[Hole] = deque(maxlen=max_entries)
        self._new: list[Hole] = []
        self._seen: set[Hole] = set()

    def add(self, hole: Hole) -> None:
        """Record `hole` unless it was seen before (within the cap)."""
        if hole in self._seen:
            return
        if len(self._seen) < self.max_entries:
            self._seen.add(hole)
        self.total += 1
        self.counts[reason_kind(hole.reason)] += 1
        self._recent.append(hole)
        if len(self._new) < self.max_entries:
            self._new.append(hole)
        else:
            self.unlogged += 1

    def take_new(self) -> tuple[list[Hole], int]:
        """The entries added since the last call, and how many more were not kept for it."""
        new, self._new = self._new, []
        unlogged, self.unlogged = self.unlogged, 0
        return new, unlogged

    @property
    def last(self) -> Hole | None:
        return self._recent[-1] if self._recent else None

    def __len__(self) -> int:
        """Distinct holes recorded, all of them (not only those still in memory)."""
        return self.total

    def __iter__(self) -> Iterator[Hole]:
        """The newest entries still in memory, oldest first."""
        return iter(self._recent)
