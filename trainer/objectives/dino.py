"""DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers"):
self-distillation without labels, with multi-crop, and optionally iBOT's masked-patch loss
(Zhou et al. 2022) as DINOv2 (Oquab et al. 2023) adds it.

- Crops: 2 global crops at data.image_size (area model.global_crop_scale-1) and
  model.local_crops local crops of model.local_crop_size pixels (area
  model.local_crop_min_scale-model.global_crop_scale), with the two-view objectives' colour
  recipe (trainer.objectives.contrastive; DINO's blur and solarization are not part of it).
  Every random number comes from the batch's generator, so a resumed run draws the same crops.
- Student: a ViT (ViTModel; local crops with interpolated position embeddings) and a DINO head
  on its [CLS] state: a 3-layer GELU MLP to a bottleneck, l2-normalized, then a weight-normalized
  linear layer (its norms fixed at 1, DINO's norm_last_layer) to model.num_prototypes logits.
- Teacher: an EMA of the student's ViT and head (trainer.objectives.teacher: fp32 buffers under
  `teacher.`; momentum model.momentum -> 1 on BYOL's cosine), on the global crops only.
- Loss: for each global crop i and each crop j != i, the cross-entropy between the teacher's
  softmax((t_i - center) / teacher_temp) and the student's softmax(s_j / student_temp), averaged
  over the pairs and the batch (DINO's eq. 3). teacher_temp rises linearly from 0.04 to
  model.teacher_temp over model.teacher_temp_warmup_steps (DINO's warmup), a buffer set after
  every step. The center is an EMA (model.center_momentum) of the teacher logits' mean over the
  whole global batch (all-reduced, so every rank keeps the same center), updated after every
  optimizer step; a buffer, so it is checkpointed.
- iBOT (model.ibot): a random share of the student's global-crop patches is replaced by the mask
  token (ViTModel's bool_masked_pos); the teacher sees them unmasked; a separate patch head (its
  own center) gives per-patch logits and the same cross-entropy is taken on masked patches,
  weighted 1 / (masked patches of the image) and divided by the number of images (DINOv2's
  iBOT loss). Loss = dino + ibot.

The encoder that evaluation and export take is the teacher's ViT (`teacher.vit.`), as DINO
evaluates the teacher; its features are the [CLS] state after the final layer norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, ViTConfig, ViTModel
from transformers.utils import ModelOutput

from darkmatter.data_pipeline.transforms import images_to_unit, normalize
from darkmatter.trainer.config import Config, ConfigError
from darkmatter.trainer.objectives.base import ViTObjective, ViTSettings
from darkmatter.trainer.objectives.contrastive import (
    ViTHostModel,
    augment,
    draw_view_params,
    import_kornia,
)
from darkmatter.trainer.objectives.momentum import momentum_at
from darkmatter.trainer.objectives.teacher import ema_update, frozen_copy, keep_fp32, module_dtype
from darkmatter.trainer.perf import encoder_layer_params, sequence_flops

WARMUP_TEACHER_TEMP = 0.04  # DINO's teacher temperature at step 0 (warmup_teacher_temp)


def teacher_temp_at(step: int, warmup_steps: int, final: float) -> float:
    """DINO's schedule: linear from 0.04 at step 0 to `final` at `warmup_steps`, then constant."""
    if step >= warmup_steps:
        return final
    return WARMUP_TEACHER_TEMP + (final - WARMUP_TEACHER_TEMP) * step / warmup_steps


def dino_loss(
    student: list[torch.Tensor], teacher: list[torch.Tensor], center: torch.Tensor,
    teacher_temp: torch.Tensor | float, student_temp: float,
) -> torch.Tensor:  # fmt: skip
    """DINO's eq. 3: the mean over (teacher crop i, student crop j != i) of the batch mean of
    H(softmax((t_i - c) / τ_t), softmax(s_j / τ_s)). student: logits of every crop, the global
    ones first, each [B, K]; teacher: logits of the global crops, [B, K]; center [1, K]."""
    targets = [F.softmax((t - center) / teacher_temp, dim=-1) for t in teacher]
    logp = [F.log_softmax(s / student_temp, dim=-1) for s in student]
    terms = [-(q * lp).sum(-1).mean() for i, q in enumerate(targets)
             for j, lp in enumerate(logp) if j != i]  # fmt: skip
    return torch.stack(terms).mean()


