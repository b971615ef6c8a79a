"""Writing checkpoints: the in-memory snapshot, each rank's background writer (write, hash,
upload), the all-ranks outcome and rank 0's commit, retention after it; what rank 0 adds beside
the weights (the input files and model record that make a checkpoint self-contained) and the run
folder's record of where its checkpoints are. The layout, discovery, verification and reading of
checkpoints are trainer.checkpoint's and trainer.checkpoint_reader's.

Saving goes in three phases. (1) On the training thread, every rank takes a snapshot of its
state in memory (DeepSpeed hands each state dict to our checkpoint engine instead of writing
it). (2) A background thread per rank writes the snapshot to a staging folder of its own
(STAGING/rank{r}/stepN: ranks of one machine never touch each other's files), hashing as it
writes, and uploads it when ROOT is remote, with retries. (3) The writers meet in a collective on
a group of their own, where every rank learns every rank's outcome; only when all have written
(and uploaded) does rank 0 write COMMIT.json, move `latest` and purge old checkpoints, and its
result is shared again, so that every rank counts a failed save alike. A save waits for the
previous one to finish, so at most one is in flight.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from darkmatter import storage
from darkmatter.storage import failpoints
from darkmatter.trainer.checkpoint import (
    COMMIT,
    COMMIT_VERSION,
    STATE_VERSION,
    CheckpointError,
    build_index,
    index_entry,
    purge,
    sha256_file,
    step_of,
    tag_for,
)

log = logging.getLogger("darkmatter.checkpoint")


# -- writing --------------------------------------------------------------------------------


class _Snap:
    """State of one snapshot: tensors already copied (by view identity) and a pool of buffers
    that the previous save of the same file used, reused when shapes match."""

    def __init__(self, pool: list[torch.Tensor] | None):
        self.memo: dict[Any, torch.Tensor] = {}
        self.pool = pool if pool is not None else []
        self.n = 0

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        key = (
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
            tuple(t.shape),
            t.stride(),
            t.dtype,
        )
        if key in self.memo:
            return self.memo[key]
        i, self.n = self.n, self.n + 1
        if i < len(self.pool) and self.pool[i].shape == t.shape and self.pool[i].dtype == t.dtype:
            out = self.pool[i].copy_(t)  # no allocation, no page faults: a plain memcpy
        else:
            out = t.to("cpu", copy=True)
            if i < len(self.pool):
                self.pool[i] = out
            else:
                self.pool.append(out)
        self.memo[key] = out
        return out


def snapshot(obj: Any, pool: list[torch.Tensor] | None = None, _s: _Snap | None = None) -> Any:
    """A copy of a state dict that later training steps cannot change: tensors are copied to
    CPU memory (into `pool`'s buffers from the previous save when they fit; tensors that are the
    same view of the same storage, such as tied weights, stay one tensor), containers rebuilt,
    everything else copied."""
    import copy

    s = _s or _Snap(pool)
    if isinstance(obj, torch.Tensor):
        return s.tensor(obj.detach())
    if type(obj) in (dict, OrderedDict):
        return type(obj)((k, snapshot(v, _s=s)) for k, v in obj.items())
    if type(obj) in (list, tuple):
        return type(obj)(snapshot(v, _s=s) for v in obj)
    return copy.deepcopy(obj)  # torch.Size, enums, numbers, strings: kept with their types


class _HashingFile(io.RawIOBase):
    """A write-only file that hashes what passes through, so a file is read once, not twice."""

    def __init__(self, f: Any):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.h.update(b)
        self.n += len(b)
        written: int = self.f.write(b)
        return written

    def flush(self) -> None:
        self.f.flush()


@dataclass
class Job:
    """One rank's part of one checkpoint."""

    tag: str
    step: int
    items: list[tuple[str, str, Any]] = field(default_factory=list)  # (name, kind, payload)
    copy: bool = True  # snapshot tensors (async saves): training goes on while we write
    # Per file, the snapshot buffers of the previous save, free again once it has finished.
    pools: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def add_torch(self, name: str, obj: Any, owned: bool = False) -> None:
        """`owned`: tensors nothing else holds or changes (a fresh gather), written as they are
        rather than copied first."""
        if self.copy and not owned:
            obj = snapshot(obj, self.pools.setdefault(name, []))
        self.items.append((name, "torch", obj))

    def add_bytes(self, name: str, data: bytes) -> None:
        self.items.append((name, "bytes", data))

    def add_json(self, name: str, obj: Any) -> None:
        self.add_bytes(name, json.dumps(obj, indent=1).encode())

    def add_file(self, name: str) -> None:
        """A file that is already in the staging folder (DeepSpeed's recovery scripts)."""
        self.items.append((name, "file", None))


