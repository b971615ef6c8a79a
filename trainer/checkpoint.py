"""Checkpoints: layout, atomic commit, background upload, discovery, verification, retention.

    ROOT/                              checkpoint.root: a local folder or any fsspec URL (s3://…)
        step00000050/                  one folder per step
            (DeepSpeed's model and optimizer files, its zero_to_fp32.py)
            trainer_state_rank{r}.json   step, data stream state, MLflow run id: one per rank
            rng_rank{r}.pt               RNG state of rank r (tensors only)
            model_config.json            transformers config of the pretraining model
            darkmatter.json              objective, step, dataset, assets: what evaluation needs
            tokenizer.json               the dataset's tokenizer, byte for byte (text), or
            preprocessor_config.json     the image/audio processor settings: export and
                                         evaluation need no access to the dataset
            COMMIT.json                  written last: every file above with its size and sha256
        latest                         the tag of the newest commit, moved after COMMIT.json

        quarantine/stepNNNNNNNN        committed checkpoints found corrupt at a resume: moved
                                       here, never deleted

A checkpoint exists when its COMMIT.json does; a folder without one is a torn save and is never
loaded. Writing and committing are trainer.checkpoint_writer's; this module owns the layout,
discovery, verification, fetching, quarantine and retention, and what a resume reads.

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
import json
import logging
import os
import pickle
import re
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
        record = json.loads(data)
    except FileNotFoundError:
        raise CheckpointError(f"{url}: missing (the checkpoint is not committed)") from None
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, nested past the parser
        raise CorruptCheckpoint(f"{url}: garbled commit record ({e})") from None
    problem = _record_problem(record, tag)
    if problem:
        raise CorruptCheckpoint(f"{url}: garbled commit record ({problem})")
    checked: dict[str, Any] = record
    return checked


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _record_problem(record: Any, tag: str) -> str | None:
    """What makes a commit record unusable, or None. The resume, the checkpoint index and
    `fetch` read every field; file names become paths under the staging folder."""
    if not isinstance(record, dict):
        return f"expected an object, got {type(record).__name__}"
    if record.get("version") != COMMIT_VERSION or record.get("tag") != tag:
        return f"version {record.get('version')!r:.40}, tag {record.get('tag')!r:.40}"
    if type(record.get("step")) is not int or record["step"] != step_of(tag):
        return f"step {record.get('step')!r:.40} in the folder of {tag}"
    if type(record.get("world_size")) is not int or record["world_size"] < 1:
        return f"world_size {record.get('world_size')!r:.40}"
    if "committed_at" not in record or not isinstance(record.get("files"), dict):
        return "committed_at or files missing"
    for name, rec in record["files"].items():
        if storage.name_problem(name):
            return f"files: {storage.name_problem(name)}"
        if not (isinstance(rec, dict) and type(rec.get("size")) is int and rec["size"] >= 0
                and isinstance(rec.get("sha256"), str) and _SHA256.fullmatch(rec["sha256"])):  # fmt: skip
            return f"bad entry for {name!r}"
    return None


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


# -- per-rank state (reading) ----------------------------------------------------------------


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
        try:
            rng = torch.load(rng_path, weights_only=True)
        except pickle.UnpicklingError as e:  # more than tensors: refused, never run
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"{rng_path}: refused to load (not plain tensors): {first}"
            ) from None
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
