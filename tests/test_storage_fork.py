"""Storage across a fork: data workers are forked from a rank that has used S3 already (the
resume read the checkpoint). A child that uses S3 must leave the parent's connections working:
closing the inherited clients in the child removed their sockets from the event loop's epoll
instance, which parent and child share, and the parent's next upload waited forever (found by
the chaos soak: a checkpoint upload hung at step 60)."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from pathlib import Path

from darkmatter import storage


def _child(url: str) -> None:
    storage.read_bytes(url)  # a new client in the child; the parent's become garbage here
    import gc

    gc.collect()  # and are collected now, not at some later moment
    time.sleep(30)


def test_a_forked_child_using_s3_leaves_the_parents_connections_working(
    bucket: str, tmp_path: Path
) -> None:
    url = storage.join(bucket, "fork", "x")
    storage.write_bytes(url, b"a" * 1000)  # the parent holds a pooled keep-alive connection
    assert storage.read_bytes(url) == b"a" * 1000
    child = mp.get_context("fork").Process(target=_child, args=(url,), daemon=True)
    child.start()
    try:
        time.sleep(3)  # the child reads and collects (it takes well under a second)
        assert child.is_alive(), "the child failed"
        local = tmp_path / "blob"
        local.write_bytes(b"b" * 200_000)
        done = threading.Event()

        def upload() -> None:
            storage.put_file(str(local), storage.join(bucket, "fork", "y"))
            done.set()

        threading.Thread(target=upload, daemon=True).start()
        assert done.wait(30), "the parent's upload hung after the child used S3"
        assert storage.read_bytes(storage.join(bucket, "fork", "y")) == b"b" * 200_000
    finally:
        child.kill()
