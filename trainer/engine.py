"""The one module that imports DeepSpeed: process group, engine construction, checkpoint I/O.

The optimizer (AdamW, no decay on biases and norms) and the warmup + cosine schedule are built
here as plain torch objects and handed to DeepSpeed, so the schedule is a pure function of the
step and the same code runs under ZeRO stages 0-3.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine
from deepspeed.utils import groups as ds_groups
from transformers import PreTrainedModel
from transformers.integrations import HfDeepSpeedConfig

from darkmatter.trainer import checkpoint_reader as reader
from darkmatter.trainer.config import Config
from darkmatter.trainer.objectives.teacher import PREFIX as TEACHER_PREFIX

log = logging.getLogger("darkmatter.engine")


def use_deterministic_algorithms(on: bool) -> None:
    """train.deterministic: on, PyTorch picks deterministic kernels or raises for ops without
    one; cuDNN stops autotuning (its choice may differ between runs); cuBLAS gets the fixed
    workspace it needs for deterministic results (the variable is read when its first handle
    is made, so this runs before anything touches the GPU). Off: PyTorch's defaults."""
    if not on:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def init_distributed(timeout_s: float = 1800.0) -> tuple[int, int, int]:
    """Join the process group of a launcher (torchrun, deepspeed, srun), or make one of size 1.

    `timeout_s` (faults.collective_timeout_s) bounds every collective of the training thread's
    groups: a rank whose peer is gone (node lost, link cut) fails after it instead of hanging.
    Returns (rank, world_size, local_rank). This is the only place that reads RANK & co.
    """
    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
            MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())),
        )  # fmt: skip
    if "TORCHELASTIC_RUN_ID" in os.environ:
        _die_with_parent()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timeout)
    if ds_groups._WORLD_GROUP is None:
        # ZeRO's collectives run on DeepSpeed's clone of the world group, which it would create
        # with torch's default timeout (30 min), not the one above: create it here, with ours.
        ds_groups._WORLD_GROUP = dist.new_group(ranks=range(dist.get_world_size()), timeout=timeout)
    global _CONTROL
    if backend != "gloo" and dist.get_world_size() > 1:
        # The loop's small collectives (figures to log, flags, states) travel as CPU tensors and
        # pickles, which NCCL cannot carry: they get a gloo group of their own.
        _CONTROL = dist.new_group(backend="gloo", timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


_CONTROL: Any = None  # the group of the training thread's CPU collectives (None: the default)


def _die_with_parent() -> None:
    """Under torchrun each rank runs in a session of its own: if the agent is SIGKILLed, ranks
    would train on as orphans and race a restarted job for the same checkpoint folder. Ask the
    kernel to kill this rank when its parent dies (Linux only; elsewhere a no-op)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def lr_lambda(cfg: Config) -> Callable[[int], float]:
    """Multiplier of the peak lr at a step: linear warmup, then cosine down to min_lr_ratio."""
    t = cfg.train
    warmup, total, floor = t.warmup_steps, t.steps, t.min_lr_ratio

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def param_groups(
    model: torch.nn.Module, weight_decay: float, lr_scale: Callable[[str], float] | None = None
) -> list[dict[str, Any]]:
    """Decay matrices only; biases and norm weights (1-D) are not decayed. A parameter built
    under ZeRO-3 is a 1-D placeholder: its real shape is `ds_shape`. With `lr_scale` (a
    parameter's name -> its learning rate as a multiple of train.lr, the objective's), one group
    per scale, its multiple under "lr_scale"."""
    groups: dict[tuple[bool, float], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decay = len(getattr(p, "ds_shape", p.shape)) >= 2
            groups.setdefault((decay, lr_scale(name) if lr_scale else 1.0), []).append(p)
    return [
        {"params": params, "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale}
        for (decay, scale), params in sorted(
            groups.items(), key=lambda kv: (not kv[0][0], kv[0][1])
        )
    ]


def set_throughput_features(model: PreTrainedModel, cfg: Config) -> None:
    """The model-side settings of cfg: attention kernel, activation checkpointing."""
    if cfg.model.attention == "flash_attention_2" and not torch.cuda.is_available():
        raise ValueError("model.attention: flash_attention_2 needs a GPU (use sdpa here)")
    if model.config._attn_implementation != cfg.model.attention:
        model.set_attn_implementation(cfg.model.attention)
    if cfg.train.activation_checkpointing:
        # Non-reentrant: works with inputs that need no grad and under ZeRO-3's hooks.
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )


def build_optimizer(
    model: torch.nn.Module, cfg: Config, lr_scale: Callable[[str], float] | None = None
) -> torch.optim.Optimizer:
    """AdamW over param_groups(); DeepSpeed's CPU Adam when the optimizer is offloaded."""
    groups, t = param_groups(model, cfg.train.weight_decay, lr_scale), cfg.train
    for group in groups:
        group["lr"] = t.lr * group.pop("lr_scale")
    if t.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=t.lr, betas=(0.9, 0.999), adamw_mode=True)
    impl = t.adamw_impl
    if impl == "auto":
        impl = "fused" if torch.cuda.is_available() else "default"
    kwargs = {"fused": {"fused": True}, "foreach": {"foreach": True},
              "loop": {"foreach": False}}.get(impl, {})  # fmt: skip
    return torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, 0.999), **kwargs)


