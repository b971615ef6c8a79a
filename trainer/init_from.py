"""Continued pretraining (`model.init_from`): where a new run's starting weights come from, the
checks that they fit the configured model, and how they map into it.

A source is a `darkmatter export` folder, local or in object storage (s3://…), or an MLflow
registered model (`models:/NAME/VERSION`, as `darkmatter export --register` logs it: the folder
is the flavour's `model/`). Remote sources are downloaded once per process, into a temporary
folder removed at exit. An export holds the encoder (`save_pretrained`: config.json,
model.safetensors) and, since exports carry it, `pretraining_heads.safetensors`: every other
weight of the pretraining model under its own name (the MLM or LM head, MAE's and VideoMAE's
decoders, the contrastive heads and a momentum teacher, wav2vec2's quantizer, T5's decoder).

Mapping: the encoder's weights go into the pretraining model's encoder, `model.base_model`
(`bert.`, `vit.`, `transformer.`, `videomae.`, `wav2vec2.`; T5's shared embedding and encoder
keep their names), the heads' weights where their names say, when the export comes from the
same objective. So an export of the same objective continues exactly where it stopped; any
other `save_pretrained` encoder (another objective's, or one from elsewhere) gives the encoder
only, and the rest keeps its initial values (logged). BERT's pooler, which AutoModel adds to an
export and pretraining never trains, is not used.

Under ZeRO-3 the model is partitioned as it is built: each module's parameters are gathered
only while they are written (trainer.engine.gathered), and tensors are read from the
safetensors files one at a time, so no rank holds the whole model.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from darkmatter import storage
from darkmatter.trainer.checkpoint_reader import HEADS_FILE, encoder_class, encoder_prefix
from darkmatter.trainer.config import Config, ConfigError
from darkmatter.trainer.objectives.teacher import PREFIX as TEACHER_PREFIX

log = logging.getLogger("darkmatter.init_from")

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # a sharded save_pretrained
# Fields of a transformers config that fix the encoder's shapes (those the config has; GPT-2 and
# T5 name theirs otherwise, which transformers' attribute maps translate).
ENCODER_FIELDS = (
    "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "intermediate_size", "n_inner", "max_position_embeddings", "d_kv", "d_ff", "image_size",
    "patch_size", "num_channels", "num_frames", "tubelet_size", "conv_dim", "conv_kernel",
    "conv_stride", "num_conv_pos_embeddings", "num_conv_pos_embedding_groups",
)  # fmt: skip
# Fields that fix the heads' shapes: compared when the heads are used (the same objective).
HEAD_FIELDS = (
    "decoder_hidden_size", "decoder_num_hidden_layers", "decoder_intermediate_size",
    "num_decoder_layers", "projection_dim", "head_hidden_size", "num_codevector_groups",
    "num_codevectors_per_group", "codevector_dim", "proj_codevector_dim",
)  # fmt: skip


@functools.cache
def fetch(uri: str, tracking_uri: str = "") -> Path:
    """The local folder of `uri` (downloaded once per process when it is remote)."""
    if uri.startswith("models:/"):
        from darkmatter.trainer.tracking import TrackingError, download_model

        try:
            root = Path(download_model(uri, _scratch(), tracking_uri))
        except TrackingError as e:
            raise ConfigError(f"model.init_from: {e}") from None
        folder = root / "model" if (root / "model" / "config.json").is_file() else root
    elif storage.is_remote(uri):
        folder = Path(_scratch())
        base = uri.rstrip("/") + "/"
        for url in storage.list_files(uri):
            name = url[len(base) :] if url.startswith(base) else ""
            if name and "/" not in name:  # the folder's own files, not its subfolders
                storage.get_file(url, str(folder / name))
    else:
        folder = Path(uri.removeprefix("file://"))
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model.init_from: {uri} has no config.json (expected a `darkmatter "
                          "export` folder, a save_pretrained encoder or models:/NAME/VERSION)")  # fmt: skip
    if not (folder / WEIGHTS_FILE).is_file() and not (folder / WEIGHTS_INDEX).is_file():
        raise ConfigError(f"model.init_from: {uri} has no {WEIGHTS_FILE} (save_pretrained writes "
                          "safetensors)")  # fmt: skip
    # A `darkmatter export` lists its files in its record, written last: all must be there.
    missing = [n for n in _export_record(folder).get("export_files", ())
               if not (folder / n).is_file()]  # fmt: skip
    if missing:
        raise ConfigError(f"model.init_from: {uri} is an incomplete export: {missing[0]} is "
                          "missing (export it again)")  # fmt: skip
    return folder


def _scratch() -> str:
    path = tempfile.mkdtemp(prefix="darkmatter-init-from-")
    atexit.register(shutil.rmtree, path, True)
    return path


def check(cfg: Config, model_config: Any, tokenizer_url: str | None = None) -> None:
    """Fail with one line when init_from does not fit the configured model: a field that fixes a
    shape differs (named, with both values), or, for text, its tokenizer maps tokens to other ids
    than the dataset's."""
    uri = cfg.model.init_from
    folder = fetch(uri, _tracking_uri(cfg))
    _check_config(uri, folder, model_config, _same_objective(folder, cfg))
    theirs = _tokenizer_file(folder)
    if tokenizer_url and theirs is not None:
        from tokenizers import Tokenizer

        ours = Tokenizer.from_str(storage.read_bytes(tokenizer_url).decode()).get_vocab()
        vocab = Tokenizer.from_file(str(theirs)).get_vocab()
        moved = sum(1 for token, i in ours.items() if vocab.get(token) != i)
        if moved or len(vocab) != len(ours):
            raise ConfigError(
                f"model.init_from: the tokenizer of {uri} ({len(vocab)} tokens) differs from the "
                f"dataset's ({tokenizer_url}, {len(ours)} tokens): {moved} tokens have other ids"
            )


