"""Span corruption (T5, Raffel et al. 2020, section 3.1.4) on an encoder-decoder T5.

Of each sequence, `model.mask_ratio` of the tokens (0.15 by default, T5's noise density) are
chosen in spans of `model.mean_span_length` tokens on average (3 by default, as T5), by T5's
`random_spans_noise_mask`. The encoder sees the
sequence with every noise span replaced by one sentinel; the decoder produces each sentinel
followed by the tokens it replaced, then [SEP] as end of sequence:

    [CLS] the quick brown fox jumps over the lazy dog
    input:  [CLS] the <extra_id_0> fox jumps <extra_id_1> dog [SEP]
    target: <extra_id_0> quick brown <extra_id_1> over the lazy [SEP]

The sentinels are 100 ids appended after the tokenizer's vocabulary V, counted down from the top
as T5 does: <extra_id_i> = V + 99 - i. A document's own closing [SEP] is removed before the
corruption and appended to input and target afterwards (T5 appends EOS after corrupting), so
evaluation sees the encoder's inputs as in training: [CLS] ... [SEP].

With `data.packing` the micro-batch's documents run end to end and are cut into sequences of
seq_len - 1 tokens (T5 also corrupts concatenated text); otherwise each document is one sequence,
truncated to seq_len - 1 tokens. Encoder inputs are then never longer than seq_len.

As in T5 (without its later `random_roll` option), a sequence short enough for a single noise
span (under 31 tokens at density 0.15) always has that span at its end; packing keeps
most sequences at seq_len - 1 tokens, with several spans placed at random.

`data.pack: documents` is refused (`check_no_document_packing`): T5ForConditionalGeneration
passes its one `attention_mask` to both the encoder's self-attention ([rows, 1, T_in, T_in]) and
the cross-attention ([rows, 1, T_out, T_in]), so no mask keeps both within a document, and it
makes the decoder's inputs by shifting the labels right across document boundaries.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedModel, T5Config, T5ForConditionalGeneration

from darkmatter.trainer.config import Config, ConfigError, ObjectiveSettings
from darkmatter.trainer.objectives.base import Objective
from darkmatter.trainer.objectives.mlm import SpecialIds
from darkmatter.trainer.perf import encoder_layer_params, sequence_flops

NUM_SENTINELS = 100  # T5's <extra_id_0> ... <extra_id_99>
MEAN_SPAN_LENGTH = 3.0  # T5's mean noise span length (model.mean_span_length's default)


@dataclass
class SpanSettings(ObjectiveSettings):
    mask_ratio: float = 0.0
    """Noise density: share of each sequence's tokens corrupted, in spans of
    mean_span_length on average; 0: T5's 0.15."""
    mean_span_length: float = MEAN_SPAN_LENGTH
    """Mean length of a noise span in tokens (T5's mean_noise_span_length, 3); 1 corrupts
    single tokens, each its own sentinel (T5's i.i.d. variant)."""
    decoder_layers: int = 0
    """Decoder blocks (T5Config.num_decoder_layers); 0: model.num_layers, as T5."""
    relative_lr: bool = True
    """Each weight's learning rate is train.lr times its initial std by T5's initialization
    (1 for the embedding and the norms, d_model^-1/2 for most matrices): AdamW's steps become
    relative to the weight's size, as Adafactor's are (its scale_parameter), the optimizer T5's
    initialization was made for. Without it the std-1 embedding barely moves under AdamW while
    the query weights (std (d_model·d_kv)^-1/2) grow several times over, and span's encoder
    learns nothing the probe can read (docs/OBJECTIVES.md)."""


