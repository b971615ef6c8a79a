"""Masked language modelling (BERT): 15% of the non-special tokens are chosen; of those 80% become
[MASK], 10% a random token, 10% stay; the loss is cross-entropy on the chosen tokens only."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import BertConfig, BertForMaskedLM, PreTrainedModel

from trainer.objectives.base import TokenFlops
from trainer.perf import encoder_layer_params

# Fixed by `darkmatter prepare`'s tokenizer: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4.
PAD_ID, CLS_ID, SEP_ID, MASK_ID, NUM_SPECIAL = 0, 2, 3, 4, 5


class MLMObjective(TokenFlops):
    name = "mlm"
    default_mask_ratio = 0.15
    modality = "text"

    def model_config(self) -> BertConfig:
        m, seq_len = self.cfg.model, self.cfg.data.seq_len
        vocab_size = int(self.meta["vocab_size"])
        return BertConfig(
            vocab_size=vocab_size,
            hidden_size=m.hidden_size,
            num_hidden_layers=m.num_layers,
            num_attention_heads=m.num_heads,
            intermediate_size=m.intermediate_size,
            max_position_embeddings=seq_len,
            hidden_dropout_prob=m.dropout,
            attention_probs_dropout_prob=m.dropout,
            pad_token_id=PAD_ID,
        )

    def build_model(self) -> PreTrainedModel:
        return BertForMaskedLM(self.model_config())

    def make_batch(self, samples: list[dict[str, Any]], gen: torch.Generator) -> dict[str, Any]:
        docs, seq_len = [s["input_ids"] for s in samples], self.cfg.data.seq_len
        ids = pack(docs, seq_len) if self.cfg.data.packing else pad_and_truncate(docs, seq_len)
        attention = (ids != PAD_ID).long()  # [B, T]
        input_ids, labels = mask_tokens(
            ids, self.cfg.model.mask_ratio, int(self.meta["vocab_size"]), gen
        )
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}

    def tokens(self, batch: dict[str, Any]) -> int:
        return int(batch["attention_mask"].sum())

    def matmul_params(self) -> int:
        """Encoder blocks, plus the MLM head (transform h×h, decoder h×V), which transformers
        applies at every position, masked or not."""
        m = self.cfg.model
        h, vocab = m.hidden_size, int(self.meta["vocab_size"])
        return m.num_layers * encoder_layer_params(h, m.intermediate_size) + h * h + h * vocab


def pad_and_truncate(seqs: list[np.ndarray], seq_len: int) -> torch.Tensor:
    """[B, seq_len] int64; a truncated sequence keeps its closing [SEP]."""
    out = torch.full((len(seqs), seq_len), PAD_ID, dtype=torch.long)
    for i, s in enumerate(seqs):
        s = np.asarray(s, dtype=np.int64)
        if len(s) > seq_len:
            s = np.concatenate([s[: seq_len - 1], [SEP_ID]])
        out[i, : len(s)] = torch.from_numpy(s)
    return out


def pack(seqs: list[np.ndarray], seq_len: int) -> torch.Tensor:
    """The documents end to end (each keeps its [CLS] ... [SEP]), cut into rows of seq_len:
    [ceil(total / seq_len), seq_len] int64, only the last row padded. A document longer than a
    row continues on the next one instead of being truncated."""
    flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs])
    rows = -(-len(flat) // seq_len)
    out = torch.full((rows * seq_len,), PAD_ID, dtype=torch.long)
    out[: len(flat)] = torch.from_numpy(flat)
    return out.view(rows, seq_len)


def mask_tokens(
    ids: torch.Tensor, ratio: float, vocab_size: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's 80/10/10 rule. Returns (inputs, labels) with labels -100 where nothing is predicted."""
    maskable = ids >= NUM_SPECIAL  # never mask [PAD]/[CLS]/[SEP]
    chosen = (torch.rand(ids.shape, generator=gen) < ratio) & maskable
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    roll = torch.rand(ids.shape, generator=gen)
    inputs = ids.clone()
    inputs[chosen & (roll < 0.8)] = MASK_ID
    random_tokens = torch.randint(NUM_SPECIAL, vocab_size, ids.shape, generator=gen)
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[swap] = random_tokens[swap]
    return inputs, labels
