"""What efficiency figures need: model FLOPs per sample, the device's peak, memory, and a step
timer split into phases.

MFU = achieved model FLOP/s ÷ peak FLOP/s. Training FLOPs of a transformer on one sequence of T
tokens: T·(6·N + 12·L·H·Q·T) (PaLM, appendix B): N the parameters of the matrix multiplies every
token goes through (embedding lookups are not multiplies), L layers, H heads, Q head dim. Each
objective counts what it actually computes (trainer.objectives).
"""

from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, by a substring of the device name.
_GPU_PEAKS = (
    ("H200", 989e12), ("H100", 989e12), ("GH200", 989e12), ("B200", 2250e12),
    ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
    ("A10G", 70e12), ("A10", 125e12), ("V100", 125e12), ("T4", 65e12),
)  # fmt: skip


def sequence_flops(matmul_params: float, layers: int, heads: int, head_dim: int, seq: int) -> float:
    """Training FLOPs (forward + backward) of one sequence of `seq` tokens."""
    return seq * (6.0 * matmul_params + 12.0 * layers * heads * head_dim * seq)


def encoder_layer_params(hidden: int, intermediate: int) -> int:
    """Weights of one transformer block's multiplies: Q, K, V, output (4h²) and the MLP (2hI)."""
    return 4 * hidden * hidden + 2 * hidden * intermediate


@dataclass(frozen=True)
class Peak:
    flops: float  # FLOP/s of one device
    source: str  # where the figure comes from: config, a device table, or a measurement


def peak_flops(configured_tflops: float, bf16: bool) -> Peak:
    """The peak FLOP/s of this process's device. Configured wins; a known GPU is looked up; on a
    CPU, which publishes no such figure, the rate of a large matrix multiply is measured."""
    if configured_tflops > 0:
        return Peak(configured_tflops * 1e12, "config")
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in _GPU_PEAKS:
            if key in name:
                return Peak(value, f"table:{name}")
        return Peak(0.0, f"unknown:{name}")
    # A CPU without bf16 units runs bf16 slower than fp32: its peak is the faster of the two, so
    # that MFU stays a share of what this CPU can do (never above 1).
    rate = measured_matmul_flops(torch.float32)
    if bf16:
        rate = max(rate, measured_matmul_flops(torch.bfloat16))
    return Peak(rate, "measured")


def measured_matmul_flops(dtype: torch.dtype, n: int = 1024, seconds: float = 0.3) -> float:
    """FLOP/s of repeated n×n matrix multiplies on this CPU with its configured threads, through
    `F.linear`, the kernel the models' layers use (on a CPU without bf16 units, `torch.mm` in
    bf16 takes a path ~25x slower than `linear` in bf16, and the model would beat its "peak")."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)  # never the global RNG: a resume must be bit-exact
    a = torch.randn(n, n, dtype=dtype, generator=gen)
    b = torch.randn(n, n, dtype=dtype, generator=gen)
    F.linear(a, b)  # warm up
    done, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds or done < 2:
        F.linear(a, b)
        done += 1
    return 2.0 * n**3 * done / elapsed


def memory_gb() -> float:
    """Peak memory of this rank so far: device memory allocated on a GPU, resident set size of
    the process on a CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


class PhaseTimer:
    """Seconds spent in each phase of a step. On a GPU the phases are timed with CUDA events
    (no synchronization in the step); `read()` is called after the step's loss is on the host,
    when every event has completed."""

    def __init__(self) -> None:
        self.cuda = torch.cuda.is_available()
        self._marks: list[tuple[str, Any]] = []

    def mark(self, phase: str) -> None:
        """The phase named `phase` ends now (the first mark starts the clock)."""
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._marks.append((phase, ev))
        else:
            self._marks.append((phase, time.perf_counter()))

    def read(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for (_, a), (phase, b) in zip(self._marks, self._marks[1:], strict=False):
            secs = a.elapsed_time(b) / 1000 if self.cuda else b - a
            out[phase] = out.get(phase, 0.0) + secs
        self._marks.clear()
        return out


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