def _check_config(uri: str, folder: Path, model_config: Any, heads: bool) -> None:
    from transformers import AutoConfig

    saved = json.loads((folder / "config.json").read_text())
    try:  # through the config class, whose attribute map reads n_embd or d_model as hidden_size
        theirs = AutoConfig.from_pretrained(str(folder))
    except (ValueError, KeyError):
        theirs = None  # a model type this transformers does not know: the raw fields
    for name in ENCODER_FIELDS + (HEAD_FIELDS if heads else ()):
        a = getattr(theirs, name, saved.get(name))
        b = getattr(model_config, name, None)
        if a is None or b is None:
            continue
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            a, b = list(a), list(b)
        if a != b:
            raise ConfigError(f"model.init_from: {name} {a} in {_where(uri)}, {b} in this config")


def _where(uri: str) -> str:
    if uri.startswith("models:/"):
        return f"{uri} (its config.json)"
    return storage.join(uri.rstrip("/"), "config.json")


def _tracking_uri(cfg: Config) -> str:
    from darkmatter.trainer.tracking import resolve_uri

    return resolve_uri(cfg.tracking.tracking_uri)


def _export_record(folder: Path) -> dict[str, Any]:
    f = folder / "darkmatter.json"  # what `darkmatter export` writes beside the weights
    return dict(json.loads(f.read_text())) if f.is_file() else {}


def _same_objective(folder: Path, cfg: Config) -> bool:
    return bool(_export_record(folder).get("objective") == cfg.objective)


def _tokenizer_file(folder: Path) -> Path | None:
    """The export's tokenizer.json, or the MLflow flavour's copy beside its `model/` folder."""
    for f in (folder / "tokenizer.json", folder.parent / "components/tokenizer/tokenizer.json"):
        if f.is_file():
            return f
    return None


def _weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (a sharded save has an index)."""
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        shards = json.loads(index.read_text())["weight_map"]
        return {k: folder / v for k, v in shards.items()}
    return dict.fromkeys(_keys(folder / WEIGHTS_FILE), folder / WEIGHTS_FILE)


def _in_memory_names(folder: Path, keys: list[str]) -> dict[str, str]:
    """Name in the export's files -> the encoder's own name for it. transformers 5 saves some
    models under their earlier names (a ViT's `layers.0.attention.q_proj` is written as
    `encoder.layer.0.attention.attention.query`) and renames them as it loads, by its checkpoint
    conversion mapping; the plan maps into the model by the names it has in memory."""
    from transformers import MODEL_MAPPING, AutoConfig
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    config = AutoConfig.from_pretrained(str(folder))
    cls = encoder_class(config)
    model_class: Any = MODEL_MAPPING[type(config)] if cls.__name__ == "AutoModel" else cls
    class_name = model_class.__name__
    # As transformers looks it up (by class name, then model type), without building a model.
    transforms = (get_checkpoint_conversion_mapping(class_name)
                  or get_checkpoint_conversion_mapping(config.model_type) or [])  # fmt: skip
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    names = {}
    for key in keys:
        name, converted = rename_source_key(key, renamings, converters)
        if converted is not None:  # a tensor split or merged on load: not one-to-one
            raise ConfigError(f"model.init_from: {folder}: {key} is converted on load "
                              f"({converted}), which init_from does not do")  # fmt: skip
        names[key] = name
    return names


def _keys(file: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return list(f.keys())


Gathered = Callable[[Iterable[torch.nn.Parameter]], contextlib.AbstractContextManager[Any]]


def load(model: torch.nn.Module, cfg: Config, gathered: Gathered) -> None:
    """Write init_from's weights into the freshly built `model` (see the module docstring);
    `gathered` gives a module's full parameters for the write under ZeRO-3."""
    uri = cfg.model.init_from
    folder = fetch(uri, _tracking_uri(cfg))
    heads = _same_objective(folder, cfg)
    _check_config(uri, folder, getattr(model, "config", None), heads)
    own = model.state_dict(keep_vars=True)  # placeholders under ZeRO-3: no copies
    plan = _plan(model, folder, own, cfg.objective if heads else "", uri)
    _copy(model, plan, gathered)
    loaded = {id(own[name]) for name in plan}  # a tied weight loads with its twin
    kept = [name for name, t in own.items() if id(t) not in loaded]
    if hasattr(model, "pairs") and any(n.startswith(TEACHER_PREFIX) for n in kept):
        # An encoder from elsewhere (another objective's export, any save_pretrained model): the
        # EMA teacher starts as the online network it follows, as it does at a fresh start.
        from darkmatter.trainer.objectives.teacher import ema_update

        ema_update(model.pairs(), 0.0)  # type: ignore[operator]
        kept = [n for n in kept if not n.startswith(TEACHER_PREFIX)]
    log.info("model.init_from: %d tensors from %s", len(plan), uri)
    if kept:
        log.warning(
            "model.init_from: %s has no weights for %s%s: they keep their initial values",
            uri, ", ".join(kept[:4]), f" and {len(kept) - 4} more" if len(kept) > 4 else "",
        )  # fmt: skip


