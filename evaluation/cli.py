"""`darkmatter evaluate`: downstream numbers for checkpoints, logged into their training run.

One shot:  darkmatter evaluate CHECKPOINT_OR_RUN (--task PARQUET | --tasks TASKS.yaml)
Watching:  darkmatter evaluate --watch EXPERIMENT_OR_RUN_ID --tasks TASKS.yaml

A one-shot evaluation takes the newest committed checkpoint of a run folder or checkpoint root
(local or s3://…), one step folder, or an export folder (`darkmatter export`); given an MLflow run id, it evaluates every checkpoint of
that run that has no result yet (as --watch RUN_ID --once). Watching polls MLflow for committed checkpoints that have
no result yet and evaluates them, oldest (or newest) first, until stopped (SIGTERM/SIGINT:
the claim in hand is released). Harnesses side by side share the work through claims in the
state folder (default: CHECKPOINT_ROOT/_eval). Metrics go into the training run as
`eval/<task>/<protocol>/<metric>` at the checkpoint's step, with `_random_init` twins.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
from pathlib import Path
from typing import Any

import darkmatter.trainer.checkpoint_reader as reader
from darkmatter import storage
from darkmatter.evaluation.checkpoints import EncoderRef, ExportRef, evaluation_weights, is_export
from darkmatter.evaluation.harness import (
    DONE_PREFIX,
    Harness,
    Pending,
    evaluate_checkpoint,
    return_freed_memory_promptly,
)
from darkmatter.evaluation.probe import resolve_device
from darkmatter.evaluation.runs import check_reachable
from darkmatter.evaluation.tasks import TaskSpec, load_tasks, preflight


def _client(required: bool) -> Any:
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        if required:
            raise ValueError("--watch needs MLflow: MLFLOW_TRACKING_URI is not set")
        return None
    from mlflow.tracking import MlflowClient

    check_reachable(uri)
    return MlflowClient(tracking_uri=uri)


def _specs(args: argparse.Namespace) -> list[TaskSpec]:
    if args.tasks:
        return load_tasks(args.tasks)
    if not args.task:
        raise ValueError("give the labeled data: --task PARQUET or --tasks TASKS.yaml")
    name = args.name or Path(args.task.rstrip("/")).stem
    protocols: dict[str, dict[str, Any]] = {
        p.strip(): {} for p in args.protocols.split(",") if p.strip()
    }
    spec = TaskSpec(name=name, data=args.task, label=args.label_column, seed=args.seed,
                    protocols=protocols)  # fmt: skip
    from darkmatter.evaluation.tasks import PROTOCOLS

    if bad := [p for p in protocols if p not in PROTOCOLS]:
        raise ValueError(f"--protocols: unknown {bad[0]!r} (known: {', '.join(PROTOCOLS)})")
    return [spec]


def one_shot(args: argparse.Namespace) -> int:
    resolve_device(args.device)  # a GPU asked for and absent fails before anything is read
    specs = _specs(args)
    for spec in specs:  # a task's data that cannot work fails before any checkpoint is read
        preflight(spec)
    ref: EncoderRef
    weights = None
    if is_export(args.target):
        ref = ExportRef(Path(args.target))
    else:
        loc = reader.locate(args.target)
        ref = reader.fetch(loc, args.cache_dir, weights="none")
        weights = evaluation_weights(loc, ref, args.cache_dir)
    outcome = evaluate_checkpoint(ref, specs, args.state, weights=weights, device=args.device,
                                  workers=args.workers)  # fmt: skip
    run_id = ref.meta.get("mlflow_run_id")
    client = None if args.no_mlflow or not run_id else _client(required=False)
    if client is not None and run_id:
        if DONE_PREFIX + ref.tag in client.get_run(run_id).data.tags:
            print(f"not logged: run {run_id} already has results for {ref.tag} (exactly once)")
            client = None
        else:
            harness = Harness(client, specs, args.state, args.cache_dir)
            pending = Pending(run_id, ref.tag, ref.step, str(ref.path), str(ref.root))
            harness.report(pending, outcome, 0.0)
    first = specs[0]
    proto = next(iter(first.protocols))
    head = f"eval/{first.name}/{proto}/"
    result: dict[str, Any] = {
        "task": first.name, "step": ref.step, "checkpoint": str(ref.path),
        # The first task's first protocol, as one line (what scripts read).
        "pretrained": {m: outcome.metrics[head + m] for m in first.metrics},
        "random_init": {m: outcome.metrics[head + m + "_random_init"] for m in first.metrics},
        "metrics": outcome.metrics, "results": outcome.rows,
    }  # fmt: skip
    first_row = next(r for r in outcome.rows if r["task"] == first.name)
    result["pretrained"].update(n_train=first_row["n_train"], n_test=first_row["n_test"])
    if client is not None:
        result["mlflow_run_id"] = run_id
    for r in outcome.rows:
        print(f"{r['task']} @ step {ref.step}: {r['protocol']} {r['metric']} {r['value']:.3f} "
              f"pretrained vs {r['random_init']:.3f} random init")  # fmt: skip
    line = json.dumps(result)
    if args.output:
        out = Path(args.output)  # whole or not at all: scripts read this line
        storage.put_atomic(str(out.parent), out.name, (line + "\n").encode())
    print(line)
    return 0


def watch(args: argparse.Namespace) -> int:
    if not args.tasks:
        raise ValueError("--watch needs --tasks TASKS.yaml")
    specs = load_tasks(args.tasks)
    for spec in specs:
        preflight(spec)
    harness = Harness(_client(required=True), specs, args.state, args.cache_dir,
                      owner=args.id, ttl_s=args.claim_ttl_s, order=args.order,
                      trusted_roots=tuple(args.trusted_root), device=args.device,
                      weights_artifact=args.weights_artifact, workers=args.workers)  # fmt: skip

    def stop(signum: int, frame: Any) -> None:
        harness.stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    counts = harness.watch(args.watch, poll_s=args.poll_s, once=args.once)
    print(json.dumps({"event": "stopped", "harness": harness.owner, **counts}))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="darkmatter evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("target", nargs="?",
                   help="run folder, checkpoint root, step folder, export folder or run id")  # fmt: skip
    p.add_argument("--task", help="one labeled Parquet file (URL or path)")
    p.add_argument("--name", default="", help="its name in metric keys (default: file stem)")
    p.add_argument("--label-column", default="label", help="for --task: the label column")
    p.add_argument("--protocols", default="linear_probe,knn",
                   help="for --task: linear_probe,knn,finetune")  # fmt: skip
    p.add_argument("--tasks", help="tasks YAML (see evaluation/tasks.py)")
    p.add_argument("--seed", type=int, default=0, help="for --task: seed of the train/test split")
    p.add_argument("--no-mlflow", action="store_true", help="do not log into the training run")
    p.add_argument("--output", default="", help="also write the result JSON here")
    p.add_argument("--watch", metavar="EXPERIMENT_OR_RUN", help="keep evaluating new checkpoints")
    p.add_argument("--order", choices=("oldest", "newest"), default="oldest",
                   help="with --watch: which checkpoints to evaluate first")  # fmt: skip
    p.add_argument("--poll-s", type=float, default=30.0, help="seconds between looks at MLflow")
    p.add_argument("--once", action="store_true", help="stop when nothing is left to evaluate")
    p.add_argument("--state", default="", help="claims and shared baselines (URL or folder)")
    p.add_argument("--claim-ttl-s", type=float, default=300.0,
                   help="a claim not renewed for this long is taken over")  # fmt: skip
    p.add_argument("--id", default="", help="this harness's name in claims (default: unique)")
    p.add_argument("--trusted-root", action="append", default=[], metavar="URL",
                   help="evaluation.trusted_roots: read checkpoints only under this root "
                        "(repeatable; default: each run's own checkpoint root and artifact "
                        "root). A run's index pointing elsewhere is refused")  # fmt: skip
    p.add_argument("--device", default="auto",
                   help="evaluation.device: auto (the GPU when there is one), cpu, cuda or "
                        "cuda:N; bf16 inference on a GPU")  # fmt: skip
    p.add_argument("--workers", type=int, default=None,
                   help="evaluation.workers: processes that read and decode the inputs while "
                        "the encoder runs (default: none on the CPU; on a GPU one per core but "
                        "one, up to 8)")  # fmt: skip
    p.add_argument("--cache-dir", default="", help="where remote checkpoints are downloaded")
    p.add_argument("--weights-artifact", action="store_true",
                   help="with --watch: publish each checkpoint's weights (one safetensors file) "
                        "as an artifact of its run, and take them from there when another "
                        "harness has: one download instead of the checkpoint's files")  # fmt: skip
    return p


def cli(argv: list[str]) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return_freed_memory_promptly()
    p = parser()
    args = p.parse_args(argv)
    if args.watch:
        return watch(args)
    if not args.target:
        p.error("give a checkpoint (run folder, checkpoint root or step folder) or --watch")
    if re.fullmatch(r"[0-9a-f]{32}", args.target) and not os.path.exists(args.target):
        # An MLflow run id: what the run has committed and not yet evaluated, then stop.
        args.watch, args.once = args.target, True
        return watch(args)
    return one_shot(args)
