"""`darkmatter prepare` at scale: work units written by parallel processes (output independent of
--workers), exact dedup, Parquet media columns, audio, resume after an interruption."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile
from PIL import Image

from darkmatter import storage
from darkmatter.data_pipeline.prepare import Manifest, PrepareError, cli, prepare
from darkmatter.data_pipeline.reader import iter_dataset
from tests.helpers import REPO_ROOT
from tests.test_prepare import check_dataset, read_tar

Sample = dict[str, bytes | str]


def text_corpus(src: Path) -> list[tuple[str, Any]]:
    """Four kinds of text input with duplicates within and across files; returns the
    (document, id) pairs prepare must find, in input order, before dedup."""
    src.mkdir()
    docs: list[tuple[str, Any]] = []
    # a.txt: lines of every length, CRLF and lone-CR endings, blank lines, non-ASCII text, so
    # that byte-range boundaries fall everywhere, mid-character included.
    body = b""
    for i in range(360):
        doc = f"line {i % 150} café " + "wörd " * (i % 150 % 11)
        end = "\r\n" if i % 5 == 0 else "\n"
        body += (doc + end + ("   \n" if i % 7 == 0 else "")).encode()
        docs.append((doc.strip(), None))
    body += b"tail one\rtail two"  # no final newline; '\r' ends a line too
    docs += [("tail one", None), ("tail two", None)]
    (src / "a.txt").write_bytes(body)
    # b_cookies: an extension-less fortune file; its second cookie repeats a.txt's line 3.
    (src / "b_cookies").write_text("a cookie\non two lines\n%\nline 3 café wörd wörd wörd\n%\n")
    docs += [("a cookie\non two lines", None), ("line 3 café wörd wörd wörd", None)]
    # c.jsonl: ids kept through --key-field; every third text repeats an earlier one.
    rows = [
        {"text": f"json {i % 40}" if i % 3 else f"line {i % 150} café", "id": f"c{i}"}
        for i in range(120)
    ]
    (src / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    docs += [(r["text"], r["id"]) for r in rows]
    # d.parquet: several row groups, a null and a blank (no documents), repeats of c.jsonl.
    texts = [None if i == 5 else " " if i == 6 else f"json {i % 60}" for i in range(200)]
    pq.write_table(
        pa.table({"text": texts, "id": range(200)}), src / "d.parquet", row_group_size=40
    )
    docs += [(t, i) for i, t in enumerate(texts) if t and t.strip()]
    return docs


def first_occurrences(docs: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    seen: set[str] = set()
    out = []
    for text, ident in docs:
        if text not in seen:
            seen.add(text)
            out.append((text, ident))
    return out


def members(samples: list[Sample]) -> list[tuple[str, Any]]:
    """(txt, json id or None) of text samples."""
    return [
        (
            s["txt"].decode(),  # type: ignore[union-attr]
            json.loads(s["json"])["id"] if "json" in s else None,
        )
        for s in samples
    ]


SMALL = dict(unit_bytes=1500, shard_bytes=24 * 1024)  # many units, several shards each


def test_workers_do_not_change_the_output_and_dedup_is_exact(tmp_path: Path) -> None:
    docs = text_corpus(tmp_path / "src")
    kw: dict[str, Any] = dict(modality="text", key_field="id", dedup=True, **SMALL)
    m1 = prepare([str(tmp_path / "src")], str(tmp_path / "w1"), vocab_size=200, workers=1, **kw)
    assert m1.stats is not None and m1.stats["units"] >= 6
    samples = check_dataset(tmp_path / "w1", m1)
    expected = first_occurrences(docs)
    assert members(samples) == expected
    assert m1.stats["duplicates"] == len(docs) - len(expected) > 100
    assert m1.stats["skipped"] == 0

    # Same tokenizer, two processes: the same shards, byte for byte, and the same manifest.
    tok = str(tmp_path / "w1" / "tokenizer.json")
    m2 = prepare([str(tmp_path / "src")], str(tmp_path / "w2"), tokenizer=tok, workers=2, **kw)
    assert m2 == m1 and m2.digest == m1.digest
    for s in m1.shards:
        assert (tmp_path / "w1" / s.name).read_bytes() == (tmp_path / "w2" / s.name).read_bytes()
    assert m2.run is not None and (m2.run.units, m2.run.written) == (m1.stats["units"],) * 2

    # Without dedup every document is there.
    m3 = prepare(
        [str(tmp_path / "src")],
        str(tmp_path / "all"),
        tokenizer=tok,
        workers=1,
        **{**kw, "dedup": False},
    )
    assert members(check_dataset(tmp_path / "all", m3)) == docs


def png_bytes(color: tuple[int, int, int], size: tuple[int, int] = (5, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (6, 6), color).save(buf, format="JPEG")
    return buf.getvalue()


def test_images_from_parquet_columns(tmp_path: Path) -> None:
    images = [png_bytes((i * 20, 0, 0)) if i % 2 else jpeg_bytes((0, i * 20, 0)) for i in range(9)]
    images[4] = b"not an image"
    raw = pa.table(
        {"img": pa.array(images[:6] + [None], pa.binary()), "name": [f"r{i}" for i in range(7)]}
    )
    pq.write_table(raw, tmp_path / "a.parquet", row_group_size=3)
    # Hugging Face datasets store Image() columns as {bytes, path} structs.
    hf = pa.table(
        {
            "img": [{"bytes": b, "path": f"p{i}"} for i, b in enumerate(images[6:])],
            "name": ["h0", "h1", "h2"],
        }
    )
    pq.write_table(hf, tmp_path / "b.parquet")
    files = [str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")]

    m = prepare(files, str(tmp_path / "ds"), modality="image", image_field="img", key_field="name")
    assert m.stats == {"units": 1, "skipped": 1, "duplicates": 0}
    assert m.run is not None and m.run.skipped_examples == [
        f"{tmp_path / 'a.parquet'} row 4: cannot identify image file"
    ]
    samples = check_dataset(tmp_path / "ds", m)
    keep = [0, 1, 2, 3, 5, 6, 7, 8]  # row 4 is undecodable, the null row is no item
    assert [s.get("png", s.get("jpg")) for s in samples] == [images[i] for i in keep]
    exts = ["png" if i % 2 else "jpg" for i in keep]
    assert [next(k for k in s if k in ("png", "jpg")) for s in samples] == exts
    assert [json.loads(s["json"])["id"] for s in samples] == [
        "r0",
        "r1",
        "r2",
        "r3",
        "r5",
        "h0",
        "h1",
        "h2",
    ]
    decoded = [s["image"] for s in iter_dataset(str(tmp_path / "ds"))]
    assert [im.shape for im in decoded] == [(4, 5, 3) if e == "png" else (6, 6, 3) for e in exts]

    with pytest.raises(PrepareError, match=r"a\.parquet: no column 'image' .*--image-field"):
        prepare(files, str(tmp_path / "x"), modality="image")
    with pytest.raises(
        PrepareError, match=r"a\.parquet: column 'name' holds string, not encoded image bytes"
    ):
        prepare(files, str(tmp_path / "x"), modality="image", image_field="name")
    with pytest.raises(PrepareError, match=r"a\.parquet: no column 'id' for --key-field"):
        prepare(files, str(tmp_path / "x"), modality="image", image_field="img", key_field="id")
    assert not (tmp_path / "x").exists()  # column errors come before anything is written
    with pytest.raises(PrepareError, match=r"cannot decode image .*a\.parquet row 4: "):
        prepare(files, str(tmp_path / "strict"), modality="image", image_field="img", strict=True)
    assert not (tmp_path / "strict" / "manifest.json").exists()


def audio_bytes(fmt: str, frames: int, rate: int = 8000, channels: int = 1) -> bytes:
    buf = io.BytesIO()
    t = np.arange(frames, dtype=np.float32) / rate
    wave = np.stack([0.5 * np.sin(2 * np.pi * 440 * (c + 1) * t) for c in range(channels)], 1)
    soundfile.write(buf, wave, rate, format=fmt, subtype="PCM_16")
    return buf.getvalue()


def test_audio_from_folders_and_parquet(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.wav").write_bytes(audio_bytes("WAV", 800))
    (src / "b.flac").write_bytes(audio_bytes("FLAC", 1200, channels=2))
    (src / "c.wav").write_bytes(b"RIFF\x00\x00 not audio")
    (src / "sub" / "d.flac").write_bytes(audio_bytes("FLAC", 400, rate=16000))
    (src / "notes.txt").write_text("ignored")
    clips = [audio_bytes("WAV", 100 * (i + 1)) for i in range(3)]
    pq.write_table(pa.table({"clip": clips}), src / "sub" / "e.parquet")

    m = prepare([str(src)], str(tmp_path / "ds"), modality="audio", audio_field="clip")
    assert (m.modality, m.num_samples, m.stats) == (
        "audio",
        6,
        {"units": 1, "skipped": 1, "duplicates": 0},
    )
    assert m.run is not None and m.run.skipped_examples[0].startswith(f"{src / 'c.wav'}: ")
    samples = check_dataset(tmp_path / "ds", m)
    order = [src / "a.wav", src / "b.flac", src / "sub" / "d.flac"]
    assert [s.get("wav", s.get("flac")) for s in samples] == [p.read_bytes() for p in order] + clips
    assert [next(k for k in s if k != "__key__") for s in samples] == ["wav", "flac", "flac"] + [
        "wav"
    ] * 3
    decoded = list(iter_dataset(str(tmp_path / "ds")))
    assert [(len(s["audio"]), s["sample_rate"]) for s in decoded] == [
        (800, 8000), (1200, 8000), (400, 16000), (100, 8000), (200, 8000), (300, 8000)
    ]  # fmt: skip

    with pytest.raises(PrepareError, match=f"cannot decode audio {src / 'c.wav'}: "):
        prepare([str(src)], str(tmp_path / "x"), modality="audio", audio_field="clip", strict=True)


def shard_mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}


def test_resume_redoes_only_lost_or_corrupt_units(tmp_path: Path) -> None:
    text_corpus(tmp_path / "src")
    out = tmp_path / "ds"
    kw: dict[str, Any] = dict(modality="text", vocab_size=200, **SMALL)
    m1 = prepare([str(tmp_path / "src")], str(out), workers=1, **kw)
    units = m1.stats["units"] if m1.stats else 0
    by_unit: dict[int, list[str]] = {}
    for s in m1.shards:
        by_unit.setdefault(int(s.name.split("-")[1]), []).append(s.name)
    assert units >= 6 and len(by_unit[2]) >= 2
    tokenizer = (out / "tokenizer.json").read_bytes()
    tok_mtime = (out / "tokenizer.json").stat().st_mtime_ns

    (out / "_progress" / "unit-000001.json").unlink()  # died before its record
    corrupt = out / by_unit[2][1]
    data = bytearray(corrupt.read_bytes())
    data[700] ^= 1  # same size, other sha256
    corrupt.write_bytes(bytes(data))
    (out / by_unit[3][0]).unlink()  # lost shard
    (out / "_progress" / "unit-000004.json").write_text('{"run": "torn')  # torn record
    untouched = {
        n: t
        for n, t in shard_mtimes(out).items()
        if int(n.split("-")[1]) > 4 or n.startswith("shard-000000-")
    }
    time.sleep(0.01)

    m2 = prepare([str(tmp_path / "src")], str(out), workers=2, **kw)
    assert m2 == m1 and m2.digest == m1.digest
    check_dataset(out, m2)
    assert m2.run is not None and (m2.run.reused, m2.run.written) == (units - 4, 4)
    # The trained tokenizer was reused, not retrained; surviving units were not rewritten.
    assert (out / "tokenizer.json").read_bytes() == tokenizer
    assert (out / "tokenizer.json").stat().st_mtime_ns == tok_mtime
    now = shard_mtimes(out)
    assert {n: now[n] for n in untouched} == untouched


def test_killed_prepare_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"document {i} " + "word " * (i % 13) + "\n" for i in range(5000)))
    out = tmp_path / "ds"
    # Powers of two: the CLI's megabytes convert to these byte counts exactly.
    unit_bytes, shard_bytes = 2**12, 2**15
    args = [str(corpus), "--output", str(out), "--modality", "text", "--vocab-size", "150",
            "--unit-size-mb", str(unit_bytes / 2**20), "--shard-size-mb", str(shard_bytes / 2**20),
            "--workers", "1", "--quiet"]  # fmt: skip
    script = "import sys; from data_pipeline.prepare import cli; sys.exit(cli(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO_ROOT)
    first = out / "_progress" / "unit-000000.json"
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "prepare ended before it could be interrupted"
    assert not (out / "manifest.json").exists()
    done = sorted(p.name for p in (out / "_progress").glob("unit-*.json"))
    before = shard_mtimes(out)

    kw: dict[str, Any] = dict(modality="text", unit_bytes=unit_bytes, shard_bytes=shard_bytes)
    m = prepare([str(corpus)], str(out), vocab_size=150, workers=1, **kw)
    check_dataset(out, m)
    assert m.num_samples == 5000 and m.run is not None
    # Every finished unit is reused (the last record may have been torn by the kill).
    assert len(done) - 1 <= m.run.reused <= len(done) and m.run.written >= 1
    now = shard_mtimes(out)
    reused = [n for n in before if int(n.split("-")[1]) < m.run.reused]
    assert reused and all(now[n] == before[n] for n in reused)

    # An uninterrupted run with the same tokenizer gives the same dataset.
    ref = prepare([str(corpus)], str(tmp_path / "ref"), tokenizer=str(out / "tokenizer.json"), **kw)
    assert ref.digest == m.digest and ref.shards == m.shards


def test_changed_inputs_start_afresh_and_leave_nothing_stale(tmp_path: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"first version {i}\n" for i in range(400)))
    out = tmp_path / "ds"
    m1 = prepare([str(corpus)], str(out), modality="text", vocab_size=100, **SMALL)
    corpus.write_text("".join(f"second {i}\n" for i in range(60)))
    m2 = prepare([str(corpus)], str(out), modality="text", vocab_size=100, **SMALL)
    assert m2.run is not None and m2.run.reused == 0
    assert m1.stats and m2.stats and m2.stats["units"] < m1.stats["units"]
    assert [t for t, _ in members(check_dataset(out, m2))] == [f"second {i}" for i in range(60)]
    records = sorted(p.name for p in (out / "_progress").glob("unit-*.json"))
    assert records == [f"unit-{u:06d}.json" for u in range(m2.stats["units"])]


def test_cli_flags_summary_and_progress(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"doc {i % 7}\n" for i in range(30)))
    out = tmp_path / "ds"
    argv = [str(corpus), "--output", str(out), "--modality", "text", "--vocab-size", "60",
            "--shard-samples", "2", "--dedup", "--workers", "1", "--quiet"]  # fmt: skip
    assert cli(argv) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].startswith("prepared 7 text samples in 4 shards (") and lines[0].endswith(
        f"at {out}"
    )
    assert (
        lines[2]
        == "1 work units (1 written, 0 reused); skipped 0 undecodable inputs; removed 23 duplicates"
    )
    assert captured.err == ""
    m = Manifest.load(str(out))
    assert [s.samples for s in m.shards] == [2, 2, 2, 1]
    assert [t for t, _ in members(check_dataset(out, m))] == [f"doc {i}" for i in range(7)]

    # A re-run reuses the unit; with progress on, tqdm writes its bars to stderr.
    m2 = prepare(
        [str(corpus)],
        str(out),
        modality="text",
        vocab_size=60,
        shard_samples=2,
        dedup=True,
        workers=1,
        progress=True,
    )
    assert m2 == m and m2.run is not None and m2.run.reused == 1
    err = capsys.readouterr().err
    assert "hashing" in err and "verifying" in err

    assert cli([str(corpus), "--output", str(out), "--modality", "text", "--workers", "0"]) == 2
    assert (
        capsys.readouterr().err == "darkmatter prepare: error: workers must be at least 1, got 0\n"
    )


def test_s3_parallel_write_and_resume(bucket: str, tmp_path: Path) -> None:
    """Spawned workers write to and verify on S3; the output equals a local single-process one."""
    images = [png_bytes((i * 9 % 256, i, 7), (3 + i % 4, 4)) for i in range(40)]
    pq.write_table(pa.table({"image": images}), tmp_path / "imgs.parquet", row_group_size=5)
    kw: dict[str, Any] = dict(
        modality="image", unit_bytes=1, shard_bytes=2048
    )  # a unit per row group
    local = prepare([str(tmp_path / "imgs.parquet")], str(tmp_path / "local"), workers=1, **kw)
    url = bucket + "/ds"
    m = prepare([str(tmp_path / "imgs.parquet")], url, workers=2, **kw)
    assert m == local and m.stats == {"units": 8, "skipped": 0, "duplicates": 0}
    assert Manifest.load(url) == m
    for s in m.shards:
        assert storage.read_bytes(f"{url}/{s.name}") == (tmp_path / "local" / s.name).read_bytes()
    storage.delete(f"{url}/{m.shards[3].name}")
    again = prepare([str(tmp_path / "imgs.parquet")], url, workers=2, **kw)
    assert again == m and again.run is not None and (again.run.reused, again.run.written) == (7, 1)
    tar = tmp_path / "check.tar"
    tar.write_bytes(storage.read_bytes(f"{url}/{m.shards[3].name}"))
    for sample in read_tar(tar):  # key = unit (a row group of 5) - item
        unit, item = map(int, str(sample["__key__"]).split("-"))
        assert sample["png"] == images[5 * unit + item]
