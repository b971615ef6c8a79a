"""Bad data: every case is skipped with an exact count and a quarantine entry, or raises in strict
mode naming the shard; pickles are never unpickled and member names never become paths."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from webdataset import TarWriter

from darkmatter.data_pipeline.prepare import Manifest, ShardInfo
from darkmatter.data_pipeline.reader import DataError, DataStream, ReaderOptions

SHARDS, PER_SHARD = 4, 10
SENTINEL = Path("/tmp/darkmatter-test-unpickled")  # a pickle payload would create this file


class _Payload:
    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(SENTINEL), "w"))


def _npy(values: Any, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, values, allow_pickle=allow_pickle)
    return buf.getvalue()


def _png(color: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format="PNG")
    return buf.getvalue()


def key(shard: int, j: int) -> str:
    return f"s{shard}x{j:03d}"


def build(
    root: Path, modality: str = "text", special: dict[tuple[int, int], dict] | None = None
) -> str:  # type: ignore[type-arg]
    """4 shards x 10 samples; `special` replaces the members of given (shard, sample)s."""
    special = special or {}
    infos = []
    for s in range(SHARDS):
        name = f"shard-{s:06d}.tar"
        with open(root / name, "wb") as f:
            w = TarWriter(f, encoder=False, mtime=0)
            for j in range(PER_SHARD):
                if modality == "text":
                    members = {"input_ids.npy": _npy(np.array([2, 10 + j, 3], dtype=np.int32))}
                else:
                    members = {"png": _png((10 * j, 0, 0))}
                w.write({"__key__": key(s, j), **special.get((s, j), members)})
            w.close()
        infos.append(_info(root, name, PER_SHARD))
    Manifest(modality, infos, None).save(str(root))
    return str(root)


def _info(root: Path, name: str, samples: int) -> ShardInfo:
    data = (root / name).read_bytes()
    return ShardInfo(name, samples, len(data), hashlib.sha256(data).hexdigest())


def _rewrite_manifest(root: Path) -> None:
    """Make the manifest describe the shard files as they now are (as if written that way)."""
    m = Manifest.load(str(root))
    infos = [_info(root, s.name, s.samples) for s in m.shards]
    Manifest(m.modality, infos, m.tokenizer).save(str(root))


def read_epoch(url: str, **opts: Any) -> tuple[list[str], DataStream]:
    s = DataStream(
        url, rank=0, world_size=1, micro_batch_size=8, num_workers=0, seed=1, partitions=4,
        options=ReaderOptions(shuffle_buffer=4, **opts),
    )  # fmt: skip
    keys = []
    for _ in range(s.steps_per_epoch):
        for micro in s.next_step():
            keys += [x["__key__"] for x in micro]
    s.close()
    return keys, s


def _cut(root: Path, frac: float) -> None:
    p = root / "shard-000001.tar"
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * frac)])


def _flip_a_data_byte(root: Path) -> None:
    p = root / "shard-000001.tar"
    with tarfile.open(p) as tar:
        m = tar.getmembers()[-1]
    data = bytearray(p.read_bytes())
    data[m.offset_data + m.size - 1] ^= 0xFF
    p.write_bytes(bytes(data))


def _cut_inside_sample_6(root: Path) -> None:
    p = root / "shard-000001.tar"
    with tarfile.open(p) as tar:
        m = next(m for m in tar.getmembers() if m.name.startswith(key(1, 6)))
    p.write_bytes(p.read_bytes()[: m.offset_data + 10])
    _rewrite_manifest(root)


Case = tuple[Callable[[Path], None] | None, dict, dict[str, int], dict[str, Any]]  # type: ignore[type-arg]
CASES: dict[str, Case] = {
    "missing shard": (lambda r: (r / "shard-000001.tar").unlink(), {}, {"missing_shard": 10}, {}),
    "zero-byte shard": (lambda r: _cut(r, 0.0), {}, {"zero_byte_shard": 10}, {}),
    "truncated object": (lambda r: _cut(r, 0.5), {}, {"size_mismatch": 10}, {}),
    "checksum mismatch": (_flip_a_data_byte, {}, {"sha256_mismatch": 10}, {}),
    "truncated tar": (_cut_inside_sample_6, {}, {"truncated_tar": 4}, {}),
    "corrupt member": (None, {(2, 3): {"input_ids.npy": b"\x93NUMPY garbage"}},
                       {"undecodable": 1}, {}),
    "oversized member": (None, {(2, 4): {"input_ids.npy": _npy(np.arange(3, dtype=np.int32)),
                                         "txt": b"x" * 5000}},
                         {"oversized_member": 1}, {"max_member_bytes": 4096}),
    "pickle members": (None, {(0, 5): {"pkl": pickle.dumps(_Payload())},
                              (0, 6): {"input_ids.npy": _npy(np.array([_Payload()], dtype=object),
                                                             allow_pickle=True)}},
                       {"pickle_member": 1, "undecodable": 1}, {}),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_bad_text_data_is_skipped_with_exact_counts(tmp_path: Path, case: str) -> None:
    change, special, expected, opts = CASES[case]
    SENTINEL.unlink(missing_ok=True)
    url = build(tmp_path, special=special)
    if change:
        change(tmp_path)
    keys, stream = read_epoch(url, **opts)
    stats = stream.summary()
    skipped = sum(expected.values())
    assert {k: int(v) for k, v in stats.items() if k.startswith("skipped/")} == {
        f"skipped/{k}": v for k, v in expected.items()
    }
    assert stats["skipped"] == skipped == len(stream.quarantine)
    assert len(keys) == len(set(keys)) == SHARDS * PER_SHARD - skipped
    # Exactly the bad samples are missing: the whole shard, or the named ones.
    every = {key(s, j) for s in range(SHARDS) for j in range(PER_SHARD)}
    if special:
        gone = {key(*where) for where in special}
    elif case == "truncated tar":
        gone = {key(1, j) for j in range(6, PER_SHARD)}
    else:
        gone = {key(1, j) for j in range(PER_SHARD)}
    assert set(keys) == every - gone
    assert {h.shard for h in stream.quarantine} == {f"shard-{int(k[1]):06d}.tar" for k in gone}
    assert not SENTINEL.exists()

    with pytest.raises(DataError, match=r"shard shard-00000\d\.tar, sample \S+: .*data\.strict"):
        read_epoch(url, strict=True, **opts)


def test_undecodable_image_and_hostile_member_names(tmp_path: Path) -> None:
    url = build(
        tmp_path,
        modality="image",
        special={(3, 2): {"png": b"\x89PNG\r\n\x1a\n not really"}, (3, 7): {"jpg": b"\xff\xd8"}},
    )
    keys, stream = read_epoch(url)
    assert dict(stream.stats.skipped) == {"undecodable": 2}
    assert len(keys) == 38 and {h.key for h in stream.quarantine} == {key(3, 2), key(3, 7)}

    # A member named like a path is a key like any other: nothing is written anywhere.
    evil = tmp_path / "evil"
    evil.mkdir()
    with open(evil / "shard-000000.tar", "wb") as f:
        w = TarWriter(f, encoder=False, mtime=0)
        for j in range(8):
            w.write(
                {"__key__": f"../../../../tmp/escape{j}", "input_ids.npy": _npy(np.int32([2, 3]))}
            )
        w.close()
    Manifest("text", [_info(evil, "shard-000000.tar", 8)], None).save(str(evil))
    before = set(os.listdir("/tmp"))
    s = DataStream(str(evil), rank=0, world_size=1, micro_batch_size=8, partitions=1)
    (batch,) = s.next_step()
    assert [x["__key__"] for x in batch].count("../../../../tmp/escape0") == 1
    assert not any(n.startswith("escape") for n in set(os.listdir("/tmp")) - before)
    s.close()


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_index_agrees_with_tarfile(tmp_path: Path, fmt: int) -> None:
    """The reader's own header parser finds what Python's tarfile finds: long names (GNU and
    pax), ustar prefixes, non-ASCII names, empty members, directories skipped."""
    from darkmatter.data_pipeline.reader import tar_members

    path = tmp_path / "t.tar"
    names = ["a.txt", "d/" * 60 + "long.input_ids.npy", "dir/" + "x" * 90 + ".png", "é.txt"]
    if fmt == tarfile.USTAR_FORMAT:
        names = [n for n in names if len(n) < 100 and n.isascii()] + ["p" * 120 + "/q.txt"]
    with tarfile.open(path, "w", format=fmt) as tar:
        d = tarfile.TarInfo("folder")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        for i, name in enumerate(names):
            data = bytes(range(256)) * i
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        expected = [(m.name, m.offset_data, m.size) for m in tar if m.isreg()]
    with open(path, "rb") as f:
        assert list(tar_members(f)) == expected and len(expected) == len(names)
