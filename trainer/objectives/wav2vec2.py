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
from typing import Any, cast

import numpy as np
import torch
from transformers import PreTrainedModel, Wav2Vec2Config, Wav2Vec2FeatureExtractor
from transformers.models.wav2vec2.modeling_wav2vec2 import (
    Wav2Vec2ForPreTraining,
    Wav2Vec2ForPreTrainingOutput,
    _compute_mask_indices,
    _sample_negative_indices,
)

from darkmatter.trainer.config import ConfigError
from darkmatter.trainer.objectives.base import Objective
from darkmatter.trainer.perf import encoder_layer_params, sequence_flops

SAMPLE_RATE = 16_000
# The paper's feature encoder: 7 convolutions, receptive field 400 samples (25 ms), stride 320
# (20 ms); only the channel count is scaled down for small models (model.conv_dim).
CONV_KERNEL = (10, 3, 3, 3, 3, 2, 2)
CONV_STRIDE = (5, 2, 2, 2, 2, 2, 2)
CODEBOOKS = 2  # the paper's G
POS_CONV_KERNEL = 32  # the paper's 128 spans 2.5 s; the presets' clips are about 1 s
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


def samples_for(n_frames: int) -> int:
    """The fewest samples that give `n_frames` frames: receptive field + (n - 1) strides."""
    field, stride = 1, 1
    for k, s in zip(CONV_KERNEL, CONV_STRIDE, strict=True):
        field += (k - 1) * stride
        stride *= s
    return field + (n_frames - 1) * stride


def min_clip_samples(mask_length: int) -> int:
    """Real samples every clip keeps (shorter ones are padded with silence that counts as audio):
    enough frames for one whole masked span and one more, so every clip has at least two masked
    frames and its masked frames can serve as each other's negatives."""
    return samples_for(mask_length + 1)


