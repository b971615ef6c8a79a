"""What the harness evaluates, as a transformers encoder (pretrained, or its random-init twin).

A committed checkpoint is read through the trainer's checkpoint-reading API
(darkmatter.trainer.checkpoint_reader: locate, fetch, consolidate, build the encoder); nothing
else of the trainer is imported. An export folder (`darkmatter export`, or any `save_pretrained`
encoder with its tokenizer or image processor) is loaded with `from_pretrained` (T5's encoder
with `T5EncoderModel`, `checkpoint_reader.encoder_class`; BERT and ViT without the pooler that
AutoModel would add untrained), once it is known complete (`ExportRef` refuses a folder that
lacks a file its record lists).
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


@dataclass
class ExportRef:
    """A `save_pretrained` encoder folder. `darkmatter export` writes `darkmatter.json` beside
    the weights (objective, step, run, checkpoint tag); without it the step is 0."""

    path: Path

    def __post_init__(self) -> None:
        missing = reader.missing_export_files(self.path)
        if missing:
            raise ValueError(f"{self.path}: incomplete export: {missing[0]} is missing "
                             "(export it again)")  # fmt: skip

    @staticmethod
    def read_record(folder: Path) -> dict[str, Any]:
        """The export's record (darkmatter.json), {} when there is none or it is no JSON object."""
        try:
            record = json.loads((folder / reader.EXPORT_RECORD).read_text())
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    @property
    def meta(self) -> dict[str, Any]:
        return self.read_record(self.path) or {"objective": "unknown", "step": 0}

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
        return reader.MODEL_TYPE_MODALITY.get(model_type, "image")


EncoderRef = CheckpointRef | ExportRef


def is_export(target: str) -> bool:
    """A local folder with a transformers config or an export's record, and no commit record
    (an incomplete export counts: ExportRef refuses it, naming what it lacks)."""
    p = Path(target)
    if (p / reader.COMMIT).exists():
        return False
    return (p / "config.json").is_file() or "export_files" in ExportRef.read_record(p)


def encoder_config(ref: EncoderRef) -> Any:
    """The encoder's transformers config, pretraining-only masking off."""
    return reader.encoder_config(ref.config_file)


def from_pretrained(path: str | Path) -> PreTrainedModel:
    """An encoder folder written by `save_pretrained` (an export), with its encoder class."""
    config = AutoConfig.from_pretrained(str(path))
    kwargs = reader.pooler_kwargs(config, _weight_names(Path(path)))
    model: PreTrainedModel = reader.encoder_class(config).from_pretrained(str(path), **kwargs)
    return model


def _weight_names(folder: Path) -> list[str]:
    """The tensor names of a save_pretrained folder's safetensors weights (sharded or not);
    ["pooler."] for other formats, whose pooler is then loaded as transformers would."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return list(json.loads(index.read_text())["weight_map"])
    if not (folder / "model.safetensors").is_file():
        return ["pooler."]
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return list(f.keys())


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
