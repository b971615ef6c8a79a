"""I-JEPA (Assran et al. 2023, "Self-Supervised Learning from Images with a Joint-Embedding
Predictive Architecture"): from one large *context* block of an image, a narrow predictor
predicts the representations that an EMA *target encoder* gives `model.num_targets` smaller
*target* blocks of the same image. No pixels are reconstructed and no views are augmented.

- Masks (the paper's multi-block collator, src/masks/multiblock.py): per batch one target block
  size (scale `model.target_scale` of the patch grid, aspect ratio `model.target_aspect`) and one
  context block size (scale `model.context_scale`, square) are drawn; per image the blocks are
  placed at random and the context block loses every target patch, so context and targets are
  disjoint. Every count is then cut to the batch's smallest (the collator keeps the first
  patches in row-major order), so the index tensors are rectangular. All of it comes from the
  batch's generator. Two departures: a block may span the whole grid side (the paper's code caps
  it one patch short and then places it only at offset 0), and a context left empty by the
  targets after 20 placements falls back to every non-target patch (the paper would let the
  context overlap a target).
- Context encoder (`vit.`): a transformers ViTModel run on the context patches only: its
  embeddings (patch projection + learned positions) on the whole image, the context patches
  gathered, then its blocks and final norm. Its [CLS] token is kept as one extra token the
  context attends to (I-JEPA has none): the exported encoder is a plain ViTModel, which always
  prepends it, so training and evaluation see the same sequence; the predictor never sees it.
- Target encoder (`teacher.vit.`): an EMA copy (trainer.objectives.teacher) run on the whole
  image under no_grad; its patch outputs are layer-normed over features (as the paper's code)
  and the target blocks' patches taken. Momentum `model.momentum` (0.996) rising to 1 over
  train.steps (momentum_at). It is what the harness and export take: the paper evaluates the
  target encoder, average-pooling its patch tokens.
- Predictor: ViT blocks `model.predictor_hidden_size` wide and `model.predictor_depth` deep (the
  paper: 384 wide, 12 deep for ViT-H), on the context tokens projected in plus, per target
  patch, a learned mask token + the patch's fixed 2-D sin-cos position; one pass per target
  block, batched; the target tokens projected back to hidden_size.
- Loss: the mean squared error of predictions and targets, averaged over target blocks,
  patches and features: the paper's L2 (eq. 1, up to its constant); its code uses smooth-L1.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, ViTConfig, ViTModel
from transformers.models.vit.modeling_vit import ViTLayer, ViTPreTrainedModel
from transformers.utils import ModelOutput

from darkmatter.data_pipeline.transforms import images_to_tensor
from darkmatter.trainer.config import Config, ConfigError
from darkmatter.trainer.objectives.base import ViTObjective, ViTSettings
from darkmatter.trainer.objectives.momentum import momentum_at
from darkmatter.trainer.objectives.teacher import (
    ema_update,
    frozen_copy,
    keep_fp32,
    module_dtype,
)
from darkmatter.trainer.perf import encoder_layer_params, sequence_flops

CONTEXT_TRIES = 20  # placements of the context block before the fallback (the paper's timeout)


# -- masks -----------------------------------------------------------------------------------


def block_size(u: float, scale: list[float], aspect: list[float], side: int) -> tuple[int, int]:
    """(rows, cols) of a block on a side x side grid, I-JEPA's `_sample_block_size`: one uniform
    draw `u` sets both the share of the grid and the aspect ratio rows/cols."""
    area = int(side * side * (scale[0] + u * (scale[1] - scale[0])))
    ratio = aspect[0] + u * (aspect[1] - aspect[0])
    rows = min(int(round(math.sqrt(area * ratio))), side)
    cols = min(int(round(math.sqrt(area / ratio))), side)
    return rows, cols


def place(size: tuple[int, int], side: int, gen: torch.Generator) -> torch.Tensor:
    """bool [side·side]: a block of `size` at a random offset (row-major patch order)."""
    rows, cols = size
    top = int(torch.randint(0, side - rows + 1, (1,), generator=gen))
    left = int(torch.randint(0, side - cols + 1, (1,), generator=gen))
    mask = torch.zeros((side, side), dtype=torch.bool)
    mask[top : top + rows, left : left + cols] = True
    return mask.flatten()


def context_mask(
    size: tuple[int, int], side: int, taken: torch.Tensor, gen: torch.Generator
) -> torch.Tensor:
    """bool [side·side]: the context block less the target patches `taken`, placed again until
    something is left (else every patch not taken)."""
    for _ in range(CONTEXT_TRIES):
        mask = place(size, side, gen) & ~taken
        if mask.any():
            return mask
    return ~taken


def multiblock_masks(
    batch: int, side: int, s: IJEPASettings, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(context [batch, Nc], targets [batch, num_targets, Nt]): patch indices, row-major, of each
    image's context and target blocks; Nc is the batch's smallest context (longer ones keep
    their first Nc patches, as the paper's collator)."""
    u_target, u_context = torch.rand(2, generator=gen).tolist()
    t_size = block_size(u_target, s.target_scale, s.target_aspect, side)
    c_size = block_size(u_context, s.context_scale, [1.0, 1.0], side)
    targets, contexts = [], []
    for _ in range(batch):
        blocks = [place(t_size, side, gen) for _ in range(s.num_targets)]
        taken = torch.stack(blocks).any(dim=0)
        targets.append(torch.stack([b.nonzero().squeeze(1) for b in blocks]))
        contexts.append(context_mask(c_size, side, taken, gen).nonzero().squeeze(1))
    keep = min(len(c) for c in contexts)
    return torch.stack([c[:keep] for c in contexts]), torch.stack(targets)


