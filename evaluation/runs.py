"""`darkmatter runs list | show RUN_ID`: inspect training runs in MLflow from the terminal."""

from __future__ import annotations

import argparse
import os


def _client():  # type: ignore[no-untyped-def]
    from mlflow.tracking import MlflowClient

    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        raise ValueError(
            "MLFLOW_TRACKING_URI is not set (start the local stack: darkmatter stack up)"
        )
    return MlflowClient(tracking_uri=uri)


def list_runs(experiment: str) -> list[str]:
    client = _client()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"experiment {experiment!r} does not exist")
    lines = []
    for r in client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"]):
        m = r.data.metrics
        loss = f"{m['loss']:.4f}" if "loss" in m else "-"
        lines.append(f"{r.info.run_id}  {r.info.status:<9} {r.info.run_name:<24} loss={loss}")
    return lines


def show_run(run_id: str) -> list[str]:
    client = _client()
    r = client.get_run(run_id)
    lines = [f"run {run_id} ({r.info.run_name}): {r.info.status}"]
    lines += [
        f"  tag {k} = {v}" for k, v in sorted(r.data.tags.items()) if not k.startswith("mlflow.")
    ]
    lines += [f"  metric {k} = {v:.6g}" for k, v in sorted(r.data.metrics.items())]
    lines.append(f"  params: {len(r.data.params)}")
    return lines


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="darkmatter runs", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    ls = sub.add_parser("list", help="runs of an experiment, newest first")
    ls.add_argument("--experiment", default="darkmatter")
    show = sub.add_parser("show", help="one run's status, tags and latest metrics")
    show.add_argument("run_id")
    args = p.parse_args(argv)
    lines = list_runs(args.experiment) if args.cmd == "list" else show_run(args.run_id)
    print("\n".join(lines))
    return 0
