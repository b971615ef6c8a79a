"""Growable datasets: a resume onto a manifest that grew (its `history` lists the saved version
as a prefix) is refused without data.allow_growth; with it, the epoch in progress ends on the old
shards exactly as the uninterrupted run would, and the new shards join at the next epoch."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import pytest

from darkmatter.data_pipeline.manifest import Manifest
from darkmatter.data_pipeline.reader import DataStream, MixtureStream, ReaderOptions
from tests.test_mixture import grow, make_dataset

P, B = 4, 8  # 48 samples: 6 steps an epoch; grown to 72: 9 steps


def stream(url: str, rank: int = 0, world: int = 1, **kw: Any) -> DataStream:
    return DataStream(
        url, rank=rank, world_size=world, micro_batch_size=B // world, seed=1, partitions=P,
        options=ReaderOptions(shuffle_buffer=4), **kw,
    )  # fmt: skip


def keys(s: Any, steps: int) -> list[list[str]]:
    """The keys of each of the next `steps` steps."""
    return [[x["__key__"] for m in s.next_step() for x in m] for _ in range(steps)]


def test_datastream_grows_at_the_next_epoch(tmp_path: Path) -> None:
    url = make_dataset(str(tmp_path / "ds"), "d", 48)
    ref = stream(url)
    epoch0 = keys(ref, 6)
    assert ref.steps_per_epoch == 6 and len({k for st in epoch0 for k in st}) == 48
    s = stream(url)
    assert keys(s, 3) == epoch0[:3]
    state = s.state_dict()
    grown = grow(url, "d", 24)
    assert grown.history[0]["digest"] == state["dataset_digest"] != grown.digest
    with pytest.raises(ValueError, match=r"ds grew from 6 to 9 shards \(manifest version 1 -> 2\)"
                                         r": set data.allow_growth=true to continue onto it"):  # fmt: skip
        stream(url).load_state_dict([state])
    s = stream(url, allow_growth=True)
    s.load_state_dict([state])
    assert s.steps_per_epoch == 6 and keys(s, 1) == epoch0[3:4]  # the old prefix's order
    second = s.state_dict()  # a second resume, still in the grown run's first epoch
    assert (
        second["dataset_digest"] == grown.digest
        and second["epoch_digest"] == state["dataset_digest"]
    )
    s = stream(url)  # the dataset did not grow since `second`: no allow_growth needed
    s.load_state_dict([second])
    assert keys(s, 2) == epoch0[4:6]  # no sample replayed, the epoch exactly the old one
    epoch1 = keys(s, 9)
    assert s.epoch == 1 and s.steps_per_epoch == 9 and "epoch_digest" not in s.state_dict()
    every = [k for st in epoch1 for k in st]
    assert sorted(every) == [f"d-{i:05d}" for i in range(72)]  # new shards in the next epoch
    s.close()


def test_unknown_digest_is_refused(tmp_path: Path) -> None:
    url = make_dataset(str(tmp_path / "ds"), "d", 48)
    s = stream(url)
    keys(s, 2)
    state = {**s.state_dict(), "dataset_digest": "f" * 64}
    with pytest.raises(ValueError, match="dataset \\(manifest digest\\) was 'fff.*not an earlier"):
        stream(url, allow_growth=True).load_state_dict([state])


def test_mixture_source_grows_at_its_next_epoch(tmp_path: Path) -> None:
    urls = {n: make_dataset(str(tmp_path / n), n, 48) for n in ("x", "y")}

    def mix(**kw: Any) -> MixtureStream:
        return MixtureStream(
            [("x", urls["x"], 1.0), ("y", urls["y"], 1.0)], rank=0, world_size=1,
            micro_batch_size=B, seed=1, partitions=P, options=ReaderOptions(shuffle_buffer=4),
            **kw,
        )  # fmt: skip

    ref = mix()
    ref_x = [k for st in keys(ref, 12) for k in st if k.startswith("x")]  # x's epochs 0 and 1
    s = mix()
    before = [k for st in keys(s, 3) for k in st]
    state = s.state_dict()
    grow(urls["x"], "x", 24)
    with pytest.raises(ValueError, match=r"x grew from 6 to 9 shards.*data.allow_growth=true"):
        mix().load_state_dict([state])
    s = mix(allow_growth=True)
    s.load_state_dict([state])
    after = [k for st in keys(s, 27) for k in st]  # 30 steps x 8: 120 of x, 120 of y
    x = [k for k in before + after if k.startswith("x")]
    assert x[:48] == ref_x[:48]  # x's epoch in progress ends on its old shards, in order
    assert sorted(x[48:120]) == [f"x-{i:05d}" for i in range(72)]  # then all 72, once each
    y = [k for k in before + after if k.startswith("y")]
    assert len(x) == len(y) == 120
    assert set(collections.Counter(y[:96]).values()) == {2} and len(set(y[:96])) == 48
    assert Manifest.load(urls["x"]).num_samples == 72
    s.close()
