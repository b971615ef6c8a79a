"""Shared helpers for the benchmarks: a private local stack, synthetic data, machine facts.

Nothing here reads or writes outside the repository except a temporary folder that the
caller removes; no data is downloaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python bench/x.py` puts bench/, not the repo, on the path
    sys.path.insert(0, str(REPO_ROOT))


def log(msg: str) -> None:
    """Progress on stderr (stdout's last line is the JSON result)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    """A temporary folder, removed afterwards whatever happens."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def local_stack(root: Path) -> Iterator[Any]:
    """Our own SeaweedFS S3 + MLflow stack on free ports, state under `root`; os.environ points at it
    for the duration and is restored afterwards. The stack is always stopped."""
    from darkmatter.quickstart import stack

    log("starting the local stack (SeaweedFS S3 + MLflow)")
    with stack.private(root / "stack") as info:
        yield info


# -- synthetic data --------------------------------------------------------------------------

_COMMON = "the a of to and in is was for on that with as by at from it an be this which or are"
_TOPICAL = (
    "model data stream shard sample batch token image learning training gradient loss layer "
    "attention network vector matrix value signal noise river mountain forest city harbor "
    "engine window garden silver copper winter summer morning evening quiet rapid ancient "
    "modern bright distant narrow gentle simple complex careful curious several number"
)
_WORDS = f"{_COMMON} {_TOPICAL}".split()


def bench_bert(quick: bool) -> dict[str, int]:
    """The BERT the step-time benchmarks train: small for --quick, else a few hundred ms a step."""
    if quick:
        return {"hidden_size": 64, "num_layers": 1, "num_heads": 2, "intermediate_size": 128}
    return {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "intermediate_size": 1024}


def write_text_corpus(
    path: Path, docs: int, seed: int = 0, words: tuple[int, int] = (20, 150)
) -> Path:
    """`docs` documents, one per line, of words[0] to words[1] words drawn from a Zipf-like
    vocabulary."""
    import numpy as np

    rng = np.random.default_rng(seed)
    vocab = _WORDS + [f"w{i:04d}" for i in range(2000)]  # a long tail of rarer words
    weights = 1.0 / np.arange(1, len(vocab) + 1)
    weights /= weights.sum()
    lengths = rng.integers(words[0], words[1], size=docs)
    words = rng.choice(len(vocab), size=int(lengths.sum()), p=weights)
    with open(path, "w") as f:
        pos = 0
        for i, n in enumerate(lengths):
            body = " ".join(vocab[w] for w in words[pos : pos + n])
            pos += n
            f.write(f"document {i} {body}.\n")
    return path


def write_images(folder: Path, count: int, size: int = 128, seed: int = 0) -> Path:
    """`count` JPEG files (quality 90) of size x size RGB: an upscaled scikit-learn digit,
    tinted, over a random gradient, with noise, so decoding costs what a photo of that size
    does rather than what a flat image does."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    folder.mkdir(parents=True, exist_ok=True)
    digits = load_digits().images.astype(np.float32) / 16.0  # 1797 x 8 x 8
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for i in range(count):
        small = Image.fromarray((digits[i % len(digits)] * 255).astype(np.uint8))
        big = small.resize((size, size), Image.Resampling.BILINEAR)
        d = np.asarray(big, dtype=np.float32) / 255.0
        a, b, c = rng.uniform(-1, 1, size=3)
        grad = 0.5 + 0.25 * (a * xx + b * yy + c * np.sin(6.28 * (xx + yy) * rng.uniform(1, 4)))
        tint = rng.uniform(0.2, 1.0, size=3)
        img = grad[..., None] * (1 - d[..., None]) + d[..., None] * tint
        img += rng.normal(0, 0.04, size=img.shape)
        arr = (np.clip(img, 0, 1) * 255).astype(np.uint8)
        Image.fromarray(arr, "RGB").save(folder / f"img{i:06d}.jpg", quality=90)
    return folder


# -- measuring and reporting -----------------------------------------------------------------


def machine() -> str:
    """A one-line description of this machine."""
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except Exception:
        gpu = "no GPU"
    return (
        f"{platform.system()} {platform.release()} {platform.machine()}, "
        f"{os.cpu_count()} CPUs, {gpu}, Python {platform.python_version()}"
    )


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def pretrain_summary(config: Path, run_dir: Path, timeout: float) -> dict[str, Any]:
    """Run `darkmatter pretrain` and summarise its metrics.jsonl (intervals after the first)."""
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "darkmatter.cli", "pretrain", str(config)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"{config.name}: darkmatter pretrain failed ({proc.returncode}):\n"
                         + proc.stderr[-3000:])  # fmt: skip
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = rows[1:] or rows

    out: dict[str, Any] = {}
    for name, key in (("tokens_per_s", "tokens_per_s"), ("samples_per_s", "samples_per_s"),
                      ("mfu", "mfu"), ("model_tflops_per_s", "model_tflops_per_s"),
                      ("step_s", "time/step_s"), ("data_wait_fraction", "data_wait_fraction")):  # fmt: skip
        if key in steady[0]:  # tokens/s: text only
            out[name] = round(median([float(r[key]) for r in steady]), 4)
    out["peak_memory_gb"] = max(float(r["memory/max_gb"]) for r in rows)
    out["final_loss"] = round(float(rows[-1]["loss"]), 4)
    out["intervals"] = len(steady)
    return out


def run_ranks(n: int, script: str, args: list[str], what: str) -> None:
    """`script --worker ARGS` on `n` local ranks (torchrun, gloo); exits naming `what` if a
    rank fails."""
    import subprocess

    from darkmatter.quickstart.servers import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}",
           "--master-port", str(free_port()), str(Path(script).resolve()), "--worker", *args]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"{what}: the ranks failed ({proc.returncode}):\n" + proc.stderr[-3000:])


def emit(result: dict[str, Any]) -> None:
    """The benchmark's result: one JSON object, the last line of stdout."""
    print(json.dumps(result, sort_keys=False), flush=True)