def _plan(
    model: torch.nn.Module, folder: Path, own: dict[str, torch.Tensor], objective: str, uri: str
) -> dict[str, tuple[Path, str]]:
    """Model tensor name -> (file, name in it); shapes checked against the model's. The heads
    file is used when `objective` (the export's, when it is this run's) is set."""
    base = getattr(model, "base_model", model)
    prefix = "" if base is model else f"{model.base_model_prefix}."
    if objective:
        # An export of this objective holds its encoder where ENCODER_PREFIX says (an EMA
        # teacher's, for dino, ijepa and video_future) and everything else, the online
        # encoder included, in the heads file.
        prefix = encoder_prefix(objective, own)
    plan: dict[str, tuple[Path, str]] = {}
    files = _weight_files(folder)
    names = _in_memory_names(folder, list(files))
    for key, file in files.items():
        name = names[key]
        if name.startswith("pooler.") and prefix + name not in own:
            continue  # AutoModel's BERT pooler: never trained by pretraining
        plan[prefix + name] = (file, key)
    if (folder / HEADS_FILE).is_file() and objective:
        for key in _keys(folder / HEADS_FILE):
            plan.setdefault(key, (folder / HEADS_FILE, key))
    elif (folder / HEADS_FILE).is_file():
        log.warning("model.init_from: %s is an export of another objective (%s): only its "
                    "encoder is used", uri, _export_record(folder).get("objective"))  # fmt: skip
    unexpected = [name for name in plan if name not in own]
    if unexpected:
        raise ConfigError(f"model.init_from: {uri} has weights this model does not: "
                          f"{', '.join(unexpected[:3])}")  # fmt: skip
    _check_shapes(plan, own, uri)
    return plan


def _check_shapes(
    plan: dict[str, tuple[Path, str]], own: dict[str, torch.Tensor], uri: str
) -> None:
    from safetensors import safe_open

    with contextlib.ExitStack() as stack:
        files = {f: stack.enter_context(safe_open(str(f), framework="pt"))
                 for f in {f for f, _ in plan.values()}}  # fmt: skip
        for name, (file, key) in plan.items():
            theirs = tuple(files[file].get_slice(key).get_shape())
            ours = tuple(getattr(own[name], "ds_shape", own[name].shape))
            if theirs != ours:
                raise ConfigError(f"model.init_from: {key} is {list(theirs)} in {uri}, "
                                  f"{list(ours)} in this model")  # fmt: skip


def _copy(model: torch.nn.Module, plan: dict[str, tuple[Path, str]], gathered: Gathered) -> None:
    """Module by module: its planned parameters gathered (ZeRO-3) while written, its buffers
    written on every rank."""
    from safetensors import safe_open

    with contextlib.ExitStack() as stack, torch.no_grad():
        files = {f: stack.enter_context(safe_open(str(f), framework="pt"))
                 for f in {f for f, _ in plan.values()}}  # fmt: skip
        for prefix, module in model.named_modules():
            persistent = [(n, b) for n, b in module._buffers.items()
                          if n not in module._non_persistent_buffers_set]  # fmt: skip
            mine = {}
            for n, t in [*module._parameters.items(), *persistent]:
                name = f"{prefix}.{n}" if prefix else n
                if t is not None and name in plan:
                    mine[name] = t
            if not mine:
                continue
            with gathered(t for t in mine.values() if isinstance(t, torch.nn.Parameter)):
                for name, t in mine.items():
                    file, key = plan[name]
                    t.data.copy_(files[file].get_tensor(key))
