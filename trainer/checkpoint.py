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

A checkpoint exists when its COMMIT.json does; a folder without one is a torn save and is never
loaded. Saving goes in three phases. (1) On the training thread, every rank takes a snapshot of
its state in memory (DeepSpeed hands each state dict to our checkpoint engine instead of writing
it). (2) A background thread per rank writes the snapshot to local staging, hashing as it writes,
and uploads it when ROOT is remote, with retries. (3) The writers meet in a collective on a
group of their own; rank 0 writes COMMIT.json, moves `latest` and purges old checkpoints. A save
waits for the previous one to finish, so at most one is in flight.

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

from data_pipeline import storage
from trainer import failpoints

log = logging.getLogger("darkmatter.checkpoint")

STATE_VERSION = 2  # trainer_state_rank*.json
COMMIT = "COMMIT.json"
COMMIT_VERSION = 1
_TAG = re.compile(r"^step(\d{8,})$")
# Files that belong to one data-parallel rank: DeepSpeed's zero_pp_rank_{r}_..., our *_rank{r}.*
_RANK_FILE = re.compile(r"(?:pp_rank_|rng_rank)(\d+)[_.]")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file or folder."""


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def step_of(tag: str) -> int:
    m = _TAG.match(tag)
    if not m:
        raise CheckpointError(f"{tag!r} is not a checkpoint tag (stepNNNNNNNN)")
    return int(m.group(1))


# -- discovery ------------------------------------------------------------------------------


def committed_tags(root: str) -> list[str]:
    """Tags under root that have a commit record, oldest first (by step)."""
    tags = []
    for url in storage.glob(storage.join(root, "step*", COMMIT)):
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


def read_commit(root: str, tag: str) -> dict[str, Any]:
    url = storage.join(root, tag, COMMIT)
    try:
        record: dict[str, Any] = json.loads(storage.read_bytes(url))
        files = record["files"]
        if record.get("version") != COMMIT_VERSION or record.get("tag") != tag:
            raise ValueError(f"version {record.get('version')}, tag {record.get('tag')!r}")
        for name, rec in files.items():
            if not (isinstance(rec["size"], int) and len(rec["sha256"]) == 64):
                raise ValueError(f"bad entry for {name}")
    except FileNotFoundError:
        raise CheckpointError(f"{url}: missing (the checkpoint is not committed)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{url}: garbled commit record ({e})") from None
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
    """Whether rank loads this file of a checkpoint at the same world size: shared files, its
    own partitions, and every rank's trainer state (the data stream merges them all)."""
    if name.startswith("trainer_state_rank"):
        return True
    m = _RANK_FILE.search(name)
    return m is None or int(m.group(1)) == rank


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fetch(root: str, tag: str, dest: Path, rank: int, everything: bool = False) -> Path:
    """Make the files `rank` needs of checkpoint `tag` present and verified; returns the folder
    to load from (the checkpoint's own folder for a local root, else `dest`/tag).

    Every file is checked against the commit record (size and sha256); a mismatch raises
    CheckpointError naming the file.
    """
    record = read_commit(root, tag)
    names = sorted(n for n in record["files"] if everything or needed_by(n, rank))
    if storage.is_remote(root):
        folder = dest / tag
        folder.mkdir(parents=True, exist_ok=True)
    else:
        folder = Path(root.removeprefix("file://")) / tag
    for name in names:
        want = record["files"][name]
        url = storage.join(root, tag, name)
        path = folder / name
        # A file downloaded by a previous attempt is kept when it matches.
        if storage.is_remote(root) and not (path.is_file() and _matches(path, want)):
            part = path.with_name(path.name + ".part")
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                storage.get_file(url, str(part))
            except FileNotFoundError:
                raise CheckpointError(f"{url}: missing (listed in {COMMIT})") from None
            os.replace(part, path)
        if not path.is_file():
            raise CheckpointError(f"{url}: missing (listed in {COMMIT})")
        size = path.stat().st_size
        if size != want["size"]:
            raise CheckpointError(f"{url}: {size} bytes, the commit record says {want['size']}")
        if sha256_file(path) != want["sha256"]:
            raise CheckpointError(f"{url}: sha256 mismatch (the file is corrupt)")
    return folder.parent


