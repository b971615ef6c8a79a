"""The layout of a prepared dataset: the Manifest (shard list, sample count, content digest,
special token ids), the names of the files beside it, the special tokens the text objectives
need, and PrepareError, the user error of every step of `darkmatter prepare`.

The manifest is written last, so its presence means the shards it lists are complete; `load`
refuses a file whose counts or digest do not match its shard list, and one whose shard names or
sha256s would be paths out of the dataset or the shard cache.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from darkmatter import storage

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
PROGRESS = "_progress"
PLAN = "plan.json"
# The tokens the text objectives need, under the names the manifest's `special_tokens` uses.
SPECIAL_NAMES = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
SPECIAL_TOKENS = list(SPECIAL_NAMES.values())  # in the order a trained tokenizer numbers them
# What a text manifest without `special_tokens` means: it predates the field, when prepare's
# own trained tokenizer numbered SPECIAL_TOKENS from 0.
DEFAULT_SPECIAL_IDS = {name: i for i, name in enumerate(SPECIAL_NAMES)}


class PrepareError(ValueError):
    """A user error in the inputs of `darkmatter prepare`; the message names the path."""


@dataclass(frozen=True)
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class PrepareRun:
    """What one prepare() call did (not part of the manifest file)."""

    units: int
    reused: int
    written: int
    skipped_examples: list[str]


@dataclass
class Manifest:
    """What a prepared dataset holds; `digest` identifies its content (shard hashes in order)."""

    modality: str
    shards: list[ShardInfo]
    tokenizer: str | None = None
    version: int = 1
    num_samples: int = field(init=False)
    digest: str = field(init=False)
    stats: dict[str, int] | None = None
    """Optional counts from prepare: units, skipped (undecodable inputs), duplicates."""
    special_tokens: dict[str, int] | None = None
    """Text: the tokenizer's id of each SPECIAL_NAMES token; DEFAULT_SPECIAL_IDS if not given."""
    run: PrepareRun | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.num_samples = sum(s.samples for s in self.shards)
        self.digest = hashlib.sha256("".join(s.sha256 for s in self.shards).encode()).hexdigest()
        if self.tokenizer and self.special_tokens is None:
            self.special_tokens = dict(DEFAULT_SPECIAL_IDS)

    def to_json(self) -> str:
        d: dict[str, Any] = {
            "version": self.version,
            "modality": self.modality,
            "num_samples": self.num_samples,
            "tokenizer": self.tokenizer,
            "shards": [asdict(s) for s in self.shards],
            "digest": self.digest,
        }
        if self.stats is not None:
            d["stats"] = self.stats
        if self.special_tokens is not None:
            d["special_tokens"] = self.special_tokens
        return json.dumps(d, indent=1) + "\n"

    def save(self, url: str) -> None:
        storage.write_bytes(storage.join(url, MANIFEST), self.to_json().encode())

    @classmethod
    def load(cls, url: str) -> Manifest:
        where = storage.join(url, MANIFEST)
        try:
            d = json.loads(storage.read_bytes(where))
        except FileNotFoundError:
            raise PrepareError(
                f"no manifest.json at {url}: run `darkmatter prepare` first"
            ) from None
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, nesting
            raise PrepareError(f"{where}: not a JSON manifest: {e}") from None
        if not isinstance(d, dict) or d.get("version") != 1:
            raise PrepareError(f"{where}: not a version 1 darkmatter manifest")
        problem = _problem(d)
        if problem:
            raise PrepareError(f"{where}: {problem}")
        try:
            m = cls(d["modality"], [ShardInfo(**s) for s in d["shards"]], d.get("tokenizer"))
        except (KeyError, TypeError) as e:
            raise PrepareError(f"{where}: malformed manifest: {e!r}") from None
        specials = d.get("special_tokens")
        if specials is not None:
            if not (
                isinstance(specials, dict)
                and specials.keys() == SPECIAL_NAMES.keys()
                and all(type(v) is int and v >= 0 for v in specials.values())
            ):
                raise PrepareError(
                    f"{where}: special_tokens must map {sorted(SPECIAL_NAMES)} to ids, "
                    f"got {specials!r}"
                )
            m.special_tokens = specials
        # A manifest edited by hand (or a truncated copy) must not pass silently.
        if (m.num_samples, m.digest) != (d.get("num_samples"), d.get("digest")):
            raise PrepareError(f"{where}: num_samples/digest do not match its shard list")
        if isinstance(d.get("stats"), dict):
            m.stats = d["stats"]
        return m


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _problem(d: dict[str, Any]) -> str | None:
    """The first field of a manifest that a reader cannot use safely, as 'key: why', or None.
    Shard names and sha256s become paths (the shard's, its cache file's), so they must stay
    inside their folders; counts must be counts."""
    if not isinstance(d.get("modality"), str):
        return f"modality: expected a string, got {d.get('modality')!r:.80}"
    tokenizer = d.get("tokenizer")
    if tokenizer is not None and storage.name_problem(tokenizer):
        return f"tokenizer: {storage.name_problem(tokenizer)}"
    if not isinstance(d.get("shards"), list):
        return f"shards: expected a list, got {type(d.get('shards')).__name__}"
    keys = {f.name for f in fields(ShardInfo)}
    for i, s in enumerate(d["shards"]):
        if not isinstance(s, dict) or s.keys() != keys:
            got = sorted(map(str, s))[:8] if isinstance(s, dict) else type(s).__name__
            return f"shards[{i}]: expected the keys {sorted(keys)}, got {got}"
        if storage.name_problem(s["name"]):
            return f"shards[{i}].name: {storage.name_problem(s['name'])}"
        for key in ("samples", "bytes"):
            if type(s[key]) is not int or s[key] < 0:
                return f"shards[{i}].{key}: expected a count >= 0, got {s[key]!r:.80}"
        if not (isinstance(s["sha256"], str) and _SHA256.fullmatch(s["sha256"])):
            return f"shards[{i}].sha256: expected 64 hex digits, got {s['sha256']!r:.80}"
    return None
