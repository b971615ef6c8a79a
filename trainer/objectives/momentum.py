"""What the objectives with a momentum (EMA) teacher share (byol, moco): the model with its online
network and its teacher, and the momentum schedule.

The teacher is a copy of the online encoder and projector inside the same module, under
`teacher.`, whose weights are persistent buffers (trainer.objectives.teacher): DeepSpeed saves
and loads it with the model, ZeRO-3 leaves it whole on every rank, bf16 does not reach it
(`prepare_engine` puts back in fp32 what zero.Init cast), and the optimizer never sees it. The
update runs after every applied optimizer step, from the online weights the step produced
(bf16 under bf16 training: DeepSpeed keeps the fp32 masters in its optimizer), on every rank
alike, so the teacher stays identical across ranks without a collective of its own.
"""

from __future__ import annotations

import math
from abc import ABCMeta, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import ViTConfig, ViTModel
from transformers.utils import ModelOutput

from darkmatter.trainer.config import Config, ConfigError
from darkmatter.trainer.objectives.base import ViTSettings
from darkmatter.trainer.objectives.contrastive import (
    GlobalBatchNorm1d,
    TwoViewModel,
    TwoViewObjective,
)
from darkmatter.trainer.objectives.teacher import ema_update, frozen_copy, keep_fp32


def mlp(sizes: list[int], last_bn: bool, last_affine: bool = True) -> nn.Sequential:
    """Linear-BN-ReLU blocks, then a last Linear (and BN, without affine terms for MoCo v3); BN
    over the global batch, every rank's (MoCo v3's SyncBN)."""
    layers: list[nn.Module] = []
    for d_in, d_out in zip(sizes[:-2], sizes[1:-1], strict=True):
        layers += [nn.Linear(d_in, d_out, bias=False), GlobalBatchNorm1d(d_out), nn.ReLU()]
    layers.append(nn.Linear(sizes[-2], sizes[-1], bias=not last_bn))
    if last_bn:
        layers.append(GlobalBatchNorm1d(sizes[-1], affine=last_affine))
    return nn.Sequential(*layers)


def momentum_at(step: int, total: int, base: float) -> float:
    """BYOL's schedule (Grill et al. 2020, 3.2), which MoCo v3 also uses: the momentum rises
    from `base` at step 0 to 1 at step `total` on a half cosine."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * step / total) + 1.0) / 2.0


@dataclass
class TeacherOutput(ModelOutput):  # type: ignore[misc]
    loss: torch.Tensor | None = None
    predictions: torch.Tensor | None = None  # online predictions of both views, [2B, d]
    targets: torch.Tensor | None = None  # teacher projections of both views, [2B, d]


class MomentumModel(TwoViewModel, metaclass=ABCMeta):
    """A ViT encoder with a projector and a predictor (online), and a teacher: an EMA copy of
    the encoder and projector under `teacher.`. The encoder the harness takes is `vit.`."""

    def __init__(self, config: ViTConfig):
        super().__init__(config)
        self.projector = self.make_projector(config)
        self.predictor = self.make_predictor(config)
        self.teacher = nn.ModuleDict(
            {
                "vit": ViTModel(config, add_pooling_layer=False),
                "projector": self.make_projector(config),
            }
        )
        self.post_init()
        frozen_copy(self.vit, self.teacher["vit"])
        frozen_copy(self.projector, self.teacher["projector"])

    @staticmethod
    @abstractmethod
    def make_projector(config: ViTConfig) -> nn.Module:
        """The projection MLP (online and teacher)."""

    @staticmethod
    @abstractmethod
    def make_predictor(config: ViTConfig) -> nn.Module:
        """The prediction MLP (online only)."""

    @abstractmethod
    def loss(
        self, q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor
    ) -> torch.Tensor:
        """The symmetric loss of the online predictions q and the teacher's projections k (fp32)."""

    def pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(teacher, online) modules whose weights match name by name."""
        return [(self.teacher["vit"], self.vit), (self.teacher["projector"], self.projector)]

    def forward(self, pixel_values: torch.Tensor, view_params: torch.Tensor) -> TeacherOutput:
        views = self.views(pixel_values, view_params)
        q = self.predictor(self.projector(self.pooled(self.vit, views))).float()
        with torch.no_grad():  # the teacher runs in its own precision, fp32
            k = self.teacher["projector"](self.pooled(self.teacher["vit"], views)).float()
        q1, q2 = q.chunk(2)
        k1, k2 = k.chunk(2)
        return TeacherOutput(loss=self.loss(q1, q2, k1, k2), predictions=q, targets=k)


@dataclass
class MomentumSettings(ViTSettings):
    """What the momentum objectives set: the ViT's patch_size, the heads, the teacher's momentum."""

    projection_dim: int = 128
    """Output width of the projection and prediction MLPs."""
    head_hidden_size: int = 512
    """Hidden width of the projection and prediction MLPs (the papers: 4096)."""
    momentum: float = 0.996
    """Momentum of the EMA teacher at step 0; it rises to 1 over train.steps on a cosine (BYOL:
    0.996; MoCo v3: 0.99)."""


class MomentumObjective(TwoViewObjective):
    """Two views, an online network and its EMA teacher."""

    settings_class = MomentumSettings
    settings: MomentumSettings
    momentum_teacher = True  # its module holds an fp32 EMA teacher under `teacher.`

    @classmethod
    def validate(cls, cfg: Config) -> None:
        super().validate(cfg)
        s = cfg.objective_settings
        assert isinstance(s, MomentumSettings)
        if not 0.0 <= s.momentum < 1.0:
            raise ConfigError(f"model.momentum: expected in [0, 1), got {s.momentum}")

    def model_config(self) -> ViTConfig:
        s = self.settings
        cfg = ViTConfig(**self.vit_kwargs())
        cfg.projection_dim, cfg.head_hidden_size = s.projection_dim, s.head_hidden_size
        cfg.momentum = s.momentum
        return cfg

    def prepare_engine(self, engine: Any) -> None:
        super().prepare_engine(engine)
        keep_fp32(engine.module.teacher)  # after super() aligned the heads' statistics to bf16

    def after_step(self, engine: Any, step: int) -> None:
        m = momentum_at(step, self.cfg.train.steps, self.settings.momentum)
        ema_update(engine.module.pairs(), m)

    @abstractmethod
    def head_weights(self) -> tuple[int, int]:
        """(projector, predictor) multiply weights, for the FLOP count."""

    def sample_flops(self) -> float:
        """Per view: the online encoder, projector and predictor forward and backward, and the
        teacher's encoder and projector forward only (a third of forward + backward)."""
        projector, predictor = self.head_weights()
        online = self.encoder_flops() + 6.0 * (projector + predictor)
        teacher = (self.encoder_flops() + 6.0 * projector) / 3.0
        return 2 * (online + teacher)

    def flops_inputs(self) -> dict[str, Any]:
        m = self.cfg.model
        projector, predictor = self.head_weights()
        return {
            "layers": m.num_layers, "heads": m.num_heads, "hidden": m.hidden_size,
            "patches": self.num_patches(), "views": 2, "projector_weights": projector,
            "predictor_weights": predictor, "teacher": "forward only",
            "flops_per_sample": self.sample_flops(),
        }  # fmt: skip