def _matches(path: Path, want: dict[str, Any]) -> bool:
    return path.stat().st_size == want["size"] and sha256_file(path) == want["sha256"]


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
    """At a resume from `step`: folders of later steps are torn or corrupt saves of a previous
    life, which this run will write again. Remove them so no stale file survives into a new
    commit."""
    gone = [t for t in all_tags(root) if step_of(t) > step]
    for tag in gone:
        storage.delete(storage.join(root, tag, COMMIT))
        storage.remove_tree(storage.join(root, tag))
    return gone


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

    `gather(obj)` is a collective over all ranks that returns every rank's obj on rank 0 (None
    elsewhere); it runs on the writer thread, so it must use a process group of its own.
    """

    def __init__(
        self, root: str, staging: Path, rank: int, gather: Callable[[Any], list[Any] | None],
        async_save: bool, retries: int, keep_last: int, keep_every: int,
    ):  # fmt: skip
        self.root, self.rank, self.gather = root, rank, gather
        self.remote = storage.is_remote(root)
        # Where ranks write: the root itself when it is a local folder.
        self.local_root = staging if self.remote else Path(root.removeprefix("file://"))
        self.async_save, self.retries = async_save, retries
        self.keep_last, self.keep_every = keep_last, keep_every
        self.reports: list[SaveReport] = []  # finished saves, drained by the trainer's logger
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
            if self.remote:
                t0 = time.perf_counter()
                self._upload(job.tag, files)
                report.upload_s = time.perf_counter() - t0
        except Exception as e:  # reported below; the checkpoint is simply not committed
            error = f"rank {self.rank}: {e}"
        parts = self.gather({"files": files, "error": error})  # every rank reaches this
        if parts is not None:  # rank 0
            errors = [p["error"] for p in parts if p["error"]]
            if errors:
                report.error = "; ".join(errors)
            else:
                try:
                    report.index = self._commit(job, parts)
                    report.committed = True
                except Exception as e:
                    report.error = f"commit: {e}"
        elif error:
            report.error = error
        if report.error:
            log.error("checkpoint %s not committed: %s", job.tag, report.error)
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
        _fsync_dir(folder)
        return files

    def _upload(self, tag: str, files: dict[str, dict[str, Any]]) -> None:
        folder = self.local_root / tag
        for i, name in enumerate(sorted(files)):
            url = storage.join(self.root, tag, name)
            for attempt in range(self.retries + 1):
                try:
                    storage.put_file(str(folder / name), url)
                    break
                except Exception as e:
                    if attempt == self.retries:
                        raise CheckpointError(
                            f"upload of {url} failed {attempt + 1} times: {e}"
                        ) from None
                    delay = min(30.0, 0.5 * 2**attempt)
                    log.warning("upload of %s failed (%s); retrying in %.1f s", url, e, delay)
                    time.sleep(delay)
            if i == 0:
                failpoints.kill_if("ckpt.upload", step_of(tag), self.rank)
        # The staging copy has served its purpose; a resume downloads what it needs.
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
        _put(self.root, job.tag + "/" + COMMIT, json.dumps(record, indent=1).encode())
        failpoints.kill_if("ckpt.before_latest", job.step, self.rank)
        _put(self.root, "latest", job.tag.encode())
        if self._index is None:  # first commit of this process: what earlier runs left
            self._index = {e["tag"]: e for e in build_index(self.root)}
        self._index[job.tag] = index_entry(self.root, record)
        doomed = purge(self.root, job.tag, self.keep_last, self.keep_every, self.rank)
        if doomed:
            log.info("purged checkpoints %s", ", ".join(doomed))
        for tag in doomed:
            self._index.pop(tag, None)
        return sorted(self._index.values(), key=lambda e: int(e["step"]))


def _put(root: str, name: str, data: bytes) -> None:
    """Write one small object atomically: a local temp file moved into place, or one PUT."""
    if storage.is_remote(root):
        storage.write_bytes(storage.join(root, name), data)
        return
    path = Path(root.removeprefix("file://")) / name
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def read_data_states(folder: Path) -> list[dict[str, Any]]:
    """The data stream state of every rank that wrote the checkpoint (for any-world-size resume)."""
    states = []
    paths = sorted(folder.glob("trainer_state_rank*.json"), key=lambda p: _rank_of(p.name))
    for path in paths:
        data = json.loads(path.read_text()).get("data")
        if data is None:
            raise CheckpointError(
                f"{path}: holds no data stream state (written by an older version)"
            )
        states.append(data)
    return states


def _rank_of(name: str) -> int:
    return int(re.sub(r"\D", "", name.split("rank", 1)[1]))
