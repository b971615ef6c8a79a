"""Resume: where training stands (Position), finding the newest usable checkpoint (local or in
object storage, written by this or another number of ranks), fetching what each rank needs,
and loading it. The rules (O(W) requests, never falling back on a storage fault, corrupt
commits quarantined, only torn saves deleted, a local root on several machines checked for
being shared) are in trainer.checkpoint's docstring and docs/ARCHITECTURE.md."""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from darkmatter import storage
from darkmatter.data_pipeline.reader import DataStream, MixtureStream
from darkmatter.storage import read_bytes
from darkmatter.trainer import checkpoint as ckpt
from darkmatter.trainer import engine as eng
from darkmatter.trainer.config import Config
from darkmatter.trainer.objectives import Objective

log = logging.getLogger("darkmatter.train")


@dataclass
class Position:
    """Where training stands: what a checkpoint must restore besides the engine."""

    step: int = 0
    epoch: int = 0
    mlflow_run_id: str | None = None
    restarts: int = 0
    skipped_steps: int = 0  # steps whose update was vetoed (NaN/Inf or a gradient-norm spike)
    rollbacks: int = 0  # returns to the last checkpoint after too many skipped steps


@dataclass
class Found:
    """A verified checkpoint to resume from."""

    root: str  # its checkpoint root (local or remote)
    tag: str
    folder: Path  # local folder holding the fetched files (root/tag's parent when local)
    load_dir: Path  # what DeepSpeed loads from: `folder`, or its universal conversion
    universal: bool  # written by another number of ranks
    record: dict[str, Any]  # its commit record


