"""Find a committed checkpoint (or an export) and turn it into a transformers encoder.

The harness never imports the trainer's engine: ZeRO shards are consolidated with DeepSpeed's own
`zero_to_fp32` tool, the encoder is built from the `model_config.json` the trainer saved beside
them with `AutoModel.from_config`, and the pretraining head is dropped. An export folder
(`darkmatter export`, or any `save_pretrained` encoder with its tokenizer or image processor) is
loaded with `AutoModel.from_pretrained`. T5 (the `span` objective) is the exception: AutoModel
builds its whole encoder-decoder, so its encoder is a `T5EncoderModel` (`encoder_class`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModel, PreTrainedModel, T5EncoderModel

from darkmatter import storage
from darkmatter.trainer import checkpoint as ckpt  # the checkpoint format only; never the engine

# Where each objective's pretraining model keeps its encoder (the transformers attribute name).
ENCODER_PREFIX = {
    "mlm": "bert.",
    "mae": "vit.",
    "clm": "transformer.",  # GPT2LMHeadModel -> GPT2Model
    "simclr": "vit.",  # SimCLRModel -> ViTModel (the projection head is dropped)
    "moco": "vit.",  # the online encoder; the heads and the momentum teacher are dropped
    "byol": "vit.",
    "wav2vec2": "wav2vec2.",  # Wav2Vec2ForPreTraining -> Wav2Vec2Model (quantizer dropped)
    "video": "videomae.",  # VideoMAEForPreTraining -> VideoMAEModel (the decoder is dropped)
    "span": "",  # T5ForConditionalGeneration -> T5EncoderModel keeps the names "shared.", "encoder."
}
# What an export without darkmatter.json reads, by its config's model_type (else: images).
MODEL_TYPE_MODALITY = {"bert": "text", "gpt2": "text", "t5": "text", "roberta": "text",
                       "wav2vec2": "audio", "videomae": "video"}  # fmt: skip
# Weights of a pretraining model that are not its encoder's although they carry its prefix.
NOT_ENCODER = {"span": ("decoder.", "lm_head.")}


@dataclass
class CheckpointRef:
    root: Path  # the checkpoints folder
    tag: str  # e.g. step00000050

    @property
    def path(self) -> Path:
        return self.root / self.tag

    @property
    def meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = json.loads((self.path / "darkmatter.json").read_text())
        return meta

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def config_file(self) -> Path:
        return self.path / "model_config.json"

    @property
    def modality(self) -> str:
        """text, image, audio or video: what the encoder reads."""
        if "modality" in self.meta:
            return str(self.meta["modality"])
        from darkmatter.trainer.objectives import OBJECTIVES  # checkpoints from before the field

        return OBJECTIVES[self.meta["objective"]].modality


@dataclass
class ExportRef:
    """A `save_pretrained` encoder folder. `darkmatter export` writes `darkmatter.json` beside
    the weights (objective, step, run, checkpoint tag); without it the step is 0."""

    path: Path

    @property
    def meta(self) -> dict[str, Any]:
        f = self.path / "darkmatter.json"
        if f.is_file():
            meta: dict[str, Any] = json.loads(f.read_text())
            return meta
        return {"objective": "unknown", "step": 0}

    @property
    def root(self) -> Path:
        return self.path.parent

    @property
    def tag(self) -> str:
        return str(self.meta.get("tag", "export"))

    @property
    def step(self) -> int:
        return int(self.meta.get("step", 0))

    @property
    def config_file(self) -> Path:
        return self.path / "config.json"

    @property
    def modality(self) -> str:
        """From `darkmatter export`'s record, else from what the folder holds."""
        if "modality" in self.meta:
            return str(self.meta["modality"])
        if (self.path / "tokenizer.json").is_file():
            return "text"
        model_type = json.loads(self.config_file.read_text()).get("model_type", "")
        return MODEL_TYPE_MODALITY.get(model_type, "image")


EncoderRef = CheckpointRef | ExportRef


def is_export(target: str) -> bool:
    """A local folder with a transformers config and weights, and no commit record."""
    p = Path(target)
    return (
        (p / "config.json").is_file()
        and not (p / ckpt.COMMIT).exists()
        and any((p / w).is_file() for w in ("model.safetensors", "pytorch_model.bin"))
    )


