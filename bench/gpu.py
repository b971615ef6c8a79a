"""GPU throughput: BERT-large MLM (seq 512) and ViT-L MAE (224 px, 16 px patches) trained by
`darkmatter pretrain` on one GPU in bf16, for a fixed number of steps.

Each model trains in its own `darkmatter pretrain` process (one rank, ZeRO-1, tracking off) on
synthetic shards written to a local folder first: text documents longer than the sequence, so
no position is padding; JPEGs decoded in the data workers as real photos would be. Figures are
the medians of the logged intervals after the first (which holds start-up and the first
allocations): tokens/s, samples/s, MFU (the trainer's own formula against the device's dense
bf16 peak), peak memory, step time and the share of it spent waiting for data; the settings
used go into the JSON too. `mlm_mfu_vs_target` = BERT-large MFU / 0.50.

Settings: bf16, ZeRO-1, SDPA attention (flash kernels on the GPU), fused AdamW; `--compile`
adds torch.compile, `--activation-checkpointing` recomputation, `--attention` another kernel,
`--deterministic` train.deterministic (run with and without it: its cost).

    python bench/gpu.py            # on a GPU machine, about 5 minutes on an H100/H200
    python bench/gpu.py --tiny     # tiny models, a few steps, on a CPU (a smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from _common import log  # noqa: E402

# (full, tiny) settings per model.
MLM = {
    "full": {"model": {"hidden_size": 1024, "num_layers": 24, "num_heads": 16,
                       "intermediate_size": 4096, "mask_ratio": 0.15, "dropout": 0.1},
             "seq_len": 512, "micro_batch_size": 32, "vocab_size": 30522, "docs": 4000,
             "words": (700, 900)},
    "tiny": {"model": {"hidden_size": 64, "num_layers": 2, "num_heads": 2,
                       "intermediate_size": 128, "mask_ratio": 0.15, "dropout": 0.1},
             "seq_len": 64, "micro_batch_size": 4, "vocab_size": 500, "docs": 200,
             "words": (80, 120)},
}  # fmt: skip
MAE = {
    "full": {"model": {"hidden_size": 1024, "num_layers": 24, "num_heads": 16,
                       "intermediate_size": 4096, "patch_size": 16, "decoder_hidden_size": 512,
                       "decoder_num_layers": 8, "mask_ratio": 0.75, "dropout": 0.0},
             "image_size": 224, "micro_batch_size": 128, "images": 2048},
    "tiny": {"model": {"hidden_size": 64, "num_layers": 2, "num_heads": 2,
                       "intermediate_size": 128, "patch_size": 8, "decoder_hidden_size": 32,
                       "decoder_num_layers": 1, "mask_ratio": 0.75, "dropout": 0.0},
             "image_size": 32, "micro_batch_size": 4, "images": 64},
}  # fmt: skip


def _config(tmp: Path, name: str, objective: str, data: dict[str, Any], model: dict[str, Any],
            micro_batch_size: int, steps: int, log_every: int, workers: int,
            features: dict[str, Any]) -> Path:  # fmt: skip
    import yaml

    raw = {
        "objective": objective,
        "data": {**data, "num_workers": workers},
        "model": {**model, "attention": features["attention"]},
        "train": {"steps": steps, "micro_batch_size": micro_batch_size, "zero_stage": 1,
                  "bf16": True, "log_every": log_every, "warmup_steps": 5,
                  "run_dir": str(tmp / f"run-{name}"), "adamw_impl": features["adamw_impl"],
                  "compile": features["compile"],
                  "activation_checkpointing": features["activation_checkpointing"],
                  "deterministic": features["deterministic"]},
        "checkpoint": {"every": 10**9},
        "tracking": {"enabled": False},
    }  # fmt: skip
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny models on a CPU (smoke test)")
    ap.add_argument("--steps", type=int, default=0, help="steps per model (default 60; tiny 6)")
    ap.add_argument("--only", choices=("mlm", "mae"), help="one model only")
    ap.add_argument("--workers", type=int, default=0, help="data workers (default: cores / 2)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the models")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--deterministic", action="store_true",
                    help="train.deterministic: what reproducible losses cost")  # fmt: skip
    ap.add_argument("--attention", default="sdpa", choices=("sdpa", "eager", "flash_attention_2"))
    args = ap.parse_args()
    size = "tiny" if args.tiny else "full"
    steps = args.steps or (6 if args.tiny else 60)
    log_every = 2 if args.tiny else 10
    workers = args.workers or max(1, min(8, (os.cpu_count() or 2) // 2))
    import torch

    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py: no GPU here (use --tiny for the CPU smoke test)")
    from darkmatter.data_pipeline.prepare import prepare

    features = {
        "attention": args.attention, "compile": args.compile,
        "activation_checkpointing": args.activation_checkpointing,
        "deterministic": args.deterministic,
        "adamw_impl": "fused" if torch.cuda.is_available() else "foreach",
    }  # fmt: skip
    result: dict[str, Any] = {"benchmark": "gpu", "machine": _common.machine(), "size": size,
                              "steps": steps, "torch": torch.__version__}  # fmt: skip
    with _common.workdir("dm-bench-gpu-") as tmp:
        if args.only in (None, "mlm"):
            s = MLM[size]
            log(f"MLM: writing {s['docs']} documents of {s['words']} words, preparing shards")
            corpus = _common.write_text_corpus(tmp / "corpus.txt", s["docs"], words=s["words"])
            prepare([str(corpus)], str(tmp / "text"), modality="text",
                    vocab_size=int(s["vocab_size"]))  # fmt: skip
            vocab = json.loads((tmp / "text" / "tokenizer.json").read_text())["model"]["vocab"]
            cfg = _config(tmp, "mlm", "mlm", {"url": str(tmp / "text"), "seq_len": s["seq_len"]},
                          s["model"], s["micro_batch_size"], steps, log_every, workers,
                          features)  # fmt: skip
            log(f"MLM: {steps} steps of BERT ({size}), seq {s['seq_len']}")
            result["mlm"] = _common.pretrain_summary(cfg, tmp / "run-mlm", timeout=1800)
            result["mlm"]["settings"] = {
                **s["model"], "seq_len": s["seq_len"], "micro_batch_size": s["micro_batch_size"],
                "vocab_size": len(vocab), "bf16": True, "zero_stage": 1, "data_workers": workers,
                **features,
            }  # fmt: skip
            result["mlm_mfu_vs_target"] = round(result["mlm"]["mfu"] / 0.50, 4)
        if args.only in (None, "mae"):
            s = MAE[size]
            log(f"MAE: writing {s['images']} JPEGs of {s['image_size']} px, preparing shards")
            _common.write_images(tmp / "jpg", s["images"], size=int(s["image_size"]))
            prepare([str(tmp / "jpg")], str(tmp / "images"), modality="image")
            data = {"url": str(tmp / "images"), "image_size": s["image_size"]}
            cfg = _config(tmp, "mae", "mae", data, s["model"], s["micro_batch_size"], steps,
                          log_every, workers, features)  # fmt: skip
            log(f"MAE: {steps} steps of ViT-MAE ({size}), {s['image_size']} px")
            result["mae"] = _common.pretrain_summary(cfg, tmp / "run-mae", timeout=1800)
            result["mae"]["settings"] = {
                **s["model"], "image_size": s["image_size"], "bf16": True, "zero_stage": 1,
                "micro_batch_size": s["micro_batch_size"], "data_workers": workers, **features,
            }  # fmt: skip
    _common.emit(result)


if __name__ == "__main__":
    main()
