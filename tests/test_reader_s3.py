"""The reader against the real S3 server, and through a proxy that injects 503 SlowDown,
connection resets and truncated bodies: the sample sequence is the fault-free one."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

from darkmatter import storage
from darkmatter.data_pipeline.prepare import Manifest, prepare
from darkmatter.data_pipeline.reader import DataError, DataStream, ReaderOptions
from darkmatter.storage import Retry
from tests import helpers
from tests.faultproxy import FaultProxy


@pytest.fixture(scope="module")
def s3_dataset(stack: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    import boto3

    root = tmp_path_factory.mktemp("s3reader")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(f"line {i} " + "text " * (i % 13) + "\n" for i in range(300)))
    env = stack.env
    boto3.client(
        "s3", endpoint_url=stack.s3_endpoint, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"],
    ).create_bucket(Bucket="reader-faults")  # fmt: skip
    url = "s3://reader-faults/ds"
    m = prepare([str(corpus)], url, modality="text", vocab_size=100, shard_bytes=20_000)
    assert len(m.shards) >= 4
    return url


def sequence(url: str, workers: int, **opts: Any) -> tuple[list[str], dict[str, float]]:
    """One epoch's keys, fetched afresh (a new shard cache folder each time)."""
    opts.setdefault("cache_dir", tempfile.mkdtemp(prefix="darkmatter-test-cache-"))
    opts.setdefault("retry", Retry(base_s=0.01))
    s = DataStream(
        url, rank=0, world_size=1, micro_batch_size=16, num_workers=workers, seed=2,
        partitions=8, options=ReaderOptions(shuffle_buffer=8, **opts),
    )  # fmt: skip
    keys = [x["__key__"] for _ in range(s.steps_per_epoch) for x in s.next_step()[0]]
    s.close()
    shutil.rmtree(opts["cache_dir"])
    return keys, s.summary()