def ibot_loss(
    student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor, n_images: int,
    center: torch.Tensor, teacher_temp: torch.Tensor | float, student_temp: float,
) -> torch.Tensor:  # fmt: skip
    """DINOv2's iBOT loss over the M masked patches: student and teacher patch logits [M, K],
    each patch weighted 1 / (masked patches of its image), summed, over the number of images."""
    q = F.softmax((teacher - center) / teacher_temp, dim=-1)
    ce = -(q * F.log_softmax(student / student_temp, dim=-1)).sum(-1)  # [M]
    return (ce * weights).sum() / n_images


def draw_masks(
    n_images: int, n_patches: int, gen: torch.Generator, probability: float,
    min_ratio: float, max_ratio: float,
) -> torch.Tensor:  # fmt: skip
    """[n_images, n_patches] bool: each image, with `probability`, has round(r · n_patches)
    random patches masked, r uniform in [min_ratio, max_ratio] (DINOv2's share); else none."""
    u = torch.rand((n_images, 2), generator=gen)
    noise = torch.rand((n_images, n_patches), generator=gen)
    ratio = min_ratio + (max_ratio - min_ratio) * u[:, 1]
    count = torch.where(u[:, 0] < probability, (ratio * n_patches).round(), 0.0)
    rank = noise.argsort(dim=1).argsort(dim=1)  # each patch's place in a random order
    return rank < count[:, None]


class NormalizedLinear(nn.Module):
    """DINO's last layer: a weight-normalized linear layer without bias, w = g · v / ‖v‖ row by
    row, with the norms g fixed at 1 (norm_last_layer=True) or learned from 1. A module of its
    own so that ZeRO-3 gathers its weights when it runs."""

    def __init__(self, d_in: int, d_out: int, learned_norm: bool):
        super().__init__()
        self.weight = nn.Parameter(nn.init.trunc_normal_(torch.empty(d_out, d_in), std=0.02))
        self.norm = nn.Parameter(torch.ones(d_out, 1)) if learned_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.normalize(self.weight, dim=-1)
        return F.linear(x, w if self.norm is None else w * self.norm)


