"""Reading a committed checkpoint from outside the trainer: the one API the evaluation harness
and `darkmatter export` use (they import nothing else of the trainer but its config). Steps:

1. locate: a run folder (its checkpoints/, else the checkpoint.root it records in ROOT_RECORD),
   a checkpoint root (local or s3://…) or one step folder -> the root, the tag of the newest
   committed checkpoint and its commit record (`locate`).
2. fetch: the files the next steps read (the two records, the input files and the weights; not
   the RNG and trainer states only a resume needs), downloaded from a remote root into a cache
   folder and verified against the commit record, size and sha256 (`fetch`; `resolve` = locate
   + fetch).
3. consolidate: the pretraining model's full fp32 state dict, whatever the ZeRO stage it was
   trained with (`consolidated_state_dict`: DeepSpeed's own `zero_to_fp32` under ZeRO, from
   the fp32 masters, for an export); or the module's own weights, which under ZeRO 0-2 are in
   DeepSpeed's module file alone (`module_state_dict`, what an evaluation reads: `fetch` with
   weights="module" downloads no optimizer state).
4. model: the encoder, built with transformers from the `model_config.json` the trainer saved
   (`AutoModel.from_config`; T5's `T5EncoderModel`) and given the encoder's part of the weights
   (`encoder`, or `build_encoder` for the same architecture freshly initialized); the rest of
   the pretraining model, its heads, is what `save_heads` writes beside an export. BERT's and
   ViT's pooler, which no objective here trains, is left out (`pooler_kwargs`).
5. inputs: a checkpoint is self-contained. Beside the weights it carries what its encoder's
   inputs are made with (ASSETS: the dataset's tokenizer.json; the image processor's or feature
   extractor's preprocessor_config.json), so export and evaluation never need the dataset's
   storage (`CheckpointRef.asset`, `tokenizer_url`; older checkpoints fall back to the dataset's
   URL, `preprocessor` rebuilds the settings).
6. exports: what a loader checks first (`missing_export_files`).

No code from checkpoint data: every file is unpickled with weights_only=True, DeepSpeed's own
loaders included (`weights_only_loads`, `load_tensors`; its converter's process gets
`weights_only_env`), with an explicit allow-list of DeepSpeed's inert records. A file that needs
more is refused before anything in it runs: UnsafeCheckpoint, naming it.

The engine is never imported: nothing here needs DeepSpeed's runtime or a process group.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModel, PreTrainedModel, T5EncoderModel

from darkmatter import storage
from darkmatter.trainer import checkpoint as ckpt
from darkmatter.trainer.checkpoint import COMMIT, CheckpointError

__all__ = [
    "ASSETS", "COMMIT", "ENCODER_PREFIX", "EXPORT_RECORD", "HEADS_FILE", "MODEL_TYPE_MODALITY",
    "NOT_ENCODER", "PREPROCESSOR_FILE", "ROOT_RECORD", "TOKENIZER_FILE", "CheckpointError",
    "CheckpointRef", "Location", "UnsafeCheckpoint", "allow_deepspeed_records", "build_encoder",
    "cache_folder", "consolidated_state_dict", "encoder", "encoder_class", "encoder_config",
    "encoder_weights", "fetch", "load_tensors", "locate", "missing_export_files",
    "module_files", "module_state_dict", "pooler_kwargs", "preprocessor", "refused_file",
    "resolve", "run_root", "save_heads", "unsafe", "weights_only_env", "weights_only_loads",
]  # fmt: skip

# An export's weights besides the encoder's (what `model.init_from` continues from).
HEADS_FILE = "pretraining_heads.safetensors"
# Where each objective's pretraining model keeps its encoder (the transformers attribute name).
ENCODER_PREFIX = {
    "mlm": "bert.",
    "mae": "vit.",
    "clm": "transformer.",  # GPT2LMHeadModel -> GPT2Model
    "simclr": "vit.",  # SimCLRModel -> ViTModel (the projection head is dropped)
    "moco": "vit.",  # the online encoder; the heads and the momentum teacher are dropped
    "byol": "vit.",
    "dino": "teacher.vit.",  # DINO evaluates the teacher (an EMA of the student's ViT)
    "wav2vec2": "wav2vec2.",  # Wav2Vec2ForPreTraining -> Wav2Vec2Model (quantizer dropped)
    "video": "videomae.",  # VideoMAEForPreTraining -> VideoMAEModel (the decoder is dropped)
    "span": "",  # T5ForConditionalGeneration -> T5EncoderModel keeps the names "shared.", "encoder."
    "video_future": "teacher.videomae.",  # latent targets: the EMA target encoder (V-JEPA's)
    "ijepa": "teacher.vit.",  # I-JEPA evaluates the target encoder (an EMA of the context's)
}
# Where the encoder is when the weights hold nothing under ENCODER_PREFIX: video_future with
# pixel targets builds no target encoder, so its context encoder is the one taken.
ENCODER_FALLBACK = {"video_future": "videomae."}
# Weights of a pretraining model that are not its encoder's although they carry its prefix.
NOT_ENCODER = {"span": ("decoder.", "lm_head."), "dino": ("embeddings.mask_token",)}  # iBOT's
# What the model is (objective, ZeRO stage, data settings; its transformers config): fetched
# first, since which weight files consolidation reads depends on the ZeRO stage.
RECORDS = ("darkmatter.json", "model_config.json")
ZERO0_WEIGHTS = "mp_rank_00_model_states.pt"  # without ZeRO, DeepSpeed's whole module
# Under ZeRO-3 (checkpoint.module_weights), the module's state dict gathered from every rank at
# the save: what an evaluation reads instead of every rank's optimizer states.
MODULE_WEIGHTS = "module_weights.pt"
# What a checkpoint carries to make its encoder's inputs (rank 0 writes them at every save;
# darkmatter.json lists those present under "assets").
TOKENIZER_FILE = "tokenizer.json"  # text: the dataset's tokenizer, byte for byte
PREPROCESSOR_FILE = "preprocessor_config.json"  # image, video, audio: the processor's settings
ASSETS = (TOKENIZER_FILE, PREPROCESSOR_FILE)
# What an encoder reads, by its config's model_type (else: images), where nothing records it.
MODEL_TYPE_MODALITY = {"bert": "text", "gpt2": "text", "t5": "text", "roberta": "text",
                       "wav2vec2": "audio", "videomae": "video"}  # fmt: skip
# In a run folder (train.run_dir): {"root": checkpoint.root}, written by the trainer at start.
ROOT_RECORD = "checkpoint_root.json"
# An export's record (darkmatter.json), written last: "export_files" lists every other file.
EXPORT_RECORD = "darkmatter.json"


class UnsafeCheckpoint(CheckpointError):
    """A checkpoint file that holds more than tensors and plain data: unpickling it could run
    code, so it is refused (never loaded). The message names the file and what it would call."""


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
        # Checkpoints from before the field: from the model's type.
        model_type = json.loads(self.config_file.read_text()).get("model_type", "")
        return MODEL_TYPE_MODALITY.get(model_type, "image")

    def asset(self, name: str) -> Path | None:
        """The checkpoint's own copy of an input file (ASSETS), None when it carries none."""
        path = self.path / name
        return path if name in self.meta.get("assets", ()) and path.is_file() else None

    @property
    def tokenizer_url(self) -> str:
        """Where a text encoder's tokenizer is read: the checkpoint's copy, else (a checkpoint
        from before they carried one) the dataset's, by URL."""
        own = self.asset(TOKENIZER_FILE)
        return str(own) if own else str(self.meta["tokenizer"])


