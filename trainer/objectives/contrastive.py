"""What the image objectives with two views share (simclr, byol, moco): their batches, the views'
augmentation, run batched on the model's device from parameters drawn on the CPU, the heads'
batch norm over the global batch, and the contrastive losses with their negatives gathered from
every rank: N ranks compute what one rank computes on their concatenated batches.

Augmentation (SimCLR, Chen et al. 2020, appendix A, at the small sizes of CIFAR): a random
resized crop (scale 0.2-1, aspect ratio 3/4-4/3), a horizontal flip (p 0.5), colour jitter
(p 0.8: brightness, contrast, saturation 0.4, hue 0.1), grayscale (p 0.2). Every random number
is drawn in `draw_view_params` from the batch's generator, so a resumed run draws the same views;
`augment` is pure tensor work (kornia's functional ops) on whatever device the pixels are on.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, ViTConfig, ViTModel

from darkmatter.data_pipeline.transforms import images_to_unit, normalize
from darkmatter.trainer.objectives.base import ViTObjective
from darkmatter.trainer.objectives.teacher import module_dtype
from darkmatter.trainer.perf import encoder_layer_params, sequence_flops

# Columns of a view's parameters.
X0, Y0, W, H, FLIP, JITTER, BRIGHT, CONTRAST, SATUR, HUE, GRAY = range(11)
N_PARAMS = 11


def draw_view_params(batch: int, views: int, size: int, gen: torch.Generator,
                     min_scale: float = 0.2, flip_p: float = 0.5,
                     max_scale: float = 1.0) -> torch.Tensor:  # fmt: skip
    """[batch, views, N_PARAMS] float32: one crop box and colour recipe per sample and view. A
    crop covers min_scale to max_scale of the image's area (DINO's local crops: 0.05-0.4)."""
    u = torch.rand((batch, views, 9), generator=gen)
    area = min_scale + (max_scale - min_scale) * u[..., 0]
    log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[..., 1]
    w = (torch.sqrt(area * torch.exp(log_ratio)) * size).clamp(2, size)
    h = (torch.sqrt(area / torch.exp(log_ratio)) * size).clamp(2, size)
    x0, y0 = (size - w) * u[..., 2], (size - h) * u[..., 3]
    flip = (u[..., 4] < flip_p).float()
    jitter = (u[..., 5] < 0.8).float()
    gray = (u[..., 6] < 0.2).float()
    factors = 0.6 + 0.8 * torch.rand((batch, views, 3), generator=gen)  # 1 ± 0.4
    hue = -0.1 + 0.2 * u[..., 7]
    return torch.stack(
        [x0, y0, w, h, flip, jitter, factors[..., 0], factors[..., 1], factors[..., 2], hue, gray],
        dim=-1,
    )


def import_kornia() -> None:
    """Import kornia before any model is built: DeepSpeed's zero.Init leaves nn.Module's subclass
    hook broken for typing.Generic subclasses, and kornia defines some at import (`type object
    'ModelBase' has no attribute '__parameters__'`). trainer.engine repairs the hook after its
    own ZeRO-3 builds; this covers a zero.Init entered elsewhere (DeepSpeed's engine)."""
    import kornia  # noqa: F401


def augment(x: torch.Tensor, p: torch.Tensor, out_size: int | None = None) -> torch.Tensor:
    """One view of [B, 3, S, S] pixels in [0, 1] by parameters [B, N_PARAMS]; float32 in and out,
    resized to [B, 3, out_size, out_size] (by default S: DINO's local crops are smaller)."""
    from kornia.color import rgb_to_grayscale
    from kornia.enhance import (
        adjust_brightness,
        adjust_contrast_with_mean_subtraction,
        adjust_hue,
        adjust_saturation,
    )
    from kornia.geometry.transform import crop_and_resize

    size = out_size or x.shape[-1]
    x0, y0 = p[:, X0], p[:, Y0]
    x1, y1 = x0 + p[:, W] - 1, y0 + p[:, H] - 1
    boxes = torch.stack([torch.stack([x0, y0], -1), torch.stack([x1, y0], -1),
                         torch.stack([x1, y1], -1), torch.stack([x0, y1], -1)], dim=1)  # fmt: skip
    v = crop_and_resize(x, boxes, (size, size))
    v = torch.where(p[:, FLIP, None, None, None] > 0, v.flip(-1), v)
    jittered = adjust_brightness(v, p[:, BRIGHT] - 1.0)
    jittered = adjust_contrast_with_mean_subtraction(jittered, p[:, CONTRAST])
    jittered = adjust_saturation(jittered, p[:, SATUR])
    jittered = adjust_hue(jittered, p[:, HUE] * 2 * math.pi).clamp(0, 1)
    v = torch.where(p[:, JITTER, None, None, None] > 0, jittered, v)
    gray = rgb_to_grayscale(v).expand_as(v)
    return torch.where(p[:, GRAY, None, None, None] > 0, gray, v)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean [C], biased variance [C], row count []) of [B, C] rows over every rank's rows, with
    gradients: torch.distributed.nn's all_reduce all-reduces the gradient in its backward, so
    each rank's rows receive the gradient of every rank's loss. Two reductions (the sum and
    count, then the squared deviations from the global mean) rather than one of the sum of
    squares, whose difference E[x²] - E[x]² cancels catastrophically."""
    from torch.distributed.nn.functional import all_reduce

    sums = all_reduce(torch.cat([x.sum(0), x.new_full((1,), float(x.shape[0]))]))
    count = sums[-1].detach()
    mean = sums[:-1] / count
    var = all_reduce((x - mean).square().sum(0)) / count
    return mean, var, count


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d over the global batch: in training, with more than one rank, the statistics
    are those of every rank's rows together (SimCLR's global BN, Chen et al. 2020, 3.2; MoCo
    v3's SyncBN), so N ranks compute the function one rank computes on the concatenated batch.
    torch's SyncBatchNorm refuses CPU tensors (torch 2.13), which gloo runs use. On one process
    and in eval mode it is nn.BatchNorm1d's forward exactly; the parameter and buffer names are
    BatchNorm1d's, so checkpoints load either way. Every rank must run every forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _world_size() > 1):
            return super().forward(x)
        assert x.dim() == 2, f"GlobalBatchNorm1d takes [B, C], got {tuple(x.shape)}"
        xf = x.float()  # statistics in fp32 whatever the training dtype
        mean, var, count = global_moments(xf)
        if self.track_running_stats:
            self._track(mean.detach(), var.detach() * count / (count - 1))
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight.float() + self.bias.float()
        return y.to(x.dtype)

    @torch.no_grad()
    def _track(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        """The running statistics as nn.BatchNorm1d updates them (unbiased variance; momentum
        None: the cumulative average), identical on every rank since the moments are."""
        assert self.running_mean is not None and self.running_var is not None
        assert self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        f = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        for buf, value in ((self.running_mean, mean), (self.running_var, unbiased_var)):
            buf.mul_(1.0 - f).add_(value.to(buf.dtype), alpha=f)


def gather_with_grad(z: torch.Tensor) -> torch.Tensor:
    """[B, d] on each of N ranks -> [N·B, d] on every rank, rank-major. Gradients flow back to
    each rank's own rows (summed over the ranks whose losses used them)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(z), dim=0)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent over the global batch: the two views of each sample are positives, the
    other 2·N·B - 2 embeddings of every rank are negatives. Returns this rank's mean over its
    own 2·B anchors, so that the mean over ranks (what data parallelism's gradient averaging
    takes) is the loss of the whole batch."""
    b = z1.shape[0]
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    all1, all2 = gather_with_grad(z1), gather_with_grad(z2)
    n = all1.shape[0]  # N·B
    everything = torch.cat([all1, all2], dim=0)  # [2NB, d]: views 1 of all ranks, then views 2
    anchors = torch.cat([z1, z2], dim=0)  # [2B, d]
    own = torch.arange(b, device=z1.device) + rank * b  # this rank's rows in all1 / all2
    self_idx = torch.cat([own, own + n])
    positive = torch.cat([own + n, own])
    logits = anchors @ everything.T / temperature  # [2B, 2NB]
    logits[torch.arange(2 * b, device=z1.device), self_idx] = float("-inf")
    return F.cross_entropy(logits, positive)


def info_nce(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v3's contrastive loss (Chen, Xie & He 2021, algorithm 1): each query's positive is
    the key of its own image, the keys of every other image of every rank are its negatives;
    scaled by 2·temperature as the paper does. Keys come from the momentum teacher and carry no
    gradient. Returns this rank's mean over its B queries (the mean over ranks is the loss of
    the whole batch)."""
    b = q.shape[0]
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    keys = gather_with_grad(k.detach())  # [N·B, d], rank-major
    logits = q @ keys.T / temperature
    labels = torch.arange(b, device=q.device) + rank * b
    return F.cross_entropy(logits, labels) * (2 * temperature)


