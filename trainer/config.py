"""Typed configuration: YAML files in configs/ loaded into dataclasses, with `a.b=c` overrides.

Every error names the dotted key it is about (`train.zero_stage: expected 0-3, got 5`). The
`deepspeed:` section is passed through to DeepSpeed untouched except for the batch fields, which
are derived here once: micro_batch × grad_accum × world_size = global_batch.

This module owns the sections every objective shares and never imports the objectives: each
objective owns its settings dataclass (an `ObjectiveSettings`, beside its code), and its keys sit
under `model:` in YAML beside the common `ModelConfig` ones. `build_config` splits that mapping
with the settings class it is handed; `trainer.objectives.load_config` hands it the registry's
and adds the objective's own checks, so imports point one way: objectives -> config.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from darkmatter.storage.retry import Retry


class ConfigError(ValueError):
    """A user error in a config file or an override; the message names the dotted key."""

    def __init__(self, message: str) -> None:
        # Keys and values come from the file: a line break in one must not split the error line.
        super().__init__("\\n".join(message.splitlines()))


@dataclass
class SourceConfig:
    """One source of a weighted mixture (data.sources)."""

    name: str
    """Short name of the source: its counters in MLflow are data/source/<name>/... ."""
    url: str
    """Where it is: a dataset with a manifest.json (prepared, or indexed in place by
    `darkmatter index`), or raw files (tar shards, jsonl, Parquet, text: a path, glob, brace
    range or s3:// prefix), indexed at the start of the run."""
    weight: float = 1.0
    """Relative share of the global batch (weights are normalized over the sources)."""
    format: str = ""
    """Raw files' format (webdataset, jsonl, parquet, text); empty: data.format."""
    text_field: str = ""
    """jsonl key or Parquet column of the text; empty: data.text_field."""


@dataclass
class DataConfig:
    url: str = ""
    """Dataset root written by `darkmatter prepare` or `darkmatter index` (s3://bucket/prefix,
    file://…, a local path), or raw files (tar shards, jsonl, Parquet, text: a path, glob, brace
    range or s3:// prefix) indexed at the start of the run. One of url and sources."""
    sources: list[SourceConfig] = field(default_factory=list)
    """A weighted mixture: [{name, url, weight}, ...]; each is read as `url` is. Instead of url."""
    format: str = "auto"
    """Raw files' format: auto (by extension), webdataset, jsonl, parquet or text."""
    text_field: str = "text"
    """jsonl key or Parquet column holding the text of raw text sources."""
    tokenizer: str = ""
    """Text read raw (.txt members, jsonl, Parquet, text files) is tokenized on the fly with this
    tokenizer: a tokenizer.json or a `save_pretrained` folder (local or s3://). Empty: the
    dataset's own (a prepared dataset's tokenizer.json)."""
    allow_growth: bool = False
    """Resume onto a dataset that grew (a new manifest version listing the old one as its
    prefix): the epoch in progress ends on the old shards, new ones join at the next epoch.
    False: such a resume is refused."""
    num_workers: int = 1
    """DataLoader worker processes per rank."""
    shuffle_buffer: int = 256
    """Samples held by each partition's shuffle buffer (0 disables sample shuffling)."""
    partitions: int = 64
    """Virtual partitions of an epoch. The sample order depends on it (not on world size or
    workers); world_size x max(1, num_workers) must divide it and the global batch."""
    strict: bool = False
    """Stop on the first bad shard or sample instead of skipping it (and counting it)."""
    verify: bool = True
    """Check every shard's sha256 against the manifest before reading it."""
    max_member_mb: float = 64.0
    """A tar member larger than this is refused: its sample is skipped."""
    readahead: int = 2
    """Shards fetched ahead per partition, so decoding never waits on the network."""
    range_reads: bool = True
    """Stream remote tar shards by ranged GETs of each partition's samples, where the manifest
    has sample offsets: each byte fetched once, a start or resume waits only for its first
    samples (docs/DATA.md). false: fetch them whole into data.cache_dir (a dataset read for many
    epochs that fits data.cache_gb then reads from disk after the first)."""
    cache_dir: str = ""
    """Folder for fetched shards, shared by every process of a machine and kept across runs
    (shards are named by their sha256); empty: $XDG_CACHE_HOME/darkmatter/shards, or
    ~/.cache/darkmatter/shards."""
    cache_gb: float = 16.0
    """The shard folder is kept under this size; least recently used shards are deleted, with
    their lock files."""
    seq_len: int = 128
    """Tokens per text sample, [CLS] and [SEP] included (text objectives)."""
    image_size: int = 32
    """Side of the square images fed to the model, in pixels (image objectives)."""
    num_frames: int = 16
    """Frames of a clip fed to the model (video objectives); a multiple of model.tubelet_size."""
    frame_stride: int = 2
    """Video: every frame_stride-th frame of a clip, from an offset drawn per sample (the window
    centred in evaluation); a clip shorter than that window gives evenly spaced frames."""
    min_crop_scale: float = 0.2
    """Two-view objectives (simclr): the smallest share of an image's area a random crop keeps
    (SimCLR: 0.08 on ImageNet; small images such as digits want 0.5 or more)."""
    flip_prob: float = 0.5
    """Two-view objectives: probability of a horizontal flip (0 for images, such as digits,
    that a mirror changes)."""
    packing: bool = False
    """Text objectives: concatenate the micro-batch's documents (separated by [SEP]) and cut
    them into full rows of seq_len, RoBERTa's "full sentences", instead of one padded row per
    document: no compute is spent on padding. Rows then attend across document boundaries."""
    pack: str = "none"
    """Text objectives: `none` (one document a row, or `packing` above), or `documents`:
    documents packed end to end into data.pack_rows rows of seq_len, attention never crossing a
    document boundary and positions restarting per document."""
    pack_rows: int = 0
    """Rows per micro-batch with pack: documents (0: train.micro_batch_size), the same on every
    rank; tokens that do not fit are dropped and counted (data/pack/dropped_tokens)."""
    audio_seconds: float = 1.0
    """Audio objectives (wav2vec2): seconds of 16 kHz audio per clip. A longer clip is cropped at
    a random offset, a shorter one padded (the padding is masked out of attention and loss)."""


@dataclass
class ModelConfig:
    """The encoder's shape and how it runs, common to every objective. An objective's own keys
    (masking, heads, decoder, ...) sit beside these under `model:`: see ObjectiveSettings."""

    hidden_size: int = 128
    """Width of the encoder."""
    num_layers: int = 2
    """Transformer blocks in the encoder."""
    num_heads: int = 2
    """Attention heads per block."""
    intermediate_size: int = 512
    """Width of the feed-forward layer."""
    dropout: float = 0.1
    """Dropout probability in the encoder."""
    attention: str = "sdpa"
    """Attention kernel: sdpa (torch's scaled_dot_product_attention, which picks flash or
    memory-efficient kernels on GPUs), eager (the reference implementation), or
    flash_attention_2 (needs the flash-attn package and a GPU)."""
    init_from: str = ""
    """Continued pretraining: start from these weights instead of a random init, a
    `darkmatter export` folder (local or s3://…) or a registered model (models:/NAME/VERSION);
    empty: random init. A resumed run takes its weights from its checkpoint instead."""


@dataclass
class ObjectiveSettings:
    """Base of an objective's own settings: a dataclass beside the objective's code (MAESettings
    in trainer/objectives/mae.py), named by its `settings_class`. Its fields are written under
    `model:` with ModelConfig's, and keep those names in dumps and MLflow params (model.mask_ratio);
    code reads them as `cfg.objective_settings.<name>` (typed inside an objective:
    `self.settings.<name>`). An objective with no settings of its own uses this class as is."""


@dataclass
class TrainConfig:
    steps: int
    """Optimizer steps to train for."""
    micro_batch_size: int = 8
    """Samples per rank per forward pass."""
    grad_accum: int = 0
    """Micro-batches accumulated per optimizer step; 0: what keeps train.global_batch_size at
    this job's number of ranks (global / (micro_batch_size × ranks)), or 1 without one."""
    global_batch_size: int = 0
    """Samples per optimizer step across all ranks; 0 derives it. Given with grad_accum 0, the
    same global batch holds at any number of ranks (the accumulation follows)."""
    lr: float = 5e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Floor of the cosine decay, as a fraction of lr."""
    warmup_steps: int = 10
    """Linear warmup steps from 0 to lr."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Gradient norm clipping (0 disables)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage, 0-3."""
    bf16: bool = False
    """Train in bfloat16 mixed precision."""
    activation_checkpointing: bool = False
    """Keep only each block's input in forward and recompute the block in backward: activation
    memory falls from one copy per layer to one per block boundary, for about a third more
    compute. For batches or sequences that do not fit otherwise."""
    compile: bool = False
    """torch.compile the model (through DeepSpeed's engine.compile): fused kernels, fewer
    launches; the first steps pay for compilation."""
    adamw_impl: str = "auto"
    """AdamW kernel: fused (one kernel for all parameters), foreach (batched ops), loop (one
    parameter at a time), auto (fused on GPUs, torch's default elsewhere)."""
    offload_optimizer: bool = False
    """ZeRO-Offload: keep the fp32 master weights and Adam states in CPU memory and step them
    there with DeepSpeed's CPU Adam, for models whose optimizer states do not fit on the
    devices (ZeRO stage 1-3)."""
    seed: int = 0
    """Seed of model init, data order and masking."""
    deterministic: bool = False
    """Deterministic kernels on GPUs (torch.use_deterministic_algorithms, cuDNN without
    autotuning, a fixed cuBLAS workspace): two runs of one config, seed, data and world size give
    identical losses. An op with no deterministic kernel then fails the job with an error naming
    it. Costs speed on GPUs (PyTorch's reproducibility notes); CPU runs are deterministic
    without it."""
    log_every: int = 10
    """Steps between logged metrics."""
    run_dir: str = "runs/default"
    """Local folder of this job: metrics.jsonl, checkpoints (unless checkpoint.root is set),
    staging for uploads."""


@dataclass
class CheckpointConfig:
    root: str = ""
    """Where committed checkpoints live: a local folder or any fsspec URL (s3://bucket/prefix).
    Empty: RUN_DIR/checkpoints."""
    every: int = 50
    """Steps between checkpoints (the final step is always checkpointed)."""
    keep_last: int = 3
    """Newest committed checkpoints kept; older ones are purged after a newer one commits."""
    keep_every: int = 0
    """Also keep, for good, every checkpoint whose step is a multiple of this (0: none)."""
    async_save: bool = True
    """Copy the state to memory and write/upload it in the background while training goes on;
    false: training waits until the checkpoint is committed."""
    staging_dir: str = ""
    """Local folder where ranks write before uploading to a remote root, and where a resume
    downloads to. Empty: RUN_DIR/staging."""
    max_failed_saves: int = 3
    """Consecutive saves not committed (on any rank) after which the job stops with an error."""
    resume: bool = True
    """Continue from the newest committed checkpoint under root, if there is one."""
    resume_from: str = ""
    """Start from this checkpoint instead (a step folder, or a root whose newest is used)."""
    module_weights: bool = True
    """Under ZeRO-3, also write the module's weights, gathered from every rank in the dtype it
    trains in, as module_weights.pt: what an evaluator reads instead of every rank's optimizer
    states (~6x the bytes with Adam). Costs one all-gather of the weights per save, held on
    rank 0 until written. Off: evaluators consolidate the fp32 masters from those states."""
    universal_workers: int = 2
    """Processes DeepSpeed's universal converter extracts ZeRO shards with when a resume changes
    the number of ranks (half as many, at least 1, merge them: merging holds whole tensors)."""
    universal_timeout_s: float = 3600.0
    """Seconds that conversion may take; past it, it is stopped and the resume fails."""


@dataclass
class FaultConfig:
    signals: str = "SIGTERM,SIGUSR1"
    """Signals that mean "preempted": save, commit and exit 143 at the next step boundary."""
    grace_s: float = 120.0
    """Seconds between the signal and a forced exit, checkpoint or not (the scheduler's grace)."""
    requeue: bool = True
    """Under SLURM, requeue the job (scontrol requeue) after the preemption checkpoint."""
    grad_norm_spike: float = 0.0
    """Skip a step whose gradient norm exceeds this many times the mean of the last 50 applied
    steps (checked once 5 are known; 0: off). A step whose loss or gradient is NaN/Inf on any rank is always skipped, on
    every rank alike."""
    max_skips: int = 3
    """That many skipped steps within skip_window steps roll back to the last checkpoint."""
    skip_window: int = 100
    """Window, in steps, for max_skips."""
    collective_timeout_s: float = 1800.0
    """Seconds a collective (all-reduce, gather, barrier) waits for the other ranks before the
    rank fails: a lost node or a cut link ends the job after this long instead of hanging."""


@dataclass
class TrackingConfig:
    tracking_uri: str = ""
    """MLflow tracking URI; empty uses MLFLOW_TRACKING_URI (an error if that is unset too, unless
    tracking.enabled is false). Credentials come from MLFLOW_TRACKING_USERNAME/PASSWORD only."""
    experiment: str = "darkmatter"
    """MLflow experiment name."""
    run_name: str = ""
    """MLflow run name; empty uses the run_dir's folder name."""
    enabled: bool = True
    """Set false to train without MLflow."""
    flush_s: float = 1.0
    """Least seconds between two requests to the server: metrics queue up and go in batches."""
    max_buffer: int = 1_000_000
    """Metrics kept while the server is unreachable; beyond it the oldest are dropped (with a
    warning)."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s of one device, for MFU. 0: looked up for known GPUs (dense bf16); on a CPU
    the rate of a large matrix multiply, measured at start."""


@dataclass
class StorageConfig:
    """How object storage is used, by shard fetches and checkpoint transfers alike."""

    retry: Retry = field(default_factory=Retry)
    """The retry budget of every transfer (attempts, base_s, max_s, jitter, deadline_s: see
    storage.Retry); 403s, refused credentials and missing buckets fail at once."""


# Keys that were replaced: naming one is an error that points at its successor.
MOVED_KEYS = {
    "checkpoint.upload_retries": "storage.retry (attempts, deadline_s)",
    "data.retries": "storage.retry (attempts, deadline_s)",
}


@dataclass
class Config:
    objective: str
    """Self-supervised objective, a key of trainer.objectives.OBJECTIVES (mlm, mae, ...)."""
    data: DataConfig
    """Where the shards are and how they are read."""
    train: TrainConfig
    """Optimization, schedule, checkpoints."""
    objective_settings: ObjectiveSettings
    """The objective's own settings (its settings_class): the `model:` keys that are not
    ModelConfig's. Not a YAML section of its own: to_dict() writes them back under `model`."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Encoder size, the keys every objective shares."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Where and how often checkpoints are written, kept and resumed from."""
    faults: FaultConfig = field(default_factory=FaultConfig)
    """Preemption signals, numerical faults and rollback."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Object storage: the retry budget shared by shard fetches and checkpoint transfers."""
    deepspeed: dict[str, Any] = field(default_factory=dict)
    """Passed through to DeepSpeed; batch and ZeRO fields are filled in from `train`."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _check_finite(value: Any, key: str) -> None:
    """A pass-through mapping (deepspeed:, ...) holds no NaN or infinity anywhere: NaN passes
    every range check the library behind it makes (NaN < 0 is False)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(
        value, list) else ()  # fmt: skip
    for k, v in items:
        _check_finite(v, f"{key}.{k}" if isinstance(value, dict) else f"{key}[{k}]")


_EXPONENT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; build nested dataclasses. Raises ConfigError."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {tp}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        _check_finite(value, key)
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _EXPONENT.fullmatch(value):
            value = float(value)  # PyYAML (YAML 1.1) reads 1e-3 as a string, YAML 1.2 a number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:  # an integer past 1.8e308
            number = math.inf
        if not math.isfinite(number):  # NaN would pass every range check (NaN < 0 is False)
            raise ConfigError(f"{key}: expected a finite number, got {value!r:.40}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported config annotation {_type_name(tp)} at {key}")


def _build(
    cls: Any, raw: dict[str, Any], prefix: str = "", given: dict[str, Any] | None = None
) -> Any:
    """`cls` from its raw mapping; `given` holds fields built elsewhere (not YAML keys here)."""
    given = given or {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in given}
    for name in raw:
        if name not in fields:
            dotted = f"{prefix}.{name}" if prefix else name
            if dotted in MOVED_KEYS:
                raise ConfigError(f"{dotted}: replaced by {MOVED_KEYS[dotted]}")
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{dotted}: unknown key (known here: {known})")
    kwargs = {}
    for name, f in fields.items():
        dotted = f"{prefix}.{name}" if prefix else name
        if name in raw:
            kwargs[name] = _coerce(raw[name], hints[name], dotted)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if dataclasses.is_dataclass(hints[name]):
                kwargs[name] = _build(hints[name], {}, dotted)
            else:
                raise ConfigError(f"{dotted}: required key is missing")
    return cls(**kwargs, **given)


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one `a.b=c` override to a raw config dict; the value is parsed as YAML."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected KEY=VALUE, e.g. train.steps=100")
    dotted, text = override.split("=", 1)
    keys = dotted.strip().split(".")
    node = raw
    for i, k in enumerate(keys[:-1]):
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(keys[: i + 1])}: is a value, cannot set {dotted}")
        node = child
    try:
        node[keys[-1]] = yaml.safe_load(text) if text != "" else ""
    except (yaml.YAMLError, ValueError, RecursionError) as e:
        raise ConfigError(
            f"{dotted.strip()}: cannot read {text[:40]!r} as a YAML value ({_yaml_problem(e)})"
        ) from None


