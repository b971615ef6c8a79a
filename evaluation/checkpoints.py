"""Find a committed checkpoint and turn it into a transformers encoder.

The harness never imports the trainer's engine: ZeRO shards are consolidated with DeepSpeed's own
`zero_to_fp32` tool, the encoder is built from the `model_config.json` the trainer saved beside
them with `AutoModel.from_config`, and the pretraining head is dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModel, PreTrainedModel

# Where each objective's pretraining model keeps its encoder (the transformers attribute name).
ENCODER_PREFIX = {"mlm": "bert.", "mae": "vit."}


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


def resolve(target: str) -> CheckpointRef:
    """A run folder, a checkpoints folder, or one checkpoint folder -> the checkpoint to use."""
    p = Path(target)
    if (p / "darkmatter.json").is_file():
        return CheckpointRef(p.parent, p.name)
    for root in (p / "checkpoints", p):
        latest = root / "latest"
        if latest.is_file():
            tag = latest.read_text().strip()
            if (root / tag / "darkmatter.json").is_file():
                return CheckpointRef(root, tag)
            raise ValueError(f"{latest}: names {tag!r}, which is not a complete checkpoint")
    raise FileNotFoundError(f"{target}: no committed checkpoint (no 'latest' or darkmatter.json)")


def consolidated_state_dict(ref: CheckpointRef) -> dict[str, torch.Tensor]:
    """Full fp32 weights of the pretraining model, whatever the ZeRO stage it was trained with."""
    if int(ref.meta.get("zero_stage", 0)) == 0:
        # Without ZeRO, DeepSpeed keeps the whole module in one file (with non-tensor metadata).
        blob = torch.load(
            ref.path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
        )
        return {k: v.float() for k, v in blob["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(str(ref.root), tag=ref.tag)
    return dict(sd)


def encoder_config(ref: CheckpointRef) -> Any:
    cfg = AutoConfig.from_pretrained(str(ref.path / "model_config.json"))
    if hasattr(cfg, "mask_ratio"):
        cfg.mask_ratio = 0.0  # features come from every patch; masking is for pretraining only
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


def load_encoder(ref: CheckpointRef, pretrained: bool = True, seed: int = 0) -> PreTrainedModel:
    """The checkpoint's encoder (pretrained=True) or the same architecture freshly initialized."""
    torch.manual_seed(seed)
    model = AutoModel.from_config(encoder_config(ref))
    if ref.meta["objective"] == "mae":
        _init_vit_mae_embeddings(model)
    if pretrained:
        prefix = ENCODER_PREFIX[ref.meta["objective"]]
        sd = {
            k[len(prefix) :]: v
            for k, v in consolidated_state_dict(ref).items()
            if k.startswith(prefix)
        }
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.startswith("pooler.")]  # the MLM model has no pooler
        if missing or unexpected:
            raise ValueError(
                f"{ref.path}: weights do not fit the encoder: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
    return model.eval()
