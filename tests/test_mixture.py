"""MixtureStream: weighted mixtures of datasets (data.sources), exact and elastic on resume.

Ranks are simulated in this process (W streams with rank r of W, run one after another: ranks
are independent readers). Datasets are written directly as small tar shards and a manifest, local
or s3:// (make_dataset, grow below; tests/test_growth.py uses them too): sample i of dataset
`name` has the key f"{name}-{i:05d}".
Every sample carries `__source__` and `__index__` (k, its index in the source across epochs),
so a source epoch is k // E_s, E_s = P·floor(N_s / P).
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from webdataset import TarWriter

from darkmatter import storage
from darkmatter.data_pipeline.manifest import Manifest, ShardInfo
from darkmatter.data_pipeline.reader import DataError, DataStream, MixtureStream, ReaderOptions
from darkmatter.data_pipeline.reader.mixture import apportion

P, B = 8, 24
SIZES = {"a": 200, "b": 120, "c": 56}
WEIGHTS = {"a": 0.5, "b": 0.3, "c": 0.2}

Run = list[list[tuple[str, int, str]]]  # per rank: (source, k, key) in the order yielded


# -- datasets ------------------------------------------------------------------------------
def _members(i: int, modality: str) -> dict[str, bytes]:
    if modality == "image":
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (4, 4), (i % 256, 0, 0)).save(buf, format="PNG")
        return {"png": buf.getvalue()}
    buf = io.BytesIO()
    np.save(buf, np.array([2, 10 + i % 50, 3], dtype=np.int32))
    return {"input_ids.npy": buf.getvalue()}


def write_shards(
    url: str, name: str, first: int, n: int, per_shard: int = 8, modality: str = "text",
    corrupt: bool = False, shard0: int = 0,
) -> list[ShardInfo]:  # fmt: skip
    """Samples [first, first + n) as shards shard0, shard0 + 1, ... of per_shard samples."""
    infos = []
    for s, lo in enumerate(range(first, first + n, per_shard)):
        count = min(per_shard, first + n - lo)
        buf = io.BytesIO()
        w = TarWriter(buf, encoder=False, mtime=0)
        for i in range(lo, lo + count):
            w.write({"__key__": f"{name}-{i:05d}", **_members(i, modality)})
        w.close()
        data = b"\x00garbage, not a tar\x00" * 40 if corrupt else buf.getvalue()
        shard = f"shard-{shard0 + s:06d}.tar"
        storage.write_bytes(storage.join(url, shard), data)
        infos.append(ShardInfo(shard, count, len(data), hashlib.sha256(data).hexdigest()))
    return infos


def make_dataset(
    url: str, name: str, n: int, per_shard: int = 8, modality: str = "text",
    corrupt: bool = False,
) -> str:  # fmt: skip
    """A dataset of n samples at url; returns url."""
    Manifest(modality, write_shards(url, name, 0, n, per_shard, modality, corrupt), None).save(url)
    return url


def grow(url: str, name: str, n_more: int, per_shard: int = 8) -> Manifest:
    """Append n_more samples as new shards; the new manifest lists the old one in history."""
    old = Manifest.load(url)
    new = write_shards(url, name, old.num_samples, n_more, per_shard, shard0=len(old.shards))
    entry = {"digest": old.digest, "shards": len(old.shards), "num_samples": old.num_samples}
    m = Manifest(old.modality, old.shards + new, None, history=[*old.history, entry])
    m.save(url)
    return m


# -- mixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("mix")
    return {n: make_dataset(str(root / n), n, size) for n, size in SIZES.items()}


def sources(urls: dict[str, str], weights: dict[str, float] = WEIGHTS) -> list[Any]:
    return [(n, urls[n], weights[n]) for n in weights]


def open_rank(srcs: list[Any], rank: int, world: int, workers: int = 0, **kw: Any) -> Any:
    return MixtureStream(
        srcs, rank=rank, world_size=world, micro_batch_size=kw.pop("batch", B) // world,
        num_workers=workers, seed=3, partitions=kw.pop("partitions", P),
        options=ReaderOptions(shuffle_buffer=4, **kw),
    )  # fmt: skip


def run(
    srcs: list[Any], world: int, steps: int, workers: int = 0, resume: Any = None, **kw: Any
) -> tuple[Run, list[dict[str, Any]], list[dict[str, float]]]:
    """Each rank's samples over `steps` steps, its final state and its summary."""
    seqs, states, sums = [], [], []
    for rank in range(world):
        s = open_rank(srcs, rank, world, workers, **kw)
        if resume is not None:
            s.load_state_dict(resume)
        seq = []
        for _ in range(steps):
            for micro in s.next_step():
                seq += [(x["__source__"], x["__index__"], x["__key__"]) for x in micro]
        seqs.append(seq)
        states.append(s.state_dict())
        sums.append(s.summary())
        s.close()
    return seqs, states, sums


def shares(seqs: Run) -> dict[str, float]:
    counts = collections.Counter(src for seq in seqs for src, _, _ in seq)
    total = sum(counts.values())
    return {n: counts[n] / total for n in counts}