@dataclass
class SaveReport:
    step: int
    bytes: int = 0
    write_s: float = 0.0
    upload_s: float = 0.0
    committed: bool = False
    error: str = ""
    index: list[dict[str, Any]] | None = None  # rank 0, committed: the root's checkpoints now


class Writer:
    """Writes, uploads and commits this rank's part of each checkpoint, one at a time.

    `all_gather(obj)` is a collective over all ranks that returns every rank's obj on every rank
    (in rank order); it runs on the writer thread, so it must use a process group of its own.
    Every rank sees the same outcome of every save, so `failed_in_a_row` is the same number on
    every rank once `wait()` has returned: the trainer may act on it without another collective.
    """

    def __init__(
        self, root: str, staging: Path, rank: int, all_gather: Callable[[Any], list[Any]],
        async_save: bool, policy: storage.Retry, keep_last: int, keep_every: int,
    ):  # fmt: skip
        self.root, self.rank, self.all_gather = root, rank, all_gather
        self.remote = storage.is_remote(root)
        # Where this rank writes: a staging folder of its own when the root is remote (ranks of
        # one machine share STAGING), the root itself when it is a local folder.
        self.local_root = (
            staging / f"rank{rank}" if self.remote else Path(root.removeprefix("file://"))
        )
        self.async_save, self.policy = async_save, policy
        self.keep_last, self.keep_every = keep_last, keep_every
        self.reports: list[SaveReport] = []  # finished saves, drained by the trainer's logger
        self.failed_in_a_row = 0  # consecutive saves not committed (the same on every rank)
        self.last_error = ""
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._pools: dict[str, list[torch.Tensor]] = {}  # snapshot buffers, reused every save
        self._index: dict[str, dict[str, Any]] | None = None  # rank 0: committed, by tag

    def begin(self, tag: str) -> Job:
        """Start the next save: waits for the previous one, then returns an empty job."""
        self.wait()
        (self.local_root / tag).mkdir(parents=True, exist_ok=True)
        return Job(tag, step_of(tag), copy=self.async_save, pools=self._pools)

    def submit(self, job: Job) -> None:
        if not self.async_save:
            self._run(job)
            return
        self._thread = threading.Thread(
            target=self._run, args=(job,), name=f"ckpt-{job.tag}", daemon=True
        )
        self._thread.start()

    def wait(self) -> None:
        """Block until the save in flight (if any) is written, uploaded and committed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def drain(self) -> list[SaveReport]:
        with self._lock:
            out, self.reports = self.reports, []
        return out

    # -- the writer thread ----------------------------------------------------------------
    def _run(self, job: Job) -> None:
        report = SaveReport(job.step)
        files: dict[str, dict[str, Any]] = {}
        error = ""
        try:
            t0 = time.perf_counter()
            files = self._write(job)
            report.bytes = sum(f["size"] for f in files.values())
            report.write_s = time.perf_counter() - t0
            failpoints.kill_if("ckpt.after_write", job.step, self.rank)
            if failpoints.hit("ckpt.fail_upload", job.step, self.rank):
                raise CheckpointError(f"upload of {tag_for(job.step)} failed (failpoint)")
            if self.remote:
                t0 = time.perf_counter()
                self._upload(job.tag, files)
                report.upload_s = time.perf_counter() - t0
        except Exception as e:  # shared below: the checkpoint is not committed on any rank
            error = f"rank {self.rank}: {e}"
        try:
            errors = self._agree(job, report, files, error)
        except Exception as e:  # a peer died mid-save: the job fails on its own collectives
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            errors = [f"rank {self.rank}: the ranks' checkpoint writers lost contact ({first})"]
        report.committed = not errors
        report.error = "; ".join(errors)
        if report.committed:
            self.failed_in_a_row, self.last_error = 0, ""
        else:
            self.failed_in_a_row += 1
            self.last_error = f"checkpoint {job.tag} not committed: {report.error}"
            log.error("%s (%d failed saves in a row)", self.last_error, self.failed_in_a_row)
        with self._lock:
            self.reports.append(report)

    def _agree(
        self, job: Job, report: SaveReport, files: dict[str, dict[str, Any]], error: str
    ) -> list[str]:
        """Every rank reaches this, with or without an error: rank 0 commits only when every
        rank has its files in place, and every rank learns the outcome (the errors, if any)."""
        parts = self.all_gather({"files": files, "error": error})
        errors = [p["error"] for p in parts if p["error"]]
        commit_error = ""
        if not errors and self.rank == 0:
            try:
                report.index = self._commit(job, parts)
            except Exception as e:
                commit_error = f"commit: {e}"
        if not errors:
            commit_error = self.all_gather(commit_error)[0]  # rank 0's outcome, on every rank
            errors = [commit_error] if commit_error else []
        return errors

    def _write(self, job: Job) -> dict[str, dict[str, Any]]:
        folder = self.local_root / job.tag
        files = {}
        for name, kind, payload in job.items:
            path = folder / name
            if kind == "file":
                files[name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
                continue
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "wb") as raw:
                f = _HashingFile(raw)
                if kind == "torch":
                    torch.save(payload, f)  # type: ignore[arg-type]
                else:
                    f.write(payload)
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(tmp, path)
            files[name] = {"size": f.n, "sha256": f.h.hexdigest()}
        storage.fsync_dir(folder)
        return files

    def _upload(self, tag: str, files: dict[str, dict[str, Any]]) -> None:
        folder = self.local_root / tag
        for i, name in enumerate(sorted(files)):
            url, path = storage.join(self.root, tag, name), str(folder / name)
            storage.with_retries(
                lambda url=url, path=path: storage.put_file(path, url),  # type: ignore[misc]
                f"upload of {url}", self.policy,
            )  # fmt: skip
            if i == 0:
                failpoints.kill_if("ckpt.upload", step_of(tag), self.rank)
        # This rank's staging copy has served its purpose (the folder is this rank's alone); a
        # resume downloads what it needs.
        shutil.rmtree(folder, ignore_errors=True)

    def _commit(self, job: Job, parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Write the commit record, move `latest`, purge; returns the checkpoint index."""
        files: dict[str, Any] = {}
        for p in parts:
            files.update(p["files"])
        record = {
            "version": COMMIT_VERSION, "tag": job.tag, "step": job.step,
            "world_size": len(parts), "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": dict(sorted(files.items())),
        }  # fmt: skip
        failpoints.kill_if("ckpt.before_commit", job.step, self.rank)
        storage.put_atomic(self.root, job.tag + "/" + COMMIT, json.dumps(record, indent=1).encode())
        failpoints.kill_if("ckpt.before_latest", job.step, self.rank)
        storage.put_atomic(self.root, "latest", job.tag.encode())
        if self._index is None:  # first commit of this process: what earlier runs left
            self._index = {e["tag"]: e for e in build_index(self.root)}
        self._index[job.tag] = index_entry(self.root, record)
        doomed = purge(self.root, job.tag, self.keep_last, self.keep_every, self.rank)
        if doomed:
            log.info("purged checkpoints %s", ", ".join(doomed))
        for tag in doomed:
            self._index.pop(tag, None)
        return sorted(self._index.values(), key=lambda e: int(e["step"]))