class TwoViewObjective(ViTObjective):
    """An image objective whose batch is the images once, in [0, 1], plus the parameters of two
    views per image drawn from the batch's generator; the model makes the views itself."""

    modality = "image"

    def __init__(self, cfg: Any, dataset_meta: dict[str, Any]):
        super().__init__(cfg, dataset_meta)
        import_kornia()

    def make_batch(self, samples: list[dict[str, Any]], gen: torch.Generator) -> dict[str, Any]:
        d = self.cfg.data
        pixels = images_to_unit([s["image"] for s in samples], d.image_size)
        views = draw_view_params(len(samples), 2, d.image_size, gen, d.min_crop_scale, d.flip_prob)
        return {"pixel_values": pixels, "view_params": views}

    def tokens(self, batch: dict[str, Any]) -> int:
        """Patches the encoder sees: both views of every image, [CLS] included."""
        return 2 * int(batch["pixel_values"].shape[0]) * (self.num_patches() + 1)

    def prepare_engine(self, engine: Any) -> None:
        """Batch norm in the heads: under bf16 DeepSpeed casts the parameters and leaves the
        buffers in fp32, and torch's batch norm refuses running statistics of another dtype
        than its weight (or, without affine terms, its input). The statistics follow the
        parameters' dtype (they only serve inference; training normalizes by the batch)."""
        dtype = next(p.dtype for p in engine.module.parameters() if p.requires_grad)
        for module in engine.module.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                for name in ("running_mean", "running_var"):
                    buf = getattr(module, name)
                    if buf is not None:
                        setattr(module, name, buf.to(dtype))

    def encoder_flops(self) -> float:
        """Forward and backward of one view through the patch projection and the encoder."""
        m = self.cfg.model
        h, pix, n = m.hidden_size, 3 * self.settings.patch_size**2, self.num_patches()
        blocks = m.num_layers * encoder_layer_params(h, m.intermediate_size)
        return sequence_flops(blocks, m.num_layers, m.num_heads, h // m.num_heads, n + 1) + (
            6.0 * pix * h * n
        )