def model_construction(ds_config: dict[str, Any]) -> contextlib.AbstractContextManager[None]:
    """Where models are built: under ZeRO-3 (`ds_config`'s stage), partitioned_construction;
    otherwise whole, as plain torch builds them."""
    if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        return partitioned_construction(ds_config)
    return contextlib.nullcontext()


@contextlib.contextmanager
def partitioned_construction(ds_config: dict[str, Any]) -> Iterator[None]:
    """Build models inside this under ZeRO-3: deepspeed.zero.Init partitions every parameter
    across the ranks as soon as the module that owns it is constructed, so a rank never holds
    more than one module whole (each keeps 1/N of the model, in the dtype of `ds_config`).

    transformers initializes weights in `post_init()` (`initialize_weights`), which would find
    the built modules' parameters already partitioned and initialize nothing; its own ZeRO-3
    path (`_from_config`) skips torch's default init and re-initializes afterwards on rank 0,
    which draws other random numbers than a whole build. Here `initialize_weights` runs where
    `post_init` calls it, module by module on gathered parameters, on every rank alike: the
    same random numbers in the same order as a whole build, so every ZeRO stage starts from
    the same weights for a seed and every rank's generator stays in step."""
    from transformers import PreTrainedModel
    from transformers.integrations.deepspeed import prevent_arange_dtype_change

    original = PreTrainedModel.initialize_weights
    setattr(PreTrainedModel, "initialize_weights", _initialize_gathered)  # noqa: B010
    own_hook = "__init_subclass__" in vars(torch.nn.Module)
    try:
        # zero.Init casts every floating tensor made inside it to the model's dtype, arange's
        # too: sin-cos tables built from a float64 arange would differ by an ulp.
        with prevent_arange_dtype_change(), deepspeed.zero.Init(config_dict_or_path=ds_config):
            yield
    finally:
        setattr(PreTrainedModel, "initialize_weights", original)  # noqa: B010
        if not own_hook and "__init_subclass__" in vars(torch.nn.Module):
            # zero.Init "restores" nn.Module's subclass hook by assigning the inherited one to
            # nn.Module itself, which hides typing.Generic's: a Generic nn.Module subclass
            # defined afterwards (kornia's, at its import) fails with "type object ... has no
            # attribute '__parameters__'". Remove it, as it was before.
            delattr(torch.nn.Module, "__init_subclass__")


