"""The lowest layer: the one package that talks to object storage (fsspec/s3fs). It imports
nothing of darkmatter's; the data pipeline, the trainer and the evaluator import it.

    fs           access by URL: read, write, list, copy, delete, atomic put, bucket checks
    retry        the retry policy shared by checkpoint uploads and fetches
    conditional  create-if-absent and replace-if-unchanged writes (evaluation claims)
    failpoints   fault injection at named points, for the fault-catalogue tests
"""

from darkmatter.storage.conditional import read_versioned, write_if
from darkmatter.storage.errors import StorageError
from darkmatter.storage.fs import (
    check_bucket,
    check_writable_root,
    copy_tree,
    delete,
    exists,
    filesystem,
    fsync_dir,
    get_file,
    glob,
    is_remote,
    join,
    list_files,
    make_bucket,
    makedirs,
    open_url,
    put_atomic,
    put_file,
    read_bytes,
    remove_tree,
    write_bytes,
)
from darkmatter.storage.retry import Retry, is_permanent, with_retries

__all__ = [
    "Retry", "StorageError", "check_bucket", "check_writable_root", "copy_tree", "delete",
    "exists", "filesystem", "fsync_dir", "get_file", "glob", "is_permanent", "is_remote", "join",
    "list_files", "make_bucket", "makedirs", "open_url", "put_atomic", "put_file",
    "read_bytes", "read_versioned", "remove_tree", "with_retries", "write_bytes", "write_if",
]  # fmt: skip
