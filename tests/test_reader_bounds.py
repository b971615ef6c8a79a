"""The reader's resources stay bounded: the quarantine keeps a capped number of entries in memory
and the trainer uploads only each interval's new ones; the shard cache evicts least recently
used shards with their lock files (against S3: test_reader_s3.py); a shard evicted before it is opened is fetched again (a loop,
not a recursion); and a pickle member makes its sample a hole, never a call to pickle."""

from __future__ import annotations

import fcntl
import json
import os
import pickle
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from darkmatter.data_pipeline.prepare import Manifest
from darkmatter.data_pipeline.reader import (
    DataError,
    Hole,
    LocalShard,
    Quarantine,
    ReaderOptions,
    decode,
)
from darkmatter.data_pipeline.reader import cache as cache_mod
from tests.test_bad_data import PER_SHARD, SHARDS, _npy, build, key, read_epoch


def holes(n: int, reason: str = "zero-byte shard", start: int = 0) -> list[Hole]:
    return [Hole(f"shard-{i // 10:06d}.tar", f"k{i:05d}", reason) for i in range(start, start + n)]


# -- the quarantine ---------------------------------------------------------------------------


def test_quarantine_counts_everything_and_keeps_only_the_newest_in_memory() -> None:
    q = Quarantine(max_entries=5)
    for h in holes(8) + holes(4, "sha256 mismatch: abc", start=8):
        q.add(h)
    q.add(holes(1)[0])  # seen before (within the cap): not a new entry
    assert len(q) == 12 and dict(q.counts) == {"zero_byte_shard": 8, "sha256_mismatch": 4}
    assert list(q) == (holes(8) + holes(4, "sha256 mismatch: abc", start=8))[-5:]
    assert q.last == holes(4, "sha256 mismatch: abc", start=8)[-1]
    new, unlogged = q.take_new()
    assert new == holes(5) and unlogged == 7  # queued beyond the cap: counted, not kept
    assert q.take_new() == ([], 0)
    q.add(holes(1, start=100)[0])
    assert q.take_new() == (holes(1, start=100), 0) and len(q) == 13


def test_stream_quarantine_is_capped_while_counts_cover_every_hole(tmp_path: Path) -> None:
    url = build(tmp_path)
    (tmp_path / "shard-000001.tar").unlink()
    keys, stream = read_epoch(url, quarantine_entries=3)
    assert len(keys) == (SHARDS - 1) * PER_SHARD
    assert len(stream.quarantine) == PER_SHARD and dict(stream.quarantine.counts) == {
        "missing_shard": PER_SHARD
    }
    assert len(list(stream.quarantine)) == 3
    new, unlogged = stream.quarantine.take_new()
    assert len(new) == 3 and unlogged == PER_SHARD - 3


class Tracker:
    def __init__(self) -> None:
        self.sent: dict[str, str] = {}

    def log_text(self, text: str, artifact_file: str) -> None:
        self.sent[artifact_file] = text


def test_trainer_uploads_only_each_intervals_new_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three log intervals (5 new holes, none, 3): two parts, each exactly its interval's
    entries, so the bytes sent per interval follow the new entries, not the list's length."""
    from darkmatter.trainer import train

    monkeypatch.setattr(train.eng, "gather_to_rank0", lambda obj: [obj])  # one rank
    q = Quarantine(max_entries=4)
    me = SimpleNamespace(stream=SimpleNamespace(quarantine=q), run_dir=tmp_path,
                         tracker=Tracker(), pos=SimpleNamespace(step=0))  # fmt: skip
    for step, new in ((2, holes(3)), (4, []), (6, holes(2, start=3))):
        for h in new:
            q.add(h)
        me.pos.step = step
        train.Trainer._write_quarantine(me)  # type: ignore[arg-type]
    sent = me.tracker.sent
    part2, part6 = "data/quarantine/part-00000002.jsonl", "data/quarantine/part-00000006.jsonl"
    assert sorted(sent) == [part2, part6]
    first = [json.loads(ln) for ln in sent[part2].splitlines()]
    second = [(r["step"], r["rank"], r["key"]) for r in map(json.loads, sent[part6].splitlines())]
    assert [r["key"] for r in first] == ["k00000", "k00001", "k00002"]
    assert second == [(6, 0, "k00003"), (6, 0, "k00004")]
    assert len(sent[part6]) == pytest.approx(2 / 3 * len(sent[part2]), rel=0.05)
    assert (tmp_path / "quarantine.jsonl").read_text() == sent[part2] + sent[part6]
    # More holes in an interval than the reader keeps: the overflow is a count in the log.
    for h in holes(7, start=10):
        q.add(h)
    me.pos.step = 8
    train.Trainer._write_quarantine(me)
    rows = [json.loads(ln) for ln in sent["data/quarantine/part-00000008.jsonl"].splitlines()]
    assert [r.get("key") for r in rows[:4]] == ["k00010", "k00011", "k00012", "k00013"]
    assert rows[4:] == [{"step": 8, "rank": 0, "unlogged": 3}]


