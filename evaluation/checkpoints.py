"""What the harness evaluates, as a transformers encoder (pretrained, or its random-init twin).

A committed checkpoint is read through the trainer's checkpoint-reading API
(darkmatter.trainer.checkpoint_reader: locate, fetch, consolidate, build the encoder); nothing
else of the trainer is imported. Its weights are read once (`evaluation_weights`): the module's
own, without optimizer states, kept as one safetensors file in the cache, keyed by the digest of
the checkpoint's commit record, which every task, protocol and later evaluation reuses.

An export folder (`darkmatter export`, or any `save_pretrained` encoder with its tokenizer or
image processor) is loaded with `from_pretrained` (T5's encoder
with `T5EncoderModel`, `checkpoint_reader.encoder_class`; BERT and ViT without the pooler that
AutoModel would add untrained), once it is known complete (`ExportRef` refuses a folder that
lacks a file its record lists).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import AutoConfig, PreTrainedModel

import darkmatter.trainer.checkpoint_reader as reader
from darkmatter import storage
from darkmatter.trainer.checkpoint_reader import CheckpointRef

# Tests and scripts import these from here.
from darkmatter.trainer.checkpoint_reader import consolidated_state_dict as consolidated_state_dict
from darkmatter.trainer.checkpoint_reader import resolve as resolve

log = logging.getLogger("darkmatter.evaluation")


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
    state_dict: dict[str, torch.Tensor] | None = None, share: bool = False,
) -> PreTrainedModel:  # fmt: skip
    """The checkpoint's encoder (pretrained=True) or the same architecture freshly initialized;
    `state_dict`: the checkpoint's consolidated weights, when the caller has them already;
    `share`: the encoder holds state_dict's tensors, not copies (for a frozen encoder)."""
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
    return reader.encoder(ref, state_dict, share=share)


WEIGHTS_CACHE = "weights"  # in the cache folder: <commit digest>.safetensors
ALIASES = "aliases"  # the safetensors metadata key: {name: the name of the tensor it shares}


def commit_digest(loc: reader.Location) -> str:
    """The checkpoint's identity: the sha256 of its commit record (every file's size and
    sha256), so a rewritten checkpoint under the same tag is another one."""
    return hashlib.sha256(json.dumps(loc.record, sort_keys=True).encode()).hexdigest()


class WeightsStore(Protocol):
    """A second home for the weights cache files, shared beyond one machine's cache folder
    (the training run's MLflow artifacts: harness.RunArtifacts)."""

    def fetch(self, name: str, dest: Path) -> bool:
        """Put the stored file `name` at `dest`; False when it has none."""

    def publish(self, path: Path) -> None:
        """Store the file at `path` under its name (a failure is logged, not raised)."""


def evaluation_weights(
    loc: reader.Location, ref: CheckpointRef, cache_dir: str = "",
    store: WeightsStore | None = None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """The checkpoint's module weights (checkpoint_reader.module_state_dict), read once: the
    first call fetches the module files (no optimizer state under ZeRO 0-2), writes the weights
    to CACHE/weights/<commit digest>.safetensors (atomically) and removes the downloaded files;
    every later call, from any task file or harness sharing the cache, reads that file and
    fetches nothing. `ref`: the checkpoint's records, fetched (reader.fetch, weights="none").
    `store`: where another machine's harness may have put that file already (it is taken from
    there before any checkpoint file is fetched), and where a file made here is published."""
    folder = reader.cache_folder(loc, cache_dir) / WEIGHTS_CACHE
    path = folder / f"{commit_digest(loc)}.safetensors"
    if path.is_file():
        return _cached(path)
    if store is not None:
        folder.mkdir(parents=True, exist_ok=True)
        if store.fetch(path.name, path):
            try:
                return _cached(path)
            except Exception as e:  # noqa: BLE001  (torn or foreign: made again from the checkpoint)
                log.warning("%s from the weights store is unreadable (%s): reading the "
                            "checkpoint instead", path.name, e)  # fmt: skip
                path.unlink(missing_ok=True)
    weights = _consolidate_to(path, loc, ref, cache_dir)
    if store is not None:
        store.publish(path)
    return weights


def forget_weights(loc: reader.Location, ref: CheckpointRef, cache_dir: str = "") -> None:
    """Remove what evaluation_weights and reader.fetch cached of `loc` (its weights file; for a
    remote root, its downloaded records too): a watching harness does this once a checkpoint is
    evaluated, since it evaluates each once, so its cache holds one checkpoint's weights at a
    time rather than every checkpoint's of every run it watches."""
    import shutil

    path = reader.cache_folder(loc, cache_dir) / WEIGHTS_CACHE / f"{commit_digest(loc)}.safetensors"
    path.unlink(missing_ok=True)
    if storage.is_remote(loc.root):
        shutil.rmtree(ref.path, ignore_errors=True)


def _cached(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        recorded = json.loads((f.metadata() or {}).get(ALIASES, "{}"))
    weights = load_file(str(path))
    weights.update({alias: weights[name] for alias, name in recorded.items()})
    return weights


def _consolidate_to(
    path: Path, loc: reader.Location, ref: CheckpointRef, cache_dir: str
) -> dict[str, torch.Tensor]:  # fmt: skip
    from safetensors.torch import save_file

    folder = path.parent
    reader.fetch(loc, cache_dir, weights="module")
    weights = reader.module_state_dict(ref)
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[tuple[int, torch.Size, tuple[int, ...]], str] = {}
    for name, tensor in weights.items():  # tied weights once, the others as aliases
        key = (tensor.data_ptr(), tensor.shape, tensor.stride())
        if key in first:
            aliases[name] = first[key]
        else:
            first[key], unique[name] = name, tensor.contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    save_file(unique, str(tmp), metadata={ALIASES: json.dumps(aliases)})
    os.replace(tmp, path)
    if storage.is_remote(loc.root):  # the downloaded module files: the cache file replaces them
        for name in reader.module_files(loc.record["files"], int(ref.meta.get("zero_stage", 0))):
            (ref.path / name).unlink(missing_ok=True)
    return weights
