"""The memory plan (`darkmatter pretrain --plan`) against the measured peak, 2 ranks.

Three small jobs, each on 2 ranks (torchrun, gloo, bf16), built through the trainer's own engine
factory and DeepSpeed config:

- `mlm_zero2`: BERT MLM (hidden 256, 4 layers, sequence 512, micro-batch 16, vocabulary 8000),
  ZeRO-2 with DeepSpeed's default reduce bucket;
- `mae_zero3` and `mae_zero3_ckpt`: MAE on a ViT (hidden 256, 6 layers, 64x64 images in 8x8
  patches, micro-batch 64), ZeRO-3, without and with activation checkpointing.

Measured per rank, in the second step (the first creates the optimizer states): the bytes of
every live tensor storage before the step (found through the garbage collector, each storage
once), plus the peak of what the allocator hands out during forward, backward and the optimizer
step over what it held when the step began (torch.profiler with profile_memory: the CPU
allocator's running total). This is the CPU's counterpart of a GPU's max_memory_allocated;
memory that gloo or DeepSpeed's C++ code allocate outside torch's allocator is not in it (nor
is NCCL's on a GPU). The plan is computed the way `--plan` computes it, for 2 ranks, on the same
config. `ratio` = plan / measured, per job the larger of the two ranks' peaks;
`worst_error` = the largest |ratio - 1|; `peak_phase` says where each rank's peak fell
(forward, backward or the optimizer step). `activation_ratio` = what the allocator handed out
during forward and backward over what it held before, with activation checkpointing / without
(MAE, ZeRO-3: activations, and the gradients and gathered weights of the moment);
`planned_activation_ratio` = the plan's activations with checkpointing / without.

    python bench/memory_plan.py           # ~4 minutes on 2 cores
    python bench/memory_plan.py --quick   # shorter MLM sequences (256 tokens)
    python bench/memory_plan.py --jobs mlm_zero2 mae_zero3_ckpt
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from _common import log  # noqa: E402
from zero_memory import live_storages  # noqa: E402

VOCAB = 8000


def jobs(quick: bool) -> dict[str, dict[str, Any]]:
    """name -> raw config (the data URL is never read: batches are synthetic)."""
    bert = {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "intermediate_size": 1024,
            "dropout": 0.0}  # fmt: skip
    vit = {"hidden_size": 256, "num_layers": 6, "num_heads": 4, "intermediate_size": 1024,
           "patch_size": 8, "decoder_hidden_size": 128, "decoder_num_layers": 2,
           "decoder_num_heads": 4}  # fmt: skip
    train = {"steps": 4, "zero_stage": 3, "bf16": True, "warmup_steps": 1}
    mae = {"objective": "mae", "data": {"url": "unused", "image_size": 64}, "model": vit,
           "train": {**train, "micro_batch_size": 64},
           "tracking": {"enabled": False}}  # fmt: skip
    return {
        "mlm_zero2": {
            "objective": "mlm", "data": {"url": "unused", "seq_len": 256 if quick else 512},
            "model": bert, "train": {**train, "zero_stage": 2, "micro_batch_size": 16},
            "tracking": {"enabled": False},
        },
        "mae_zero3": mae,
        "mae_zero3_ckpt": {**mae, "train": {**mae["train"], "activation_checkpointing": True}},
    }  # fmt: skip


def meta_for(objective: str) -> dict[str, Any]:
    from darkmatter.data_pipeline.prepare import DEFAULT_SPECIAL_IDS

    if objective in ("mlm", "clm", "span"):
        return {"modality": "text", "vocab_size": VOCAB, "special_tokens": DEFAULT_SPECIAL_IDS}
    return {"modality": "image"}


def live_bytes() -> int:
    """Bytes of every tensor storage reachable from Python (a tensor or its .grad), each once."""
    return sum(nbytes for nbytes, _ in live_storages(set()).values())


def allocated_peaks(prof: Any) -> dict[str, int]:
    """The CPU allocator's highest running total in each phase (a `phase:` record_function) of
    what `prof` recorded, over its total when recording began (the total carries over from an
    earlier recording in the same process)."""
    from torch._C._profiler import _EventType

    events: list[tuple[int, int, int, str]] = []  # (time, total after, size, phase)
    stack = [(n, "?") for n in prof.profiler.kineto_results.experimental_event_tree()]
    while stack:
        node, phase = stack.pop()
        if node.name.startswith("phase:"):
            phase = node.name[len("phase:") :]
        f = node.extra_fields
        if node.tag == _EventType.Allocation and f.device.type == "cpu":
            events.append((node.start_time_ns, int(f.total_allocated), int(f.alloc_size), phase))
        stack.extend((c, phase) for c in node.children)
    if not events:
        return {}
    _, total, size, _ = min(events)
    base = total - size  # the running total before the first event
    peaks: dict[str, int] = {}
    for _, total, _, phase in events:
        peaks[phase] = max(peaks.get(phase, 0), total - base)
    return peaks


def worker(args: argparse.Namespace) -> None:
    """One rank of one job (a fresh process, so nothing of another job is alive); its figures
    to OUT/<job>-rank<r>.json."""
    import torch
    import yaml
    from torch.profiler import ProfilerActivity, profile, record_function

    from darkmatter.trainer import engine as eng
    from darkmatter.trainer import memory_plan as mp
    from darkmatter.trainer.config import deepspeed_config
    from darkmatter.trainer.objectives import OBJECTIVES, load_config

    rank, world, _ = eng.init_distributed()
    out_dir, name = Path(args.out), args.job
    raw = jobs(args.quick)[name]
    raw = {**raw, "train": {**raw["train"], "run_dir": str(out_dir / "run")}}
    path = out_dir / f"{name}-rank{rank}.yaml"  # ranks write at once
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    objective = OBJECTIVES[cfg.objective](cfg, meta_for(cfg.objective))
    ds = deepspeed_config(cfg, world)
    engine, _hf_ds = eng.build_engine(cfg, ds, objective.build_model, objective.lr_scale)
    objective.prepare_engine(engine)
    samples = mp.synthetic_samples(objective, cfg, cfg.train.micro_batch_size)
    for step in range(2):
        gen = torch.Generator().manual_seed(step)
        batch = objective.to_device(objective.make_batch(samples, gen), engine.device, True)
        if step == 1:
            before = live_bytes()
            prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            prof.start()
        with record_function("phase:forward"):
            loss = engine(**batch).loss
        with record_function("phase:backward"):
            engine.backward(loss)
        with record_function("phase:step"):
            engine.step()
        del batch, loss
    prof.stop()
    peaks = allocated_peaks(prof)
    phase = max(peaks, key=lambda k: peaks[k])
    result = {
        "before": before,
        "step_peak": peaks[phase],
        "phase": phase,
        "forward_backward_peak": max(peaks.get("forward", 0), peaks.get("backward", 0)),
    }
    (out_dir / f"{name}-rank{rank}.json").write_text(json.dumps(result))
    eng.shutdown()


def planned(name: str, raw: dict[str, Any], tmp: Path, ranks: int) -> Any:
    import yaml

    from darkmatter.trainer import memory_plan as mp
    from darkmatter.trainer.objectives import load_config

    path = tmp / f"{name}-plan.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    return mp.plan(cfg, meta_for(cfg.objective), ranks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter MLM sequences")
    ap.add_argument("--jobs", nargs="+", choices=sorted(jobs(False)), help="some jobs only")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    ap.add_argument("--job", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    n = 2
    out: dict[str, Any] = {}
    with _common.workdir("dm-bench-plan-") as tmp:
        for name, raw in jobs(args.quick).items():
            if args.jobs and name not in args.jobs:
                continue
            log(f"{name}: 2 steps on {n} ranks (torchrun, gloo), bf16")
            _common.run_ranks(n, __file__, ["--out", str(tmp), "--job", name]
                              + ["--quick"] * args.quick, name)  # fmt: skip
            ranks = [json.loads((tmp / f"{name}-rank{r}.json").read_text()) for r in range(n)]
            p = planned(name, raw, tmp, n)
            per_rank = [r["before"] + r["step_peak"] for r in ranks]
            measured = max(per_rank)
            out[name] = {
                "plan_bytes": round(p.device_total), "measured_bytes": measured,
                "ratio": round(p.device_total / measured, 4), "per_rank_bytes": per_rank,
                "before_step_bytes": [r["before"] for r in ranks],
                "step_peak_bytes": [r["step_peak"] for r in ranks],
                "peak_phase": [r["phase"] for r in ranks],
                "plan": {k: round(v) for k, v in p.as_dict().items() if isinstance(v, float)},
                "forward_backward_peak_bytes": [r["forward_backward_peak"] for r in ranks],
            }  # fmt: skip
    result = {"benchmark": "memory_plan", "machine": _common.machine(), "ranks": n,
              "precision": "bf16", "jobs": out,
              "worst_error": round(max(abs(j["ratio"] - 1) for j in out.values()), 4)}  # fmt: skip
    if {"mae_zero3", "mae_zero3_ckpt"} <= set(out):
        grew = {
            k: max(out[k]["forward_backward_peak_bytes"]) for k in ("mae_zero3", "mae_zero3_ckpt")
        }
        result["activation_ratio"] = round(grew["mae_zero3_ckpt"] / grew["mae_zero3"], 4)
        result["planned_activation_ratio"] = round(
            out["mae_zero3_ckpt"]["plan"]["activations_checkpointed"]
            / out["mae_zero3"]["plan"]["activations"],
            4,
        )
    _common.emit(result)


if __name__ == "__main__":
    main()
