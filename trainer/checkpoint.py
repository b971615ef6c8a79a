"""Checkpoint layout, commit and discovery.

    RUN_DIR/checkpoints/
        step00000050/                 one folder per step
            (DeepSpeed's model and optimizer files)
            trainer_state_rank{r}.json  step, data stream state, MLflow run id, per rank
            rng_rank{r}.pt              torch RNG state of rank r (tensors only)
            model_config.json           transformers config of the pretraining model
            darkmatter.json             objective, step, dataset, tokenizer: what evaluation needs
        latest                        the tag of the newest checkpoint, moved last

DeepSpeed writes its own `latest` before every rank has finished writing; we tell it not to and
move `latest` ourselves, atomically, after a barrier, so it never names a partial checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

STATE_VERSION = 2


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def step_of(tag: str) -> int:
    return int(tag.removeprefix("step"))


def write_rank_state(ckpt_dir: Path, rank: int, state: dict[str, Any]) -> None:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(
        ckpt_dir / f"trainer_state_rank{rank}.json",
        json.dumps({"version": STATE_VERSION, **state}, indent=1),
    )
    torch.save({"torch": torch.get_rng_state()}, ckpt_dir / f"rng_rank{rank}.pt")


def read_rank_state(ckpt_dir: Path, rank: int) -> dict[str, Any]:
    path = ckpt_dir / f"trainer_state_rank{rank}.json"
    if not path.is_file():
        raise ValueError(
            f"{path}: missing; the checkpoint was written by fewer ranks than this job has "
            "(resuming on a different world size is not supported yet)"
        )
    state: dict[str, Any] = json.loads(path.read_text())
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"{path}: trainer state version {state.get('version')} != {STATE_VERSION}")
    rng = torch.load(ckpt_dir / f"rng_rank{rank}.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    return state


def read_data_states(ckpt_dir: Path) -> list[dict[str, Any]]:
    """The data stream state of every rank that wrote the checkpoint (for any-world-size resume)."""
    states = []
    for path in sorted(ckpt_dir.glob("trainer_state_rank*.json")):
        data = json.loads(path.read_text()).get("data")
        if data is None:
            raise ValueError(f"{path}: holds no data stream state (written by an older version)")
        states.append(data)
    return states


def commit(root: Path, tag: str) -> None:
    """Point `latest` at `tag`. Called by rank 0 after every rank has written its files."""
    _atomic_write(root / "latest", tag)


def latest_tag(root: Path) -> str | None:
    """The committed tag to resume from, or None for a fresh start."""
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    if not (root / tag).is_dir():
        raise ValueError(f"{pointer}: names {tag!r}, which does not exist")
    return tag


def prune(root: Path, keep_last: int) -> list[str]:
    """Delete all but the newest `keep_last` committed checkpoints; never the one `latest` names."""
    current = latest_tag(root)
    tags = sorted(p.name for p in root.glob("step*") if p.is_dir())
    doomed = [t for t in tags[:-keep_last] if t != current]
    for t in doomed:
        shutil.rmtree(root / t, ignore_errors=True)
    return doomed


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
