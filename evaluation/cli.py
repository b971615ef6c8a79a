"""`darkmatter evaluate CHECKPOINT_OR_RUN --task PARQUET`: linear probe of a checkpoint's encoder
next to the same probe on a randomly initialized encoder of the same architecture, logged into
the training run in MLflow at the checkpoint's step as `eval/<task>/linear_probe/<metric>`."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.checkpoints import CheckpointRef, load_encoder, resolve
from evaluation.probe import as_dict, embed, linear_probe
from evaluation.tasks import LabeledSet, image_inputs, load_parquet, text_inputs


def _inputs(ref: CheckpointRef, data: LabeledSet) -> dict[str, Any]:
    meta = ref.meta
    if data.texts is not None:
        if not meta.get("tokenizer"):
            raise ValueError(
                f"{ref.path}: a text task needs a text checkpoint (objective {meta['objective']})"
            )
        return text_inputs(data.texts, meta["tokenizer"], int(meta["data"]["seq_len"]))
    assert data.images is not None
    if meta.get("tokenizer"):
        raise ValueError(
            f"{ref.path}: an image task needs an image checkpoint (objective {meta['objective']})"
        )
    return image_inputs(data.images, int(meta["data"]["image_size"]))


def evaluate(ref: CheckpointRef, data: LabeledSet, seed: int = 0) -> dict[str, Any]:
    """Probe results for the pretrained encoder and its random-init twin."""
    inputs = _inputs(ref, data)
    out: dict[str, Any] = {"task": data.name, "step": ref.step, "checkpoint": str(ref.path)}
    for which, pretrained in (("pretrained", True), ("random_init", False)):
        feats = embed(load_encoder(ref, pretrained=pretrained, seed=seed), inputs)
        out[which] = as_dict(linear_probe(feats, np.asarray(data.labels), seed=seed))
    return out


def log_to_mlflow(result: dict[str, Any], run_id: str, uri: str) -> None:
    import requests
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
    except requests.RequestException as e:
        raise RuntimeError(
            f"MLflow tracking server at {uri} is unreachable ({type(e).__name__})"
        ) from None
    client = MlflowClient(tracking_uri=uri)
    step, task = int(result["step"]), result["task"]
    ts = int(time.time() * 1000)
    metrics = [
        Metric(f"eval/{task}/linear_probe/{m}{suffix}", float(result[which][m]), ts, step)
        for which, suffix in (("pretrained", ""), ("random_init", "_random_init"))
        for m in ("accuracy", "macro_f1")
    ]
    client.log_batch(run_id, metrics=metrics)


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="darkmatter evaluate", description=__doc__)
    p.add_argument("target", help="run folder, checkpoints folder or one checkpoint folder")
    p.add_argument("--task", required=True, help="labeled Parquet file (URL or path)")
    p.add_argument("--name", default="", help="task name in metric keys (default: file stem)")
    p.add_argument("--label-column", default="label")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-mlflow", action="store_true", help="do not log into the training run")
    p.add_argument("--output", default="", help="also write the result JSON here")
    args = p.parse_args(argv)

    ref = resolve(args.target)
    name = args.name or Path(args.task.rstrip("/")).stem
    result = evaluate(ref, load_parquet(args.task, name, args.label_column), seed=args.seed)
    run_id = ref.meta.get("mlflow_run_id")
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not args.no_mlflow and run_id and uri:
        log_to_mlflow(result, run_id, uri)
        result["mlflow_run_id"] = run_id
    line = json.dumps(result)
    if args.output:
        Path(args.output).write_text(line + "\n")
    pre, rnd = result["pretrained"]["accuracy"], result["random_init"]["accuracy"]
    print(
        f"{name} @ step {ref.step}: linear probe accuracy {pre:.3f} pretrained vs {rnd:.3f} random init"
    )
    print(line)
    return 0
