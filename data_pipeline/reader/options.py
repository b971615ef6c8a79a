"""How the reader reads shards (ReaderOptions), and the error it raises on data it cannot use
(DataError). Nothing here changes the sample order."""

from __future__ import annotations

from dataclasses import dataclass


class DataError(ValueError):
    """Bad data in strict mode, or a stream that cannot go on; the message names the shard."""


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
