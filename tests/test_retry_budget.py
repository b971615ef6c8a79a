"""The storage retry budget (`storage.retry`): its schedule and deadline, the errors it never
retries, its config section, and the reader riding out a throttling storm behind the fault proxy
(a "2-minute storm against a 10-minute deadline" scaled down to seconds, same code path) while a
403 fails at once naming the bucket."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from darkmatter import storage
from darkmatter.data_pipeline.prepare import Manifest, prepare
from darkmatter.data_pipeline.reader import DataError, DataStream, ReaderOptions
from darkmatter.storage import Retry, StorageError, with_retries
from darkmatter.trainer.config import ConfigError
from darkmatter.trainer.objectives import load_config
from tests.faultproxy import FaultProxy
from tests.helpers import write_config


class Flaky:
    """A call that raises `error` until `until` (a number of calls or a time.monotonic())."""

    def __init__(self, error: BaseException, calls: int = 10**9, until_s: float = 0.0):
        self.error, self.calls, self.until_s, self.n = error, calls, until_s, 0

    def __call__(self) -> str:
        self.n += 1
        if self.n <= self.calls and (not self.until_s or time.monotonic() < self.until_s):
            raise self.error
        return "done"


def client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")  # fmt: skip


def test_waits_double_up_to_max_s_and_jitter_only_shortens_them() -> None:
    exact = Retry(base_s=0.5, max_s=30.0, jitter=0.0)
    assert [exact.delay(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    r = Retry(base_s=0.5, max_s=30.0, jitter=0.5)
    assert r.delay(3, draw=0.0) == 1.0 and r.delay(3, draw=0.5) == 1.5 and r.delay(3) == 2.0
    assert Retry(jitter=1.0).delay(1, draw=0.0) == 0.0


def test_attempts_cap_the_tries_and_each_retry_is_counted() -> None:
    call, retried = Flaky(OSError("connection reset")), []
    with pytest.raises(StorageError, match=r"^upload of s3://b/k failed 3 times in [\d.]+ s "
                       r"\(storage.retry: attempts=3, deadline_s=600\): connection reset$"):  # fmt: skip
        with_retries(call, "upload of s3://b/k", Retry(attempts=3, base_s=0.001, jitter=0.0),
                     on_retry=lambda: retried.append(1))  # fmt: skip
    assert call.n == 3 and len(retried) == 2
    call = Flaky(OSError("503 SlowDown"), calls=4)
    assert with_retries(call, "x", Retry(attempts=5, base_s=0.001)) == "done" and call.n == 5


def test_the_deadline_ends_a_storm_and_a_shorter_storm_is_ridden_out() -> None:
    policy = Retry(attempts=10**6, base_s=0.02, max_s=0.05, jitter=0.0, deadline_s=0.5)
    t0 = time.monotonic()
    endless = Flaky(OSError("SlowDown"))
    with pytest.raises(StorageError, match=r"failed \d+ times in 0\.\d s .*deadline_s=0.5"):
        with_retries(endless, "fetch of s3://b/k", policy)
    spent = time.monotonic() - t0
    # No try starts past the deadline; the last wait stops short of it.
    assert 0.45 <= spent <= 0.5 + 0.1 and endless.n >= 9
    storm = Flaky(OSError("SlowDown"), until_s=time.monotonic() + 0.3)
    assert with_retries(storm, "fetch of s3://b/k", policy) == "done" and storm.n >= 6


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (PermissionError("Access Denied"), "access to bucket 'b' is denied (403)"),
        (client_error("AccessDenied", 403), "access to bucket 'b' is denied (403)"),
        (client_error("InvalidAccessKeyId", 403),
         "bucket 'b' refused the credentials (InvalidAccessKeyId): check AWS_ACCESS_KEY_ID"),
        (client_error("SignatureDoesNotMatch", 403), "refused the credentials (SignatureDoes"),
        (client_error("NoSuchBucket", 404), "bucket 'b' does not exist"),
    ],
)  # fmt: skip
def test_denied_bad_credentials_and_missing_buckets_fail_at_once(
    error: BaseException, expected: str
) -> None:
    call = Flaky(error)
    with pytest.raises(StorageError, match="^fetch of s3://b/ds/x.tar: ") as info:
        with_retries(call, "fetch of s3://b/ds/x.tar", Retry(base_s=10.0))
    assert expected in str(info.value) and call.n == 1


def test_a_missing_object_is_raised_as_it_is() -> None:
    """Callers decide what a missing object means (a hole, a corrupt checkpoint)."""
    call = Flaky(FileNotFoundError("b/ds/x.tar"))
    with pytest.raises(FileNotFoundError):
        with_retries(call, "fetch of s3://b/ds/x.tar", Retry(base_s=10.0))
    assert call.n == 1
    # The same 404 for a bucket that is gone is the bucket's error, not the object's.
    gone = FileNotFoundError("The specified bucket does not exist")
    gone.__cause__ = client_error("NoSuchBucket", 404)
    with pytest.raises(StorageError, match="bucket 'b' does not exist"):
        with_retries(Flaky(gone), "fetch of s3://b/ds/x.tar", Retry(base_s=10.0))


def test_storage_retry_is_a_config_section_and_the_old_keys_point_to_it(
    tmp_path: Path, text_ds: str
) -> None:
    from darkmatter.trainer.train import make_stream

    path = write_config(tmp_path / "c.yaml", text_ds, tmp_path / "run")
    assert load_config(path).storage.retry == Retry()
    cfg = load_config(path, ["storage.retry.deadline_s=30", "storage.retry.attempts=7"])
    assert cfg.storage.retry == Retry(attempts=7, deadline_s=30.0)
    stream = make_stream(cfg, rank=0, world_size=1)  # the shard fetches' budget is this one
    assert stream.opts.retry is cfg.storage.retry
    stream.close()
    for override, message in (
        ("storage.retry.attempts=0", "storage.retry.attempts: expected >= 1, got 0"),
        ("storage.retry.jitter=1.5", r"storage.retry.jitter: expected in \[0, 1\], got 1.5"),
        ("storage.retry.deadline_s=0", "storage.retry.deadline_s: expected > 0, got 0.0"),
        ("storage.retry.base_s=-1", "storage.retry.base_s: expected >= 0, got -1.0"),
        ("storage.retry.tries=3", "storage.retry.tries: unknown key"),
        ("checkpoint.upload_retries=3", r"checkpoint.upload_retries: replaced by storage.retry"),
        ("data.retries=3", r"data.retries: replaced by storage.retry \(attempts, deadline_s\)"),
    ):
        with pytest.raises(ConfigError, match=f"^{message}"):
            load_config(path, [override])


# -- the reader behind the fault proxy -------------------------------------------------------


@pytest.fixture(scope="module")
def s3_ds(stack: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("retry-budget")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(f"line {i} " + "word " * (i % 11) + "\n" for i in range(200)))
    url = f"s3://budget-{uuid.uuid4().hex[:12]}/ds"
    storage.make_bucket(url)
    m = prepare([str(corpus)], url, modality="text", vocab_size=100, shard_bytes=15_000)
    assert len(m.shards) >= 3
    return url


def read_all(url: str, tmp_path: Path, workers: int = 0, **opts: Any) -> tuple[list[str], Any]:
    cache = tmp_path / f"cache-{uuid.uuid4().hex[:8]}"  # a fresh cache: every shard is fetched
    s = DataStream(url, rank=0, world_size=1, micro_batch_size=8, num_workers=workers, seed=3,
                   partitions=4, options=ReaderOptions(shuffle_buffer=4, cache_dir=str(cache),
                                                       **opts))  # fmt: skip
    try:
        keys = [x["__key__"] for _ in range(s.steps_per_epoch) for x in s.next_step()[0]]
    finally:
        s.close()
    return keys, s.summary()


def is_shard(path: str) -> bool:
    return path.split("?")[0].endswith(".tar")


def test_reader_rides_out_a_throttling_storm_exactly(
    s3_ds: str, stack: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every shard GET answers 503 SlowDown for 3 s (the storm), against a 15 s deadline: the
    epoch is the fault-free one, sample for sample."""
    clean, stats = read_all(s3_ds, tmp_path)
    assert stats["retries"] == 0 and len(clean) == len(set(clean)) > 0
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries off: the storm reaches us
    budget = Retry(attempts=1000, base_s=0.1, max_s=1.0, deadline_s=15.0)
    storm_s = 3.0
    t0 = time.monotonic()
    end = t0 + storm_s
    with FaultProxy(stack.s3_endpoint, every=1, faults=("slowdown",),
                    match=lambda p: is_shard(p) and time.monotonic() < end) as proxy:  # fmt: skip
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        keys, stats = read_all(s3_ds, tmp_path, retry=budget)
        slowdowns = proxy.counts["slowdown"]
    assert keys == clean
    assert time.monotonic() - t0 >= storm_s and slowdowns >= 10
    assert stats["retries"] >= 1 and stats["skipped"] == 0


