"""`darkmatter runs list | show RUN | compare RUN RUN…`: training runs in MLflow, from the terminal.

RUN is a run id, a run name, or a run folder (its `mlflow_run.json`). `show` says where a step's
time went and how healthy the run is; `compare` sets two runs or more side by side: config
differences, last metrics, the latest evaluation of each task and protocol. `--plot FILE.png`
draws loss, throughput and the linear probe's accuracy against step, one line per run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PHASES = ("data", "batch", "forward", "backward", "optimizer", "other")
_PHASE_NOTE = {
    "data": "waiting for the data stream",
    "batch": "masking / batch building",
    "optimizer": "incl. ZeRO gradient reduction",
    "other": "checkpoint snapshots, logging",
}


def _client() -> Any:
    from mlflow.tracking import MlflowClient

    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        raise ValueError(
            "MLFLOW_TRACKING_URI is not set (start the local stack: darkmatter stack up)"
        )
    check_reachable(uri)
    return MlflowClient(tracking_uri=uri)


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """One error line naming the URL (credentials removed) and MLFLOW_TRACKING_URI when an HTTP
    tracking server does not answer, in seconds: MLflow's client would retry for minutes first.
    (training has its own, trainer.tracking.check_reachable: the tracker is the trainer's.)"""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    from darkmatter.storage import stack_hint

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout_s).raise_for_status()
    except requests.RequestException as e:
        where = re.sub(r"(?<=://)[^/@\s:]+:[^/@\s]+@", "***@", uri)
        raise RuntimeError(
            f"MLflow tracking server at {where} is unreachable ({type(e).__name__}, from "
            f"MLFLOW_TRACKING_URI){stack_hint(uri)}"
        ) from None


def search_all_runs(
    client: Any, experiment_ids: list[str], filter_string: str = "",
    order_by: list[str] | None = None, page_size: int = 1000,
) -> list[Any]:  # fmt: skip
    """Every run that matches, page after page: one search answers at most `page_size` runs
    (MLflow's cap is 1,000), and the runs past it would silently vanish without its page_token."""
    from mlflow.utils import get_results_from_paginated_fn

    def page(n: int, token: str | None) -> Any:
        return client.search_runs(experiment_ids, filter_string, max_results=n,
                                  order_by=order_by, page_token=token)  # fmt: skip

    runs: list[Any] = get_results_from_paginated_fn(page, page_size)
    return runs


def _all_experiment_ids(client: Any) -> list[str]:
    from mlflow.utils import get_results_from_paginated_fn

    def page(n: int, token: str | None) -> Any:
        return client.search_experiments(max_results=n, page_token=token)

    return [e.experiment_id for e in get_results_from_paginated_fn(page, 1000)]


def find_run(client: Any, ref: str) -> Any:
    """The run named by `ref`: a run folder, a run id, or a run name (the newest with it)."""
    from mlflow.exceptions import MlflowException

    run_file = Path(ref) / "mlflow_run.json"
    if run_file.is_file():
        ref = json.loads(run_file.read_text())["run_id"]
    if re.fullmatch(r"[0-9a-f]{32}", ref):
        try:
            return client.get_run(ref)
        except MlflowException:
            raise ValueError(f"run {ref}: no such MLflow run") from None
    exps = _all_experiment_ids(client)
    runs = client.search_runs(exps, f"attributes.run_name = '{ref.replace(chr(39), '')}'",
                              order_by=["attributes.start_time DESC"], max_results=1)  # fmt: skip
    if not runs:
        raise ValueError(f"run {ref!r}: no run folder, run id or run name matches")
    return runs[0]


@dataclass
class Summary:
    """What `show` and `list` print, from one run's metrics, tags and histories."""

    run: Any
    step: int = 0
    first_loss: float = float("nan")
    intervals: int = 0
    time_per_step: dict[str, float] = field(default_factory=dict)  # phase -> seconds
    saves: int = 0
    failed_saves: list[int] = field(default_factory=list)  # steps whose save did not commit
    evals: dict[str, tuple[int, float]] = field(default_factory=dict)  # key -> (step, value)

    @property
    def metrics(self) -> dict[str, float]:
        return dict(self.run.data.metrics)

    @property
    def tags(self) -> dict[str, str]:
        return dict(self.run.data.tags)


