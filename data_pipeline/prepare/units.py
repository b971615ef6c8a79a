"""Writing work units: in a worker process, one unit (read its items, drop the duplicates,
encode text with the run's tokenizer or decode-check media, write the samples into the unit's
shards `shard-UUUUUU-KKKKKK.tar`, then the unit's record, so a record always means finished
shards); in the parent, the chosen units of a plan through the process pool (write_units).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from darkmatter import storage
from darkmatter.data_pipeline.manifest import PrepareError
from darkmatter.data_pipeline.prepare.media import (
    Undecodable,
    audio_extension,
    image_extension,
    video_members,
)
from darkmatter.data_pipeline.prepare.plan import Plan
from darkmatter.data_pipeline.prepare.resume import UnitRecord, record_url
from darkmatter.data_pipeline.prepare.runner import Runner, Ticker, progress_bar
from darkmatter.data_pipeline.prepare.shard_writer import ShardWriter
from darkmatter.data_pipeline.prepare.sources import Item, Options, Unit, sample_key, unit_items
from darkmatter.data_pipeline.prepare.tokenizer import tokenizer_for

_ENCODE_BATCH = 256  # documents per encode_batch call: parallel, yet bounded memory
SKIPPED_EXAMPLES = 5  # undecodable inputs named per unit (the rest are counted)


def _npy_bytes(ids: list[int]) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(ids, dtype=np.int32), allow_pickle=False)
    return buf.getvalue()


def _json_member(ident: Any, info: dict[str, Any] | None = None) -> bytes:
    return json.dumps({**(info or {}), "id": ident}, sort_keys=True, default=str).encode()


def _write_text_batch(writer: ShardWriter, batch: list[tuple[str, Item]], tok: Any) -> None:
    docs = [str(item.data) for _, item in batch]
    for (key, item), doc, enc in zip(batch, docs, tok.encode_batch(docs), strict=True):
        sample = {"__key__": key, "input_ids.npy": _npy_bytes(enc.ids), "txt": doc.encode()}
        if item.ident is not None:
            sample["json"] = _json_member(item.ident)
        writer.write(sample)


@dataclass(frozen=True)
class UnitJob:
    unit: Unit
    output_url: str
    run: str
    tokenizer_url: str | None
    tokenizer_sha: str
    dropped: frozenset[int]  # item numbers removed as duplicates


def write_unit(job: UnitJob, opts: Options) -> UnitRecord:
    """Write one unit's shards, then its record (so a record always means finished shards)."""
    u = job.unit.index
    text = opts.modality == "text"
    tok = tokenizer_for(job.tokenizer_url, job.tokenizer_sha) if job.tokenizer_url else None
    writer = ShardWriter(job.output_url, opts.shard_bytes, f"shard-{u:06d}-", opts.shard_samples)
    # An image or audio file is kept as it is; a video clip becomes a sequence of frames.
    check = {"image": image_extension, "audio": audio_extension}.get(opts.modality)
    items = skipped = duplicates = 0
    examples: list[str] = []
    batch: list[tuple[str, Item]] = []
    ticker = Ticker()
    try:
        for i, item in enumerate(unit_items(job.unit, opts)):
            items += 1
            if i in job.dropped:
                duplicates += 1
                continue
            before = writer.bytes_written
            if text:
                batch.append((sample_key(u, i), item))
                if len(batch) == _ENCODE_BATCH:
                    _write_text_batch(writer, batch, tok)
                    ticker.add(len(batch), writer.bytes_written - before)
                    batch = []
                continue
            assert isinstance(item.data, bytes)
            try:
                members = {check(item.data): item.data} if check else video_members(item.data)
            except Undecodable as e:
                if opts.strict:
                    raise PrepareError(
                        f"cannot decode {opts.modality} {item.source}: {e}"
                    ) from None
                skipped += 1
                if len(examples) < SKIPPED_EXAMPLES:
                    examples.append(f"{item.source}: {e}")
                continue
            sample: dict[str, Any] = {"__key__": sample_key(u, i), **members}
            if item.ident is not None:
                sample["json"] = _json_member(item.ident, json.loads(members.get("json", b"{}")))
            writer.write(sample)
            ticker.add(1, writer.bytes_written - before)
        before = writer.bytes_written
        if batch:
            _write_text_batch(writer, batch, tok)
        writer.close()
        ticker.add(len(batch), writer.bytes_written - before, flush=True)
    except BaseException:
        writer.abort()
        raise
    record = UnitRecord(job.run, u, writer.shards, items, skipped, duplicates, examples)
    storage.write_bytes(record_url(job.output_url, u), record.to_json())
    return record


@dataclass
class RunContext:
    """What the modes of a prepare run (single, --part, --merge) share."""

    output_url: str
    opts: Options
    plan: Plan
    runner: Runner
    show: bool
    run: str  # the run id unit records carry
    tokenizer_url: str | None
    tokenizer_sha: str


def write_units(
    ctx: RunContext, wanted: Callable[[int], bool], dropped: dict[int, frozenset[int]]
) -> dict[int, UnitRecord]:
    """Write the wanted units of the plan in the process pool; their records by unit."""
    jobs = (
        (
            UnitJob(
                unit,
                ctx.output_url,
                ctx.run,
                ctx.tokenizer_url,
                ctx.tokenizer_sha,
                dropped.get(unit.index, frozenset()),
            ),
            ctx.opts,
        )  # fmt: skip
        for unit in ctx.plan
        if wanted(unit.index)
    )
    records: dict[int, UnitRecord] = {}
    with progress_bar(ctx.show, "writing", "sample") as bar:
        for _, record in ctx.runner.run(write_unit, jobs, bar):
            records[record.unit] = record
    return records
