"""Object and file access through fsspec: s3://, gs://, file:// and local paths.

Endpoints and credentials come from the standard variables (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION), so the same code talks to AWS S3,
MinIO or the local server. A call that finds nothing answering at the endpoint, or no
credentials, raises StorageUnreachable naming the endpoint or the variables (`reaching`).
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import selectors
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from darkmatter.storage.errors import StorageError, describe_storage_error, mark_answered
from darkmatter.storage.retry import is_permanent

# fsspec's event loop as it was when this process forked (see _after_fork_in_child).
_loop_at_fork: list[Any] = []
_inherited_clients: list[Any] = []  # in a forked child: the parent's, kept and never used


def _before_fork() -> None:
    asyn = sys.modules.get("fsspec.asyn")
    _loop_at_fork[:] = [asyn.loop[0]] if asyn is not None and asyn.loop[0] is not None else []


def _after_fork_in_child() -> None:
    """In a forked child (data workers): the parent's event loop must never touch its epoll
    instance, which a fork shares between parent and child.

    fsspec gives the child a new loop and a new filesystem cache, and the parent's S3 clients
    become garbage there. But closing them (s3fs's finalizer, aiohttp's __del__) removes their
    sockets from the old loop's epoll instance, the parent's own: its next request on such a
    connection then waits forever (a checkpoint upload hung so in the chaos soak). The child's
    copy of that loop gets a selector of its own, so those removals touch nothing shared.
    """
    for loop in _loop_at_fork:
        loop._selector = selectors.DefaultSelector()
    _loop_at_fork.clear()
    # And s3fs's finalizers would try to run the clients' shutdown on that loop (it never
    # runs here): a traceback in every worker. Nothing of the parent's needs closing here.
    s3fs = sys.modules.get("s3fs")
    if s3fs is not None:
        # Kept, never used: collected, aiohttp would close them too (and warn of each).
        _inherited_clients.extend(s3fs.S3FileSystem._cache.values())
        for fin in list(weakref.finalize._registry):  # type: ignore[attr-defined]
            info = fin.peek()
            if info is not None and info[1] is s3fs.S3FileSystem.close_session:
                fin.detach()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


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


@contextlib.contextmanager
def reaching(url: str) -> Iterator[None]:
    """Around every call that connects to object storage: an endpoint where nothing answers or
    missing credentials become a StorageUnreachable naming the endpoint or the variables (and
    the local stack when the endpoint is on this machine); other errors pass as they are."""
    try:
        yield
    except StorageError:
        raise
    except Exception as e:
        if (unreachable := describe_storage_error(e, url)) is None:
            raise
        raise unreachable from e
    if is_remote(url):
        mark_answered()


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL, keeping its scheme (s3://b/p + x -> s3://b/p/x)."""
    if "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://" + posixpath.join(rest, *parts)
    return os.path.join(url, *parts)


def name_problem(name: object) -> str | None:
    """Why `name`, read from a file (a manifest's shard, a commit record's file), cannot be
    joined onto a folder, or None: it must be a relative path that stays inside the folder
    ('..', '.', empty parts and absolute paths do not), printable, each part a legal file name."""
    if not isinstance(name, str):
        return f"expected a file name, got {name!r}"
    parts = name.split("/")
    if not name.isprintable() or any(p in ("", ".", "..") for p in parts):
        return f"{name!r} is not a relative path inside its folder"
    if any(len(p.encode("utf-8", "surrogatepass")) > 255 for p in parts):
        return f"{name[:40]!r}...: a part of the name is longer than 255 bytes"
    return None


def check_bucket(url: str) -> None:
    """Fail fast with one clear line when an s3:// bucket does not exist, denies access (403,
    never retried) or cannot be reached."""
    if not url.startswith("s3://"):
        return
    bucket = url[len("s3://") :].split("/", 1)[0]
    fs, _ = filesystem(url)
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "the default AWS endpoint")
    try:
        with reaching(url):
            fs.call_s3("head_bucket", Bucket=bucket)
    except StorageError:
        raise  # unreachable, or no credentials: the message says which
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
        with reaching(url):
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
    with reaching(url):  # opening for reading asks for the object's size: a first connection
        return fs.open(path, mode, **kwargs)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    with reaching(url):
        data: bytes = fs.cat_file(path)
    return data


