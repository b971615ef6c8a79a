"""The one module that talks to object storage: fsspec filesystems for s3://, gs://, file:// and
local paths.

Endpoints and credentials come from the standard variables (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION), so the same code talks to AWS S3,
MinIO or the local moto server.
"""

from __future__ import annotations

import logging
import os
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec
from fsspec.core import url_to_fs

log = logging.getLogger("darkmatter.storage")
T = TypeVar("T")


class StorageError(RuntimeError):
    """Object storage is missing or unreachable; the message names the URL or bucket."""


# -- retries: one policy for every transfer that must survive a flaky object store ----------


@dataclass(frozen=True)
class Retry:
    """How hard to try one storage call: `retries` attempts after the first, waiting
    `backoff_s`, then twice that, ... at most `max_delay_s` between attempts.

    The same budget serves checkpoint uploads and checkpoint fetches (checkpoint.upload_retries),
    so a resume survives exactly the faults a save survives. The data reader resumes a broken
    shard body where it stopped and keeps its own loop (data.retries), on the same schedule."""

    retries: int = 5
    backoff_s: float = 0.5
    max_delay_s: float = 30.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (0-based)."""
        return float(min(self.max_delay_s, self.backoff_s * 2**attempt))


def is_permanent(e: BaseException) -> bool:
    """Errors no retry can fix: the object does not exist, access is denied (403), the
    bucket is missing. Everything else (503 SlowDown, resets, timeouts) is worth another try."""
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, StorageError)):
        return True
    for err in (e, e.__cause__):
        code = getattr(err, "response", {}).get("Error", {}).get("Code", "")
        if code in ("AccessDenied", "Forbidden", "403", "NoSuchBucket", "InvalidAccessKeyId",
                    "SignatureDoesNotMatch"):  # fmt: skip
            return True
    return False


def with_retries(call: Callable[[], T], what: str, policy: Retry = Retry()) -> T:
    """`call()`, tried again after transient errors per `policy`; a permanent error (see
    is_permanent) is raised at once. After the last attempt the error is raised as it is,
    with `what` and the number of attempts added to its message when it is an OSError."""
    for attempt in range(policy.retries + 1):
        try:
            return call()
        except Exception as e:
            if is_permanent(e):
                raise
            if attempt == policy.retries:
                raise StorageError(f"{what} failed {attempt + 1} times: {e}") from e
            delay = policy.delay(attempt)
            log.warning("%s failed (%s); retrying in %.1f s", what, e, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _storage_options(url: str) -> dict[str, Any]:
    if url.startswith("s3://"):
        opts: dict[str, Any] = {}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            opts["client_kwargs"] = {"endpoint_url": endpoint}
        # Listings are re-read on every open: shards may be written by another process.
        opts["use_listings_cache"] = False
        return opts
    return {}


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for any URL fsspec knows, or a local path."""
    fs, path = url_to_fs(url, **_storage_options(url))
    return fs, path


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL, keeping its scheme (s3://b/p + x -> s3://b/p/x)."""
    if "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://" + posixpath.join(rest, *parts)
    return os.path.join(url, *parts)


def check_bucket(url: str) -> None:
    """Fail fast with one clear line when an s3:// bucket does not exist, denies access (403,
    never retried) or cannot be reached."""
    if not url.startswith("s3://"):
        return
    bucket = url[len("s3://") :].split("/", 1)[0]
    fs, _ = filesystem(url)
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "the default AWS endpoint")
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
    except FileNotFoundError:
        raise StorageError(f"bucket {bucket!r} does not exist (from {url})") from None
    except PermissionError:
        raise StorageError(
            f"access to bucket {bucket!r} is denied (403, from {url}): check the credentials "
            "and the bucket's policy"
        ) from None
    except Exception as e:  # botocore raises many types; all mean "cannot reach it"
        if is_permanent(e):
            raise StorageError(f"access to bucket {bucket!r} is denied ({e})") from None
        raise StorageError(f"cannot reach bucket {bucket!r} at {endpoint}: {e}") from None


def check_writable_root(url: str) -> None:
    """A root that checkpoints will be written under: its bucket exists and answers, and its
    prefix can be listed (a 403 there fails now, naming the bucket, not at the first save)."""
    check_bucket(url)
    if not is_remote(url):
        return
    fs, path = filesystem(url)
    bucket = path.split("/", 1)[0]
    try:
        fs.ls(path)
    except FileNotFoundError:
        pass  # an empty prefix: nothing written yet
    except PermissionError:
        raise StorageError(
            f"access to {url} is denied (403, bucket {bucket!r}): check the credentials and "
            "the bucket's policy"
        ) from None


def open_url(url: str, mode: str = "rb", **kwargs: Any) -> Any:
    """Open one object for reading or writing."""
    fs, path = filesystem(url)
    return fs.open(path, mode, **kwargs)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    data: bytes = fs.cat_file(path)
    return data


