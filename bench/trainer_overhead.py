"""What the framework costs: `darkmatter pretrain`'s training loop vs a bare DeepSpeed loop, on
the same model, batch, ZeRO stage and in-memory data, in the same process.

- `darkmatter`: the trainer's own `Trainer.train()` loop, everything it does per step: masking
  the batch (seeded per step and micro-batch), FLOP and token counts, phase timing, the
  gradient-norm gate that can veto a step, the preemption check, and a log line every
  `--log-every` steps (figures reduced, metrics.jsonl, the log). Its data stream is replaced by
  micro-batches read beforehand into memory, and saving is switched off (its cost is
  bench/checkpoint_stall.py's subject).
- `bare`: `deepspeed.initialize` on the same model (same initial weights), the same AdamW
  (weight decay on matrices only) and warmup + cosine schedule, then `loss = engine(**batch).loss; engine.backward(loss); engine.step()` over
  the same micro-batches, already masked.

Blocks of BLOCK steps alternate in the order ABBA so that drift in the machine's speed falls on
both alike; `ratio` = median darkmatter step time / median bare step time (per-block means).
One process, ZeRO-2 by default. `--quick` is a small model and few steps, for smoke tests.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from _common import log  # noqa: E402


class MemoryStream:
    """The reader's interface over micro-batches already in memory, cycled."""

    def __init__(self, steps: list[Any], summary: dict[str, float]):
        from darkmatter.data_pipeline.reader import Quarantine

        self.steps, self._summary, self.i = steps, summary, 0
        self.epoch, self.quarantine = 0, Quarantine()

    def next_step(self) -> Any:
        out = self.steps[self.i % len(self.steps)]
        self.i += 1
        return out

    def summary(self) -> dict[str, float]:
        return dict(self._summary)

    def close(self) -> None:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small model, few steps (smoke test)")
    ap.add_argument("--blocks", type=int, default=16, help="blocks of steps (a multiple of 4)")
    ap.add_argument("--block", type=int, default=20, help="steps per block")
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=10)
    args = ap.parse_args()
    blocks, block = (4, 10) if args.quick else (args.blocks, args.block)
    model = _common.bench_bert(args.quick)
    import deepspeed
    import torch
    import yaml

    from darkmatter.data_pipeline.prepare import prepare
    from darkmatter.trainer import engine as eng
    from darkmatter.trainer.config import deepspeed_config
    from darkmatter.trainer.objectives import load_config
    from darkmatter.trainer.train import Trainer, micro_batch_generator, preflight

    with _common.workdir("dm-bench-overhead-") as tmp:
        corpus = _common.write_text_corpus(tmp / "corpus.txt", docs=3000)
        prepare([str(corpus)], str(tmp / "ds"), modality="text", vocab_size=2000)
        raw = {
            "objective": "mlm",
            "data": {"url": str(tmp / "ds"), "num_workers": 1, "seq_len": 128},
            "model": {**model, "dropout": 0.0},
            "train": {"steps": 10**6, "micro_batch_size": 16, "log_every": args.log_every,
                      "zero_stage": args.zero_stage, "run_dir": str(tmp / "run"),
                      "warmup_steps": 5},
            "checkpoint": {"every": 10**9},
            "tracking": {"enabled": False},
        }  # fmt: skip
        (tmp / "c.yaml").write_text(yaml.safe_dump(raw))
        cfg = load_config(tmp / "c.yaml")
        objective = preflight(cfg)
        eng.init_distributed()
        trainer = Trainer(cfg, objective, rank=0, world_size=1)
        trainer.save = lambda wait=False: None  # type: ignore[method-assign]

        # The same micro-batches for both: read once, kept in memory.
        steps = [trainer.stream.next_step() for _ in range(2 * block)]
        summary = trainer.stream.summary()
        trainer.stream.close()
        trainer.stream = MemoryStream(steps, summary)  # type: ignore[assignment]
        masked = [
            [objective.make_batch(samples, micro_batch_generator(cfg, i, 0, m))
             for m, samples in enumerate(step)]
            for i, step in enumerate(steps)
        ]  # fmt: skip

        torch.manual_seed(cfg.train.seed)
        bare_model = objective.build_model()
        # The same optimizer: AdamW, weight decay on matrices only (two parameter groups).
        opt = eng.build_optimizer(bare_model, cfg)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, eng.lr_lambda(cfg))
        bare, _, _, _ = deepspeed.initialize(model=bare_model, optimizer=opt, lr_scheduler=sched,
                                             config=deepspeed_config(cfg, 1))  # fmt: skip
        cursor = {"bare": 0}

        def run_bare(n: int) -> None:
            for _ in range(n):
                for batch in masked[cursor["bare"] % len(masked)]:
                    loss = bare(**batch).loss
                    bare.backward(loss)
                    bare.step()
                    loss.item()  # a loop that reports its loss reads it back, as ours does
                cursor["bare"] += 1

        def run_ours(n: int) -> None:
            cfg.train.steps = trainer.pos.step + n
            trainer.train()

        run_ours(3)  # warm up both: allocations, first steps
        run_bare(3)
        times: dict[str, list[float]] = {"darkmatter": [], "bare": []}
        order = ["darkmatter", "bare", "bare", "darkmatter"]
        log(f"{blocks} blocks of {block} steps, alternating (ABBA), ZeRO-{args.zero_stage}")
        for b in range(blocks):
            mode = order[b % 4]
            t0 = time.perf_counter()
            (run_ours if mode == "darkmatter" else run_bare)(block)
            times[mode].append((time.perf_counter() - t0) / block)
        logged = len((tmp / "run" / "metrics.jsonl").read_text().splitlines())
        trainer.stream.close()
        eng.shutdown()
    ours, base = _common.median(times["darkmatter"]), _common.median(times["bare"])
    _common.emit({
        "benchmark": "trainer_overhead", "machine": _common.machine(),
        "zero_stage": args.zero_stage, "model": model, "micro_batch_size": 16, "seq_len": 128,
        "blocks_per_mode": len(times["bare"]), "steps_per_block": block,
        "log_every": args.log_every, "log_lines_written": logged,
        "step_s_darkmatter": round(ours, 5), "step_s_bare_deepspeed": round(base, 5),
        "block_step_s": {k: [round(v, 4) for v in vs] for k, vs in times.items()},
        "ratio": round(ours / base, 4),
    })  # fmt: skip


if __name__ == "__main__":
    main()
