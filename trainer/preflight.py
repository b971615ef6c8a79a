"""Checks that fail fast with one clear line, before any process group exists: the launching
process runs them once (`darkmatter pretrain --nproc`) before it starts the ranks, and each rank
again. This module imports the objectives, storage and tracking, but not DeepSpeed or the
trainer: the launching process does not pay for importing what only the ranks use.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from darkmatter import storage
from darkmatter.trainer import checkpoint as ckpt
from darkmatter.trainer import datasets
from darkmatter.trainer.config import Config, ConfigError
from darkmatter.trainer.objectives import OBJECTIVES, Objective
from darkmatter.trainer.tracking import TrackingError, check_reachable, resolve_uri

log = logging.getLogger("darkmatter.train")


def dataset_meta(cfg: Config) -> dict[str, Any]:
    """What the model needs to know of the run's data (trainer.datasets.dataset_meta), with the
    resolved sources under "sources": [(name, dataset url, weight), ...]."""
    sources = datasets.resolve_sources(cfg)
    meta = datasets.dataset_meta(cfg, sources)
    meta["sources"] = [(s.name, s.url, s.weight) for s in sources]
    return meta


def preflight(cfg: Config) -> Objective:
    """Checks that fail fast with one clear line, before any process group exists."""
    if cfg.checkpoint.root:
        storage.check_writable_root(cfg.checkpoint.root)
    meta = dataset_meta(cfg)
    wanted = OBJECTIVES[cfg.objective].modality
    if meta["modality"] != wanted:  # before the objective is built: it may read the data's meta
        keys = "data.url" if cfg.data.url else "data.sources"
        raise ValueError(
            f"objective: {cfg.objective!r} trains on {wanted} data, but {keys} "
            f"({', '.join(url for _, url, _ in meta['sources'])}) holds {meta['modality']} data"
        )
    objective = OBJECTIVES[cfg.objective](cfg, meta)
    if cfg.train.activation_checkpointing:
        check_activation_checkpointing(objective)
    if cfg.model.init_from:  # fetched here (once per process) and checked against the model
        from darkmatter.trainer import init_from

        init_from.check(cfg, objective.model_config(), meta.get("tokenizer_url"))
    uri = resolve_uri(cfg.tracking.tracking_uri)
    if cfg.tracking.enabled and not uri:  # never a silent run without tracking, nor a local one
        raise ValueError(
            "tracking: MLFLOW_TRACKING_URI is not set and tracking.tracking_uri is empty (start "
            "the local stack with `darkmatter stack up`, name an MLflow server, or set "
            "tracking.enabled=false)"
        )
    if cfg.tracking.enabled:
        try:
            check_reachable(uri)
        except TrackingError as e:
            if not _resumable(cfg):
                raise  # a new run needs the server: most likely a wrong URI
            log.warning("%s: resuming anyway, MLflow logging is buffered until it is back", e)
    return objective


def check_activation_checkpointing(objective: Objective) -> None:
    """train.activation_checkpointing on a model that cannot do it fails here, once, naming its
    class (not on every rank as it is built). The model is built on the meta device: no memory,
    no weights."""
    with torch.device("meta"):
        model = objective.build_model()
    if not model.supports_gradient_checkpointing:
        raise ConfigError(
            f"train.activation_checkpointing: {type(model).__name__} (objective "
            f"{objective.name}) does not support activation checkpointing; set it to false"
        )


def _resumable(cfg: Config) -> bool:
    """Whether this job continues an existing run (and so has its MLflow run id)."""
    root = cfg.checkpoint.root or str(Path(cfg.train.run_dir) / "checkpoints")
    if (Path(cfg.train.run_dir) / "mlflow_run.json").is_file():
        return True
    return cfg.checkpoint.resume and bool(ckpt.committed_tags(root))


__all__ = ["check_activation_checkpointing", "dataset_meta", "preflight"]
