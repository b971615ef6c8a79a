"""Samples/s of text tokenized on the fly from raw files (jsonl, Parquet) vs the same documents
pre-tokenized by `darkmatter prepare`, all read through DataStream.

One generated corpus (Zipf-like words, _common.write_text_corpus) is written as corpus.jsonl
and corpus.parquet (row groups of 2,000 documents); `darkmatter prepare` turns the jsonl into
tar shards and a tokenizer; the jsonl and the Parquet file are indexed in place
(reader/formats.py, 16 MiB byte ranges / one unit per row group) and read with that tokenizer
(ReaderOptions.text). The three read with the same settings: local files, WORKERS worker
processes, 64 partitions, a shuffle buffer of 16 per partition, micro-batches of 64, one epoch
each, timed from building the DataStream to its last step. A warm-up run of each comes first,
then repetitions interleaved (P J Q, Q J P, ...); medians are reported, with the ratios
on-the-fly / pre-tokenized (1.0: tokenizing costs nothing the reader notices).

    python bench/raw_text.py            # 60,000 documents, 3 repetitions
    python bench/raw_text.py --smoke    # a few seconds (the smoke test)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from _common import log  # noqa: E402

PARTITIONS = 64
MICRO_BATCH = 64
WORKERS = 2
ROW_GROUP = 2_000


def make_sources(root: Path, docs: int) -> dict[str, Any]:
    """corpus.jsonl, corpus.parquet (the same documents) and the prepared dataset of the jsonl."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus = _common.write_text_corpus(root / "corpus.txt", docs)
    texts = corpus.read_text().splitlines()
    raw = root / "raw"
    raw.mkdir()
    (raw / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    pq.write_table(pa.table({"text": texts}), raw / "corpus.parquet", row_group_size=ROW_GROUP)
    log(f"prepare: {docs} documents")
    out = subprocess.run(
        [sys.executable, "-m", "darkmatter.cli", "prepare", str(raw / "corpus.jsonl"),
         "--output", str(root / "prepared"), "--modality", "text", "--vocab-size", "8000"],
        cwd=_common.REPO_ROOT, capture_output=True, text=True,
    )  # fmt: skip
    if out.returncode != 0:
        raise SystemExit(f"darkmatter prepare failed: {out.stderr[-2000:]}")
    return {"raw": raw, "prepared": str(root / "prepared"), "docs": len(texts)}


def index(raw: Path, name: str, out: Path) -> str:
    """The manifest `darkmatter index` would write for one raw file, at `out`."""
    from darkmatter.data_pipeline.manifest import Manifest
    from darkmatter.data_pipeline.reader.formats import detect_format, index_raw_file

    path = raw / name
    fmt = detect_format(name)
    assert fmt is not None
    version = str(path.stat().st_mtime)
    units = index_raw_file(str(path), name, fmt, "text", path.stat().st_size, version, 16 << 20)
    Manifest("text", units, root=str(raw), text_field="text").save(str(out))
    return str(out)


def read_epoch(url: str, text: Any) -> tuple[int, float]:
    """(samples, seconds) of one epoch through DataStream."""
    from darkmatter.data_pipeline.reader import DataStream, ReaderOptions

    t0 = time.perf_counter()
    s = DataStream(
        url, rank=0, world_size=1, micro_batch_size=MICRO_BATCH, num_workers=WORKERS, seed=0,
        partitions=PARTITIONS, options=ReaderOptions(shuffle_buffer=16, text=text),
    )  # fmt: skip
    n = 0
    for _ in range(s.steps_per_epoch):
        batch = s.next_step()[0]
        n += len(batch)
    seconds = time.perf_counter() - t0
    skipped = s.summary()["skipped"]
    s.close()
    if skipped:
        raise SystemExit(f"{url}: {skipped} samples skipped")
    return n, seconds


def measure(urls: dict[str, str], text: Any, reps: int) -> dict[str, float]:
    """Median samples/s of each reader, after a warm-up run of each, order alternating."""
    names = list(urls)
    for name in names:
        read_epoch(urls[name], text)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            n, seconds = read_epoch(urls[name], text)
            rates[name].append(n / seconds)
            log(f"{name}: {n} samples in {seconds:.2f} s")
    return {name: _common.median(r) for name, r in rates.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--smoke", "--quick", action="store_true", help="a small, fast run")
    ap.add_argument("--docs", type=int, default=None, help="documents to generate")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions of each reader")
    args = ap.parse_args(argv)
    docs = args.docs or (4_000 if args.smoke else 60_000)
    reps = args.reps or (1 if args.smoke else 3)
    from darkmatter.data_pipeline.reader.options import text_spec

    with _common.workdir("darkmatter-bench-raw-text-") as root:
        src = make_sources(root, docs)
        urls = {
            "pretokenized": src["prepared"],
            "jsonl": index(src["raw"], "corpus.jsonl", root / "jsonl"),
            "parquet": index(src["raw"], "corpus.parquet", root / "parquet"),
        }
        rates = measure(urls, text_spec(src["prepared"]), reps)
    result = {
        "bench": "raw_text",
        "docs": src["docs"],
        "pretokenized_samples_per_s": round(rates["pretokenized"], 1),
        "jsonl_samples_per_s": round(rates["jsonl"], 1),
        "parquet_samples_per_s": round(rates["parquet"], 1),
        "ratio_jsonl": round(rates["jsonl"] / rates["pretokenized"], 3),
        "ratio_parquet": round(rates["parquet"] / rates["pretokenized"], 3),
        "workers": WORKERS,
        "machine": _common.machine(),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
