"""Objectives added after the vertical slice, on 2 ranks under ZeRO-2 from shards on the S3
server: a job resumed from a checkpoint takes the following steps exactly as the uninterrupted
job did — the same samples, masks or views (functions of seed, step, rank and micro-batch),
dropout RNG, optimizer state and, for moco, the negatives gathered from both ranks.
(mlm's and mae's resume is tested in tests/test_faults.py and tests/test_checkpoint.py.)"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from darkmatter.data_pipeline.prepare import prepare
from tests.helpers import metrics, run_darkmatter, synthetic_corpus, write_config

pytestmark = pytest.mark.distributed

TEXT = {"data": {"seq_len": 32, "packing": True}}
IMAGE = {
    "data": {"image_size": 16, "shuffle_buffer": 16},
    "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64,
              "patch_size": 4, "projection_dim": 16},
}  # fmt: skip
# Each case costs ~40-60 s, nearly all of it DeepSpeed start-up: all are in the slow tier, which
# CI runs after make test (`make test-slow`, marker `slow`).
# The momentum objectives in bf16: DeepSpeed casts their teacher, which must stay fp32.
TEACHER = {**IMAGE, "model": {**IMAGE["model"], "head_hidden_size": 32, "momentum": 0.9},
           "train": {"bf16": True}}  # fmt: skip
# wav2vec2: masks and negatives (numpy seeded from the batch's generator), Gumbel noise (torch's
# RNG, restored from the checkpoint) and the Gumbel temperature (a buffer set after each step).
AUDIO = {
    "data": {"audio_seconds": 0.5, "shuffle_buffer": 16},
    "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64,
              "conv_dim": 16, "mask_ratio": 0.5, "mask_length": 3, "num_negatives": 5,
              "codevectors": 8, "projection_dim": 16},
}  # fmt: skip
# video: tube masks and frame offsets from the batch's generator, bf16 pixels.
VIDEO = {
    "data": {"image_size": 16, "num_frames": 4, "frame_stride": 2, "shuffle_buffer": 16},
    "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64,
              "patch_size": 4, "decoder_hidden_size": 32, "mask_ratio": 0.9},
    "train": {"bf16": True},
}  # fmt: skip
# moco runs under ZeRO-3: its teacher (buffers, trainer/objectives/teacher.py) stays whole and
# fp32 on every rank while the online network is partitioned, and its queue is a buffer too.
MOCO = {**TEACHER, "train": {**TEACHER["train"], "zero_stage": 3}}
# Cases left out for CI's time, each covered by one here: byol (the same momentum module and
# teacher as moco), simclr (moco's two views and gathered negatives; tests/test_two_view_ranks.py
# checks simclr's 2-rank step under ZeRO-3) and clm (no state of its own beyond span's text
# stream and dropout; mlm's resume is in tests/test_faults.py).
FAST_SETTINGS: dict[str, dict[str, Any]] = {}
SLOW_SETTINGS: dict[str, dict[str, Any]] = {
    "span": TEXT, "moco": MOCO, "wav2vec2": AUDIO, "video": VIDEO,
    # video_future under ZeRO-3, bf16: its EMA target encoder (buffers) stays whole and fp32.
    "video_future": {
        "data": VIDEO["data"], "train": {"zero_stage": 3, "bf16": True},
        "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64,
                  "patch_size": 4, "predictor_hidden_size": 32, "predictor_num_layers": 1,
                  "momentum": 0.9},
    },
    # ijepa, bf16: block masks from the batch's generator, the fp32 EMA target encoder.
    "ijepa": {
        "data": IMAGE["data"], "train": {"bf16": True},
        "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64,
                  "patch_size": 2, "predictor_hidden_size": 32, "predictor_depth": 1,
                  "momentum": 0.9},
    },
    # dino with iBOT, bf16: crops and masks from the batch's generator, the fp32 teacher, the
    # centers (all-reduced over both ranks) and the teacher temperature's warmup (buffers).
    "dino": {
        "data": IMAGE["data"], "train": {"bf16": True},
        "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64,
                  "patch_size": 4, "num_prototypes": 32, "head_hidden_size": 32,
                  "bottleneck_dim": 16, "local_crops": 2, "local_crop_size": 8, "ibot": True,
                  "mask_probability": 1.0, "head_batch_norm": True, "momentum": 0.9,
                  "teacher_temp_warmup_steps": 3},
    },
}  # fmt: skip
SETTINGS = {**FAST_SETTINGS, **SLOW_SETTINGS}
CASES = [pytest.param(name, marks=[pytest.mark.slow] * (name in SLOW_SETTINGS))
         for name in sorted(SETTINGS)]  # fmt: skip


@pytest.fixture(scope="module")
def s3_shards(stack: object, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The shards the objectives under test read, in one bucket of the session's S3 server."""
    import boto3

    from darkmatter.quickstart.run import digits

    env = stack.env  # type: ignore[attr-defined]
    boto3.client("s3", endpoint_url=stack.s3_endpoint,  # type: ignore[attr-defined]
                 aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                 region_name=env["AWS_DEFAULT_REGION"]).create_bucket(Bucket="objectives")  # fmt: skip
    from darkmatter.trainer.objectives import OBJECTIVES

    tmp = tmp_path_factory.mktemp("objective-data")
    needed = {OBJECTIVES[name].modality for name in SETTINGS}
    if "text" in needed:
        corpus = synthetic_corpus(tmp / "corpus.txt")
        prepare([str(corpus)], "s3://objectives/text", modality="text", vocab_size=200)
    if "image" in needed:
        digits(tmp / "png", str(tmp / "digits.parquet"))
        prepare([str(tmp / "png")], "s3://objectives/images", modality="image")
    if "audio" in needed:
        tones(tmp / "wav")
        prepare([str(tmp / "wav")], "s3://objectives/audio", modality="audio")
    if "video" in needed:
        moving_clips(tmp / "gif")
        prepare([str(tmp / "gif")], "s3://objectives/video", modality="video")
    return {"text": "s3://objectives/text", "image": "s3://objectives/images",
            "audio": "s3://objectives/audio", "video": "s3://objectives/video"}  # fmt: skip