class DINOHead(nn.Module):
    """DINO's projection head: Linear-GELU-Linear-GELU-Linear to the bottleneck (batch norm after
    the hidden layers with model.head_batch_norm, DINO's use_bn_in_head), l2-normalized,
    then NormalizedLinear to the prototypes' logits (cosines in [-1, 1] when its norms are fixed)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        h, hh, b = config.hidden_size, config.head_hidden_size, config.bottleneck_dim
        layers: list[nn.Module] = []
        for d_in in (h, hh):
            bn = [nn.BatchNorm1d(hh)] if config.head_batch_norm else []
            layers += [nn.Linear(d_in, hh), *bn, nn.GELU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(hh, b))
        self.last_layer = NormalizedLinear(b, config.num_prototypes, not config.norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))

    @staticmethod
    def weights(config: ViTConfig) -> int:
        """Multiply weights per token, for the FLOP count."""
        h, hh, b = config.hidden_size, config.head_hidden_size, config.bottleneck_dim
        return h * hh + hh * hh + hh * b + b * config.num_prototypes


@dataclass
class DINOOutput(ModelOutput):  # type: ignore[misc]
    loss: torch.Tensor | None = None
    dino_loss: torch.Tensor | None = None
    ibot_loss: torch.Tensor | None = None
    student: torch.Tensor | None = None  # logits of every crop, global crops first, [(2+N)·B, K]
    teacher: torch.Tensor | None = None  # teacher logits of the 2 global crops, [2B, K]


class DINOModel(ViTHostModel):
    """The student (`vit.`, `head.`, with iBOT `patch_head.`), its EMA teacher (`teacher.` +
    the same names) and the loss's state: `center` (and `patch_center`) and `teacher_temp`."""

    # Set from branch() and register_buffer in __init__; declared for the type checker.
    vit: ViTModel
    head: DINOHead
    patch_head: DINOHead
    center: torch.Tensor
    patch_center: torch.Tensor
    teacher_temp: torch.Tensor

    def __init__(self, config: ViTConfig):
        super().__init__(config)
        for name, module in self.branch(config).items():
            setattr(self, name, module)
        self.teacher = nn.ModuleDict(self.branch(config))
        k = config.num_prototypes
        self.centers = ("center", "patch_center") if config.ibot else ("center",)
        for name in self.centers:
            self.register_buffer(name, torch.zeros(1, k))
            # Teacher logits summed (and counted) over the micro-batches of the current step,
            # for the center's update after it; never saved (a step is never checkpointed half).
            self.register_buffer(f"{name}_sum", torch.zeros(k), persistent=False)
            self.register_buffer(f"{name}_count", torch.zeros(()), persistent=False)
        self.register_buffer("teacher_temp", torch.tensor(WARMUP_TEACHER_TEMP))
        self.post_init()
        for teacher, online in self.pairs():
            frozen_copy(online, teacher)

    @staticmethod
    def branch(config: ViTConfig) -> dict[str, nn.Module]:
        """The modules the student trains and the teacher copies, by name."""
        modules: dict[str, nn.Module] = {
            "vit": ViTModel(config, add_pooling_layer=False, use_mask_token=config.ibot),
            "head": DINOHead(config),
        }
        if config.ibot:
            modules["patch_head"] = DINOHead(config)
        return modules

    def pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(teacher, student) modules whose weights match name by name."""
        return [(self.teacher[name], getattr(self, name)) for name in self.teacher]

    def crops(
        self, pixel_values: torch.Tensor, global_params: torch.Tensor, local_params: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(global crops [2B, 3, S, S], local crops [N·B, 3, s, s]), normalized float32, crop by
        crop (all images' first crop, then their second, ...)."""
        x, size = pixel_values.float(), self.config.local_crop_size
        glob = [augment(x, global_params[:, i].float()) for i in range(2)]
        local = [augment(x, local_params[:, i].float(), size) for i in range(local_params.shape[1])]
        empty = x.new_zeros((0, 3, size, size))
        return normalize(torch.cat(glob)), normalize(torch.cat(local)) if local else empty

    def student_states(
        self, glob: torch.Tensor, local: torch.Tensor, masks: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """([CLS] of every crop [(2+N)·B, D], patch states of the global crops [2B, P, D])."""
        dtype = module_dtype(self.vit)
        hidden = self.vit(pixel_values=glob.to(dtype), bool_masked_pos=masks).last_hidden_state
        cls = [hidden[:, 0]]
        if local.shape[0]:
            out = self.vit(pixel_values=local.to(dtype), interpolate_pos_encoding=True)
            cls.append(out.last_hidden_state[:, 0])
        return torch.cat(cls), hidden[:, 1:]

    def forward(
        self, pixel_values: torch.Tensor, global_params: torch.Tensor,
        local_params: torch.Tensor, masks: torch.Tensor | None = None,
    ) -> DINOOutput:  # fmt: skip
        glob, local = self.crops(pixel_values, global_params, local_params)
        cls, patches = self.student_states(glob, local, masks)
        s = self.head(cls).float()  # [(2+N)·B, K]
        with torch.no_grad():  # the teacher runs in its own precision, fp32
            t_hidden = self.teacher["vit"](pixel_values=glob).last_hidden_state  # [2B, 1+P, D]
            t = self.teacher["head"](t_hidden[:, 0]).float()  # [2B, K]
        temp_s = self.config.student_temp
        loss = dino_loss(list(s.chunk(2 * s.shape[0] // t.shape[0])), list(t.chunk(2)),
                         self.center, self.teacher_temp, temp_s)  # fmt: skip
        self.accumulate("center", t)
        out = DINOOutput(loss=loss, dino_loss=loss.detach(), student=s, teacher=t)
        if masks is not None:
            out.ibot_loss = self.masked_patch_loss(patches, t_hidden[:, 1:], masks)
            out.loss = loss + out.ibot_loss
            out.ibot_loss = out.ibot_loss.detach()
        return out

    def masked_patch_loss(
        self, student: torch.Tensor, teacher: torch.Tensor, masks: torch.Tensor
    ) -> torch.Tensor:
        """iBOT's loss on the masked patches; student, teacher: patch states [2B, P, D]."""
        s = self.patch_head(student[masks]).float()  # [M, K]
        with torch.no_grad():
            t = self.teacher["patch_head"](teacher[masks]).float()
        per_image = masks.sum(dim=1, keepdim=True).clamp(min=1).float()  # [2B, 1]
        weights = (1.0 / per_image).expand_as(masks)[masks]  # [M]
        self.accumulate("patch_center", t)
        return ibot_loss(s, t, weights, masks.shape[0], self.patch_center, self.teacher_temp,
                         self.config.student_temp)  # fmt: skip

    @torch.no_grad()
    def accumulate(self, center: str, logits: torch.Tensor) -> None:
        """Add teacher logits [n, K] to the step's sums for `center` (training only)."""
        if self.training:
            self.get_buffer(f"{center}_sum").add_(logits.sum(0))
            self.get_buffer(f"{center}_count").add_(logits.shape[0])

    @torch.no_grad()
    def update_centers(self, momentum: float) -> None:
        """center ← m·center + (1 − m)·(mean teacher logits of this step over every rank), then
        the sums restart. A center whose step saw no logits (iBOT without masks) stays."""
        for name in self.centers:
            total, count = self.get_buffer(f"{name}_sum"), self.get_buffer(f"{name}_count")
            both = torch.cat([total, count[None]])
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(both)
            center = self.get_buffer(name)
            mean = both[:-1] / both[-1].clamp(min=1)
            center.copy_(torch.where(both[-1] > 0, momentum * center + (1 - momentum) * mean,
                                     center))  # fmt: skip
            total.zero_()
            count.zero_()


@dataclass
class DINOSettings(ViTSettings):
    """DINO's settings: the ViT's patch_size, the head, the crops, the temperatures and the
    teacher's momentum (data.min_crop_scale is not read: model.global_crop_scale replaces it)."""

    num_prototypes: int = 1024
    """Output width of the DINO head, K (DINO: 65536)."""
    head_hidden_size: int = 512
    """Hidden width of the head's MLP (DINO: 2048)."""
    bottleneck_dim: int = 64
    """Width of the l2-normalized bottleneck before the prototypes (DINO: 256)."""
    head_batch_norm: bool = False
    """Batch norm after the head's hidden layers (DINO's use_bn_in_head, off by default there)."""
    norm_last_layer: bool = True
    """Fix the norms of the last layer's weight-normalized rows at 1 (DINO's default); false
    learns them, which DINO's README advises for ViTs and which lets the logits leave [-1, 1]."""
    local_crops: int = 6
    """Local crops per image, besides the 2 global ones (DINO: 6-10; 0 disables multi-crop)."""
    local_crop_size: int = 8
    """Side of a local crop in pixels, a multiple of model.patch_size (DINO: 96 of 224)."""
    global_crop_scale: float = 0.4
    """Smallest share of the image's area a global crop keeps, and largest of a local crop
    (DINO: 0.4; small images such as digits want more)."""
    local_crop_min_scale: float = 0.05
    """Smallest share of the image's area a local crop keeps (DINO: 0.05)."""
    student_temp: float = 0.1
    """Temperature of the student's softmax (DINO: 0.1)."""
    teacher_temp: float = 0.07
    """Temperature of the teacher's softmax after the warmup from 0.04 (DINO: 0.04-0.07)."""
    teacher_temp_warmup_steps: int = 0
    """Steps over which the teacher temperature rises linearly from 0.04 (DINO: 30 epochs)."""
    center_momentum: float = 0.9
    """Momentum of the center's EMA, per step (DINO: 0.9)."""
    momentum: float = 0.996
    """Momentum of the EMA teacher at step 0, rising to 1 over train.steps on a cosine (DINO:
    0.996 for runs of ~10^5 steps; short runs want ~0.99)."""
    ibot: bool = False
    """Add iBOT's masked-patch loss (DINOv2): masked global crops for the student, a patch head."""
    mask_probability: float = 0.5
    """iBOT: share of global crops that get masked patches (DINOv2: 0.5)."""
    mask_min_ratio: float = 0.1
    """iBOT: smallest share of a masked crop's patches that are masked (DINOv2: 0.1)."""
    mask_max_ratio: float = 0.5
    """iBOT: largest share of a masked crop's patches that are masked (DINOv2: 0.5)."""


def _check(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"model.{key}: expected {expected}, got {value}")


class DINOObjective(ViTObjective):
    name = "dino"
    modality = "image"
    settings_class = DINOSettings
    settings: DINOSettings
    momentum_teacher = True  # its module holds an fp32 EMA teacher under `teacher.`

    def __init__(self, cfg: Config, dataset_meta: dict[str, Any]):
        super().__init__(cfg, dataset_meta)
        import_kornia()

    @classmethod
    def validate(cls, cfg: Config) -> None:
        super().validate(cfg)
        s = cfg.objective_settings
        assert isinstance(s, DINOSettings)
        for key in ("num_prototypes", "head_hidden_size", "bottleneck_dim", "local_crop_size"):
            _check(getattr(s, key) >= 1, key, ">= 1", getattr(s, key))
        _check(s.local_crops >= 0, "local_crops", ">= 0", s.local_crops)
        if s.local_crop_size % s.patch_size:
            raise ConfigError(f"model.local_crop_size: {s.local_crop_size} is not divisible by "
                              f"model.patch_size={s.patch_size}")  # fmt: skip
        _check(0.0 < s.global_crop_scale <= 1.0, "global_crop_scale", "in (0, 1]",
               s.global_crop_scale)  # fmt: skip
        _check(0.0 < s.local_crop_min_scale <= s.global_crop_scale, "local_crop_min_scale",
               "in (0, model.global_crop_scale]", s.local_crop_min_scale)  # fmt: skip
        for key in ("student_temp", "teacher_temp"):
            _check(getattr(s, key) > 0, key, "> 0", getattr(s, key))
        _check(s.teacher_temp_warmup_steps >= 0, "teacher_temp_warmup_steps", ">= 0",
               s.teacher_temp_warmup_steps)  # fmt: skip
        for key in ("momentum", "center_momentum"):
            _check(0.0 <= getattr(s, key) < 1.0, key, "in [0, 1)", getattr(s, key))
        _check(0.0 <= s.mask_probability <= 1.0, "mask_probability", "in [0, 1]",
               s.mask_probability)  # fmt: skip
        _check(0.0 <= s.mask_min_ratio <= s.mask_max_ratio < 1.0, "mask_max_ratio",
               "model.mask_min_ratio <= it < 1 (both >= 0)", s.mask_max_ratio)  # fmt: skip

    def model_config(self) -> ViTConfig:
        s = self.settings
        cfg = ViTConfig(**self.vit_kwargs())
        for key in ("num_prototypes", "head_hidden_size", "bottleneck_dim", "local_crop_size",
                    "student_temp", "ibot", "norm_last_layer", "head_batch_norm"):  # fmt: skip
            setattr(cfg, key, getattr(s, key))
        # The harness's features (evaluation/probe.py: FEATURE_POOLING): DINO trains [CLS] alone.
        setattr(cfg, "feature_pooling", "cls")  # noqa: B010
        return cfg

    def build_model(self) -> PreTrainedModel:
        return DINOModel(self.model_config())

    def make_batch(self, samples: list[dict[str, Any]], gen: torch.Generator) -> dict[str, Any]:
        d, s, n = self.cfg.data, self.settings, len(samples)
        pixels = images_to_unit([x["image"] for x in samples], d.image_size)
        batch = {
            "pixel_values": pixels,
            "global_params": draw_view_params(n, 2, d.image_size, gen, s.global_crop_scale,
                                              d.flip_prob),
            "local_params": draw_view_params(n, s.local_crops, d.image_size, gen,
                                             s.local_crop_min_scale, d.flip_prob,
                                             max_scale=s.global_crop_scale),
        }  # fmt: skip
        if s.ibot:  # one row per global crop: all images' first crop, then their second
            batch["masks"] = draw_masks(2 * n, self.num_patches(), gen, s.mask_probability,
                                        s.mask_min_ratio, s.mask_max_ratio)  # fmt: skip
        return batch

    def prepare_engine(self, engine: Any) -> None:
        """The teacher and the loss's state (centers, temperature) back in fp32, which zero.Init
        casts to bf16 at construction under ZeRO-3 and bf16; the student head's batch norm
        statistics (model.head_batch_norm) in its parameters' dtype, which torch's batch norm
        requires (DeepSpeed casts parameters, not buffers)."""
        module = engine.module
        dtype = next(p.dtype for p in module.parameters() if p.requires_grad)
        for name, sub in module.named_modules():
            if isinstance(sub, nn.BatchNorm1d) and not name.startswith("teacher"):
                for stat in ("running_mean", "running_var"):
                    setattr(sub, stat, getattr(sub, stat).to(dtype))
        keep_fp32(module.teacher)
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_floating_point():
                module._buffers[name] = buf.float()

    def after_step(self, engine: Any, step: int) -> None:
        s, module = self.settings, engine.module
        module.update_centers(s.center_momentum)
        module.teacher_temp.fill_(
            teacher_temp_at(step, s.teacher_temp_warmup_steps, s.teacher_temp)
        )
        ema_update(module.pairs(), momentum_at(step, self.cfg.train.steps, s.momentum))

    def local_patches(self) -> int:
        """Patches per local crop."""
        return (self.settings.local_crop_size // self.settings.patch_size) ** 2

    def tokens(self, batch: dict[str, Any]) -> int:
        """Tokens the student encoder sees, [CLS] included: every crop of every image."""
        n = int(batch["pixel_values"].shape[0])
        return n * (2 * (self.num_patches() + 1) + self.settings.local_crops * (self.local_patches() + 1))  # fmt: skip

    def encoder_flops(self, patches: int, backward: bool) -> float:
        """One crop of `patches` patches through the patch projection and the encoder: forward and
        backward (the projection's backward: its weight gradient only, pixels need none), or
        forward only (a third of the blocks')."""
        m = self.cfg.model
        h, pix = m.hidden_size, 3 * self.settings.patch_size**2
        blocks = m.num_layers * encoder_layer_params(h, m.intermediate_size)
        seq = sequence_flops(blocks, m.num_layers, m.num_heads, h // m.num_heads, patches + 1)
        return seq + 4.0 * pix * h * patches if backward else seq / 3 + 2.0 * pix * h * patches

    def sample_flops(self) -> float:
        """Per image: the student on every crop (encoder and head on [CLS]) forward and backward,
        the teacher on the 2 global crops forward only."""
        head = DINOHead.weights(self.model_config())
        crops = 2 + self.settings.local_crops
        student = 2 * self.encoder_flops(self.num_patches(), True) + (
            self.settings.local_crops * self.encoder_flops(self.local_patches(), True)
        )
        teacher = 2 * (self.encoder_flops(self.num_patches(), False) + 2.0 * head)
        return student + crops * 6.0 * head + teacher

    def flops(self, batch: dict[str, Any]) -> float:
        """sample_flops per image, plus with iBOT the patch heads on the masked patches (student
        forward and backward, teacher forward)."""
        total = super().flops(batch)
        if "masks" in batch:
            total += 8.0 * DINOHead.weights(self.model_config()) * int(batch["masks"].sum())
        return total

    def flops_inputs(self) -> dict[str, Any]:
        m, s = self.cfg.model, self.settings
        return {
            "layers": m.num_layers, "heads": m.num_heads, "hidden": m.hidden_size,
            "patches": self.num_patches(), "local_patches": self.local_patches(),
            "crops": f"2 global + {s.local_crops} local (student), 2 global (teacher, forward)",
            "head_weights": DINOHead.weights(self.model_config()),
            "flops_per_sample": self.sample_flops(), "ibot": "patch heads on masked patches",
        }  # fmt: skip
