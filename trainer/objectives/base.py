"""What every objective provides: a transformers model, a batch builder, and the counts that
throughput and MFU need. The loss is the model's own (transformers heads compute it).

Each objective also owns its settings: a dataclass (an ObjectiveSettings) beside its code, named
by the class attribute `settings_class`, whose fields users write under `model:`; the objective
reads them as `self.settings` (the config's `cfg.objective_settings`) and checks them in
`validate`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from transformers import PreTrainedModel

from darkmatter.trainer.config import Config, ConfigError, ObjectiveSettings


@runtime_checkable
class Masking(Protocol):
    """The settings of an objective that hides part of its input (one with default_mask_ratio)."""

    mask_ratio: float


class Objective(ABC):
    name: str
    modality: str  # "text" | "image": must match the dataset manifest
    # The settings dataclass of this objective (its `model:` keys beyond ModelConfig's); `settings`
    # is the config's instance of it, annotated with the subclass's own class in each subclass.
    settings_class: type[ObjectiveSettings] = ObjectiveSettings
    settings: ObjectiveSettings
    # Objectives that hide part of their input (their settings have `mask_ratio`): the share they
    # hide when model.mask_ratio is 0.
    default_mask_ratio: float | None = None
    # Floating-point model inputs that take the model's dtype under bf16 (pixels do; MAE's
    # masking noise stays fp32, since bf16 ties would change which patches are hidden).
    float_inputs: tuple[str, ...] = ()
    # Batch entries that stay on the host: figures for the log (see `counts`), never model inputs.
    host_keys: tuple[str, ...] = ()

    def __init__(self, cfg: Config, dataset_meta: dict[str, Any]):
        assert isinstance(cfg.objective_settings, self.settings_class), (
            f"objective {self.name} takes {self.settings_class.__name__}, "
            f"got {type(cfg.objective_settings).__name__}"
        )
        self.resolve_defaults(cfg)
        self.cfg = cfg
        self.settings = cfg.objective_settings
        self.meta = dataset_meta

    @classmethod
    def resolve_defaults(cls, cfg: Config) -> None:
        """Fill in what the config leaves to the objective (model.mask_ratio 0), so that every
        later reader, the logged parameters included, sees the value used."""
        s = cfg.objective_settings
        if cls.default_mask_ratio is not None:
            assert isinstance(s, Masking), f"{cls.name}: its settings have no mask_ratio"
            if s.mask_ratio == 0.0:
                s.mask_ratio = cls.default_mask_ratio

    @classmethod
    def validate(cls, cfg: Config) -> None:
        """Range checks of this objective's settings, and of the common sections as only it uses
        them; errors name the dotted key. Runs after resolve_defaults when a config is loaded
        (trainer.objectives.check_config); subclasses extend it."""
        s = cfg.objective_settings
        if cls.default_mask_ratio is None or not isinstance(s, Masking):
            return
        if not 0.0 < s.mask_ratio < 1.0:
            raise ConfigError(f"model.mask_ratio: expected in (0, 1), got {s.mask_ratio}")

    @abstractmethod
    def model_config(self) -> Any:
        """The transformers config of the full pretraining model."""

    @abstractmethod
    def build_model(self) -> PreTrainedModel:
        """The pretraining model, randomly initialized from model_config()."""

    @abstractmethod
    def make_batch(self, samples: list[dict[str, Any]], gen: torch.Generator) -> dict[str, Any]:
        """Model inputs for one micro-batch; all randomness (masking) comes from `gen`."""

    @abstractmethod
    def tokens(self, batch: dict[str, Any]) -> int:
        """Tokens (text) or patches (images) the encoder sees in this batch, for throughput."""

    @abstractmethod
    def flops(self, batch: dict[str, Any]) -> float:
        """Training FLOPs (forward and backward) of this micro-batch: what the model actually
        multiplies, by the formula in trainer.perf. Padding is not counted."""

    @abstractmethod
    def flops_inputs(self) -> dict[str, Any]:
        """The formula's inputs (logged as `mfu.*` params, so the figure can be checked)."""

    def counts(self, batch: dict[str, Any]) -> dict[str, float]:
        """Figures of this micro-batch, by the name they are logged under, that the log sums over
        its window and the ranks (text objectives with data.pack: documents: the tokens packed,
        the row slots and the tokens dropped). Read before to_device, which drops host_keys."""
        return {}

    def lr_scale(self, name: str) -> float:
        """The learning rate of parameter `name` as a multiple of train.lr. An objective whose
        model is initialized for an optimizer that scales each step to its weight's size
        (span: T5 for Adafactor) returns that size."""
        return 1.0  # most objectives: one learning rate for every parameter

    def prepare_engine(self, engine: Any) -> None:
        """Called once the DeepSpeed engine wraps the model, before a checkpoint is loaded into
        it (objectives with state DeepSpeed does not manage as it should adjust it here)."""
        return None  # most objectives' models are DeepSpeed's entirely

    def after_step(self, engine: Any, step: int) -> None:
        """Called after every optimizer step that was applied; `step` counts the steps taken,
        this one included (objectives with a momentum teacher update it here)."""
        return None  # most objectives have nothing outside the optimizer to update

    def to_device(self, batch: dict[str, Any], device: Any, bf16: bool) -> dict[str, Any]:
        """The batch on the model's device (a no-op on a CPU), copied asynchronously."""
        out = {}
        for k, v in batch.items():
            if k in self.host_keys:
                continue
            if torch.is_tensor(v):
                v = v.to(device, non_blocking=True)
                if bf16 and k in self.float_inputs:
                    v = v.to(torch.bfloat16)
            out[k] = v
        return out


