"""The lowest layer: the one package that talks to object storage (fsspec/s3fs). It imports
nothing of darkmatter's; the data pipeline, the trainer and the evaluator import it.

    fs           access by URL: read, write, list, copy, delete, atomic put, bucket checks
    errors       StorageError, and StorageUnreachable: no answer at the endpoint or no
                 credentials, told apart from other failures (describe_storage_error)
    retry        the retry budget (config `storage.retry`) of shard fetches and checkpoint
                 transfers, and which errors fail at once
    conditional  create-if-absent and replace-if-unchanged writes (evaluation claims)
    failpoints   fault injection at named points, for the fault-catalogue tests
"""

from darkmatter.storage.conditional import read_versioned, write_if
from darkmatter.storage.errors import (
    StorageError,
    StorageUnreachable,
    describe_storage_error,
    stack_hint,
)
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
    name_problem,
    open_url,
    put_atomic,
    put_file,
    read_bytes,
    remove_tree,
    write_bytes,
)
from darkmatter.storage.retry import Retry, is_permanent, permanent_reason, with_retries

__all__ = [
    "Retry", "StorageError", "StorageUnreachable", "check_bucket", "check_writable_root",
    "copy_tree", "delete", "describe_storage_error", "exists", "filesystem", "fsync_dir",
    "get_file", "glob", "is_permanent", "is_remote", "join", "list_files", "make_bucket",
    "makedirs", "name_problem", "open_url", "permanent_reason", "put_atomic", "put_file",
    "read_bytes", "read_versioned", "remove_tree", "stack_hint", "with_retries", "write_bytes",
    "write_if",
]  # fmt: skip
