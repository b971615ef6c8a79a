"""Checkpoints: layout, atomic commit, background upload, discovery, verification, retention.

    ROOT/                              checkpoint.root: a local folder or any fsspec URL (s3://…)
        step00000050/                  one folder per step
            (DeepSpeed's model and optimizer files, its zero_to_fp32.py)
            trainer_state_rank{r}.json   step, data stream state, MLflow run id: one per rank
            rng_rank{r}.pt               RNG state of rank r (tensors only)
            model_config.json            transformers config of the pretraining model
            darkmatter.json              objective, step, dataset, tokenizer: what evaluation needs
            COMMIT.json                  written last: every file above with its size and sha256
        latest                         the tag of the newest commit, moved after COMMIT.json

        quarantine/stepNNNNNNNN        committed checkpoints found corrupt at a resume: moved
                                       here, never deleted

A checkpoint exists when its COMMIT.json does; a folder without one is a torn save and is never
loaded. Saving goes in three phases. (1) On the training thread, every rank takes a snapshot of
its state in memory (DeepSpeed hands each state dict to our checkpoint engine instead of writing
it). (2) A background thread per rank writes the snapshot to a staging folder of its own
(STAGING/rank{r}/stepN: ranks of one machine never touch each other's files), hashing as it
writes, and uploads it when ROOT is remote, with retries. (3) The writers meet in a collective on
a group of their own, where every rank learns every rank's outcome; only when all have written
(and uploaded) does rank 0 write COMMIT.json, move `latest` and purge old checkpoints, and its
result is shared again, so that every rank counts a failed save alike. A save waits for the
previous one to finish, so at most one is in flight.

A resume costs O(world size) object-storage requests: rank 0 lists the root and reads the commit
record and every rank's trainer state once, and hands them to the others; the first rank of
each machine fetches the files that all ranks share; every rank fetches only its own partitions,
RNG and trainer state. Only uncommitted debris is ever deleted: a committed checkpoint whose
files do not match its record is moved under quarantine/, and a transient storage error fails
the resume instead of falling back to an older checkpoint.

DeepSpeed writes its own `latest` before every rank has finished; we never let it (save_latest
is off), and a resume does not trust `latest` either: it takes the newest folder with a commit
record whose files verify.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
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

log = logging.getLogger("darkmatter.checkpoint")

STATE_VERSION = 2  # trainer_state_rank*.json
COMMIT = "COMMIT.json"
COMMIT_VERSION = 1
_TAG = re.compile(r"^step(\d{8,})$")
# Files that belong to one data-parallel rank: DeepSpeed's zero_pp_rank_{r}_..., our *_rank{r}.*
_RANK_FILE = re.compile(r"(?:pp_rank_|rng_rank|trainer_state_rank)(\d+)[_.]")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file or folder."""


class CorruptCheckpoint(CheckpointError):
    """A committed checkpoint whose files do not match its commit record (or whose record is
    garbled): no retry will make it load. Storage faults are never reported as this."""


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def step_of(tag: str) -> int:
    m = _TAG.match(tag)
    if not m:
        raise CheckpointError(f"{tag!r} is not a checkpoint tag (stepNNNNNNNN)")
    return int(m.group(1))


# -- discovery ------------------------------------------------------------------------------


def committed_tags(root: str, policy: storage.Retry = storage.Retry()) -> list[str]:
    """Tags under root that have a commit record, oldest first (by step)."""
    tags = []
    pattern = storage.join(root, "step*", COMMIT)
    for url in storage.with_retries(lambda: storage.glob(pattern), f"listing {pattern}", policy):
        tag = url.rstrip("/").split("/")[-2]
        if _TAG.match(tag):
            tags.append(tag)
    return sorted(tags, key=step_of)


def all_tags(root: str) -> list[str]:
    """Every step folder under root, committed or torn, oldest first."""
    tags = {
        url.rstrip("/").split("/")[-1]
        for url in storage.glob(storage.join(root, "step*"))
    }  # fmt: skip
    return sorted((t for t in tags if _TAG.match(t)), key=step_of)


