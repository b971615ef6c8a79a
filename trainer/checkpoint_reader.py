"""Reading a committed checkpoint from outside the trainer: the one API the evaluation harness
and `darkmatter export` use (they import nothing else of the trainer but its config). Four steps:

1. locate: a run folder, a checkpoint root (local or s3://…) or one step folder -> the root, the
   tag of the newest committed checkpoint and its commit record (`locate`).
2. fetch: the files the next steps read (the two records and the weights; not the RNG and
   trainer states only a resume needs), downloaded from a remote root into a cache folder and
   verified against the commit record, size and sha256 (`fetch`; `resolve` = locate + fetch).
3. consolidate: the pretraining model's full fp32 state dict, whatever the ZeRO stage it was
   trained with (`consolidated_state_dict`: DeepSpeed's own `zero_to_fp32` under ZeRO).
4. model: the encoder, built with transformers from the `model_config.json` the trainer saved
   (`AutoModel.from_config`; T5's `T5EncoderModel`) and given the encoder's part of the weights
   (`encoder`, or `build_encoder` for the same architecture freshly initialized); the rest of
   the pretraining model, its heads, is what `save_heads` writes beside an export.

The engine is never imported: nothing here needs DeepSpeed's runtime or a process group.
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
from darkmatter.trainer import checkpoint as ckpt
from darkmatter.trainer.checkpoint import COMMIT, CheckpointError
from darkmatter.trainer.init_from import HEADS_FILE

__all__ = [
    "COMMIT", "ENCODER_PREFIX", "HEADS_FILE", "NOT_ENCODER", "CheckpointError", "CheckpointRef",
    "Location", "build_encoder", "consolidated_state_dict", "encoder", "encoder_class",
    "encoder_config", "encoder_weights", "fetch", "locate", "resolve", "save_heads",
]  # fmt: skip

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
# Weights of a pretraining model that are not its encoder's although they carry its prefix.
NOT_ENCODER = {"span": ("decoder.", "lm_head.")}
# What the model is (objective, ZeRO stage, data settings; its transformers config): fetched
# first, since which weight files consolidation reads depends on the ZeRO stage.
RECORDS = ("darkmatter.json", "model_config.json")
ZERO0_WEIGHTS = "mp_rank_00_model_states.pt"  # without ZeRO, DeepSpeed's whole module


@dataclass
class CheckpointRef:
    """A fetched checkpoint: `root`/`tag` is a local folder holding its verified files."""

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


# -- 1. locate -------------------------------------------------------------------------------


@dataclass
class Location:
    """A committed checkpoint where it is kept (not fetched yet)."""

    root: str  # the checkpoints folder or URL
    tag: str
    record: dict[str, Any]  # its commit record: every file with its size and sha256


def locate(target: str) -> Location:
    """A run folder, a checkpoint root (local or s3://…) or one step folder -> the checkpoint to
    use: that step, else the newest committed one. FileNotFoundError when there is none;
    CheckpointError (CorruptCheckpoint) when its commit record is missing (garbled)."""
    target = target.rstrip("/")
    if storage.exists(storage.join(target, COMMIT)):
        root, tag = target.rsplit("/", 1) if "/" in target else (".", target)
    else:
        for root in (storage.join(target, "checkpoints"), target):
            tags = ckpt.committed_tags(root)
            if tags:
                tag = tags[-1]
                break
        else:
            raise FileNotFoundError(
                f"{target}: no committed checkpoint (no step folder with {COMMIT})"
            )
    return Location(root, tag, ckpt.read_commit(root, tag))


# -- 2. fetch --------------------------------------------------------------------------------


def fetch(loc: Location, cache_dir: str = "") -> CheckpointRef:
    """The files of `loc` that the records and the weights need, present and verified against
    its commit record (CorruptCheckpoint naming the file otherwise). A remote checkpoint is
    downloaded to `cache_dir` (default: a per-user folder in the temp folder); a local one is
    read in place."""
    cache = Path(cache_dir or Path(tempfile.gettempdir()) / f"darkmatter-checkpoints-{os.getuid()}")
    dest = cache / hashlib.sha256(loc.root.encode()).hexdigest()[:16]
    files = loc.record["files"]
    local = ckpt.fetch(loc.root, loc.tag, dest, record=loc.record,
                       names=[n for n in RECORDS if n in files])  # fmt: skip
    ref = CheckpointRef(local, loc.tag)
    ckpt.fetch(loc.root, loc.tag, dest, record=loc.record,
               names=weight_files(files, int(ref.meta.get("zero_stage", 0))))  # fmt: skip
    return ref


def weight_files(files: dict[str, Any], zero_stage: int) -> list[str]:
    """What consolidation reads: without ZeRO, DeepSpeed's module file; under ZeRO, every rank's
    model and optimizer states (zero_to_fp32 takes the fp32 master weights from the latter)."""
    if zero_stage == 0:
        return [n for n in files if n == ZERO0_WEIGHTS]
    return sorted(n for n in files if n.endswith(("_model_states.pt", "_optim_states.pt")))


def resolve(target: str, cache_dir: str = "") -> CheckpointRef:
    """locate, then fetch: the checkpoint `target` names, ready to consolidate."""
    return fetch(locate(target), cache_dir)


# -- 3. consolidate --------------------------------------------------------------------------


def consolidated_state_dict(ref: CheckpointRef) -> dict[str, torch.Tensor]:
    """Full fp32 weights of the pretraining model, whatever the ZeRO stage it was trained with."""
    if int(ref.meta.get("zero_stage", 0)) == 0:
        # Without ZeRO, DeepSpeed keeps the whole module in one file (with non-tensor metadata).
        blob = torch.load(ref.path / ZERO0_WEIGHTS, map_location="cpu", weights_only=True)
        return {k: v.float() for k, v in blob["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(str(ref.root), tag=ref.tag)
    return dict(sd)


# -- 4. model --------------------------------------------------------------------------------


def encoder_config(config_file: str | Path) -> Any:
    """The transformers config of an encoder (a checkpoint's model_config.json or an export's
    config.json) with the pretraining-only input masking off."""
    cfg = AutoConfig.from_pretrained(str(config_file))
    if hasattr(cfg, "mask_ratio"):
        cfg.mask_ratio = 0.0  # features come from every patch; masking is for pretraining only
    if getattr(cfg, "apply_spec_augment", False):
        # wav2vec2 masks spans of frames in training mode, from numpy's global RNG: fine-tuning
        # would neither see every frame nor give the same numbers twice.
        cfg.apply_spec_augment = False
    return cfg


def encoder_class(config: Any) -> Any:
    """The transformers class of the encoder for a (pretraining or encoder) config: AutoModel's,
    but T5EncoderModel for T5, whose AutoModel (T5Model) is the encoder-decoder and needs decoder
    inputs. An exported T5 encoder loads with `T5EncoderModel.from_pretrained`."""
    return T5EncoderModel if config.model_type == "t5" else AutoModel


def _init_vit_mae_embeddings(encoder: Any) -> None:
    """The fixed sin-cos position embeddings a random-init ViT-MAE encoder must have.

    transformers 5.x leaves them at zero when building from a config (the embeddings' own
    `initialize_weights()` is skipped); the baseline must be the architecture as trained, so it
    gets them as the trainer's model does. Pretrained weights overwrite them with equal values.
    """
    emb = encoder.embeddings
    emb.patch_embeddings.projection.__dict__.pop("_is_hf_initialized", None)
    emb.initialize_weights()


def build_encoder(config: Any) -> PreTrainedModel:
    """The encoder's architecture, freshly initialized (from torch's global RNG)."""
    cls = encoder_class(config)
    model: PreTrainedModel = cls(config) if cls is not AutoModel else AutoModel.from_config(config)
    if model.config.model_type == "vit_mae":
        _init_vit_mae_embeddings(model)
    return model


def encoder_weights(
    ref: CheckpointRef, weights: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The encoder's part of the pretraining model's weights, under the encoder's own names."""
    prefix = ENCODER_PREFIX[ref.meta["objective"]]
    dropped = NOT_ENCODER.get(ref.meta["objective"], ())
    return {
        k[len(prefix) :]: v
        for k, v in weights.items()
        if k.startswith(prefix) and not k[len(prefix) :].startswith(dropped)
    }