class SampleFlops(Objective):
    """An objective whose every sample costs the same FLOPs (fixed-size images, clips): the
    batch's count is its size times `sample_flops()`."""

    @abstractmethod
    def sample_flops(self) -> float:
        """Training FLOPs of one sample: what its model computes."""

    def flops(self, batch: dict[str, Any]) -> float:
        return int(batch["pixel_values"].shape[0]) * self.sample_flops()


@dataclass
class ViTSettings(ObjectiveSettings):
    """What every objective on a ViT sets: the side of its patches."""

    patch_size: int = 4
    """ViT patch side in pixels."""


class ViTObjective(SampleFlops):
    """An objective on a ViT encoder over fixed-size images (or clips of them)."""

    settings_class = ViTSettings
    settings: ViTSettings

    @classmethod
    def validate(cls, cfg: Config) -> None:
        super().validate(cfg)
        s = cfg.objective_settings
        assert isinstance(s, ViTSettings)
        if s.patch_size < 1:
            raise ConfigError(f"model.patch_size: expected >= 1, got {s.patch_size}")
        if cfg.data.image_size % s.patch_size:
            raise ConfigError(
                f"data.image_size: {cfg.data.image_size} is not divisible by "
                f"model.patch_size={s.patch_size}"
            )

    def vit_kwargs(self) -> dict[str, Any]:
        """The ViT encoder's transformers config fields, from model.* and data.image_size; no
        dropout (the image objectives' augmentation or masking regularizes)."""
        m = self.cfg.model
        return {
            "image_size": self.cfg.data.image_size, "patch_size": self.settings.patch_size,
            "num_channels": 3, "hidden_size": m.hidden_size, "num_hidden_layers": m.num_layers,
            "num_attention_heads": m.num_heads, "intermediate_size": m.intermediate_size,
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        }  # fmt: skip

    def num_patches(self) -> int:
        """Patches per image."""
        return (self.cfg.data.image_size // self.settings.patch_size) ** 2


class TokenFlops(Objective):
    """An objective whose flops() and flops_inputs() are those of a text model whose every real token goes through the same
    multiplies (`matmul_params()`): PaLM's formula per row on its real tokens (the attention
    term counts the full T×T score matrix, as PaLM does, also for causal models)."""

    @abstractmethod
    def matmul_params(self) -> int:
        """Weights of the multiplies every real token goes through."""

    def sequence_lengths(self, batch: dict[str, Any]) -> list[int]:
        """Real tokens of each sequence whose tokens attend to one another: the rows'."""
        return [int(t) for t in batch["attention_mask"].sum(dim=1).tolist()]

    def flops(self, batch: dict[str, Any]) -> float:
        from darkmatter.trainer.perf import sequence_flops

        m = self.cfg.model
        n, q = self.matmul_params(), m.hidden_size // m.num_heads
        lengths = self.sequence_lengths(batch)
        return sum(sequence_flops(n, m.num_layers, m.num_heads, q, t) for t in lengths)

    def flops_inputs(self) -> dict[str, Any]:
        m = self.cfg.model
        return {
            "matmul_params": self.matmul_params(), "layers": m.num_layers,
            "heads": m.num_heads, "head_dim": m.hidden_size // m.num_heads,
            "seq_len": self.cfg.data.seq_len, "counted": "real tokens (padding excluded)",
        }  # fmt: skip