def read_commit(root: str, tag: str, policy: storage.Retry = storage.Retry()) -> dict[str, Any]:
    """The commit record of root/tag. CheckpointError when it does not exist, CorruptCheckpoint
    when it is garbled; storage faults are retried per `policy`, then raised as StorageError."""
    url = storage.join(root, tag, COMMIT)
    try:
        data = storage.with_retries(lambda: storage.read_bytes(url), f"reading {url}", policy)
        record: dict[str, Any] = json.loads(data)
        files = record["files"]
        if record.get("version") != COMMIT_VERSION or record.get("tag") != tag:
            raise ValueError(f"version {record.get('version')}, tag {record.get('tag')!r}")
        for name, rec in files.items():
            if not (isinstance(rec["size"], int) and len(rec["sha256"]) == 64):
                raise ValueError(f"bad entry for {name}")
    except FileNotFoundError:
        raise CheckpointError(f"{url}: missing (the checkpoint is not committed)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpoint(f"{url}: garbled commit record ({e})") from None
    return record


def index_entry(root: str, record: dict[str, Any]) -> dict[str, Any]:
    """One line of the checkpoint index that tracking publishes: step → URI, commit time."""
    return {
        "step": record["step"], "tag": record["tag"], "uri": storage.join(root, record["tag"]),
        "committed_at": record["committed_at"], "world_size": record["world_size"],
        "bytes": sum(f["size"] for f in record["files"].values()),
    }  # fmt: skip


def build_index(root: str) -> list[dict[str, Any]]:
    """The committed checkpoints under root, oldest first, as index entries."""
    out = []
    for tag in committed_tags(root):
        try:
            out.append(index_entry(root, read_commit(root, tag)))
        except CheckpointError as e:  # purged meanwhile, or garbled: not in the index
            log.warning("checkpoint index: %s", e)
    return out


def read_latest(root: str) -> str | None:
    """What `latest` says, if it exists and names a tag; informational only."""
    url = storage.join(root, "latest")
    try:
        text = storage.read_bytes(url).decode(errors="replace").strip()
    except FileNotFoundError:
        return None
    return text if _TAG.match(text) else None


def needed_by(name: str, rank: int) -> bool:
    """Whether rank loads this file of a checkpoint at the same world size: shared files and its
    own partitions, RNG and trainer state (as `files_to_fetch` with one rank per machine)."""
    m = _RANK_FILE.search(name)
    return m is None or int(m.group(1)) == rank


def files_to_fetch(record: dict[str, Any], rank: int, world_size: int, leader: bool) -> list[str]:
    """The files of a checkpoint that `rank` fetches to resume on `world_size` ranks; O(1) per
    rank, so a resume costs O(world size) requests in all, never O(W²).

    - `leader` (the first rank of each machine): the files all ranks share (model states under
      ZeRO 0-2, configs, DeepSpeed's scripts), into the machine's folder; on a new world size,
      every file, since DeepSpeed's universal converter reads them all.
    - every rank: its own partitions, RNG and trainer state (rank 0's when the writer had fewer
      ranks);
    - rank 0: also every rank's trainer state, whose data stream positions it merges and hands
      to the others.
    """
    writer_ws = int(record["world_size"])
    own_state = f"trainer_state_rank{rank if rank < writer_ws else 0}.json"
    names = []
    for name in record["files"]:
        m = _RANK_FILE.search(name)
        if m is None:
            need = leader
        elif name.startswith("trainer_state_rank"):
            need = name == own_state or rank == 0
        elif name.startswith("rng_rank"):
            need = int(m.group(1)) == rank
        else:  # a ZeRO partition
            resized = writer_ws != world_size
            need = (leader and resized) or (not resized and int(m.group(1)) == rank)
        if need:
            names.append(name)
    return sorted(names)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def local_folder(root: str, tag: str, dest: Path) -> Path:
    """Where the files of root/tag are read from: the checkpoint's own folder for a local root,
    else `dest`/tag (what `fetch` downloads to)."""
    if storage.is_remote(root):
        return dest / tag
    return Path(root.removeprefix("file://")) / tag


def fetch(
    root: str, tag: str, dest: Path, rank: int = 0, everything: bool = False, *,
    record: dict[str, Any] | None = None, names: list[str] | None = None,
    policy: storage.Retry = storage.Retry(),
) -> Path:  # fmt: skip
    """Make files of checkpoint `tag` present and verified; returns the folder to load from
    (the checkpoint root for a local root, else `dest`). `names` (default: every file with
    `everything`, else those `needed_by` rank) are checked against the commit record (size and
    sha256): a mismatch or a missing file raises CorruptCheckpoint naming the file; downloads
    are retried per `policy`, then raise StorageError.
    """
    record = record if record is not None else read_commit(root, tag, policy)
    if names is None:
        names = sorted(n for n in record["files"] if everything or needed_by(n, rank))
    folder = local_folder(root, tag, dest)
    remote = storage.is_remote(root)
    if remote:
        folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        want = record["files"][name]
        url = storage.join(root, tag, name)
        path = folder / name
        # A file downloaded by a previous attempt is kept when it matches.
        if remote and not (path.is_file() and _matches(path, want)):
            part = path.with_name(f"{path.name}.part{os.getpid()}")
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                storage.with_retries(
                    lambda url=url, part=part: storage.get_file(url, str(part)),  # type: ignore[misc]
                    f"download of {url}", policy,
                )  # fmt: skip
            except FileNotFoundError:
                raise CorruptCheckpoint(f"{url}: missing (listed in {COMMIT})") from None
            os.replace(part, path)
        if not path.is_file():
            raise CorruptCheckpoint(f"{url}: missing (listed in {COMMIT})")
        size = path.stat().st_size
        if size != want["size"]:
            raise CorruptCheckpoint(f"{url}: {size} bytes, the commit record says {want['size']}")
        if sha256_file(path) != want["sha256"]:
            raise CorruptCheckpoint(f"{url}: sha256 mismatch (the file is corrupt)")
    return folder.parent


def _matches(path: Path, want: dict[str, Any]) -> bool:
    return path.stat().st_size == want["size"] and sha256_file(path) == want["sha256"]


def quarantine(root: str, tag: str) -> str:
    """Move a committed checkpoint that will not load out of the way, under ROOT/quarantine/
    (never deleted: a person decides). Its commit record leaves the step folder first after the
    copy, so a move killed halfway leaves at worst a torn folder and a complete copy."""
    dest = storage.join(root, "quarantine", tag)
    n = 1
    while storage.exists(dest):  # quarantined before (the same step written again, corrupt again)
        n += 1
        dest = storage.join(root, "quarantine", f"{tag}.{n}")
    storage.copy_tree(storage.join(root, tag), dest)
    storage.delete(storage.join(root, tag, COMMIT))
    storage.remove_tree(storage.join(root, tag))
    return dest


def same_model(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The model config keys whose values differ between a checkpoint's model_config.json and
    this run's model (keys transformers adds on its own aside), as "key: saved vs current"."""
    ignore = {"transformers_version", "_attn_implementation_autoset", "torch_dtype", "dtype",
              "_name_or_path", "architectures", "attn_implementation", "_attn_implementation"}  # fmt: skip
    out = []
    for key in sorted((saved.keys() | current.keys()) - ignore):
        if saved.get(key, "(absent)") != current.get(key, "(absent)"):
            out.append(f"{key} {saved.get(key, '(absent)')} in the checkpoint, "
                       f"{current.get(key, '(absent)')} here")  # fmt: skip
    return out


# -- retention ------------------------------------------------------------------------------


def purge(root: str, newest: str, keep_last: int, keep_every: int, rank: int = 0) -> list[str]:
    """Delete committed checkpoints beyond the newest `keep_last` (except multiples of
    `keep_every`) and torn folders older than `newest`. A checkpoint's commit record goes first,
    so a purge killed halfway leaves at worst a torn folder, never a damaged committed one; the
    newest is never touched."""
    newest_step = step_of(newest)
    committed = [t for t in committed_tags(root) if step_of(t) <= newest_step]
    keep = set(committed[-keep_last:]) | {newest}
    if keep_every:
        keep |= {t for t in committed if step_of(t) % keep_every == 0}
    doomed = [t for t in all_tags(root) if step_of(t) < newest_step and t not in keep]
    for i, tag in enumerate(doomed):
        storage.delete(storage.join(root, tag, COMMIT))
        if i == len(doomed) // 2:
            failpoints.kill_if("ckpt.purge", newest_step, rank)
        storage.remove_tree(storage.join(root, tag))
    return doomed


def remove_newer(root: str, step: int) -> list[str]:
    """At a resume from `step`: folders of later steps without a commit record are torn saves
    of a previous life, which this run will write again; remove them so no stale file survives
    into a new commit. A committed later checkpoint is never removed (a corrupt one was
    quarantined before we got here); one that is still there is an error."""
    later = [t for t in all_tags(root) if step_of(t) > step]
    committed = set(committed_tags(root))
    kept = [t for t in later if t in committed]
    if kept:
        raise CheckpointError(
            f"{root} holds committed checkpoints after step {step} ({', '.join(kept)}): "
            "resuming would overwrite them; use a new checkpoint.root"
        )
    for tag in later:
        storage.remove_tree(storage.join(root, tag))
    return later


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

    def add_torch(self, name: str, obj: Any) -> None:
        if self.copy:
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
        # Every rank reaches this, with or without an error: rank 0 commits only when every
        # rank has its files in place, and every rank learns the outcome.
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


def read_rank_state(folder: Path, rank: int, restore_rng: bool = True) -> dict[str, Any]:
    """This rank's trainer state from a fetched checkpoint folder; restores its RNG state when
    the checkpoint was written by a job with this rank."""
    path = folder / f"trainer_state_rank{rank}.json"
    if not path.is_file():
        path = folder / "trainer_state_rank0.json"  # a job with more ranks than the writer's
        restore_rng = False
    state: dict[str, Any] = json.loads(path.read_text())
    if state.get("version") != STATE_VERSION:
        raise CheckpointError(
            f"{path}: trainer state version {state.get('version')} != {STATE_VERSION}"
        )
    rng_path = folder / f"rng_rank{rank}.pt"
    if restore_rng and rng_path.is_file():
        rng = torch.load(rng_path, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return state


def read_data_states(folder: Path, world_size: int) -> list[dict[str, Any]]:
    """The data stream state of every rank that wrote the checkpoint (for any-world-size
    resume): `world_size` is the writer's, and every rank's file must be there."""
    states = []
    paths = [folder / f"trainer_state_rank{r}.json" for r in range(world_size)]
    for path in paths:
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (the data stream state of that rank)")
        data = json.loads(path.read_text()).get("data")
        if data is None:
            raise CheckpointError(
                f"{path}: holds no data stream state (written by an older version)"
            )
        states.append(data)
    return states