class Resumer:
    """Finds, fetches and loads the checkpoint a job continues from; one per job, the same
    calls on every rank (they meet in collectives)."""

    def __init__(
        self, cfg: Config, objective: Objective, rank: int, world_size: int, ckpt_root: str,
        staging: Path, policy: storage.Retry,
    ):  # fmt: skip
        self.cfg, self.objective, self.rank, self.world_size = cfg, objective, rank, world_size
        self.ckpt_root, self.staging, self.policy = ckpt_root, staging, policy
        self.run_dir = Path(cfg.train.run_dir)

    def _candidates(self) -> tuple[str, list[str]]:
        """(root, committed tags oldest first) to resume from, as rank 0 sees them."""
        c = self.cfg.checkpoint
        own = (
            ckpt.committed_tags(self.ckpt_root, self.policy) if (c.resume or c.resume_from) else []
        )
        if not c.resume_from:
            if not own and c.resume and ckpt.read_latest(self.ckpt_root) is not None:
                raise ckpt.CheckpointError(
                    f"{storage.join(self.ckpt_root, 'latest')} exists but no checkpoint under "
                    f"{self.ckpt_root} has a commit record: nothing to resume from"
                )
            return self.ckpt_root, own
        marker = storage.join(self.ckpt_root, "resumed_from")
        if own and storage.exists(marker) and read_bytes(marker).decode() == c.resume_from:
            return self.ckpt_root, own  # a restart of the job that started from resume_from
        if own:
            raise ckpt.CheckpointError(
                f"checkpoint.root {self.ckpt_root} already holds committed checkpoints "
                f"({own[0]} … {own[-1]}) that did not start from {c.resume_from}: use a new "
                "checkpoint.root with checkpoint.resume_from"
            )
        src = c.resume_from.rstrip("/")
        last = src.split("/")[-1]
        if storage.exists(storage.join(src, ckpt.COMMIT)):
            return src[: -len(last) - 1], [last]
        tags = ckpt.committed_tags(src, self.policy)
        if not tags:
            raise ckpt.CheckpointError(f"{src}: no committed checkpoint (checkpoint.resume_from)")
        return src, tags

    def load(
        self, found: Found | None, engine: Any, stream: DataStream | MixtureStream
    ) -> Position:
        run_file = self.run_dir / "mlflow_run.json"
        run_id = json.loads(run_file.read_text())["run_id"] if run_file.is_file() else None
        if found is None:
            return Position(mlflow_run_id=run_id)
        eng.load_checkpoint(engine, str(found.load_dir), found.tag)
        state = ckpt.read_rank_state(
            found.folder / found.tag, self.rank, restore_rng=not found.universal
        )
        # Rank 0 reads every rank's data stream position (W small files) and hands them out,
        # and clears the debris of later, uncommitted saves; any error stops every rank.
        shared: Any = None
        if self.rank == 0:
            try:
                shared = ckpt.read_data_states(found.folder / found.tag, found.record["world_size"])
                self._after_resume(found, state["step"])
            except (ckpt.CheckpointError, storage.StorageError, OSError) as e:
                shared = str(e)
        shared = eng.broadcast(shared)
        if isinstance(shared, str):
            raise ckpt.CheckpointError(shared)
        stream.load_state_dict(shared)
        return Position(
            step=state["step"], epoch=stream.epoch,
            mlflow_run_id=state.get("mlflow_run_id") or run_id, restarts=state["restarts"] + 1,
            skipped_steps=state.get("skipped_steps", 0), rollbacks=state.get("rollbacks", 0),
        )  # fmt: skip

    def _after_resume(self, found: Found, step: int) -> None:
        """Rank 0, once the checkpoint has loaded: say so, clear later torn saves, remember
        where a run started from, and drop metrics lines that will be redone."""
        log.info("resuming from %s (step %d)", storage.join(found.root, found.tag), step)
        gone = ckpt.remove_newer(self.ckpt_root, step)
        if gone:
            log.warning("removed uncommitted checkpoint folders %s", ", ".join(gone))
        if found.root != self.ckpt_root:
            storage.put_atomic(
                self.ckpt_root, "resumed_from", self.cfg.checkpoint.resume_from.encode()
            )
        truncate_metrics(self.run_dir / "metrics.jsonl", step)

    def check_shared_root(self) -> None:
        """With more than one machine, a local checkpoint root must be one folder that all of
        them see (a shared file system): otherwise each machine would commit a different half
        of every checkpoint. Rank 0 writes a marker; the first rank of every machine must see
        it."""
        if storage.is_remote(self.ckpt_root):
            return
        nodes = eng.all_gather(eng.node_id())
        if len(set(nodes)) == 1:
            return
        root = Path(self.ckpt_root.removeprefix("file://"))
        marker = root / eng.broadcast(f".shared-check-{uuid.uuid4().hex}" if self.rank == 0 else "")
        if self.rank == 0:
            storage.put_atomic(str(root), marker.name, nodes[0].encode())
        eng.barrier()
        seen = marker.is_file() if eng.local_rank() == 0 else True
        blind = sorted({nodes[r] for r, ok in enumerate(eng.all_gather(seen)) if not ok})
        eng.barrier()
        if self.rank == 0:
            marker.unlink(missing_ok=True)
        if blind:
            raise ckpt.CheckpointError(
                f"checkpoint.root {self.ckpt_root} is a local folder that machine(s) "
                f"{', '.join(blind)} do not share with rank 0 ({nodes[0]}): a job on "
                f"{len(set(nodes))} machines needs a shared folder or an s3:// root"
            )

    def find(self) -> Found | None:
        """The checkpoint to resume from, fetched and verified on every rank (None: start
        afresh). A checkpoint written by another number of ranks is converted to DeepSpeed's
        universal format here, by the first rank of each machine."""
        found: Any = None
        if self.rank == 0:
            try:
                found = self._candidates()
            except (ckpt.CheckpointError, storage.StorageError, OSError) as e:
                found = str(e)
        found = eng.broadcast(found)  # every rank walks rank 0's list, in step
        if isinstance(found, str):
            raise ckpt.CheckpointError(found)
        root, tags = found
        if not tags:
            if self.rank == 0 and ckpt.all_tags(self.ckpt_root):
                log.warning("no committed checkpoint in %s: starting afresh", self.ckpt_root)
                ckpt.remove_newer(self.ckpt_root, -1)
            eng.barrier()
            return None
        folder, tag, record = self.fetch_newest_usable(root, tags)
        self._check_architecture(root, tag, folder)
        universal = record["world_size"] != self.world_size and self.cfg.train.zero_stage > 0
        load_dir = folder
        if universal:
            load_dir = self.staging / f"universal-{eng.node_id().replace('/', '-')}"
            if eng.local_rank() == 0:
                log.info("%s was written by %d ranks, this job has %d: converting it to a "
                         "universal checkpoint", storage.join(root, tag), record["world_size"],
                         self.world_size)  # fmt: skip
                c = self.cfg.checkpoint
                eng.to_universal(folder / tag, load_dir / tag, c.universal_workers,
                                 c.universal_timeout_s)  # fmt: skip
            eng.barrier()
        return Found(root, tag, folder, load_dir, universal, record)

    def _check_architecture(self, root: str, tag: str, folder: Path) -> None:
        """A checkpoint of another model would fail deep inside DeepSpeed's loader (or worse,
        load where shapes happen to fit): compare its model config with ours first."""
        error = ""
        path = folder / tag / "model_config.json"
        if self.rank == 0 and path.is_file():
            saved = json.loads(path.read_text())
            current = json.loads(self.objective.model_config().to_json_string())  # as saved
            diff = ckpt.same_model(saved, current)
            if diff:
                error = (f"{storage.join(root, tag)} was written for another model: "
                         + "; ".join(diff))  # fmt: skip
        error = eng.broadcast(error)
        if error:
            raise ckpt.CheckpointError(error)

    def fetch_newest_usable(self, root: str, tags: list[str]) -> tuple[Path, str, dict[str, Any]]:
        """The newest checkpoint whose files verify on every rank. A committed one that is
        corrupt is reported by file name, moved under quarantine/ and the one before it is
        tried; a storage fault (after the retry budget) fails the resume instead: falling back
        would silently throw away trained steps."""
        dest = self.staging / f"restore-{eng.node_id().replace('/', '-')}"
        leader = eng.local_rank() == 0
        for tag in reversed(tags):
            record: Any = None
            if self.rank == 0:  # one GET of the commit record, not one per rank
                try:
                    record = ckpt.read_commit(root, tag, self.policy)
                except ckpt.CorruptCheckpoint as e:
                    record = ("corrupt", str(e))
                except (ckpt.CheckpointError, storage.StorageError, OSError) as e:
                    record = ("fault", str(e))
            record = eng.broadcast(record)
            outcome: tuple[str, str] = ("", "")
            if isinstance(record, tuple):
                outcome = record
            else:
                names = ckpt.files_to_fetch(record, self.rank, self.world_size, leader)
                try:
                    ckpt.fetch(root, tag, dest, record=record, names=names, policy=self.policy)
                except ckpt.CorruptCheckpoint as e:
                    outcome = ("corrupt", f"rank {self.rank}: {e}")
                except (ckpt.CheckpointError, storage.StorageError, OSError) as e:
                    outcome = ("fault", f"rank {self.rank}: {e}")
            outcomes = [o for o in eng.all_gather(outcome) if o[0]]
            faults = [msg for kind, msg in outcomes if kind == "fault"]
            if faults:
                raise ckpt.CheckpointError(
                    f"cannot fetch checkpoint {storage.join(root, tag)}: {faults[0]} (not "
                    "falling back to an older checkpoint; start the job again once storage "
                    "answers)"
                )
            if not outcomes:
                folder = ckpt.local_folder(root, tag, dest).parent
                return folder, tag, record
            if self.rank == 0:
                for _, msg in outcomes:
                    log.error("checkpoint %s is corrupt: %s", tag, msg)
                moved = ckpt.quarantine(root, tag)
                log.warning("moved checkpoint %s to %s; trying the one before it", tag, moved)
            eng.barrier()
        raise ckpt.CheckpointError(f"{root}: no usable checkpoint (all were corrupt)")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop lines a killed run logged after the checkpoint we resume from: they will be redone."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    # Atomic: killed here, the run keeps the old lines (truncated again at the next resume),
    # never an empty or half-written file.
    storage.put_atomic(str(path.parent), path.name, "".join(ln + "\n" for ln in keep).encode())
