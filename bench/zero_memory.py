"""ZeRO memory against the formula: per-rank bytes of model states under ZeRO 0/1/2/3, 2 ranks.

The ZeRO paper (Rajbhandari et al., 2020, section 3 and figure 1) gives the model-state memory of
one rank training Ψ parameters with mixed-precision Adam on N data-parallel ranks as

    ZeRO-0 (plain data parallel)   (2 + 2 + K) Ψ
    ZeRO-1 (optimizer states)      (2 + 2) Ψ + K Ψ / N
    ZeRO-2 (+ gradients)           2 Ψ + (2 + K) Ψ / N
    ZeRO-3 (+ parameters)          (2 + 2 + K) Ψ / N

with 2 bytes per parameter for the bf16 weights, 2 for their gradients and K = 12 for Adam's
fp32 master weights, momentum and variance.

Measured: two ranks (torchrun, gloo) build the trainer's BERT-MLM model through the trainer's own
engine factory and DeepSpeed config, bf16, and take three optimizer steps. In the last step, once
backward has finished (the reduced gradients, the weights and the optimizer states all exist) and
again after the optimizer step, every live tensor storage of the process is found with the
garbage collector and counted once (storages shared by views are counted once; the input batch
is left out). This is an upper bound of the model states: it includes whatever else DeepSpeed
keeps in tensors (communication buckets, flat buffers), so a framework buffer sized for a bigger
model shows up here. Per rank, the larger of the two moments; per stage, the larger of the two
ranks. `ratio` = measured / formula; `worst_ratio` = the largest over the stages. bf16 and fp32
bytes are also reported apart: bf16 holds weights and gradients, fp32 the optimizer states.

The build itself (`build` in the result): the same 2 ranks build a BERT-large MLM model (hidden
1024, 24 layers, 16 heads, intermediate 4096, vocabulary 30522: 335M parameters, fp32) the way
the trainer does (trainer.engine.model_construction): partitioned under ZeRO-3 (deepspeed.zero.Init)
and whole, as ZeRO-0/1/2 build it. Measured right after construction: the parameter bytes the
rank holds (its partitions, or the whole tensors); `build.ratio` = partitioned / whole (2 ranks:
0.5 is perfect). The process's peak RSS after each build is reported too, for what it is worth:
the partitioned build runs first, and the peak counts the interpreter, torch and DeepSpeed
(about 0.6 GB) and whatever the allocator keeps: with glibc's default, adaptive mmap threshold
the full-size tensors a partitioned build frees, module after module, stay in the heap, and its
peak can pass the whole build's (MALLOC_MMAP_THRESHOLD_=131072 in the environment shows the
difference).

    python bench/zero_memory.py            # ~2 minutes on 2 cores
    python bench/zero_memory.py --quick    # a smaller model (smoke test)
    python bench/zero_memory.py --no-build # the training stages only
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from _common import log  # noqa: E402

# DeepSpeed 0.19's defaults for the fields the trainer sizes by the model under ZeRO-3.
DEEPSPEED_DEFAULTS = {"reduce_bucket_size": 500_000_000, "stage3_prefetch_bucket_size": 50_000_000,
                      "stage3_param_persistence_threshold": 100_000}  # fmt: skip
K_ADAM = 12  # bytes of optimizer state per parameter: fp32 master, momentum, variance
# The build figure's model: BERT-large (Devlin et al. 2019), 335M parameters with its MLM head.
BERT_LARGE = {"hidden_size": 1024, "num_layers": 24, "num_heads": 16, "intermediate_size": 4096}
BERT_LARGE_VOCAB = 30522


def formula(stage: int, psi: int, n: int) -> dict[str, float]:
    """The paper's per-rank model-state bytes, split as weights + gradients (bf16) and optimizer
    states (fp32)."""
    weights = 2 * psi / (n if stage >= 3 else 1)
    grads = 2 * psi / (n if stage >= 2 else 1)
    optim = K_ADAM * psi / (n if stage >= 1 else 1)
    return {"bf16": weights + grads, "fp32": optim, "total": weights + grads + optim}


def live_storages(exclude: set[int]) -> dict[int, tuple[int, Any]]:
    """data_ptr -> (bytes, dtype) of every tensor storage reachable from Python (a tensor, or
    its .grad), each storage once."""
    import torch

    gc.collect()
    seen: dict[int, tuple[int, Any]] = {}
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor):
                continue
            for t in (obj, obj.grad):
                if t is None or t.is_meta:
                    continue
                s = t.untyped_storage()
                ptr = s.data_ptr()
                if ptr and s.nbytes() and ptr not in exclude:
                    seen[ptr] = (s.nbytes(), t.dtype)
        except (RuntimeError, ReferenceError, NotImplementedError):
            continue  # tensors that have no storage (sparse, functional wrappers)
    return seen


def summarize(storages: dict[int, tuple[int, Any]]) -> dict[str, int]:
    import torch

    out = {"total": 0, "bf16": 0, "fp32": 0, "other": 0}
    for nbytes, dtype in storages.values():
        out["total"] += nbytes
        key = {torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, "other")
        out[key] += nbytes
    return out


def held_bytes(model: Any) -> tuple[int, int]:
    """(bytes of parameters this rank holds, bytes of the whole parameters), each tensor once: a
    ZeRO-3 parameter holds its partition (`ds_tensor`) and a 0-element placeholder."""
    held = whole = 0
    for p in {id(p): p for p in model.parameters()}.values():
        held += p.data.numel() * p.element_size()
        if hasattr(p, "ds_tensor"):
            held += p.ds_tensor.numel() * p.ds_tensor.element_size()
        whole += int(getattr(p, "ds_numel", p.numel())) * p.element_size()
    return held, whole


def measure_build(args: argparse.Namespace, world: int) -> dict[str, Any]:
    """This rank's parameter bytes right after building the MLM model partitioned (ZeRO-3) and
    whole (ZeRO-2), fp32, through the trainer's own build context; partitioned first, since a
    process's peak RSS only rises."""
    import resource
    import time

    import torch
    from transformers.integrations import HfDeepSpeedConfig

    from darkmatter.data_pipeline.prepare import DEFAULT_SPECIAL_IDS
    from darkmatter.trainer import engine as eng
    from darkmatter.trainer.config import deepspeed_config
    from darkmatter.trainer.objectives import OBJECTIVES, load_config

    model = _common.bench_bert(True) if args.quick else BERT_LARGE
    vocab = args.vocab if args.quick else BERT_LARGE_VOCAB
    out: dict[str, Any] = {}
    for stage, name in ((3, "partitioned"), (2, "whole")):
        raw = {"objective": "mlm", "data": {"url": "unused", "seq_len": 512},
               "model": model, "train": {"steps": 1, "micro_batch_size": 1, "zero_stage": stage},
               "tracking": {"enabled": False}}  # fmt: skip
        path = Path(args.out) / f"build{stage}-rank{eng.local_rank()}.yaml"
        path.write_text(json.dumps(raw))  # YAML reads JSON
        cfg = load_config(path)
        meta = {"vocab_size": vocab, "special_tokens": DEFAULT_SPECIAL_IDS}
        objective = OBJECTIVES["mlm"](cfg, meta)
        ds = deepspeed_config(cfg, world)
        hf_ds = HfDeepSpeedConfig(ds)  # alive while building, as in build_engine
        torch.manual_seed(0)
        eng.barrier()
        t0 = time.perf_counter()
        with eng.model_construction(ds):
            built = objective.build_model()
        seconds = time.perf_counter() - t0
        held, whole = held_bytes(built)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        out[name] = {"held_bytes": held, "whole_bytes": whole, "seconds": round(seconds, 2),
                     "peak_rss_bytes": rss}  # fmt: skip
        del built, hf_ds
        gc.collect()
        eng.barrier()
    return out