def summarize(client: Any, run: Any, history: bool = True) -> Summary:
    rid, m = run.info.run_id, run.data.metrics
    s = Summary(run)
    loss = client.get_metric_history(rid, "loss") if "loss" in m else []
    if loss:
        s.step = max(x.step for x in loss)
        s.first_loss = min(loss, key=lambda x: x.step).value
        s.intervals = len({x.step for x in loss})
    for key in m:
        if key.startswith("eval/") and not key.endswith("_random_init"):
            last = max(client.get_metric_history(rid, key), key=lambda x: (x.step, x.timestamp))
            s.evals[key] = (last.step, last.value)
    if not history:
        return s
    for phase in PHASES:  # the mean over the run's log intervals of the per-step means
        hist = client.get_metric_history(rid, f"time/{phase}_s")
        if hist:
            s.time_per_step[phase] = sum(x.value for x in hist) / len(hist)
    committed = client.get_metric_history(rid, "checkpoint/committed")
    steps = {x.step: x for x in client.get_metric_history(rid, "checkpoint/step")}
    s.saves = len(committed)
    s.failed_saves = sorted(int(steps[x.step].value) for x in committed
                            if x.value < 1 and x.step in steps)  # fmt: skip
    return s


def _fmt(v: float | None, spec: str = ".4g") -> str:
    return "-" if v is None or v != v else format(v, spec)


def _human(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}"


