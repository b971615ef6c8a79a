"""BYOL (Grill et al. 2020): an online ViT, projector and predictor learn to predict, from one
view, the teacher's projection of the other view; the teacher is an EMA of the online encoder
and projector (trainer.objectives.momentum). No negatives: the predictor and the slowly moving
teacher are what keep the representation from collapsing. Loss per pair: 2 - 2·cos(q, k),
symmetrized over the two views."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, ViTConfig

from darkmatter.trainer.objectives.momentum import (
    MomentumModel,
    MomentumObjective,
    MomentumSettings,
    mlp,
)


def regression_loss(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """BYOL's eq. 2, the mean over the batch of ‖q/‖q‖ - k/‖k‖‖² = 2 - 2·cos(q, k)."""
    return (2.0 - 2.0 * F.cosine_similarity(q, k, dim=-1)).mean()


class BYOLModel(MomentumModel):
    @staticmethod
    def make_projector(config: ViTConfig) -> nn.Module:
        return mlp(
            [config.hidden_size, config.head_hidden_size, config.projection_dim], last_bn=False
        )

    @staticmethod
    def make_predictor(config: ViTConfig) -> nn.Module:
        return mlp(
            [config.projection_dim, config.head_hidden_size, config.projection_dim], last_bn=False
        )

    def loss(
        self, q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor
    ) -> torch.Tensor:
        return regression_loss(q1, k2) + regression_loss(q2, k1)


@dataclass
class BYOLSettings(MomentumSettings):
    """BYOL's settings: the momentum objectives' (patch_size, projection_dim, head_hidden_size,
    momentum); its loss has no temperature."""


class BYOLObjective(MomentumObjective):
    name = "byol"
    settings_class = BYOLSettings
    settings: BYOLSettings

    def build_model(self) -> PreTrainedModel:
        return BYOLModel(self.model_config())

    def head_weights(self) -> tuple[int, int]:
        s = self.settings
        h, hh, p = self.cfg.model.hidden_size, s.head_hidden_size, s.projection_dim
        return h * hh + hh * p, p * hh + hh * p