def to_16k(wave: np.ndarray, rate: int, where: str) -> np.ndarray:
    """A mono waveform at 16 kHz (scipy's polyphase resampler, as librosa's 'polyphase' mode)."""
    if wave.ndim != 1 or wave.size == 0:
        raise ValueError(f"{where}: expected a non-empty mono waveform, got shape {wave.shape}")
    if not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise ValueError(
            f"{where}: sample rate {rate!r} is not a positive integer: cannot resample"
        )
    wave = wave.astype(np.float32, copy=False)
    if rate == SAMPLE_RATE:
        return wave
    from scipy.signal import resample_poly

    g = math.gcd(SAMPLE_RATE, int(rate))
    return resample_poly(wave, SAMPLE_RATE // g, int(rate) // g).astype(np.float32)


# Normalization and padding of every clip; `darkmatter export` saves it beside the encoder.
FEATURE_EXTRACTOR = Wav2Vec2FeatureExtractor(
    feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0, do_normalize=True,
    return_attention_mask=True,
)  # fmt: skip


def clip_inputs(clips: list[np.ndarray], length: int, min_length: int) -> dict[str, torch.Tensor]:
    """16 kHz clips of at most `length` samples -> the model's inputs: each clip padded with
    silence to `min_length`, normalized to zero mean and unit variance over its real samples
    and padded to `length` (Wav2Vec2FeatureExtractor), with the attention mask of the padding."""
    clips = [np.pad(c, (0, max(0, min_length - len(c)))) for c in clips]
    enc = FEATURE_EXTRACTOR(clips, sampling_rate=SAMPLE_RATE, padding="max_length", max_length=length,
                     return_attention_mask=True, return_tensors="pt")  # fmt: skip
    return {
        "input_values": enc["input_values"].float(),
        "attention_mask": enc["attention_mask"].long(),
    }


def audio_inputs(
    waves: list[np.ndarray], rates: list[int], seconds: float, mask_length: int,
    where: list[str],
) -> dict[str, torch.Tensor]:  # fmt: skip
    """What the evaluation harness feeds the encoder: resampled, the first `seconds` of each
    clip, padded and normalized as in training (training crops at a random offset instead)."""
    n = round(seconds * SAMPLE_RATE)
    clips = [to_16k(w, r, k)[:n] for w, r, k in zip(waves, rates, where, strict=True)]
    return clip_inputs(clips, n, min_clip_samples(mask_length))


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


class Wav2Vec2Objective(Objective):
    name = "wav2vec2"
    default_mask_ratio = 0.65
    modality = "audio"
    float_inputs = ("input_values",)

    def __init__(self, cfg: Any, dataset_meta: dict[str, Any]):
        super().__init__(cfg, dataset_meta)
        m, d = cfg.model, cfg.data
        for key, value, least in (("model.conv_dim", m.conv_dim, 1),
                                  ("model.mask_length", m.mask_length, 1),
                                  ("model.num_negatives", m.num_negatives, 1),
                                  ("model.codevectors", m.codevectors, 2)):  # fmt: skip
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
        m = self.cfg.model
        return Wav2Vec2Config(
            hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
            num_attention_heads=m.num_heads, intermediate_size=m.intermediate_size,
            conv_dim=(m.conv_dim,) * len(CONV_KERNEL), conv_kernel=CONV_KERNEL,
            conv_stride=CONV_STRIDE, conv_bias=True,
            # LayerNorm in every convolution and a pre-LN transformer (the "large" variant):
            # stable from scratch at any size, and padding is masked rather than fed as zeros.
            feat_extract_norm="layer", do_stable_layer_norm=True,
            num_conv_pos_embeddings=POS_CONV_KERNEL,
            num_conv_pos_embedding_groups=math.gcd(16, m.hidden_size),
            hidden_dropout=m.dropout, attention_dropout=m.dropout, activation_dropout=0.0,
            feat_proj_dropout=m.dropout, feat_quantizer_dropout=m.dropout, layerdrop=0.0,
            apply_spec_augment=True, mask_time_prob=m.mask_ratio, mask_time_length=m.mask_length,
            mask_time_min_masks=2, mask_feature_prob=0.0,
            num_codevector_groups=CODEBOOKS, num_codevectors_per_group=m.codevectors,
            codevector_dim=m.projection_dim, proj_codevector_dim=m.projection_dim,
            num_negatives=m.num_negatives, contrastive_logits_temperature=m.temperature,
            diversity_loss_weight=0.1,
        )  # fmt: skip

    def build_model(self) -> PreTrainedModel:
        return Wav2Vec2Pretraining(self.model_config())

    def after_step(self, engine: Any, step: int) -> None:
        engine.module.updates.fill_(step)  # the Gumbel temperature follows (Wav2Vec2Pretraining)

    def make_batch(self, samples: list[dict[str, Any]], gen: torch.Generator) -> dict[str, Any]:
        m = self.cfg.model
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
        m = self.cfg.model
        c, h, p, k = m.conv_dim, m.hidden_size, m.projection_dim, m.num_negatives
        # (transformers makes the waveform require a gradient, so the first convolution takes
        # its input gradient too: 6 FLOPs per multiply-add in every layer.)
        conv, c_in = 0, 1
        for n, kernel in zip(conv_lengths(samples), CONV_KERNEL, strict=True):
            conv += n * kernel * c_in * c
            c_in = c
        t = frames(samples)
        # The positional convolution pads kernel // 2 on both sides (one output more for an
        # even kernel, which transformers then drops).
        pos_out = t + 2 * (POS_CONV_KERNEL // 2) - POS_CONV_KERNEL + 1
        pos = pos_out * h * (h // math.gcd(16, h)) * POS_CONV_KERNEL
        per_frame = (c * h + c * CODEBOOKS * m.codevectors + m.codevectors * p + h * p + p * p
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
            "conv_dim": m.conv_dim, "conv_layers": len(CONV_KERNEL),
            "clip_samples": self.length, "frames_per_clip": frames(self.length),
            "flops_per_full_clip": self.clip_flops(self.length),
            "counted": "real samples and frames (padding excluded)",
        }  # fmt: skip
