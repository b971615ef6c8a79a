"""How the reader reads shards (ReaderOptions), and the error it raises on data it cannot use
(DataError). Nothing here changes the sample order."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from darkmatter.storage import Retry


class DataError(ValueError):
    """Bad data in strict mode, or a stream that cannot go on; the message names the shard."""


def default_cache_dir() -> str:
    """The shard cache when none is configured: $XDG_CACHE_HOME/darkmatter/shards, or
    ~/.cache/darkmatter/shards (per user, kept across runs: shards are named by their sha256)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "darkmatter", "shards")


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
    retry: Retry = field(default_factory=Retry)
    """The retry budget of each shard fetch (config `storage.retry`); 403s, refused
    credentials and a missing bucket fail at once."""
    cache_dir: str = ""
    """Folder for fetched shards, shared by the machine's processes (empty: default_cache_dir())."""
    cache_bytes: int = 16 * 2**30
    """The shared folder is kept under this size (least recently used shards go first)."""
    quarantine_entries: int = 10_000
    """Bad-sample entries a rank keeps in memory (the newest); counts by reason cover them all,
    and every entry reaches the trainer's quarantine log."""
