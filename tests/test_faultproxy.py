"""The fault-injecting proxy (tests/faultproxy.py) in front of the stack's S3 server: clean
forwarding, each fault as a raw HTTP client sees it, the schedule, and what s3fs makes of it."""

from __future__ import annotations

import errno
import http.client
import os
import socket
import urllib.parse

import pytest

from tests.faultproxy import SLOWDOWN_BODY, FaultProxy, is_object_get

DATA = os.urandom(200_000)


def _fs(endpoint: str):  # type: ignore[no-untyped-def]
    """A fresh s3fs filesystem on `endpoint`, credentials from the env (as storage.py does)."""
    import s3fs

    return s3fs.S3FileSystem(
        client_kwargs={"endpoint_url": endpoint},
        use_listings_cache=False,
        skip_instance_cache=True,
    )


def _put(stack, bucket: str, key: str, data: bytes = DATA) -> str:  # type: ignore[no-untyped-def]
    """Write an object straight to the S3 server (not through a proxy); its path in the fs."""
    path = f"{bucket.removeprefix('s3://')}/{key}"
    _fs(stack.s3_endpoint).pipe_file(path, data)
    return path


def _presigned(endpoint: str, path: str, method: str = "get_object") -> str:
    """Path and query of a presigned URL at `endpoint` for `path` (bucket/key, or a bucket)."""
    import boto3

    bucket, _, key = path.partition("/")
    params = {"Bucket": bucket, "Key": key} if key else {"Bucket": bucket}
    from botocore.config import Config

    # SigV4: boto3 presigns S3 with SigV2 by default, which servers need not take for a listing
    # (SeaweedFS refuses it; AWS has deprecated SigV2).
    client = boto3.client("s3", endpoint_url=endpoint, config=Config(signature_version="s3v4"))
    url = client.generate_presigned_url(method, Params=params)
    parts = urllib.parse.urlsplit(url)
    return f"{parts.path}?{parts.query}"


def _conn(proxy: FaultProxy) -> http.client.HTTPConnection:
    parts = urllib.parse.urlsplit(proxy.url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)


# --------------------------------------------------------------------------- clean forwarding


def test_clean_proxy_is_transparent_to_s3fs(stack, bucket: str) -> None:
    path = _put(stack, bucket, "dir/obj.bin")
    with FaultProxy(stack.s3_endpoint) as proxy:
        assert proxy.url.startswith("http://127.0.0.1:")
        fs = _fs(proxy.url)
        assert fs.cat_file(path) == DATA
        assert fs.cat_file(path, start=1000, end=150_000) == DATA[1000:150_000]
        with fs.open(path, "rb", cache_type="none") as f:
            assert f.read(70_000) + f.read() == DATA
        assert fs.ls(f"{bucket.removeprefix('s3://')}/dir") == [path]
        # Writes go through too (PUT, and the multipart POST/PUT/POST of a bigger file).
        fs.pipe_file(path + ".copy", DATA)
        big = os.urandom(6 << 20)
        with fs.open(path + ".big", "wb", block_size=5 << 20) as f:
            f.write(big)
        fs.rm_file(path + ".copy")
        counts = proxy.counts
    direct = _fs(stack.s3_endpoint)
    assert direct.cat_file(path + ".big") == big
    assert not direct.exists(path + ".copy")
    assert counts["forwarded"] == counts["requests"] > counts["candidates"] >= 3
    assert counts["slowdown"] == counts["reset"] == counts["truncate"] == 0
    assert counts["upstream_errors"] == 0


def test_chunked_request_body_and_keep_alive(stack, bucket: str) -> None:
    path = f"{bucket.removeprefix('s3://')}/chunked.bin"
    with FaultProxy(stack.s3_endpoint) as proxy:
        conn = _conn(proxy)
        put = _presigned(proxy.url, path, "put_object")
        conn.request("PUT", put, body=iter([DATA[:1000], DATA[1000:]]), encode_chunked=True)
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200
        # Same connection, kept alive: the object reads back whole.
        conn.request("GET", _presigned(proxy.url, path))
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, DATA)
        conn.close()
        assert proxy.counts["forwarded"] == 2
    assert _fs(stack.s3_endpoint).cat_file(path) == DATA


# --------------------------------------------------------------------------- each fault, raw


