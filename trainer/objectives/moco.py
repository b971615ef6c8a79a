"""MoCo v3 (Chen, Xie & He 2021): the online ViT, projector and predictor turn one view into
queries; the momentum teacher (an EMA of the encoder and projector, trainer.objectives.momentum)
turns the other view into keys. InfoNCE with the keys of every rank as negatives, symmetrized
over the two views (trainer.objectives.contrastive.info_nce). Heads as the paper's ViT setup: a
3-layer projector and a 2-layer predictor, BatchNorm everywhere, affine-free at the outputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel, ViTConfig

from darkmatter.trainer.objectives.contrastive import info_nce
from darkmatter.trainer.objectives.momentum import (
    MomentumModel,
    MomentumObjective,
    MomentumSettings,
    mlp,
)


class MoCoModel(MomentumModel):
    @staticmethod
    def make_projector(config: ViTConfig) -> nn.Module:
        hh = config.head_hidden_size
        return mlp(
            [config.hidden_size, hh, hh, config.projection_dim], last_bn=True, last_affine=False
        )

    @staticmethod
    def make_predictor(config: ViTConfig) -> nn.Module:
        return mlp([config.projection_dim, config.head_hidden_size, config.projection_dim],
                   last_bn=True, last_affine=False)  # fmt: skip

    def loss(
        self, q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor
    ) -> torch.Tensor:
        t = self.config.temperature
        return info_nce(q1, k2, t) + info_nce(q2, k1, t)


@dataclass
class MoCoSettings(MomentumSettings):
    """MoCo v3's settings: the momentum objectives' and the InfoNCE temperature."""

    temperature: float = 0.2
    """Softmax temperature of InfoNCE (MoCo v3: 0.2 for ViT)."""


class MoCoObjective(MomentumObjective):
    name = "moco"
    settings_class = MoCoSettings
    settings: MoCoSettings

    def model_config(self) -> ViTConfig:
        cfg = super().model_config()
        cfg.temperature = self.settings.temperature
        return cfg

    def build_model(self) -> PreTrainedModel:
        return MoCoModel(self.model_config())

    def head_weights(self) -> tuple[int, int]:
        s = self.settings
        h, hh, p = self.cfg.model.hidden_size, s.head_hidden_size, s.projection_dim
        return h * hh + hh * hh + hh * p, p * hh + hh * p