def test_a_storm_past_the_deadline_fails_naming_the_url(
    s3_ds: str, stack: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with FaultProxy(stack.s3_endpoint, every=1, faults=("slowdown",), match=is_shard) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        t0 = time.monotonic()
        with pytest.raises(DataError, match=rf"^fetch of {s3_ds}/\S+\.tar failed \d+ times in "
                           r"[\d.]+ s \(storage.retry: attempts=1000, deadline_s=2\): "):  # fmt: skip
            read_all(s3_ds, tmp_path, retry=Retry(attempts=1000, base_s=0.1, deadline_s=2.0))
        spent = time.monotonic() - t0
    # The deadline, plus the try under way when it passed (s3fs's own 5 tries take ~2 s).
    assert 2.0 <= spent < 2.0 + 4.0


@pytest.mark.parametrize("workers", [0, 2])
def test_a_403_fails_at_once_naming_the_bucket(
    s3_ds: str, stack: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    """Never retried: each slot asks for a denied shard once. In-process, the whole stream
    fails in under 2 s (with workers, forking them on a loaded machine may take longer)."""
    bucket = s3_ds.split("/")[2]
    shards = len(Manifest.load(s3_ds).shards)
    with FaultProxy(stack.s3_endpoint, deny=lambda method, path: is_shard(path)) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        t0 = time.monotonic()
        with pytest.raises(DataError) as info:
            read_all(s3_ds, tmp_path, workers=workers, retry=Retry(base_s=5.0))
        spent = time.monotonic() - t0
        assert 1 <= proxy.counts["forbidden"] <= shards * max(1, workers)
    if workers == 0:
        assert spent < 2.0, spent
    message = str(info.value)
    assert "\n" not in message
    assert f"{s3_ds}/" in message and f"access to bucket {bucket!r} is denied (403)" in message


def test_nothing_answering_is_an_outage_only_where_something_answered_before(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A stack never started (or a wrong URL) fails at once; a server that answered this process
    # before and stops answering is restarting: that is worth the retry budget.
    from botocore.exceptions import EndpointConnectionError

    from darkmatter.storage import errors, retry

    monkeypatch.setattr(errors, "_answered", set())
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")

    def refused() -> BaseException:
        try:
            try:
                raise ConnectionRefusedError(111, "Connection refused")
            except ConnectionRefusedError as cause:
                raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1") from cause
        except EndpointConnectionError as e:
            return e

    first = errors.describe_storage_error(refused(), "s3://b/k")
    assert first is not None and retry.is_permanent(first)
    assert "http://127.0.0.1:1 (AWS_ENDPOINT_URL)" in str(first)
    assert "`darkmatter stack up` starts it" in str(first)
    errors.mark_answered()
    later = errors.describe_storage_error(refused(), "s3://b/k")
    assert later is not None and not retry.is_permanent(later)
