"""The benchmark suite's runner, and the two benchmarks whose smoke tests belong in every CI run
(the slow tier, `make test-slow`: ~40 s of 2-rank start-ups that make test's budget lacks):
the GPU benchmark cannot fail on a device for a reason a CPU could have caught (its tiny variant
runs here end to end: both models, bf16, the trainer's own figures), and ZeRO's memory stays at
the paper's formula (2 ranks, stages 0-3)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_bench_runner_quick_gpu_tiny_and_zero_memory(tmp_path: Path) -> None:
    table, raw = tmp_path / "table.md", tmp_path / "results.json"
    out = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "zero_memory", "gpu",
         "--out", str(table), "--json", str(raw)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=380,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(raw.read_text())
    rows = [ln for ln in table.read_text().splitlines() if ln.startswith("| ")]
    assert rows[0].startswith("| Benchmark |") and len(rows) == 3, rows  # header + 2

    zero = results["zero_memory"]
    assert zero["ranks"] == 2 and set(zero["stages"]) == {"zero0", "zero1", "zero2", "zero3"}
    per_param = {s: v["measured_per_param"] for s, v in zero["stages"].items()}
    # Partitioning shows: each stage holds less per rank than the one before (2 ranks).
    assert per_param["zero0"] > per_param["zero2"] > per_param["zero3"], per_param
    assert (
        zero["stages"]["zero3"]["measured_bytes"] < 0.55 * zero["stages"]["zero0"]["measured_bytes"]
    )
    assert zero["worst_ratio"] == max(v["ratio"] for v in zero["stages"].values()) <= 1.15
    # Built under ZeRO-3, a rank holds half the parameters a whole build holds (2 ranks).
    assert zero["build"]["ratio"] <= 0.55 and zero["build"]["whole_bytes_per_rank"] > 0
    assert rows[1].startswith(f"| zero_memory | worst_ratio | {zero['worst_ratio']} | <= 1.15 |")
    assert rows[2].startswith(f"| gpu | mlm_mfu_vs_target | {results['gpu']['mlm_mfu_vs_target']}")

    result = results["gpu"]
    assert result["benchmark"] == "gpu" and result["size"] == "tiny" and result["steps"] == 6
    for name in ("mlm", "mae"):
        r = result[name]
        assert r["intervals"] == 2 and r["settings"]["bf16"] is True, r
        assert r["settings"]["attention"] == "sdpa", r
        assert r["samples_per_s"] > 0 and r["step_s"] > 0 and r["peak_memory_gb"] > 0, r
        assert 0 < r["mfu"] < 1 and math.isfinite(r["final_loss"]), r
        assert 0 <= r["data_wait_fraction"] < 1, r
    assert result["mlm"]["tokens_per_s"] > 0 and "tokens_per_s" not in result["mae"]
    # tokens/s is samples/s x seq_len: every document is longer than the sequence (no padding).
    seq = result["mlm"]["settings"]["seq_len"]
    assert result["mlm"]["tokens_per_s"] == pytest.approx(result["mlm"]["samples_per_s"] * seq,
                                                          rel=1e-3)  # fmt: skip
    assert result["mlm_mfu_vs_target"] == pytest.approx(result["mlm"]["mfu"] / 0.5, rel=1e-2)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_text_transfer_quick_measures_margins_against_random_init() -> None:
    """The seed-sweep benchmark end to end at smoke size: prepare, a 2-rank MLM run, evaluate
    on both text tasks; the summary is the per-run figures' difference."""
    proc = subprocess.run([sys.executable, "bench/text_transfer.py", "--quick"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=580)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    run = json.loads(proc.stderr.strip().splitlines()[-1])
    assert result["runs"] == 1 and run["objective"] == "mlm" and run["steps"] == 20
    for task in ("wordnet_supersenses", "fortunes_topics"):
        for protocol in ("linear_probe", "knn"):
            pretrained, random_init = run[f"{task}/{protocol}"]
            assert 0.125 / 2 < random_init < 1 and 0 < pretrained < 1  # eight classes
            entry = result["mlm"][f"{task}/{protocol}"]
            assert entry["margin_mean"] == round(100 * (pretrained - random_init), 2)
            assert entry["margin_std"] is None  # one seed
    assert (
        result["wordnet_probe_margin"]
        == result["mlm"]["wordnet_supersenses/linear_probe"]["margin_mean"]
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_eval_memory_quick_does_not_grow_with_the_labeled_set() -> None:
    """The evaluator on 320 and on 3,200 definitions: its peak over the baseline stays within
    1.3x of what embedding one batch costs, and the ratio does not grow with the set."""
    proc = subprocess.run([sys.executable, "bench/eval_memory.py", "--quick"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=280)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (result["examples_1x"], result["examples_10x"]) == (320, 3200)
    assert result["one_batch_mb"] > result["model_fp32_mb"] > 0  # the model is in it
    assert result["peak_ratio"] <= 1.3, result
    assert result["peak_ratio"] <= result["peak_ratio_1x"] + 0.1, result
    assert result["features_per_s"] > 0


@pytest.mark.timeout(300)
def test_peer_loaders_quick_reports_every_library_and_counts_the_2_to_1_resume(bucket: str) -> None:
    """bench/peer_loaders.py at smoke size (200 images, on the session's stack; every installed
    peer, the others being benchmark extras): stdout is one JSON line per library and the
    summary last; every figure is there and positive; the 2 -> 1 resume's repeats and skips add
    up against the key sets, and ours resumes exactly once."""
    from importlib.util import find_spec

    extras = {"mosaicml-streaming": "streaming", "litdata": "litdata"}
    libs = ["ours", "webdataset"] + [lib for lib, module in extras.items() if find_spec(module)]
    proc = subprocess.run([sys.executable, "bench/peer_loaders.py", "--quick", "--bucket", bucket,
                           "--libraries", *libs],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=280)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    *rows, summary = lines
    assert [r["library"] for r in rows] == libs and summary["summary"] is True
    for r in rows:
        name = r["library"]
        assert r["samples"] in (192, 200), r  # ours and litdata drop the last partial batch
        for key in ("samples_per_s", "epoch_samples_per_s", "first_batch_s", "resume_s",
                    "cpu_ms_per_sample", "peak_pss_mib"):  # fmt: skip
            assert r[key] > 0, (name, key, r[key])
        assert r["peak_rss_mib"] >= r["peak_pss_mib"], r
        assert r["format"]["objects"] >= 8, r  # shards of at most 1/8 of the set
        req = r["requests"]
        assert req["epoch"]["data_objects"] == r["format"]["objects"], (name, req)
        assert req["epoch"]["data_gets"] >= req["epoch"]["data_objects"], (name, req)
        # (A resume may fetch a shard twice: the reader's cache lock race, documented there.)
        assert 0 < req["resume"]["data_objects"] <= r["format"]["objects"], (name, req)
        e = r["elastic_2_to_1"]
        assert e["reference_unique"] <= e["reference_samples"] <= 200, e
        if e["result"] == "unsupported":
            assert name != "ours" and e["error"], e
            continue
        # Keys seen = the reference, plus what was read again, less what was never read.
        seen = e["before_resume"] + e["after_resume"]
        assert seen == e["reference_samples"] + e["repeats"] - e["skips"], e
        assert (e["result"] == "exactly once") == (e["repeats"] == e["skips"] == 0), e
    ours = rows[0]
    assert ours["resume_exact"] and ours["elastic_2_to_1"]["result"] == "exactly once", ours
    peers = rows[1:]
    best = max(p["samples_per_s"] for p in peers)
    assert summary["ratio_vs_best_peer"] == round(ours["samples_per_s"] / best, 3), summary
    fastest = min(p["resume_s"] for p in peers)
    assert summary["resume_vs_best_peer"] == round(ours["resume_s"] / fastest, 3), summary
    assert set(summary["elastic_2_to_1"]) == set(libs) and summary["samples"] == 200
