"""What makes `darkmatter prepare` resumable: `_progress/plan.json` and the tokenizer it pins,
the per-unit records `_progress/unit-UUUUUU.json` and their verification against the shards,
and the removal of shards and records that the finished dataset no longer lists.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from darkmatter import storage
from darkmatter.data_pipeline import offsets
from darkmatter.data_pipeline.manifest import (
    PLAN,
    PROGRESS,
    TOKENIZER,
    Manifest,
    PrepareError,
    ShardInfo,
)
from darkmatter.data_pipeline.prepare.runner import Runner, progress_bar
from darkmatter.data_pipeline.prepare.sources import READ_CHUNK

_SHARD_NAME = re.compile(r"shard-\d{6,}(-\d{6,})?\.tar")  # this version's and the one before
_RECORD_NAME = re.compile(r"unit-(\d{6,})\.json")


@dataclass
class UnitRecord:
    """`_progress/unit-UUUUUU.json`: a unit's shards, written once they are all closed."""

    run: str
    unit: int
    shards: list[ShardInfo]
    items: int
    skipped: int
    duplicates: int
    skipped_examples: list[str]

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> UnitRecord:
        d = json.loads(data)
        d["shards"] = [ShardInfo(**s) for s in d["shards"]]
        return cls(**d)


def record_url(output_url: str, unit: int) -> str:
    return storage.join(output_url, PROGRESS, f"unit-{unit:06d}.json")


def _shard_matches(url: str, info: ShardInfo) -> bool:
    """The object exists with the recorded size and sha256 (read back in full)."""
    fs, path = storage.filesystem(url)
    try:
        if int(fs.info(path).get("size", -1)) != info.bytes:
            return False
        sha, n = hashlib.sha256(), 0
        with fs.open(path, "rb") as f:
            while chunk := f.read(READ_CHUNK):
                sha.update(chunk)
                n += len(chunk)
    except FileNotFoundError:
        return False
    return n == info.bytes and sha.hexdigest() == info.sha256


def verify_unit(output_url: str, unit: int, run: str) -> UnitRecord | None:
    """The unit's record if it belongs to this run and all its shards check out."""
    try:
        record = UnitRecord.from_json(storage.read_bytes(record_url(output_url, unit)))
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None  # missing, or torn by a crash: redo the unit
    if record.run != run or record.unit != unit:
        return None
    ok = all(_shard_matches(storage.join(output_url, s.name), s) for s in record.shards)
    return record if ok else None


def _read_json(url: str) -> Any:
    try:
        return json.loads(storage.read_bytes(url))
    except (FileNotFoundError, ValueError):
        return None


def resumable_tokenizer(output_url: str, fingerprint: str, text: bool) -> bytes | None:
    """The output's tokenizer.json (b"" without text) if plan.json says it belongs to these
    inputs and options; None when the run must start afresh."""
    plan = _read_json(storage.join(output_url, PROGRESS, PLAN))
    if not isinstance(plan, dict) or plan.get("fingerprint") != fingerprint:
        return None
    if not text:
        return b""
    try:
        data = storage.read_bytes(storage.join(output_url, TOKENIZER))
    except FileNotFoundError:
        return None
    return data if hashlib.sha256(data).hexdigest() == plan.get("tokenizer_sha256") else None


def remove_stale(output_url: str, shards: list[ShardInfo], units: int) -> None:
    """Delete shards and unit records of our naming that this dataset no longer lists (left by
    an earlier prepare into the same output): nothing unlisted survives next to the manifest."""
    keep = {s.name for s in shards}
    sample_offsets = {f"{s.identity}.bin" for s in shards}
    for url in storage.list_files(output_url):
        name = posixpath.basename(url)
        parent = posixpath.basename(posixpath.dirname(url))
        if parent != PROGRESS and _SHARD_NAME.fullmatch(name) and name not in keep:
            storage.delete(storage.join(output_url, name))
        if parent == offsets.FOLDER and name not in sample_offsets:
            storage.delete(storage.join(output_url, offsets.FOLDER, name))
        match = _RECORD_NAME.fullmatch(name)
        if parent == PROGRESS and match and int(match.group(1)) >= units:
            storage.delete(storage.join(output_url, PROGRESS, name))


def start_run(output_url: str, plan: dict[str, Any], tokenizer: bytes | None) -> None:
    """A fresh run: the old plan goes first, so that a crash before the new one is written
    cannot resume the old run with a new tokenizer."""
    plan_url = storage.join(output_url, PROGRESS, PLAN)
    storage.delete(plan_url)
    if tokenizer is not None:
        storage.write_bytes(storage.join(output_url, TOKENIZER), tokenizer)
    storage.write_bytes(plan_url, json.dumps(plan, indent=1).encode())


def reuse_units(
    output_url: str, units: Iterable[int], run: str, runner: Runner, show: bool
) -> dict[int, UnitRecord]:
    """Records of this run (of the given units) whose shards verify; one listing finds the
    candidates."""
    names = {posixpath.basename(u) for u in storage.list_files(storage.join(output_url, PROGRESS))}
    candidates = [u for u in units if f"unit-{u:06d}.json" in names]
    records: dict[int, UnitRecord] = {}
    with progress_bar(show and bool(candidates), "verifying", "unit", len(candidates)) as bar:
        tasks = [(output_url, u, run) for u in candidates]
        for _, record in runner.run(verify_unit, tasks):
            bar.update(1)
            if record is not None:
                records[record.unit] = record
    return records


def write_manifest(
    output_url: str,
    modality: str,
    records: list[UnitRecord],
    where: str,
    specials: dict[str, int] | None,
) -> Manifest:
    """The manifest of the units' shards (in unit order), written last, once nothing stale is
    left."""
    shards = [s for r in records for s in r.shards]
    stats = {
        "units": len(records),
        "skipped": sum(r.skipped for r in records),
        "duplicates": sum(r.duplicates for r in records),
    }
    tokenizer = TOKENIZER if modality == "text" else None
    manifest = Manifest(
        modality,
        shards,
        tokenizer,
        stats=stats,
        special_tokens=specials,
        offsets=storage.is_remote(output_url),
    )
    if manifest.num_samples == 0:
        raise PrepareError(
            f"no usable {modality} samples in {where} "
            f"({stats['skipped']} undecodable, {stats['duplicates']} duplicates)"
        )
    remove_stale(output_url, shards, len(records))
    manifest.save(output_url)
    return manifest