class SpanObjective(Objective):
    name = "span"
    settings_class = SpanSettings
    settings: SpanSettings
    default_mask_ratio = 0.15
    modality = "text"

    def __init__(self, cfg: Config, dataset_meta: dict[str, Any]):
        super().__init__(cfg, dataset_meta)
        check_no_document_packing(cfg)
        longest = cfg.data.seq_len - 1
        spans = noise_span_counts(longest, self.settings.mask_ratio, self.span_length)[1]
        if spans > NUM_SENTINELS:
            raise ValueError(
                f"data.seq_len: {cfg.data.seq_len} tokens at model.mask_ratio "
                f"{self.settings.mask_ratio} make {spans} noise spans, more than the "
                f"{NUM_SENTINELS} sentinels"
            )

    @classmethod
    def validate(cls, cfg: Config) -> None:
        super().validate(cfg)
        check_no_document_packing(cfg)
        s = cfg.objective_settings
        assert isinstance(s, SpanSettings)
        if s.mean_span_length < 1:
            raise ConfigError(f"model.mean_span_length: expected >= 1, got {s.mean_span_length}")
        if s.decoder_layers < 0:
            raise ConfigError(f"model.decoder_layers: expected >= 0, got {s.decoder_layers}")

    def lr_scale(self, name: str) -> float:
        """model.relative_lr: the initial std of weight `name` by T5's _init_weights (the
        module it belongs to decides: q, k, v, o, wi, wo, relative_attention_bias; 1 for the
        shared embedding, an untied lm_head and the layer norms)."""
        if not self.settings.relative_lr:
            return 1.0
        m = self.cfg.model
        d, kv, ff = m.hidden_size, m.hidden_size // m.num_heads, m.intermediate_size
        std = {"q": (d * kv) ** -0.5, "k": d**-0.5, "v": d**-0.5, "o": (m.num_heads * kv) ** -0.5,
               "wi": d**-0.5, "wi_0": d**-0.5, "wi_1": d**-0.5, "wo": ff**-0.5,
               "relative_attention_bias": d**-0.5}  # fmt: skip
        module = name.rsplit(".", 2)[-2] if name.count(".") else ""
        return std.get(module, 1.0)

    @property
    def span_length(self) -> float:
        """model.mean_span_length: tokens per noise span on average."""
        return self.settings.mean_span_length

    @property
    def decoder_layers(self) -> int:
        """model.decoder_layers, or model.num_layers where it is 0."""
        return self.settings.decoder_layers or self.cfg.model.num_layers

    @functools.cached_property  # lazy: see TextObjective.ids
    def ids(self) -> SpecialIds:
        return SpecialIds.from_meta(self.meta)

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary and the sentinels."""
        return int(self.meta["vocab_size"]) + NUM_SENTINELS

    def model_config(self) -> T5Config:
        m = self.cfg.model
        config = T5Config(
            vocab_size=self.vocab_size,
            d_model=m.hidden_size,
            d_kv=m.hidden_size // m.num_heads,
            d_ff=m.intermediate_size,
            num_layers=m.num_layers,
            num_decoder_layers=self.decoder_layers,
            num_heads=m.num_heads,
            dropout_rate=m.dropout,
            # Relative attention (32 buckets, distance 128), ReLU feed-forward and tied
            # embeddings: T5's defaults.
            pad_token_id=self.ids.pad,
            eos_token_id=self.ids.sep,
        )
        # The decoder starts from [PAD], as T5's does (not a declared field of T5Config in
        # transformers 5, but the model reads it and the config saves it).
        config.decoder_start_token_id = self.ids.pad
        return config

    def build_model(self) -> PreTrainedModel:
        return T5ForConditionalGeneration(self.model_config())

    def sequences(self, samples: list[dict[str, Any]]) -> list[np.ndarray]:
        """What gets corrupted: the documents without their closing [SEP], one per document
        (truncated) or end to end in pieces of seq_len - 1 tokens (data.packing)."""
        docs = [np.asarray(s["input_ids"], dtype=np.int64) for s in samples]
        n = self.cfg.data.seq_len - 1
        if self.cfg.data.packing:
            flat = np.concatenate(docs)
            return [flat[i : i + n] for i in range(0, len(flat), n)]
        sep = self.ids.sep
        return [d[:-1][:n] if len(d) and d[-1] == sep else d[:n] for d in docs]

    def make_batch(self, samples: list[dict[str, Any]], gen: torch.Generator) -> dict[str, Any]:
        """Encoder inputs padded with [PAD] (attention_mask 0), targets padded with -100; the
        model makes the decoder's inputs from the labels (shifted right, [PAD] first)."""
        top, pad = self.vocab_size - 1, self.ids.pad  # top: <extra_id_0>
        inputs, targets = [], []
        for seq in self.sequences(samples):
            ids = torch.from_numpy(seq)
            mask = random_spans_noise_mask(
                len(ids), self.settings.mask_ratio, gen, self.span_length
            )
            eos = torch.tensor([self.ids.sep])
            inputs.append(torch.cat([spans_to_sentinels(ids, mask, top), eos]))
            targets.append(torch.cat([spans_to_sentinels(ids, ~mask, top), eos]))
        input_ids = pad_sequence(inputs, batch_first=True, padding_value=pad)
        return {
            "input_ids": input_ids,
            "attention_mask": (input_ids != pad).long(),
            "labels": pad_sequence(targets, batch_first=True, padding_value=-100),
        }

    def tokens(self, batch: dict[str, Any]) -> int:
        """Encoder input tokens and decoder target tokens."""
        return int(batch["attention_mask"].sum()) + int((batch["labels"] != -100).sum())

    def flops_per_sequence(self, t_in: int, t_out: int) -> float:
        """Training FLOPs of one sequence pair, PaLM's formula per stack (trainer.perf):

            encoder: sequence_flops(L·(4h² + 2hI), L, H, Q, T_in)
            decoder: sequence_flops(L_d·(6h² + 2hI) + hV, L_d, H, Q, T_out)
                     (self-attention Q K V O, cross-attention Q O, MLP, LM head)
            cross-attention: 6·L_d·2h²·T_in (its K and V of the encoder output, per layer)
                     + 12·L_d·H·Q·T_in·T_out (its scores and weighted sum)

        h = hidden_size, I = intermediate_size, V = vocabulary with sentinels, Q = h / H,
        L = num_layers, L_d = decoder_layers."""
        m = self.cfg.model
        h, n_layers, heads = m.hidden_size, m.num_layers, m.num_heads
        q, ff, n_dec = h // heads, m.intermediate_size, self.decoder_layers
        encoder = sequence_flops(n_layers * encoder_layer_params(h, ff), n_layers, heads, q, t_in)
        decoder = sequence_flops(
            n_dec * (encoder_layer_params(h, ff) + 2 * h * h) + h * self.vocab_size,
            n_dec,
            heads,
            q,
            t_out,
        )
        cross = 6.0 * n_dec * 2 * h * h * t_in + 12.0 * n_dec * heads * q * t_in * t_out
        return encoder + decoder + cross

    def flops(self, batch: dict[str, Any]) -> float:
        t_in = batch["attention_mask"].sum(dim=1).tolist()
        t_out = (batch["labels"] != -100).sum(dim=1).tolist()
        return sum(
            self.flops_per_sequence(int(a), int(b)) for a, b in zip(t_in, t_out, strict=True)
        )

    def flops_inputs(self) -> dict[str, Any]:
        m = self.cfg.model
        return {
            "layers": m.num_layers, "decoder_layers": self.decoder_layers, "heads": m.num_heads,
            "head_dim": m.hidden_size // m.num_heads, "hidden": m.hidden_size,
            "intermediate": m.intermediate_size, "vocab": self.vocab_size,
            "seq_len": self.cfg.data.seq_len,
            "counted": "real encoder and decoder tokens (padding excluded), cross-attention",
        }  # fmt: skip


