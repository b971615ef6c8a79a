"""The evaluator's memory does not grow with the labeled set: `evaluate_checkpoint` (features
a batch at a time into a file, kNN by blocks, the linear probe by mini-batches) on the
quickstart's WordNet task (3,200 definitions) and on 10x as many (32,000 drawn from all of
WordNet's 54,861 noun definitions, same 8 supersenses), each against what embedding one batch
costs.

The encoder is an export folder (`save_pretrained`, as `darkmatter export` writes it): a BERT of
hidden 512, 1 layer, WordPiece vocabulary trained on the definitions (~16k), 16 tokens; its
weights are most of its bytes, as in a large encoder, and a CPU embeds 64,000 definitions
(pretrained and random init) in minutes. Each figure comes from a fresh process that first
imports everything the evaluator uses, sets up its memory as `darkmatter evaluate` does
(harness.return_freed_memory_promptly) and loads the task, then measures the growth of its peak
resident memory (Linux's VmHWM, reset through /proc/self/clear_refs) over that baseline:

  * one_batch: the encoder loaded and one batch (128 definitions) embedded: the least an
    evaluator must hold (the model's fp32 bytes, one batch's activations, the runtime's own);
  * evaluate:  the whole evaluation of the task: linear probe and kNN on the pretrained encoder
    and on its random-init twin, the plots.

`peak_ratio` = evaluate / one_batch at 10x (target <= 1.3; it must not grow from 1x:
`peak_ratio_1x` beside it, and `growth_10x_mb`, the evaluate peak's difference). one_batch is
the median of three processes (the same encoder and batch each time). Also `features_per_s`
(the pretrained encoder's, 10x), the model's fp32 bytes, and each process's figures. One JSON
line. (The export is a fresh model, seed 0, as
is the random-init twin the evaluation compares it with: the accuracies say nothing here and
are left out.)

    python bench/eval_memory.py           # 1x and 10x (~10 min on 2 cores)
    python bench/eval_memory.py --quick   # 320 and 3,200 definitions, hidden 256 (~1 min)
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from _common import log  # noqa: E402

SEQ_LEN = 16
BATCH = 128  # embed()'s batch


def _kb(key: str) -> int:
    status = Path("/proc/self/status").read_text()
    match = re.search(rf"{key}:\s+(\d+) kB", status)
    assert match, key
    return int(match.group(1)) * 1024


def make_inputs(tmp: Path, n_small: int, n_large: int, hidden: int) -> dict[str, Any]:
    """The two task files and the export folder (an encoder with a tokenizer trained on the
    definitions)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    from darkmatter.data_pipeline.prepare.tokenizer import train_tokenizer
    from darkmatter.quickstart.text_corpora import wordnet_definitions, wordnet_task

    everything = wordnet_definitions()
    texts = [t for defs in everything.values() for t in defs]
    labels = [name for name, defs in everything.items() for _ in defs]
    rng = np.random.default_rng(0)
    large = rng.permutation(len(texts))[:n_large]
    pq.write_table(pa.table({"text": [texts[i] for i in large],
                             "label": [labels[i] for i in large]}), tmp / "large.parquet")  # fmt: skip
    small = wordnet_task(0)
    if n_small < len(small["text"]):
        pick = np.sort(rng.permutation(len(small["text"]))[:n_small])
        small = {k: [v[i] for i in pick] for k, v in small.items()}
    pq.write_table(pa.table(small), tmp / "small.parquet")

    tok = train_tokenizer(lambda _name: iter(texts), vocab_size=30522)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=SEQ_LEN,
                                   unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")  # fmt: skip
    export = tmp / "export"
    fast.save_pretrained(str(export))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=1,
                        num_attention_heads=hidden // 64, intermediate_size=4 * hidden,
                        max_position_embeddings=SEQ_LEN)  # fmt: skip
    model = BertModel(config, add_pooling_layer=False)
    model.save_pretrained(str(export))
    params = sum(p.numel() for p in model.parameters())
    return {"export": str(export), "vocab": tok.get_vocab_size(), "model_fp32_bytes": 4 * params,
            "small": str(tmp / "small.parquet"), "large": str(tmp / "large.parquet")}  # fmt: skip