def _initialize_gathered(model: PreTrainedModel) -> None:
    """transformers' `initialize_weights` (its `smart_apply`: children first, each sub-model
    with its own `_initialize_weights`), with each module's partitioned parameters gathered
    while it is initialized: its own, its children's (`_init_weights` may set those) and
    their parametrizations' (wav2vec2's weight-normed convolution). Rank 0's values are kept."""
    from transformers.initialization import guard_torch_init_functions

    custom = model.is_custom_code()

    def touched(module: torch.nn.Module) -> list[torch.nn.Parameter]:
        params: list[torch.nn.Parameter] = []
        for m in (module, *module.children()):
            params += m.parameters(recurse=False)
            weights = getattr(m, "parametrizations", None)  # a parametrized weight's originals
            if isinstance(weights, torch.nn.Module):
                params += weights.parameters()
        return params

    def visit(module: torch.nn.Module, fn: Callable[[torch.nn.Module, bool], None]) -> None:
        for child in module.children():
            visit(child, child._initialize_weights if isinstance(child, PreTrainedModel) else fn)
        if getattr(module, "_is_hf_initialized", False):
            return  # initialized by an inner post_init already: fn would do nothing
        with gathered(touched(module)):
            fn(module, custom)

    with torch.no_grad(), guard_torch_init_functions():
        visit(model, model._initialize_weights)


def gathered(params: Iterable[torch.nn.Parameter]) -> contextlib.AbstractContextManager[Any]:
    """The full values of ZeRO-3-partitioned `params` for the block; what rank 0 writes into
    them is kept (and copied to every rank) on exit. A no-op for parameters not partitioned."""
    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=0)


MUON = "deepspeed.runtime.zero.muon.muon_optimizer"


def import_muon_uncompiled() -> None:
    """Import DeepSpeed's Muon optimizer with its kernels compiled on first use, not at import.

    DeepSpeed (0.19) imports its Muon module wherever it builds a ZeRO or bf16 optimizer, only
    to check whether the optimizer is a Muon one; that module decorates its kernels with
    `torch.compile` at import, which imports torch._dynamo and inductor: ~4.5 s of every
    rank's start (bench/startup.py), for kernels only Muon calls and we never build it.
    Imported first here with the decorator deferred, the module is whole and its kernels
    compile when first called. A DeepSpeed without this layout is left as it is.
    """
    if MUON in sys.modules:
        return
    try:
        from deepspeed.runtime import compiler
    except ImportError:
        return
    eager = getattr(compiler, "compile", None)
    if eager is None:
        return

    def on_first_call() -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            compiled: list[Callable[..., Any]] = []

            @functools.wraps(fn)
            def call(*args: Any, **kwargs: Any) -> Any:
                if not compiled:
                    compiled.append(eager()(fn))
                return compiled[0](*args, **kwargs)

            return call

        return decorate

    compiler.compile = on_first_call
    try:
        __import__(MUON)
    except ImportError:
        pass  # DeepSpeed without Muon: its own imports of it fail the same way, and cope
    finally:
        compiler.compile = eager


def build_engine(
    cfg: Config,
    ds_config: dict[str, Any],
    build_model: Callable[[], PreTrainedModel],
    lr_scale: Callable[[str], float] | None = None,
) -> tuple[Any, HfDeepSpeedConfig]:
    """Build the model under DeepSpeed's config (partitioned as it is built under ZeRO-3; then
    the weights of `model.init_from`, if set) and wrap it in an engine. `lr_scale`: each
    parameter's learning rate as a multiple of train.lr (param_groups).

    HfDeepSpeedConfig must exist before the model is built: transformers reads it for what it
    does differently under ZeRO-3; the caller keeps the returned object alive.
    """
    hf_ds = HfDeepSpeedConfig(ds_config)
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank and every restart
    with model_construction(ds_config):
        model = build_model()
    if cfg.model.init_from:
        from darkmatter.trainer import init_from

        init_from.load(model, cfg, gathered)
    set_throughput_features(model, cfg)
    # Dropout then differs across ranks but not across restarts of the same rank.
    torch.manual_seed(cfg.train.seed * 100_003 + int(os.environ.get("RANK", "0")))
    opt = build_optimizer(model, cfg, lr_scale)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    import_muon_uncompiled()
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, config=ds_config
    )
    if cfg.train.compile:
        engine.compile()  # compiles the module in place: parameter names are unchanged
    if engine.zero_optimization_stage() == 3:  # the settings each sub-group must keep
        engine._dm_group_hparams = [
            {k: v for k, v in g.items() if k != "params"}
            for g in engine.optimizer.optimizer.param_groups
        ]
    return engine, hf_ds


