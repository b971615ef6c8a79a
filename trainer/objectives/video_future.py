"""Temporal feature prediction on clips, V-JEPA style (Bardes et al. 2024, "Revisiting Feature
Prediction for Learning Visual Representations from Video"): given the first frames of a clip,
predict the representation of the frames that follow.

A clip of `data.num_frames` frames is cut into tubes of `model.tubelet_size` frames × patch ×
patch (VideoMAE's tokens, ordered time slot, then row, then column). The *context* is the tubes of
the first `model.context_frames` frames; the *future* is every tube after them, so the future
tubes are the last ones in token order.

- The context encoder (transformers' VideoMAEModel, `videomae.`) sees the context tubes only:
  `bool_masked_pos` marks the future tubes, which its embeddings drop.
- The predictor (VideoMAE's decoder, `model.predictor_hidden_size` wide,
  `model.predictor_num_layers` blocks) projects the context states in, adds a learned mask token
  at each future tube, gives every token the fixed sin-cos position embedding of its tube, and
  projects the future tokens out.
- `model.target: latent` (V-JEPA): the target is the last hidden states of an EMA target encoder
  (`teacher.videomae.`, trainer.objectives.teacher) over the whole clip, layer-normed without
  affine terms, at the future tubes; the loss is their L1 distance to the predictions (V-JEPA's
  loss with exponent 1). The target encoder follows the context encoder after every optimizer
  step at momentum `momentum_at(step)`, from `model.momentum` to 1 on a half cosine.
- `model.target: pixels`: the target is the future tubes' pixels, each tube normalized per
  channel (VideoMAE's norm_pix_loss), with MSE: VideoMAE's own loss with the future tubes as
  the hidden ones. No target encoder is built.

The harness and `darkmatter export` take a VideoMAEModel: the EMA target encoder for latent
targets (V-JEPA and I-JEPA evaluate it), the context encoder for pixel targets (there is no
other): checkpoint_reader.ENCODER_PREFIX lists both prefixes, the first present wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, VideoMAEConfig, VideoMAEModel
from transformers.models.videomae.modeling_videomae import VideoMAEForPreTrainingOutput

from darkmatter.data_pipeline.transforms import clips_to_tensor
from darkmatter.trainer.config import Config, ConfigError
from darkmatter.trainer.objectives.base import ViTObjective, ViTSettings
from darkmatter.trainer.objectives.momentum import momentum_at
from darkmatter.trainer.objectives.teacher import ema_update, frozen_copy, keep_fp32, module_dtype
from darkmatter.trainer.objectives.video import VideoMAEPretrainer, init_mask_token
from darkmatter.trainer.perf import encoder_layer_params, sequence_flops

TARGETS = ("latent", "pixels")


def future_mask(batch: int, time_slots: int, context_slots: int, per_frame: int) -> torch.Tensor:
    """bool [batch, time_slots·per_frame], True = a future tube (hidden from the context encoder,
    predicted): every tube of the time slots from `context_slots` on. The same for every clip;
    it depends on no random draw."""
    mask = torch.zeros((batch, time_slots, per_frame), dtype=torch.bool)
    mask[:, context_slots:] = True
    return mask.flatten(1)


class VideoFutureModel(VideoMAEPretrainer):
    """VideoMAE's encoder and decoder as V-JEPA's context encoder and predictor; for latent
    targets the decoder's head outputs the encoder's width and an EMA copy of the encoder sits
    under `teacher.videomae` (persistent buffers: trainer.objectives.teacher)."""

    def __init__(self, config: VideoMAEConfig):
        super().__init__(config)
        self.latent = config.target == "latent"
        if self.latent:
            self.decoder.head = nn.Linear(config.decoder_hidden_size, config.hidden_size)
            self.teacher = nn.ModuleDict({"videomae": VideoMAEModel(config)})
            self.post_init()  # the new head; modules initialized already are left as they are
            frozen_copy(self.videomae, self.teacher["videomae"])

    def pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(teacher, online) modules whose weights match name by name."""
        return [(self.teacher["videomae"], self.videomae)] if self.latent else []

    def predict(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
        """[B, F, hidden]: the predictor's output at the F future tubes, from the context only."""
        states = self.videomae(pixel_values, bool_masked_pos=bool_masked_pos).last_hidden_state
        x = self.encoder_to_decoder(states)  # [B, C, d]
        b, _, d = x.shape
        pos = self.position_embeddings.to(device=x.device, dtype=x.dtype).expand(b, -1, -1)
        context = pos[~bool_masked_pos].reshape(b, -1, d)
        future = pos[bool_masked_pos].reshape(b, -1, d)
        x = torch.cat([x + context, self.mask_token + future], dim=1)  # [B, C + F, d], tube order
        logits: torch.Tensor = self.decoder(x, future.shape[1]).logits
        return logits

    @torch.no_grad()
    def targets(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
        """[B, F, hidden] fp32: the target encoder's layer-normed states at the future tubes; the
        teacher sees the whole clip, in its own precision (fp32)."""
        teacher = self.teacher["videomae"]
        h = teacher(pixel_values.to(module_dtype(teacher))).last_hidden_state.float()
        h = F.layer_norm(h, h.shape[-1:])
        return h[bool_masked_pos].reshape(h.shape[0], -1, h.shape[-1])

    def forward(  # type: ignore[override]
        self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor, **kwargs: Any
    ) -> VideoMAEForPreTrainingOutput:
        if not self.latent:  # VideoMAE's normalized-pixel loss over the future tubes
            return super().forward(pixel_values, bool_masked_pos=bool_masked_pos, **kwargs)
        pred = self.predict(pixel_values, bool_masked_pos)
        loss = F.l1_loss(pred.float(), self.targets(pixel_values, bool_masked_pos))
        return VideoMAEForPreTrainingOutput(loss=loss, logits=pred)


@dataclass
class VideoFutureSettings(ViTSettings):
    """V-JEPA-style temporal prediction: the tubes, the context, the predictor, the target."""

    tubelet_size: int = 2
    """Frames one tube spans (tubes of tubelet_size frames x patch x patch)."""
    context_frames: int = 0
    """Frames the context encoder sees, from the clip's start: a multiple of tubelet_size below
    data.num_frames; the tubes after them are predicted. 0: half of data.num_frames, rounded
    down to whole tubes."""
    predictor_hidden_size: int = 64
    """Width of the predictor (its feed-forward layer: 4 times that; V-JEPA: 384)."""
    predictor_num_layers: int = 2
    """Transformer blocks in the predictor (V-JEPA: 12)."""
    target: str = "latent"
    """What the predictor forecasts at the future tubes: latent (the EMA target encoder's
    layer-normed states, L1 loss: V-JEPA) or pixels (each tube's pixels normalized per channel,
    MSE: VideoMAE's target; no target encoder)."""
    momentum: float = 0.998
    """EMA momentum of the target encoder at step 0, rising to 1 at train.steps on a half cosine
    (V-JEPA's 0.998). Kept for short runs too: on moving digits 0.99 let the target follow the
    context encoder into position-only features (loss 0.05, probe below random init at 400
    steps), where 0.998 kept it learning."""


class VideoFutureObjective(ViTObjective):
    name = "video_future"
    modality = "video"
    settings_class = VideoFutureSettings
    settings: VideoFutureSettings
    float_inputs = ("pixel_values",)

    @classmethod
    def resolve_defaults(cls, cfg: Config) -> None:
        super().resolve_defaults(cfg)
        s = cfg.objective_settings
        assert isinstance(s, VideoFutureSettings)
        if s.context_frames == 0 and s.tubelet_size > 0:
            s.context_frames = cfg.data.num_frames // 2 // s.tubelet_size * s.tubelet_size

    @classmethod
    def validate(cls, cfg: Config) -> None:
        super().validate(cfg)
        s = cfg.objective_settings
        assert isinstance(s, VideoFutureSettings)
        if s.tubelet_size < 1 or cfg.data.num_frames % s.tubelet_size:
            raise ConfigError(f"model.tubelet_size: {s.tubelet_size} does not divide "
                              f"data.num_frames={cfg.data.num_frames}")  # fmt: skip
        if s.context_frames <= 0 or s.context_frames % s.tubelet_size:
            raise ConfigError(f"model.context_frames: expected a positive multiple of "
                              f"model.tubelet_size={s.tubelet_size}, got {s.context_frames}")  # fmt: skip
        if s.context_frames >= cfg.data.num_frames:
            raise ConfigError(f"model.context_frames: {s.context_frames} leaves no frame of "
                              f"data.num_frames={cfg.data.num_frames} to predict")  # fmt: skip
        if s.target not in TARGETS:
            raise ConfigError(
                f"model.target: expected one of {', '.join(TARGETS)}, got {s.target!r}"
            )
        if s.predictor_num_layers < 1 or s.predictor_hidden_size % cfg.model.num_heads:
            raise ConfigError(f"model.predictor_hidden_size: {s.predictor_hidden_size} (with "
                              f"{s.predictor_num_layers} layers) is not a multiple of "
                              f"model.num_heads={cfg.model.num_heads}")  # fmt: skip
        if not 0.0 <= s.momentum < 1.0:
            raise ConfigError(f"model.momentum: expected in [0, 1), got {s.momentum}")

    def time_slots(self) -> int:
        return self.cfg.data.num_frames // self.settings.tubelet_size

    def context_tubes(self) -> int:
        """Tubes per clip the context encoder sees."""
        return self.settings.context_frames // self.settings.tubelet_size * self.num_patches()

    def model_config(self) -> VideoMAEConfig:
        m, s = self.cfg.model, self.settings
        config = VideoMAEConfig(
            **self.vit_kwargs(), num_frames=self.cfg.data.num_frames,
            tubelet_size=s.tubelet_size, decoder_hidden_size=s.predictor_hidden_size,
            decoder_num_hidden_layers=s.predictor_num_layers, decoder_num_attention_heads=m.num_heads,
            decoder_intermediate_size=4 * s.predictor_hidden_size,
            norm_pix_loss=True,  # pixel targets: each tube normalized per channel
            use_mean_pooling=True,  # no final norm: features are the mean of the last states
        )  # fmt: skip
        config.target, config.context_frames = s.target, s.context_frames
        return config

    def build_model(self) -> PreTrainedModel:
        return init_mask_token(VideoFutureModel(self.model_config()))

    def make_batch(self, samples: list[dict[str, Any]], gen: torch.Generator) -> dict[str, Any]:
        d = self.cfg.data
        pixels = clips_to_tensor([s["frames"] for s in samples], d.num_frames, d.frame_stride,
                                 d.image_size, gen)  # fmt: skip
        context_slots = self.settings.context_frames // self.settings.tubelet_size
        mask = future_mask(len(samples), self.time_slots(), context_slots, self.num_patches())
        return {"pixel_values": pixels, "bool_masked_pos": mask}

    def prepare_engine(self, engine: Any) -> None:
        if self.settings.target == "latent":
            keep_fp32(engine.module.teacher)

    def after_step(self, engine: Any, step: int) -> None:
        if self.settings.target == "latent":
            m = momentum_at(step, self.cfg.train.steps, self.settings.momentum)
            ema_update(engine.module.pairs(), m)

    def tokens(self, batch: dict[str, Any]) -> int:
        return int(batch["pixel_values"].shape[0]) * self.context_tubes()

    def sample_flops(self) -> float:
        """The tube projection on every tube (forward and weight gradient: pixels need no
        gradient), the context encoder on the context tubes, the predictor's input projection on
        them, its blocks on every tube and its output projection on the future ones, all forward
        and backward; latent targets add the target encoder's forward (a third of forward and
        backward) on every tube, its tube projection included."""
        m, s = self.cfg.model, self.settings
        h, hp = m.hidden_size, s.predictor_hidden_size
        pix = 3 * s.tubelet_size * s.patch_size**2
        n_all, n_ctx = self.time_slots() * self.num_patches(), self.context_tubes()
        n_fut, out = n_all - n_ctx, h if s.target == "latent" else pix

        def encoder(n: int) -> float:
            return sequence_flops(m.num_layers * encoder_layer_params(h, m.intermediate_size),
                                  m.num_layers, m.num_heads, h // m.num_heads, n)  # fmt: skip

        predictor = sequence_flops(s.predictor_num_layers * encoder_layer_params(hp, 4 * hp),
                                   s.predictor_num_layers, m.num_heads, hp // m.num_heads, n_all)  # fmt: skip
        online = 4.0 * pix * h * n_all + encoder(n_ctx) + 6.0 * (h * hp * n_ctx + hp * out * n_fut)
        target = (encoder(n_all) + 6.0 * pix * h * n_all) / 3.0 if s.target == "latent" else 0.0
        return online + predictor + target

    def flops_inputs(self) -> dict[str, Any]:
        m, s = self.cfg.model, self.settings
        return {
            "encoder_layers": m.num_layers, "predictor_layers": s.predictor_num_layers,
            "heads": m.num_heads, "hidden": m.hidden_size, "predictor_hidden": s.predictor_hidden_size,
            "tubes": self.time_slots() * self.num_patches(), "context_tubes": self.context_tubes(),
            "target": s.target, "target_encoder": "forward only" if s.target == "latent" else "none",
            "flops_per_sample": self.sample_flops(),
        }  # fmt: skip