def moving_clips(folder: Path, n: int = 96) -> None:
    """The first n moving-digit clips (16 frames of 32x32, GIF)."""
    from itertools import islice

    from darkmatter.quickstart.video_data import moving_digits

    folder.mkdir(parents=True)
    for i, (gif, _, _) in enumerate(islice(moving_digits(), n)):
        (folder / f"{i:03d}.gif").write_bytes(gif)


def tones(folder: Path, n: int = 64) -> None:
    """Short WAV clips of gliding tones in noise, 0.2-0.9 s at 16 or 8 kHz (some are cropped,
    some padded, some resampled)."""
    import numpy as np
    import soundfile

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        rate = (16000, 8000)[i % 2]
        t = np.arange(int(rng.uniform(0.2, 0.9) * rate)) / rate
        f = rng.uniform(150, 1500)
        wave = 0.3 * np.sin(2 * np.pi * (f + 200 * t) * t) + 0.02 * rng.standard_normal(len(t))
        soundfile.write(folder / f"{i:03d}.wav", wave, rate, subtype="PCM_16")


def final_weights(folder: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's weights and buffers: DeepSpeed's module file without ZeRO-3; under ZeRO-3
    (whose module file holds empty placeholders for the partitioned parameters) the fp32 master
    weights consolidated by DeepSpeed's zero_to_fp32 (buffers included)."""
    whole = folder / "mp_rank_00_model_states.pt"
    if whole.exists():
        return torch.load(whole, map_location="cpu", weights_only=False)["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name))


@pytest.mark.parametrize("objective", CASES)
def test_two_ranks_from_s3_resume_bit_exact(
    objective: str, s3_shards: dict[str, str], tmp_path: Path
) -> None:
    from darkmatter.trainer.objectives import OBJECTIVES

    url = s3_shards[OBJECTIVES[objective].modality]
    settings = SETTINGS[objective]
    runs = {}
    for name in ("first", "resumed"):
        run_dir = tmp_path / name
        cfg = write_config(
            tmp_path / f"{name}.yaml", url, run_dir, objective=objective,
            data={**settings["data"]}, **({"model": settings["model"]} if "model" in settings else {}),
            train={"steps": 4, "log_every": 1, "zero_stage": 2, "micro_batch_size": 8,
                   **settings.get("train", {})},
            checkpoint={"every": 2, "async_save": False},
        )  # fmt: skip
        resume = ["--resume-from", str(tmp_path / "first" / "checkpoints" / "step00000002")]
        out = run_darkmatter("pretrain", str(cfg), "--nproc", "2", *(resume * (name == "resumed")))
        assert out.returncode == 0, out.stderr[-4000:]
        runs[name] = {r["step"]: r["loss"] for r in metrics(run_dir)}
    assert sorted(runs["first"]) == [1, 2, 3, 4] and sorted(runs["resumed"]) == [3, 4]
    assert all(math.isfinite(v) for v in runs["first"].values())
    assert [runs["resumed"][s] for s in (3, 4)] == [runs["first"][s] for s in (3, 4)]
    # The models at the end, bit for bit (every parameter and buffer, a teacher included).
    final = [final_weights(tmp_path / name / "checkpoints" / "step00000004")
             for name in ("first", "resumed")]  # fmt: skip
    assert final[0].keys() == final[1].keys()
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0]), objective
    teacher = {k: v for k, v in final[0].items() if k.startswith("teacher.")}
    if getattr(OBJECTIVES[objective], "momentum_teacher", False):
        assert teacher and all(
            v.dtype == torch.float32 for v in teacher.values() if v.is_floating_point()
        )
        online = final[0]["vit.embeddings.patch_embeddings.projection.weight"]
        # The engine's bf16 module (ZeRO-3: the fp32 masters): the teacher moved.
        zero3 = settings.get("train", {}).get("zero_stage") == 3
        assert online.dtype == (torch.float32 if zero3 else torch.bfloat16)
        assert not torch.equal(
            teacher["teacher.vit.embeddings.patch_embeddings.projection.weight"], online.float()
        )


