"""CPU-side input transforms shared by training and evaluation, so both see identical inputs:
images resized and normalized, the frames a video clip contributes, and 16 kHz audio clips
resampled, padded and normalized as wav2vec2 takes them."""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# ImageNet statistics, as ViT image processors use.
IMAGE_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGE_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def images_to_tensor(images: list[np.ndarray], size: int) -> torch.Tensor:
    """uint8 [H, W, 3] arrays -> normalized float [B, 3, size, size] (bilinear resize)."""
    return normalize(images_to_unit(images, size))


def images_to_unit(images: list[np.ndarray], size: int) -> torch.Tensor:
    """uint8 [H, W, 3] arrays -> float [B, 3, size, size] in [0, 1] (bilinear resize), for
    objectives that augment before normalizing."""
    x = torch.stack(
        [torch.from_numpy(np.array(im, dtype=np.uint8)) for im in images]
    )  # copies: decoded arrays may be read-only
    x = x.permute(0, 3, 1, 2).float() / 255.0  # [B, 3, H, W]
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x


def normalize(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels -> the ImageNet-normalized values the encoders take (on x's device)."""
    return (x - IMAGE_MEAN.to(x.device, x.dtype)) / IMAGE_STD.to(x.device, x.dtype)


# -- video: which frames of a clip ------------------------------------------------------------


def frame_indices(
    length: int, num_frames: int, stride: int, gen: torch.Generator | None = None
) -> list[int]:
    """Which of a clip's `length` frames to take: `num_frames` at `stride` from an offset drawn
    from `gen` (None: the centred window, for evaluation); a clip shorter than the window gives
    evenly spaced frames over its whole length (repeated when it has fewer than num_frames)."""
    window = (num_frames - 1) * stride + 1
    if length < window:
        return [int(i) for i in np.linspace(0, length - 1, num_frames).round()]
    room = length - window
    start = room // 2 if gen is None else int(torch.randint(room + 1, (1,), generator=gen))
    return list(range(start, start + window, stride))


def clips_to_tensor(
    clips: list[np.ndarray], num_frames: int, stride: int, size: int,
    gen: torch.Generator | None = None,
) -> torch.Tensor:  # fmt: skip
    """uint8 [T, H, W, 3] clips -> normalized float [B, num_frames, 3, size, size], the layout
    VideoMAE takes (frames chosen by frame_indices, bilinear resize as images_to_tensor)."""
    out = []
    for clip in clips:
        if clip.ndim != 4 or clip.shape[-1] != 3 or len(clip) == 0:
            raise ValueError(
                f"expected frames uint8[T, H, W, 3], got {clip.dtype}{list(clip.shape)}"
            )
        idx = frame_indices(len(clip), num_frames, stride, gen)
        out.append(images_to_tensor(list(clip[idx]), size))
    return torch.stack(out)


# -- audio: 16 kHz waveforms as wav2vec2 takes them ------------------------------------------

SAMPLE_RATE = 16_000
# The paper's feature encoder: 7 convolutions, receptive field 400 samples (25 ms), stride 320
# (20 ms); only the channel count is scaled down for small models (model.conv_dim). Its framing
# decides the shortest clip that training and evaluation pad to (min_clip_samples).
CONV_KERNEL = (10, 3, 3, 3, 3, 2, 2)
CONV_STRIDE = (5, 2, 2, 2, 2, 2, 2)


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


@functools.cache
def feature_extractor() -> Any:
    """Normalization and padding of every clip (transformers' Wav2Vec2FeatureExtractor, imported
    only when audio is used); `darkmatter export` saves it beside the encoder."""
    from transformers import Wav2Vec2FeatureExtractor

    return Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0, do_normalize=True,
        return_attention_mask=True,
    )  # fmt: skip


def clip_inputs(clips: list[np.ndarray], length: int, min_length: int) -> dict[str, torch.Tensor]:
    """16 kHz clips of at most `length` samples -> the model's inputs: each clip padded with
    silence to `min_length`, normalized to zero mean and unit variance over its real samples
    and padded to `length` (Wav2Vec2FeatureExtractor), with the attention mask of the padding."""
    clips = [np.pad(c, (0, max(0, min_length - len(c)))) for c in clips]
    enc = feature_extractor()(clips, sampling_rate=SAMPLE_RATE, padding="max_length",
                              max_length=length, return_attention_mask=True,
                              return_tensors="pt")  # fmt: skip
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
