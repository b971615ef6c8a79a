"""The layout of a dataset: the Manifest (shard list, sample count, content digest, special
token ids), the names of the files beside it, the special tokens the text objectives need, and
PrepareError, the user error of every step of `darkmatter prepare` and `darkmatter index`.

The manifest is written last, so its presence means the shards it lists are complete; `load`
refuses a file whose counts or digest do not match its shard list, and one whose shard names or
sha256s would be paths out of the dataset or the shard cache.

Version 1 is what `prepare` writes: tar shards beside the manifest, each with its sha256.
Version 2 (written as soon as one of its fields is used) adds what `darkmatter index` needs to
describe data where it already lies: a `root` the shard names are relative to, units that are
not whole tar files (a Parquet row group, a byte range of a jsonl or text file), shards without
a sha256 (identified by name, size and the store's ETag or mtime instead: `ShardInfo.identity`),
the member extensions of each tar shard, and the `history` of a dataset that grew (each earlier
version is a prefix of the shard list). The digest is the sha256 of the shards' identities in
order, which for version 1 is what it always was (the identity of a shard with a sha256 is it).
"""

from __future__ import annotations

import dataclasses
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


FORMATS = ("tar", "parquet", "jsonl", "text")


@dataclass(frozen=True)
class ShardInfo:
    """One unit of a dataset: a tar shard, a Parquet row group or a byte range of a jsonl/text
    file. Everything after sha256 is version 2 only, and written only when not the default."""

    name: str
    samples: int
    bytes: int
    sha256: str | None = None
    """None: not checksummed (version 2 only); `identity` stands in for it."""
    format: str = "tar"
    """One of FORMATS."""
    version: str = ""
    """The object's ETag (or the file's mtime) when indexed: names content without a sha256."""
    row_group: int | None = None
    """Parquet: the row group this unit is."""
    start: int = 0
    """jsonl/text: the first byte of the unit's range; a line belongs to the range holding its
    first byte. Compressed files (.gz, .zst) are always one whole-file unit."""
    stop: int | None = None
    """jsonl/text: the end of the byte range (exclusive); None: the end of the file."""
    members: dict[str, int] | None = None
    """tar, from `darkmatter index`: how many members of each extension the shard holds."""

    @property
    def identity(self) -> str:
        """The sha256, or a sha256 of what names the content without one (name, size, version,
        unit, and the sample count: a sidecar's count and the walked one order an epoch
        differently, so a re-index that changes it must change the digest a resume checks):
        the digest's part and the shard cache's file name."""
        if self.sha256 is not None:
            return self.sha256
        key = [self.name, self.bytes, self.version, self.row_group, self.start, self.stop,
               self.samples]  # fmt: skip
        return hashlib.sha256(json.dumps(key).encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """The manifest's entry: the version-1 keys always, the others when set."""
        d = asdict(self)
        return {k: v for k, v in d.items() if k in _V1_KEYS or v != _DEFAULTS[k]}


@dataclass(frozen=True)
class PrepareRun:
    """What one prepare() call did (not part of the manifest file)."""

    units: int
    reused: int
    written: int
    skipped_examples: list[str]


@dataclass
class Manifest:
    """What a dataset holds; `digest` identifies its content (shard identities in order)."""

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
    root: str | None = None
    """URL (or absolute path) the shard names are relative to; None: the manifest's folder."""
    text_field: str | None = None
    """jsonl key / Parquet column of the text, for raw text units."""
    extensions: dict[str, str] | None = None
    """`darkmatter index`: member extension -> modality ('metadata': carried, not decoded)."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """Earlier versions of a dataset that grew, oldest first: {digest, shards, num_samples},
    each the first `shards` entries of this one."""
    offsets: bool = field(default=False, compare=False)
    """Sample offsets lie beside the manifest (offsets.py) for its tar shards, or for those
    `index` walked: the reader may then fetch a few samples by range (reader/ranged.py). Not
    part of what the dataset is: manifests of one content compare equal with or without it."""

    def __post_init__(self) -> None:
        self.num_samples = sum(s.samples for s in self.shards)
        self.digest = _digest(self.shards)
        if self.tokenizer and self.special_tokens is None:
            self.special_tokens = dict(DEFAULT_SPECIAL_IDS)
        if self._uses_v2():
            self.version = max(self.version, 2)

    def _uses_v2(self) -> bool:
        top = (self.root, self.text_field, self.extensions)
        return (
            any(x is not None for x in top)
            or bool(self.history)
            or any(s.to_dict().keys() != _V1_KEYS or s.sha256 is None for s in self.shards)
        )

    def shard_url(self, dataset_url: str, info: ShardInfo) -> str:
        """Where shard `info` of the dataset at `dataset_url` lies."""
        return storage.join(self.root or dataset_url, info.name)

    def prefix(self, n_shards: int) -> Manifest:
        """The dataset as it was with its first n_shards shards (an earlier version of it)."""
        assert 0 <= n_shards <= len(self.shards), n_shards
        return dataclasses.replace(
            self, shards=self.shards[:n_shards], version=self.version,
            history=[h for h in self.history if h["shards"] < n_shards],
        )  # fmt: skip

    def to_json(self) -> str:
        d: dict[str, Any] = {
            "version": self.version,
            "modality": self.modality,
            "num_samples": self.num_samples,
            "tokenizer": self.tokenizer,
            "shards": [s.to_dict() for s in self.shards],
            "digest": self.digest,
        }
        if self.stats is not None:
            d["stats"] = self.stats
        if self.special_tokens is not None:
            d["special_tokens"] = self.special_tokens
        for key in ("root", "text_field", "extensions"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        if self.history:
            d["history"] = self.history
        if self.offsets:
            d["offsets"] = True
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
        if not isinstance(d, dict) or d.get("version") not in (1, 2):
            raise PrepareError(f"{where}: not a version 1 or 2 darkmatter manifest")
        problem = _problem(d) or (_problem_v2(d) if d["version"] == 2 else None)
        if problem:
            raise PrepareError(f"{where}: {problem}")
        try:
            m = cls(
                d["modality"], [ShardInfo(**s) for s in d["shards"]], d.get("tokenizer"),
                version=d["version"], root=d.get("root"), text_field=d.get("text_field"),
                extensions=d.get("extensions"), history=d.get("history", []),
            )  # fmt: skip
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
        m.offsets = d.get("offsets") is True
        if problem := _history_problem(m):
            raise PrepareError(f"{where}: {problem}")
        return m


_V1_KEYS = {"name", "samples", "bytes", "sha256"}
_DEFAULTS = {f.name: f.default for f in fields(ShardInfo)}


def _digest(shards: list[ShardInfo]) -> str:
    return hashlib.sha256("".join(s.identity for s in shards).encode()).hexdigest()


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
    v2 = d.get("version") == 2
    for i, s in enumerate(d["shards"]):
        if not isinstance(s, dict) or not (
            s.keys() <= _DEFAULTS.keys() and s.keys() >= {"name", "samples", "bytes"}
            if v2 else s.keys() == _V1_KEYS
        ):  # fmt: skip
            got = sorted(map(str, s))[:8] if isinstance(s, dict) else type(s).__name__
            want = f"{sorted(_V1_KEYS)}{' and optional others' if v2 else ''}"
            return f"shards[{i}]: expected the keys {want}, got {got}"
        if storage.name_problem(s["name"]):
            return f"shards[{i}].name: {storage.name_problem(s['name'])}"
        for key in ("samples", "bytes"):
            if type(s[key]) is not int or s[key] < 0:
                return f"shards[{i}].{key}: expected a count >= 0, got {s[key]!r:.80}"
        sha = s.get("sha256")
        if not ((v2 and sha is None) or (isinstance(sha, str) and _SHA256.fullmatch(sha))):
            return f"shards[{i}].sha256: expected 64 hex digits, got {sha!r:.80}"
        if v2 and (problem := _unit_problem(s)):
            return f"shards[{i}].{problem}"
    return None


def _unit_problem(s: dict[str, Any]) -> str | None:
    """A version-2 shard entry's first unusable optional field, as 'key: why', or None."""
    fmt = s.get("format", "tar")
    if fmt not in FORMATS:
        return f"format: expected one of {list(FORMATS)}, got {fmt!r:.80}"
    if not isinstance(s.get("version", ""), str):
        return f"version: expected a string, got {s['version']!r:.80}"
    row_group, start, stop = s.get("row_group"), s.get("start", 0), s.get("stop")
    if row_group is not None and (fmt != "parquet" or type(row_group) is not int or row_group < 0):
        return (
            f"row_group: expected a row group number >= 0 of a parquet unit, got {row_group!r:.80}"
        )
    if type(start) is not int or start < 0 or (start and fmt not in ("jsonl", "text")):
        return f"start: expected a byte offset >= 0 of a jsonl/text unit, got {start!r:.80}"
    if stop is not None and (type(stop) is not int or stop < start or fmt not in ("jsonl", "text")):
        return f"stop: expected a byte offset >= start of a jsonl/text unit, got {stop!r:.80}"
    members = s.get("members")
    if members is not None and not (
        isinstance(members, dict)
        and all(isinstance(k, str) and type(v) is int and v >= 0 for k, v in members.items())
    ):
        return f"members: expected extension -> count, got {members!r:.80}"
    return None


def _problem_v2(d: dict[str, Any]) -> str | None:
    """The first unusable version-2 top-level field, as 'key: why', or None."""
    root = d.get("root")
    if root is not None and not (isinstance(root, str) and root and root.isprintable()):
        return f"root: expected a URL or an absolute path, got {root!r:.80}"
    if d.get("text_field") is not None and not isinstance(d["text_field"], str):
        return f"text_field: expected a string, got {d['text_field']!r:.80}"
    ext = d.get("extensions")
    if ext is not None and not (
        isinstance(ext, dict) and all(isinstance(v, str) for v in ext.values())
    ):
        return f"extensions: expected extension -> modality, got {ext!r:.80}"
    history = d.get("history", [])
    if not isinstance(history, list):
        return f"history: expected a list, got {type(history).__name__}"
    for i, h in enumerate(history):
        if not isinstance(h, dict) or h.keys() != {"digest", "shards", "num_samples"}:
            return f"history[{i}]: expected the keys ['digest', 'num_samples', 'shards'], got {h!r:.80}"
        if not (isinstance(h["digest"], str) and _SHA256.fullmatch(h["digest"])):
            return f"history[{i}].digest: expected 64 hex digits, got {h['digest']!r:.80}"
        for key in ("shards", "num_samples"):
            if type(h[key]) is not int or h[key] < 0:
                return f"history[{i}].{key}: expected a count >= 0, got {h[key]!r:.80}"
    return None


def _history_problem(m: Manifest) -> str | None:
    """Each history entry must describe a prefix of the shard list, oldest (shortest) first."""
    last = -1
    for i, h in enumerate(m.history):
        n = h["shards"]
        if not last < n <= len(m.shards):
            return (
                f"history[{i}].shards: {n} is not a prefix longer than the one before it "
                f"({last}) and at most the {len(m.shards)} shards listed"
            )
        head = m.shards[:n]
        if (h["digest"], h["num_samples"]) != (_digest(head), sum(s.samples for s in head)):
            return f"history[{i}]: digest/num_samples do not match the first {n} shards"
        last = n
    return None
