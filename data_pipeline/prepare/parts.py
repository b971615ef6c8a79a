"""`darkmatter prepare --part i/N` and `--merge`: one dataset prepared by N independent jobs
(a SLURM array, a Kubernetes Indexed Job) and assembled by one more.

Part i of N writes the units u with u % N == i. Round robin rather than contiguous ranges: the
number of units is only known at the end of the streamed plan, and neighbouring units tend to
cost alike (one big file), so every part gets an even share. Every part makes the whole plan
(listing, Parquet footers) and writes its units exactly as a single run would (same names, same
bytes: a unit depends only on its input, the options and the tokenizer), then, with --dedup,
its sorted hash runs `_progress/part-i-of-N-hashes-KKKKKK.bin`, and last its record
`_progress/part-i-of-N.json` (fingerprint, run id, its unit records, item count, hash runs).
A part writes no manifest.json (it deletes a stale one) and no plan.json; text needs a given
tokenizer (--tokenizer), as the parts cannot each train one.

--merge, run with the same inputs and options, reads the N part records of this fingerprint
(an error names the missing parts), checks that every shard they list exists with its size, and
writes tokenizer.json, plan.json and manifest.json: the same manifest (digest) a single run
gives. With --dedup, a part only dropped duplicates within its own units; the k-way merge of all
parts' hash runs finds the items whose first occurrence is in another part's earlier unit, and
each unit holding such items is written again from its input without them. The cost is reading,
encoding and writing those units once more: few when duplicates across parts are rare, all of
them when every unit repeats an earlier one.
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import asdict
from typing import Any

from darkmatter import storage
from darkmatter.data_pipeline.manifest import MANIFEST, PROGRESS, Manifest, PrepareError, PrepareRun
from darkmatter.data_pipeline.prepare.dedup import (
    RunWriter,
    dropped_by_unit,
    duplicates,
    hash_units,
)
from darkmatter.data_pipeline.prepare.resume import (
    UnitRecord,
    reuse_units,
    start_run,
    verify_unit,
    write_manifest,
)
from darkmatter.data_pipeline.prepare.units import SKIPPED_EXAMPLES, RunContext, write_units

EXIT_PARTS_MISSING = 75  # EX_TEMPFAIL: --merge came too early; the same command may succeed later


class PartsMissing(PrepareError):
    """--merge found no or not all part records of this run (yet)."""


_PART_RECORD = re.compile(r"part-(\d+)-of-(\d+)\.json")
_FORMAT = 1  # of the part record


def parse_part(text: str) -> tuple[int, int]:
    """`i/N` -> (i, N) with 0 <= i < N."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise PrepareError(f"--part: expected i/N (such as 0/4), got {text!r}")
    i, n = int(m.group(1)), int(m.group(2))
    if not 0 <= i < n:
        raise PrepareError(f"--part {text}: expected 0 <= i < N")
    return i, n


def part_name(i: int, n: int) -> str:
    return f"part-{i}-of-{n}"


def tokenizer_url(output_url: str, part: tuple[int, int]) -> str:
    """Where a part keeps the tokenizer its workers encode with: one file per part, so that
    parts running side by side never read a file another part is writing."""
    return storage.join(output_url, PROGRESS, f"{part_name(*part)}-tokenizer.json")


def run_part(
    ctx: RunContext, part: tuple[int, int], dedup: bool, modality: str, tok_json: bytes | None
) -> Manifest:
    """Write part `part` = (i, N) of the plan's units and its record; the returned manifest
    lists the part's shards (it is not saved: --merge writes the dataset's)."""
    i, n = part
    name, progress = part_name(i, n), storage.join(ctx.output_url, PROGRESS)

    def mine(u: int) -> bool:
        return u % n == i

    dropped: dict[int, frozenset[int]] = {}
    items, runs = None, RunWriter(progress, f"{name}-hashes-")
    if dedup:
        mine_units = (unit for unit in ctx.plan if mine(unit.index))
        total = len(range(i, ctx.plan.units, n))
        items = hash_units(mine_units, ctx.opts, ctx.runner, runs, ctx.show, total)
        dropped = dropped_by_unit(duplicates(storage.join(progress, r) for r in runs.names))
    storage.makedirs(ctx.output_url)
    storage.delete(storage.join(ctx.output_url, MANIFEST))  # the dataset is incomplete
    if tok_json is not None and ctx.tokenizer_url:
        storage.write_bytes(ctx.tokenizer_url, tok_json)
    records = reuse_units(
        ctx.output_url, range(i, ctx.plan.units, n), ctx.run, ctx.runner, ctx.show
    )
    reused = len(records)
    records.update(write_units(ctx, lambda u: mine(u) and u not in records, dropped))
    ordered = [records[u] for u in sorted(records)]
    doc = {"format": _FORMAT, "fingerprint": ctx.plan.fingerprint, "run": ctx.run, "part": i,
           "parts": n, "units": ctx.plan.units, "items": items, "hash_runs": runs.names,
           "records": [asdict(r) for r in ordered]}  # fmt: skip
    storage.write_bytes(storage.join(progress, f"{name}.json"), json.dumps(doc).encode())
    stats = {
        "units": len(ordered),
        "skipped": sum(r.skipped for r in ordered),
        "duplicates": sum(r.duplicates for r in ordered),
    }
    shards = [s for r in ordered for s in r.shards]
    remote = storage.is_remote(ctx.output_url)
    manifest = Manifest(modality, shards, stats=stats, offsets=remote)
    examples = [e for r in ordered for e in r.skipped_examples][:SKIPPED_EXAMPLES]
    manifest.run = PrepareRun(len(ordered), reused, len(ordered) - reused, examples)
    return manifest


