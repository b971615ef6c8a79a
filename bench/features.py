"""What each throughput feature buys: `darkmatter pretrain` with one feature switched on vs the
same job without it, on the same model, data and steps.

Features, each one config key (see trainer/config.py): `data.packing` (documents packed into
full rows instead of one padded row each), `train.activation_checkpointing` (recompute blocks
in backward), `model.attention` (sdpa vs the eager reference), `train.adamw_impl` (fused vs
torch's default), `train.compile` (torch.compile). The baseline is sdpa, default AdamW, no
packing, no checkpointing, no compile. Text documents are 20 to 150 words for a 128-token
sequence, so without packing a good part of every batch is padding.

Each job (single rank, ZeRO-2, fp32 on a CPU) runs twice, in the order baseline, features...,
features reversed, baseline, so drift in the machine's speed falls on all alike; figures are
the medians of the logged intervals after the first (compilation and warm-up fall in the
first), then of the two runs. `ratio` per feature = its real tokens/s / the baseline's;
`step_ratio` = its step time / the baseline's (packing changes tokens per step, so compare
tokens/s there).

    python bench/features.py           # ~6 minutes on 2 cores
    python bench/features.py --quick   # a small model, few steps
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from _common import log  # noqa: E402

FEATURES: dict[str, dict[str, dict[str, Any]]] = {
    "packing": {"data": {"packing": True}},
    "activation_checkpointing": {"train": {"activation_checkpointing": True}},
    "eager_attention": {"model": {"attention": "eager"}},
    "fused_adamw": {"train": {"adamw_impl": "fused"}},
    "compile": {"train": {"compile": True}},
}


def _config(tmp: Path, name: str, data_url: str, model: dict[str, Any], steps: int,
            rep: int, extra: dict[str, dict[str, Any]]) -> tuple[Path, Path]:  # fmt: skip
    import yaml

    run_dir = tmp / f"run-{name}-{rep}"
    raw: dict[str, dict[str, Any]] = {
        "data": {"url": data_url, "num_workers": 1, "seq_len": 128},
        "model": {**model, "dropout": 0.0},
        "train": {"steps": steps, "micro_batch_size": 16, "zero_stage": 2, "log_every": 5,
                  "warmup_steps": 5, "run_dir": str(run_dir)},
        "checkpoint": {"every": 10**9},
        "tracking": {"enabled": False},
    }  # fmt: skip
    for section, values in extra.items():
        raw[section] = {**raw[section], **values}
    path = tmp / f"{name}-{rep}.yaml"
    path.write_text(yaml.safe_dump({"objective": "mlm", **raw}))
    return path, run_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small model, few steps")
    ap.add_argument("--only", nargs="+", choices=sorted(FEATURES), help="some features only")
    args = ap.parse_args()
    steps = 15 if args.quick else 40
    model = _common.bench_bert(args.quick)
    names = ["baseline", *(args.only or FEATURES)]
    order = names + names[::-1]
    from darkmatter.data_pipeline.prepare import prepare

    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    with _common.workdir("dm-bench-features-") as tmp:
        corpus = _common.write_text_corpus(tmp / "corpus.txt", docs=4000)
        prepare([str(corpus)], str(tmp / "ds"), modality="text", vocab_size=2000)
        for i, name in enumerate(order):
            rep = 0 if i < len(names) else 1
            cfg, run_dir = _config(tmp, name, str(tmp / "ds"), model, steps, rep,
                                   FEATURES.get(name, {}))  # fmt: skip
            log(f"{name} (run {rep + 1} of 2): {steps} steps")
            runs[name].append(_common.pretrain_summary(cfg, run_dir, timeout=900))
    summary: dict[str, dict[str, float]] = {}
    for name, results in runs.items():
        summary[name] = {
            key: round(_common.median([r[key] for r in results]), 4)
            for key in ("tokens_per_s", "samples_per_s", "step_s", "peak_memory_gb")
        }
        summary[name]["runs_step_s"] = [r["step_s"] for r in results]  # type: ignore[assignment]
    base = summary["baseline"]
    for name in names[1:]:
        summary[name]["ratio"] = round(summary[name]["tokens_per_s"] / base["tokens_per_s"], 4)
        summary[name]["step_ratio"] = round(summary[name]["step_s"] / base["step_s"], 4)
    _common.emit({
        "benchmark": "features", "machine": _common.machine(), "model": model,
        "seq_len": 128, "micro_batch_size": 16, "steps": steps, "zero_stage": 2,
        "results": summary,
    })  # fmt: skip


if __name__ == "__main__":
    main()
