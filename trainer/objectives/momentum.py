"""What the objectives with a momentum (EMA) teacher share (byol, moco): the model with its online
network and its teacher, the EMA update and its momentum schedule.

The teacher is a frozen copy of the online encoder and projector inside the same module, so
DeepSpeed saves and loads it with the model and a resumed run continues the same teacher. Two
things DeepSpeed would get wrong are handled here:

- precision: under bf16 DeepSpeed casts the whole module, teacher included, to bf16, where an EMA
  step of (1 - m)·(online - teacher) ≈ 1e-6 is below half a bf16 ulp of a typical weight and
  rounds away: the teacher would stop moving. `prepare_engine` puts the teacher back in fp32;
  it is updated and run in fp32 (its forward is a third of the online network's work).
- partitioning: under ZeRO-3 each rank would hold a shard of the teacher and DeepSpeed would
  gather it for every forward; updating shards in place needs DeepSpeed's partition layout and
  an fp32 copy of it, which is not done here. The config check refuses ZeRO-3 with a line naming
  the combination (MomentumObjective.validate).

The update runs after every applied optimizer step, from the online weights the step produced
(bf16 under bf16 training: DeepSpeed keeps the fp32 masters partitioned in its optimizer), on
every rank alike, so the teacher stays identical across ranks without a collective.
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
from darkmatter.trainer.objectives.contrastive import TwoViewModel, TwoViewObjective


def mlp(sizes: list[int], last_bn: bool, last_affine: bool = True) -> nn.Sequential:
    """Linear-BN-ReLU blocks, then a last Linear (and BN, without affine terms for MoCo v3)."""
    layers: list[nn.Module] = []
    for d_in, d_out in zip(sizes[:-2], sizes[1:-1], strict=True):
        layers += [nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out), nn.ReLU()]
    layers.append(nn.Linear(sizes[-2], sizes[-1], bias=not last_bn))
    if last_bn:
        layers.append(nn.BatchNorm1d(sizes[-1], affine=last_affine))
    return nn.Sequential(*layers)


def momentum_at(step: int, total: int, base: float) -> float:
    """BYOL's schedule (Grill et al. 2020, 3.2), which MoCo v3 also uses: the momentum rises
    from `base` at step 0 to 1 at step `total` on a half cosine."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * step / total) + 1.0) / 2.0


@torch.no_grad()
def ema_update(teacher: list[torch.Tensor], online: list[torch.Tensor], m: float) -> None:
    """teacher ← m·teacher + (1 - m)·online, in the teacher's precision."""
    src = [o.detach().to(t.dtype) for t, o in zip(teacher, online, strict=True)]
    torch._foreach_mul_(teacher, m)
    torch._foreach_add_(teacher, src, alpha=1.0 - m)


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
        self.teacher["vit"].load_state_dict(self.vit.state_dict())
        self.teacher["projector"].load_state_dict(self.projector.state_dict())
        self.teacher.requires_grad_(False)

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

    def pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(teacher, online) parameters in matching order."""
        online: list[torch.Tensor] = [*self.vit.parameters(), *self.projector.parameters()]
        return list(self.teacher.parameters()), online

    def forward(self, pixel_values: torch.Tensor, view_params: torch.Tensor) -> TeacherOutput:
        views = self.views(pixel_values, view_params)
        q = self.predictor(self.projector(self.pooled(self.vit, views))).float()
        with torch.no_grad():  # the teacher runs in its own precision, fp32 (see above)
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
    momentum_teacher = True  # validate() refuses ZeRO-3 for these

    @classmethod
    def validate(cls, cfg: Config) -> None:
        super().validate(cfg)
        s = cfg.objective_settings
        assert isinstance(s, MomentumSettings)
        if cfg.train.zero_stage == 3:
            raise ConfigError(
                f"train.zero_stage: objective {cls.name} keeps an EMA teacher, which ZeRO-3 "
                "would partition (not supported): use zero_stage 1 or 2"
            )
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
        engine.module.teacher.float()  # DeepSpeed cast it to bf16 with the rest; see above

    def after_step(self, engine: Any, step: int) -> None:
        m = momentum_at(step, self.cfg.train.steps, self.settings.momentum)
        teacher, online = engine.module.pairs()
        ema_update(teacher, online, m)

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