def worker(args: argparse.Namespace) -> None:
    """One rank: every stage in turn, in one process group; results to OUT/rank<r>.json."""
    import numpy as np
    import torch
    import yaml

    from darkmatter.data_pipeline.prepare import DEFAULT_SPECIAL_IDS
    from darkmatter.trainer import engine as eng
    from darkmatter.trainer.config import deepspeed_config
    from darkmatter.trainer.objectives import OBJECTIVES, load_config

    rank, world, _ = eng.init_distributed()
    out_dir = Path(args.out)
    if args.build:
        build = measure_build(args, world)
        (out_dir / f"build-rank{rank}.json").write_text(json.dumps(build))
    results = []
    for stage in args.stages:
        raw = {
            "objective": "mlm",
            "data": {"url": "unused", "seq_len": args.seq_len},
            "model": {**_common.bench_bert(args.quick), "dropout": 0.0},
            "train": {"steps": 10, "micro_batch_size": 4, "zero_stage": stage, "bf16": True,
                      "warmup_steps": 1, "run_dir": str(out_dir / "run")},
            "tracking": {"enabled": False},
        }  # fmt: skip
        if args.deepspeed_defaults:  # DeepSpeed's own bucket sizes instead of the trainer's
            raw["deepspeed"] = {"zero_optimization": DEEPSPEED_DEFAULTS}
        path = out_dir / f"stage{stage}-rank{rank}.yaml"  # ranks write at once
        path.write_text(yaml.safe_dump(raw))
        cfg = load_config(path)
        meta = {"vocab_size": args.vocab, "special_tokens": DEFAULT_SPECIAL_IDS}  # ids 0..4
        objective = OBJECTIVES["mlm"](cfg, meta)
        ds = deepspeed_config(cfg, world)
        engine, hf_ds = eng.build_engine(cfg, ds, objective.build_model)
        psi = sum(int(getattr(p, "ds_numel", p.numel())) for p in engine.module.parameters())
        rng = np.random.RandomState(rank)
        moments = {}
        for step in range(3):
            samples = [{"input_ids": rng.randint(5, args.vocab, args.seq_len)} for _ in range(4)]
            gen = torch.Generator().manual_seed(step)
            batch = objective.to_device(objective.make_batch(samples, gen), engine.device, True)
            loss = engine(**batch).loss
            engine.backward(loss)
            inputs = {t.untyped_storage().data_ptr() for t in batch.values() if torch.is_tensor(t)}
            if step == 2:
                moments["after_backward"] = summarize(live_storages(inputs))
            engine.step()
            if step == 2:
                moments["after_step"] = summarize(live_storages(inputs))
            del batch, loss
        peak = max(moments.values(), key=lambda m: m["total"])
        results.append({"stage": stage, "psi": psi, "moments": moments, "measured": peak})
        engine.destroy()
        del engine, hf_ds
        gc.collect()
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results))
    eng.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smaller model (smoke test)")
    ap.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument(
        "--no-build",
        dest="build",
        action="store_false",
        help="leave out the build figure (BERT-large built partitioned and whole)",
    )
    ap.add_argument("--deepspeed-defaults", action="store_true",
                    help="ZeRO-3 with DeepSpeed's default bucket sizes (for comparison)")  # fmt: skip
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    n = 2
    with _common.workdir("dm-bench-zero-") as tmp:
        log(f"ZeRO stages {args.stages} on {n} ranks (torchrun, gloo), bf16")
        args_ = ["--out", str(tmp), "--vocab", str(args.vocab), "--seq-len", str(args.seq_len),
                 "--stages", *map(str, args.stages)]  # fmt: skip
        args_ += ["--quick"] * args.quick + ["--deepspeed-defaults"] * args.deepspeed_defaults
        args_ += ["--no-build"] * (not args.build)
        _common.run_ranks(n, __file__, args_, "zero_memory")
        ranks = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(n)]
        builds = [json.loads((tmp / f"build-rank{r}.json").read_text()) for r in range(n)
                  if args.build]  # fmt: skip
    stages: dict[str, Any] = {}
    for i, stage in enumerate(args.stages):
        per_rank = [ranks[r][i] for r in range(n)]
        psi = per_rank[0]["psi"]
        measured = max((r["measured"] for r in per_rank), key=lambda m: m["total"])
        f = formula(stage, psi, n)
        stages[f"zero{stage}"] = {
            "measured_bytes": measured["total"], "formula_bytes": int(f["total"]),
            "ratio": round(measured["total"] / f["total"], 4),
            "measured_per_param": round(measured["total"] / psi, 3),
            "formula_per_param": round(f["total"] / psi, 3),
            "measured_bf16_bytes": measured["bf16"], "formula_bf16_bytes": int(f["bf16"]),
            "measured_fp32_bytes": measured["fp32"], "formula_fp32_bytes": int(f["fp32"]),
            "measured_other_bytes": measured["other"],
            "per_rank_bytes": [r["measured"]["total"] for r in per_rank],
        }  # fmt: skip
    _common.emit({
        "benchmark": "zero_memory", "machine": _common.machine(), "ranks": n,
        "parameters": ranks[0][0]["psi"], "precision": "bf16 weights and gradients, fp32 Adam",
        "model": _common.bench_bert(args.quick), "deepspeed_default_buckets": args.deepspeed_defaults,
        "stages": stages,
        **({"build": build_summary(builds, args)} if builds else {}),
        "worst_ratio": max(s["ratio"] for s in stages.values()),
    })  # fmt: skip


def build_summary(builds: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """The build figure from every rank's: per build, the larger rank's bytes."""
    part = max(b["partitioned"]["held_bytes"] for b in builds)
    whole = max(b["whole"]["held_bytes"] for b in builds)
    return {
        "model": _common.bench_bert(True) if args.quick else BERT_LARGE,
        "vocab": args.vocab if args.quick else BERT_LARGE_VOCAB,
        "parameters": builds[0]["whole"]["whole_bytes"] // 4, "precision": "fp32 parameters",
        "partitioned_bytes_per_rank": part, "whole_bytes_per_rank": whole,
        "ratio": round(part / whole, 4),
        "per_rank_partitioned_bytes": [b["partitioned"]["held_bytes"] for b in builds],
        "seconds": {k: max(b[k]["seconds"] for b in builds) for k in ("partitioned", "whole")},
        "peak_rss_bytes_after": {k: max(b[k]["peak_rss_bytes"] for b in builds)
                                 for k in ("partitioned", "whole")},
    }  # fmt: skip


if __name__ == "__main__":
    main()