def sincos_2d(dim: int, side: int) -> torch.Tensor:
    """[side·side, dim] fixed 2-D sin-cos positions (MAE's and I-JEPA's get_2d_sincos_pos_embed):
    half the features encode the row, half the column, each as sin and cos of 10000^(-k/(dim/4))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.flatten().double()[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    # As the reference: the first half from the grid's width coordinate, the second from its height.
    return torch.cat([encode(cols), encode(rows)], dim=1).float()


# -- model -----------------------------------------------------------------------------------


def predictor_config(config: ViTConfig) -> ViTConfig:
    """The predictor blocks' config: the encoder's, predictor_hidden_size wide (MLP 4x)."""
    pc = copy.deepcopy(config)
    pc.hidden_size = config.predictor_hidden_size
    pc.intermediate_size = 4 * config.predictor_hidden_size
    pc.num_hidden_layers = config.predictor_depth
    return pc


class Predictor(nn.Module):
    """I-JEPA's VisionTransformerPredictor: context tokens in, one pass per target block."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        pc = self.config = predictor_config(config)
        side = cast(int, config.image_size) // cast(int, config.patch_size)  # vit_kwargs(): ints
        self.embed = nn.Linear(config.hidden_size, pc.hidden_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, pc.hidden_size))
        self.layers = nn.ModuleList([ViTLayer(pc) for _ in range(pc.num_hidden_layers)])
        self.norm = nn.LayerNorm(pc.hidden_size, eps=pc.layer_norm_eps)
        self.proj = nn.Linear(pc.hidden_size, config.hidden_size)
        # Recomputed at construction, never saved: a function of the config only.
        self.positions: torch.Tensor
        self.register_buffer("positions", sincos_2d(pc.hidden_size, side), persistent=False)

    def forward(
        self, ctx: torch.Tensor, context: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """ctx [B, Nc, D] encoded context, context [B, Nc] and targets [B, M, Nt] patch indices
        -> [B·M, Nt, D] predictions, block by block (image-major)."""
        b, m, nt = targets.shape
        pos = self.positions.to(ctx.dtype)
        x = (self.embed(ctx) + pos[context]).repeat_interleave(m, dim=0)  # [B·M, Nc, P]
        queries = self.mask_token + pos[targets.reshape(b * m, nt)]  # [B·M, Nt, P]
        z = torch.cat([x, queries], dim=1)
        for layer in self.layers:
            z = layer(z)
        return self.proj(self.norm(z[:, -nt:]))


@dataclass
class IJEPAOutput(ModelOutput):  # type: ignore[misc]
    loss: torch.Tensor | None = None
    predictions: torch.Tensor | None = None  # [B·M, Nt, D] the predictor's
    targets: torch.Tensor | None = None  # [B·M, Nt, D] the teacher's, layer-normed


class IJEPAModel(ViTPreTrainedModel):  # type: ignore[misc]
    """Context encoder `vit.`, predictor `predictor.`, EMA target encoder `teacher.vit.` (buffers)."""

    base_model_prefix = "vit"
    main_input_name = "pixel_values"

    def __init__(self, config: ViTConfig):
        super().__init__(config)
        self.vit = ViTModel(config, add_pooling_layer=False)
        self.predictor = Predictor(config)
        self.teacher = nn.ModuleDict({"vit": ViTModel(config, add_pooling_layer=False)})
        self.post_init()
        frozen_copy(self.vit, self.teacher["vit"])

    def set_attn_implementation(self, attn_implementation: Any, *args: Any, **kwargs: Any) -> Any:
        """The predictor's blocks follow too (they keep a config of their own)."""
        out = super().set_attn_implementation(attn_implementation, *args, **kwargs)
        self.predictor.config._attn_implementation = self.config._attn_implementation
        return out

    def pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(teacher, online) modules whose weights match name by name."""
        return [(self.teacher["vit"], self.vit)]

    def encode_context(self, pixel_values: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """[B, Nc, D]: the context patches through the online encoder, with [CLS] and without
        the other patches; [CLS]'s output is dropped."""
        emb = self.vit.embeddings(pixel_values.to(module_dtype(self.vit)))  # [B, 1 + N, D]
        idx = context.unsqueeze(-1).expand(-1, -1, emb.shape[-1])
        x = torch.cat([emb[:, :1], emb[:, 1:].gather(1, idx)], dim=1)  # [B, 1 + Nc, D]
        for layer in self.vit.layers:
            x = layer(x)
        return self.vit.layernorm(x)[:, 1:]

    @torch.no_grad()
    def target_features(self, pixel_values: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """[B·M, Nt, D] fp32: the teacher's layer-normed patch outputs at each target block."""
        vit = self.teacher["vit"]
        h = vit(pixel_values=pixel_values.to(module_dtype(vit))).last_hidden_state[:, 1:].float()
        h = F.layer_norm(h, (h.shape[-1],))  # [B, N, D]
        b, m, nt = targets.shape
        idx = targets.reshape(b, m * nt, 1).expand(-1, -1, h.shape[-1])
        return h.gather(1, idx).reshape(b * m, nt, h.shape[-1])

    def forward(
        self, pixel_values: torch.Tensor, context: torch.Tensor, targets: torch.Tensor
    ) -> IJEPAOutput:
        pred = self.predictor(self.encode_context(pixel_values, context), context, targets).float()
        target = self.target_features(pixel_values, targets)
        return IJEPAOutput(loss=F.mse_loss(pred, target), predictions=pred, targets=target)


# -- objective -------------------------------------------------------------------------------


@dataclass
class IJEPASettings(ViTSettings):
    """I-JEPA's settings: the ViT's patch_size, the blocks, the predictor, the EMA momentum."""

    num_targets: int = 4
    """Target blocks per image (the paper: 4)."""
    target_scale: list[float] = field(default_factory=lambda: [0.15, 0.2])
    """[min, max] share of the patch grid one target block covers (the paper: 0.15-0.2)."""
    target_aspect: list[float] = field(default_factory=lambda: [0.75, 1.5])
    """[min, max] rows/cols ratio of a target block (the paper: 0.75-1.5)."""
    context_scale: list[float] = field(default_factory=lambda: [0.85, 1.0])
    """[min, max] share of the grid the square context block covers before the targets are cut
    out of it (the paper: 0.85-1.0)."""
    predictor_hidden_size: int = 64
    """Width of the predictor (the paper: 384); a multiple of model.num_heads."""
    predictor_depth: int = 2
    """Transformer blocks in the predictor (the paper: 6-12)."""
    momentum: float = 0.996
    """Momentum of the EMA target encoder at step 0, rising to 1 over train.steps on a cosine
    (the paper: 0.996 linearly to 1)."""


def _check_range(key: str, value: list[float], low: float, high: float) -> None:
    if len(value) != 2 or not low < value[0] <= value[1] <= high:
        raise ConfigError(
            f"model.{key}: expected [min, max] with {low} < min <= max <= {high}, got {value}"
        )


class IJEPAObjective(ViTObjective):
    name = "ijepa"
    settings_class = IJEPASettings
    settings: IJEPASettings
    modality = "image"
    float_inputs = ("pixel_values",)
    momentum_teacher = True  # its module holds an fp32 EMA teacher under `teacher.`

    @classmethod
    def validate(cls, cfg: Config) -> None:
        super().validate(cfg)
        s = cfg.objective_settings
        assert isinstance(s, IJEPASettings)
        _check_range("target_scale", s.target_scale, 0.0, 1.0)
        _check_range("target_aspect", s.target_aspect, 0.0, math.inf)
        _check_range("context_scale", s.context_scale, 0.0, 1.0)
        if not 0.0 <= s.momentum < 1.0:
            raise ConfigError(f"model.momentum: expected in [0, 1), got {s.momentum}")
        if s.predictor_depth < 1:
            raise ConfigError(f"model.predictor_depth: expected >= 1, got {s.predictor_depth}")
        if s.predictor_hidden_size < 1 or s.predictor_hidden_size % cfg.model.num_heads:
            raise ConfigError(
                f"model.predictor_hidden_size: expected a positive multiple of "
                f"model.num_heads={cfg.model.num_heads}, got {s.predictor_hidden_size}"
            )
        cls.check_grid(cfg.data.image_size // s.patch_size, s)

    @staticmethod
    def check_grid(side: int, s: IJEPASettings) -> None:
        """Every target block has a patch, and the targets can never cover the whole grid (so a
        context is always left): checked at every size the block-size draw can give."""
        if s.num_targets < 1:
            raise ConfigError(f"model.num_targets: expected >= 1, got {s.num_targets}")
        areas = [math.prod(block_size(u / 1000, s.target_scale, s.target_aspect, side))
                 for u in range(1001)]  # fmt: skip
        if min(areas) < 1:
            raise ConfigError(
                f"model.target_scale: {s.target_scale} gives empty target blocks on the "
                f"{side}x{side} patch grid (data.image_size / model.patch_size)"
            )
        if s.num_targets * max(areas) >= side * side:
            raise ConfigError(
                f"model.num_targets: {s.num_targets} target blocks of up to {max(areas)} patches "
                f"can cover the {side}x{side} patch grid, leaving no context: fewer targets, a "
                "smaller model.target_scale or a finer grid (data.image_size / model.patch_size)"
            )

    def model_config(self) -> ViTConfig:
        cfg = ViTConfig(**self.vit_kwargs())
        cfg.predictor_hidden_size = self.settings.predictor_hidden_size
        cfg.predictor_depth = self.settings.predictor_depth
        cfg.momentum = self.settings.momentum
        return cfg

    def build_model(self) -> PreTrainedModel:
        model = IJEPAModel(self.model_config())
        # The paper draws the mask token (truncated normal, 0.02); transformers would leave this
        # extra parameter at zero. Under ZeRO-3 it is partitioned as built: gathered for the write.
        from darkmatter.trainer.engine import gathered

        with torch.no_grad(), gathered([model.predictor.mask_token]):
            nn.init.trunc_normal_(model.predictor.mask_token, std=0.02)
        return model

    def prepare_engine(self, engine: Any) -> None:
        keep_fp32(engine.module.teacher)  # zero.Init and bf16 cast it; the EMA needs fp32

    def after_step(self, engine: Any, step: int) -> None:
        m = momentum_at(step, self.cfg.train.steps, self.settings.momentum)
        ema_update(engine.module.pairs(), m)

    def side(self) -> int:
        return self.cfg.data.image_size // self.settings.patch_size

    def make_batch(self, samples: list[dict[str, Any]], gen: torch.Generator) -> dict[str, Any]:
        pixels = images_to_tensor([s["image"] for s in samples], self.cfg.data.image_size)
        context, targets = multiblock_masks(len(samples), self.side(), self.settings, gen)
        return {"pixel_values": pixels, "context": context, "targets": targets}

    def tokens(self, batch: dict[str, Any]) -> int:
        """Patches the context encoder sees ([CLS] included)."""
        b, nc = batch["context"].shape
        return int(b * (nc + 1))

    def flops(self, batch: dict[str, Any]) -> float:
        b, nc = batch["context"].shape
        _, m, nt = batch["targets"].shape
        return int(b) * self.image_flops(int(nc), int(m), int(nt))

    def image_flops(self, nc: int, m: int, nt: int) -> float:
        """One image: the patch projection on every patch (forward and weight gradient: pixels
        need no gradient), the context encoder on [CLS] + nc patches, the predictor's input
        projection on the context once, its blocks on nc + nt tokens and its output projection on
        the nt targets once per target block; all forward and backward. The target encoder on
        [CLS] + every patch, forward only (a third)."""
        c, s = self.cfg.model, self.settings
        h, p, n = c.hidden_size, s.predictor_hidden_size, self.num_patches()
        pix_weights = 3 * s.patch_size**2 * h
        encoder_weights = c.num_layers * encoder_layer_params(h, c.intermediate_size)
        encoder = sequence_flops(
            encoder_weights, c.num_layers, c.num_heads, h // c.num_heads, nc + 1
        )
        blocks = sequence_flops(s.predictor_depth * encoder_layer_params(p, 4 * p), s.predictor_depth,
                                c.num_heads, p // c.num_heads, nc + nt)  # fmt: skip
        predictor = m * blocks + 6.0 * h * p * (nc + m * nt)  # in: once; out: per block
        teacher = (sequence_flops(encoder_weights, c.num_layers, c.num_heads, h // c.num_heads, n + 1)
                   + 6.0 * pix_weights * n) / 3.0  # fmt: skip
        return 4.0 * pix_weights * n + encoder + predictor + teacher

    def sample_flops(self) -> float:
        """An image with the grid's mean shapes: the context block's mean area less the targets'
        (their overlaps ignored), the mean target block (the log's figure counts the real ones)."""
        s, side = self.settings, self.side()
        mean_area = [sum(math.prod(block_size(u / 100, sc, asp, side)) for u in range(101)) / 101
                     for sc, asp in ((s.target_scale, s.target_aspect), (s.context_scale, [1.0, 1.0]))]  # fmt: skip
        nt = max(1, round(mean_area[0]))
        nc = max(1, round(mean_area[1] - s.num_targets * mean_area[0]))
        return self.image_flops(nc, s.num_targets, nt)

    def flops_inputs(self) -> dict[str, Any]:
        c, s = self.cfg.model, self.settings
        return {
            "layers": c.num_layers, "heads": c.num_heads, "hidden": c.hidden_size,
            "patches": self.num_patches(), "predictor_hidden": s.predictor_hidden_size,
            "predictor_depth": s.predictor_depth, "target_blocks": s.num_targets,
            "teacher": "forward only", "counted": "per batch: its context and target sizes",
            "flops_per_sample": self.sample_flops(),
        }  # fmt: skip