def test_apportion_is_exact_in_chunks() -> None:
    # 24 samples in chunks of 4 over shares 0.5/0.3/0.2 from nothing taken: 12, 8, 4.
    assert apportion([0, 0, 0], [0.5, 0.3, 0.2], 24, 4) == [12, 8, 4]
    # A source behind its share catches up first (ties go to the lower index).
    assert apportion([0, 10, 10], [1 / 3, 1 / 3, 1 / 3], 6, 2) == [6, 0, 0]
    assert apportion([0, 0], [0.5, 0.5], 2, 1) == [1, 1]


def test_shares_hold_and_summary_counts_them(three: dict[str, str]) -> None:
    seqs, _, sums = run(sources(three), world=2, steps=60)
    got = shares(seqs)
    for n, w in WEIGHTS.items():
        assert abs(got[n] - w) < 0.01, (n, got)
    for rank, seq in enumerate(seqs):
        counts = collections.Counter(src for src, _, _ in seq)
        for n in WEIGHTS:
            assert sums[rank][f"source/{n}/samples"] == counts[n]
            assert sums[rank][f"source/{n}/skipped"] == 0
        assert sums[rank]["samples"] == len(seq) == 60 * B // 2
    # 60 steps x 24 x 0.2 = 288 samples of c, whose epoch is 56: it is in its epoch 5.
    assert sums[0]["source/c/epoch"] == 288 // 56