class SnapshotCheckpointEngine(CheckpointEngine):  # type: ignore[misc]
    """DeepSpeed's extension point for checkpoint I/O, used to take saving off its hands.

    DeepSpeed builds each state dict as usual and calls `save(state_dict, path)`; we pass it to
    `sink(path, state_dict)` (the checkpoint writer, which snapshots it in memory and writes it
    in the background) instead of writing it here. Loading uses `weights_only=True`: our
    checkpoints hold tensors and plain data only.
    """

    def __init__(self) -> None:
        super().__init__()
        self.name = "darkmatter-snapshot"
        self.sink: Callable[[str, Any], None] | None = None

    def create(self, info: Any) -> None:
        pass

    def save(self, state_dict: Any, path: str) -> None:
        if self.sink is None:
            raise RuntimeError("checkpoint engine has no writer attached")
        self.sink(path, state_dict)

    def load(self, path: str, map_location: Any = None) -> Any:
        return torch.load(path, map_location=map_location, weights_only=True)

    def commit(self, info: Any) -> bool:
        return True

    def preserves_storage_sharing(self) -> bool:
        # False: DeepSpeed then skips cloning tensors for torch.save; our snapshot copies them.
        return False


def attach_checkpoint_engine(engine: Any) -> SnapshotCheckpointEngine:
    ce = SnapshotCheckpointEngine()
    engine.checkpoint_engine = ce
    return ce


def install_step_gate(engine: Any, should_skip: Callable[[float], bool]) -> None:
    """Let `should_skip(global_grad_norm)` veto an optimizer step, on every rank alike.

    DeepSpeed computes the global gradient norm (all-reduced, so the same on every rank) and
    then calls the base torch optimizer's step(): under ZeRO-1/2/3 once per (sub-)group, without
    ZeRO after clipping. We gate that call: a vetoed step leaves parameters and Adam's state
    untouched and raises the `overflow` flag that DeepSpeed's engine reads right after, so its
    own bookkeeping follows (was_step_applied() is False, skipped_steps counts it, the lr
    scheduler does not advance) exactly as for its own inf/NaN skips. DeepSpeed already skips
    non-finite norms under ZeRO-1/2/3; without ZeRO it would apply them, and nowhere does it
    know about spikes.
    """
    from deepspeed.runtime.utils import clip_grad_norm_

    if getattr(engine, "_dm_should_skip", None) is not None:  # already gated: new judge only
        engine._dm_should_skip = should_skip
        return
    engine._dm_should_skip = should_skip
    base, ds_opt = engine.basic_optimizer, engine.optimizer
    inner = base.step
    decided: dict[int, bool] = {}  # one decision per optimizer step, however many groups

    if ds_opt is base:  # no ZeRO: the engine clips and drops the norm; keep it

        def clip_and_keep_norm() -> None:
            engine._dm_grad_norm = clip_grad_norm_(
                parameters=engine.module.parameters(), max_norm=engine.gradient_clipping(),
                mpu=engine.mpu,
            )  # fmt: skip

        engine.clip_fp32_gradients = clip_and_keep_norm

    def norm_now() -> float:
        if ds_opt is not base:
            return float(ds_opt._global_grad_norm)  # set by DeepSpeed before it calls base.step
        if engine.gradient_clipping() > 0:
            return float(engine._dm_grad_norm)
        sq = torch.zeros((), dtype=torch.float64)
        for group in base.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    sq += p.grad.detach().double().pow(2).sum()
        return float(sq.sqrt())

    def gated_step(*args: Any, **kwargs: Any) -> Any:
        step = engine.global_steps
        if step not in decided:
            decided.clear()
            decided[step] = engine._dm_should_skip(norm_now())
        if decided[step]:
            ds_opt.overflow = True
            return None
        if ds_opt is base:
            base.overflow = False
        return inner(*args, **kwargs)

    # The lr scheduler marked base.step as its own call-tracking wrapper (`inner`), which
    # gated_step still calls: carry the mark over, or torch warns at the first scheduler step
    # that optimizer.step() "has been overridden after learning rate scheduler initialization".
    functools.update_wrapper(gated_step, inner)
    base.step = gated_step
    if ds_opt is base:
        base.overflow = False


