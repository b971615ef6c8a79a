"""An EMA teacher (a target encoder) that every ZeRO stage handles: byol, moco, dino, ijepa and
video_future keep one.

The teacher is a copy of (part of) the online network inside the pretraining module, under the
prefix `teacher.`, whose weights are **persistent buffers**, not parameters:

- ZeRO-3 partitions parameters only. Buffers stay whole on every rank, so the teacher needs no
  gather for its forward, and its EMA update is a local operation on every rank alike (the
  online weights it reads are gathered, a chunk at a time, for the update: `ema_update`).
- DeepSpeed casts parameters to bf16 and leaves buffers as they are; `keep_fp32` (called from
  the objective's `prepare_engine`) puts back what `zero.Init` cast at construction. In bf16 an
  EMA step of (1 - 0.996)·(online - teacher) is below half an ulp of a typical weight and rounds
  away: the teacher must stay fp32.
- DeepSpeed writes buffers into every checkpoint (each rank's model states file; zero_to_fp32
  and the universal converter carry them), so a resumed run continues the same teacher; the
  engine's universal load refuses a checkpoint that lacks one (trainer/engine.py).
- The optimizer never sees the teacher: no gradient, no Adam state, no weight decay.

The cost under ZeRO-3 is one fp32 copy of the teacher per rank: for a 1B-parameter encoder
4 GB a rank, which ZeRO-3 would otherwise have divided by the number of ranks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

PREFIX = "teacher."
# Online weights gathered at once for an EMA update under ZeRO-3 (elements): bounds the
# transient memory of the gather to ~256 MB in fp32 whatever the model's size.
CHUNK_NUMEL = 1 << 26


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


@contextlib.contextmanager
def full_values(params: list[nn.Parameter]) -> Iterator[None]:
    """The full values of ZeRO-3-partitioned `params` on every rank, read-only, for the block
    (DeepSpeed's GatheredParameters without a modifier rank); a no-op for whole parameters."""
    if not any(hasattr(p, "ds_id") for p in params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def _chunks(named: list[tuple[str, nn.Parameter]]) -> Iterator[list[tuple[str, nn.Parameter]]]:
    chunk: list[tuple[str, nn.Parameter]] = []
    size = 0
    for item in named:
        if chunk and size + _numel(item[1]) > CHUNK_NUMEL:
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += _numel(item[1])
    if chunk:
        yield chunk


def frozen_copy(online: nn.Module, fresh: nn.Module) -> nn.Module:
    """`fresh`, a module built as `online` was, with each of its parameters replaced by a
    persistent buffer of the same name holding `online`'s current value (gathered under
    ZeRO-3). Returns `fresh`, which then has no parameters."""
    named = list(online.named_parameters())
    for chunk in _chunks(named):
        with full_values([p for _, p in chunk]), torch.no_grad():
            for name, p in chunk:
                owner_name, _, attr = name.rpartition(".")
                owner = fresh.get_submodule(owner_name)
                if attr not in owner._parameters:
                    raise ValueError(f"teacher: {type(fresh).__name__} has no parameter {name}")
                del owner._parameters[attr]
                owner.register_buffer(attr, p.detach().clone(), persistent=True)
    left = [n for n, _ in fresh.named_parameters()]
    if left:
        raise ValueError(
            f"teacher: parameters of the copy that the online network lacks: {left[:3]}"
        )
    return fresh


@torch.no_grad()
def ema_update(pairs: Iterable[tuple[nn.Module, nn.Module]], m: float) -> None:
    """teacher ← m·teacher + (1 - m)·online for each (teacher, online) pair of modules made by
    `frozen_copy`, name by name, in the teacher's precision (fp32). Under ZeRO-3 the online
    weights are gathered CHUNK_NUMEL elements at a time; every rank updates its own whole copy
    identically, so the teachers stay equal without a collective of their own."""
    for teacher, online in pairs:
        for chunk in _chunks(list(online.named_parameters())):
            with full_values([p for _, p in chunk]):
                t = [teacher.get_buffer(name) for name, _ in chunk]
                o = [p.detach().to(b.dtype) for b, (_, p) in zip(t, chunk, strict=True)]
                torch._foreach_mul_(t, m)
                torch._foreach_add_(t, o, alpha=1.0 - m)


def keep_fp32(teacher: nn.Module) -> None:
    """The teacher's floating buffers back in fp32 (zero.Init casts tensors made while a model is
    built under ZeRO-3 to the training dtype)."""
    teacher.float()


def module_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a module computes in: its first floating parameter's, else its first floating
    buffer's (a teacher's weights are buffers)."""
    for t in (*module.parameters(), *module.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32