class ViTHostModel(PreTrainedModel):  # type: ignore[misc]
    """A pretraining model around a ViTModel under `vit.` (two-view objectives, dino)."""

    config_class = ViTConfig
    base_model_prefix = "vit"
    main_input_name = "pixel_values"
    # The attention kernels are the inner ViTModel's, which supports them all.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    # So is activation checkpointing: enabling it here reaches the inner ViT's layers (the
    # teacher's run under no_grad, where there is nothing to recompute).
    supports_gradient_checkpointing = True


class TwoViewModel(ViTHostModel):
    """A ViT encoder under `vit.` (what the harness and export take) that makes the two views of
    its images itself, on its own device; subclasses add their heads and loss."""

    def __init__(self, config: ViTConfig):
        super().__init__(config)
        self.vit = ViTModel(config, add_pooling_layer=False)

    @staticmethod
    def views(pixel_values: torch.Tensor, view_params: torch.Tensor) -> torch.Tensor:
        """[2B, 3, S, S] normalized float32: the first view of every image, then the second."""
        x = pixel_values.float()
        return normalize(torch.cat([augment(x, view_params[:, 0].float()),
                                    augment(x, view_params[:, 1].float())]))  # fmt: skip

    @staticmethod
    def pooled(vit: torch.nn.Module, views: torch.Tensor) -> torch.Tensor:
        """The mean of every token's final state (as the harness pools its features), in the
        encoder's dtype (a teacher's: fp32)."""
        dtype = module_dtype(vit)
        return vit(pixel_values=views.to(dtype)).last_hidden_state.mean(dim=1)
