"""`make quickstart`: real data → shards in S3 → 2-process ZeRO-2 pretraining → checkpoint →
MLflow → linear probe, for MLM (text) and MAE (images), ending with `darkmatter runs show` for
each run and one table.

Real, human-made data that installs offline:
- text: Debian's fortune-cookie files (package `fortunes`), one category per file. Every file is
  pretraining text (labels unused); a balanced labeled subset of eight categories (335 each) is
  the probe's downstream task.
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

    from data_pipeline.storage import write_bytes

    buf = io.BytesIO()
    pq.write_table(pa.table(rows), buf)
    write_bytes(url, buf.getvalue())


def text_task() -> str:
    rng = np.random.default_rng(0)
    texts, labels = [], []
    for cat in PROBE_CATEGORIES:
        docs = fortune_docs(FORTUNES / cat)
        pick = rng.permutation(len(docs))[:PER_CATEGORY]
        texts += [docs[i] for i in sorted(pick)]
        labels += [cat] * len(pick)
    url = f"{BUCKET}/tasks/fortunes_topics.parquet"
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
        [sys.executable, "-m", "trainer.cli", *args], stdout=subprocess.PIPE, text=True
    )
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        raise SystemExit(f"darkmatter {args[0]} failed with exit code {proc.returncode}")
    return proc.stdout


def train_and_probe(config: str, task_url: str, task: str) -> dict:
    from trainer.config import load_config

    cfg = load_config(config)
    run_dir = Path(cfg.train.run_dir)
    if run_dir.exists():  # the demo starts afresh; a real run would resume from its checkpoint
        print(f"removing the previous quickstart run {run_dir}", flush=True)
        shutil.rmtree(run_dir)
    darkmatter("pretrain", config, "--nproc", "2")
    out = darkmatter("evaluate", str(run_dir), "--task", task_url, "--name", task)
    result = json.loads(out.strip().splitlines()[-1])
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    run = json.loads((run_dir / "mlflow_run.json").read_text())
    return {
        "objective": cfg.objective, "steps": last["step"], "final_loss": last["loss"],
        "probe_pretrained": result["pretrained"]["accuracy"],
        "probe_random_init": result["random_init"]["accuracy"], "mlflow_run": run["url"],
    }  # fmt: skip


def table(rows: list[dict]) -> str:
    head = f"{'objective':<10} {'steps':>6} {'final loss':>11} {'probe (pretrained)':>19} {'probe (random init)':>20}  MLflow run"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['objective']:<10} {r['steps']:>6} {r['final_loss']:>11.4f} "
            f"{r['probe_pretrained']:>19.3f} {r['probe_random_init']:>20.3f}  {r['mlflow_run']}"
        )
    return "\n".join(lines)


def main() -> int:
    from trainer.config import load_config
    from trainer.stack import load_env_defaults

    if not load_env_defaults() and not os.environ.get("AWS_ENDPOINT_URL"):
        raise SystemExit("the local stack is not running: darkmatter stack up")
    WORK.mkdir(parents=True, exist_ok=True)
    files = [str(p) for p in fortune_files()]
    darkmatter(
        "prepare",
        *files,
        "--output",
        f"{BUCKET}/fortunes",
        "--modality",
        "text",
        "--vocab-size",
        str(VOCAB_SIZE),
    )
    text_url = text_task()
    digit_folder, digits_url = WORK / "raw" / "digits", f"{BUCKET}/tasks/digits.parquet"
    digits(digit_folder, digits_url)
    darkmatter("prepare", str(digit_folder), "--output", f"{BUCKET}/digits", "--modality", "image")
    rows = [
        train_and_probe("configs/quickstart_mlm.yaml", text_url, "fortunes_topics"),
        train_and_probe("configs/quickstart_mae.yaml", digits_url, "digits"),
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
