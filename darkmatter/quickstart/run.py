"""`make quickstart`: real data → shards in S3 → 2-process ZeRO-2 pretraining → checkpoints →
MLflow → the evaluation harness (linear probe and kNN on every checkpoint, logged into the run),
for MLM (text) and MAE (images), ending with `darkmatter runs show` for each run and one table.

Real, human-made data that installs offline:
- text (text_corpora.py): Webster's 1913 dictionary (GCIDE), the prose of Python's
  documentation and Debian's fortune-cookie files are the pretraining text (labels unused). Two
  downstream tasks: WordNet's noun definitions by supersense, a source the model never saw, and
  a balanced subset of eight fortune categories (335 each).
- images: the 1,797 handwritten digits bundled with scikit-learn (8×8, upscaled by the model).

Every step goes through the `darkmatter` command a user would type.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

FORTUNES = Path("/usr/share/games/fortunes")
# Eight categories with at least 335 fortunes each, so the labeled set is balanced and not tiny.
PROBE_CATEGORIES = [
    "computers", "definitions", "linux", "politics", "science", "songs-poems", "work", "zippy",
]  # fmt: skip
PER_CATEGORY = 335
# WordPiece vocabulary trained on the whole corpus. 4,000 rather than 8,000: the MLM head's
# softmax over the vocabulary is most of a step's cost on a CPU, and a smaller vocabulary lets
# the small model learn more in the same minutes (a clearly larger linear-probe margin).
VOCAB_SIZE = 4000
BUCKET = "s3://darkmatter/quickstart"
WORK = Path("runs/quickstart")


def fortune_files() -> list[Path]:
    if not (FORTUNES / "computers").is_file():
        raise SystemExit(f"{FORTUNES}: the fortunes corpus is missing (apt-get install fortunes)")
    return sorted(
        p for p in FORTUNES.iterdir()
        if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8")
    )  # fmt: skip


def fortune_docs(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    docs = (" ".join(d.split()) for d in re.split(r"^%$", text, flags=re.M))
    return [d for d in docs if len(d) > 20]


def write_parquet(rows: dict[str, list], url: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from darkmatter.storage import write_bytes

    buf = io.BytesIO()
    pq.write_table(pa.table(rows), buf)
    write_bytes(url, buf.getvalue())


def text_corpus(folder: Path) -> list[str]:
    """The pretraining text's inputs for prepare: a JSON-lines file of Webster's senses and
    Python's documentation written into `folder`, and the fortune files."""
    from darkmatter.quickstart.text_corpora import write_pretraining_jsonl

    folder.mkdir(parents=True, exist_ok=True)
    write_pretraining_jsonl(folder / "webster_and_python_docs.jsonl")
    return [str(folder / "webster_and_python_docs.jsonl"), *(str(p) for p in fortune_files())]


def wordnet_task(url: str = f"{BUCKET}/tasks/wordnet_supersenses.parquet") -> str:
    """The labeled Parquet of the other-source text task (eight WordNet supersenses) at `url`."""
    from darkmatter.quickstart.text_corpora import wordnet_task as rows

    write_parquet(rows(), url)
    return url


def text_task(url: str = f"{BUCKET}/tasks/fortunes_topics.parquet") -> str:
    """The labeled Parquet of the text probe (eight balanced categories) at `url`."""
    rng = np.random.default_rng(0)
    texts, labels = [], []
    for cat in PROBE_CATEGORIES:
        docs = fortune_docs(FORTUNES / cat)
        pick = rng.permutation(len(docs))[:PER_CATEGORY]
        texts += [docs[i] for i in sorted(pick)]
        labels += [cat] * len(pick)
    write_parquet({"text": texts, "label": labels}, url)
    return url


