"""How the reader reads shards (ReaderOptions), the tokenizer that raw text is encoded with on
the fly (TextSpec, text_spec), and the error the reader raises on data it cannot use
(DataError). Nothing here changes the sample order."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from darkmatter.storage import Retry


class DataError(ValueError):
    """Bad data in strict mode, or a stream that cannot go on; the message names the shard."""


def default_cache_dir() -> str:
    """The shard cache when none is configured: $XDG_CACHE_HOME/darkmatter/shards, or
    ~/.cache/darkmatter/shards (per user, kept across runs: shards are named by their sha256)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "darkmatter", "shards")


@dataclass(frozen=True)
class TextSpec:
    """The tokenizer that text read raw (a "txt" member without input_ids.npy) is encoded with,
    in the form every worker can rebuild it from: picklable, a few hundred kB."""

    tokenizer_json: str
    """The tokenizer.json text (tokenizers' own format)."""
    cls_id: int
    """Id of [CLS], which starts every encoded document."""
    sep_id: int
    """Id of [SEP], which ends it."""
    digest: str = field(init=False, compare=False, repr=False)
    """sha256 of tokenizer_json: the key of the per-process Tokenizer cache (decode.py)."""

    def __post_init__(self) -> None:
        sha = hashlib.sha256(self.tokenizer_json.encode()).hexdigest()
        object.__setattr__(self, "digest", sha)


def text_spec(tokenizer_url: str) -> TextSpec:
    """The TextSpec of a tokenizer.json, or of a `save_pretrained` folder (its tokenizer.json),
    local or remote. The tokenizer must have the five special tokens (SPECIAL_NAMES) and wrap
    text in [CLS] ... [SEP], as prepare's own does; DataError naming data.tokenizer if not."""
    from darkmatter import storage
    from darkmatter.data_pipeline.manifest import TOKENIZER, PrepareError
    from darkmatter.data_pipeline.prepare.tokenizer import load_tokenizer

    url = tokenizer_url
    if not url.endswith(".json"):
        url = storage.join(url, TOKENIZER)
    try:
        tok = load_tokenizer(url)
    except PrepareError as e:
        raise DataError(f"data.tokenizer: {e}") from None
    return TextSpec(tok.to_str(), tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]"))


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
    range_reads: bool = True
    """Stream remote tar shards by ranged GETs of the samples each partition reads, where the
    manifest has sample offsets (reader/ranged.py); off: fetch them whole into the cache (later
    epochs then read from disk)."""
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
    text: TextSpec | None = None
    """The tokenizer for text read raw (data.tokenizer); None: such a sample is undecodable."""
    transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    """A per-sample function run on each decoded sample where it was decoded (in the reader's
    worker processes, which fork: any callable works), before it is batched: a resize or crop
    there ships less and runs beside the decode. It must be deterministic in the sample (it
    runs again on a resume's buffer). Its exception stops the stream, naming the sample."""