def _yaml_problem(e: BaseException) -> str:
    """One line of what YAML (or int(), or the stack) found wrong."""
    lines = str(getattr(e, "problem", None) or e).splitlines()
    return lines[0] if lines else type(e).__name__


def read_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """A YAML config file as a raw mapping, with the overrides applied; nothing checked yet."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}:{where} malformed YAML ({_yaml_problem(e)})") from None
    except (ValueError, RecursionError) as e:  # an int of 4300+ digits; nesting past the stack
        raise ConfigError(f"{p}: unreadable YAML ({_yaml_problem(e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level")
    for o in overrides:
        apply_override(raw, o)
    return raw


def model_keys(settings: type[ObjectiveSettings]) -> list[str]:
    """The keys `model:` takes with these objective settings: ModelConfig's, then the settings'."""
    return [f.name for f in dataclasses.fields(ModelConfig)] + [
        f.name for f in dataclasses.fields(settings)
    ]


def build_config(
    raw: dict[str, Any], settings_class: Callable[[str], type[ObjectiveSettings]]
) -> Config:
    """A Config from a raw mapping. `model:` is split: ModelConfig's keys build the common
    section, the rest must be fields of `settings_class(objective)` (which raises ConfigError
    for an unknown objective). Types and unknown keys are checked here; ranges by validate()."""
    if "objective" not in raw:
        raise ConfigError("objective: required key is missing")
    name = _coerce(raw["objective"], str, "objective")
    settings = settings_class(name)
    model = raw.get("model", {})
    if not isinstance(model, dict):
        raise ConfigError(f"model: expected a mapping, got {type(model).__name__}")
    common, known = {f.name for f in dataclasses.fields(ModelConfig)}, model_keys(settings)
    for key in model:
        if key not in known:
            raise ConfigError(
                f"model.{key}: unknown key for objective {name} "
                f"(known here: {', '.join(sorted(known))})"
            )
    own = _build(settings, {k: v for k, v in model.items() if k not in common}, "model")
    rest = {**raw, "model": {k: v for k, v in model.items() if k in common}}
    cfg: Config = _build(Config, rest, given={"objective_settings": own})
    return cfg


ATTENTION_IMPLS = ("sdpa", "eager", "flash_attention_2")
ADAMW_IMPLS = ("auto", "fused", "foreach", "loop")


def validate(cfg: Config) -> None:
    """Range checks of the common sections that types alone cannot express. The objective's own
    checks are its Objective.validate (trainer.objectives.check_config runs both)."""
    t = cfg.train
    if not 0 <= t.zero_stage <= 3:
        raise ConfigError(f"train.zero_stage: expected 0-3, got {t.zero_stage}")
    for section, key in (
        ("train", "steps"), ("train", "micro_batch_size"), ("train", "log_every"),
        ("checkpoint", "every"), ("checkpoint", "keep_last"),
        ("checkpoint", "max_failed_saves"), ("checkpoint", "universal_workers"),
        ("faults", "max_skips"), ("faults", "skip_window"), ("tracking", "max_buffer"),
        ("model", "hidden_size"), ("model", "num_heads"), ("model", "num_layers"),
        ("model", "intermediate_size"),
    ):  # fmt: skip
        if getattr(getattr(cfg, section), key) < 1:
            raise ConfigError(
                f"{section}.{key}: expected >= 1, got {getattr(getattr(cfg, section), key)}"
            )
    if t.grad_accum < 0:
        raise ConfigError(f"train.grad_accum: expected >= 0 (0: derived), got {t.grad_accum}")
    c, f = cfg.checkpoint, cfg.faults
    for key, value in (("checkpoint.keep_every", c.keep_every),
                       ("faults.grace_s", f.grace_s), ("faults.grad_norm_spike", f.grad_norm_spike),
                       ("tracking.flush_s", cfg.tracking.flush_s),
                       ("tracking.peak_tflops", cfg.tracking.peak_tflops)):  # fmt: skip
        if value < 0:
            raise ConfigError(f"{key}: expected >= 0, got {value}")
    import signal

    for name in f.signals.split(","):
        if name.strip() and not isinstance(getattr(signal, name.strip(), None), signal.Signals):
            raise ConfigError(
                f"faults.signals: {name.strip()!r} is not a signal name (e.g. SIGTERM)"
            )
    if f.collective_timeout_s <= 0:
        raise ConfigError(
            f"faults.collective_timeout_s: expected > 0, got {f.collective_timeout_s}"
        )
    if c.universal_timeout_s <= 0:
        raise ConfigError(
            f"checkpoint.universal_timeout_s: expected > 0, got {c.universal_timeout_s}"
        )
    if t.lr <= 0:
        raise ConfigError(f"train.lr: expected > 0, got {t.lr}")
    for name, impl, known in (
        ("model.attention", cfg.model.attention, ATTENTION_IMPLS),
        ("train.adamw_impl", t.adamw_impl, ADAMW_IMPLS),
    ):
        if impl not in known:
            raise ConfigError(f"{name}: unknown {impl!r} (known: {', '.join(known)})")
    if t.offload_optimizer and t.zero_stage == 0:
        raise ConfigError("train.offload_optimizer: needs train.zero_stage 1-3, got 0")
    if cfg.model.hidden_size % cfg.model.num_heads:
        raise ConfigError(
            f"model.hidden_size: {cfg.model.hidden_size} is not divisible by "
            f"model.num_heads={cfg.model.num_heads}"
        )
    for key, value in (("data.frame_stride", cfg.data.frame_stride),
                       ("data.num_frames", cfg.data.num_frames)):  # fmt: skip
        if value < 1:
            raise ConfigError(f"{key}: expected >= 1, got {value}")
    d = cfg.data
    for key in ("num_workers", "shuffle_buffer", "readahead"):
        if getattr(d, key) < 0:
            raise ConfigError(f"data.{key}: expected >= 0, got {getattr(d, key)}")
    if d.partitions < 1:
        raise ConfigError(f"data.partitions: expected >= 1, got {d.partitions}")
    if not 0.0 < d.min_crop_scale <= 1.0:
        raise ConfigError(f"data.min_crop_scale: expected in (0, 1], got {d.min_crop_scale}")
    if not 0.0 <= d.flip_prob <= 1.0:
        raise ConfigError(f"data.flip_prob: expected in [0, 1], got {d.flip_prob}")
    for key in ("max_member_mb", "cache_gb"):
        if getattr(d, key) <= 0:
            raise ConfigError(f"data.{key}: expected > 0, got {getattr(d, key)}")
    _check_sources(d)
    problem = cfg.storage.retry.problem()
    if problem:
        raise ConfigError(f"storage.retry.{problem}")


RAW_FORMATS = ("auto", "webdataset", "jsonl", "parquet", "text")
PACK_MODES = ("none", "documents")
_SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _check_sources(d: DataConfig) -> None:
    """One of data.url and data.sources; sources with unique names and positive weights."""
    if bool(d.url) == bool(d.sources):
        raise ConfigError(
            "data.url: give either data.url or data.sources (a mixture), not "
            + ("both" if d.url else "neither")
        )
    for key, value, allowed in (("data.format", d.format, RAW_FORMATS),
                                ("data.pack", d.pack, PACK_MODES)):  # fmt: skip
        if value not in allowed:
            raise ConfigError(f"{key}: expected one of {', '.join(allowed)}, got {value!r}")
    if d.pack_rows < 0:
        raise ConfigError(f"data.pack_rows: expected >= 0, got {d.pack_rows}")
    seen: set[str] = set()
    for i, src in enumerate(d.sources):
        key = f"data.sources[{i}]"
        if not _SOURCE_NAME.fullmatch(src.name):
            raise ConfigError(
                f"{key}.name: expected letters, digits, _ . - (at most 64), got {src.name!r:.80}"
            )
        if src.name in seen:
            raise ConfigError(f"{key}.name: {src.name!r} names two sources")
        seen.add(src.name)
        if not src.url:
            raise ConfigError(f"{key}.url: empty")
        if not src.weight > 0:
            raise ConfigError(f"{key}.weight: expected > 0, got {src.weight}")
        if src.format and src.format not in RAW_FORMATS:
            raise ConfigError(
                f"{key}.format: expected one of {', '.join(RAW_FORMATS)}, got {src.format!r}"
            )


def data_sources(d: DataConfig) -> list[SourceConfig]:
    """The run's sources: data.sources, or data.url as the one source `data` (weight 1), each
    with data.format and data.text_field filled in where it names none."""
    given = d.sources or [SourceConfig(name="data", url=d.url)]
    return [dataclasses.replace(s, format=s.format or d.format,
                                text_field=s.text_field or d.text_field) for s in given]  # fmt: skip


@dataclass(frozen=True)
class BatchPlan:
    micro_batch_size: int
    grad_accum: int
    world_size: int
    global_batch_size: int

    def describe(self) -> str:
        return (
            f"{self.micro_batch_size} micro × {self.grad_accum} accumulation × "
            f"{self.world_size} ranks = {self.global_batch_size} global batch"
        )


_DS_BATCH_KEYS = {
    "train_micro_batch_size_per_gpu": "micro_batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "train_batch_size": "global_batch_size",
}


def batch_plan(cfg: Config, world_size: int) -> BatchPlan:
    """Derive the batch arithmetic once; contradictions between fields are errors."""
    t = cfg.train
    ds = cfg.deepspeed
    micro = ds.get("train_micro_batch_size_per_gpu", t.micro_batch_size)
    accum = ds.get("gradient_accumulation_steps", t.grad_accum)
    for ds_key, our in _DS_BATCH_KEYS.items():
        if our == "global_batch_size" or (our == "grad_accum" and not t.grad_accum):
            continue
        if ds_key in ds and ds[ds_key] != getattr(t, our):
            raise ConfigError(
                f"deepspeed.{ds_key}: {ds[ds_key]} contradicts train.{our}={getattr(t, our)}"
            )
    if not accum:  # derived: the global batch, whatever the number of ranks
        key, given = "train.global_batch_size", t.global_batch_size
        if not given:
            key, given = "deepspeed.train_batch_size", ds.get("train_batch_size", 0)
        if given % (micro * world_size):
            raise ConfigError(
                f"{key}: {given} is not a multiple of {micro} micro × {world_size} ranks = "
                f"{micro * world_size} (change train.micro_batch_size, or set train.grad_accum)"
            )
        accum = given // (micro * world_size) or 1
    derived = micro * accum * world_size
    for key, given in (
        ("train.global_batch_size", t.global_batch_size),
        ("deepspeed.train_batch_size", ds.get("train_batch_size", 0)),
    ):
        if given and given != derived:
            raise ConfigError(
                f"{key}: {given} contradicts {micro} micro × {accum} accumulation × "
                f"{world_size} ranks = {derived}"
            )
    slots = world_size * max(1, cfg.data.num_workers)
    if cfg.data.partitions % slots or derived % slots:
        raise ConfigError(
            f"data.partitions: {cfg.data.partitions} partitions and the global batch {derived} "
            f"must both be multiples of {world_size} ranks × {max(1, cfg.data.num_workers)} "
            f"data workers = {slots}"
        )
    return BatchPlan(micro, accum, world_size, derived)


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config: the user's `deepspeed:` section plus fields derived from `train`."""
    plan = batch_plan(cfg, world_size)
    ds = dict(cfg.deepspeed)
    ds["train_micro_batch_size_per_gpu"] = plan.micro_batch_size
    ds["gradient_accumulation_steps"] = plan.grad_accum
    ds["train_batch_size"] = plan.global_batch_size
    zero = dict(ds.get("zero_optimization", {}))
    if "stage" in zero and zero["stage"] != cfg.train.zero_stage:
        raise ConfigError(
            f"deepspeed.zero_optimization.stage: {zero['stage']} contradicts "
            f"train.zero_stage={cfg.train.zero_stage}"
        )
    zero["stage"] = cfg.train.zero_stage
    if cfg.train.zero_stage == 3:
        # DeepSpeed's defaults are sized for models of billions of parameters: a 5e8-element
        # bucket (1 GB in bf16) allocated on every rank whatever the model, and every tensor
        # under 1e5 elements kept whole on every rank. Sized by the model's width instead, as
        # transformers' "auto" values do; a user's own values win.
        h = cfg.model.hidden_size
        zero.setdefault("reduce_bucket_size", h * h)
        zero.setdefault("stage3_prefetch_bucket_size", int(0.9 * h * h))
        zero.setdefault("stage3_param_persistence_threshold", 10 * h)
    if cfg.train.offload_optimizer:
        zero.setdefault("offload_optimizer", {"device": "cpu", "pin_memory": True})
    ds["zero_optimization"] = zero
    ds.setdefault("gradient_clipping", cfg.train.grad_clip)
    if cfg.train.bf16:
        ds["bf16"] = {"enabled": True, **ds.get("bf16", {})}
    ds.setdefault("steps_per_print", 10**9)  # our own logger reports; keep DeepSpeed quiet
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as YAML writes it (the dry run, config.yaml, MLflow params through flatten):
    the objective's settings under `model`, after the common keys, as a config file sets them."""
    d = dataclasses.asdict(cfg)
    d["model"] = {**d["model"], **d.pop("objective_settings")}
    return d


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: the form MLflow params take."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out
