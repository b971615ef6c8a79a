"""SimCLR (Chen et al. 2020): two augmented views of every image, a ViT encoder and a projection
MLP, and the NT-Xent loss with the negatives of every rank (trainer.objectives.contrastive).

The data workers decode; the batch carries the images once, in [0, 1], with the views' random
parameters drawn from the batch's generator. The model makes the views on its own device
(kornia), normalizes them, encodes both in one pass, projects, gathers across ranks and computes
the loss: DeepSpeed sees one forward that returns `.loss`. The encoder is a transformers ViTModel
under the `vit.` prefix, so evaluation and export take it as they take MAE's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, ViTConfig, ViTModel
from transformers.utils import ModelOutput

from data_pipeline.transforms import images_to_unit, normalize
from trainer.objectives.base import Objective
from trainer.objectives.contrastive import augment, draw_view_params, nt_xent
from trainer.perf import encoder_layer_params, sequence_flops


@dataclass
class ContrastiveOutput(ModelOutput):  # type: ignore[misc]
    loss: torch.Tensor | None = None
    embeddings: torch.Tensor | None = None  # the projections of both views, [2B, d]


class SimCLRModel(PreTrainedModel):  # type: ignore[misc]
    config_class = ViTConfig
    base_model_prefix = "vit"
    main_input_name = "pixel_values"
    # The attention kernels are the inner ViTModel's, which supports them all.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def __init__(self, config: ViTConfig):
        super().__init__(config)
        self.vit = ViTModel(config, add_pooling_layer=False)
        h, p = config.hidden_size, config.projection_dim
        # SimCLR's head: Linear-BN-ReLU-Linear-BN (BatchNorm over this rank's batch).
        self.projector = nn.Sequential(nn.Linear(h, h), nn.BatchNorm1d(h), nn.ReLU(),
                                       nn.Linear(h, p), nn.BatchNorm1d(p))  # fmt: skip
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, view_params: torch.Tensor) -> ContrastiveOutput:
        x = pixel_values.float()
        views = torch.cat([augment(x, view_params[:, 0].float()),
                           augment(x, view_params[:, 1].float())])  # fmt: skip
        dtype: torch.dtype = self.vit.embeddings.patch_embeddings.projection.weight.dtype
        # The mean of every token's final state, as the evaluation harness pools its features.
        h = self.vit(pixel_values=normalize(views).to(dtype)).last_hidden_state.mean(dim=1)
        z = self.projector(h).float()
        z1, z2 = z.chunk(2)
        return ContrastiveOutput(loss=nt_xent(z1, z2, self.config.temperature), embeddings=z)


class SimCLRObjective(Objective):
    name = "simclr"
    modality = "image"

    def model_config(self) -> ViTConfig:
        m = self.cfg.model
        cfg = ViTConfig(**self.vit_kwargs())
        cfg.projection_dim = m.projection_dim
        cfg.temperature = m.temperature
        return cfg

    def build_model(self) -> PreTrainedModel:
        return SimCLRModel(self.model_config())

    def make_batch(self, samples: list[dict[str, Any]], gen: torch.Generator) -> dict[str, Any]:
        d = self.cfg.data
        pixels = images_to_unit([s["image"] for s in samples], d.image_size)
        views = draw_view_params(len(samples), 2, d.image_size, gen, d.min_crop_scale, d.flip_prob)
        return {"pixel_values": pixels, "view_params": views}

    def tokens(self, batch: dict[str, Any]) -> int:
        """Patches the encoder sees: both views of every image, [CLS] included."""
        return 2 * int(batch["pixel_values"].shape[0]) * (self.num_patches() + 1)

    def sample_flops(self) -> float:
        """Two views through the patch projection, the encoder and the projection MLP."""
        m = self.cfg.model
        h, pix, n = m.hidden_size, 3 * m.patch_size**2, self.num_patches()
        encoder = sequence_flops(m.num_layers * encoder_layer_params(h, m.intermediate_size),
                                 m.num_layers, m.num_heads, h // m.num_heads, n + 1)  # fmt: skip
        linear = 6.0 * (pix * h * n + h * h + h * m.projection_dim)
        return 2 * (encoder + linear)

    def flops(self, batch: dict[str, Any]) -> float:
        return int(batch["pixel_values"].shape[0]) * self.sample_flops()

    def flops_inputs(self) -> dict[str, Any]:
        m = self.cfg.model
        return {
            "layers": m.num_layers, "heads": m.num_heads, "hidden": m.hidden_size,
            "patches": self.num_patches(), "views": 2, "projection_dim": m.projection_dim,
            "flops_per_sample": self.sample_flops(),
        }  # fmt: skip
