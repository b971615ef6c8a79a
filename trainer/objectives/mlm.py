"""Masked language modelling (BERT): 15% of the non-special tokens are chosen; of those 80% become
[MASK], 10% a random token, 10% stay; the loss is cross-entropy on the chosen tokens only.

Also owns the text objectives' view of the tokenizer's special tokens (`SpecialIds`): their ids
come from the dataset manifest through the dataset meta, never from constants, since a given
tokenizer (BERT's WordPiece: [CLS]=101) numbers them otherwise than prepare's trained one.

And the rows every text objective on token rows (mlm, clm: `TextObjective`) makes of a
micro-batch: one document a row (padded, truncated), data.packing's full rows (documents end to
end, attending across their boundaries), or data.pack: documents. That last packs the documents
end to end into exactly data.pack_rows rows, greedily in sample order (`place_documents`), and
gives the model what keeps each document alone: a block-diagonal attention mask per row
([rows, 1, seq_len, seq_len] bool, causal within a block for clm) and positions restarting at 0
per document. A document's tokens then get the logits they would get in a row of their own; the
row count never depends on the data, so every rank runs the same shapes."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np
import torch
from transformers import BertConfig, BertForMaskedLM, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from darkmatter.trainer.config import Config, ConfigError, ObjectiveSettings
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


class TextObjective(TokenFlops):
    """A text objective on rows of tokens (mlm, clm): the tokenizer's special ids, and the rows,
    attention and positions of a micro-batch as data.packing and data.pack ask."""

    modality = "text"
    host_keys = ("packed",)  # data.pack: documents' figures (Packed), for counts()
    causal = False  # whether a token attends only to the tokens before it

    def __init__(self, cfg: Config, dataset_meta: dict[str, Any]):
        super().__init__(cfg, dataset_meta)
        check_pack(cfg)

    @classmethod
    def validate(cls, cfg: Config) -> None:
        super().validate(cfg)
        check_pack(cfg)

    # Lazy, so that a text config on an image dataset fails on the modality check, not here.
    @functools.cached_property
    def ids(self) -> SpecialIds:
        return SpecialIds.from_meta(self.meta)

    def text_inputs(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """input_ids and attention_mask of the micro-batch's rows; with data.pack: documents
        also position_ids and, for the host only, `packed` (a Packed)."""
        d, sp = self.cfg.data, self.ids
        docs = [s["input_ids"] for s in samples]
        if d.pack == "documents":
            rows = d.pack_rows or self.cfg.train.micro_batch_size
            return pack_documents(docs, rows, d.seq_len, sp.pad, self.causal)
        ids, attention = text_rows(samples, d.seq_len, d.packing, sp)
        return {"input_ids": ids, "attention_mask": attention}

    def sequence_lengths(self, batch: dict[str, Any]) -> list[int]:
        """The rows' real tokens, or with data.pack: documents each document's: what attends
        together (a packed row's masked-out scores are not counted as work)."""
        if "packed" in batch:
            return list(batch["packed"].lengths)
        return super().sequence_lengths(batch)

    def tokens(self, batch: dict[str, Any]) -> int:
        return sum(self.sequence_lengths(batch))

    def counts(self, batch: dict[str, Any]) -> dict[str, float]:
        return batch["packed"].counts() if "packed" in batch else {}

    def to_device(self, batch: dict[str, Any], device: Any, bf16: bool) -> dict[str, Any]:
        out = super().to_device(batch, device, bf16)
        mask = out["attention_mask"]
        if mask.dim() == 4 and self.cfg.model.attention == "eager":
            # Eager attention adds the mask to the scores: 0 where allowed, the lowest value of
            # the model's dtype elsewhere (SDPA takes the booleans as they are).
            dtype = torch.bfloat16 if bf16 else torch.float32
            additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
            out["attention_mask"] = additive.masked_fill(~mask, torch.finfo(dtype).min)
        return out


def check_pack(cfg: Config) -> None:
    """data.pack: documents as the text objectives on rows take it (ConfigError otherwise)."""
    if cfg.data.pack != "documents":
        return
    if cfg.data.packing:
        raise ConfigError(
            "data.packing: true packs documents across boundaries and data.pack: documents "
            "packs them apart; set one of them"
        )
    if cfg.model.attention == "flash_attention_2":
        raise ConfigError(
            "model.attention: data.pack: documents keeps documents apart with a 4D attention "
            "mask, which flash_attention_2 does not take; use sdpa or eager"
        )


@dataclasses.dataclass
class MLMSettings(ObjectiveSettings):
    mask_ratio: float = 0.0
    """Share of the non-special tokens chosen for prediction; 0: BERT's 0.15."""
    whole_word_masking: bool = False
    """Choose whole words: a word's pieces ("##" continuations of a WordPiece tokenizer) are
    masked together, so a word is never guessed from its own other pieces (BERT's later
    release, Cui et al. 2019). mask_ratio then chooses words, about the same share of tokens."""


class MLMObjective(TextObjective):
    name = "mlm"
    settings_class = MLMSettings
    settings: MLMSettings
    default_mask_ratio = 0.15

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
        return BertForMaskedPositions(self.model_config())

    def __init__(self, cfg: Config, dataset_meta: dict[str, Any]):
        super().__init__(cfg, dataset_meta)
        if dataset_meta.get("modality") == "text":
            self.is_continuation  # noqa: B018  (a tokenizer of another kind fails here, at preflight)

    @functools.cached_property
    def is_continuation(self) -> torch.Tensor | None:
        """[V] bool, True at the tokens that continue a word; None without whole-word masking
        (or without a tokenizer: a memory plan's stand-in meta)."""
        if not self.settings.whole_word_masking or "tokenizer_url" not in self.meta:
            return None
        return continuation_lookup(str(self.meta["tokenizer_url"]), int(self.meta["vocab_size"]))

    def make_batch(self, samples: list[dict[str, Any]], gen: torch.Generator) -> dict[str, Any]:
        batch = self.text_inputs(samples)
        batch["input_ids"], batch["labels"] = mask_tokens(
            batch["input_ids"], self.settings.mask_ratio, self.ids.mask, self.is_special, gen,
            self.is_continuation,
        )  # fmt: skip
        batch["chosen_positions"] = chosen_positions(batch["labels"])
        return batch

    def matmul_params(self) -> int:
        """The encoder blocks, which every real token goes through."""
        m = self.cfg.model
        return m.num_layers * encoder_layer_params(m.hidden_size, m.intermediate_size)

    def head_params(self) -> int:
        """The MLM head's multiplies (transform h×h, decoder h×V), on the chosen tokens only."""
        h = self.cfg.model.hidden_size
        return h * h + h * int(self.meta["vocab_size"])

    def flops(self, batch: dict[str, Any]) -> float:
        chosen = len(batch["chosen_positions"])
        return super().flops(batch) + 6.0 * self.head_params() * chosen

    def flops_inputs(self) -> dict[str, Any]:
        return {**super().flops_inputs(), "head_params": self.head_params(),
                "head_counted": "the tokens chosen for prediction"}  # fmt: skip


class BertForMaskedPositions(BertForMaskedLM):
    """BertForMaskedLM whose head scores the chosen positions only.

    transformers' model applies the head (an h×h transform and the h×V decoder) at every
    position and then ignores all but the 15-30% chosen; at a small width and a vocabulary of
    thousands that head is most of a step's multiplies (bench/mlm_head.py measures the two side
    by side). Here the encoder's states are gathered at the chosen positions first, as BERT's
    original code (masked_lm_positions) and MosaicBERT do. `chosen_positions` ([n] int64, flat
    indices into the [B, T] rows: what `chosen_positions()` makes of the labels, on the host)
    keeps every shape known before the forward, so the memory plan's FakeTensorMode and
    torch.compile see no data-dependent size. The loss is the same mean cross-entropy over the
    chosen tokens (0, not NaN, when none is chosen); `logits` are then [n, V]. Without
    `chosen_positions` it is BertForMaskedLM, logits [B, T, V]. The weights and their names are
    BertForMaskedLM's: checkpoints and exports do not change."""

    def forward(  # type: ignore[override]
        self, input_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
        chosen_positions: torch.Tensor | None = None, **kwargs: Any,
    ) -> Any:  # fmt: skip
        if chosen_positions is None or labels is None:
            return super().forward(input_ids=input_ids, labels=labels, **kwargs)
        hidden = self.bert(input_ids=input_ids, **kwargs)[0]
        scores = self.cls(hidden.flatten(0, 1).index_select(0, chosen_positions))
        targets = labels.flatten().index_select(0, chosen_positions)
        loss = torch.nn.functional.cross_entropy(scores.float(), targets, reduction="sum")
        return MaskedLMOutput(loss=loss / max(len(chosen_positions), 1), logits=scores)


def chosen_positions(labels: torch.Tensor) -> torch.Tensor:
    """[n] int64: the flat indices of labels [B, T] that are predicted (not -100)."""
    return (labels.flatten() != -100).nonzero().squeeze(1)


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


@dataclasses.dataclass(frozen=True)
class Piece:
    """Tokens [start, start + length) of document `doc`, placed in `row` from column `col`."""

    doc: int
    start: int
    row: int
    col: int
    length: int


def place_documents(lengths: list[int], rows: int, seq_len: int) -> tuple[list[Piece], int]:
    """data.pack: documents' placement of documents of these lengths (tokens) into `rows` rows:
    (the pieces placed, the tokens dropped). Greedy in order: a document is cut into pieces of
    at most seq_len tokens, each its own document; a piece goes where the current row ends, or,
    when it does not fit there, starts the next row; past the last row it is dropped, and the last
    row stays open to a later, shorter piece."""
    placed: list[Piece] = []
    dropped, row, col = 0, 0, 0
    for doc, length in enumerate(lengths):
        for start in range(0, length, seq_len):
            n = min(seq_len, length - start)
            if col + n > seq_len:
                if row + 1 == rows:
                    dropped += n
                    continue
                row, col = row + 1, 0
            placed.append(Piece(doc, start, row, col, n))
            col += n
    return placed, dropped


@dataclasses.dataclass(frozen=True)
class Packed:
    """What data.pack: documents made of a micro-batch, kept on the host (the log's figures)."""

    lengths: tuple[int, ...]
    """Tokens of each packed document (a split document's pieces apart), row by row."""
    dropped_tokens: int
    """Tokens of the documents (or pieces) that did not fit the rows."""
    slots: int
    """rows × seq_len: the packing efficiency is sum(lengths) / slots."""

    def counts(self) -> dict[str, float]:
        """Objective.counts' figures: summed over a log window and the ranks."""
        return {
            "data/pack/tokens": float(sum(self.lengths)),
            "data/pack/slots": float(self.slots),
            "data/pack/dropped_tokens": float(self.dropped_tokens),
        }


@functools.lru_cache(maxsize=4)
def _attention_block(seq_len: int, causal: bool) -> torch.Tensor:
    """[seq_len, seq_len] bool, lower-triangular when causal: whose top-left n × n corner is a
    document of n tokens' attention (built once per run: it is seq_len² bytes)."""
    block = torch.ones(seq_len, seq_len, dtype=torch.bool)
    return block.tril() if causal else block


def pack_documents(
    seqs: list[np.ndarray], rows: int, seq_len: int, pad_id: int, causal: bool
) -> dict[str, Any]:
    """The model inputs of data.pack: documents, each [rows, seq_len] but the mask: input_ids
    (padded with pad_id), attention_mask [rows, 1, seq_len, seq_len] bool (True: query may attend
    to key; within a document only, and only backwards when causal; a row's padding attends to
    its padding, so that no softmax is empty), position_ids (from 0 per document), and `packed`
    (a Packed). The mask is filled block by block: the work is the documents' length², not
    rows × seq_len² comparisons."""
    pieces, dropped = place_documents([len(s) for s in seqs], rows, seq_len)
    ids = torch.full((rows, seq_len), pad_id, dtype=torch.long)
    positions = torch.zeros((rows, seq_len), dtype=torch.long)
    mask = torch.zeros((rows, 1, seq_len, seq_len), dtype=torch.bool)
    block = _attention_block(seq_len, causal)
    ends = [0] * rows  # where each row's padding starts
    for p in pieces:
        span, n = slice(p.col, p.col + p.length), p.length
        ids[p.row, span] = torch.from_numpy(np.asarray(seqs[p.doc][p.start : p.start + n]))
        positions[p.row, span] = torch.arange(n)
        mask[p.row, 0, span, span] = block[:n, :n]
        ends[p.row] = p.col + n
    for row, end in enumerate(ends):
        mask[row, 0, end:, end:] = block[: seq_len - end, : seq_len - end]
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": positions,
        "packed": Packed(tuple(p.length for p in pieces), dropped, rows * seq_len),
    }


