"""Runs that reproduce: `darkmatter prepare` run twice from scratch and each copy trained by a
fresh 2-rank job gives the same losses, to the last bit, at ZeRO 0 (with train.deterministic)
and ZeRO 2 (ZeRO-3: test_checkpoint_s3.py's reference and crashed runs). The data comes from
the stack's S3 server, as at scale.

Two prepares, not one: the tokenizer used to differ from run to run, and with it every figure
downstream (the byte-level check of prepare itself is in test_prepare.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from darkmatter.data_pipeline.prepare import prepare
from tests.helpers import metrics, run_darkmatter, synthetic_corpus, write_config

STEPS = 6


def losses(tmp_path: Path, name: str, data_url: str, stage: int, **train: object) -> list[float]:
    run_dir = tmp_path / name
    cfg = write_config(tmp_path / f"{name}.yaml", data_url, run_dir,
                       train={"steps": STEPS, "log_every": 1, "zero_stage": stage, **train},
                       checkpoint={"every": 100})  # fmt: skip
    out = run_darkmatter("pretrain", str(cfg), "--nproc", "2")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return [r["loss"] for r in rows]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_prepares_and_two_runs_give_identical_losses(bucket: str, tmp_path: Path) -> None:
    corpus = synthetic_corpus(tmp_path / "corpus.txt")
    first, second = f"{bucket}/ds1", f"{bucket}/ds2"
    digests = {
        prepare([str(corpus)], url, modality="text", vocab_size=200, shard_bytes=20_000,
                workers=w).digest
        for url, w in ((first, 1), (second, 2))
    }  # fmt: skip
    assert len(digests) == 1

    zero0 = [losses(tmp_path, f"z0-{i}", url, 0, deterministic=True)
             for i, url in enumerate((first, second))]  # fmt: skip
    assert zero0[0] == zero0[1]
    zero2 = [losses(tmp_path, f"z2-{i}", url, 2) for i, url in enumerate((first, second))]
    assert zero2[0] == zero2[1]
    # The same training either way: ZeRO-2 partitions the optimizer, not the arithmetic.
    assert zero2[0] == pytest.approx(zero0[0], rel=1e-4)
    assert zero0[0][-1] < zero0[0][0]  # and it trained


def test_deterministic_switch_sets_what_gpus_need(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from darkmatter.trainer import engine

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    engine.use_deterministic_algorithms(False)  # off: PyTorch's defaults are left alone
    assert not torch.are_deterministic_algorithms_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    try:
        engine.use_deterministic_algorithms(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
