"""wav2vec 2.0 (Baevski et al. 2020) on raw 16 kHz audio: a convolutional feature encoder turns
the waveform into a frame every 20 ms, spans of frames are masked before the transformer, and
the transformer's output at each masked frame must pick that frame's quantized feature (Gumbel
softmax over 2 codebooks) out of distractors drawn from the clip's other masked frames
(contrastive loss), while a diversity loss keeps the codebooks in use.

The model is transformers' `Wav2Vec2ForPreTraining`; the encoder under `wav2vec2.` is a plain
`Wav2Vec2Model`, which the evaluation harness and export take. The batch carries the masks and
the negatives' indices (transformers' own `_compute_mask_indices` and
`_sample_negative_indices`, run under numpy's global RNG seeded from the batch's generator).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from transformers import PreTrainedModel, Wav2Vec2Config
from transformers.models.wav2vec2.modeling_wav2vec2 import (
    Wav2Vec2ForPreTraining,
    Wav2Vec2ForPreTrainingOutput,
    _compute_mask_indices,
    _sample_negative_indices,
)

from darkmatter.data_pipeline.transforms import (
    CONV_KERNEL,
    CONV_STRIDE,
    SAMPLE_RATE,
    clip_inputs,
    min_clip_samples,
    to_16k,
)
from darkmatter.data_pipeline.transforms import (  # tests import them from here
    audio_inputs as audio_inputs,
)
from darkmatter.trainer.config import ConfigError, ObjectiveSettings
from darkmatter.trainer.objectives.base import Objective
from darkmatter.trainer.perf import encoder_layer_params, sequence_flops

# The 16 kHz input, the feature encoder's convolutions (the paper's: CONV_KERNEL, CONV_STRIDE)
# and the clips' padding are data_pipeline.transforms', which evaluation shares.
CODEBOOKS = 2  # the paper's G
# Gumbel temperature: from 2 down to 0.5, times 0.999995 per update (the paper; transformers'
# example script does the same).
GUMBEL_MAX, GUMBEL_MIN, GUMBEL_DECAY = 2.0, 0.5, 0.999995


class Wav2Vec2Pretraining(Wav2Vec2ForPreTraining):  # type: ignore[misc]
    """`Wav2Vec2ForPreTraining` with two changes a training run needs:

    - the loss is per masked frame (transformers returns the sum over the batch's masked frames,
      which scales with batch size and mask ratio; fairseq divides the gradient by that count);
    - the Gumbel temperature is a function of the buffer `updates`, the optimizer steps taken,
      which the objective's after_step() sets: as a buffer it is in every checkpoint, so a
      resumed run's first step uses the temperature the uninterrupted run used.
    """

    updates: torch.Tensor

    def __init__(self, config: Wav2Vec2Config):
        super().__init__(config)
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def gumbel_temperature(self) -> torch.Tensor:
        decayed = GUMBEL_MAX * torch.pow(GUMBEL_DECAY, self.updates.double())
        return decayed.clamp(min=GUMBEL_MIN).float()

    def forward(  # type: ignore[override]
        self,
        input_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        mask_time_indices: torch.Tensor | None = None,
        sampled_negative_indices: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Wav2Vec2ForPreTrainingOutput:
        if self.training:
            self.quantizer.temperature = self.gumbel_temperature()  # a tensor: no host sync
        out = super().forward(
            input_values, attention_mask=attention_mask, mask_time_indices=mask_time_indices,
            sampled_negative_indices=sampled_negative_indices, **kwargs,
        )  # fmt: skip
        if out.loss is not None and mask_time_indices is not None:
            out.loss = out.loss / mask_time_indices.sum().clamp(min=1)
        return out


def conv_lengths(samples: int) -> list[int]:
    """Output length of each convolution of the feature encoder for `samples` input samples
    (transformers' `_get_feat_extract_output_lengths`, layer by layer); the last is the frames."""
    out = []
    for k, s in zip(CONV_KERNEL, CONV_STRIDE, strict=True):
        samples = max(0, (samples - k) // s + 1)
        out.append(samples)
    return out


def frames(samples: int) -> int:
    return conv_lengths(samples)[-1]


@contextmanager
def numpy_seeded(seed: int) -> Iterator[None]:
    """numpy's global RNG seeded for the block, then restored: transformers' mask and negative
    samplers draw from it (np.random.rand / choice / randint), so seeding it from the batch's
    generator makes them functions of (seed, step, rank, micro-batch). The trainer calls
    make_batch from one thread."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


@dataclass
class Wav2Vec2Settings(ObjectiveSettings):
    """wav2vec 2.0's settings: the feature encoder, the masking, the quantizer, the contrastive
    loss."""

    projection_dim: int = 128
    """Width of the quantized codevectors and of the projections the loss compares (a multiple
    of the quantizer's 2 codebooks)."""
    temperature: float = 0.2
    """Temperature of the contrastive loss's cosine similarities (the paper: 0.1)."""
    mask_ratio: float = 0.0
    """Share of the frames chosen as starts of masked spans; 0: the paper's 0.65, which with
    spans of 10 hides about half of them."""
    conv_dim: int = 512
    """Channels of each of the 7 convolutions of the feature encoder (kernels 10,3,3,3,3,2,2,
    strides 5,2,2,2,2,2,2: a 25 ms frame every 20 ms at 16 kHz)."""
    mask_length: int = 10
    """Frames per masked span (the paper: 10)."""
    num_negatives: int = 100
    """Distractors per masked frame, drawn from the masked frames of the same clip."""
    codevectors: int = 320
    """Entries of each of the quantizer's 2 codebooks."""
    pos_conv_kernel: int = 32
    """Frames the convolutional position embedding spans (the paper: 128, 2.5 s; 32 suits the
    quickstart's clips of about 1 s)."""


class Wav2Vec2Objective(Objective):
    name = "wav2vec2"
    settings_class = Wav2Vec2Settings
    settings: Wav2Vec2Settings
    default_mask_ratio = 0.65
    modality = "audio"
    float_inputs = ("input_values",)

    def __init__(self, cfg: Any, dataset_meta: dict[str, Any]):
        super().__init__(cfg, dataset_meta)
        m, d = self.settings, cfg.data
        for key, value, least in (("model.conv_dim", m.conv_dim, 1),
                                  ("model.mask_length", m.mask_length, 1),
                                  ("model.num_negatives", m.num_negatives, 1),
                                  ("model.codevectors", m.codevectors, 2),
                                  ("model.pos_conv_kernel", m.pos_conv_kernel, 1)):  # fmt: skip
            if value < least:
                raise ConfigError(f"{key}: expected >= {least}, got {value}")
        if m.projection_dim % CODEBOOKS:
            raise ConfigError(
                f"model.projection_dim: {m.projection_dim} is not divisible by the wav2vec2 "
                f"quantizer's {CODEBOOKS} codebooks"
            )
        self.length = round(d.audio_seconds * SAMPLE_RATE)
        self.min_length = min_clip_samples(m.mask_length)
        if self.length < self.min_length:
            raise ConfigError(
                f"data.audio_seconds: {d.audio_seconds} s gives {frames(self.length)} frames; "
                f"model.mask_length={m.mask_length} needs at least {m.mask_length + 1} "
                f"({self.min_length / SAMPLE_RATE:.3f} s)"
            )

    def model_config(self) -> Wav2Vec2Config:
        m, s = self.cfg.model, self.settings
        return Wav2Vec2Config(
            hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
            num_attention_heads=m.num_heads, intermediate_size=m.intermediate_size,
            conv_dim=(s.conv_dim,) * len(CONV_KERNEL), conv_kernel=CONV_KERNEL,
            conv_stride=CONV_STRIDE, conv_bias=True,
            # LayerNorm in every convolution and a pre-LN transformer (the "large" variant):
            # stable from scratch at any size, and padding is masked rather than fed as zeros.
            feat_extract_norm="layer", do_stable_layer_norm=True,
            num_conv_pos_embeddings=s.pos_conv_kernel,
            num_conv_pos_embedding_groups=math.gcd(16, m.hidden_size),
            hidden_dropout=m.dropout, attention_dropout=m.dropout, activation_dropout=0.0,
            feat_proj_dropout=m.dropout, feat_quantizer_dropout=m.dropout, layerdrop=0.0,
            apply_spec_augment=True, mask_time_prob=s.mask_ratio, mask_time_length=s.mask_length,
            mask_time_min_masks=2, mask_feature_prob=0.0,
            num_codevector_groups=CODEBOOKS, num_codevectors_per_group=s.codevectors,
            codevector_dim=s.projection_dim, proj_codevector_dim=s.projection_dim,
            num_negatives=s.num_negatives, contrastive_logits_temperature=s.temperature,
            diversity_loss_weight=0.1,
        )  # fmt: skip

    def build_model(self) -> PreTrainedModel:
        return Wav2Vec2Pretraining(self.model_config())

    def after_step(self, engine: Any, step: int) -> None:
        engine.module.updates.fill_(step)  # the Gumbel temperature follows (Wav2Vec2Pretraining)

    def make_batch(self, samples: list[dict[str, Any]], gen: torch.Generator) -> dict[str, Any]:
        m = self.settings
        clips = []
        for s in samples:
            wave = to_16k(s["audio"], s["sample_rate"], f"sample {s.get('__key__', '?')}")
            if len(wave) > self.length:
                start = int(torch.randint(len(wave) - self.length + 1, (1,), generator=gen))
                wave = wave[start : start + self.length]
            clips.append(wave)
        batch = clip_inputs(clips, self.length, self.min_length)
        n_frames = frames(self.length)
        real = torch.tensor([frames(int(n)) for n in batch["attention_mask"].sum(1)])
        frame_mask = cast(
            torch.LongTensor, (torch.arange(n_frames)[None, :] < real[:, None]).long()
        )
        seed = int(torch.randint(2**31, (1,), generator=gen))
        with numpy_seeded(seed):
            mask = _compute_mask_indices((len(clips), n_frames), m.mask_ratio, m.mask_length,
                                         attention_mask=frame_mask, min_masks=2)  # fmt: skip
            negatives = _sample_negative_indices((len(clips), n_frames), m.num_negatives, mask)
        batch["mask_time_indices"] = torch.from_numpy(mask)
        batch["sampled_negative_indices"] = torch.from_numpy(negatives).long()
        return batch

    def real_samples(self, batch: dict[str, Any]) -> list[int]:
        return [int(n) for n in batch["attention_mask"].sum(1)]

    def tokens(self, batch: dict[str, Any]) -> int:
        """Frames the transformer sees (padding excluded)."""
        return sum(frames(n) for n in self.real_samples(batch))

    def clip_flops(self, samples: int) -> float:
        """Training FLOPs of one clip of `samples` real samples: the convolutions on their real
        outputs, then per frame the feature projection, the positional convolution, the
        transformer (on every frame, masked ones included: they are replaced, not dropped), the
        quantizer's logits and codevector sum, both projections and the K+1 similarities."""
        m, s = self.cfg.model, self.settings
        c, h, p, k = s.conv_dim, m.hidden_size, s.projection_dim, s.num_negatives
        # (transformers makes the waveform require a gradient, so the first convolution takes
        # its input gradient too: 6 FLOPs per multiply-add in every layer.)
        conv, c_in = 0, 1
        for n, kernel in zip(conv_lengths(samples), CONV_KERNEL, strict=True):
            conv += n * kernel * c_in * c
            c_in = c
        t = frames(samples)
        # The positional convolution pads kernel // 2 on both sides (one output more for an
        # even kernel, which transformers then drops).
        kp = s.pos_conv_kernel
        pos_out = t + 2 * (kp // 2) - kp + 1
        pos = pos_out * h * (h // math.gcd(16, h)) * kp
        per_frame = (c * h + c * CODEBOOKS * s.codevectors + s.codevectors * p + h * p + p * p
                     + (k + 1) * p)  # fmt: skip
        layers = m.num_layers * encoder_layer_params(h, m.intermediate_size)
        encoder = sequence_flops(layers, m.num_layers, m.num_heads, h // m.num_heads, t)
        return 6.0 * (conv + pos + t * per_frame) + encoder

    def flops(self, batch: dict[str, Any]) -> float:
        return sum(self.clip_flops(n) for n in self.real_samples(batch))

    def flops_inputs(self) -> dict[str, Any]:
        m = self.cfg.model
        return {
            "layers": m.num_layers, "heads": m.num_heads, "hidden": m.hidden_size,
            "conv_dim": self.settings.conv_dim, "conv_layers": len(CONV_KERNEL),
            "clip_samples": self.length, "frames_per_clip": frames(self.length),
            "flops_per_full_clip": self.clip_flops(self.length),
            "counted": "real samples and frames (padding excluded)",
        }  # fmt: skip