def save_checkpoint(engine: Any, root: str, tag: str, client_state: dict[str, Any]) -> None:
    # save_latest=False: DeepSpeed would move `latest` before every rank has finished writing.
    engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=False)


def gathered_module_weights(engine: Any) -> dict[str, torch.Tensor] | None:
    """Under ZeRO-3, the module's whole state dict (weights and buffers, ties kept) on rank 0,
    None on the others: gathered a layer at a time from every rank's partitions, in the dtype
    they train in, onto the CPU (what DeepSpeed's save_16bit_model writes). Every rank must
    call it."""
    weights: dict[str, torch.Tensor] | None = engine._zero3_consolidated_16bit_state_dict()
    return weights


def load_checkpoint(engine: Any, root: str, tag: str) -> None:
    """Load a checkpoint folder into the engine; every file is unpickled with weights_only=True
    (DeepSpeed's own loaders pass weights_only=False; reader.weights_only_loads overrides them):
    a file that holds more than tensors, plain data and DeepSpeed's records is refused
    (UnsafeCheckpoint, naming it) before anything in it runs."""
    with reader.weights_only_loads(Path(root) / tag):
        path, _ = engine.load_checkpoint(root, tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag} from {root}")
    if engine.load_universal_checkpoint():
        _restore_outside_optimizer(engine, Path(root) / tag)
    if engine.load_universal_checkpoint() and engine.zero_optimization_stage() == 3:
        _repair_zero3_universal_load(engine)


def _restore_outside_optimizer(engine: Any, folder: Path) -> None:
    """DeepSpeed's universal load restores the parameters its optimizer holds and nothing else:
    frozen parameters would silently keep their initial values, buffers (an EMA teacher, batch
    norm statistics, wav2vec2's step count) their current ones. The converter wrote them all to
    `zero/<name>/fp32.pt`; they are copied back here, in each tensor's own dtype. A frozen
    parameter or teacher weight with no file is an error; other buffers without one are listed
    in a warning."""
    module = engine.module
    missing: list[str] = []
    with torch.no_grad():
        for name, tensor in module.state_dict(keep_vars=True).items():
            is_param = isinstance(tensor, torch.nn.Parameter)
            if (is_param and tensor.requires_grad) or hasattr(tensor, "ds_id"):
                continue  # the optimizer's (or partitioned by ZeRO-3 and loaded with it)
            f = folder / "zero" / name / "fp32.pt"
            if not f.is_file():
                missing.append(name)
                if is_param or name.startswith(TEACHER_PREFIX):
                    what = "frozen parameter" if is_param else "EMA teacher's weight"
                    raise RuntimeError(f"{folder}: no {f.relative_to(folder)} for the {what} "
                                       f"{name}; it cannot be resumed on another number of "
                                       "ranks")  # fmt: skip
                continue
            value = reader.load_tensors(f)["param"]  # weights_only; UnsafeCheckpoint else
            tensor.copy_(value.view(tensor.shape).to(tensor.dtype))
    if missing and dist.get_rank() == 0:
        log.warning(
            "%s has no saved value for buffers %s: they keep their current values",
            folder, ", ".join(missing[:5]) + (" …" if len(missing) > 5 else ""),
        )  # fmt: skip


def _repair_zero3_universal_load(engine: Any) -> None:
    """Undo two faults of DeepSpeed's ZeRO-3 universal loader (stage3's
    load_hp_checkpoint_state_from_checkpoint_dir_stage3): it gives every sub-group one shared
    Adam `step` tensor, which AdamW then advances once per group (wrong bias correction), and it
    copies param_groups[0]'s settings into every group (weight decay on biases and norms)."""
    base = engine.optimizer.optimizer
    for state in base.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    for group, hparams in zip(base.param_groups, engine._dm_group_hparams, strict=True):
        group.update({k: v for k, v in hparams.items() if k not in ("lr", "initial_lr")})


