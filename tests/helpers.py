"""Small helpers shared by tests (import as ``from tests.helpers import ...``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from darkmatter.quickstart.stack import free_port  # noqa: F401  (tests import it from here)

REPO_ROOT = Path(__file__).resolve().parent.parent
# The virtualenv's bin dir: run its console scripts (darkmatter, torchrun, ...) from tests.
VENV_BIN = Path(sys.executable).parent


def run_darkmatter(*args: str, env: dict[str, str] | None = None, timeout: float = 600):  # type: ignore[no-untyped-def]
    """Run the `darkmatter` CLI as a user would; returns the CompletedProcess (text mode)."""
    import os
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "darkmatter.cli", *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, env=full_env,
    )  # fmt: skip


def write_config(path: Path, data_url: str, run_dir: Path, **sections: dict) -> Path:  # type: ignore[type-arg]
    """A tiny, fast config for tests; `sections` override keys per section."""
    import yaml

    cfg: dict = {  # type: ignore[type-arg]
        "objective": "mlm",
        "data": {"url": data_url, "num_workers": 1, "seq_len": 32, "shuffle_buffer": 64},
        "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
        "train": {"steps": 6, "micro_batch_size": 8, "log_every": 2,
                  "warmup_steps": 2, "lr": 0.002, "zero_stage": 2, "run_dir": str(run_dir)},
        "checkpoint": {"every": 3},
        "tracking": {"enabled": False},
    }  # fmt: skip
    for name, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(name, {}).update(values)
        else:
            cfg[name] = values
    path.write_text(yaml.safe_dump(cfg))
    return path


def synthetic_corpus(path: Path, n: int = 600) -> Path:
    """Short sentences over a small vocabulary, with structure a model can learn (tests only)."""
    animals = ["fox", "dog", "cat", "owl", "bee", "elk"]
    colors = ["red", "brown", "green", "blue", "white", "black"]
    lines = [
        f"the {colors[i % 6]} {animals[(i // 6) % 6]} number {i % 50} jumps over the lazy "
        f"{animals[(i + 1) % 6]} near the {colors[(i // 3) % 6]} river"
        for i in range(n)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def metrics(run_dir: Path) -> list[dict]:  # type: ignore[type-arg]
    """The rows of a run's metrics.jsonl."""
    import json

    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def descendants(pid: int) -> list[int]:
    """All processes below `pid` (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def rank_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of training rank `rank` below a `darkmatter pretrain --nproc` process: the child of
    torchrun's agent whose RANK is `rank` (its data workers share the RANK but not the parent)."""
    for pid in descendants(launcher_pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            parent = Path(f"/proc/{ppid}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if f"RANK={rank}".encode() in env and b"torch.distributed.run" in parent:
            return pid
    return None


def toy_text_task(prefix: str, folder: Path, n: int) -> Path:
    """A tiny labeled text task (two sentence templates, labels 0/1) as Parquet under `prefix`
    (local or s3://), and the tasks file naming it, in `folder`."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from darkmatter import storage

    texts = [f"the red fox number {i}" if i % 2 else f"the blue owl by the river {i}"
             for i in range(n)]  # fmt: skip
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": texts, "label": [i % 2 for i in range(n)]}), buf)
    storage.write_bytes(f"{prefix}/tasks/toy.parquet", buf.getvalue())
    tasks = folder / "tasks.yaml"
    tasks.write_text(f"tasks:\n  - {{name: toy, data: {prefix}/tasks/toy.parquet, "
                     "protocols: {linear_probe: {}, knn: {k: 10}}}\n")  # fmt: skip
    return tasks


def fit(objective: Any, model: Any, batch: dict, steps: int, lr: float) -> list[float]:  # type: ignore[type-arg]
    """`steps` AdamW steps of `model` on one fixed batch in process, the objective's after_step
    (an EMA teacher's update) after each, as the trainer calls it; the losses."""
    from types import SimpleNamespace

    import torch

    engine = SimpleNamespace(module=model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(1, steps + 1):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        objective.after_step(engine, step)
        losses.append(loss.item())
    return losses


def small_spans(monkeypatch: Any) -> None:
    """Range reads (reader/ranged.py) for a test's small shards, in spans of a few samples.
    The reader's workers fork, so they see it too."""
    from darkmatter.data_pipeline.reader import ranged

    monkeypatch.setattr(ranged, "MIN_SHARD", 0)
    monkeypatch.setattr(ranged, "AHEAD", 4096)
    monkeypatch.setattr(ranged, "AHEAD_MAX", 16384)
    monkeypatch.setattr(ranged, "GAP", 1024)
