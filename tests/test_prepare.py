"""`darkmatter prepare`: text and image inputs become hashed WebDataset shards plus a manifest.

Parallel writing, resume, dedup, Parquet media and audio: tests/test_prepare_scale.py."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from tokenizers import Tokenizer

from darkmatter import storage
from darkmatter.data_pipeline import offsets
from darkmatter.data_pipeline.prepare import Manifest, PrepareError, cli, prepare
from darkmatter.data_pipeline.reader import DataStream, iter_dataset, tar_members


def read_tar(path: Path) -> list[dict[str, bytes | str]]:
    """Samples of a shard as {__key__, ext: bytes}, grouped like webdataset does."""
    samples: list[dict[str, bytes | str]] = []
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            if not samples or samples[-1]["__key__"] != key:
                samples.append({"__key__": key})
            f = tar.extractfile(m)
            assert f is not None
            samples[-1][ext] = f.read()
    return samples


def check_dataset(out: Path, m: Manifest) -> list[dict[str, bytes | str]]:
    """Manifest on disk == returned one; sizes, counts and hashes match the shard files."""
    assert Manifest.load(str(out)) == m
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["num_samples"] == m.num_samples == sum(s.samples for s in m.shards)
    assert m.digest == hashlib.sha256("".join(s.sha256 for s in m.shards).encode()).hexdigest()
    samples = []
    names = [s.name for s in m.shards]
    assert all(re.fullmatch(r"shard-\d{6}-\d{6}\.tar", n) for n in names), names
    assert names == sorted(set(names))  # (unit, shard) order
    assert sorted(p.name for p in out.glob("*.tar")) == names  # nothing stale or unlisted
    for s in m.shards:
        path = out / s.name
        assert hashlib.sha256(path.read_bytes()).hexdigest() == s.sha256
        assert path.stat().st_size == s.bytes
        shard = read_tar(path)
        assert len(shard) == s.samples
        samples += shard
    keys = [s["__key__"] for s in samples]
    assert len(set(keys)) == len(keys) and not any("." in str(k) for k in keys)
    return samples


def texts(samples: list[dict[str, bytes | str]]) -> list[str]:
    return [s["txt"].decode() for s in samples]  # type: ignore[union-attr]


def test_txt_lines_with_trained_tokenizer(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Hello World\n\n   \nsecond document here\nthe third one\n")
    out = tmp_path / "ds"
    m = prepare([str(corpus)], str(out), modality="text", vocab_size=120)
    assert (m.modality, m.num_samples, len(m.shards), m.tokenizer) == (
        "text",
        3,
        1,
        "tokenizer.json",
    )
    samples = check_dataset(out, m)
    assert texts(samples) == ["Hello World", "second document here", "the third one"]
    assert [s["__key__"] for s in samples] == [
        "000000-00000000",
        "000000-00000001",
        "000000-00000002",
    ]

    tok = Tokenizer.from_str((out / "tokenizer.json").read_text())
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert [tok.token_to_id(t) for t in specials] == [0, 1, 2, 3, 4]
    enc = tok.encode("hello world")
    assert enc.tokens[0] == "[CLS]" and enc.tokens[-1] == "[SEP]" and "hello" in enc.tokens
    for s in samples:
        ids = np.load(io.BytesIO(s["input_ids.npy"]), allow_pickle=False)  # type: ignore[arg-type]
        assert ids.dtype == np.int32
        assert ids.tolist() == tok.encode(s["txt"].decode()).ids  # type: ignore[union-attr]
        assert ids[0] == 2 and ids[-1] == 3

    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast.from_pretrained(str(out))
    assert (hf.pad_token_id, hf.cls_token_id, hf.sep_token_id, hf.mask_token_id) == (0, 2, 3, 4)
    assert hf("Hello World")["input_ids"] == tok.encode("hello world").ids


def test_fortune_format_auto_and_forced_lines(tmp_path: Path) -> None:
    cookies = tmp_path / "cookies"  # extension-less, as Debian's fortune files
    cookies.write_text("first line\n  indented second\n%\nthird\n%\n%\n\nfourth\n")
    m = prepare([str(cookies)], str(tmp_path / "auto"), modality="text", vocab_size=100)
    assert texts(check_dataset(tmp_path / "auto", m)) == [
        "first line\n  indented second",
        "third",
        "fourth",
    ]
    m = prepare(
        [str(cookies)],
        str(tmp_path / "lines"),
        modality="text",
        vocab_size=100,
        text_format="lines",
    )
    assert m.num_samples == 7  # every non-empty line, the three '%' included


def test_jsonl_and_parquet_and_folder_recursion(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    rows = [{"body": "alpha beta"}, {"body": ""}, {"body": "gamma", "other": 1}]
    (src / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    table = pa.table(
        {"body": [f"parquet row {i}" if i != 7 else None for i in range(2500)], "n": range(2500)}
    )
    pq.write_table(table, src / "sub" / "b.parquet", row_group_size=500)
    (src / "sub" / "c.txt").write_text("plain line\n")
    (src / "sub" / "c.dat").write_bytes(b"\x00\x01 binary index, not text")
    (src / ".hidden.txt").write_text("never read\n")

    out = tmp_path / "ds"
    m = prepare([str(src)], str(out), modality="text", text_field="body", vocab_size=150)
    got = texts(check_dataset(out, m))
    # Sorted walk: a.jsonl, sub/b.parquet, sub/c.txt; empty and null texts are skipped.
    assert m.num_samples == 2 + 2499 + 1 == len(got)
    assert got[:3] == ["alpha beta", "gamma", "parquet row 0"]
    assert got[-1] == "plain line" and "parquet row 7" not in got


def test_jsonl_without_the_field_names_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{"title": "no text"}\n')
    with pytest.raises(PrepareError, match=rf"{f}:2: .*'text'"):
        prepare([str(f)], str(tmp_path / "ds"), modality="text")
    assert not (tmp_path / "ds" / "manifest.json").exists()


def test_unusable_inputs_and_tampered_manifest(tmp_path: Path) -> None:
    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "ints.parquet")
    with pytest.raises(PrepareError, match="column 'text' holds int64, not strings"):
        prepare([str(tmp_path / "ints.parquet")], str(tmp_path / "ds"), modality="text")
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(PrepareError, match=f"unsupported input file {tmp_path / 'data.csv'}"):
        prepare([str(tmp_path / "data.csv")], str(tmp_path / "ds"), modality="text")

    (tmp_path / "c.txt").write_text("one\ntwo\n")
    prepare([str(tmp_path / "c.txt")], str(tmp_path / "ds"), modality="text", vocab_size=60)
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    manifest["shards"][0]["samples"] = 5
    (tmp_path / "ds" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PrepareError, match="do not match its shard list"):
        Manifest.load(str(tmp_path / "ds"))


def test_small_shard_bytes_rolls_over_and_is_reproducible(tmp_path: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"document {i} " + "word " * (i % 13) + "\n" for i in range(300)))
    shard_bytes = 40 * 1024
    m1 = prepare([str(corpus)], str(tmp_path / "a"), modality="text", shard_bytes=shard_bytes)
    samples = check_dataset(tmp_path / "a", m1)
    assert len(m1.shards) >= 5 and m1.num_samples == 300
    assert all(s.bytes >= shard_bytes for s in m1.shards[:-1])
    # Keys number the items of a work unit (here one), not the shards.
    assert samples[m1.shards[0].samples]["__key__"] == f"000000-{m1.shards[0].samples:08d}"
    assert texts(samples) == [(f"document {i} " + "word " * (i % 13)).strip() for i in range(300)]

    # Same corpus and tokenizer: byte-identical shards (fixed tar mtime), so the same digest.
    m2 = prepare(
        [str(corpus)],
        f"file://{tmp_path / 'b'}",
        modality="text",
        shard_bytes=shard_bytes,
        tokenizer=str(tmp_path / "a" / "tokenizer.json"),
    )
    assert m2.digest == m1.digest and m2.shards == m1.shards


def test_prepare_twice_from_scratch_is_byte_identical(bucket: str, tmp_path: Path) -> None:
    """Tokenizer training included: the trainer numbers characters in hash-map order, which
    differs between runs (5 trainings of this corpus in one process gave 5 vocabularies) unless
    prepare fixes those ids first. One worker to a folder, two to S3: the same bytes."""
    from tests.helpers import synthetic_corpus

    corpus = synthetic_corpus(tmp_path / "c.txt", n=900)
    local, remote = (
        prepare([str(corpus)], out, modality="text", vocab_size=300, shard_bytes=30_000, workers=w)
        for out, w in ((str(tmp_path / "a"), 1), (f"{bucket}/b", 2))
    )
    assert len(local.shards) >= 3 and remote.digest == local.digest
    for name in ["tokenizer.json", *(s.name for s in local.shards)]:
        assert storage.read_bytes(f"{bucket}/b/{name}") == (tmp_path / "a" / name).read_bytes()


def test_images_keep_their_original_bytes(tmp_path: Path) -> None:
    src = tmp_path / "imgs"
    (src / "sub").mkdir(parents=True)
    Image.new("RGBA", (10, 12), (255, 0, 0, 128)).save(src / "a.png")
    Image.new("L", (7, 5), 200).save(src / "b.jpg")
    Image.new("RGB", (4, 6), (0, 0, 255)).save(src / "sub" / "c.webp", lossless=True)
    Image.new("RGB", (3, 3), (0, 255, 0)).save(src / "sub" / "d.png", format="JPEG")
    good = (src / "a.png").read_bytes()
    (src / "broken.png").write_bytes(good[: len(good) // 2])  # truncated: header decodes, data not
    (src / "noise.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (src / "readme.txt").write_text("not an image")
    out = tmp_path / "ds"
    m = prepare([str(src)], str(out), modality="image")
    assert (m.modality, m.num_samples, m.tokenizer) == ("image", 4, None)
    assert m.stats == {"units": 1, "skipped": 2, "duplicates": 0}
    assert m.run is not None and len(m.run.skipped_examples) == 2
    assert m.run.skipped_examples[0].startswith(f"{src / 'broken.png'}: ")
    assert m.run.skipped_examples[1] == f"{src / 'noise.jpg'}: cannot identify image file"
    samples = check_dataset(out, m)
    # Sorted walk: a.png, b.jpg, (broken.png), (noise.jpg), sub/c.webp, sub/d.png; the member
    # extension follows the detected format, and the bytes are the file's own.
    assert [[k for k in s if k != "__key__"] for s in samples] == [
        ["png"],
        ["jpg"],
        ["webp"],
        ["jpg"],
    ]
    originals = ["a.png", "b.jpg", "sub/c.webp", "sub/d.png"]
    for s, name in zip(samples, originals, strict=True):
        ext = next(k for k in s if k != "__key__")
        assert s[ext] == (src / name).read_bytes()

    images = [s["image"] for s in iter_dataset(str(out))]
    assert [im.shape for im in images] == [(12, 10, 3), (5, 7, 3), (6, 4, 3), (3, 3, 3)]
    assert all(im.dtype == np.uint8 for im in images)
    assert images[0][0, 0].tolist() == [255, 0, 0]
    assert images[2][0, 0].tolist() == [0, 0, 255]

    with pytest.raises(PrepareError, match=f"cannot decode image {src / 'broken.png'}: "):
        prepare([str(src)], str(tmp_path / "strict"), modality="image", strict=True)
    assert not (tmp_path / "strict" / "manifest.json").exists()


@pytest.mark.parametrize(
    "modality,what", [("text", "text documents"), ("image", "images"), ("audio", "audio files")]
)
def test_empty_folder_and_missing_path(
    tmp_path: Path, modality: str, what: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    spools = tmp_path / "tmp"  # where the plan spools its units
    spools.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spools))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PrepareError, match=f"no {what} found in {empty}"):
        prepare([str(empty)], str(tmp_path / "ds"), modality=modality)
    missing = tmp_path / "nope"
    with pytest.raises(PrepareError, match=f"input not found: {missing}"):
        prepare([str(missing)], str(tmp_path / "ds"), modality=modality)
    assert not (tmp_path / "ds").exists()
    assert list(spools.iterdir()) == []  # a failed plan leaves no spool behind


def test_manifest_load_without_dataset(tmp_path: Path) -> None:
    with pytest.raises(
        PrepareError, match=f"no manifest.json at {tmp_path}: run `darkmatter prepare`"
    ):
        Manifest.load(str(tmp_path))


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli([str(empty), "--output", str(tmp_path / "ds"), "--modality", "text"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert (
        err.startswith("darkmatter prepare: error: no text documents found in ")
        and str(empty) in err
    )

    corpus = tmp_path / "c.txt"
    corpus.write_text("one\ntwo\nthree\n")
    out = tmp_path / "ds"
    assert cli([str(corpus), "--output", str(out), "--modality", "text", "--vocab-size", "60"]) == 0
    assert "prepared 3 text samples in 1 shards" in capsys.readouterr().out
    assert Manifest.load(str(out)).num_samples == 3


def test_s3_round_trip(bucket: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"sample number {i}\n" for i in range(150)))
    url = bucket + "/ds"
    m = prepare([str(corpus)], url, modality="text", vocab_size=80, shard_bytes=32 * 1024)
    assert len(m.shards) >= 3
    assert Manifest.load(url) == m
    names = [f.rsplit("/", 1)[1] for f in storage.list_files(url)]
    assert [s.name for s in m.shards] == [n for n in names if n.endswith(".tar")]
    for s in m.shards:
        assert hashlib.sha256(storage.read_bytes(f"{url}/{s.name}")).hexdigest() == s.sha256
    # Each shard's sample offsets beside it, with the object's ETag and each sample's CRC-32;
    # a local prepare writes none.
    assert m.offsets and not prepare([str(corpus)], str(tmp_path / "local"), modality="text",
                                     vocab_size=80, shard_bytes=32 * 1024).offsets  # fmt: skip
    assert not (tmp_path / "local" / offsets.FOLDER).exists()
    for s in m.shards:
        data = storage.read_bytes(f"{url}/{s.name}")
        found = offsets.decode(
            storage.read_bytes(offsets.url(url, s.identity)), s.identity, s.samples
        )
        assert found is not None and found.crc32 is not None
        fs, path = storage.filesystem(f"{url}/{s.name}")
        assert found.etag == offsets.etag_of(fs.info(path)) != ""
        (tmp_path / "shard.tar").write_bytes(data)
        with open(tmp_path / "shard.tar", "rb") as f:
            members = list(tar_members(f))
        assert found.starts.tolist() == offsets.from_members(members).tolist()
        by_key: dict[str, list[bytes]] = {}
        for name, at, size in members:
            by_key.setdefault(name.split(".")[0], []).append(data[at : at + size])
        assert found.crc32.tolist() == [offsets.crc32(parts) for parts in by_key.values()]

    # A prepare of other data into the same place leaves only its own shards' offsets.
    corpus.write_text("".join(f"another sample {i}\n" for i in range(60)))
    m2 = prepare([str(corpus)], url, modality="text", vocab_size=80, shard_bytes=32 * 1024)
    listed = sorted(u.rsplit("/", 1)[1] for u in storage.list_files(f"{url}/{offsets.FOLDER}"))
    assert listed == sorted(f"{s.identity}.bin" for s in m2.shards)
    corpus.write_text("".join(f"sample number {i}\n" for i in range(150)))
    m = prepare([str(corpus)], url, modality="text", vocab_size=80, shard_bytes=32 * 1024)

    # The parent process has used s3fs; forked DataLoader workers must still read the shards.
    keys: list[str] = []
    for rank in range(2):
        stream = DataStream(
            url, rank=rank, world_size=2, micro_batch_size=4, num_workers=2, seed=3, partitions=8
        )
        for _ in range(stream.steps_per_epoch):
            (batch,) = stream.next_step()
            keys += [s["__key__"] for s in batch]
            assert all(s["input_ids"][0] == 2 for s in batch)
        stream.close()
    assert len(keys) == len(set(keys)) == 150 // 8 * 8

    missing = "s3://no-such-bucket-darkmatter/ds"
    with pytest.raises(storage.StorageError, match="no-such-bucket-darkmatter"):
        prepare([str(corpus)], missing, modality="text", vocab_size=80)
    assert cli([str(corpus), "--output", missing, "--modality", "text"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