# -- the shard cache --------------------------------------------------------------------------


def test_default_cache_folder_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    c = cache_mod.ShardCache(
        "s3://b/ds", Manifest("text", []), ReaderOptions(), cache_mod.IOStats()
    )
    assert c._folder() == str(tmp_path / "xdg" / "darkmatter" / "shards")
    assert (tmp_path / "xdg" / "darkmatter" / "shards").is_dir()


def test_eviction_removes_least_recently_used_shards_with_their_locks(tmp_path: Path) -> None:
    """Shards a..d of 100 bytes, used in that order, under a 250-byte cap with d just fetched:
    a and b go with their locks; a lock with no shard goes unless a fetch holds it."""
    for i, name in enumerate("abcd"):
        (tmp_path / f"{name}.tar").write_bytes(b"x" * 100)
        (tmp_path / f"{name}.tar.lock").touch()
        os.utime(tmp_path / f"{name}.tar", (1000 + i, 1000 + i))
    (tmp_path / "orphan.tar.lock").touch()  # a fetch that found a bad shard
    (tmp_path / "busy.tar.lock").touch()
    with open(tmp_path / "busy.tar.lock") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a fetch under way
        cache_mod._evict(str(tmp_path), cap=250, keep=str(tmp_path / "d.tar"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "busy.tar.lock", "c.tar", "c.tar.lock", "d.tar", "d.tar.lock",
    ]  # fmt: skip


def test_a_shard_evicted_before_it_opens_is_fetched_again_then_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = build(tmp_path)
    real, calls = LocalShard.index, []

    def vanishing(self: LocalShard, cap: int) -> None:
        calls.append(self.name)
        if len(calls) <= 2:
            raise FileNotFoundError(self.path)  # evicted by another process meanwhile
        real(self, cap)

    monkeypatch.setattr(LocalShard, "index", vanishing)
    c = cache_mod.ShardCache(url, Manifest.load(url), ReaderOptions(), cache_mod.IOStats())
    shard = c.acquire(0)
    assert shard.bad is None and shard.read(0)["__key__"] == key(0, 0) and len(calls) == 3
    c.close()

    def gone(self: LocalShard, cap: int) -> None:
        raise FileNotFoundError(self.path)

    monkeypatch.setattr(LocalShard, "index", gone)
    c = cache_mod.ShardCache(url, Manifest.load(url), ReaderOptions(), cache_mod.IOStats())
    with pytest.raises(DataError, match=r"shard-000000\.tar: evicted from the shard cache 5 times"):
        c.acquire(0)
    c.close()


# -- no unpickling ----------------------------------------------------------------------------


class Payload:
    """Unpickling this creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def test_a_pyd_member_quarantines_its_sample_and_is_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    ids = _npy(np.array([2, 11, 3], dtype=np.int32))
    ds = tmp_path / "ds"
    ds.mkdir()
    url = build(ds, special={(2, 4): {"input_ids.npy": ids, "pyd": pickle.dumps(Payload(marker))}})
    keys, stream = read_epoch(url)
    assert len(keys) == SHARDS * PER_SHARD - 1 and key(2, 4) not in keys
    assert list(stream.quarantine) == [Hole("shard-000002.tar", key(2, 4),
                                            f"pickle member: {key(2, 4)}.pyd refused (the reader "
                                            "never unpickles)")]  # fmt: skip
    assert stream.summary()["skipped/pickle_member"] == 1
    raw = {"__key__": "k", "input_ids.npy": ids, "pickle": pickle.dumps(Payload(marker))}
    with pytest.raises(ValueError, match=r"pickle member k\.pickle refused"):
        decode(raw, "text")
    assert not marker.exists()
