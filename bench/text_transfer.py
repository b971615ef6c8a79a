"""Text that transfers: probe margin over random init of the quickstart's text encoders, over
several pretraining seeds, on a task from another source than the pretraining text.

For each objective (mlm, span, clm) and seed: the quickstart's config (configs/quickstart_*.yaml)
trains on the quickstart's pretraining text (Webster's 1913 dictionary, Python's documentation,
the fortune files: darkmatter/quickstart/text_corpora.py), prepared once into a local folder,
with `train.seed` set, on 2 ranks, tracking off. Then `darkmatter evaluate` probes its final
checkpoint and the same architecture at random init, on the same split, on configs/tasks/text.yaml:
WordNet's noun supersenses (another source) and the fortune categories (the pretraining text's).
Only the pretraining seed changes between runs: the tasks' splits and the random-init twin are
the same for every run.

One JSON line a run on stderr; the last line of stdout: `wordnet_probe_margin` (the first
objective's mean linear-probe margin on WordNet, in points), and per objective, per task, the
linear probe's and kNN's margins (pretrained − random init, accuracy points) as mean and standard
deviation (n − 1) over the seeds, with the seeds and the random-init figures.

    python bench/text_transfer.py                         # mlm, seeds 0 1 2 (~30 min)
    python bench/text_transfer.py --objectives span clm --seeds 0
    python bench/text_transfer.py --quick                 # a smoke run: small corpus, 20 steps
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from _common import REPO_ROOT, log  # noqa: E402

TASKS = ("wordnet_supersenses", "fortunes_topics")
PROTOCOLS = ("linear_probe", "knn")


def prepare_data(tmp: Path, quick: bool) -> tuple[str, Path]:
    """The pretraining text prepared into `tmp`/text, and the tasks file pointing at local copies."""
    import yaml

    from darkmatter.data_pipeline.prepare import prepare
    from darkmatter.quickstart import run

    if quick:  # a slice of the same sources: the smoke run checks the path, not the figures
        from darkmatter.quickstart.text_corpora import python_doc_paragraphs

        lines = [json.dumps({"text": p}) for p in itertools.islice(python_doc_paragraphs(), 2000)]
        (tmp / "raw").mkdir()
        (tmp / "raw" / "docs.jsonl").write_text("\n".join(lines) + "\n")
        inputs = [str(tmp / "raw" / "docs.jsonl")]
    else:
        inputs = run.text_corpus(tmp / "raw")
    log(f"preparing {len(inputs)} inputs")
    prepare(inputs, str(tmp / "text"), modality="text", vocab_size=run.VOCAB_SIZE,
            workers=2, progress=False)  # fmt: skip
    spec = yaml.safe_load((REPO_ROOT / "configs" / "tasks" / "text.yaml").read_text())
    urls = {"wordnet_supersenses": run.wordnet_task(str(tmp / "wordnet.parquet")),
            "fortunes_topics": run.text_task(str(tmp / "fortunes.parquet"))}  # fmt: skip
    for task in spec["tasks"]:
        task["data"] = urls[task["name"]]
    (tmp / "tasks.yaml").write_text(yaml.safe_dump(spec))
    return str(tmp / "text"), tmp / "tasks.yaml"


def train_and_probe(
    tmp: Path, objective: str, seed: int, data: str, tasks: Path, steps: int
) -> dict[str, Any]:
    """One pretraining run and its probes: {task/protocol: (pretrained, random init)}."""
    name = f"{objective}-seed{seed}"
    run_dir = tmp / name
    overrides = [f"data.url={data}", f"train.run_dir={run_dir}", f"train.seed={seed}",
                 "tracking.enabled=false", "checkpoint.every=1000000"]  # fmt: skip
    if steps:
        overrides += [f"train.steps={steps}", f"train.warmup_steps={max(1, steps // 20)}"]
    config = REPO_ROOT / "configs" / f"quickstart_{objective}.yaml"
    for args in (["pretrain", str(config), *overrides, "--nproc", "2"],
                 ["evaluate", str(run_dir), "--tasks", str(tasks), "--no-mlflow",
                  "--output", str(tmp / f"{name}.json")]):  # fmt: skip
        log(f"{name}: darkmatter {args[0]}")
        proc = subprocess.run([sys.executable, "-m", "darkmatter.cli", *args], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=3600)  # fmt: skip
        if proc.returncode != 0:
            raise SystemExit(f"{name}: darkmatter {args[0]} failed ({proc.returncode}):\n"
                             + proc.stderr[-3000:])  # fmt: skip
    metrics: dict[str, float] = {}
    for line in (tmp / f"{name}.json").read_text().splitlines():
        metrics.update(json.loads(line)["metrics"])
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    out: dict[str, Any] = {"objective": objective, "seed": seed, "steps": last["step"],
                           "final_loss": round(last["loss"], 4)}  # fmt: skip
    for task in TASKS:
        for protocol in PROTOCOLS:
            key = f"eval/{task}/{protocol}/accuracy"
            out[f"{task}/{protocol}"] = [round(metrics[key], 4),
                                         round(metrics[key + "_random_init"], 4)]  # fmt: skip
    return out


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per objective and task/protocol: the margins' mean and standard deviation, in points."""
    out: dict[str, Any] = {}
    for objective in dict.fromkeys(r["objective"] for r in runs):
        mine = [r for r in runs if r["objective"] == objective]
        entry: dict[str, Any] = {"seeds": [r["seed"] for r in mine]}
        for task in TASKS:
            for protocol in PROTOCOLS:
                key = f"{task}/{protocol}"
                margins = [100 * (r[key][0] - r[key][1]) for r in mine]
                entry[key] = {
                    "margin_mean": round(statistics.mean(margins), 2),
                    "margin_std": round(statistics.stdev(margins), 2) if len(margins) > 1 else None,
                    "pretrained": [r[key][0] for r in mine], "random_init": mine[0][key][1],
                }  # fmt: skip
        out[objective] = entry
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objectives", nargs="+", default=["mlm"], choices=("mlm", "span", "clm"))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=0, help="override the configs' train.steps")
    ap.add_argument("--quick", action="store_true", help="small corpus, 20 steps, seed 0")
    args = ap.parse_args()
    seeds, steps = ([0], 20) if args.quick else (args.seeds, args.steps)
    runs = []
    with _common.workdir("dm-bench-text-") as tmp:
        data, tasks = prepare_data(tmp, args.quick)
        for objective in args.objectives:
            for seed in seeds:
                runs.append(train_and_probe(tmp, objective, seed, data, tasks, steps))
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    result = summary(runs)
    first = result[args.objectives[0]]["wordnet_supersenses/linear_probe"]["margin_mean"]
    _common.emit({"benchmark": "text_transfer", "machine": _common.machine(),
                  "quick": args.quick, "runs": len(runs),
                  "wordnet_probe_margin": first, **result})  # fmt: skip


if __name__ == "__main__":
    main()