def write_bytes(url: str, data: bytes) -> None:
    fs, path = filesystem(url)
    if "://" not in url or url.startswith("file://"):
        fs.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
    with reaching(url):
        fs.pipe_file(path, data)


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    with reaching(url):
        return bool(fs.exists(path))


def make_bucket(url: str) -> None:
    """Create the bucket of an s3:// URL if it does not exist (the local stack's default bucket)."""
    if not url.startswith("s3://"):
        return
    fs, _ = filesystem(url)
    bucket = url[len("s3://") :].split("/", 1)[0]
    with reaching(url):
        if not fs.exists(bucket):
            fs.mkdir(bucket)


def list_files(url: str) -> list[str]:
    """Every file under url, recursively and sorted, as URLs of url's scheme; [url] for a file.

    Empty for a folder without files or a path that does not exist (check `exists` first).
    """
    fs, path = filesystem(url)
    with reaching(url):
        if not fs.exists(path):
            return []
        if not fs.isdir(path):
            return [url]
        found = fs.find(path)
    scheme = url.split("://", 1)[0] + "://" if "://" in url else ""
    return [scheme + p for p in sorted(found)]


def makedirs(url: str) -> None:
    """Create a local folder (and its parents); object stores have no folders to create."""
    if "://" in url and not url.startswith("file://"):
        return
    fs, path = filesystem(url)
    fs.makedirs(path, exist_ok=True)


def delete(url: str) -> None:
    """Remove one object or file if it exists."""
    fs, path = filesystem(url)
    with reaching(url):
        if fs.exists(path):
            fs.rm_file(path)


def is_remote(url: str) -> bool:
    """True for object storage (s3://, gs://, ...), False for a local path or file:// URL."""
    return "://" in url and not url.startswith("file://")


def put_file(local_path: str, url: str) -> None:
    """Upload one local file to url (one object; a failed upload leaves no partial object)."""
    fs, path = filesystem(url)
    with reaching(url):
        fs.put_file(local_path, path)


def get_file(url: str, local_path: str) -> None:
    """Download one object to a local file."""
    fs, path = filesystem(url)
    with reaching(url):
        fs.get_file(path, local_path)


def glob(pattern: str) -> list[str]:
    """URLs (of the pattern's scheme) matching a glob pattern, sorted."""
    fs, path = filesystem(pattern)
    scheme = pattern.split("://", 1)[0] + "://" if "://" in pattern else ""
    with reaching(pattern):
        found = fs.glob(path)
    return [scheme + p for p in sorted(found)]


def copy_tree(src: str, dst: str) -> None:
    """Copy every file under src to the same relative path under dst (same filesystem)."""
    fs, src_path = filesystem(src)
    _, dst_path = filesystem(dst)
    with reaching(src):
        found = fs.find(src_path)
    for path in sorted(found):
        rel = path[len(src_path.rstrip("/")) + 1 :]
        target = posixpath.join(dst_path, rel) if is_remote(dst) else os.path.join(dst_path, rel)
        if not is_remote(dst):
            os.makedirs(os.path.dirname(target), exist_ok=True)
        with reaching(dst):
            fs.copy(path, target)


def remove_tree(url: str) -> None:
    """Remove a folder (or prefix) and everything under it; nothing if it does not exist."""
    fs, path = filesystem(url)
    with reaching(url):
        if fs.exists(path):
            fs.rm(path, recursive=True)


def put_atomic(root: str, name: str, data: bytes, mode: int = 0o644) -> None:
    """Write one small object under root atomically: readers see the old content or the new,
    never a part. One PUT on an object store; a local temp file fsynced and renamed into place
    (and the folder fsynced) otherwise, created with `mode` (0o600 for secrets: never readable
    by others, not even for a moment)."""
    if is_remote(root):
        write_bytes(join(root, name), data)
        return
    path = Path(root.removeprefix("file://")) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
