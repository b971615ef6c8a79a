"""Causal language modelling (GPT-2, Radford et al. 2019): every token predicts the next one; the
loss is cross-entropy over all real positions but the first. With `data.packing` the micro-batch's
documents run end to end in full rows (each keeps its [CLS] ... [SEP], so the model also learns
where a document ends and the next begins); otherwise each document is one row, padded."""

from __future__ import annotations

import functools
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedModel

from darkmatter.trainer.objectives.base import TokenFlops
from darkmatter.trainer.objectives.mlm import SpecialIds, text_rows
from darkmatter.trainer.perf import encoder_layer_params


class CLMObjective(TokenFlops):
    name = "clm"
    modality = "text"

    @functools.cached_property  # lazy: see MLMObjective.ids
    def ids(self) -> SpecialIds:
        return SpecialIds.from_meta(self.meta)

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
        ever at the end of a row, where causal attention keeps it out of the real tokens."""
        ids, attention = text_rows(samples, self.cfg.data.seq_len, self.cfg.data.packing, self.ids)
        labels = ids.masked_fill(attention == 0, -100)
        return {"input_ids": ids, "attention_mask": attention, "labels": labels}

    def tokens(self, batch: dict[str, Any]) -> int:
        return int(batch["attention_mask"].sum())

    def matmul_params(self) -> int:
        """The decoder blocks (Q, K, V, output, MLP) and the LM head (h×V, tied to the token
        embedding), which runs at every position."""
        m = self.cfg.model
        h, vocab = m.hidden_size, int(self.meta["vocab_size"])
        return m.num_layers * encoder_layer_params(h, m.intermediate_size) + h * vocab
