"""What a run was made of: code version, library versions, machines and launcher, for the run's
tags and its `environment.json` artifact. Secret-looking variables never get here (redacted)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from darkmatter.trainer.perf import cpu_count
from darkmatter.trainer.tracking import redact

_SOURCE = Path(__file__).resolve().parent.parent
# Variables that say how the job was launched and placed; anything else stays private.
_LAUNCH_PREFIXES = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
    "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_", "SLURM_JOB", "SLURM_NODELIST", "SLURM_NNODES",
    "SLURM_NTASKS", "SLURM_ARRAY", "SLURM_RESTART_COUNT", "KUBERNETES_SERVICE_HOST",
    "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "NCCL_", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL",
)  # fmt: skip
_PACKAGES = (
    "torch", "deepspeed", "transformers", "tokenizers", "mlflow", "webdataset", "fsspec",
    "s3fs", "pyarrow", "numpy", "darkmatter",
)  # fmt: skip


def git_revision() -> tuple[str, bool]:
    """(commit sha, whether the tree has uncommitted changes) of the source this runs from;
    DARKMATTER_GIT_SHA (set when an image is built) where there is no git checkout."""
    if (_SOURCE / ".git").exists():
        try:
            sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_SOURCE, capture_output=True,
                                 text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                   cwd=_SOURCE, capture_output=True, text=True,
                                   timeout=10).stdout.strip() != ""  # fmt: skip
            return sha, dirty
        except (OSError, subprocess.SubprocessError):
            pass
    return os.environ.get("DARKMATTER_GIT_SHA", "unknown"), False


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def summary(nodes: list[str], world_size: int) -> dict[str, Any]:
    """The `environment.json` artifact."""
    sha, dirty = git_revision()
    devices = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else []
    )  # fmt: skip
    launch = {
        k: v for k, v in sorted(os.environ.items()) if k.startswith(_LAUNCH_PREFIXES)
    }  # fmt: skip
    return redact({
        "git": {"sha": sha, "dirty": dirty}, "versions": versions(),
        "platform": platform.platform(), "executable": sys.executable,
        "nodes": nodes, "world_size": world_size, "cpus_per_process": cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda, "devices": devices,
        "launch_env": launch,
    })  # fmt: skip
