"""Masked autoencoder (MAE, He et al. 2021) on a ViT: 75% of the patches are hidden, the encoder
sees the rest, a light decoder reconstructs the hidden patches' normalized pixels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, ViTMAEConfig, ViTMAEForPreTraining

from darkmatter.data_pipeline.transforms import images_to_tensor
from darkmatter.trainer.config import Config, ConfigError
from darkmatter.trainer.objectives.base import ViTObjective, ViTSettings
from darkmatter.trainer.perf import encoder_layer_params, sequence_flops


@dataclass
class MAESettings(ViTSettings):
    """MAE's settings: the ViT's patch_size, the decoder, the share of patches hidden."""

    decoder_hidden_size: int = 128
    """Width of the decoder (its feed-forward layer: 4 times that)."""
    decoder_num_layers: int = 1
    """Transformer blocks in the decoder."""
    decoder_num_heads: int = 0
    """Attention heads of the decoder; 0: model.num_heads (MAE's decoders: 16, 512 wide)."""
    mask_ratio: float = 0.0
    """Share of the patches hidden from the encoder; 0: MAE's 0.75."""


class MAEObjective(ViTObjective):
    name = "mae"
    settings_class = MAESettings
    settings: MAESettings
    default_mask_ratio = 0.75
    modality = "image"
    float_inputs = ("pixel_values",)

    @classmethod
    def validate(cls, cfg: Config) -> None:
        super().validate(cfg)
        s = cfg.objective_settings
        assert isinstance(s, MAESettings)
        heads = s.decoder_num_heads or cfg.model.num_heads
        if s.decoder_num_heads < 0 or s.decoder_hidden_size % heads:
            raise ConfigError(
                f"model.decoder_hidden_size: {s.decoder_hidden_size} is not divisible by "
                f"{heads} decoder heads (model.decoder_num_heads={s.decoder_num_heads}; 0 takes "
                "model.num_heads)"
            )

    def model_config(self) -> ViTMAEConfig:
        m, s = self.cfg.model, self.settings
        return ViTMAEConfig(
            **self.vit_kwargs(),
            decoder_hidden_size=s.decoder_hidden_size,
            decoder_num_hidden_layers=s.decoder_num_layers,
            decoder_num_attention_heads=s.decoder_num_heads or m.num_heads,
            decoder_intermediate_size=4 * s.decoder_hidden_size,
            mask_ratio=s.mask_ratio,
            norm_pix_loss=True,
        )

    def build_model(self) -> PreTrainedModel:
        return init_sincos_position_embeddings(ViTMAEForPreTraining(self.model_config()))

    def make_batch(self, samples: list[dict[str, Any]], gen: torch.Generator) -> dict[str, Any]:
        pixels = images_to_tensor([s["image"] for s in samples], self.cfg.data.image_size)
        # The model draws its patch mask from `noise`; passing it makes masking a function of gen.
        noise = torch.rand((pixels.shape[0], self.num_patches()), generator=gen)
        return {"pixel_values": pixels, "noise": noise}

    def visible(self) -> int:
        return int(self.num_patches() * (1 - self.settings.mask_ratio))  # as ViTMAE rounds

    def tokens(self, batch: dict[str, Any]) -> int:
        return int(batch["pixel_values"].shape[0]) * self.visible()

    def sample_flops(self) -> float:
        """The patch projection on every patch, the encoder on the visible patches and [CLS],
        the decoder on every patch and [CLS] (embedding in, pixels out)."""
        m, s = self.cfg.model, self.settings
        h, hd, pix = m.hidden_size, s.decoder_hidden_size, 3 * s.patch_size**2
        n_all, n_vis = self.num_patches() + 1, self.visible() + 1
        encoder = sequence_flops(m.num_layers * encoder_layer_params(h, m.intermediate_size),
                                 m.num_layers, m.num_heads, h // m.num_heads, n_vis)  # fmt: skip
        decoder = sequence_flops(
            s.decoder_num_layers * encoder_layer_params(hd, 4 * hd),
            s.decoder_num_layers,
            m.num_heads,
            hd // m.num_heads,
            n_all,
        )
        linear = 6.0 * (pix * h * self.num_patches() + h * hd * n_vis + hd * pix * n_all)
        return encoder + decoder + linear

    def flops_inputs(self) -> dict[str, Any]:
        m, s = self.cfg.model, self.settings
        return {
            "encoder_layers": m.num_layers, "decoder_layers": s.decoder_num_layers,
            "heads": m.num_heads, "hidden": m.hidden_size, "decoder_hidden": s.decoder_hidden_size,
            "patches": self.num_patches(), "visible_patches": self.visible(),
            "flops_per_sample": self.sample_flops(),
        }  # fmt: skip


def init_sincos_position_embeddings(model: Any) -> Any:
    """Give a freshly built ViT-MAE its fixed 2-D sin-cos position embeddings and its cls token.

    transformers 5.x leaves them at zero when the model is built from a config: the embeddings'
    `initialize_weights()` is skipped (the patch projection is already flagged as initialized)
    and `_init_weights()` zeroes the decoder's. They are frozen, so training never repairs them
    and the model would have no notion of where a patch is. Under ZeRO-3 the model is built
    partitioned: the tensors written here are gathered for the write (trainer.engine.gathered).
    """
    from darkmatter.trainer.engine import gathered

    emb = model.vit.embeddings
    emb.patch_embeddings.projection.__dict__.pop("_is_hf_initialized", None)
    with gathered(emb.parameters()):  # the position embeddings, [CLS] and the patch projection
        emb.initialize_weights()
    with gathered(model.decoder.parameters(recurse=False)):  # its position embeddings, mask token
        model.decoder.initialize_weights(emb.patch_embeddings.num_patches)
    return model
