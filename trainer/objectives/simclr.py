"""SimCLR (Chen et al. 2020): two augmented views of every image, a ViT encoder and a projection
MLP whose batch norm takes the global batch's statistics ("global BN", section 3.2), and the
NT-Xent loss with the negatives of every rank (trainer.objectives.contrastive): N ranks compute
the loss one rank computes on their concatenated batches.

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
from transformers import PreTrainedModel, ViTConfig
from transformers.utils import ModelOutput

from darkmatter.trainer.objectives.base import ViTSettings
from darkmatter.trainer.objectives.contrastive import (
    GlobalBatchNorm1d,
    TwoViewModel,
    TwoViewObjective,
    nt_xent,
)


@dataclass
class ContrastiveOutput(ModelOutput):  # type: ignore[misc]
    loss: torch.Tensor | None = None
    embeddings: torch.Tensor | None = None  # the projections of both views, [2B, d]


class SimCLRModel(TwoViewModel):
    def __init__(self, config: ViTConfig):
        super().__init__(config)
        h, p = config.hidden_size, config.projection_dim
        # SimCLR's head: Linear-BN-ReLU-Linear-BN, BN over the global batch (every rank's).
        bn = GlobalBatchNorm1d
        self.projector = nn.Sequential(nn.Linear(h, h), bn(h), nn.ReLU(), nn.Linear(h, p), bn(p))
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, view_params: torch.Tensor) -> ContrastiveOutput:
        h = self.pooled(self.vit, self.views(pixel_values, view_params))
        z = self.projector(h).float()
        z1, z2 = z.chunk(2)
        return ContrastiveOutput(loss=nt_xent(z1, z2, self.config.temperature), embeddings=z)


@dataclass
class SimCLRSettings(ViTSettings):
    """SimCLR's settings: the ViT's patch_size, the projection head, the loss's temperature."""

    projection_dim: int = 128
    """Output width of the projection head."""
    temperature: float = 0.2
    """Softmax temperature of NT-Xent (SimCLR used 0.1-0.5; smaller batches prefer the higher
    end)."""


class SimCLRObjective(TwoViewObjective):
    name = "simclr"
    settings_class = SimCLRSettings
    settings: SimCLRSettings

    def model_config(self) -> ViTConfig:
        cfg = ViTConfig(**self.vit_kwargs())
        cfg.projection_dim = self.settings.projection_dim
        cfg.temperature = self.settings.temperature
        return cfg

    def build_model(self) -> PreTrainedModel:
        return SimCLRModel(self.model_config())

    def sample_flops(self) -> float:
        """Two views through the encoder and the projection MLP, forward and backward."""
        h = self.cfg.model.hidden_size
        return 2 * (self.encoder_flops() + 6.0 * (h * h + h * self.settings.projection_dim))

    def flops_inputs(self) -> dict[str, Any]:
        m = self.cfg.model
        return {
            "layers": m.num_layers, "heads": m.num_heads, "hidden": m.hidden_size,
            "patches": self.num_patches(), "views": 2,
            "projection_dim": self.settings.projection_dim,
            "flops_per_sample": self.sample_flops(),
        }  # fmt: skip