def child(mode: str, export: str, task: str) -> None:
    """One measurement, in this fresh process: the peak growth over the baseline, as JSON."""
    import time

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401  (the plots' imports, before the baseline)
    import numpy as np
    import sklearn.decomposition  # noqa: F401
    import torch

    from darkmatter.evaluation.checkpoints import ExportRef, load_encoder
    from darkmatter.evaluation.harness import (
        _inputs,
        evaluate_checkpoint,
        return_freed_memory_promptly,
    )
    from darkmatter.evaluation.probe import embed
    from darkmatter.evaluation.tasks import TaskSpec, load_labeled

    torch.set_num_threads(2)
    return_freed_memory_promptly()  # as `darkmatter evaluate` does first, in both modes
    ref = ExportRef(Path(export))
    spec = TaskSpec(name="wordnet", data=task, protocols={"linear_probe": {}, "knn": {}})
    data = load_labeled(spec)
    before = _kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    t0 = time.perf_counter()
    out: dict[str, Any] = {"mode": mode, "examples": len(data.labels)}
    if mode == "one_batch":
        model = load_encoder(ref)
        feats = embed(model, _inputs(ref, data)(np.arange(BATCH)))
        out["dim"] = int(feats.shape[1])
    else:
        outcome = evaluate_checkpoint(ref, [spec], device="cpu")
        out["features_per_s"] = round(outcome.timings["wordnet/features_per_s"], 1)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["peak_growth_bytes"] = _kb("VmHWM") - before
    print(json.dumps(out), flush=True)


def measure(mode: str, inputs: dict[str, Any], task: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", mode, inputs["export"], task],
        stdout=subprocess.PIPE, text=True, cwd=_common.REPO_ROOT,
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"eval_memory: the {mode} process failed (exit {proc.returncode})")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    log(f"{mode} on {result['examples']} examples: {result}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", nargs=3, metavar=("MODE", "EXPORT", "TASK"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    n_small, n_large, hidden = (320, 3200, 256) if args.quick else (3200, 32000, 512)
    mb = 2**20
    with _common.workdir("dm-bench-evalmem-") as tmp:
        log(f"task files ({n_small} and {n_large} definitions) and a hidden-{hidden} export")
        inputs = make_inputs(tmp, n_small, n_large, hidden)
        # The same encoder and batch whatever the set: three processes, the median (one such
        # process alone varies by ~5% with the allocator).
        ones = [measure("one_batch", inputs, task)["peak_growth_bytes"]
                for task in (inputs["small"], inputs["large"], inputs["small"])]  # fmt: skip
        evals = {size: measure("evaluate", inputs, inputs[task])
                 for size, task in (("1x", "small"), ("10x", "large"))}  # fmt: skip
    one = _common.median([float(x) for x in ones])
    peak = {size: e["peak_growth_bytes"] for size, e in evals.items()}
    _common.emit({
        "bench": "eval_memory", "examples_1x": n_small, "examples_10x": n_large,
        "hidden": hidden, "vocab": inputs["vocab"], "model_fp32_mb": round(inputs["model_fp32_bytes"] / mb, 1),
        "one_batch_mb": round(one / mb, 1), "one_batch_mb_runs": [round(x / mb, 1) for x in ones],
        "evaluate_mb_1x": round(peak["1x"] / mb, 1), "evaluate_mb_10x": round(peak["10x"] / mb, 1),
        "peak_ratio_1x": round(peak["1x"] / one, 3), "peak_ratio": round(peak["10x"] / one, 3),
        "growth_10x_mb": round((peak["10x"] - peak["1x"]) / mb, 1),
        "features_per_s": evals["10x"]["features_per_s"], "evaluate_s_10x": evals["10x"]["seconds"],
        "machine": _common.machine(),
    })  # fmt: skip


if __name__ == "__main__":
    main()
