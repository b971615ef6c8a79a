"""VideoMAE (Tong et al. 2022) on clips: a ViT over space-time tubes (model.tubelet_size frames
× patch × patch), most tubes hidden by *tube masking* — one random spatial mask per clip, the same
in every time slot, so a hidden patch cannot be copied from the same place a frame earlier — the
encoder on the visible tubes only, a light decoder reconstructing the hidden tubes' pixels, each
patch normalized per channel (norm_pix_loss). `model.mask_ratio` is the share hidden (VideoMAE:
0.9, its default here).

Frames: `data.num_frames` of a decoded clip, every `data.frame_stride`-th from an offset drawn
from the batch's generator (evaluation takes the centred window: data_pipeline.transforms'
`frame_indices`), resized to `data.image_size` and normalized as the image objectives' pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, VideoMAEConfig, VideoMAEForPreTraining

from darkmatter.data_pipeline.transforms import clips_to_tensor
from darkmatter.data_pipeline.transforms import (  # tests import it from here
    frame_indices as frame_indices,
)
from darkmatter.trainer.config import Config, ConfigError
from darkmatter.trainer.objectives.base import ViTObjective, ViTSettings
from darkmatter.trainer.perf import encoder_layer_params, sequence_flops


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


def init_mask_token(model: Any) -> Any:
    """transformers leaves a VideoMAE pretrainer's mask token at zero; VideoMAE draws it
    (truncated normal, 0.02). Under ZeRO-3 it is partitioned as built: gathered for the write."""
    from darkmatter.trainer.engine import gathered

    with torch.no_grad(), gathered([model.mask_token]):
        torch.nn.init.trunc_normal_(model.mask_token, std=0.02)
    return model


class VideoMAEPretrainer(VideoMAEForPreTraining):  # type: ignore[misc]
    """VideoMAEForPreTraining whose decoder follows `set_attn_implementation`: transformers
    builds the decoder from a copy of the config, which the call never reaches, so the decoder
    would keep the kernel chosen at construction (model.attention would not apply to it)."""

    def set_attn_implementation(self, attn_implementation: Any, *args: Any, **kwargs: Any) -> Any:
        out = super().set_attn_implementation(attn_implementation, *args, **kwargs)
        self.decoder.config._attn_implementation = self.config._attn_implementation
        return out


@dataclass
class VideoSettings(ViTSettings):
    """VideoMAE's settings: the tubes (patch_size x patch_size x tubelet_size), the decoder, the
    share of tubes hidden."""

    tubelet_size: int = 2
    """Frames one tube spans (VideoMAE's tubes: 2 frames x patch x patch); data.num_frames is a
    multiple of it."""
    decoder_hidden_size: int = 128
    """Width of the decoder (its feed-forward layer: 4 times that)."""
    decoder_num_layers: int = 1
    """Transformer blocks in the decoder."""
    mask_ratio: float = 0.0
    """Share of each frame's patches hidden (the same in every time slot); 0: VideoMAE's 0.9."""


class VideoObjective(ViTObjective):
    name = "video"
    settings_class = VideoSettings
    settings: VideoSettings
    default_mask_ratio = 0.9
    modality = "video"
    float_inputs = ("pixel_values",)

    @classmethod
    def validate(cls, cfg: Config) -> None:
        super().validate(cfg)
        s = cfg.objective_settings
        assert isinstance(s, VideoSettings)
        if s.tubelet_size < 1:
            raise ConfigError(f"model.tubelet_size: expected >= 1, got {s.tubelet_size}")
        if cfg.data.num_frames % s.tubelet_size:
            raise ConfigError(
                f"data.num_frames: {cfg.data.num_frames} is not a positive multiple of "
                f"model.tubelet_size={s.tubelet_size}"
            )

    def __init__(self, cfg: Config, dataset_meta: dict[str, Any]):
        super().__init__(cfg, dataset_meta)
        if not 0 < self.hidden() < self.num_patches():
            raise ConfigError(
                f"model.mask_ratio: {self.settings.mask_ratio} hides {self.hidden()} of the "
                f"{self.num_patches()} patches of a frame; the video objective needs at least "
                "one hidden and one visible"
            )

    def time_slots(self) -> int:
        return self.cfg.data.num_frames // self.settings.tubelet_size

    def hidden(self) -> int:
        """Hidden patches per frame, rounded down as VideoMAE's tube masking does."""
        return int(self.settings.mask_ratio * self.num_patches())

    def visible(self) -> int:
        """Visible tubes per clip: what the encoder sees."""
        return self.time_slots() * (self.num_patches() - self.hidden())

    def model_config(self) -> VideoMAEConfig:
        m, s = self.cfg.model, self.settings
        return VideoMAEConfig(
            **self.vit_kwargs(),
            num_frames=self.cfg.data.num_frames,
            tubelet_size=s.tubelet_size,
            decoder_hidden_size=s.decoder_hidden_size,
            decoder_num_hidden_layers=s.decoder_num_layers,
            decoder_num_attention_heads=m.num_heads,
            decoder_intermediate_size=4 * s.decoder_hidden_size,
            norm_pix_loss=True,
            use_mean_pooling=True,  # no final norm: features are the mean of the last states
        )

    def build_model(self) -> PreTrainedModel:
        # VideoMAE's sin-cos tables are plain tensors computed in __init__ (not weights), so the
        # zero-init of transformers 5 that ViT-MAE needs repaired (mae.py) does not reach them.
        return init_mask_token(VideoMAEPretrainer(self.model_config()))

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
        m, s = self.cfg.model, self.settings
        h, hd = m.hidden_size, s.decoder_hidden_size
        pix = 3 * s.tubelet_size * s.patch_size**2
        n_all, n_vis = self.time_slots() * self.num_patches(), self.visible()
        encoder = sequence_flops(m.num_layers * encoder_layer_params(h, m.intermediate_size),
                                 m.num_layers, m.num_heads, h // m.num_heads, n_vis)  # fmt: skip
        decoder = sequence_flops(s.decoder_num_layers * encoder_layer_params(hd, 4 * hd),
                                 s.decoder_num_layers, m.num_heads, hd // m.num_heads, n_all)  # fmt: skip
        linear = 4.0 * pix * h * n_all + 6.0 * (h * hd * n_vis + hd * pix * (n_all - n_vis))
        return encoder + decoder + linear

    def flops_inputs(self) -> dict[str, Any]:
        m, s = self.cfg.model, self.settings
        return {
            "encoder_layers": m.num_layers, "decoder_layers": s.decoder_num_layers,
            "heads": m.num_heads, "hidden": m.hidden_size, "decoder_hidden": s.decoder_hidden_size,
            "tubes": self.time_slots() * self.num_patches(), "visible_tubes": self.visible(),
            "flops_per_sample": self.sample_flops(),
        }  # fmt: skip
