"""`darkmatter prepare` at scale: s3:// inputs listed one folder level at a time, `--part i/N`
and `--merge` (equal to a single run, byte for byte, dedup across parts included), dedup through
sorted hash runs on disk, `--tokenizer-only` (deterministic), and peak memory that does not grow
with the corpus (slow tier)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from darkmatter import storage
from darkmatter.data_pipeline.prepare import (
    Manifest,
    PrepareError,
    cli,
    prepare,
    prepare_tokenizer,
)
from darkmatter.data_pipeline.prepare import dedup as dedup_mod
from darkmatter.data_pipeline.prepare.sources import TEXT_SUFFIXES, expand_inputs
from tests.helpers import REPO_ROOT
from tests.test_prepare import check_dataset
from tests.test_prepare_scale import SMALL, first_occurrences, members, text_corpus


def upload(src: Path, prefix: str) -> None:
    for p in sorted(src.rglob("*")):
        if p.is_file():
            storage.write_bytes(f"{prefix}/{p.relative_to(src).as_posix()}", p.read_bytes())


def test_folders_are_listed_in_full_path_order_locally_and_on_s3(
    bucket: str, tmp_path: Path
) -> None:
    # "a.txt" < "a/…" < "ab/…" as full paths ("." < "/" < "b"); dotfiles and foreign suffixes go
    # (a dot folder's files stay, as before).
    names = ["a.txt", "a/x.txt", "a/b/y.jsonl", "ab/z.txt", "b", ".hidden.txt", "c.dat",
             "a/.cache/q.txt", "a-1.txt"]  # fmt: skip
    for n in names:
        (tmp_path / "src" / n).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / n).write_text(f"doc {n}\n")
    upload(tmp_path / "src", f"{bucket}/in")
    want = ["a-1.txt", "a.txt", "a/.cache/q.txt", "a/b/y.jsonl", "a/x.txt", "ab/z.txt", "b"]
    local = expand_inputs([str(tmp_path / "src")], TEXT_SUFFIXES)
    assert not isinstance(local, list)  # streamed
    assert [f.url for f in local] == [str(tmp_path / "src" / n) for n in want]
    remote = list(expand_inputs([f"{bucket}/in"], TEXT_SUFFIXES))
    assert [f.url for f in remote] == [f"{bucket}/in/{n}" for n in want]
    assert [f.size for f in remote] == [len(f"doc {n}\n") for n in want]
    assert all(f.version for f in remote)  # the ETag: an edit changes the fingerprint


def test_sorted_hash_runs_find_exactly_the_later_copies(tmp_path: Path) -> None:
    rng = random.Random(3)
    pool = [rng.randbytes(32) for _ in range(300)]
    items = [(u, i, rng.choice(pool)) for u in range(40) for i in range(rng.randint(0, 30))]
    runs = dedup_mod.RunWriter(str(tmp_path), "h-", spill=97)  # many small runs
    for u, i, h in rng.sample(items, len(items)):  # arrival order does not matter
        runs.add(h + u.to_bytes(4, "big") + i.to_bytes(4, "big"))
    runs.flush()
    assert len(runs.names) == -(-len(items) // 97)
    seen: set[bytes] = set()
    expected = set()
    for u, i, h in items:  # (unit, item) order: the first occurrence stays
        if h in seen:
            expected.add((u, i))
        seen.add(h)
    found = list(dedup_mod.duplicates(str(tmp_path / n) for n in runs.names))
    assert len(found) == len(set(found)) and set(found) == expected and len(expected) > 100


def test_prepare_dedup_spills_runs_and_keeps_first_occurrences(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = text_corpus(tmp_path / "src")
    monkeypatch.setattr(dedup_mod, "SPILL_RECORDS", 64)  # ~12 runs for ~700 items
    m = prepare([str(tmp_path / "src")], str(tmp_path / "ds"), modality="text", vocab_size=200,
                key_field="id", dedup=True, workers=1, **SMALL)  # fmt: skip
    expected = first_occurrences(docs)
    assert members(check_dataset(tmp_path / "ds", m)) == expected
    assert m.stats is not None and m.stats["duplicates"] == len(docs) - len(expected)


def test_tokenizer_only_is_deterministic_and_writes_only_the_tokenizer(tmp_path: Path) -> None:
    docs = text_corpus(tmp_path / "src")
    kw: dict[str, Any] = dict(vocab_size=150, unit_bytes=1500)
    n1 = prepare_tokenizer([str(tmp_path / "src")], str(tmp_path / "t1"), **kw)
    n2 = prepare_tokenizer([str(tmp_path / "src")], str(tmp_path / "t2"), **kw)
    files = sorted(p.name for p in (tmp_path / "t1").iterdir())
    assert files == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    assert n1 == n2 == len(docs)  # every document: fewer than the sample size
    tok = (tmp_path / "t1" / "tokenizer.json").read_bytes()
    assert (tmp_path / "t2" / "tokenizer.json").read_bytes() == tok
    vocab = json.loads(tok)["model"]["vocab"]
    assert [vocab[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 1, 2, 3, 4]
    # A sample: the first documents of units in a seeded order.
    n3 = prepare_tokenizer([str(tmp_path / "src")], str(tmp_path / "t3"), sample_docs=100, **kw)
    assert n3 == 100 and (tmp_path / "t3" / "tokenizer.json").read_bytes() != tok
    again = prepare_tokenizer([str(tmp_path / "src")], str(tmp_path / "t4"), sample_docs=100, **kw)
    assert again == 100
    assert (tmp_path / "t4" / "tokenizer.json").read_bytes() == (
        tmp_path / "t3" / "tokenizer.json"
    ).read_bytes()


def test_three_parts_and_merge_equal_one_run_on_s3(
    bucket: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """s3:// input prefix and output; duplicates across parts are removed at --merge."""
    docs = text_corpus(tmp_path / "src")
    src, out = f"{bucket}/corpus", f"{bucket}/ds"
    upload(tmp_path / "src", src)
    assert prepare_tokenizer([src], str(tmp_path / "tok"), vocab_size=200, unit_bytes=1500) > 0
    tok = str(tmp_path / "tok" / "tokenizer.json")
    kw: dict[str, Any] = dict(modality="text", key_field="id", dedup=True, tokenizer=tok, **SMALL)
    single = prepare([str(tmp_path / "src")], str(tmp_path / "single"), workers=1, **kw)
    assert single.stats is not None and single.stats["units"] >= 6
    assert members(check_dataset(tmp_path / "single", single)) == first_occurrences(docs)

    flags = ["--modality", "text", "--key-field", "id", "--dedup", "--tokenizer", tok,
             "--unit-size-mb", str(1500 / 2**20), "--shard-size-mb", str(24 / 1024),
             "--workers", "1", "--quiet", "--output", out]  # fmt: skip
    parts = [prepare([src], out, part=(i, 3), workers=i, **kw) for i in (1, 2)]
    assert cli([src, *flags, "--merge"]) == 75  # EX_TEMPFAIL: a merge job tries again later
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (
        f"darkmatter prepare: error: {out}/_progress: missing part(s) 0/3 of 3 "
        "(run them with --part i/3, then --merge again)"
    )
    assert cli([src, *flags, "--part", "0/3"]) == 0
    assert capsys.readouterr().out.startswith("part 0/3: prepared ")
    assert not storage.exists(f"{out}/manifest.json")
    assert sum(p.num_samples for p in parts) > 0
    records = [json.loads(storage.read_bytes(f"{out}/_progress/part-{i}-of-3.json"))
               for i in range(3)]  # fmt: skip
    assert sorted(r["unit"] for d in records for r in d["records"]) == list(
        range(single.stats["units"])
    )
    within = sum(r["duplicates"] for d in records for r in d["records"])
    assert within < single.stats["duplicates"]  # some copies are in another part

    assert cli([src, *flags, "--merge"]) == 0
    merged = Manifest.load(out)
    assert merged == single and merged.digest == single.digest
    for s in single.shards:
        assert storage.read_bytes(f"{out}/{s.name}") == (tmp_path / "single" / s.name).read_bytes()
    assert storage.read_bytes(f"{out}/tokenizer.json") == Path(tok).read_bytes()
    summary = capsys.readouterr().out.splitlines()
    rewritten = int(summary[2].split("(")[1].split()[0])
    assert 0 < rewritten < single.stats["units"]  # only units holding cross-part copies

    # A second merge finds everything in place and rewrites nothing.
    again = prepare([src], out, merge=True, workers=1, **kw)
    assert again == single and again.run is not None and again.run.written == 0
    # A lost shard is named, with the part to run again.
    lost = next(s.name for s in single.shards if int(s.name.split("-")[1]) % 3 == 2)
    storage.delete(f"{out}/{lost}")
    with pytest.raises(PrepareError, match=rf"{out}/{lost}: listed by part 2/3 .*--part 2/3 again"):
        prepare([src], out, merge=True, workers=1, **kw)