def resolve(target: str, cache_dir: str = "") -> CheckpointRef:
    """A run folder, a checkpoint root (local or s3://…) or one step folder -> the checkpoint to
    use: the newest committed one, with every file checked against its commit record. A remote
    checkpoint is downloaded to `cache_dir` (default: a per-user folder in the temp folder)."""
    target = target.rstrip("/")
    if storage.exists(storage.join(target, ckpt.COMMIT)):
        root, tag = target.rsplit("/", 1) if "/" in target else (".", target)
    else:
        for root in (storage.join(target, "checkpoints"), target):
            tags = ckpt.committed_tags(root)
            if tags:
                tag = tags[-1]
                break
        else:
            raise FileNotFoundError(
                f"{target}: no committed checkpoint (no step folder with {ckpt.COMMIT})"
            )
    cache = Path(cache_dir or Path(tempfile.gettempdir()) / f"darkmatter-checkpoints-{os.getuid()}")
    local = ckpt.fetch(
        root, tag, cache / hashlib.sha256(root.encode()).hexdigest()[:16], rank=0, everything=True
    )
    return CheckpointRef(local, tag)


def consolidated_state_dict(ref: CheckpointRef) -> dict[str, torch.Tensor]:
    """Full fp32 weights of the pretraining model, whatever the ZeRO stage it was trained with."""
    if int(ref.meta.get("zero_stage", 0)) == 0:
        # Without ZeRO, DeepSpeed keeps the whole module in one file (with non-tensor metadata).
        blob = torch.load(
            ref.path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True
        )
        return {k: v.float() for k, v in blob["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(str(ref.root), tag=ref.tag)
    return dict(sd)


def encoder_config(ref: EncoderRef) -> Any:
    cfg = AutoConfig.from_pretrained(str(ref.config_file))
    if hasattr(cfg, "mask_ratio"):
        cfg.mask_ratio = 0.0  # features come from every patch; masking is for pretraining only
    if getattr(cfg, "apply_spec_augment", False):
        # wav2vec2 masks spans of frames in training mode, from numpy's global RNG: fine-tuning
        # would neither see every frame nor give the same numbers twice.
        cfg.apply_spec_augment = False
    return cfg


def _init_vit_mae_embeddings(encoder: Any) -> None:
    """The fixed sin-cos position embeddings a random-init ViT-MAE encoder must have.

    transformers 5.x leaves them at zero when building from a config (the embeddings' own
    `initialize_weights()` is skipped); the baseline must be the architecture as trained, so it
    gets them as the trainer's model does. Pretrained weights overwrite them with equal values.
    """
    emb = encoder.embeddings
    emb.patch_embeddings.projection.__dict__.pop("_is_hf_initialized", None)
    emb.initialize_weights()


def encoder_class(config: Any) -> Any:
    """The transformers class of the encoder for a (pretraining or encoder) config: AutoModel's,
    but T5EncoderModel for T5, whose AutoModel (T5Model) is the encoder-decoder and needs decoder
    inputs. An exported T5 encoder loads with `T5EncoderModel.from_pretrained`."""
    return T5EncoderModel if config.model_type == "t5" else AutoModel


def from_pretrained(path: str | Path) -> PreTrainedModel:
    """An encoder folder written by `save_pretrained` (an export), with its encoder class."""
    model: PreTrainedModel = encoder_class(AutoConfig.from_pretrained(str(path))).from_pretrained(
        str(path)
    )
    return model


def load_encoder(
    ref: EncoderRef, pretrained: bool = True, seed: int = 0,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> PreTrainedModel:  # fmt: skip
    """The checkpoint's encoder (pretrained=True) or the same architecture freshly initialized;
    `state_dict`: the checkpoint's consolidated weights, when the caller has them already."""
    torch.manual_seed(seed)
    if pretrained and isinstance(ref, ExportRef):
        export = from_pretrained(ref.path)
        if hasattr(export.config, "mask_ratio"):
            export.config.mask_ratio = 0.0
        if getattr(export.config, "apply_spec_augment", False):
            export.config.apply_spec_augment = False
        return export.eval()
    config = encoder_config(ref)
    cls = encoder_class(config)
    model = cls(config) if cls is not AutoModel else AutoModel.from_config(config)
    if model.config.model_type == "vit_mae":
        _init_vit_mae_embeddings(model)
    if pretrained:
        assert isinstance(ref, CheckpointRef)
        prefix = ENCODER_PREFIX[ref.meta["objective"]]
        dropped = NOT_ENCODER.get(ref.meta["objective"], ())
        sd = {
            k[len(prefix) :]: v
            for k, v in (state_dict or consolidated_state_dict(ref)).items()
            if k.startswith(prefix) and not k[len(prefix) :].startswith(dropped)
        }
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.startswith("pooler.")]  # the MLM model has no pooler
        if missing or unexpected:
            raise ValueError(
                f"{ref.path}: weights do not fit the encoder: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
    return model.eval()
