"""The GPU benchmark cannot fail on a device for a reason a CPU could have caught: its tiny
variant runs here end to end (both models, bf16, the trainer's own figures)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT


@pytest.mark.timeout(300)
def test_gpu_bench_tiny_runs_on_cpu() -> None:
    out = subprocess.run([sys.executable, "bench/gpu.py", "--tiny"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=280)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "gpu" and result["size"] == "tiny" and result["steps"] == 6
    for name in ("mlm", "mae"):
        r = result[name]
        assert r["intervals"] == 2 and r["settings"]["bf16"] is True, r
        assert r["samples_per_s"] > 0 and r["step_s"] > 0 and r["peak_memory_gb"] > 0, r
        assert 0 < r["mfu"] < 1 and math.isfinite(r["final_loss"]), r
        assert 0 <= r["data_wait_fraction"] < 1, r
    assert result["mlm"]["tokens_per_s"] > 0 and "tokens_per_s" not in result["mae"]
    # tokens/s is samples/s x seq_len: every document is longer than the sequence (no padding).
    seq = result["mlm"]["settings"]["seq_len"]
    assert result["mlm"]["tokens_per_s"] == pytest.approx(result["mlm"]["samples_per_s"] * seq,
                                                          rel=1e-3)  # fmt: skip
    assert result["mlm_mfu_vs_target"] == pytest.approx(result["mlm"]["mfu"] / 0.5, rel=1e-2)