# -- 1. locate -------------------------------------------------------------------------------


@dataclass
class Location:
    """A committed checkpoint where it is kept (not fetched yet)."""

    root: str  # the checkpoints folder or URL
    tag: str
    record: dict[str, Any]  # its commit record: every file with its size and sha256


def locate(target: str) -> Location:
    """A run folder, a checkpoint root (local or s3://…) or one step folder -> the checkpoint to
    use: that step, else the newest committed one. A run folder is looked up in its own
    checkpoints/ folder, then under the checkpoint.root it records (ROOT_RECORD). FileNotFoundError
    when there is none; CheckpointError (CorruptCheckpoint) when its commit record is missing
    (garbled)."""
    target = target.rstrip("/")
    if storage.exists(storage.join(target, COMMIT)):
        root, tag = target.rsplit("/", 1) if "/" in target else (".", target)
        return Location(root, tag, ckpt.read_commit(root, tag))
    recorded = run_root(target)
    for root in (storage.join(target, "checkpoints"), target, *([recorded] if recorded else [])):
        tags = ckpt.committed_tags(root)
        if tags:
            return Location(root, tags[-1], ckpt.read_commit(root, tags[-1]))
    where = f" (nor under the run's checkpoint.root {recorded})" if recorded else ""
    raise FileNotFoundError(
        f"{target}: no committed checkpoint (no step folder with {COMMIT}){where}"
    )


