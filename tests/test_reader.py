"""ShardStream: the per-rank/per-worker split of an epoch, its order, and resume at any batch."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pytest

from data_pipeline.prepare import Manifest, prepare
from data_pipeline.reader import ShardStream, make_loader

N = 203  # samples in the dataset: not a multiple of anything below, so a tail is dropped
B = 4  # micro-batch size


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("reader")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(f"document {i} " + "word " * (i % 17) + "\n" for i in range(N)))
    # Small shards of uneven sample counts, so slot ranges straddle shard boundaries.
    m = prepare(
        [str(corpus)], str(root / "ds"), modality="text", vocab_size=100, shard_bytes=50_000
    )
    assert m.num_samples == N and len(m.shards) >= 5
    assert len({s.samples for s in m.shards}) > 1
    return str(root / "ds")


def stream(url: str, **kw: Any) -> ShardStream:
    args: dict[str, Any] = dict(
        rank=0, world_size=1, micro_batch_size=B, num_workers=2, seed=7, shuffle_buffer=16
    )
    return ShardStream(url, **{**args, **kw})


def keys(batches: Iterable[list[dict[str, Any]]]) -> list[list[str]]:
    return [[s["__key__"] for s in batch] for batch in batches]


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_epoch_is_split_without_duplicates(dataset: str, world_size: int, num_workers: int) -> None:
    group = world_size * max(1, num_workers) * B
    usable = N // group * group
    seen: list[str] = []
    per_rank = []
    for rank in range(world_size):
        s = stream(dataset, rank=rank, world_size=world_size, num_workers=num_workers)
        assert s.batches_per_epoch() == usable // (world_size * B)
        batches = list(make_loader(s))
        per_rank.append(len(batches))
        assert all(len(b) == B for b in batches)
        for sample in (x for b in batches for x in b):
            ids = sample["input_ids"]
            assert ids.dtype == np.int32 and ids[0] == 2 and ids[-1] == 3
            assert set(sample) == {"__key__", "input_ids"}
        if num_workers:  # the in-process round-robin is the DataLoader's order
            assert keys(iter(s)) == keys(batches)
        seen += [k for b in keys(batches) for k in b]
    assert per_rank == [usable // (world_size * B)] * world_size
    assert len(seen) == len(set(seen)) == usable


def test_order_is_seeded_and_changes_per_epoch(dataset: str) -> None:
    first = keys(stream(dataset))
    assert keys(stream(dataset)) == first
    assert keys(stream(dataset, seed=8)) != first
    s = stream(dataset)
    s.set_position(1, 0)
    epoch1 = keys(s)
    assert epoch1 != first and len(epoch1) == len(first)
    s.set_position(0, 0)
    assert keys(s) == first


def test_without_shuffle_buffer_samples_follow_the_permuted_shards(dataset: str) -> None:
    s = stream(dataset, num_workers=0, shuffle_buffer=0)
    flat = [k for b in keys(s) for k in b]
    # Keys are "<shard>-<member>": shard runs appear in the epoch's shard order, members in order.
    shard_runs = [int(k.split("-")[0]) for k in flat]
    runs = [x for i, x in enumerate(shard_runs) if i == 0 or shard_runs[i - 1] != x]
    assert runs == s.shard_order(0)[: len(runs)]
    assert flat == sorted(flat, key=lambda k: (runs.index(int(k.split("-")[0])), k))
    assert len(flat) == N // B * B


@pytest.mark.parametrize("where", ["start", "middle", "last", "end"])
def test_resume_under_a_dataloader_continues_the_sequence(dataset: str, where: str) -> None:
    full = keys(stream(dataset, rank=1, world_size=2))  # uninterrupted, in-process
    total = len(full)
    k = {"start": 0, "middle": total // 2 + 1, "last": total - 1, "end": total}[where]
    resumed = stream(dataset, rank=1, world_size=2)
    resumed.set_position(0, k)
    assert keys(make_loader(resumed)) == full[k:]


def test_state_dict_round_trip_and_mismatches(dataset: str) -> None:
    s = stream(dataset, world_size=2)
    s.set_position(3, 5)
    state = s.state_dict()
    assert state == {
        "version": 1,
        "epoch": 3,
        "batches_consumed": 5,
        "dataset_digest": Manifest.load(dataset).digest,
        "seed": 7,
        "world_size": 2,
        "num_workers": 2,
        "micro_batch_size": B,
    }
    fresh = stream(dataset, world_size=2)
    fresh.load_state_dict(state)
    assert (fresh.epoch, fresh.batches_consumed) == (3, 5)
    with pytest.raises(ValueError, match="world_size"):
        stream(dataset, world_size=1).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        stream(dataset, world_size=2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="num_workers"):
        stream(dataset, world_size=2, num_workers=3).load_state_dict(state)
    with pytest.raises(ValueError, match="dataset_digest"):
        fresh.load_state_dict({**state, "dataset_digest": "0" * 64})


def test_too_small_dataset_and_bad_position(dataset: str) -> None:
    with pytest.raises(ValueError, match=rf"{N} samples.*= 400"):
        stream(dataset, world_size=2, micro_batch_size=100)
    s = stream(dataset)
    with pytest.raises(ValueError, match="outside an epoch"):
        s.set_position(0, s.batches_per_epoch() + 1)