def test_slowdown_is_a_503_with_the_s3_error_body(stack, bucket: str) -> None:
    path = _put(stack, bucket, "obj.bin")
    with FaultProxy(stack.s3_endpoint, plan=["slowdown"]) as proxy:
        conn = _conn(proxy)
        conn.request("GET", _presigned(proxy.url, path))
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 503
        assert resp.getheader("Content-Type") == "application/xml"
        assert int(resp.getheader("Content-Length")) == len(body) == len(SLOWDOWN_BODY)
        assert b"<Code>SlowDown</Code>" in body
        assert b"<Message>Please reduce your request rate.</Message>" in body
        assert proxy.counts["forwarded"] == 0  # never reached the server
        # The connection stays usable; the plan is spent, so the next GET is clean.
        conn.request("GET", _presigned(proxy.url, path))
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, DATA)
        conn.close()
        counts = proxy.counts
    assert counts["slowdown"] == 1 and counts["reset"] == counts["truncate"] == 0
    assert counts["candidates"] == counts["requests"] == 2
    assert counts["forwarded"] == 1
    [(kind, where)] = proxy.injected
    assert kind == "slowdown" and where.startswith(f"/{path}?")


def test_reset_aborts_the_connection_after_the_headers(stack, bucket: str) -> None:
    path = _put(stack, bucket, "obj.bin")
    with FaultProxy(stack.s3_endpoint, plan=["reset"]) as proxy:
        conn = _conn(proxy)
        conn.request("GET", _presigned(proxy.url, path))
        resp = conn.getresponse()
        assert resp.status == 200
        assert int(resp.getheader("Content-Length")) == len(DATA)
        with pytest.raises(ConnectionResetError):
            resp.read()
        conn.close()
        counts = proxy.counts
    assert counts["reset"] == 1 and counts["slowdown"] == counts["truncate"] == 0
    assert counts["forwarded"] == counts["candidates"] == 1