def check_epochs(seqs: Run, complete: dict[str, int]) -> None:
    """No key twice within a (source, source epoch); the first complete[s] epochs of s whole."""
    seen: dict[tuple[str, int], list[str]] = collections.defaultdict(list)
    for seq in seqs:
        for src, k, key in seq:
            seen[src, k // (P * (SIZES[src] // P))].append(key)
    for (src, epoch), keys in seen.items():
        assert len(keys) == len(set(keys)), f"{src} epoch {epoch}: a sample twice"
        if epoch < complete.get(src, 0):
            assert len(keys) == P * (SIZES[src] // P), f"{src} epoch {epoch}: samples missing"


@pytest.mark.parametrize("workers", [0, 2])
def test_kill_and_resume_continues_exactly(three: dict[str, str], workers: int) -> None:
    srcs = sources(three)
    whole, _, _ = run(srcs, 2, 14, workers)
    first, states, _ = run(srcs, 2, 6, workers)
    rest, _, _ = run(srcs, 2, 8, workers, resume=states)
    for rank in range(2):
        assert first[rank] + rest[rank] == whole[rank]
    # (a) LitData #199/#233: shares over the resumed part alone still hold.
    got = shares(rest)
    for n, w in WEIGHTS.items():
        assert abs(got[n] - w) < 0.01, (n, got)


def test_elastic_two_ranks_to_one_no_sample_twice_or_skipped(three: dict[str, str]) -> None:
    srcs = sources(three)
    before, states, _ = run(srcs, 2, 11, workers=0)
    after, _, _ = run(srcs, 1, 29, workers=2, resume=states)  # n: 2 -> 2 (1 rank x 2 workers)
    after1, _, _ = run(srcs, 1, 29, workers=0, resume=states)  # n: 2 -> 1
    total = 40 * B
    complete = {n: int(total * w) // (P * (SIZES[n] // P)) for n, w in WEIGHTS.items()}
    assert complete["c"] >= 2 and complete["b"] >= 2
    check_epochs(before + after, complete)
    check_epochs(before + after1, complete)
    for seqs in (before + after, before + after1):
        got = shares(seqs)
        assert all(abs(got[n] - w) < 0.01 for n, w in WEIGHTS.items()), got


def test_small_source_starts_its_next_epoch_without_skewing(tmp_path: Path) -> None:
    # (b) LitData #233: a source of 10 samples weighted 0.5 against a large one.
    urls = {"tiny": make_dataset(str(tmp_path / "tiny"), "tiny", 10, per_shard=3),
            "big": make_dataset(str(tmp_path / "big"), "big", 400)}  # fmt: skip
    srcs = [("tiny", urls["tiny"], 1.0), ("big", urls["big"], 1.0)]
    seqs, _, sums = run(srcs, 2, 40, partitions=2, batch=8)
    got = shares(seqs)
    assert got == {"tiny": 0.5, "big": 0.5}
    tiny = collections.defaultdict(list)
    for src, k, key in (x for seq in seqs for x in seq):
        if src == "tiny":
            tiny[k // 10].append(key)
    assert len(tiny) == 16  # 160 samples of tiny: 16 epochs of its 10
    assert all(sorted(keys) == [f"tiny-{i:05d}" for i in range(10)] for keys in tiny.values())
    big = [key for seq in seqs for src, _, key in seq if src == "big"]
    assert len(big) == len(set(big)) == 160  # the big source never restarts
    assert sums[0]["source/tiny/epoch"] == 16 and sums[0]["source/big/epoch"] == 0


def test_a_source_order_ignores_the_other_sources(three: dict[str, str]) -> None:
    """Renaming or reordering the other sources leaves a source's own sequence unchanged."""

    def of_a(srcs: list[Any]) -> list[str]:
        seqs, _, _ = run(srcs, 1, 10)
        return [key for src, k, key in sorted(seqs[0], key=lambda x: x[1]) if src == "a"]

    base = of_a(sources(three))
    other = of_a([("renamed", three["c"], 0.2), ("a", three["a"], 0.5), ("b", three["b"], 0.3)])
    assert base == other and len(base) == 120


def test_changed_mixture_and_bad_layouts_are_refused(three: dict[str, str]) -> None:
    _, states, _ = run(sources(three), 2, 3)
    s = open_rank(sources(three, {"a": 0.5, "b": 0.2, "c": 0.3}), 0, 1)
    with pytest.raises(ValueError, match="source b had the weight share 0.3, has 0.2 now"):
        s.load_state_dict(states)
    s = open_rank(sources(three, {"a": 0.5, "b": 0.5}), 0, 1)
    with pytest.raises(ValueError, match=r"mixed the sources \['a', 'b', 'c'\].*\['a', 'b'\]"):
        s.load_state_dict(states)
    with pytest.raises(ValueError, match="no state for partitions .* of source a"):
        open_rank(sources(three), 0, 1).load_state_dict(states[:1])
    single = DataStream(three["a"], rank=0, world_size=1, micro_batch_size=B, partitions=P)
    with pytest.raises(ValueError, match="the checkpoint read a mixture"):
        single.load_state_dict(states)
    with pytest.raises(ValueError, match="the checkpoint read one dataset"):
        open_rank(sources(three), 0, 1).load_state_dict([single.state_dict()])
    s = open_rank(sources(three), 0, 1)
    s.load_state_dict(states)
    assert s.step == 3 and s.state_dict()["sources"] == states[0]["sources"] | {
        n: {**states[0]["sources"][n], "parts": {**states[0]["sources"][n]["parts"],
                                                 **states[1]["sources"][n]["parts"]}}
        for n in WEIGHTS
    }  # fmt: skip


def test_mixed_modalities_and_tiny_sources_are_refused(
    three: dict[str, str], tmp_path: Path
) -> None:
    img = make_dataset(str(tmp_path / "img"), "img", 16, modality="image")
    with pytest.raises(ValueError, match=r"not all of one modality: a \(text\), img \(image\)"):
        open_rank([("a", three["a"], 1.0), ("img", img, 1.0)], 0, 1)
    with pytest.raises(ValueError, match="source img .* holds 16 samples, fewer than"):
        open_rank([("img", img, 1.0)], 0, 1, partitions=32)


def test_a_source_of_only_bad_shards_stops_naming_it(three: dict[str, str], tmp_path: Path) -> None:
    bad = make_dataset(str(tmp_path / "bad"), "bad", 16, corrupt=True)
    s = open_rank([("a", three["a"], 0.7), ("bad", bad, 0.3)], 0, 1, partitions=4)
    with pytest.raises(DataError, match=r"source bad \(.*/bad\): its first (\d+) samples were all "
                       r"bad \(not a tar file") as e:  # fmt: skip
        for _ in range(20):
            s.next_step()
    # It stops at the first step after which the rank has taken E_bad = 16 of them (7-8 a step).
    taken = int(e.value.args[0].split("its first ")[1].split()[0])
    assert 16 <= taken < 16 + 8 and s.step == 2
    assert s.summary()["source/bad/skipped"] == taken and s.quarantine.total == 16  # distinct
    s.close()


def test_sources_in_s3_read_as_local_ones(
    three: dict[str, str], bucket: str, tmp_path: Path
) -> None:
    remote = {n: make_dataset(f"{bucket}/{n}", n, size) for n, size in SIZES.items()}
    cache = str(tmp_path / "cache")
    local, _, _ = run(sources(three), 2, 15, workers=2)
    s3, states, sums = run(sources(remote), 2, 12, workers=2, cache_dir=cache)
    assert s3 == [seq[: 12 * B // 2] for seq in local]
    assert sum(s["bytes_read"] for s in sums) > 0 and sum(s["skipped"] for s in sums) == 0
    more, _, _ = run(sources(remote), 2, 3, workers=2, resume=states, cache_dir=cache)
    assert more == [seq[12 * B // 2 :] for seq in local]


def test_the_soak_sample_log_names_each_sample_by_source(
    three: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chaos soak's per-step key log (DARKMATTER_SAMPLE_LOG) is written for mixtures too,
    each key qualified by its source, in the order the rank hands samples out."""
    from darkmatter.data_pipeline.reader import SAMPLE_LOG_ENV

    monkeypatch.setenv(SAMPLE_LOG_ENV, str(tmp_path))
    seqs, _, _ = run(sources(three), world=2, steps=3)
    for rank, seq in enumerate(seqs):
        lines = [json.loads(ln) for ln in (tmp_path / f"samples-rank{rank}.jsonl").open()]
        assert [r["step"] for r in lines] == [0, 1, 2]
        assert [k for r in lines for k in r["keys"]] == [f"{src}/{key}" for src, _, key in seq]