def test_faults_do_not_change_the_sequence(
    s3_dataset: str, stack: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    clean, stats = sequence(s3_dataset, workers=2)
    assert len(clean) == len(set(clean)) == 300 // 8 * 8 // 16 * 16
    assert stats["retries"] == 0 and stats["skipped"] == 0
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore gives up at once: faults reach us
    one = Manifest.load(s3_dataset).shards[1].name

    shards = lambda path: path.endswith(".tar")  # noqa: E731 - only shard reads are faulted
    # Isolated faults: s3fs retries them itself.
    with FaultProxy(stack.s3_endpoint, every=2, match=shards) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        faulty, _ = sequence(s3_dataset, workers=2)
        counts = proxy.counts
    assert faulty == clean
    assert min(counts["slowdown"], counts["reset"], counts["truncate"]) >= 1

    # Persistent faults on one shard (more than s3fs's five tries in a row): our fetch retries.
    for kind in ("slowdown", "reset", "truncate"):
        with FaultProxy(
            stack.s3_endpoint, plan=[kind] * 6, match=lambda path: path.endswith(one)
        ) as proxy:
            monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
            faulty, stats = sequence(s3_dataset, workers=0)
            assert proxy.counts[kind] == 6
        assert faulty == clean, kind
        assert stats["retries"] == 1 and stats["skipped"] == 0, (kind, stats)


def test_a_shard_that_never_comes_back_names_the_url(
    s3_dataset: str, stack: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with FaultProxy(stack.s3_endpoint, every=1, faults=("reset",), match=lambda p: p.endswith(".tar")) as proxy:  # fmt: skip
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        with pytest.raises(DataError, match=r"s3://reader-faults/ds/\S+\.tar failed 3 times"):
            sequence(s3_dataset, workers=0, retry=Retry(attempts=3, base_s=0.01))


def test_missing_shard_in_object_storage_is_a_counted_hole(s3_dataset: str, tmp_path: Path) -> None:
    copy = "s3://reader-faults/copy"
    for url in storage.list_files(s3_dataset):
        rel = url[len(s3_dataset) + 1 :]
        storage.write_bytes(f"{copy}/{rel}", storage.read_bytes(url))
    gone = sorted(u for u in storage.list_files(copy) if u.endswith(".tar"))[0]
    storage.delete(gone)
    keys, stats = sequence(copy, workers=2)
    assert stats["skipped/missing_shard"] == stats["skipped"] > 0
    clean, _ = sequence(s3_dataset, workers=2)
    assert len(keys) == len(clean) - stats["skipped"]
    assert set(keys) < set(clean)


def test_shard_cache_is_shared_verified_and_bounded(s3_dataset: str, tmp_path: Path) -> None:
    """Two workers fetch each shard once between them; a second pass fetches nothing; a cap
    smaller than the dataset keeps the folder under it, and leaves no lock file of an evicted
    shard, without changing the sequence."""
    cache = tmp_path / "cache"
    clean, first = sequence(s3_dataset, workers=2, cache_dir=str(tmp_path / "fresh"))
    size = sum(s.bytes for s in DataStream(s3_dataset, rank=0, world_size=1,
               micro_batch_size=16, partitions=8).manifest.shards)  # fmt: skip
    assert first["bytes_read"] == size  # each shard once, not once per worker

    def keep(**o: Any) -> tuple[list[str], dict[str, float]]:
        s = DataStream(s3_dataset, rank=0, world_size=1, micro_batch_size=16, num_workers=2,
                       seed=2, partitions=8, options=ReaderOptions(shuffle_buffer=8, **o))  # fmt: skip
        keys = [x["__key__"] for _ in range(s.steps_per_epoch) for x in s.next_step()[0]]
        s.close()
        return keys, s.summary()

    keys, stats = keep(cache_dir=str(cache))
    again, stats2 = keep(cache_dir=str(cache))
    assert keys == again == clean and stats["bytes_read"] == size and stats2["bytes_read"] == 0
    cap = size // 3
    capped, _ = keep(cache_dir=str(tmp_path / "small"), cache_bytes=cap)
    assert capped == clean
    held = sum(p.stat().st_size for p in (tmp_path / "small").glob("*.tar"))
    largest = max(s.bytes for s in DataStream(s3_dataset, rank=0, world_size=1,
                  micro_batch_size=16, partitions=8).manifest.shards)  # fmt: skip
    assert held <= cap + largest  # the shard just fetched is never the one evicted
    # Evicted shards take their lock files along. (A shard may lack one: a lock removed in the
    # instant another process opened it is only recreated at the shard's next fetch.)
    tars = {p.name for p in (tmp_path / "small").glob("*.tar")}
    assert {p.name.removesuffix(".lock") for p in (tmp_path / "small").glob("*.lock")} <= tars
    assert len(tars) < len(DataStream(s3_dataset, rank=0, world_size=1, micro_batch_size=16,
                                      partitions=8).manifest.shards)  # fmt: skip


@pytest.fixture
def small_spans(monkeypatch: pytest.MonkeyPatch) -> None:
    helpers.small_spans(monkeypatch)


def stream(
    url: str, cache: str, workers: int = 0, rank: int = 0, world: int = 1, **opts: Any
) -> DataStream:
    return DataStream(
        url, rank=rank, world_size=world, micro_batch_size=16 // world, num_workers=workers,
        seed=2, partitions=8, options=ReaderOptions(shuffle_buffer=8, cache_dir=cache, **opts),
    )  # fmt: skip


def keys_of(s: DataStream, steps: int) -> list[str]:
    return [x["__key__"] for _ in range(steps) for x in s.next_step()[0]]


def test_ranged_reads_start_and_resume_with_the_whole_shards_samples(
    s3_dataset: str, tmp_path: Path, small_spans: None
) -> None:
    """Starts and resumes read the samples their first step needs by range (prepare wrote the
    offsets), at 2 ranks with 2 workers each and across a 2 -> 1 resume: the same samples in
    the same order as whole shards give, the first step fetching a fraction of the dataset."""
    m = Manifest.load(s3_dataset)
    assert m.offsets and storage.exists(f"{s3_dataset}/offsets/{m.shards[0].sha256}.bin")
    size = sum(s.bytes for s in m.shards)
    whole = stream(s3_dataset, str(tmp_path / "whole"), range_reads=False)
    steps = whole.steps_per_epoch
    clean = keys_of(whole, steps)
    whole.close()

    def both(ranks: list[DataStream], n: int) -> list[str]:
        """The global batches of n steps: rank 0's micro-batch, then rank 1's."""
        out: list[str] = []
        for _ in range(n):
            out += [k for r in ranks for k in keys_of(r, 1)]
        return out

    # Two ranks, two workers each, each rank's cache its own (as on two machines).
    at = steps * 2 // 5
    ranks = [stream(s3_dataset, str(tmp_path / f"r{r}"), 2, r, 2) for r in (0, 1)]
    assert sorted(both(ranks, at)) == sorted(clean[: at * 16])
    states = [r.state_dict() for r in ranks]
    rest = both(ranks, steps - at)
    for r in ranks:
        r.close()
    assert sorted(rest) == sorted(clean[at * 16 :])

    # 2 -> 1 at 40% of the epoch, from a cold cache, workers in this process: the first step's
    # pieces carry only what was read by range before the whole shards were let go.
    one = stream(s3_dataset, str(tmp_path / "one"))
    one.load_state_dict(states)
    got = keys_of(one, 1)
    fetched = one.summary()["bytes_read"]
    got += keys_of(one, steps - at - 1)
    one.close()
    assert sorted(got) == sorted(rest) and len(set(got)) == len(got)
    assert 0 < fetched < size / 2, (fetched, size)
    # ...and 2 -> 2, each rank's next step exactly the uninterrupted one.
    again = [stream(s3_dataset, str(tmp_path / f"again{r}"), 2, r, 2) for r in (0, 1)]
    for r in again:
        r.load_state_dict(states)
    assert both(again, steps - at) == rest
    for r in again:
        r.close()


def test_ranged_reads_in_doubt_read_the_whole_shard(
    s3_dataset: str, tmp_path: Path, small_spans: None
) -> None:
    """A torn offsets file, and a shard replaced by other bytes of the same size (its ETag
    changed; one sample's data differs): every sample read through the ranged reader is what
    the whole shard gives, holes included; only the shards in doubt are fetched whole, and a
    clean shard is streamed by range alone."""
    from darkmatter.data_pipeline import offsets
    from darkmatter.data_pipeline.reader.cache import IOStats, ShardCache
    from darkmatter.data_pipeline.reader.ranged import RangedShard

    copy = "s3://reader-faults/doubt"
    for url in storage.list_files(s3_dataset):
        storage.write_bytes(copy + url[len(s3_dataset) :], storage.read_bytes(url))
    m = Manifest.load(copy)
    torn = offsets.url(copy, m.shards[0].identity)
    storage.write_bytes(torn, storage.read_bytes(torn)[:-1])
    changed = m.shards[1]
    found = offsets.decode(
        storage.read_bytes(offsets.url(copy, changed.identity)), changed.identity, changed.samples
    )
    assert found is not None
    data = bytearray(storage.read_bytes(f"{copy}/{changed.name}"))
    data[int(found.starts[3]) + 512] ^= 0xFF  # sample 3's first member's first data byte
    storage.write_bytes(f"{copy}/{changed.name}", bytes(data))

    def samples(shard: int, **opts: Any) -> tuple[list[Any], bool, int]:
        o = ReaderOptions(cache_dir=str(tmp_path / f"{shard}{opts}"), **opts)
        stats = IOStats()
        cache = ShardCache(copy, m, o, stats)
        try:
            unit = cache.acquire(shard)
            out = [unit.read(j) for j in range(m.shards[shard].samples)]
        finally:
            cache.close()
        got = [(x.key, x.reason) if hasattr(x, "reason") else x for x in out]
        return got, isinstance(unit, RangedShard), stats.bytes_read

    for shard in (0, 1, 2):
        whole, _, _ = samples(shard, range_reads=False)
        ranged, view, fetched = samples(shard)
        assert view and ranged == whole, shard
        info = m.shards[shard]
        if shard == 2:  # each sample's bytes once, by range, and nothing in the shard cache
            clean = offsets.decode(
                storage.read_bytes(offsets.url(copy, info.identity)), info.identity, info.samples
            )
            assert clean is not None
            assert fetched == int(clean.starts[-1] - clean.starts[0]) < info.bytes
            assert not list((tmp_path / f"{shard}{{}}").glob("*.tar"))
        else:  # offsets refused: the whole shard (and only it) was fetched
            assert fetched == info.bytes, shard
    assert all(r.startswith("sha256 mismatch") for _, r in samples(1, range_reads=False)[0])


def test_ranged_reads_stop_at_the_end_of_a_partitions_segment(
    s3_dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A partition reading samples [lo, stop) of a shard fetches exactly their bytes: no span,
    however large, reaches into the next partition's samples (another slot's, perhaps on
    another machine), and the segment after it is fetched only when asked for (`ahead`)."""
    from darkmatter.data_pipeline import offsets
    from darkmatter.data_pipeline.reader import ranged
    from darkmatter.data_pipeline.reader.cache import IOStats, ShardCache

    monkeypatch.setattr(ranged, "MIN_SHARD", 0)
    monkeypatch.setattr(ranged, "AHEAD", 1 << 20)  # more than the shard: only the bound stops it
    m = Manifest.load(s3_dataset)
    info = m.shards[0]
    off = offsets.decode(
        storage.read_bytes(offsets.url(s3_dataset, info.identity)), info.identity, info.samples
    )
    assert off is not None and info.samples >= 8
    lo, stop = 2, info.samples // 2
    stats = IOStats()
    cache = ShardCache(s3_dataset, m, ReaderOptions(cache_dir=str(tmp_path)), stats)
    try:
        unit = cache.acquire(0, stop)
        assert all(isinstance(unit.read(j), dict) for j in range(lo, stop))
        assert stats.bytes_read == int(off.starts[stop] - off.starts[lo])
        cache.ahead(0, stop, info.samples)  # the next segment, read by this slot too
        assert all(isinstance(unit.read(j), dict) for j in range(stop, info.samples))
        assert stats.bytes_read == int(off.starts[-1] - off.starts[lo])
    finally:
        cache.close()
    assert not list(tmp_path.glob("*.tar"))  # never fetched whole
