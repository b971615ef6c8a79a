"""`darkmatter index` and manifest version 2: existing WebDataset shards (written by webdataset's
own ShardWriter in img2dataset's layout) indexed in place by ranged header reads, locally and on
the S3 server, then trained on by the reader; growth, truncation and the user errors."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from darkmatter import storage
from darkmatter.data_pipeline import offsets
from darkmatter.data_pipeline.index import cli, ensure_manifest, index, scan_tar
from darkmatter.data_pipeline.manifest import Manifest, PrepareError, ShardInfo
from darkmatter.data_pipeline.reader import DataStream, ReaderOptions, tar_members
from darkmatter.data_pipeline.reader.shards import Hole, LocalShard
from tests import helpers
from tests.helpers import REPO_ROOT


def _jpg(i: int) -> bytes:
    from PIL import Image

    arr = np.random.default_rng(i).integers(0, 255, (12, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def write_shards(folder: Path, samples: int = 40, per_shard: int = 10, **members: Any) -> Path:
    """img2dataset's layout (jpg + txt + json per sample), written by webdataset itself."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / "%05d.tar"), maxcount=per_shard, verbose=0) as w:
        for i in range(samples):
            sample = {"__key__": f"{i:09d}", "jpg": _jpg(i), "txt": f"caption {i}",
                      "json": json.dumps({"key": i}).encode()}  # fmt: skip
            sample.update({k: v(i) for k, v in members.items()})
            w.write(sample)
    return folder


def two_ranks(url: str, cache: Path) -> list[DataStream]:
    """Rank 0 and rank 1 of world size 2, in one process; 8 partitions of 5 samples over
    10-sample shards: the two halves of a shard go to different ranks."""
    return [
        DataStream(url, rank=r, world_size=2, micro_batch_size=5, partitions=8, seed=3,
                   options=ReaderOptions(shuffle_buffer=4, cache_dir=str(cache)))
        for r in range(2)
    ]  # fmt: skip


def steps(streams: list[DataStream], n: int) -> list[list[str]]:
    """Each rank's keys of its next n steps; every image decodes."""
    keys: list[list[str]] = [[] for _ in streams]
    for _ in range(n):
        for r, s in enumerate(streams):
            batch = s.next_step()[0]
            assert all(x["image"].shape == (12, 16, 3) for x in batch)
            keys[r] += [x["__key__"] for x in batch]
    return keys


