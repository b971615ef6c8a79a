"""The memory plan: what one rank will hold while it trains, worked out before anything is
allocated (`darkmatter pretrain CONFIG --plan`).

Per rank, in bytes, for Ψ trainable and Φ frozen parameters, N ranks, mixed-precision Adam
(ZeRO paper, Rajbhandari et al. 2020, section 3; w = 2 bytes per weight in bf16, 4 in fp32):

    weights      w (Ψ + Φ)          / N under ZeRO-3; plus 4 T for an EMA teacher of T weights
                                    (fp32 buffers, whole on every rank)
    gradients    w Ψ                / N under ZeRO-2 and 3
    optimizer    12 Ψ (fp32 master weights, momentum, variance)
                                    / N under ZeRO-1, 2 and 3; 8 Ψ at ZeRO-0 in fp32, where no
                                    master copy is kept. Offloaded (train.offload_optimizer):
                                    on the host, with the fp32 gradients, 16 Ψ / N
    step         the optimizer step's transients: the fp32 copy of the gradient partition
                 (4 Ψ / N in bf16) and, for torch's AdamW unless fused, two fp32 temporaries of
                 the partition's size
    buffers      DeepSpeed's reduce bucket (deepspeed.zero_optimization.reduce_bucket_size
                 elements, twice with overlap_comm): allocated when the first gradient of every
                 backward arrives under ZeRO-1 and 2, kept under ZeRO-3; and under ZeRO-3 the
                 weights it keeps gathered (up to stage3_max_live_parameters, at least the
                 largest module)
    activations  measured, not guessed: the objective's own model runs forward and backward on
                 a micro-batch of the configured shape under torch's FakeTensorMode (shapes and
                 dtypes, no storage) with torch.distributed._tools.MemTracker counting what is
                 alive beyond parameters and gradients (activations saved for backward,
                 temporaries), at its most and when the first gradient arrives. It runs on 1-
                 and 2-layer copies of the model and is extrapolated to num_layers: a block adds
                 the same bytes, with and without checkpointing.

    peak = weights + gradients + optimizer + ZeRO-3's buffers
           + max(activations, at the first gradient + ZeRO-1/2's bucket, step)

The verdict compares the peak with the device's memory (`--gpu-memory 80GB`, else the local
GPU's, else this host's memory shared by its ranks, what is offloaded included).
bench/memory_plan.py checks the plan against the measured peak at 2 ranks.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

from darkmatter.data_pipeline.transforms import SAMPLE_RATE
from darkmatter.trainer.config import Config, deepspeed_config
from darkmatter.trainer.objectives import OBJECTIVES, Objective
from darkmatter.trainer.objectives.teacher import PREFIX as TEACHER_PREFIX

K_ADAM = 12  # fp32 master weights, momentum and variance, bytes per trainable parameter
# DeepSpeed 0.19's defaults for the buffers it sizes by these keys.
DEEPSPEED_REDUCE_BUCKET = 500_000_000
DEEPSPEED_MAX_LIVE = 1_000_000_000
# Meta for planning without the data (the config's data unreachable from where the plan runs):
# text planned with BERT's WordPiece vocabulary.
PLANNING_META: dict[str, dict[str, Any]] = {
    "text": {"modality": "text", "vocab_size": 30522,
             "special_tokens": {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103}},
    "image": {"modality": "image"}, "video": {"modality": "video"}, "audio": {"modality": "audio"},
}  # fmt: skip


@dataclass
class Plan:
    """Bytes one rank holds while it trains (see the module's docstring for each term)."""

    ranks: int
    zero_stage: int
    bf16: bool
    offload: bool
    checkpointing: bool
    micro_batch_size: int
    trainable: int
    frozen: int
    teacher: int
    weights: float
    gradients: float
    optimizer: float
    host_optimizer: float
    resident_buffers: float  # ZeRO-3: its reduce bucket and the parameters it keeps gathered
    reduce_bucket: float  # ZeRO-1/2: allocated at the first gradient of every backward
    step_extra: float  # the optimizer step's fp32 gradients and temporaries
    activations: float  # the peak of forward and backward, without activation checkpointing
    activations_checkpointed: float
    at_first_grad: float  # what is still alive when the first gradient arrives, without
    at_first_grad_checkpointed: float  # and with checkpointing

    @property
    def model_states(self) -> float:
        return self.weights + self.gradients + self.optimizer

    def backward_extra(self, micro_batch_size: int, checkpointing: bool) -> float:
        scale = micro_batch_size / self.micro_batch_size
        act = self.activations_checkpointed if checkpointing else self.activations
        first = self.at_first_grad_checkpointed if checkpointing else self.at_first_grad
        return max(act * scale, first * scale + self.reduce_bucket)

    def total_with(self, micro_batch_size: int, checkpointing: bool) -> float:
        """The device total at this micro-batch (activations scale with it)."""
        busiest = max(self.backward_extra(micro_batch_size, checkpointing), self.step_extra)
        return self.model_states + self.resident_buffers + busiest

    @property
    def device_total(self) -> float:
        return self.total_with(self.micro_batch_size, self.checkpointing)

    def largest_micro_batch(self, capacity: float, checkpointing: bool) -> int:
        """The largest micro-batch whose total fits in `capacity` (0: none)."""
        lo, hi = 0, 1
        while self.total_with(hi, checkpointing) <= capacity and hi < 1 << 20:
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.total_with(mid, checkpointing) <= capacity else (lo, mid)
        return lo

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["device_total"] = self.device_total
        return d


def model_states(trainable: int, frozen: int, stage: int, ranks: int, bf16: bool,
                 offload: bool, teacher: int = 0) -> dict[str, float]:  # fmt: skip
    """The ZeRO paper's per-rank model-state bytes (weights, gradients, optimizer states on the
    device, optimizer states on the host); an EMA teacher's weights are fp32 buffers, whole on
    every rank (trainer.objectives.teacher)."""
    w = 2 if bf16 else 4
    weights = w * (trainable + frozen) / (ranks if stage >= 3 else 1) + 4 * teacher
    gradients = w * trainable / (ranks if stage >= 2 else 1)
    k = K_ADAM if bf16 or stage >= 1 else 8  # ZeRO-0 in fp32: torch's AdamW, no master copy
    optimizer = k * trainable / (ranks if stage >= 1 else 1)
    host = 0.0
    if offload:  # DeepSpeed's CPU Adam steps on the host, on fp32 gradients kept there
        host, optimizer = optimizer + 4 * trainable / (ranks if stage >= 1 else 1), 0.0
    return {"weights": weights, "gradients": gradients, "optimizer": optimizer, "host": host}


def deepspeed_buffers(cfg: Config, ds: dict[str, Any], params: int,
                      largest_module: int) -> tuple[float, float]:  # fmt: skip
    """(bytes DeepSpeed keeps through the step, bytes it allocates at every backward) on a rank.
    ZeRO-1/2 allocate the reduce bucket (reduce_bucket_size elements, twice with overlap_comm)
    when the first gradient arrives, with contiguous_gradients. ZeRO-3 keeps its bucket, and
    keeps gathered parameters (up to stage3_max_live_parameters, all of a smaller model's, at
    least the largest module) until it releases them."""
    zero = ds.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    if stage == 0:
        return 0.0, 0.0
    w = 2 if cfg.train.bf16 else 4
    overlap = bool(zero.get("overlap_comm", stage == 3))
    bucket = float(zero.get("reduce_bucket_size", DEEPSPEED_REDUCE_BUCKET)) * w * (1 + overlap)
    if stage < 3:
        return 0.0, bucket if zero.get("contiguous_gradients", True) else 0.0
    live = float(zero.get("stage3_max_live_parameters", DEEPSPEED_MAX_LIVE))
    return bucket + w * max(largest_module, min(live, params)), 0.0


def step_bytes(cfg: Config, trainable: int, ranks: int) -> float:
    """The optimizer step's transient bytes on the device: in bf16 under ZeRO, the fp32 copy of
    the rank's gradient partition; torch's AdamW (unless fused) adds two fp32 temporaries of
    the partition's size (the square root of the variance and its quotient). None with the
    optimizer offloaded: DeepSpeed's CPU Adam steps on the host."""
    t = cfg.train
    if t.offload_optimizer:
        return 0.0
    part = trainable / (ranks if t.zero_stage >= 1 else 1)
    fp32_grads = 4 * part if t.bf16 and t.zero_stage >= 1 else 0.0
    fused = t.adamw_impl == "fused" or (t.adamw_impl == "auto" and torch.cuda.is_available())
    return fp32_grads + (0.0 if fused else 8 * part)


def parse_bytes(text: str) -> float:
    """'80GB', '80 GiB', '24G', '512MiB' -> bytes (GB = 1e9, GiB = 2**30)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", text)
    if not m:
        raise ValueError(f"--gpu-memory: expected a size such as 80GB or 24GiB, got {text!r}")
    power = " KMGT".index(m.group(2).upper() or " ")
    return float(m.group(1)) * (1024 if m.group(3) else 1000) ** power


def local_capacity(ranks_here: int) -> tuple[float, str]:
    """The memory one rank may use here: the local GPU's, else this host's shared by its ranks."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return float(props.total_memory), f"per device: the local {props.name}"
    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    return total / max(1, ranks_here), f"per rank: this host's memory / {ranks_here} ranks"


def synthetic_samples(objective: Objective, cfg: Config, n: int) -> list[dict[str, Any]]:
    """`n` samples of the largest shape the configured data gives the objective: full text rows,
    images and clips at the configured size, audio clips of the configured length."""
    rng = np.random.default_rng(0)
    d, modality = cfg.data, objective.modality
    if modality == "text":
        vocab = int(objective.meta["vocab_size"])
        return [{"input_ids": rng.integers(5, vocab, d.seq_len)} for _ in range(n)]
    if modality == "image":
        return [{"image": rng.integers(0, 256, (d.image_size, d.image_size, 3), dtype=np.uint8)}
                for _ in range(n)]  # fmt: skip
    if modality == "video":
        t = d.num_frames * d.frame_stride
        return [{"frames": rng.integers(0, 256, (t, d.image_size, d.image_size, 3),
                                        dtype=np.uint8)} for _ in range(n)]  # fmt: skip
    if modality == "audio":
        length = round(d.audio_seconds * SAMPLE_RATE)
        return [{"audio": rng.standard_normal(length).astype(np.float32),
                 "sample_rate": SAMPLE_RATE} for _ in range(n)]  # fmt: skip
    raise ValueError(f"objective {cfg.objective}: no synthetic samples for {modality} data")


def _peak_beyond_states(cfg: Config, meta: dict[str, Any], fake: bool) -> tuple[float, float]:
    """Bytes alive beyond parameters, buffers and gradients at the peak of one micro-batch's
    forward and backward, and when the first gradient arrives. `fake`: under FakeTensorMode,
    nothing allocated; otherwise real tensors (for models whose forward reads the data's
    values)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from darkmatter.trainer.engine import set_throughput_features

    objective = OBJECTIVES[cfg.objective](cfg, meta)
    samples = synthetic_samples(objective, cfg, cfg.train.micro_batch_size)
    batch = objective.to_device(objective.make_batch(samples, torch.Generator().manual_seed(0)),
                                "cpu", cfg.train.bf16)  # fmt: skip
    dtype = torch.bfloat16 if cfg.train.bf16 else torch.float32
    # Kernels differ by device (SDPA's flash kernels keep no [seq, seq] scores): on a GPU host
    # the fake tensors are CUDA tensors, so the figure is the GPU's.
    device = "cuda" if fake and torch.cuda.is_available() else "cpu"
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    mode = fake_mode if fake else contextlib.nullcontext()
    with torch.device("meta") if fake else contextlib.nullcontext():
        model = objective.build_model()
    if not fake:
        torch.nn.Module.to(model, dtype)
    with mode:
        if fake:  # constants (normalization, tables) stay real
            _fake_weights(model, dtype, device)
            batch = {k: fake_mode.from_tensor(v).to(device) if torch.is_tensor(v) else v
                     for k, v in batch.items()}  # fmt: skip
        set_throughput_features(model, cfg)
        model.train()
        tracker = _tracker_class()()
        tracker.track_external(model, *[v for v in batch.values() if torch.is_tensor(v)])
        first: list[float] = []

        def on_grad(_: torch.Tensor) -> None:
            if not first:
                first.append(_beyond(tracker.get_tracker_snapshot("current")))

        hooks = [p.register_post_accumulate_grad_hook(on_grad) for p in model.parameters()]
        with tracker:
            model(**batch).loss.backward()
        for h in hooks:
            h.remove()
    return tracker.most, first[0] if first else 0.0


def _beyond(snap: dict[Any, dict[Any, int]]) -> float:
    """A MemTracker snapshot's bytes beyond parameters, buffers and gradients (all devices)."""
    from torch.distributed._tools.mem_tracker import _MemRefType

    kinds = (_MemRefType.PARAM, _MemRefType.BUFFER, _MemRefType.GRAD)
    return float(sum(d["Total"] - sum(d.get(k, 0) for k in kinds) for d in snap.values()))


def _tracker_class() -> type:
    from torch.distributed._tools.mem_tracker import MemTracker

    class Tracker(MemTracker):
        """MemTracker that also keeps the most bytes beyond the model's states seen after any
        op (its own peak is of the total: in backward, gradients take the activations' place)."""

        def __init__(self) -> None:
            super().__init__()
            self.most = 0.0

        def _update_peak_stats(self, peak_state: Any) -> None:
            super()._update_peak_stats(peak_state)
            self.most = max(self.most, _beyond(self._curr_mem_snap))

    return Tracker


def _fake_weights(model: torch.nn.Module, dtype: torch.dtype, device: str) -> None:
    """Give a model built on the meta device fake tensors on `device` (inside a FakeTensorMode),
    `dtype` for its floating-point parameters and buffers. Every parameter requires grad
    (MemTracker hooks each one); a frozen teacher runs under no_grad, so that adds nothing."""
    fakes: dict[int, torch.Tensor] = {}

    def fake(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in fakes:  # tied weights stay tied
            dt = dtype if t.is_floating_point() else t.dtype
            empty = torch.empty(t.shape, dtype=dt, device=device)
            is_param = isinstance(t, torch.nn.Parameter)
            fakes[id(t)] = torch.nn.Parameter(empty, requires_grad=True) if is_param else empty
        return fakes[id(t)]

    for module in model.modules():
        for slots in (cast(dict[str, Any], module._parameters), module._buffers):
            for name, t in slots.items():
                if t is not None:
                    slots[name] = fake(t)


def _scaled(cfg: Config, layers: int, micro_batch: int, checkpointing: bool) -> Config:
    out = copy.deepcopy(cfg)
    out.model = dataclasses.replace(out.model, num_layers=layers)
    out.train = dataclasses.replace(out.train, activation_checkpointing=checkpointing,
                                    micro_batch_size=micro_batch)  # fmt: skip
    return out


def activation_bytes(cfg: Config, meta: dict[str, Any], checkpointing: bool) -> tuple[float, float]:
    """Activation and temporary bytes at the peak of a micro-batch's forward and backward, and
    when its first gradient arrives: from 1- and 2-layer copies of the model, extrapolated to
    cfg.model.num_layers (a block adds the same bytes). Under FakeTensorMode at the configured
    micro-batch; a model whose forward reads the data's values (boolean masks, .item()) runs
    for real at micro-batches 1 and 2 instead, extrapolated to the configured one as well."""
    from torch._subclasses.fake_tensor import (
        DataDependentOutputException,
        DynamicOutputShapeException,
    )

    layers, micro = cfg.model.num_layers, cfg.train.micro_batch_size

    def run(n: int, b: int, fake: bool) -> np.ndarray:
        return np.array(_peak_beyond_states(_scaled(cfg, n, b, checkpointing), meta, fake))

    try:
        a1, a2 = run(1, micro, True), run(2, micro, True)
        out = a1 + (layers - 1) * (a2 - a1)
    except (DataDependentOutputException, DynamicOutputShapeException):
        g = {(n, b): run(n, b, False) for n in (1, 2) for b in (1, 2)}
        per_layer, per_sample = g[2, 1] - g[1, 1], g[1, 2] - g[1, 1]
        per_both = g[2, 2] - g[2, 1] - g[1, 2] + g[1, 1]
        out = (g[1, 1] + (layers - 1) * per_layer + (micro - 1) * per_sample
               + (layers - 1) * (micro - 1) * per_both)  # fmt: skip
    return float(out[0]), float(out[1])


def count_parameters(objective: Objective) -> tuple[int, int, int, int]:
    """(trainable parameters, frozen parameters, an EMA teacher's weights, the largest module's
    own parameters), built on the meta device."""
    with torch.device("meta"):
        model = objective.build_model()
    params = {id(p): p for p in model.parameters()}.values()
    trainable = sum(p.numel() for p in params if p.requires_grad)
    frozen = sum(p.numel() for p in params if not p.requires_grad)
    teacher = sum(b.numel() for n, b in model.named_buffers() if n.startswith(TEACHER_PREFIX))
    largest = max(
        (sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0
    )
    return trainable, frozen, teacher, largest


def plan(cfg: Config, meta: dict[str, Any], ranks: int) -> Plan:
    """The plan of `cfg` on `ranks` ranks; `meta` is the data's (trainer.preflight.dataset_meta)
    or PLANNING_META's."""
    objective = OBJECTIVES[cfg.objective](cfg, meta)
    trainable, frozen, teacher, largest = count_parameters(objective)
    ds = deepspeed_config(cfg, ranks)
    t = cfg.train
    states = model_states(trainable, frozen, t.zero_stage, ranks, t.bf16, t.offload_optimizer,
                          teacher)  # fmt: skip
    resident, bucket = deepspeed_buffers(cfg, ds, trainable + frozen, largest)
    act, first = activation_bytes(cfg, meta, checkpointing=False)
    act_ckpt, first_ckpt = activation_bytes(cfg, meta, checkpointing=True)
    return Plan(
        ranks=ranks, zero_stage=t.zero_stage, bf16=t.bf16, offload=t.offload_optimizer,
        checkpointing=t.activation_checkpointing, micro_batch_size=t.micro_batch_size,
        trainable=trainable, frozen=frozen, teacher=teacher,
        weights=states["weights"], gradients=states["gradients"],
        optimizer=states["optimizer"], host_optimizer=states["host"],
        resident_buffers=resident, reduce_bucket=bucket,
        step_extra=step_bytes(cfg, trainable, ranks),
        activations=act, activations_checkpointed=act_ckpt,
        at_first_grad=first, at_first_grad_checkpointed=first_ckpt,
    )  # fmt: skip


def _gb(x: float) -> str:
    return f"{x / 1e9:8.2f} GB"


def render(
    p: Plan, capacity: float, where: str, host_is_device: bool = False
) -> tuple[list[str], list[str]]:
    """(the plan's lines, its warnings) for a device of `capacity` bytes; `host_is_device`:
    the ranks run on the host's CPUs, so what is offloaded to the host counts as well."""
    stage = f"ZeRO-{p.zero_stage}" + (", optimizer offloaded to the host" if p.offload else "")
    mark = {True: "   <- configured", False: ""}
    teacher = f", {p.teacher / 1e6:.1f} M EMA teacher (fp32, whole)" if p.teacher else ""
    host = f"   (+{_gb(p.host_optimizer).strip()} in host memory)" if p.offload else ""
    lines = [
        f"# memory plan, per rank: {p.ranks} ranks, {stage}, "
        f"{'bf16' if p.bf16 else 'fp32'}, micro-batch {p.micro_batch_size}",
        f"parameters        {p.trainable / 1e6:8.1f} M trainable, {p.frozen / 1e6:.1f} M frozen"
        + teacher,
        f"weights           {_gb(p.weights)}",
        f"gradients         {_gb(p.gradients)}",
        f"optimizer states  {_gb(p.optimizer)}{host}",
        f"deepspeed buffers {_gb(p.resident_buffers)}   kept (ZeRO-3: bucket, gathered weights)",
        f"                  {_gb(p.reduce_bucket)}   at every backward (ZeRO-1/2 reduce bucket)",
        f"activations       {_gb(p.activations)}   peak without checkpointing"
        + mark[not p.checkpointing],
        f"                  {_gb(p.activations_checkpointed)}   peak with checkpointing"
        + mark[p.checkpointing],
        f"optimizer step    {_gb(p.step_extra)}   fp32 gradients and temporaries",
        f"peak              {_gb(p.device_total)}   "
        f"(without checkpointing {_gb(p.total_with(p.micro_batch_size, False)).strip()}, "
        f"with {_gb(p.total_with(p.micro_batch_size, True)).strip()})",
    ]
    room = capacity
    if host_is_device and p.host_optimizer:
        room -= p.host_optimizer
        lines.append(f"host part         {_gb(p.host_optimizer)}   in the same memory here")
    need = p.device_total + (capacity - room)
    lines.append(f"memory            {_gb(capacity)}   {where}")
    if p.device_total <= room:
        lines.append(f"verdict: fits ({need / capacity:.0%} of it)")
        return lines, []
    lines.append(f"verdict: does not fit ({need / capacity:.0%} of it)")
    fit = p.largest_micro_batch(room, p.checkpointing)
    fit_ckpt = p.largest_micro_batch(room, True)
    if fit >= 1:
        advice = f"lower train.micro_batch_size to {fit}"
        if not p.checkpointing and fit_ckpt > fit:
            advice += f" ({fit_ckpt} with train.activation_checkpointing: true)"
    elif fit_ckpt >= 1:
        advice = f"set train.activation_checkpointing: true (then micro-batch {fit_ckpt} fits)"
    else:
        ways = ["raise train.zero_stage"] * (p.zero_stage < 3)
        ways += ["set train.offload_optimizer: true"] * (not p.offload)
        if p.zero_stage == 3 and p.resident_buffers > 0.1 * capacity:
            ways.append("lower deepspeed.zero_optimization.stage3_max_live_parameters")
        advice = f"not even a micro-batch of 1 fits: {', '.join(ways + ['use more ranks'])}"
    warning = (f"warning: train.micro_batch_size {p.micro_batch_size} needs "
               f"{need / 1e9:.2f} GB per rank, {capacity / 1e9:.2f} GB available "
               f"({where}): {advice}")  # fmt: skip
    return lines, [warning]