def _read_parts(ctx: RunContext) -> list[dict[str, Any]]:
    """The part records of this run, all N of them, or an error naming what is missing."""
    progress = storage.join(ctx.output_url, PROGRESS)
    found: dict[int, dict[int, dict[str, Any]]] = {}  # N -> i -> record
    others = 0
    for url in storage.list_files(progress):
        m = _PART_RECORD.fullmatch(posixpath.basename(url))
        if not m:
            continue
        try:
            doc = json.loads(storage.read_bytes(url))
        except ValueError:
            raise PrepareError(f"{url}: not a part record (torn? run that part again)") from None
        if doc.get("fingerprint") != ctx.plan.fingerprint or doc.get("run") != ctx.run:
            others += 1
            continue
        found.setdefault(int(m.group(2)), {})[int(m.group(1))] = doc
    if not found:
        other = f"; {others} of other inputs, options or tokenizer" if others else ""
        raise PartsMissing(
            f"{progress}: no part records of these inputs and options{other} "
            "(run `darkmatter prepare ... --part i/N` for every part first)"
        )
    if len(found) > 1:
        raise PrepareError(
            f"{progress}: part records of these inputs for several part counts "
            f"{sorted(found)}: remove the part-*-of-N.json files of the stale count"
        )
    ((n, parts),) = found.items()
    missing = [f"{i}/{n}" for i in range(n) if i not in parts]
    if missing:
        raise PartsMissing(
            f"{progress}: missing part(s) {', '.join(missing)} of {n} "
            f"(run them with --part i/{n}, then --merge again)"
        )
    return [parts[i] for i in range(n)]


def _checked(
    ctx: RunContext, record: UnitRecord, sizes: dict[str, Any], part: tuple[int, int]
) -> UnitRecord:
    """A part's unit record whose shards are listed with their sizes, or the unit's own newer
    record: an earlier --merge rewrote the units with duplicates across parts."""
    bad = next((s for s in record.shards if sizes.get(s.name) != s.bytes), None)
    if bad is None:
        return record
    current = verify_unit(ctx.output_url, record.unit, ctx.run)
    if current is None:
        i, n = part
        raise PrepareError(
            f"{storage.join(ctx.output_url, bad.name)}: listed by part {i}/{n} but missing or "
            f"not {bad.bytes} bytes (run --part {i}/{n} again)"
        )
    return current


def _unit_records(ctx: RunContext, parts: list[dict[str, Any]]) -> list[UnitRecord]:
    """Every unit's record from the part records, checked against one listing of the output."""
    fs, path = storage.filesystem(ctx.output_url)
    sizes = {posixpath.basename(e["name"]): e.get("size") for e in fs.ls(path, detail=True)}
    n = len(parts)
    records: dict[int, UnitRecord] = {}
    for i, doc in enumerate(parts):
        for r in doc["records"]:
            record = _checked(ctx, UnitRecord.from_json(json.dumps(r).encode()), sizes, (i, n))
            records[record.unit] = record
    lost = [u for u in range(ctx.plan.units) if u not in records]
    if lost:
        raise PrepareError(
            f"{ctx.output_url}: unit {lost[0]} has no record in part {lost[0] % n}/{n} "
            f"(run --part {lost[0] % n}/{n} again)"
        )
    return [records[u] for u in range(ctx.plan.units)]


def _dedup_across_parts(
    ctx: RunContext, parts: list[dict[str, Any]], records: list[UnitRecord]
) -> int:
    """Rewrite the units holding duplicates of another part's items; how many were written."""
    progress = storage.join(ctx.output_url, PROGRESS)
    urls = [storage.join(progress, name) for doc in parts for name in doc["hash_runs"]]
    dropped = dropped_by_unit(duplicates(urls))
    # A part's drops are a subset of the global ones: equal counts mean equal sets.
    stale = [u for u, r in enumerate(records) if r.duplicates != len(dropped.get(u, ()))]
    redo = set()
    for u in stale:  # an earlier --merge may have rewritten it already
        done = verify_unit(ctx.output_url, u, ctx.run)
        if done is not None and done.duplicates == len(dropped.get(u, ())):
            records[u] = done
        else:
            redo.add(u)
    for u, record in write_units(ctx, redo.__contains__, dropped).items():
        records[u] = record
    return len(redo)


def merge_parts(
    ctx: RunContext,
    dedup: bool,
    modality: str,
    where: str,
    specials: dict[str, int] | None,
    plan_doc: dict[str, Any],
    tok_json: bytes | None,
) -> Manifest:
    """Check the parts, finish cross-part dedup, and write the dataset's manifest."""
    parts = _read_parts(ctx)
    records = _unit_records(ctx, parts)
    start_run(ctx.output_url, plan_doc, tok_json)  # the tokenizer rewritten units encode with
    written = _dedup_across_parts(ctx, parts, records) if dedup else 0
    manifest = write_manifest(ctx.output_url, modality, records, where, specials)
    examples = [e for r in records for e in r.skipped_examples][:SKIPPED_EXAMPLES]
    manifest.run = PrepareRun(len(records), len(records) - written, written, examples)
    return manifest