# -- manifest version 2 ---------------------------------------------------------------------
def test_manifest_v1_unchanged_and_v2_round_trip(tmp_path: Path) -> None:
    shas = [hashlib.sha256(b"%d" % i).hexdigest() for i in range(3)]
    v1 = Manifest("text", [ShardInfo(f"s{i}.tar", 3, 100, shas[i]) for i in range(3)], None)
    assert v1.version == 1
    assert v1.digest == hashlib.sha256("".join(shas).encode()).hexdigest()
    assert json.loads(v1.to_json())["shards"][0].keys() == {"name", "samples", "bytes", "sha256"}

    units = [
        ShardInfo("a/x.tar", 4, 100, None, version="e1", members={"jpg": 4, "txt": 4}),
        ShardInfo("b/y.parquet", 7, 50, None, format="parquet", version="e2", row_group=1),
        ShardInfo("c/z.jsonl", 2, 30, None, format="jsonl", version="m", start=10, stop=40),
    ]
    m = Manifest("text", units, None, root="s3://bucket/data", text_field="body",
                 history=[{"digest": Manifest("text", units[:1]).digest, "shards": 1,
                           "num_samples": 4}])  # fmt: skip
    assert m.version == 2 and m.num_samples == 13
    ids = [u.identity for u in units]
    assert len(set(ids)) == 3 and units[0].identity != ShardInfo("a/x.tar", 4, 100).identity
    assert m.digest == hashlib.sha256("".join(ids).encode()).hexdigest()
    assert m.shard_url("s3://elsewhere", units[0]) == "s3://bucket/data/a/x.tar"
    assert Manifest("text", units[:1]).shard_url("/ds", units[0]) == "/ds/a/x.tar"
    assert m.prefix(1).digest == m.history[0]["digest"] and m.prefix(1).history == []
    m.save(str(tmp_path))
    back = Manifest.load(str(tmp_path))
    assert back == m and back.shards[2].stop == 40 and back.history == m.history


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda d: d["shards"][0].update(row_group=2), "shards[0].row_group"),
        (lambda d: d["shards"][1].update(stop=5), "shards[1].stop"),
        (lambda d: d["shards"][0].update(format="zip"), "shards[0].format"),
        (lambda d: d["shards"][0].update(members={"jpg": -1}), "shards[0].members"),
        (lambda d: d.update(root=7), "root"),
        (
            lambda d: d["history"].append({"digest": "0" * 64, "shards": 9, "num_samples": 1}),
            "history[0].shards",
        ),  # fmt: skip
        (
            lambda d: d["history"].append({"digest": "0" * 64, "shards": 1, "num_samples": 4}),
            "history[0]: digest",
        ),  # fmt: skip
        (lambda d: d.update(version=1), "shards[0]: expected the keys"),
    ],
)
def test_manifest_v2_validation_names_the_key(tmp_path: Path, edit: Any, key: str) -> None:
    units = [ShardInfo("x.tar", 4, 100, None, version="e1"),
             ShardInfo("y.jsonl", 2, 30, None, format="jsonl", start=10, stop=40)]  # fmt: skip
    d = json.loads(Manifest("text", units, None, root="/data").to_json())
    d["history"] = []
    edit(d)
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(PrepareError, match=key.replace("[", r"\[").replace("]", r"\]")):
        Manifest.load(str(tmp_path))


# -- the header walk ------------------------------------------------------------------------
def test_windowed_walk_matches_the_whole_parse(tmp_path: Path) -> None:
    """GNU long names and pax records across window edges: every window size finds what the
    reader's own parse of the whole file finds."""
    path = tmp_path / "mixed.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for i in range(6):
            for ext, size in (("jpg", 700 + 300 * i), ("txt", 5)):
                name = f"{'d' * 120}/{i:04d}.{ext}" if i % 2 else f"{i:04d}.{ext}"
                info = tarfile.TarInfo(name)
                info.size = size
                if i == 4:
                    info.pax_headers = {"comment": "x" * 3000}  # a pax record over a window
                tf.addfile(info, io.BytesIO(bytes(size)))
    with open(path, "rb") as f:
        whole = list(tar_members(f))
    for window, stride in ((512, 512), (1024, 1024), (512, 1 << 20), (4096, 0), (1 << 20, 0)):
        scan = scan_tar(str(path), path.stat().st_size, window=window, max_window=stride)
        assert len(scan.samples) == 6 and scan.truncated_at is None, window
        assert [e for s in scan.samples for e in s] == [n.rsplit(".", 1)[1] for n, _, _ in whole]
    assert scan_tar(str(path), path.stat().st_size, window=1 << 20).gets == 1
    fixed = scan_tar(str(path), path.stat().st_size, window=1024, max_window=1024).gets
    assert fixed >= 6
    # Over small members the window grows (1, 2, 4, 8, 16 KiB here): fewer reads.
    assert scan_tar(str(path), path.stat().st_size, window=1024).gets == 5 < fixed