def digits(folder: Path, task_url: str) -> None:
    """PNG files in `folder` for pretraining (no labels) and a labeled Parquet for the probe."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    folder.mkdir(parents=True, exist_ok=True)
    pngs = []
    for i, img in enumerate(d.images):
        arr = (img * (255.0 / 16.0)).round().astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr, mode="L").convert("RGB").save(buf, format="PNG")
        (folder / f"{i:05d}.png").write_bytes(buf.getvalue())
        pngs.append(buf.getvalue())
    write_parquet({"image": pngs, "label": [int(t) for t in d.target]}, task_url)


def darkmatter(*args: str) -> str:
    """Run one `darkmatter` command, echoing it; return its stdout."""
    print("+ darkmatter " + " ".join(args), flush=True)
    proc = subprocess.run(
        [sys.executable, "-m", "darkmatter.cli", *args], stdout=subprocess.PIPE, text=True
    )
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        raise SystemExit(f"darkmatter {args[0]} failed with exit code {proc.returncode}")
    return proc.stdout


def train_and_probe(config: str, tasks: str) -> dict:
    """Pretrain, then let the evaluation harness evaluate every committed checkpoint of the run
    (`--once`: until none is left; in production it runs beside the training job, as its own)."""
    from mlflow.tracking import MlflowClient

    from darkmatter.evaluation.tasks import load_tasks
    from darkmatter.trainer.objectives import load_config

    cfg = load_config(config)
    run_dir = Path(cfg.train.run_dir)
    if run_dir.exists():  # the demo starts afresh; a real run would resume from its checkpoint
        print(f"removing the previous quickstart run {run_dir}", flush=True)
        shutil.rmtree(run_dir)
    darkmatter("pretrain", config, "--nproc", "2")
    run = json.loads((run_dir / "mlflow_run.json").read_text())
    darkmatter("evaluate", "--watch", run["run_id"], "--tasks", tasks, "--once")
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    task = load_tasks(tasks)[0].name

    def history(key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run["run_id"], key))

    probe = history(f"eval/{task}/linear_probe/accuracy")
    knn = history(f"eval/{task}/knn/accuracy")
    return {
        "objective": cfg.objective, "steps": last["step"], "final_loss": last["loss"],
        "task": task, "checkpoints": [s for s, _ in probe],
        "probe": [v for _, v in probe], "knn": [v for _, v in knn],
        "probe_random_init": history(f"eval/{task}/linear_probe/accuracy_random_init")[-1][1],
        "knn_random_init": history(f"eval/{task}/knn/accuracy_random_init")[-1][1],
        "mlflow_run": run["url"],
    }  # fmt: skip


def table(rows: list[dict]) -> str:
    """Accuracy of the linear probe and kNN at the first and the last checkpoint, and of the
    same architecture at random init."""
    cols = [("objective", "<9"), ("steps", ">5"), ("final loss", ">10"),
            ("probe first → last", ">18"), ("random init", ">11"),
            ("kNN first → last", ">16"), ("random init", ">11"), ("MLflow run", "")]  # fmt: skip
    lines = ["  ".join(f"{name:{fmt}}" for name, fmt in cols)]
    lines.append("-" * len(lines[0]))
    for r in rows:
        values = [r["objective"], str(r["steps"]), f"{r['final_loss']:.4f}",
                  f"{r['probe'][0]:.3f} → {r['probe'][-1]:.3f}", f"{r['probe_random_init']:.3f}",
                  f"{r['knn'][0]:.3f} → {r['knn'][-1]:.3f}", f"{r['knn_random_init']:.3f}",
                  r["mlflow_run"]]  # fmt: skip
        lines.append("  ".join(f"{v:{fmt}}" for v, (_, fmt) in zip(values, cols, strict=True)))
    return "\n".join(lines)


def main() -> int:
    from darkmatter.quickstart.stack import load_env_defaults
    from darkmatter.trainer.objectives import load_config

    if not load_env_defaults() and not os.environ.get("AWS_ENDPOINT_URL"):
        raise SystemExit("the local stack is not running: darkmatter stack up")
    WORK.mkdir(parents=True, exist_ok=True)
    files = text_corpus(WORK / "raw" / "text")
    darkmatter(
        "prepare",
        *files,
        "--output",
        f"{BUCKET}/text",
        "--modality",
        "text",
        "--vocab-size",
        str(VOCAB_SIZE),
    )
    wordnet_task()  # the Parquet files configs/tasks/*.yaml name
    text_task()
    digit_folder, digits_url = WORK / "raw" / "digits", f"{BUCKET}/tasks/digits.parquet"
    digits(digit_folder, digits_url)
    darkmatter("prepare", str(digit_folder), "--output", f"{BUCKET}/digits", "--modality", "image")
    rows = [
        train_and_probe("configs/quickstart_mlm.yaml", "configs/tasks/text.yaml"),
        train_and_probe("configs/quickstart_mae.yaml", "configs/tasks/digits.yaml"),
    ]
    (WORK / "summary.json").write_text(json.dumps(rows, indent=1))
    # What a user watching the run would read: where the time went, its health, its evaluation.
    for config in ("configs/quickstart_mlm.yaml", "configs/quickstart_mae.yaml"):
        darkmatter("runs", "show", load_config(config).train.run_dir)
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