# -- per-rank state -------------------------------------------------------------------------


def rank_state(job: Job, rank: int, state: dict[str, Any]) -> None:
    """Add this rank's trainer state (JSON) and RNG state (tensors) to a save."""
    job.add_json(f"trainer_state_rank{rank}.json", {"version": STATE_VERSION, **state})
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    job.add_torch(f"rng_rank{rank}.pt", rng)


# -- what a checkpoint carries beside the weights (rank 0) ------------------------------------


def input_assets(
    dataset_meta: dict[str, Any], modality: str, data: dict[str, Any]
) -> dict[str, bytes]:
    """The files that make a checkpoint's encoder inputs as training did (reader.ASSETS): the
    dataset's tokenizer for text (read here, once, at the start of training), else the image
    processor's or feature extractor's settings for the run's data settings (`data`). Saved
    into every checkpoint (`add_assets`), so export and evaluation never need the dataset."""
    from darkmatter.trainer import checkpoint_reader as reader

    if dataset_meta.get("tokenizer_url"):
        return {reader.TOKENIZER_FILE: storage.read_bytes(dataset_meta["tokenizer_url"])}
    processor = reader.preprocessor(modality, data)
    if processor is None:
        return {}
    return {reader.PREPROCESSOR_FILE: processor.to_json_string().encode()}


def add_assets(job: Job, meta: dict[str, Any], assets: dict[str, bytes]) -> None:
    """Add the input files and the model record (darkmatter.json, listing them under "assets")
    to rank 0's part of a save: committed, listed and verified like every other file."""
    for name, data in sorted(assets.items()):
        job.add_bytes(name, data)
    job.add_json("darkmatter.json", {**meta, "assets": sorted(assets)})


def record_root(run_dir: Path, root: str) -> None:
    """Write where this run's checkpoints are into its run folder (reader.ROOT_RECORD), so that
    `darkmatter export RUN_DIR` and `darkmatter evaluate RUN_DIR` find a remote root too."""
    from darkmatter.trainer.checkpoint_reader import ROOT_RECORD

    if not storage.is_remote(root):
        root = os.path.abspath(root.removeprefix("file://"))  # the run may be read from elsewhere
    storage.put_atomic(str(run_dir), ROOT_RECORD, json.dumps({"root": root}).encode())