# -- img2dataset shards, trained on --------------------------------------------------------
def test_index_on_s3_two_ranks_exactly_once_and_resume(
    bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Streamed by range (the offsets index wrote for its walked shards; spans of a few
    samples), at two ranks and across a resume: the samples whole shards give, each byte
    fetched once; an object changed in place is refused by its ETag, sample by sample."""
    helpers.small_spans(monkeypatch)
    local = write_shards(tmp_path / "shards")
    for f in sorted(local.iterdir()):
        storage.put_file(str(f), f"{bucket}/laion/part-a/{f.name}")
    out = f"{bucket}/index"
    m = index([f"{bucket}/laion/part-a/{{00000..00003}}.tar"], out)
    assert (m.version, m.modality, m.num_samples, len(m.shards)) == (2, "image", 40, 4)
    assert m.root == f"{bucket}/laion/part-a" and m.shards[0].name == "00000.tar"
    assert m.shards[0].members == {"jpg": 10, "json": 10, "txt": 10}
    assert m.extensions == {"jpg": "image", "json": "metadata", "txt": "text"}
    assert all(s.sha256 is None and s.version for s in m.shards)
    assert m.offsets
    for s in m.shards:  # each sample's byte range, as the whole tar's headers say
        found = offsets.decode(
            storage.read_bytes(offsets.url(out, s.identity)), s.identity, s.samples
        )
        with open(local / s.name, "rb") as f:
            want = offsets.from_members(tar_members(f))
        assert found is not None and found.etag == s.version and found.crc32 is None
        assert found.starts.tolist() == want.tolist() and len(want) == 11

    streams = two_ranks(out, tmp_path / "cache")
    keys = steps(streams, streams[0].steps_per_epoch)
    assert not set(keys[0]) & set(keys[1])
    assert sorted(keys[0] + keys[1]) == [f"{i:09d}" for i in range(40)]

    # Streamed by range: each sample's bytes fetched once by the two ranks together, and
    # no whole shard fetched.
    def sample_bytes(name: str) -> int:
        with open(local / name, "rb") as f:
            starts = offsets.from_members(tar_members(f))
        return int(starts[-1] - starts[0])

    fetched = sum(s.summary()["bytes_read"] for s in streams)
    assert fetched == sum(sample_bytes(s.name) for s in m.shards)
    assert not [c for c in os.listdir(tmp_path / "cache") if c.endswith(".tar")]

    # Resume after step 2 of epoch 1: the same continuation as the uninterrupted run.
    steps(streams, 2)
    states = [s.state_dict() for s in streams]
    want = steps(streams, 3)
    resumed = two_ranks(out, tmp_path / "cache")
    for s in resumed:
        s.load_state_dict(states)
    assert steps(resumed, 3) == want
    for s in [*streams, *resumed]:
        s.close()

    # An object rewritten in place with the same size: its ETag names the change.
    data = bytearray((local / "00000.tar").read_bytes())
    data[2000] ^= 0xFF  # inside the first jpg
    storage.write_bytes(f"{bucket}/laion/part-a/00000.tar", bytes(data))
    s = DataStream(out, rank=0, world_size=1, micro_batch_size=40, partitions=1,
                   options=ReaderOptions(cache_dir=str(tmp_path / "cache2")))  # fmt: skip
    assert len(s.next_step()[0]) == 30
    assert s.summary()["skipped/changed_since_indexed"] == 10
    s.close()


def test_truncated_shard_trains_its_complete_samples(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = write_shards(tmp_path / "shards", samples=40, per_shard=10)
    victim = folder / "00002.tar"
    with open(victim, "rb") as f:
        members = list(tar_members(f))
    name, offset, size = next(m for m in members if m[0] == "000000026.jpg")
    with open(victim, "r+b") as f:
        f.truncate(offset + size // 2)
    with caplog.at_level(logging.WARNING, logger="darkmatter.data_pipeline.index"):
        m = index([str(folder)], str(tmp_path / "idx"))
    assert [s.samples for s in m.shards] == [10, 10, 7, 10]
    assert any(f"00002.tar: truncated at byte {offset - 512}" in r.message for r in caplog.records)

    s = DataStream(str(tmp_path / "idx"), rank=0, world_size=1, micro_batch_size=37,
                   partitions=1, options=ReaderOptions(shuffle_buffer=0))  # fmt: skip
    assert s.steps_per_epoch == 1
    keys = [x["__key__"] for x in s.next_step()[0]]
    summary = s.summary()
    s.close()
    assert summary["skipped/truncated_tar"] == 1 and summary["skipped"] == 1
    assert sorted(keys) == [f"{i:09d}" for i in [*range(26), *range(30, 40)]]


def test_text_shards_growth_and_in_place_errors(tmp_path: Path, text_ds: str) -> None:
    import webdataset as wds

    folder = tmp_path / "txt"
    folder.mkdir()
    for shard in range(3):
        with wds.TarWriter(str(folder / f"t-{shard}.tar")) as w:
            for i in range(4):
                w.write({"__key__": f"{shard}-{i}", "txt": f"document {shard} {i}"})
    out = tmp_path / "idx"
    tok = str(Path(text_ds) / "tokenizer.json")
    m = index([str(folder / "t-{0..1}.tar")], str(out), tokenizer=tok)
    assert (m.modality, m.num_samples, m.tokenizer) == ("text", 8, "tokenizer.json")
    assert m.special_tokens == Manifest.load(text_ds).special_tokens
    assert (out / "tokenizer.json").read_text() == Path(tok).read_text()
    first = m.digest

    # Unchanged: nothing written. Grown: a new version listing the old one as its prefix.
    before = (out / "manifest.json").stat().st_mtime_ns
    assert index([str(folder / "t-{0..1}.tar")], str(out)).digest == first
    assert (out / "manifest.json").stat().st_mtime_ns == before
    grown = index([str(folder)], str(out))
    assert grown.num_samples == 12 and grown.history == [
        {"digest": first, "shards": 2, "num_samples": 8}
    ]
    assert grown.prefix(2).digest == first and grown.tokenizer == "tokenizer.json"
    assert Manifest.load(str(out)) == grown
    assert json.loads((out / "manifest.v1.json").read_text())["digest"] == first

    # A shard that changed under the index is refused, naming it; --rebuild starts afresh.
    with wds.TarWriter(str(folder / "t-1.tar")) as w:
        w.write({"__key__": "new", "txt": "changed"})
    with pytest.raises(PrepareError, match=r"t-1\.tar: changed since it was indexed"):
        index([str(folder)], str(out))
    assert index([str(folder)], str(out), rebuild=True).num_samples == 9
    assert ensure_manifest(str(out), str(tmp_path / "unused")) == str(out)
    assert ensure_manifest(str(folder), str(tmp_path / "auto")) == str(tmp_path / "auto")
    assert Manifest.load(str(tmp_path / "auto")).root == str(folder)

    # Indexed into the shards' own folder: no root (the dataset moves with its folder), and
    # the manifest files written there are not inputs the next time.
    here = index([str(folder)], str(folder))
    assert here.root is None and [s.name for s in here.shards] == ["t-0.tar", "t-1.tar", "t-2.tar"]
    assert index([str(folder)], str(folder)) == here


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_shards(tmp_path / "shards", samples=10, per_shard=10,
                          seg=lambda i: b"x", xyz=lambda i: b"y")  # fmt: skip
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "00000.tar").write_bytes(b"PK\x03\x04" + bytes(2000))
    cases = [
        ([str(tmp_path / "nothing-*.tar")], "nothing-*.tar: matches no input file"),
        ([str(tmp_path / "bad")], "00000.tar: not a tar file: bad header checksum at byte 0"),
        (
            [str(folder), "--ext", "jpg=metadata,txt=metadata"],
            "00000.tar: no modality is in every sample (extensions: jpg, json, seg, txt, xyz)",
        ),  # fmt: skip
        ([str(folder), "--ext", "jpg=pictures"], "--ext 'jpg=pictures': expected EXT=MODALITY"),
    ]
    for args, message in cases:
        assert cli([*args, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert err[0].startswith("darkmatter index: error: ")

    proc = subprocess.run(
        [sys.executable, "-m", "darkmatter.cli", "index", str(folder), "--out",
         str(tmp_path / "ok"), "--workers", "2"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "indexed 10 image samples in 1 units" in proc.stdout
    warnings = [ln for ln in proc.stderr.splitlines() if "maps to no modality" in ln]
    assert len(warnings) == 2 and "extension .seg (10 members, first in 00000.tar)" in warnings[0]


# -- sidecar counts ----------------------------------------------------------------------------
def _count_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The URL of every ranged read index makes, in a list that grows as it reads."""
    from darkmatter.data_pipeline import index as index_mod

    reads: list[str] = []
    real = index_mod._read_range

    def counted(fs: Any, path: str, url: str, start: int, end: int) -> bytes:
        reads.append(url.rsplit("/", 1)[-1])
        return real(fs, path, url, start, end)

    monkeypatch.setattr(index_mod, "_read_range", counted)
    return reads


def test_img2dataset_stats_count_on_s3_and_wrong_counts_become_holes(
    bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """img2dataset's <shard>_stats.json ("successes") count the shards: one ranged read each
    instead of a walk. Shard 2's sidecar says one too many, shard 3's one too few: the reader
    makes the missing sample a trailing hole and refuses the shard that holds more."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    local = write_shards(tmp_path / "shards")
    prefix = f"{bucket}/img2dataset"
    for i, f in enumerate(sorted(local.iterdir())):
        storage.put_file(str(f), f"{prefix}/{f.name}")
        stats = {"count": 12, "successes": [10, 10, 11, 9][i], "failed_to_download": 2}
        storage.write_bytes(f"{prefix}/{f.stem}_stats.json", json.dumps(stats).encode())
        status = pa.table({"key": [f"{i}{j:04d}" for j in range(12)], "status": ["success"] * 12})
        pq.write_table(status, tmp_path / "status.parquet")  # img2dataset's per-shard metadata
        storage.put_file(str(tmp_path / "status.parquet"), f"{prefix}/{f.stem}.parquet")
    reads = _count_reads(monkeypatch)
    with caplog.at_level(logging.INFO, logger="darkmatter.data_pipeline.index"):
        m = index([prefix], f"{bucket}/idx")
    assert [s.name for s in m.shards] == [f"0000{i}.tar" for i in range(4)]
    assert [s.samples for s in m.shards] == [10, 10, 11, 9] and m.modality == "image"
    assert m.stats == {"counted_by_sidecar": 3, "walked": 1}
    assert m.shards[0].members == {"jpg": 10, "json": 10, "txt": 10}
    assert [s.members for s in m.shards[1:]] == [None] * 3
    # Offsets only where the headers were walked.
    assert [storage.exists(offsets.url(f"{bucket}/idx", s.identity)) for s in m.shards] == [
        True, False, False, False,
    ]  # fmt: skip
    # The first shard walked to its end, then one read of each of the others.
    assert reads.count("00000.tar") == scan_tar(str(local / "00000.tar"), m.shards[0].bytes).gets
    assert [reads.count(f"0000{i}.tar") for i in (1, 2, 3)] == [1, 1, 1]
    assert "3 of 4 tar shards counted from sidecars (3 by img2dataset _stats.json)" in caplog.text

    s = DataStream(f"{bucket}/idx", rank=0, world_size=1, micro_batch_size=40, partitions=1,
                   options=ReaderOptions(cache_dir=str(tmp_path / "cache")))  # fmt: skip
    keys = [x["__key__"] for x in s.next_step()[0]]
    summary = s.summary()
    s.close()
    assert sorted(keys) == [f"{i:09d}" for i in range(30)]
    assert summary["skipped/truncated_tar"] == 1 and summary["skipped/count_mismatch"] == 9
    # The holes' reasons name the counts.
    too_many, too_few = LocalShard("00002.tar", str(local / "00002.tar"), 11), LocalShard(
        "00003.tar", str(local / "00003.tar"), 9)  # fmt: skip
    for shard in (too_many, too_few):
        shard.index(1 << 20)
    assert too_many.read(10) == Hole("00002.tar", "#10", "truncated tar: 10 of 11 samples present")
    assert too_few.read(0) == Hole(
        "00003.tar", "000000030", "holds 10 samples, the manifest says 9"
    )
    too_many.close()
    too_few.close()


def test_sizes_json_and_wids_index_and_the_exact_modes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    folder = write_shards(tmp_path / "shards", samples=30, per_shard=10)
    (folder / "sizes.json").write_text(json.dumps({"00000.tar": 10, "00001.tar": 10}))
    wids = {"wids_version": 1, "shardlist": [{"url": "00001.tar", "nsamples": 10},
                                            {"url": "00002.tar", "nsamples": 10}]}  # fmt: skip
    (folder / "train.json").write_text(json.dumps(wids))
    reads = _count_reads(monkeypatch)
    with caplog.at_level(logging.INFO, logger="darkmatter.data_pipeline.index"):
        m = index([str(folder)], str(tmp_path / "a"))
    assert m.num_samples == 30 and m.stats == {"counted_by_sidecar": 2, "walked": 1}
    assert "(1 by sizes.json, 1 by wids train.json), their first window read" in caplog.text

    # --sidecar-only reads nothing of the counted shards; --walk reads every header.
    reads.clear()
    assert cli([str(folder), "--out", str(tmp_path / "b"), "--sidecar-only"]) == 0
    assert "00001.tar" not in reads and "00002.tar" not in reads
    assert Manifest.load(str(tmp_path / "b")).stats == {"counted_by_sidecar": 2, "walked": 1}
    assert cli([str(folder), "--out", str(tmp_path / "c"), "--walk"]) == 0
    walked = Manifest.load(str(tmp_path / "c"))
    assert walked.stats == {"counted_by_sidecar": 0, "walked": 3}
    assert [s.samples for s in walked.shards] == [s.samples for s in m.shards]

    # The first shard contradicts its sidecar: no sidecar is trusted.
    (folder / "sizes.json").write_text(json.dumps({"00000.tar": 12, "00001.tar": 10}))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="darkmatter.data_pipeline.index"):
        m = index([str(folder)], str(tmp_path / "d"))
    assert m.stats == {"counted_by_sidecar": 0, "walked": 3}
    assert "00000.tar: its sizes.json says 12 samples, its headers hold 10" in caplog.text

    # A shard that is no tar is still caught by its one read (not with --sidecar-only).
    (folder / "sizes.json").write_text(json.dumps({"00000.tar": 10, "00001.tar": 10}))
    (folder / "00001.tar").write_bytes(b"PK\x03\x04" + bytes(2000))
    with pytest.raises(PrepareError, match=r"00001\.tar: not a tar file"):
        index([str(folder)], str(tmp_path / "e"))
    assert index([str(folder)], str(tmp_path / "f"), counting="sidecar-only").num_samples == 30


# -- the reader's cache of raw units ------------------------------------------------------------
def test_cache_keeps_few_idle_raw_units(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Raw units are held in memory: a slot keeps at most max(2, readahead) of them idle."""
    from darkmatter.data_pipeline.reader import formats
    from darkmatter.data_pipeline.reader.cache import IOStats, ShardCache

    lines = tmp_path / "docs.jsonl"
    lines.write_text("".join(json.dumps({"text": f"line {i} " * 5}) + "\n" for i in range(200)))
    units = formats.index_raw_file(str(lines), "docs.jsonl", "jsonl", "text",
                                   lines.stat().st_size, "v", unit_bytes=500)  # fmt: skip
    m = Manifest("text", units, None, root=str(tmp_path), text_field="text")
    assert len(units) >= 20
    live: set[int] = set()
    real = formats.open_unit

    def tracked(url: str, info: ShardInfo, manifest: Manifest, opts: ReaderOptions) -> Any:
        unit = real(url, info, manifest, opts)
        close, key = unit.close, id(unit)
        live.add(key)
        unit.close = lambda: (live.discard(key), close())  # type: ignore[method-assign]
        return unit

    monkeypatch.setattr(formats, "open_unit", tracked)
    for readahead, bound in ((1, 2), (3, 3)):
        cache = ShardCache(str(tmp_path), m, ReaderOptions(readahead=readahead), IOStats())
        for j in range(len(units)):
            unit = cache.acquire(j)
            assert unit.read(0)["__key__"]
            cache.release(j)
            assert len(live) <= bound
        assert len(live) == bound
        cache.close()
        assert not live


def test_bench_smoke(stack: Any) -> None:
    proc = subprocess.run(  # on the session's stack (the environment names it)
        [sys.executable, "bench/index_shards.py", "--smoke", "--no-stack"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["bench"] == "index_shards" and r["shards"] == r["walk_shards"] == 20
    assert r["index_sidecar_s"] > 0 and r["index_walk_s"] > 0 and r["download_s"] > 0
    assert r["ratio"] == round(r["download_s"] / r["index_sidecar_s"], 2)
    # The walk: one ranged read per sample at most (each jpg outgrows the window), plus the end
    # marker. From sidecars: the first shard walked, then a _stats.json and a read per shard.
    assert 1 <= r["gets_per_shard_walk"] <= r["samples_per_shard"] + 1
    assert r["gets_per_shard_sidecar"] <= 2 + r["gets_per_shard_walk"] / r["shards"] + 1e-9


def test_hugging_face_folder_and_jsonl_index_as_text_units(tmp_path: Path) -> None:
    """A dataset folder as the Hub lays it out: its Parquet files are the data, its README and
    dot files are not; row groups become units, through reader/formats.py."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    hub = tmp_path / "hub"
    (hub / "data").mkdir(parents=True)
    (hub / "README.md").write_text("# a dataset card\n")
    (hub / ".gitattributes").write_text("*.parquet filter=lfs\n")
    for part in range(2):
        table = pa.table({"body": [f"doc {part} {i}" for i in range(30)]})
        pq.write_table(table, hub / "data" / f"train-0000{part}-of-00002.parquet",
                       row_group_size=10)  # fmt: skip
    m = index([str(hub)], str(tmp_path / "idx"), text_field="body")
    assert (m.modality, m.num_samples, m.text_field) == ("text", 60, "body")
    assert [(s.name, s.format, s.row_group) for s in m.shards[:4]] == [
        ("data/train-00000-of-00002.parquet", "parquet", 0),
        ("data/train-00000-of-00002.parquet", "parquet", 1),
        ("data/train-00000-of-00002.parquet", "parquet", 2),
        ("data/train-00001-of-00002.parquet", "parquet", 0),
    ]
    assert m.root == str(hub) and m.extensions is None

    lines = tmp_path / "docs.jsonl"
    lines.write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(25)))
    m = index([str(lines)], str(tmp_path / "idx2"))
    assert (m.num_samples, m.shards[0].format, m.text_field) == (25, "jsonl", "text")


def test_a_recount_changes_the_digest_a_resume_checks() -> None:
    """Without a sha256, a unit is named by (name, size, version, range) and its count: a sidecar
    count corrected by --walk orders the epoch differently, so the digest must differ too."""
    from darkmatter.data_pipeline.manifest import Manifest, ShardInfo

    def manifest(samples: int) -> Manifest:
        info = ShardInfo("00000.tar", samples, 1_000_000, None, version='"etag-1"')
        return Manifest("image", [info], root="s3://b/laion")

    assert manifest(10).digest != manifest(11).digest
    assert manifest(10).digest == manifest(10).digest