# DeepSpeed's converter, run as `python -m` would (alter_sys: it becomes __main__, where its
# worker pool finds its functions) with its checkpoint records allowed in weights_only loads
# (the child's environment forces weights_only on every torch.load; the pool's processes are
# forked from it and inherit both).
_UNIVERSAL_MAIN = (
    "import runpy; from darkmatter.trainer.checkpoint_reader import allow_deepspeed_records; "
    "allow_deepspeed_records(); runpy.run_module("
    "'deepspeed.checkpoint.ds_to_universal', run_name='__main__', alter_sys=True)"
)


def to_universal(src: Path, dst: Path, workers: int = 2, timeout_s: float = 3600.0) -> None:
    """Convert a ZeRO checkpoint folder to DeepSpeed's universal format (its own converter, in a
    process of its own, every file loaded with weights_only), for loading on a different number
    of ranks. `dst` is rewritten. `workers` (checkpoint.universal_workers) extract the shards;
    half as many, at least one, merge them (merging holds whole parameters in memory). Past
    `timeout_s` (checkpoint.universal_timeout_s) the converter is killed: CheckpointError."""
    shutil.rmtree(dst, ignore_errors=True)
    cmd = [
        sys.executable, "-c", _UNIVERSAL_MAIN,
        "--input_folder", str(src), "--output_folder", str(dst),
        "--inject_missing_state",  # our model does not declare its TP layout: nothing to merge
        "--num_extract_workers", str(workers), "--num_merge_workers", str(max(1, workers // 2)),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=reader.weights_only_env())  # fmt: skip
    try:
        _, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        raise reader.CheckpointError(
            f"{src}: universal checkpoint conversion did not finish within "
            f"checkpoint.universal_timeout_s={timeout_s:g} s (stopped)"
        ) from None
    if proc.returncode and "Weights only load failed" in err:  # torch's UnpicklingError
        raise reader.unsafe(reader.refused_file(src) or src, err)
    if proc.returncode:
        tail = err.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"{src}: universal checkpoint conversion failed: {tail[0]}")


def _kill_tree(proc: subprocess.Popen[str]) -> None:
    """SIGKILL a process and every process below it (the converter's worker pool), then reap."""
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        for child in psutil.Process(proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
    proc.kill()
    proc.communicate()


def local_rank() -> int:
    """This process's rank on its machine."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def side_group() -> Any:
    """A process group of its own for the checkpoint writer thread's collectives, so they never
    interleave with the training thread's (gloo: it needs no device)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return None
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=6))


def all_reduce_mean(values: list[float]) -> list[float]:
    """Mean across ranks of a few floats, in one collective."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, group=_CONTROL)
        t /= dist.get_world_size()
    return t.tolist()


def all_reduce_max(values: list[float]) -> list[float]:
    """Maximum across ranks of a few floats, in one collective (negate for a minimum)."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_CONTROL)
    return t.tolist()


def gather_to_rank0(obj: Any, group: Any = None) -> list[Any] | None:
    """Every rank's `obj` on rank 0 (in rank order), None on the others."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0, group=group or _CONTROL)
    return out


def all_gather(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's `obj` on every rank, in rank order (on `group`, default the training
    thread's control group)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=group or _CONTROL)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (what the others pass is ignored)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_CONTROL)
    return box[0]


def node_id() -> str:
    """This machine within the job: its host name, and the launcher's node rank where there is
    one (two "nodes" of a test may share a host name, never a node rank)."""
    import platform

    group = os.environ.get("GROUP_RANK") or os.environ.get("SLURM_NODEID") or ""
    return f"{platform.node()}/{group}" if group else platform.node()


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank (one small all-reduce)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_CONTROL)
    return bool(t.item() > 0)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown(together: bool = False) -> None:
    """Release the process group. `together` (a normal end, every rank here): first a barrier,
    so that no rank tears its gloo connections down while a peer still has traffic in flight on
    them (the peer's C++ runtime then aborts, exit -6); not after an error, when a peer may be
    gone and the barrier would wait for it."""
    if dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()