def run_root(run_dir: str) -> str:
    """The checkpoint.root a run folder records (ROOT_RECORD), or "" when it records none."""
    record = Path(run_dir.removeprefix("file://")) / ROOT_RECORD
    if storage.is_remote(run_dir) or not record.is_file():
        return ""
    try:
        return str(json.loads(record.read_text())["root"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{record}: garbled ({e}); remove it and name the root") from None


# -- 2. fetch --------------------------------------------------------------------------------


def cache_folder(loc: Location, cache_dir: str = "") -> Path:
    """Where `fetch` puts `loc`'s files: `cache_dir` (default: a per-user folder in the temp
    folder), one subfolder per checkpoint root."""
    cache = Path(cache_dir or Path(tempfile.gettempdir()) / f"darkmatter-checkpoints-{os.getuid()}")
    return cache / hashlib.sha256(loc.root.encode()).hexdigest()[:16]


def fetch(loc: Location, cache_dir: str = "", weights: str = "master") -> CheckpointRef:
    """The files of `loc` that the records and the weights need, present and verified against
    its commit record (CorruptCheckpoint naming the file otherwise). A remote checkpoint is
    downloaded to `cache_dir` (cache_folder); a local one is read in place. `weights`: "master"
    (what consolidated_state_dict reads: the fp32 master weights, optimizer states included),
    "module" (what module_state_dict reads: under ZeRO 0-2 the module file alone) or "none"
    (the records and input files only)."""
    dest = cache_folder(loc, cache_dir)
    files = loc.record["files"]
    local = ckpt.fetch(loc.root, loc.tag, dest, record=loc.record,
                       names=[n for n in (*RECORDS, *ASSETS) if n in files])  # fmt: skip
    ref = CheckpointRef(local, loc.tag)
    stage = int(ref.meta.get("zero_stage", 0))
    if weights != "none":
        names = weight_files(files, stage) if weights == "master" else module_files(files, stage)
        ckpt.fetch(loc.root, loc.tag, dest, record=loc.record, names=names)
    return ref


def weight_files(files: dict[str, Any], zero_stage: int) -> list[str]:
    """What consolidation reads: without ZeRO, DeepSpeed's module file; under ZeRO, every rank's
    model and optimizer states (zero_to_fp32 takes the fp32 master weights from the latter)."""
    if zero_stage == 0:
        return [n for n in files if n == ZERO0_WEIGHTS]
    return sorted(n for n in files if n.endswith(("_model_states.pt", "_optim_states.pt")))


def module_files(files: dict[str, Any], zero_stage: int) -> list[str]:
    """What module_state_dict reads: under ZeRO 0-2, DeepSpeed's module file, which holds every
    weight of the module as it trained (no optimizer state: about the model's bytes). Under
    ZeRO-3 that file's tensors are empty placeholders: the weights the trainer gathered at the
    save (MODULE_WEIGHTS), or, for a checkpoint without them (checkpoint.module_weights off),
    weight_files' model and optimizer states, whose fp32 partitions are then consolidated."""
    if zero_stage < 3:
        return [n for n in files if n == ZERO0_WEIGHTS]
    if MODULE_WEIGHTS in files:
        return [MODULE_WEIGHTS]
    return weight_files(files, zero_stage)


def resolve(target: str, cache_dir: str = "") -> CheckpointRef:
    """locate, then fetch: the checkpoint `target` names, ready to consolidate."""
    return fetch(locate(target), cache_dir)


# -- 3. consolidate --------------------------------------------------------------------------


def consolidated_state_dict(ref: CheckpointRef) -> dict[str, torch.Tensor]:
    """Full fp32 weights of the pretraining model, whatever the ZeRO stage it was trained with.
    UnsafeCheckpoint when a file holds more than tensors and plain data."""
    if int(ref.meta.get("zero_stage", 0)) == 0:
        return module_state_dict(ref)  # without ZeRO, the module's weights are the masters
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with weights_only_loads(ref.path):  # zero_to_fp32 itself passes weights_only=False
        sd = get_fp32_state_dict_from_zero_checkpoint(str(ref.root), tag=ref.tag)
    return dict(sd)


def module_state_dict(ref: CheckpointRef) -> dict[str, torch.Tensor]:
    """The pretraining model's weights as its module held them at the save, in fp32: what an
    evaluation needs. Under ZeRO 0-2 from DeepSpeed's module file alone (module_files: no
    optimizer state is read; a bf16 run's weights are then its bf16 copies, not the fp32
    masters consolidated_state_dict gives an export); under ZeRO-3 consolidated_state_dict's.
    UnsafeCheckpoint when a file holds more than tensors and plain data."""
    if int(ref.meta.get("zero_stage", 0)) >= 3:
        if not (ref.path / MODULE_WEIGHTS).exists():  # saved without checkpoint.module_weights
            return consolidated_state_dict(ref)
        module = load_tensors(ref.path / MODULE_WEIGHTS)
    else:
        module = load_tensors(ref.path / ZERO0_WEIGHTS)["module"]  # beside DeepSpeed's records
    return _as_float(module)


def _as_float(module: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fp32 copies of the tensors, a tie (one storage, two names) staying one tensor."""
    out: dict[tuple[Any, ...], torch.Tensor] = {}
    return {k: out.setdefault(_view_of(v), v.float()) for k, v in module.items()}


def _view_of(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())


# DeepSpeed's only non-tensor, non-plain-data objects in its model and optimizer states: inert
# records (a loss-scale value, a stage number, an (offset, numel) pair). Nothing else is allowed.
_DEEPSPEED_RECORDS = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)
_FORCE, _FORCE_NO = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


def deepspeed_records() -> list[Any]:
    """The allow-list of classes DeepSpeed's checkpoint files may name (_DEEPSPEED_RECORDS)."""
    import importlib

    return [getattr(importlib.import_module(m), n) for m, n in _DEEPSPEED_RECORDS]


def allow_deepspeed_records() -> None:
    """Allow DeepSpeed's records in weights_only loads for the rest of this process (the
    universal converter's subprocess calls this before running DeepSpeed's converter)."""
    torch.serialization.add_safe_globals(deepspeed_records())


def weights_only_env() -> dict[str, str]:
    """This process's environment with every torch.load forced to weights_only (for a child
    process that runs DeepSpeed's loaders, which pass weights_only=False)."""
    env = {k: v for k, v in os.environ.items() if k not in (_FORCE, _FORCE_NO)}
    return {**env, _FORCE: "1"}


@contextlib.contextmanager
def weights_only_loads(where: Path) -> Iterator[None]:
    """Inside, every torch.load of this process unpickles tensors, plain data and DeepSpeed's
    records only, whatever its caller passes (torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD; the
    variable is process-wide, so loads on other threads are forced too, which is only safer).
    A refusal becomes UnsafeCheckpoint naming the offending file among `where`'s."""
    saved = {k: os.environ.pop(k, None) for k in (_FORCE, _FORCE_NO)}
    os.environ[_FORCE] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_records()):
            yield
    except pickle.UnpicklingError as e:
        raise unsafe(refused_file(where) or where, str(e)) from None
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v


def load_tensors(path: Path) -> Any:
    """torch.load of a checkpoint file with weights_only=True (and DeepSpeed's records allowed);
    UnsafeCheckpoint, naming it, when it holds anything else."""
    try:
        with torch.serialization.safe_globals(deepspeed_records()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise unsafe(path, str(e)) from None


def refused_file(folder: Path) -> Path | None:
    """The first .pt file under `folder` that a weights_only load refuses (read only once a
    load in the folder was refused, to name the file)."""
    for path in sorted(folder.rglob("*.pt")) if folder.is_dir() else []:
        try:
            load_tensors(path)
        except UnsafeCheckpoint:
            return path
        except Exception:  # noqa: BLE001  (unreadable for another reason: not the one we seek)
            continue
    return None


def unsafe(path: Path, reason: str) -> UnsafeCheckpoint:
    """The one-line error for a file a weights_only load refused; `reason`: torch's message
    (or a process's output holding it), which names the global the file would call."""
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", reason)
    what = f"it would call {m.group(1)}" if m else "it holds objects other than tensors"
    return UnsafeCheckpoint(f"{path}: refused to load: {what}; checkpoint files may hold only "
                            "tensors and plain data (weights_only=True)")  # fmt: skip


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


def pooler_kwargs(config: Any, weight_names: Iterable[str]) -> dict[str, Any]:
    """What the encoder class is built with so that it has a pooler only when the weights do.
    AutoModel adds one to BERT and ViT (a dense layer and tanh over the first token) that no
    objective here trains; loaded without weights it would be random numbers in the model."""
    import inspect

    from transformers import MODEL_MAPPING

    cls = encoder_class(config)
    if cls is AutoModel:
        cls = MODEL_MAPPING[type(config)]
    if "add_pooling_layer" not in inspect.signature(cls.__init__).parameters:
        return {}
    return {"add_pooling_layer": any(k.startswith("pooler.") for k in weight_names)}


def build_encoder(config: Any, pooler: bool = False) -> PreTrainedModel:
    """The encoder's architecture, freshly initialized (from torch's global RNG); a pooler only
    with `pooler` (and only for classes that have one)."""
    cls = encoder_class(config)
    kwargs = pooler_kwargs(config, ["pooler."] if pooler else [])
    model: PreTrainedModel = (
        cls(config, **kwargs) if cls is not AutoModel else AutoModel.from_config(config, **kwargs)
    )
    if model.config.model_type == "vit_mae":
        _init_vit_mae_embeddings(model)
    return model


def encoder_prefix(objective: str, weight_names: Iterable[str]) -> str:
    """Where `objective`'s encoder sits among these weights: ENCODER_PREFIX, or ENCODER_FALLBACK
    when no weight carries that prefix."""
    prefix = ENCODER_PREFIX[objective]
    if objective in ENCODER_FALLBACK and not any(k.startswith(prefix) for k in weight_names):
        return ENCODER_FALLBACK[objective]
    return prefix


def encoder_weights(
    ref: CheckpointRef, weights: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The encoder's part of the pretraining model's weights, under the encoder's own names."""
    prefix = encoder_prefix(ref.meta["objective"], weights)
    dropped = NOT_ENCODER.get(ref.meta["objective"], ())
    return {
        k[len(prefix) :]: v
        for k, v in weights.items()
        if k.startswith(prefix) and not k[len(prefix) :].startswith(dropped)
    }


def encoder(
    ref: CheckpointRef, state_dict: dict[str, torch.Tensor] | None = None, share: bool = False
) -> PreTrainedModel:
    """The checkpoint's encoder with its weights, in eval mode; `state_dict`: the checkpoint's
    consolidated weights, when the caller has them already (else they are consolidated here).
    `share`: the encoder's parameters are state_dict's tensors themselves, not copies (one copy
    of the weights in memory; training the encoder would then change state_dict)."""
    sd = encoder_weights(ref, state_dict or consolidated_state_dict(ref))
    model = build_encoder(encoder_config(ref.config_file), any(k.startswith("pooler.") for k in sd))
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=share)
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

    prefix = encoder_prefix(ref.meta["objective"], weights)
    in_encoder = {prefix + k for k in encoder.state_dict()}
    seen = {weights[k].data_ptr() for k in in_encoder if k in weights}
    heads = {}
    for k, v in weights.items():
        if k not in in_encoder and v.data_ptr() not in seen:
            heads[k] = v.contiguous()
            seen.add(v.data_ptr())
    save_file(heads, str(out / HEADS_FILE), metadata={"format": "pt"})


# -- 5. inputs -------------------------------------------------------------------------------


def preprocessor(modality: str, data: dict[str, Any]) -> Any:
    """The transformers processor that makes an encoder's inputs as training did, from the
    run's data settings (a checkpoint's meta["data"]); None for text (its tokenizer is the
    dataset's). The trainer saves its settings into every checkpoint (PREPROCESSOR_FILE)."""
    from darkmatter.data_pipeline.transforms import IMAGE_MEAN, IMAGE_STD

    norm: dict[str, Any] = {
        "image_mean": IMAGE_MEAN.flatten().tolist(),
        "image_std": IMAGE_STD.flatten().tolist(),
    }
    if modality == "image":
        from transformers import ViTImageProcessor

        size = int(data["image_size"])
        return ViTImageProcessor(size={"height": size, "width": size}, resample=2,  # bilinear
                                 **norm)  # fmt: skip
    if modality == "video":  # frames resized and normalized as the image objectives'
        from transformers import VideoMAEImageProcessor

        size = int(data["image_size"])
        return VideoMAEImageProcessor(size={"height": size, "width": size},
                                      do_center_crop=False, resample=2, **norm)  # fmt: skip
    if modality == "audio":  # 16 kHz, normalized per clip, padding masked: as in training
        from darkmatter.data_pipeline.transforms import feature_extractor

        return feature_extractor()
    return None


# -- 6. exports ------------------------------------------------------------------------------


def missing_export_files(folder: Path) -> list[str]:
    """The files an export folder lacks, [] when it is complete. A `darkmatter export` lists
    its files in its record (EXPORT_RECORD, written last); an older export or any other
    `save_pretrained` encoder must have config.json and weights, and HEADS_FILE too when its
    record says it is a darkmatter export."""
    record: dict[str, Any] = {}
    if (folder / EXPORT_RECORD).is_file():
        try:
            record = json.loads((folder / EXPORT_RECORD).read_text())
        except ValueError:
            return [f"{EXPORT_RECORD} (unreadable)"]
    if "export_files" in record:
        return [n for n in record["export_files"] if not (folder / n).is_file()]
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    if not any((folder / w).is_file() for w in weights):
        missing.append("model.safetensors")
    if record and not (folder / HEADS_FILE).is_file():
        missing.append(HEADS_FILE)
    return missing
