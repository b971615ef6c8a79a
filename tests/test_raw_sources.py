"""Raw text sources read in place (reader/formats.py): indexing jsonl (also .gz/.zst), text and
Parquet files (a Hugging Face hub layout included) into units, reading them back through
DataStream with tokenization on the fly (the same input_ids prepare writes), exact resume from
the partition state (locally and from the S3 server) and the holes bad input becomes."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from darkmatter import storage
from darkmatter.data_pipeline.manifest import Manifest, PrepareError, ShardInfo
from darkmatter.data_pipeline.reader import DataStream, ReaderOptions, decode
from darkmatter.data_pipeline.reader.formats import detect_format, index_raw_file, open_unit
from darkmatter.data_pipeline.reader.options import DataError, TextSpec, text_spec
from darkmatter.data_pipeline.reader.shards import Hole


def documents(n: int, seed: int = 0) -> list[str]:
    """Varied documents: case, accents, punctuation, CJK, surrounding spaces (normalization)."""
    rng = np.random.default_rng(seed)
    words = ["The", "fox", "Café", "naïve", "ÉCOLE", "river", "東京", "run,", "jumps!", "über",
             "data", "(shard)", "x-ray", "42", "3.14", "don't"]  # fmt: skip
    return [
        (" " if i % 9 == 0 else "") + " ".join(rng.choice(words, rng.integers(3, 20)))
        for i in range(n)
    ]


def write_parquet(path: Path, docs: list[Any], rows: int, **extra: list[Any]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": docs, **extra}), path, row_group_size=rows)
    return path


def write_sources(folder: Path, docs: list[str]) -> list[str]:
    """A jsonl file (with an id field) and a Hugging Face hub layout Parquet file, as written
    by `datasets` (data/<split>-0000i-of-0000n.parquet beside a README.md): half the docs each.
    Returns their names relative to `folder`."""
    half = len(docs) // 2
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"id": i, "text": d}) for i, d in enumerate(docs[:half])]
    (folder / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "README.md").write_text("---\nconfigs: [{config_name: default}]\n---\n")
    write_parquet(folder / "data" / "train-00000-of-00001.parquet", docs[half:], rows=25,
                  id=list(range(half, len(docs))))  # fmt: skip
    return ["a.jsonl", "data/train-00000-of-00001.parquet"]


def index_folder(root: str, names: list[str], out: str, unit_bytes: int = 2000) -> Manifest:
    """What `darkmatter index` writes for these raw files: a manifest at `out`, root = `root`."""
    shards: list[ShardInfo] = []
    for name in names:
        url = storage.join(root, name)
        fs, path = storage.filesystem(url)
        info = fs.info(path)
        version = str(info.get("ETag") or info.get("mtime") or "")
        fmt = detect_format(name)
        assert fmt is not None
        shards += index_raw_file(url, name, fmt, "text", int(info["size"]), version, unit_bytes)
    m = Manifest("text", shards, root=root, text_field="text")
    m.save(out)
    return m


def prepared_ids(ds: Path) -> dict[str, list[int]]:
    """txt -> input_ids of every sample of a prepared dataset (its tar shards read directly)."""
    out: dict[str, list[int]] = {}
    for shard in sorted(ds.glob("shard-*.tar")):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, _, ext = m.name.partition(".")
                f = tar.extractfile(m)
                assert f is not None
                members.setdefault(key, {})[ext] = f.read()
        for sample in members.values():
            ids = np.load(io.BytesIO(sample["input_ids.npy"]), allow_pickle=False)
            out[sample["txt"].decode()] = ids.tolist()
    return out


def unit_samples(m: Manifest, url: str) -> list[dict[str, Any] | Hole]:
    out: list[dict[str, Any] | Hole] = []
    for info in m.shards:
        unit = open_unit(m.shard_url(url, info), info, m, ReaderOptions())
        out += [unit.read(j) for j in range(info.samples)]
        unit.close()
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], Path]:
    """(raw folder, docs, prepared dataset of the same files)."""
    from darkmatter.data_pipeline.prepare import prepare

    root = tmp_path_factory.mktemp("raw")
    docs = documents(220)
    names = write_sources(root / "src", docs)
    (root / "src" / "b.txt").write_text("\n".join(docs[:40]) + "\n\n  \n", encoding="utf-8")
    ds = root / "prepared"
    inputs = [str(root / "src" / n) for n in [*names, "b.txt"]]
    prepare(inputs, str(ds), modality="text", vocab_size=300, text_format="lines", workers=1)
    return root / "src", docs, ds


# -- indexing ---------------------------------------------------------------------------------
def test_index_units_cover_every_document(tmp_path: Path) -> None:
    import zstandard

    docs = documents(150)
    body = ("\n".join(json.dumps({"text": d}) for d in docs) + "\n").encode()
    (tmp_path / "a.jsonl").write_bytes(body)
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(body))
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(body))
    (tmp_path / "a.txt").write_text("\n".join(docs) + "\n\n", encoding="utf-8")
    write_parquet(tmp_path / "en" / "train" / "0000.parquet", docs, rows=40)  # <config>/<split>
    names = ["a.jsonl", "a.jsonl.gz", "a.jsonl.zst", "a.txt", "en/train/0000.parquet"]
    m = index_folder(str(tmp_path), names, str(tmp_path / "ds"), unit_bytes=1000)
    by_file: dict[str, list[ShardInfo]] = {}
    for s in m.shards:
        by_file.setdefault(s.name, []).append(s)
    ranges = by_file["a.jsonl"]
    assert len(ranges) == -(-len(body) // 1000) and sum(s.samples for s in ranges) == 150
    assert [(s.start, s.stop) for s in ranges] == [
        (a, min(a + 1000, len(body))) for a in range(0, len(body), 1000)
    ]
    for name in ("a.jsonl.gz", "a.jsonl.zst"):  # compressed: one whole-file unit
        assert [(s.samples, s.start, s.stop) for s in by_file[name]] == [(150, 0, None)]
    assert sum(s.samples for s in by_file["a.txt"]) == 150  # the blank lines are no documents
    assert [(s.row_group, s.samples) for s in by_file["en/train/0000.parquet"]] == [
        (0, 40), (1, 40), (2, 40), (3, 30)
    ]  # fmt: skip
    assert m.num_samples == 5 * 150 and m.version == 2
    samples = unit_samples(Manifest.load(str(tmp_path / "ds")), str(tmp_path / "ds"))
    assert not [s for s in samples if isinstance(s, Hole)]
    texts = [s["txt"].decode() for s in samples if isinstance(s, dict)]
    # Every file's documents, each once, in file order; text lines are stripped, as prepare does.
    strip = [d.strip() for d in docs]
    assert texts == docs * 3 + strip + docs
    keys = [s["__key__"] for s in samples if isinstance(s, dict)]
    assert len(set(keys)) == len(keys)
    assert keys[150] == "a.jsonl.gz@0" and keys[-1] == "en/train/0000.parquet:3:29"


def test_index_refuses_a_file_without_the_text_column(tmp_path: Path) -> None:
    write_parquet(tmp_path / "good.parquet", ["a b", "c d"], rows=1)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["x"], "id": [1]}), tmp_path / "other.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    (tmp_path / "fake.parquet").write_bytes(b"PAR1 not really")
    (tmp_path / "wrong.jsonl").write_text('{"body": "x"}\n{"text": "y"}\n')
    assert len(index_raw_file(str(tmp_path / "good.parquet"), "good.parquet", "parquet",
                              "text", 0, "")) == 2  # fmt: skip
    cases = {
        "other.parquet": r"other\.parquet: no column 'text' \(columns: \['content', 'id'\]",
        "ints.parquet": r"ints\.parquet: column 'text' holds int64, not strings",
        "fake.parquet": r"fake\.parquet: not a Parquet file",
        "wrong.jsonl": r"wrong\.jsonl: the first record has no field 'text' \(fields: \['body'\]",
    }
    for name, message in cases.items():
        fmt = detect_format(name)
        assert fmt is not None
        with pytest.raises(PrepareError, match=message):
            index_raw_file(str(tmp_path / name), name, fmt, "text", 100, "")
    with pytest.raises(PrepareError, match="input not found"):
        index_raw_file(str(tmp_path / "gone.jsonl"), "gone.jsonl", "jsonl", "text", 1, "")


def test_detect_format() -> None:
    got = [detect_format(n) for n in ("a.jsonl", "b.JSON", "c.jsonl.zst", "d.txt.gz", "e.parquet",
                                      "f.tar", "g.tar.gz", "README.md", "h.ndjson")]  # fmt: skip
    assert got == ["jsonl", "jsonl", "jsonl", "text", "parquet", "tar", None, None, "jsonl"]


# -- tokenization on the fly ------------------------------------------------------------------
def test_on_the_fly_ids_equal_prepared_ids(prepared: tuple[Path, list[str], Path]) -> None:
    src, docs, ds = prepared
    want = prepared_ids(ds)
    # Every document made it into the prepared shards (b.txt's lines stripped).
    assert want.keys() == set(docs) | {d.strip() for d in docs[:40]}
    spec = text_spec(str(ds))  # the folder: its tokenizer.json
    assert spec == text_spec(str(ds / "tokenizer.json"))
    m = index_folder(str(src), ["a.jsonl", "data/train-00000-of-00001.parquet", "b.txt"],
                     str(src.parent / "idx"))  # fmt: skip
    got: dict[str, list[int]] = {}
    for raw in unit_samples(m, str(src.parent / "idx")):
        assert not isinstance(raw, Hole), raw
        ids = decode(raw, "text", text=spec)["input_ids"]
        assert ids.dtype == np.int32 and ids[0] == spec.cls_id and ids[-1] == spec.sep_id
        got[raw["txt"].decode()] = ids.tolist()
    assert len(got) == len(want) and got == want
    with pytest.raises(ValueError, match="set data.tokenizer"):
        decode({"__key__": "k", "txt": b"hello"}, "text")


def test_text_spec_refuses_tokenizers_it_cannot_use(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(
        str(tmp_path / "tokenizer.json")
    )
    with pytest.raises(DataError, match=r"data\.tokenizer: .*tokenizer\.json: tokenizer lacks "
                                        r"special token\(s\) \[PAD\] \[CLS\]"):  # fmt: skip
        text_spec(str(tmp_path))
    with pytest.raises(DataError, match=r"data\.tokenizer: tokenizer not found: .*nowhere"):
        text_spec(str(tmp_path / "nowhere" / "tokenizer.json"))


# -- reading through DataStream: exact resume ------------------------------------------------
def steps(url: str, spec: TextSpec, workers: int, start: int, stop: int,
          state: dict[str, Any] | None = None) -> tuple[list[tuple[str, list[int]]], Any]:  # fmt: skip
    """Steps [start, stop) of the stream (resumed from `state` if given): (key, input_ids) of
    every sample, and the state after them."""
    s = DataStream(
        url, rank=0, world_size=1, micro_batch_size=8, num_workers=workers, seed=3,
        partitions=4, options=ReaderOptions(shuffle_buffer=16, text=spec),
    )  # fmt: skip
    if state is not None:
        s.load_state_dict([state])
    assert s.step == start
    out = [(x["__key__"], x["input_ids"].tolist()) for _ in range(start, stop)
           for x in s.next_step()[0]]  # fmt: skip
    state = s.state_dict()
    assert s.summary()["skipped"] == 0
    s.close()
    return out, state


def test_resume_continues_exactly(prepared: tuple[Path, list[str], Path]) -> None:
    src, docs, ds = prepared
    spec = text_spec(str(ds))
    url = str(src.parent / "mixed")
    index_folder(str(src), ["a.jsonl", "data/train-00000-of-00001.parquet"], url)
    whole, _ = steps(url, spec, 0, 0, 27)  # 220 documents, 4 partitions of 55, batches of 8
    assert len(whole) == 27 * 8 and len({k for k, _ in whole}) == 27 * 8
    want = prepared_ids(ds)
    assert all(ids == want[docs_by_key(src)[k]] for k, ids in whole)
    first, state = steps(url, spec, 0, 0, 10)
    rest, _ = steps(url, spec, 2, 10, 27, json.loads(json.dumps(state)))  # through a file
    assert first + rest == whole


def docs_by_key(src: Path) -> dict[str, str]:
    m = Manifest.load(str(src.parent / "mixed"))
    return {s["__key__"]: s["txt"].decode() for s in unit_samples(m, str(src.parent / "mixed"))
            if isinstance(s, dict)}  # fmt: skip


def test_resume_from_s3_parquet_and_jsonl(
    prepared: tuple[Path, list[str], Path], bucket: str
) -> None:
    src, _, ds = prepared
    spec = text_spec(str(ds))
    names = ["a.jsonl", "data/train-00000-of-00001.parquet"]
    for name in names:
        storage.put_file(str(src / name), f"{bucket}/raw/{name}")
    local = str(src.parent / "mixed-local")
    index_folder(str(src), names, local)
    m = index_folder(f"{bucket}/raw", names, f"{bucket}/ds")
    assert all(s.version for s in m.shards)  # the ETags
    whole, _ = steps(local, spec, 0, 0, 27)
    first, state = steps(f"{bucket}/ds", spec, 2, 0, 12)
    rest, _ = steps(f"{bucket}/ds", spec, 0, 12, 27, state)
    assert first + rest == whole  # the same units, keys and ids as the local copy


# -- bad input --------------------------------------------------------------------------------
def test_bad_input_becomes_holes_named_by_place(tmp_path: Path) -> None:
    good = [d.strip() for d in documents(30, seed=1)]
    lines = [json.dumps({"text": d}) for d in good]
    bad = ['{"text": "cut', json.dumps({"body": "x"}), json.dumps({"text": None}),
           json.dumps({"text": 7}), json.dumps({"text": "  "}), "[1, 2]"]  # fmt: skip
    lines = [json.dumps({"text": "first"})] + bad + lines
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    offsets = np.cumsum([0] + [len(x) + 1 for x in lines]).tolist()
    write_parquet(tmp_path / "p.parquet", ["one", None, *good[:8]], rows=5)
    (tmp_path / "changed.txt").write_text("\n".join(good[:10]) + "\n")
    (tmp_path / "gone.txt").write_text("\n".join(good[:4]) + "\n")
    url = str(tmp_path / "ds")
    m = index_folder(str(tmp_path), ["bad.jsonl", "p.parquet", "changed.txt", "gone.txt"], url,
                     unit_bytes=1 << 20)  # fmt: skip
    # Edited after indexing: one line split in two (same size; an append would not matter: the
    # unit's range ends where the file ended).
    (tmp_path / "changed.txt").write_text("\n".join(good[:10]).replace(" ", "\n", 1) + "\n")
    (tmp_path / "gone.txt").unlink()
    holes = [s for s in unit_samples(m, url) if isinstance(s, Hole)]
    reasons = {h.key: h.reason for h in holes}
    b = offsets
    assert reasons[f"bad.jsonl@{b[1]}"].startswith(f"bad jsonl line: byte {b[1]} of bad.jsonl: ")
    assert reasons[f"bad.jsonl@{b[2]}"] == f"no text field: byte {b[2]} of bad.jsonl has no 'text'"
    assert reasons[f"bad.jsonl@{b[3]}"] == f"null text: byte {b[3]} of bad.jsonl"
    assert reasons[f"bad.jsonl@{b[4]}"] == f"not text: byte {b[4]} of bad.jsonl holds a int"
    assert reasons[f"bad.jsonl@{b[5]}"] == f"empty document: byte {b[5]} of bad.jsonl"
    assert reasons[f"bad.jsonl@{b[6]}"] == (
        f"bad jsonl line: byte {b[6]} of bad.jsonl: a list, not an object"
    )
    assert reasons["p.parquet:0:1"] == "null text: row 1 of row group 0 of p.parquet"
    changed = [h for h in holes if h.shard == "changed.txt"]
    assert len(changed) == 10 and changed[0].reason == (
        "holds 11 samples, the manifest says 10 (changed.txt bytes 0-"
        f"{m.shards[-2].stop} changed since it was indexed)"
    )
    assert [h.reason for h in holes if h.shard == "gone.txt"] == ["missing shard"] * 4
    assert len(holes) == 6 + 1 + 10 + 4


def test_bad_input_counted_in_the_stream(tmp_path: Path, prepared: Any) -> None:
    _, _, ds = prepared
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(28)]
    lines[3], lines[17] = "{oops", json.dumps({"title": "x"})
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    write_parquet(tmp_path / "b.parquet", [f"row {i}" if i != 2 else None for i in range(12)],
                  rows=4)  # fmt: skip
    m = index_folder(str(tmp_path), ["a.jsonl", "b.parquet"], str(tmp_path / "ds"), 100)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"] * 12}), tmp_path / "b.parquet", row_group_size=4)
    s = DataStream(str(tmp_path / "ds"), rank=0, world_size=1, micro_batch_size=40, partitions=1,
                   options=ReaderOptions(text=text_spec(str(ds))))  # fmt: skip
    batch = s.next_step()[0]  # the whole epoch: 40 samples in one step
    assert m.num_samples == 40 and len(batch) == 40 - 2 - 12
    summary = s.summary()
    assert summary["skipped/bad_jsonl_line"] == 1 and summary["skipped/no_text_field"] == 1
    assert summary["skipped/missing_column"] == 12 and summary["skipped"] == 14
    assert any(h.reason.startswith("missing column: no column 'text' in row group 2 of "
                                   "b.parquet (columns: ['body'])") for h in s.quarantine)  # fmt: skip
    s.close()
    strict = DataStream(str(tmp_path / "ds"), rank=0, world_size=1, micro_batch_size=40,
                        partitions=1, options=ReaderOptions(text=text_spec(str(ds)), strict=True))  # fmt: skip
    with pytest.raises(DataError, match=r"shard (a\.jsonl|b\.parquet), sample .*data\.strict"):
        strict.next_step()
    strict.close()


# -- the benchmark ------------------------------------------------------------------------------
def test_bench_raw_text_smoke() -> None:
    import subprocess
    import sys

    from tests.helpers import REPO_ROOT

    out = subprocess.run(
        [sys.executable, "bench/raw_text.py", "--smoke", "--docs", "1500"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["bench"] == "raw_text" and result["docs"] == 1500
    rates = [result[f"{k}_samples_per_s"] for k in ("pretokenized", "jsonl", "parquet")]
    assert min(rates) > 0
    assert result["ratio_jsonl"] == pytest.approx(rates[1] / rates[0], rel=0.01)
    assert result["ratio_parquet"] == pytest.approx(rates[2] / rates[0], rel=0.01)


# -- decode's member lists: mp3 audio, an encoded clip as one member ------------------------------
def test_decode_mp3_and_mp4_members() -> None:
    import soundfile

    rate = 16_000
    wave = 0.3 * np.sin(2 * np.pi * 440 * np.arange(rate) / rate).astype(np.float32)
    buf = io.BytesIO()
    soundfile.write(buf, wave, rate, format="MP3")
    audio = decode({"__key__": "k", "mp3": buf.getvalue()}, "audio")
    assert audio["sample_rate"] == rate and abs(len(audio["audio"]) - rate) < 2_000
    # The decoded tone is the written one (lossy: its pitch and loudness, not its samples).
    spectrum = np.abs(np.fft.rfft(audio["audio"]))
    assert abs(np.argmax(spectrum) * rate / len(audio["audio"]) - 440) < 5
    assert abs(np.sqrt(np.mean(audio["audio"][2000:-2000] ** 2)) - 0.3 / np.sqrt(2)) < 0.03

    av = pytest.importorskip("av")
    gray = [np.full((32, 32, 3), 40 * i, dtype=np.uint8) for i in range(5)]
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for f in gray:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode())
    clip = decode({"__key__": "k", "mp4": buf.getvalue()}, "video")
    assert clip["frames"].shape == (5, 32, 32, 3) and clip["fps"] == 8.0
    assert np.abs(clip["frames"].mean(axis=(1, 2, 3)) - [40 * i for i in range(5)]).max() < 8


def test_a_corrupt_compressed_file_is_a_bad_unit_at_once(tmp_path: Path) -> None:
    body = "".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(50)).encode()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(body))
    m = index_folder(str(tmp_path), ["a.jsonl.gz"], str(tmp_path / "ds"))
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(body)[:-30])  # truncated since
    unit = open_unit(str(tmp_path / "a.jsonl.gz"), m.shards[0], m, ReaderOptions())
    assert unit.bad is not None and unit.bad.startswith("unreadable file: a.jsonl.gz: ")
    with pytest.raises(PrepareError, match=r"a\.jsonl\.gz: cannot decompress: "):
        index_folder(str(tmp_path), ["a.jsonl.gz"], str(tmp_path / "ds"))
