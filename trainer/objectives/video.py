"""VideoMAE (Tong et al. 2022) on clips: a ViT over space-time tubes (model.tubelet_size frames
× patch × patch), most tubes hidden by *tube masking* — one random spatial mask per clip, the same
in every time slot, so a hidden patch cannot be copied from the same place a frame earlier — the
encoder on the visible tubes only, a light decoder reconstructing the hidden tubes' pixels, each
patch normalized per channel (norm_pix_loss). `model.mask_ratio` is the share hidden (VideoMAE:
0.9, its default here).

Frames: `data.num_frames` of a decoded clip, every `data.frame_stride`-th from an offset drawn
from the batch's generator (evaluation takes the centred window: `frame_indices`), resized to
`data.image_size` and normalized as the image objectives' pixels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, VideoMAEConfig, VideoMAEForPreTraining

from darkmatter.data_pipeline.transforms import images_to_tensor
from darkmatter.trainer.config import Config, ConfigError
from darkmatter.trainer.objectives.base import SampleFlops
from darkmatter.trainer.perf import encoder_layer_params, sequence_flops


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


def tube_mask(
    batch: int, time_slots: int, per_frame: int, hidden: int, gen: torch.Generator
) -> torch.Tensor:
    """bool [batch, time_slots·per_frame], True = hidden: `hidden` patches of each clip's frame
    chosen at random, the same in every time slot (VideoMAE's TubeMaskingGenerator). Index
    t·per_frame + p, the order of VideoMAE's tube embeddings (time, then rows, then columns)."""
    noise = torch.rand((batch, per_frame), generator=gen)
    spatial = torch.zeros((batch, per_frame), dtype=torch.bool)
    spatial.scatter_(1, noise.argsort(dim=1)[:, :hidden], True)
    return spatial.repeat(1, time_slots)


class VideoMAEPretrainer(VideoMAEForPreTraining):  # type: ignore[misc]
    """VideoMAEForPreTraining whose decoder follows `set_attn_implementation`: transformers
    builds the decoder from a copy of the config, which the call never reaches, so the decoder
    would keep the kernel chosen at construction (model.attention would not apply to it)."""

    def set_attn_implementation(self, attn_implementation: Any, *args: Any, **kwargs: Any) -> Any:
        out = super().set_attn_implementation(attn_implementation, *args, **kwargs)
        self.decoder.config._attn_implementation = self.config._attn_implementation
        return out


class VideoObjective(SampleFlops):
    name = "video"
    default_mask_ratio = 0.9
    modality = "video"
    float_inputs = ("pixel_values",)

    def __init__(self, cfg: Config, dataset_meta: dict[str, Any]):
        super().__init__(cfg, dataset_meta)
        if not 0 < self.hidden() < self.num_patches():
            raise ConfigError(
                f"model.mask_ratio: {cfg.model.mask_ratio} hides {self.hidden()} of the "
                f"{self.num_patches()} patches of a frame; the video objective needs at least "
                "one hidden and one visible"
            )

    def time_slots(self) -> int:
        return self.cfg.data.num_frames // self.cfg.model.tubelet_size

    def hidden(self) -> int:
        """Hidden patches per frame, rounded down as VideoMAE's tube masking does."""
        return int(self.cfg.model.mask_ratio * self.num_patches())

    def visible(self) -> int:
        """Visible tubes per clip: what the encoder sees."""
        return self.time_slots() * (self.num_patches() - self.hidden())

    def model_config(self) -> VideoMAEConfig:
        m = self.cfg.model
        return VideoMAEConfig(
            **self.vit_kwargs(),
            num_frames=self.cfg.data.num_frames,
            tubelet_size=m.tubelet_size,
            decoder_hidden_size=m.decoder_hidden_size,
            decoder_num_hidden_layers=m.decoder_num_layers,
            decoder_num_attention_heads=m.num_heads,
            decoder_intermediate_size=4 * m.decoder_hidden_size,
            norm_pix_loss=True,
            use_mean_pooling=True,  # no final norm: features are the mean of the last states
        )

    def build_model(self) -> PreTrainedModel:
        # VideoMAE's sin-cos tables are plain tensors computed in __init__ (not weights), so the
        # zero-init of transformers 5 that ViT-MAE needs repaired (mae.py) does not reach them.
        model = VideoMAEPretrainer(self.model_config())
        # transformers leaves the mask token at zero; VideoMAE draws it (truncated normal, 0.02).
        # Under ZeRO-3 it is partitioned as built: gathered for the write.
        from darkmatter.trainer.engine import gathered

        with torch.no_grad(), gathered([model.mask_token]):
            torch.nn.init.trunc_normal_(model.mask_token, std=0.02)
        return model

    def make_batch(self, samples: list[dict[str, Any]], gen: torch.Generator) -> dict[str, Any]:
        d = self.cfg.data
        pixels = clips_to_tensor([s["frames"] for s in samples], d.num_frames, d.frame_stride,
                                 d.image_size, gen)  # fmt: skip
        mask = tube_mask(len(samples), self.time_slots(), self.num_patches(), self.hidden(), gen)
        return {"pixel_values": pixels, "bool_masked_pos": mask}

    def tokens(self, batch: dict[str, Any]) -> int:
        return int(batch["pixel_values"].shape[0]) * self.visible()

    def sample_flops(self) -> float:
        """The tube projection on every tube (forward and weight gradient: the pixels need no
        gradient), the encoder on the visible tubes, the decoder on every tube, its pixel head on
        the hidden ones only (VideoMAE has no [CLS])."""
        m = self.cfg.model
        h, hd = m.hidden_size, m.decoder_hidden_size
        pix = 3 * m.tubelet_size * m.patch_size**2
        n_all, n_vis = self.time_slots() * self.num_patches(), self.visible()
        encoder = sequence_flops(m.num_layers * encoder_layer_params(h, m.intermediate_size),
                                 m.num_layers, m.num_heads, h // m.num_heads, n_vis)  # fmt: skip
        decoder = sequence_flops(m.decoder_num_layers * encoder_layer_params(hd, 4 * hd),
                                 m.decoder_num_layers, m.num_heads, hd // m.num_heads, n_all)  # fmt: skip
        linear = 4.0 * pix * h * n_all + 6.0 * (h * hd * n_vis + hd * pix * (n_all - n_vis))
        return encoder + decoder + linear

    def flops_inputs(self) -> dict[str, Any]:
        m = self.cfg.model
        return {
            "encoder_layers": m.num_layers, "decoder_layers": m.decoder_num_layers,
            "heads": m.num_heads, "hidden": m.hidden_size, "decoder_hidden": m.decoder_hidden_size,
            "tubes": self.time_slots() * self.num_patches(), "visible_tubes": self.visible(),
            "flops_per_sample": self.sample_flops(),
        }  # fmt: skip