def write_bytes(url: str, data: bytes) -> None:
    fs, path = filesystem(url)
    if "://" not in url or url.startswith("file://"):
        fs.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
    fs.pipe_file(path, data)


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return bool(fs.exists(path))


def make_bucket(url: str) -> None:
    """Create the bucket of an s3:// URL if it does not exist (the local stack's default bucket)."""
    if not url.startswith("s3://"):
        return
    fs, _ = filesystem(url)
    bucket = url[len("s3://") :].split("/", 1)[0]
    if not fs.exists(bucket):
        fs.mkdir(bucket)


def list_files(url: str) -> list[str]:
    """Every file under url, recursively and sorted, as URLs of url's scheme; [url] for a file.

    Empty for a folder without files or a path that does not exist (check `exists` first).
    """
    fs, path = filesystem(url)
    if not fs.exists(path):
        return []
    if not fs.isdir(path):
        return [url]
    scheme = url.split("://", 1)[0] + "://" if "://" in url else ""
    return [scheme + p for p in sorted(fs.find(path))]


def makedirs(url: str) -> None:
    """Create a local folder (and its parents); object stores have no folders to create."""
    if "://" in url and not url.startswith("file://"):
        return
    fs, path = filesystem(url)
    fs.makedirs(path, exist_ok=True)


def delete(url: str) -> None:
    """Remove one object or file if it exists."""
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm_file(path)


def is_remote(url: str) -> bool:
    """True for object storage (s3://, gs://, ...), False for a local path or file:// URL."""
    return "://" in url and not url.startswith("file://")


def put_file(local_path: str, url: str) -> None:
    """Upload one local file to url (one object; a failed upload leaves no partial object)."""
    fs, path = filesystem(url)
    fs.put_file(local_path, path)


def get_file(url: str, local_path: str) -> None:
    """Download one object to a local file."""
    fs, path = filesystem(url)
    fs.get_file(path, local_path)


def glob(pattern: str) -> list[str]:
    """URLs (of the pattern's scheme) matching a glob pattern, sorted."""
    fs, path = filesystem(pattern)
    scheme = pattern.split("://", 1)[0] + "://" if "://" in pattern else ""
    return [scheme + p for p in sorted(fs.glob(path))]


def copy_tree(src: str, dst: str) -> None:
    """Copy every file under src to the same relative path under dst (same filesystem)."""
    fs, src_path = filesystem(src)
    _, dst_path = filesystem(dst)
    for path in sorted(fs.find(src_path)):
        rel = path[len(src_path.rstrip("/")) + 1 :]
        target = posixpath.join(dst_path, rel) if is_remote(dst) else os.path.join(dst_path, rel)
        if not is_remote(dst):
            os.makedirs(os.path.dirname(target), exist_ok=True)
        fs.copy(path, target)


def remove_tree(url: str) -> None:
    """Remove a folder (or prefix) and everything under it; nothing if it does not exist."""
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


# -- conditional writes: what a claim needs (create if absent, replace if unchanged) ------------


def read_versioned(url: str) -> tuple[bytes, str] | None:
    """(content, version) of one object, or None if it does not exist. The version is what
    `write_if` compares against: the ETag on S3, a content hash for a local file."""
    if url.startswith("s3://"):
        fs, path = filesystem(url)
        bucket, key = path.split("/", 1)
        from fsspec.asyn import sync

        async def get() -> tuple[bytes, str]:
            resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
            async with resp["Body"] as body:
                return await body.read(), str(resp["ETag"])

        try:
            got: tuple[bytes, str] = sync(fs.loop, get)
        except FileNotFoundError:
            return None
        return got
    _require_local(url, "read_versioned")
    path = url.removeprefix("file://")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    return data, _digest(data)


def write_if(url: str, data: bytes, version: str | None) -> str | None:
    """Write `data` only if the object is still at `version` (None: only if it does not exist).
    Returns the new version, or None if another writer got there first. Atomic against concurrent writers: S3's conditional
    PUT (If-None-Match / If-Match), or an exclusive lock for a local file."""
    if url.startswith("s3://"):
        fs, path = filesystem(url)
        bucket, key = path.split("/", 1)
        cond = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        try:
            resp = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **cond)
        except Exception as e:
            if _precondition_failed(e):
                return None
            raise
        return str(resp["ETag"])
    _require_local(url, "write_if")
    import fcntl

    path = url.removeprefix("file://")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        current = read_versioned(path)
        if (current is None) != (version is None) or (current and current[1] != version):
            return None
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return _digest(data)


def _digest(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _precondition_failed(e: BaseException) -> bool:
    """s3fs maps S3's 412 to FileExistsError, keeping the ClientError as the cause."""
    for err in (e, e.__cause__):
        code = getattr(err, "response", {}).get("Error", {}).get("Code", "")
        if code in ("PreconditionFailed", "ConditionalRequestConflict"):
            return True
    return False


def _require_local(url: str, what: str) -> None:
    if is_remote(url):
        raise StorageError(f"{url}: {what} supports s3:// and local paths only")