def check_no_document_packing(cfg: Config) -> None:
    """ConfigError for data.pack: documents, which span cannot keep apart (module docstring)."""
    if cfg.data.pack == "documents":
        raise ConfigError(
            "data.pack: documents is not supported by span: T5 takes one attention mask for its "
            "encoder and its cross-attention, so packed documents would attend to each other; "
            "use data.pack: none (data.packing: true packs without keeping documents apart)"
        )


def noise_span_counts(
    length: int, density: float, mean_span: float = MEAN_SPAN_LENGTH
) -> tuple[int, int]:
    """(noise tokens, noise spans) of a sequence, as T5 computes them: round(length × density)
    and round(noise / mean_span), at least one of each, at least one non-noise token. Python's
    round() rounds halves to even, as tf.round does. One guard of ours: no more spans than
    non-noise tokens (T5 fails there; it happens only at densities far above 0.5, or above 0.5
    with mean_span 1)."""
    length = max(length, 2)  # T5: "increase length to avoid degeneracy"
    noise = min(max(round(length * density), 1), length - 1)
    spans = max(round(noise / mean_span), 1)
    return noise, min(spans, length - noise)


def random_spans_noise_mask(
    length: int, density: float, gen: torch.Generator, mean_span: float = MEAN_SPAN_LENGTH
) -> torch.Tensor:
    """T5's `random_spans_noise_mask` ([length] bool, True = noise): the noise and the non-noise
    tokens are each cut at random into as many non-empty spans as noise_span_counts says, and
    interleaved, a non-noise span first. So the first token is never noise, the last always is."""
    orig_length, length = length, max(length, 2)
    noise, spans = noise_span_counts(length, density, mean_span)
    noise_lengths = _random_segmentation(noise, spans, gen)
    nonnoise_lengths = _random_segmentation(length - noise, spans, gen)
    interleaved = torch.stack([nonnoise_lengths, noise_lengths], dim=1).reshape(-1)
    starts = interleaved.cumsum(0)[:-1]
    indicator = torch.zeros(length, dtype=torch.long)
    indicator[starts] = 1
    return (indicator.cumsum(0) % 2 == 1)[:orig_length]


def _random_segmentation(items: int, segments: int, gen: torch.Generator) -> torch.Tensor:
    """Lengths of `segments` non-empty segments partitioning `items`, uniformly at random: the
    segments - 1 cut points are a random subset of the items - 1 gaps (T5's shuffled indicator)."""
    first_in_segment = torch.zeros(items, dtype=torch.long)
    first_in_segment[1:] = (torch.randperm(items - 1, generator=gen) < segments - 1).long()
    return torch.bincount(first_in_segment.cumsum(0), minlength=segments)


def spans_to_sentinels(ids: torch.Tensor, mask: torch.Tensor, top: int) -> torch.Tensor:
    """T5's `noise_span_to_unique_sentinel`: each run of True in `mask` becomes one sentinel,
    the i-th (from 0) run becoming top - i. Called with ~mask it gives the targets."""
    prev = torch.zeros_like(mask)
    prev[1:] = mask[:-1]
    first = mask & ~prev
    sentinels = top + 1 - first.long().cumsum(0)
    return torch.where(first, sentinels, ids)[~(mask & prev)]
