"""Conditional writes: what a claim needs (create if absent, replace if unchanged), on S3's
If-None-Match / If-Match and on local files under an exclusive lock."""

from __future__ import annotations

import os

from darkmatter.storage.errors import StorageError
from darkmatter.storage.fs import filesystem, is_remote, put_atomic


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
    Returns the new version, or None if another writer got there first. Atomic against
    concurrent writers: S3's conditional PUT (If-None-Match / If-Match), or an exclusive lock
    and a rename into place (storage.put_atomic) for a local file."""
    if url.startswith("s3://"):
        fs, path = filesystem(url)
        bucket, key = path.split("/", 1)
        cond = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        try:
            resp = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **cond)
        except Exception as e:
            # If-Match on an object that is gone: not at `version` either (404, not 412).
            if _precondition_failed(e) or (version is not None and _error_code(e) == "NoSuchKey"):
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
        # Readers take no lock: they must see the old record or the new, never a torn one.
        put_atomic(os.path.dirname(path) or ".", os.path.basename(path), data)
    return _digest(data)


def _digest(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _precondition_failed(e: BaseException) -> bool:
    """s3fs maps S3's 412 to FileExistsError, keeping the ClientError as the cause."""
    return _error_code(e) in ("PreconditionFailed", "ConditionalRequestConflict")


def _error_code(e: BaseException) -> str:
    """The S3 error code of a botocore ClientError, or of the one s3fs translated."""
    for err in (e, e.__cause__):
        code = getattr(err, "response", {}).get("Error", {}).get("Code", "")
        if code:
            return str(code)
    return ""


def _require_local(url: str, what: str) -> None:
    if is_remote(url):
        raise StorageError(f"{url}: {what} supports s3:// and local paths only")
