"""The MLM head on the chosen positions only (`BertForMaskedPositions`) against transformers'
BertForMaskedLM, which applies it at every position: one training step (forward, backward) of
the same weights on the same batch, alternated, one thread.

The default shape is the MLM quickstart's (configs/quickstart_mlm.yaml): hidden 256, 2 layers,
FFN 1024, a 4,000-token vocabulary, 16 rows of 64 tokens, 30% of them chosen. The head's
decoder (h × V) then outweighs both encoder layers, and transformers computes it on the 70% of
positions whose scores it throws away. Prints one JSON line: {"bench": "mlm_head",
"full_step_s", "chosen_step_s", "ratio" (full / chosen: the speed-up), "loss_diff" (the two
losses' difference: the same mean over the same tokens), ...}.

    python bench/mlm_head.py            # the quickstart's shape, 30 steps each
    python bench/mlm_head.py --quick    # 5 steps each
    python bench/mlm_head.py --vocab 30522 --hidden 768 --layers 12   # BERT-base's shape
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4000)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--ratio", type=float, default=0.3, help="share of the tokens chosen")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    steps = 5 if args.quick else args.steps

    import torch
    from transformers import BertConfig, BertForMaskedLM

    from darkmatter.trainer.objectives.mlm import BertForMaskedPositions, chosen_positions

    torch.set_num_threads(1)
    h = args.hidden
    config = BertConfig(vocab_size=args.vocab, hidden_size=h, num_hidden_layers=args.layers,
                        num_attention_heads=max(1, h // 64), intermediate_size=4 * h,
                        max_position_embeddings=args.seq_len, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)  # fmt: skip
    torch.manual_seed(0)
    chosen_model = BertForMaskedPositions(config)
    full_model = BertForMaskedLM(config)
    full_model.load_state_dict(chosen_model.state_dict())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, args.vocab, (args.rows, args.seq_len), generator=g)
    labels = ids.masked_fill(torch.rand(ids.shape, generator=g) >= args.ratio, -100)
    positions = chosen_positions(labels)

    def full() -> float:
        loss = full_model(input_ids=ids, labels=labels).loss
        loss.backward()
        return float(loss.detach())

    def chosen() -> float:
        loss = chosen_model(input_ids=ids, labels=labels, chosen_positions=positions).loss
        loss.backward()
        return float(loss.detach())

    times: dict[str, list[float]] = {"full": [], "chosen": []}
    losses = {"full": full(), "chosen": chosen()}  # warm-up
    for _ in range(steps):
        for name, step in (("full", full), ("chosen", chosen)):
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    full_s, chosen_s = _common.median(times["full"]), _common.median(times["chosen"])
    _common.emit({
        "bench": "mlm_head", "hidden": h, "layers": args.layers, "vocab": args.vocab,
        "tokens": args.rows * args.seq_len, "chosen": len(positions), "steps": steps,
        "full_step_s": round(full_s, 4), "chosen_step_s": round(chosen_s, 4),
        "ratio": round(round(full_s, 4) / round(chosen_s, 4), 3),
        "loss_diff": abs(losses["full"] - losses["chosen"]), "machine": _common.machine(),
    })  # fmt: skip


if __name__ == "__main__":
    main()