def test_part_errors_are_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"doc {i}\n" for i in range(50)))
    base = [str(corpus), "--output", str(tmp_path / "ds"), "--modality", "text", "--quiet"]
    cases = [
        (["--part", "0/2"], "--part of text needs --tokenizer (the parts must share one): "
                            "train one first with `darkmatter prepare --tokenizer-only`"),
        (["--part", "2/2"], "--part 2/2: expected 0 <= i < N"),
        (["--part", "x"], "--part: expected i/N (such as 0/4), got 'x'"),
    ]  # fmt: skip
    for extra, message in cases:
        assert cli([*base, *extra]) == 2
        assert capsys.readouterr().err == f"darkmatter prepare: error: {message}\n"
    assert cli([str(corpus), "--output", str(tmp_path / "tok"), "--tokenizer-only",
                "--vocab-size", "60", "--quiet"]) == 0  # fmt: skip
    tok = ["--tokenizer", str(tmp_path / "tok" / "tokenizer.json")]
    assert cli([*base, *tok, "--merge"]) == 75
    err = capsys.readouterr().err
    assert err.startswith(f"darkmatter prepare: error: {tmp_path / 'ds' / '_progress'}: no part ")
    assert err.count("\n") == 1
    assert not (tmp_path / "ds" / "manifest.json").exists()


