"""Training stall per checkpoint save: asynchronous vs synchronous, to local disk and to S3, at
1 rank and at 2 ranks against S3.

`darkmatter pretrain` runs a BERT encoder (hidden 512, 4 layers, ~13M parameters, ZeRO-2, one
process; about 200 MB of model and optimizer state per save) for 25 steps with a checkpoint every
5, once per (root, mode): root = a local folder or a bucket on the local S3 server (SeaweedFS, started
here), mode = checkpoint.async_save true/false; and the S3 pair again with 2 ranks (torchrun,
ZeRO-2, each rank staging and uploading its own files, rank 0 committing after both). The
target for the 2-rank pair is an async stall ≤ 0.1 × the synchronous one (`s3_2rank_ratio`). The stall of a save is the time the training
loop is blocked by it, as the trainer logs it (`checkpoint/stall_s`): for a synchronous save,
snapshot + write + fsync + sha256 (+ upload) + commit; for an asynchronous one, the in-memory
snapshot, plus any wait for the previous save's upload. The saves at steps 5, 10, 15 and 20 are
measured (the final save always waits and is left out); the median is reported. `ratio` is the
larger of the two async/sync ratios. The figures also include the median step time of the steps
without a save, with and without background saves, because on a 2-core machine the background
writer competes with training for the CPUs.

`--quick` is a small model for smoke tests.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from _common import log  # noqa: E402

STEPS, EVERY = 25, 5


def run(
    data: str, root: str, run_dir: Path, async_save: bool, model: dict[str, int], nproc: int = 0
) -> dict[str, Any]:
    import yaml

    cfg = {
        "objective": "mlm",
        "data": {"url": data, "num_workers": 1, "seq_len": 32, "shuffle_buffer": 64},
        "model": {**model, "num_heads": 8},
        "train": {"steps": STEPS, "micro_batch_size": 8, "log_every": 1, "warmup_steps": 2,
                  "zero_stage": 2, "run_dir": str(run_dir)},
        "checkpoint": {"every": EVERY, "root": root, "async_save": async_save, "keep_last": 2},
        "tracking": {"enabled": False},
    }  # fmt: skip
    path = run_dir.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    out = subprocess.run(
        [sys.executable, "-m", "darkmatter.cli", "pretrain", str(path),
         *(["--nproc", str(nproc)] if nproc else [])],
        cwd=_common.REPO_ROOT, capture_output=True, text=True,
    )  # fmt: skip
    if out.returncode:
        raise SystemExit(f"pretrain failed: {out.stderr[-2000:]}")
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    saves = [r for r in rows if r["step"] % EVERY == 0 and r["step"] < STEPS]
    plain = [r for r in rows if r["step"] % EVERY and r["step"] > 1]
    mb = max(r.get("checkpoint/mb", 0.0) for r in rows)
    return {
        "stall_s": _common.median([r["checkpoint/stall_s"] for r in saves]),
        "step_s": _common.median([r["time/step_s"] for r in plain]),
        "mb": mb,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small model (smoke test)")
    args = ap.parse_args()
    model = (
        {"hidden_size": 64, "num_layers": 1, "intermediate_size": 128}
        if args.quick
        else {"hidden_size": 512, "num_layers": 4, "intermediate_size": 2048}
    )
    from darkmatter.data_pipeline.prepare import prepare
    from darkmatter.storage import make_bucket

    with _common.workdir("dm-bench-ckpt-") as tmp, _common.local_stack(tmp) as stack:
        corpus = _common.write_text_corpus(tmp / "corpus.txt", docs=2000)
        prepare([str(corpus)], str(tmp / "ds"), modality="text", vocab_size=2000)
        make_bucket("s3://bench-ckpt")
        results: dict[str, dict[str, Any]] = {}
        for where in ("local", "s3"):
            for mode in ("sync", "async"):
                name = f"{where}_{mode}"
                root = str(tmp / name / "ckpt") if where == "local" else f"s3://bench-ckpt/{name}"
                log(f"{name}: {STEPS} steps, a save every {EVERY}")
                results[name] = run(str(tmp / "ds"), root, tmp / name, mode == "async", model)
                log(f"{name}: {results[name]}")
        for mode in ("sync", "async"):
            name = f"s3_2rank_{mode}"
            log(f"{name}: 2 ranks, {STEPS} steps, a save every {EVERY}")
            results[name] = run(str(tmp / "ds"), f"s3://bench-ckpt/{name}", tmp / name,
                                mode == "async", model, nproc=2)  # fmt: skip
            log(f"{name}: {results[name]}")
        del stack
    r = results
    local_ratio = r["local_async"]["stall_s"] / r["local_sync"]["stall_s"]
    s3_ratio = r["s3_async"]["stall_s"] / r["s3_sync"]["stall_s"]
    s3_2rank_ratio = r["s3_2rank_async"]["stall_s"] / r["s3_2rank_sync"]["stall_s"]
    _common.emit({
        "benchmark": "checkpoint_stall", "machine": _common.machine(),
        "checkpoint_mb": round(r["local_sync"]["mb"], 1),
        "local_sync_stall_s": round(r["local_sync"]["stall_s"], 4),
        "local_async_stall_s": round(r["local_async"]["stall_s"], 4),
        "local_ratio": round(local_ratio, 4),
        "s3_sync_stall_s": round(r["s3_sync"]["stall_s"], 4),
        "s3_async_stall_s": round(r["s3_async"]["stall_s"], 4),
        "s3_ratio": round(s3_ratio, 4),
        "s3_2rank_sync_stall_s": round(r["s3_2rank_sync"]["stall_s"], 4),
        "s3_2rank_async_stall_s": round(r["s3_2rank_async"]["stall_s"], 4),
        "s3_2rank_ratio": round(s3_2rank_ratio, 4),
        "step_s_2rank_async_s3": round(r["s3_2rank_async"]["step_s"], 4),
        "step_s_sync": round(r["local_sync"]["step_s"], 4),
        "step_s_async_local": round(r["local_async"]["step_s"], 4),
        "step_s_async_s3": round(r["s3_async"]["step_s"], 4),
        "ratio": round(max(local_ratio, s3_ratio, s3_2rank_ratio), 4),
    })  # fmt: skip


if __name__ == "__main__":
    main()
