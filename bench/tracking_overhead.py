"""Step time with MLflow logging every step vs with logging off, in the same run.

One `darkmatter` trainer (BERT MLM, hidden 256, 4 layers, seq 128, ZeRO-2, one process, a real
MLflow server from the local stack over HTTP) trains in blocks of BLOCK steps that alternate
between two modes, in the order ABBA so that drift in the machine's speed falls on both alike:

- `on`: after every step, the trainer's full logging path: figures reduced across ranks, a line
  in metrics.jsonl and the log, and the metrics queued for MLflow, which a background thread
  sends in batches (`tracking.flush_s`, 1 s) to the server;
- `off`: no logging at all.

Each step is timed on the training thread from the start of the step to the end of its logging;
the first step of each block is left out (it absorbs the switch). `ratio` = median `on` step
time ÷ median `off` step time. The MLflow server runs on this same 2-core machine, so its work
competes with training here, as it would not on a cluster.

`--quick` is a small model and few steps, for smoke tests.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from _common import log  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small model, few steps (smoke test)")
    ap.add_argument("--blocks", type=int, default=24, help="blocks of steps (a multiple of 4)")
    ap.add_argument("--block", type=int, default=12, help="steps per block")
    args = ap.parse_args()
    blocks, block = (4, 4) if args.quick else (args.blocks, args.block)
    model = _common.bench_bert(args.quick)
    import yaml

    from darkmatter.data_pipeline.prepare import prepare
    from darkmatter.trainer import engine as eng
    from darkmatter.trainer.objectives import load_config
    from darkmatter.trainer.train import Trainer, _Window, preflight

    with _common.workdir("dm-bench-track-") as tmp, _common.local_stack(tmp) as stack:
        corpus = _common.write_text_corpus(tmp / "corpus.txt", docs=3000)
        prepare([str(corpus)], str(tmp / "ds"), modality="text", vocab_size=2000)
        steps = blocks * block
        raw = {
            "objective": "mlm",
            "data": {"url": str(tmp / "ds"), "num_workers": 1, "seq_len": 128},
            "model": model,
            "train": {"steps": steps, "micro_batch_size": 16, "log_every": 1, "zero_stage": 2,
                      "run_dir": str(tmp / "run"), "warmup_steps": 5},
            "checkpoint": {"every": 10**6},
            "tracking": {"enabled": True, "tracking_uri": stack.mlflow_uri,
                         "experiment": "bench-tracking", "flush_s": 1.0},
        }  # fmt: skip
        (tmp / "c.yaml").write_text(yaml.safe_dump(raw))
        cfg = load_config(tmp / "c.yaml")
        objective = preflight(cfg)
        eng.init_distributed()
        trainer = Trainer(cfg, objective, rank=0, world_size=1)
        assert trainer.tracker is not None
        for _ in range(3):  # warm up: allocations, first batches
            trainer._step()
        times: dict[str, list[float]] = {"on": [], "off": []}
        order = ["on", "off", "off", "on"]
        log(f"{blocks} blocks of {block} steps, alternating on/off (ABBA)")
        for b in range(blocks):
            mode = order[b % 4]
            for i in range(block):
                t0 = time.perf_counter()
                loss, tokens, flops, phases, applied = trainer._step()
                trainer.pos.step += 1
                if mode == "on":
                    w = _Window()
                    w.add(loss, tokens, flops, time.perf_counter() - t0, phases, applied)
                    trainer._log(w)
                if i:
                    times[mode].append(time.perf_counter() - t0)
        trainer.tracker.flush()
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=stack.mlflow_uri)
        logged = len(client.get_metric_history(trainer.tracker.run_id, "loss"))
        import json

        last = (tmp / "run" / "metrics.jsonl").read_text().splitlines()[-1]
        per_step = len(json.loads(last)) - 1  # all but "step"
        trainer.tracker.finish()
        trainer.stream.close()
        eng.shutdown()
    on, off = _common.median(times["on"]), _common.median(times["off"])
    expected = blocks // 2 * block
    if logged != expected:
        raise SystemExit(f"MLflow holds {logged} loss values, {expected} were logged")
    _common.emit({
        "benchmark": "tracking_overhead", "machine": _common.machine(),
        "steps_per_mode": len(times["on"]), "metrics_logged_per_step": per_step,
        "loss_values_in_mlflow": logged,
        "step_s_logging_every_step": round(on, 5), "step_s_logging_off": round(off, 5),
        "ratio": round(on / off, 4),
    })  # fmt: skip


if __name__ == "__main__":
    main()