def peak_rss_mib(src: Path, out: Path) -> tuple[float, float]:
    """Peak RSS (MiB) of a prepare run's parent process and of its largest worker.

    The parent's is VmHWM, which starts afresh at exec: ru_maxrss would still count the pytest
    process it was forked from."""
    script = (
        "import re, resource\n"
        "from darkmatter.data_pipeline.prepare import dedup, prepare\n"
        "dedup.SPILL_RECORDS = 20_000  # runs spill here as they would past 1M items\n"
        f"prepare([{str(src)!r}], {str(out)!r}, modality='text', vocab_size=500, dedup=True,\n"
        "        workers=2, unit_bytes=2**18, shard_bytes=2**19)\n"
        "status = open('/proc/self/status').read()\n"
        "print(int(re.search(r'VmHWM:\\s+(\\d+) kB', status).group(1)) / 1024,\n"
        "      resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)\n"
    )
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=900, check=True)  # fmt: skip
    parent, worker = map(float, done.stdout.split()[-2:])
    return parent, worker


def generated_corpus(folder: Path, files: int) -> None:
    """~5 KB text files of 300 words, a few percent of documents repeated."""
    rng = random.Random(files)
    words = [f"w{k}" for k in range(300)]
    for f in range(files):
        path = folder / f"{f // 100:03d}" / f"{f:05d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [" ".join(rng.choices(words, k=8)) if rng.random() > 0.03 else "a repeat"
                 for _ in range(110)]  # fmt: skip
        path.write_text("\n".join(lines) + "\n")


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_corpus(tmp_path: Path) -> None:
    generated_corpus(tmp_path / "small", 100)  # ~0.5 MB, ~11k documents
    generated_corpus(tmp_path / "large", 1000)  # 10x the files and documents
    small = peak_rss_mib(tmp_path / "small", tmp_path / "ds_small")
    large = peak_rss_mib(tmp_path / "large", tmp_path / "ds_large")
    print(json.dumps({"bench": "prepare_peak_rss_mib", "parent": [small[0], large[0]],
                      "worker": [small[1], large[1]]}))  # fmt: skip
    assert small[0] > 30 and small[1] > 30  # measured: the interpreter and its imports
    for before, after in zip(small, large, strict=True):
        assert after <= 1.15 * before + 4, (small, large)
