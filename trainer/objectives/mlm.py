"""Masked language modelling (BERT): 15% of the non-special tokens are chosen; of those 80% become
[MASK], 10% a random token, 10% stay; the loss is cross-entropy on the chosen tokens only.

Also owns the text objectives' view of the tokenizer's special tokens (`SpecialIds`): their ids
come from the dataset manifest through the dataset meta, never from constants, since a given
tokenizer (BERT's WordPiece: [CLS]=101) numbers them otherwise than prepare's trained one."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np
import torch
from transformers import BertConfig, BertForMaskedLM, PreTrainedModel

from darkmatter.trainer.config import ObjectiveSettings
from darkmatter.trainer.objectives.base import TokenFlops
from darkmatter.trainer.perf import encoder_layer_params


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """The tokenizer's special-token ids: the manifest's `special_tokens`, which
    `trainer.train.dataset_meta` puts in the dataset meta under the same key."""

    pad: int
    unk: int
    cls: int
    sep: int
    mask: int

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> SpecialIds:
        specials = meta.get("special_tokens")
        if not isinstance(specials, dict):
            raise ValueError(
                "text objectives need the tokenizer's special_tokens in the dataset meta "
                "(trainer.train.dataset_meta reads them from the manifest)"
            )
        return cls(**{k: int(v) for k, v in specials.items()})

    def lookup(self, vocab_size: int) -> torch.Tensor:
        """[vocab_size] bool, True at the special ids."""
        ids = dataclasses.astuple(self)
        if max(ids) >= vocab_size:
            raise ValueError(f"special token ids {ids} do not fit a vocabulary of {vocab_size}")
        is_special = torch.zeros(vocab_size, dtype=torch.bool)
        is_special[list(ids)] = True
        return is_special


@dataclasses.dataclass
class MLMSettings(ObjectiveSettings):
    mask_ratio: float = 0.0
    """Share of the non-special tokens chosen for prediction; 0: BERT's 0.15."""


class MLMObjective(TokenFlops):
    name = "mlm"
    settings_class = MLMSettings
    settings: MLMSettings
    default_mask_ratio = 0.15
    modality = "text"

    # Lazy, so that an MLM config on an image dataset fails on the modality check, not here.
    @functools.cached_property
    def ids(self) -> SpecialIds:
        return SpecialIds.from_meta(self.meta)

    @functools.cached_property
    def is_special(self) -> torch.Tensor:
        """[V] bool: never chosen for masking, never drawn as a random replacement."""
        return self.ids.lookup(int(self.meta["vocab_size"]))

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
            pad_token_id=self.ids.pad,
        )

    def build_model(self) -> PreTrainedModel:
        return BertForMaskedLM(self.model_config())

    def make_batch(self, samples: list[dict[str, Any]], gen: torch.Generator) -> dict[str, Any]:
        sp = self.ids
        ids, attention = text_rows(samples, self.cfg.data.seq_len, self.cfg.data.packing, sp)
        input_ids, labels = mask_tokens(
            ids, self.settings.mask_ratio, sp.mask, self.is_special, gen
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


def text_rows(
    samples: list[dict[str, Any]], seq_len: int, packing: bool, sp: SpecialIds
) -> tuple[torch.Tensor, torch.Tensor]:
    """The token rows of a micro-batch of documents and their attention mask, both [B, seq_len]:
    packed end to end (data.packing) or one document a row, padded and truncated."""
    docs = [s["input_ids"] for s in samples]
    if packing:
        ids = pack(docs, seq_len, sp.pad)
    else:
        ids = pad_and_truncate(docs, seq_len, sp.pad, sp.sep)
    return ids, (ids != sp.pad).long()


def pad_and_truncate(
    seqs: list[np.ndarray], seq_len: int, pad_id: int, sep_id: int
) -> torch.Tensor:
    """[B, seq_len] int64, padded with pad_id; a truncated sequence keeps its closing sep_id."""
    out = torch.full((len(seqs), seq_len), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        s = np.asarray(s, dtype=np.int64)
        if len(s) > seq_len:
            s = np.concatenate([s[: seq_len - 1], [sep_id]])
        out[i, : len(s)] = torch.from_numpy(s)
    return out


def pack(seqs: list[np.ndarray], seq_len: int, pad_id: int) -> torch.Tensor:
    """The documents end to end (each keeps its [CLS] ... [SEP]), cut into rows of seq_len:
    [ceil(total / seq_len), seq_len] int64, only the last row padded (pad_id). A document longer
    than a row continues on the next one instead of being truncated."""
    flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs])
    rows = -(-len(flat) // seq_len)
    out = torch.full((rows * seq_len,), pad_id, dtype=torch.long)
    out[: len(flat)] = torch.from_numpy(flat)
    return out.view(rows, seq_len)


def mask_tokens(
    ids: torch.Tensor,
    ratio: float,
    mask_id: int,
    is_special: torch.Tensor,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's 80/10/10 rule on ids [B, T]; is_special is [V] bool (SpecialIds.lookup). Returns
    (inputs, labels) with labels -100 where nothing is predicted.

    A special token is never chosen, and the random replacements are drawn uniformly from the
    non-special ids only (BERT's collator draws from the whole vocabulary): a [PAD] or [SEP]
    inside a document would teach the model a boundary that is not there."""
    chosen = (torch.rand(ids.shape, generator=gen) < ratio) & ~is_special[ids]
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    roll = torch.rand(ids.shape, generator=gen)
    inputs = ids.clone()
    inputs[chosen & (roll < 0.8)] = mask_id
    ordinary = (~is_special).nonzero().squeeze(1)  # [V - specials]
    random_tokens = ordinary[torch.randint(len(ordinary), ids.shape, generator=gen)]
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[swap] = random_tokens[swap]
    return inputs, labels
