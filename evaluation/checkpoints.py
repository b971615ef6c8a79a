"""What the harness evaluates, as a transformers encoder (pretrained, or its random-init twin).

A committed checkpoint is read through the trainer's checkpoint-reading API
(darkmatter.trainer.checkpoint_reader: locate, fetch, consolidate, build the encoder); nothing
else of the trainer is imported. An export folder (`darkmatter export`, or any `save_pretrained`
encoder with its tokenizer or image processor) is loaded with `from_pretrained` (T5's encoder
with `T5EncoderModel`, `checkpoint_reader.encoder_class`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PreTrainedModel

import darkmatter.trainer.checkpoint_reader as reader
from darkmatter.trainer.checkpoint_reader import CheckpointRef

# Tests and scripts import these from here.
from darkmatter.trainer.checkpoint_reader import consolidated_state_dict as consolidated_state_dict
from darkmatter.trainer.checkpoint_reader import resolve as resolve

# What an export without darkmatter.json reads, by its config's model_type (else: images).
MODEL_TYPE_MODALITY = {"bert": "text", "gpt2": "text", "t5": "text", "roberta": "text",
                       "wav2vec2": "audio", "videomae": "video"}  # fmt: skip


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
        and not (p / reader.COMMIT).exists()
        and any((p / w).is_file() for w in ("model.safetensors", "pytorch_model.bin"))
    )


def encoder_config(ref: EncoderRef) -> Any:
    """The encoder's transformers config, pretraining-only masking off."""
    return reader.encoder_config(ref.config_file)


def from_pretrained(path: str | Path) -> PreTrainedModel:
    """An encoder folder written by `save_pretrained` (an export), with its encoder class."""
    config = AutoConfig.from_pretrained(str(path))
    model: PreTrainedModel = reader.encoder_class(config).from_pretrained(str(path))
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
    if not pretrained:
        return reader.build_encoder(encoder_config(ref)).eval()
    assert isinstance(ref, CheckpointRef)
    return reader.encoder(ref, state_dict)