def encoder(
    ref: CheckpointRef, state_dict: dict[str, torch.Tensor] | None = None
) -> PreTrainedModel:
    """The checkpoint's encoder with its weights, in eval mode; `state_dict`: the checkpoint's
    consolidated weights, when the caller has them already (else they are consolidated here)."""
    model = build_encoder(encoder_config(ref.config_file))
    sd = encoder_weights(ref, state_dict or consolidated_state_dict(ref))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("pooler.")]  # the MLM model has no pooler
    if missing or unexpected:
        raise ValueError(
            f"{ref.path}: weights do not fit the encoder: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return model.eval()


def save_heads(
    ref: CheckpointRef, encoder: Any, weights: dict[str, Any], out: Path
) -> None:  # fmt: skip
    """The rest of the pretraining model (its heads, decoder, momentum teacher, quantizer), under
    its own names, in HEADS_FILE: what `model.init_from` needs, beside the encoder, to continue
    pretraining exactly where the checkpoint stopped. A tensor tied to one already saved (an
    output layer tied to the embeddings) is left out; loading it loads its twin."""
    from safetensors.torch import save_file

    prefix = ENCODER_PREFIX[ref.meta["objective"]]
    in_encoder = {prefix + k for k in encoder.state_dict()}
    seen = {weights[k].data_ptr() for k in in_encoder if k in weights}
    heads = {}
    for k, v in weights.items():
        if k not in in_encoder and v.data_ptr() not in seen:
            heads[k] = v.contiguous()
            seen.add(v.data_ptr())
    save_file(heads, str(out / HEADS_FILE), metadata={"format": "pt"})
