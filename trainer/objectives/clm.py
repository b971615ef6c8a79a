"""Causal language modelling (GPT-2, Radford et al. 2019): every token predicts the next one; the
loss is cross-entropy over all real positions but the first. With `data.packing` the micro-batch's
documents run end to end in full rows (each keeps its [CLS] ... [SEP], so the model also learns
where a document ends and the next begins); otherwise each document is one row, padded. With
`data.pack: documents` (mlm.TextObjective) the documents share rows but not attention: a
document's first token is not scored against the end of the one before it."""

from __future__ import annotations

from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedModel

from darkmatter.trainer.objectives.mlm import TextObjective
from darkmatter.trainer.perf import encoder_layer_params


class CLMObjective(TextObjective):
    name = "clm"
    causal = True

    def model_config(self) -> GPT2Config:
        m, seq_len = self.cfg.model, self.cfg.data.seq_len
        return GPT2Config(
            vocab_size=int(self.meta["vocab_size"]),
            n_positions=seq_len,
            n_embd=m.hidden_size,
            n_layer=m.num_layers,
            n_head=m.num_heads,
            n_inner=m.intermediate_size,
            resid_pdrop=m.dropout,
            embd_pdrop=m.dropout,
            attn_pdrop=m.dropout,
            # The tokenizer's ids: a document starts with [CLS] and ends with [SEP].
            bos_token_id=self.ids.cls,
            eos_token_id=self.ids.sep,
            pad_token_id=self.ids.pad,
        )

    def build_model(self) -> PreTrainedModel:
        return GPT2LMHeadModel(self.model_config())

    def make_batch(self, samples: list[dict[str, Any]], gen: torch.Generator) -> dict[str, Any]:
        """No randomness: `gen` is unused. The model shifts the labels itself (position t's
        logits are scored against token t+1); padding is -100, never predicted. Padding is only
        ever at the end of a row (or of a packed document's block), where causal attention keeps
        it out of the real tokens. With data.pack: documents a document's first token is -100
        too: the token before it ends another document."""
        batch = self.text_inputs(samples)
        ids = batch["input_ids"]
        unscored = ids == self.ids.pad
        if "position_ids" in batch:
            unscored |= batch["position_ids"] == 0
        batch["labels"] = ids.masked_fill(unscored, -100)
        return batch

    def matmul_params(self) -> int:
        """The decoder blocks (Q, K, V, output, MLP) and the LM head (h×V, tied to the token
        embedding), which runs at every position."""
        m = self.cfg.model
        h, vocab = m.hidden_size, int(self.meta["vocab_size"])
        return m.num_layers * encoder_layer_params(h, m.intermediate_size) + h * vocab