@pytest.mark.slow
def test_the_teacher_resumes_on_another_number_of_ranks(
    s3_shards: dict[str, str], tmp_path: Path
) -> None:
    """2 ranks write step 2; 1 rank (twice the accumulation: the same global batch) resumes it
    through DeepSpeed's universal checkpoint, whose loader restores only what its optimizer
    holds. The last step's momentum is 1, so after step 3 the teacher's weights must be the
    step-2 teacher's exactly — as they are only if the frozen teacher was restored too."""
    settings = TEACHER
    for name, nproc, steps, accum in (("first", 2, 2, 1), ("resized", 1, 3, 2)):
        cfg = write_config(
            tmp_path / f"{name}.yaml", s3_shards["image"], tmp_path / name, objective="moco",
            data=settings["data"], model=settings["model"],
            train={"steps": steps, "log_every": 1, "zero_stage": 2, "micro_batch_size": 8,
                   "grad_accum": accum, **settings["train"]},
            checkpoint={"every": 2, "async_save": False},
        )  # fmt: skip
        resume = ["--resume-from", str(tmp_path / "first" / "checkpoints" / "step00000002")]
        out = run_darkmatter("pretrain", str(cfg), "--nproc", str(nproc), *(resume * (nproc == 1)))
        assert out.returncode == 0, out.stderr[-4000:]
    assert "converting it to a universal checkpoint" in out.stderr

    def teacher(run: str, tag: str) -> dict[str, torch.Tensor]:
        f = tmp_path / run / "checkpoints" / tag / "mp_rank_00_model_states.pt"
        module = torch.load(f, map_location="cpu", weights_only=False)["module"]
        # Parameters: the batch-norm statistics move with the teacher's forward of step 3.
        return {k: v for k, v in module.items() if k.startswith("teacher.") and "running" not in k
                and "num_batches" not in k}  # fmt: skip

    before, after = teacher("first", "step00000002"), teacher("resized", "step00000003")
    assert before.keys() == after.keys() and len(before) > 20
    assert all(torch.equal(before[k], after[k]) for k in before)