def continuation_lookup(tokenizer_url: str, vocab_size: int) -> torch.Tensor:
    """[V] bool: the WordPiece tokens that continue a word (the model's continuing-subword
    prefix, "##"). ConfigError for a tokenizer of another kind, whose words cannot be told."""
    import json

    from darkmatter import storage

    model = json.loads(storage.read_bytes(tokenizer_url))["model"]
    if model.get("type") != "WordPiece":
        raise ConfigError(
            f"model.whole_word_masking needs a WordPiece tokenizer; {tokenizer_url} is "
            f"{model.get('type')}"
        )
    prefix = model.get("continuing_subword_prefix") or "##"
    out = torch.zeros(vocab_size, dtype=torch.bool)
    out[[i for t, i in model["vocab"].items() if t.startswith(prefix) and i < vocab_size]] = True
    return out


def mask_tokens(
    ids: torch.Tensor,
    ratio: float,
    mask_id: int,
    is_special: torch.Tensor,
    gen: torch.Generator,
    is_continuation: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's 80/10/10 rule on ids [B, T]; is_special is [V] bool (SpecialIds.lookup). Returns
    (inputs, labels) with labels -100 where nothing is predicted.

    A special token is never chosen, and the random replacements are drawn uniformly from the
    non-special ids only (BERT's collator draws from the whole vocabulary): a [PAD] or [SEP]
    inside a document would teach the model a boundary that is not there.

    With is_continuation ([V] bool), each token takes the draw of the token that starts its
    word, so a word's pieces are chosen together (the 80/10/10 roll stays per token)."""
    draw = torch.rand(ids.shape, generator=gen)
    if is_continuation is not None:
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        starts = torch.where(is_continuation[ids], 0, positions).cummax(dim=1).values
        draw = draw.gather(1, starts)
    chosen = (draw < ratio) & ~is_special[ids]
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    roll = torch.rand(ids.shape, generator=gen)
    inputs = ids.clone()
    inputs[chosen & (roll < 0.8)] = mask_id
    ordinary = (~is_special).nonzero().squeeze(1)  # [V - specials]
    random_tokens = ordinary[torch.randint(len(ordinary), ids.shape, generator=gen)]
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[swap] = random_tokens[swap]
    return inputs, labels