def list_runs(experiment: str) -> list[str]:
    client = _client()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"experiment {experiment!r} does not exist")
    runs = search_all_runs(client, [exp.experiment_id], order_by=["attributes.start_time DESC"])
    rows = [("RUN", "NAME", "STATUS", "STEP", "LOSS", "SAMPLES/S", "CHECKPOINT", "LATEST EVAL")]
    for r in runs:
        s = summarize(client, r, history=False)
        m, t = s.metrics, s.tags
        ev = "-"
        if s.evals:
            key, (step, value) = max(s.evals.items(), key=lambda kv: kv[1][0])
            ev = f"{key.removeprefix('eval/')}={value:.3f}@{step}"
        rows.append((
            r.info.run_id[:12], r.info.run_name or "-", r.info.status, str(s.step or "-"),
            _fmt(m.get("loss")), _fmt(m.get("samples_per_s"), ".1f"),
            t.get("checkpoint.latest_step", "-"), ev,
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]


def show_run(ref: str) -> list[str]:
    client = _client()
    run = find_run(client, ref)
    s = summarize(client, run)
    m, t, p = s.metrics, s.tags, run.data.params
    exp = client.get_experiment(run.info.experiment_id).name
    lines = [f"run {run.info.run_id} {run.info.run_name} (experiment {exp}): {run.info.status}"]
    sha = t.get("git_sha", "unknown")[:10] + (" (dirty)" if t.get("git_dirty") == "True" else "")
    lines.append(
        f"  {t.get('objective', '?')}, {_human(float(t.get('parameters', 0)))} parameters, "
        f"world size {t.get('world_size', '?')} on {t.get('num_nodes', '?')} node(s) "
        f"({t.get('nodes', '?')}), ZeRO {p.get('train.zero_stage', '?')}, git {sha}"
    )
    rate = f"{_human(m['tokens_per_s'])} tokens/s, " if "tokens_per_s" in m else ""
    mfu = (f", MFU {100 * m['mfu']:.2f}% of {_human(float(p.get('mfu.peak_flops', 0)))}FLOP/s "
           f"({p.get('mfu.peak_source', '?')})") if "mfu" in m else ""  # fmt: skip
    lines += [
        "progress",
        f"  step {s.step}/{p.get('train.steps', '?')}, loss {_fmt(m.get('loss'))} (first logged "
        f"{_fmt(s.first_loss)}), {_fmt(m.get('samples_per_s'), '.1f')} samples/s, {rate}"
        f"lr {_fmt(m.get('lr'), '.3g')}{mfu}",
    ]
    if s.time_per_step:
        step_s = sum(s.time_per_step.values())
        lines.append(f"where the time went (mean per step over {s.intervals} logged intervals)")
        for phase, secs in s.time_per_step.items():
            note = f"  ({_PHASE_NOTE[phase]})" if phase in _PHASE_NOTE else ""
            lines.append(f"  {phase:<10} {1000 * secs:9.1f} ms  {100 * secs / step_s:5.1f}%{note}")
        lines.append(f"  {'step':<10} {1000 * step_s:9.1f} ms")
    if s.saves:
        lines.append(
            f"  checkpoints: {s.saves} saves, last: stall {_fmt(m.get('checkpoint/stall_s'), '.3f')}"
            f" s on the training thread, write {_fmt(m.get('checkpoint/write_s'), '.2f')} s, "
            f"upload {_fmt(m.get('checkpoint/upload_s'), '.2f')} s in the background, "
            f"{_fmt(m.get('checkpoint/mb'), '.1f')} MB per rank"
        )
    lines.append("health")
    lines += [f"  {x}" for x in _health(s)]
    if "checkpoint.latest" in t:
        lines.append(f"latest checkpoint: step {t.get('checkpoint.latest_step')} "
                     f"{t['checkpoint.latest']}")  # fmt: skip
    if s.evals:
        lines.append("latest evaluation")
        for key, (step, value) in sorted(s.evals.items()):
            base = m.get(key + "_random_init")
            ref_txt = f" (random init {base:.4f})" if base is not None else ""
            lines.append(f"  {key} = {value:.4f} at step {step}{ref_txt}")
    return lines


def _health(s: Summary) -> list[str]:
    """One line per thing that went wrong (or 'no problems'), then the memory line."""
    m, t, out = s.metrics, s.tags, []
    restarts = int(t.get("restarts", 0))
    if restarts:
        out.append(f"restarted {restarts} time(s), resumed from checkpoints")
    if t.get("preempted") == "true":
        out.append(f"preempted by {t.get('preempt_signal', 'a signal')} at least once")
    if t.get("crashed") == "true":
        out.append("crashed (see the job's log)")
    if m.get("skipped_steps"):
        out.append(f"{int(m['skipped_steps'])} step(s) skipped for a non-finite or spiking "
                   "gradient")  # fmt: skip
    if m.get("rollbacks"):
        out.append(f"{int(m['rollbacks'])} rollback(s) to the last checkpoint")
    if s.failed_saves:
        out.append(f"checkpoint(s) not committed at step(s) {s.failed_saves}")
    if m.get("data_skipped") or m.get("data_retries"):
        out.append(f"data: {int(m.get('data_skipped', 0))} sample(s) skipped in the last "
                   f"interval (quarantine list in the artifacts), {int(m.get('data_retries', 0))} "
                   "fetch retries")  # fmt: skip
    wait = s.time_per_step.get("data", 0.0) / max(1e-12, sum(s.time_per_step.values()))
    if wait > 0.05:
        out.append(f"data-bound: {100 * wait:.1f}% of step time waiting for data")
    if not out:
        out.append("no problems: no restarts, skipped steps, failed saves or data faults")
    if "memory/max_gb" in m:
        out.append(f"memory per rank (peak): max {m['memory/max_gb']:.2f} GB, "
                   f"min {m['memory/min_gb']:.2f} GB")  # fmt: skip
    return out


def compare_runs(*refs: str) -> list[str]:
    """Two runs or more: their config differences, their last metrics (with the deltas of B
    against A when there are two), and the latest evaluation of each task and protocol."""
    if len(refs) < 2:
        raise ValueError("runs compare: name two runs or more")
    client = _client()
    found = [find_run(client, ref) for ref in refs]
    names = [chr(ord("A") + i) if i < 26 else f"R{i}" for i in range(len(found))]
    lines = [f"{n} = {r.info.run_id} {r.info.run_name} ({r.info.status})"
             for n, r in zip(names, found, strict=True)]  # fmt: skip
    lines.append(f"config ({' → '.join(names)})")
    params = [r.data.params for r in found]
    skip = ("train.run_dir", "checkpoint.root", "tracking.run_name", "mfu.peak_flops")
    keys = sorted(set().union(*params))
    diff = [k for k in keys if len({p.get(k) for p in params}) > 1 and k not in skip]
    lines += [f"  {k}: {' → '.join(p.get(k, '-') for p in params)}" for k in diff] or [
        "  identical"
    ]
    summaries = [summarize(client, r, history=False) for r in found]
    at = ", ".join(f"{n} at step {s.step}" for n, s in zip(names, summaries, strict=True))
    lines.append(f"last metrics ({at})")
    metric_keys = ["loss", "samples_per_s", "tokens_per_s", "mfu", "time/step_s",
                   "data_wait_fraction", "memory/max_gb", "checkpoint/stall_s"]  # fmt: skip
    values = [r.data.metrics for r in found]
    width = max(len(k) for k in metric_keys)
    for k in metric_keys:
        if all(k not in v for v in values):
            continue
        row = [v.get(k) for v in values]
        delta = ""
        if len(row) == 2 and row[0] is not None and row[1] is not None:
            va, vb = row[0], row[1]
            rel = f" ({100 * (vb - va) / abs(va):+.1f}%)" if va else ""
            delta = f"  {vb - va:+.4g}{rel}"
        lines.append(f"  {k:<{width}}" + "".join(f"  {_fmt(v):>10}" for v in row) + delta)
    lines += _eval_table(names, summaries)
    return lines


def _eval_table(names: list[str], summaries: list[Summary]) -> list[str]:
    """The latest value of every eval metric (task/protocol/metric) of each run, with its
    step: "-" where a run has none."""
    keys = sorted(set().union(*(s.evals for s in summaries)))
    if not keys:
        return ["evaluation: none logged (darkmatter evaluate --watch)"]
    rows = [k.removeprefix("eval/") for k in keys]
    width = max(len(r) for r in rows)
    out = ["evaluation, latest value @ step (task/protocol/metric)",
           f"  {'':<{width}}" + "".join(f"  {n:>12}" for n in names)]  # fmt: skip
    for key, row in zip(keys, rows, strict=True):
        cells = []
        for s in summaries:
            got = s.evals.get(key)
            cells.append(f"{got[1]:.4f}@{got[0]}" if got else "-")
        out.append(f"  {row:<{width}}" + "".join(f"  {c:>12}" for c in cells))
    return out


PROBE = "/linear_probe/accuracy"  # what the comparison plot draws against step, per task


def plot(refs: list[str], path: str) -> str:
    """Loss and throughput against step for each run, and, when the runs have evaluations,
    the linear probe's accuracy against step (one line per run and task; the random init's,
    dashed, for reference): one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    client = _client()
    found = [find_run(client, ref) for ref in refs]
    probes = sorted({k for r in found for k in r.data.metrics
                     if k.startswith("eval/") and k.endswith(PROBE)})  # fmt: skip
    fig, axes = plt.subplots(1, 3 if probes else 2, figsize=(16 if probes else 11, 4))
    ax_loss, ax_rate = axes[0], axes[1]
    for run in found:
        label = f"{run.info.run_name} ({run.info.run_id[:8]})"
        rate_key = "tokens_per_s" if "tokens_per_s" in run.data.metrics else "samples_per_s"
        for ax, key in ((ax_loss, "loss"), (ax_rate, rate_key)):
            hist = sorted(client.get_metric_history(run.info.run_id, key), key=lambda x: x.step)
            ax.plot([x.step for x in hist], [x.value for x in hist], label=label)
            ax.set_xlabel("step")
            ax.set_ylabel(key)
        for key in probes:
            if key not in run.data.metrics:
                continue
            task = key.removeprefix("eval/").removesuffix(PROBE)
            for suffix, style in (("", "-o"), ("_random_init", "--")):
                hist = sorted(client.get_metric_history(run.info.run_id, key + suffix),
                              key=lambda x: x.step)  # fmt: skip
                if hist:
                    axes[2].plot([x.step for x in hist], [x.value for x in hist], style,
                                 label=f"{label} {task}{' random init' if suffix else ''}")  # fmt: skip
    ax_loss.set_title("loss")
    ax_rate.set_title("throughput")
    ax_loss.legend(fontsize="small")
    if probes:
        axes[2].set_title("linear probe accuracy")
        axes[2].set_xlabel("step")
        axes[2].set_ylabel("accuracy")
        axes[2].legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def cli(argv: list[str]) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    p = argparse.ArgumentParser(prog="darkmatter runs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="cmd", required=True)
    ls = sub.add_parser("list", help="runs of an experiment, newest first",
                        description="The runs of an experiment, newest first: status, step, "
                        "loss, throughput, checkpoint and latest evaluation.")  # fmt: skip
    ls.add_argument("--experiment", default="darkmatter", help="its name (default %(default)s)")
    show = sub.add_parser("show", help="one run: progress, where the time went, health",
                          description="One run: its progress, where a step's time went, and "
                          "how healthy it is.")  # fmt: skip
    show.add_argument("run", help="run id, run name or run folder")
    show.add_argument("--plot", metavar="PNG", help="also draw loss and throughput vs step")
    cmp = sub.add_parser("compare", help="runs side by side: config, metrics, evaluations",
                         description="Two runs or more: their config differences, their last "
                         "metrics (with deltas for two), and the latest evaluation of each "
                         "task and protocol.")  # fmt: skip
    cmp.add_argument(
        "runs", nargs="+", metavar="RUN", help="run ids, run names or run folders (two or more)"
    )
    cmp.add_argument(
        "--plot", metavar="PNG", help="also draw loss, throughput and probe accuracy against step"
    )
    args = p.parse_args(argv)
    if args.cmd == "list":
        lines = list_runs(args.experiment)
    elif args.cmd == "show":
        lines = show_run(args.run)
    else:
        lines = compare_runs(*args.runs)
    if getattr(args, "plot", None):
        refs = [args.run] if args.cmd == "show" else args.runs
        lines.append(f"plot: {plot(refs, args.plot)}")
    print("\n".join(lines))
    return 0