def test_truncate_sends_half_the_body_then_closes(stack, bucket: str) -> None:
    path = _put(stack, bucket, "obj.bin")
    with FaultProxy(stack.s3_endpoint, plan=["truncate", "truncate"]) as proxy:
        conn = _conn(proxy)
        conn.request("GET", _presigned(proxy.url, path))
        resp = conn.getresponse()
        assert resp.status == 200
        assert int(resp.getheader("Content-Length")) == len(DATA)
        with pytest.raises(http.client.IncompleteRead) as err:
            resp.read()
        assert err.value.partial == DATA[: len(DATA) // 2]
        conn.close()
        # On the wire: headers, half the body, then a clean EOF (FIN, not a reset).
        host, port = urllib.parse.urlsplit(proxy.url).netloc.split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            target = _presigned(proxy.url, path).encode()
            sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: " + f"{host}:{port}".encode())
            sock.sendall(b"\r\n\r\n")
            raw = b""
            while chunk := sock.recv(65536):
                raw += chunk
        head, _, body = raw.partition(b"\r\n\r\n")
        assert f"content-length: {len(DATA)}".encode() in head.lower()
        assert body == DATA[: len(DATA) // 2]
        counts = proxy.counts
    assert counts["truncate"] == 2 and counts["slowdown"] == counts["reset"] == 0
    assert counts["forwarded"] == 2


# --------------------------------------------------------------------------- schedule


def test_only_object_gets_are_candidates() -> None:
    assert is_object_get("GET", "/bucket/key")
    assert is_object_get("GET", "/bucket/dir/key.tar?X-Amz-Signature=abc")
    assert not is_object_get("GET", "/bucket")
    assert not is_object_get("GET", "/bucket/?list-type=2&prefix=dir/")
    assert not is_object_get("GET", "/")
    assert not is_object_get("HEAD", "/bucket/key")
    assert not is_object_get("PUT", "/bucket/key")


def test_every_nth_candidate_gets_the_next_fault_up_to_the_cap(stack, bucket: str) -> None:
    path = _put(stack, bucket, "obj.bin", b"x" * 100)
    name = bucket.removeprefix("s3://")
    with FaultProxy(
        stack.s3_endpoint, every=2, faults=("slowdown", "truncate"), max_faults=3
    ) as proxy:
        conn = _conn(proxy)
        outcomes = []
        for _ in range(9):
            # A listing in between: forwarded, never a candidate, does not shift the count.
            conn.request("GET", _presigned(proxy.url, name, "list_objects_v2"))
            listing = conn.getresponse()
            listing.read()
            assert listing.status == 200
            conn.request("GET", _presigned(proxy.url, path))
            resp = conn.getresponse()
            try:
                resp.read()
                outcomes.append(resp.status)
            except http.client.IncompleteRead:
                outcomes.append("truncated")
                conn.close()
                conn = _conn(proxy)
        conn.close()
        counts = proxy.counts
    # Candidates 2, 4, 6 get slowdown, truncate, slowdown; the cap (3) spares candidate 8.
    assert outcomes == [200, 503, 200, "truncated", 200, 503, 200, 200, 200]
    assert counts["candidates"] == 9 and counts["requests"] == 18
    assert (counts["slowdown"], counts["truncate"], counts["reset"]) == (2, 1, 0)
    assert [kind for kind, _ in proxy.injected] == ["slowdown", "truncate", "slowdown"]


def test_schedule_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        FaultProxy("http://127.0.0.1:1", every=1, faults=("boom",))
    with pytest.raises(ValueError, match="either"):
        FaultProxy("http://127.0.0.1:1", every=1, plan=["reset"])
    with pytest.raises(ValueError, match="http://"):
        FaultProxy("https://127.0.0.1:1")


# --------------------------------------------------------------------------- what s3fs does


def test_s3fs_retries_isolated_faults_by_itself(stack, bucket: str) -> None:
    """One fault at a time (every other object GET): s3fs/botocore retry, the bytes are right.

    SlowDown is retried inside botocore (503), resets and truncations by s3fs's own retry loop
    (aiohttp.ClientPayloadError is in s3fs's retryable errors).
    """
    path = _put(stack, bucket, "obj.bin")
    with FaultProxy(stack.s3_endpoint, every=2) as proxy:
        fs = _fs(proxy.url)
        # Each faulted GET is retried, and the retry is the next (clean) candidate.
        assert fs.cat_file(path) == DATA  # candidate 1
        assert fs.cat_file(path, start=10, end=100_010) == DATA[10:100_010]  # 2 slowdown, 3
        chunks = []
        with fs.open(path, "rb", cache_type="none") as f:
            # 60k, 60k, 60k, 20k: candidates 4 reset, 5; 6 truncate, 7; 8 slowdown, 9; 10 reset, 11
            while chunk := f.read(60_000):
                chunks.append(chunk)
        assert b"".join(chunks) == DATA
        counts = proxy.counts
    assert counts["candidates"] == 11
    assert (counts["slowdown"], counts["reset"], counts["truncate"]) == (2, 2, 1)


@pytest.mark.parametrize("kind", ["slowdown", "reset", "truncate"])
def test_s3fs_surfaces_persistent_faults(stack, bucket: str, monkeypatch, kind: str) -> None:
    """Every object GET faulted: once the retries are spent, what does the caller get?"""
    import aiohttp
    import s3fs

    path = _put(stack, bucket, "obj.bin")
    # Fewer retries keep this fast: botocore's off (1 attempt), s3fs's 5 down to 2.
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 2)
    expected: type[BaseException] = OSError if kind == "slowdown" else aiohttp.ClientPayloadError
    with FaultProxy(stack.s3_endpoint, every=1, faults=(kind,)) as proxy:
        fs = _fs(proxy.url)
        with pytest.raises(expected) as whole:
            fs.cat_file(path)
        with pytest.raises(expected):
            fs.cat_file(path, start=0, end=1000)
        with fs.open(path, "rb", cache_type="none") as f, pytest.raises(expected) as streamed:
            f.read(50_000)
        counts = proxy.counts
    assert counts[kind] == counts["candidates"] == 6  # 3 reads x 2 attempts each
    for err in (whole.value, streamed.value):
        if kind == "slowdown":
            # s3fs translates botocore's ClientError(SlowDown) into OSError(EBUSY).
            assert err.errno == errno.EBUSY and "reduce your request rate" in str(err)
            assert type(err.__cause__).__name__ == "ClientError"
        else:
            # Not an OSError: a reset and a short body both read as a short payload.
            assert not isinstance(err, OSError)
            assert "Not enough data to satisfy content length" in str(err)
