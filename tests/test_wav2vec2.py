"""wav2vec2: the loss against the paper's formulas recomputed from the model's states, the masks
and negatives as functions of the batch's generator, the audio preprocessing (resampling, crop,
padding, normalization), the FLOP count against torch's counter, the Gumbel temperature schedule,
that the model fits a fixed batch, and espeak-ng clips through prepare and decode. Two ranks
under DeepSpeed from S3 shards: tests/test_objectives_resume.py."""

from __future__ import annotations

import io
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from darkmatter.trainer.config import ConfigError, build_config
from darkmatter.trainer.objectives import OBJECTIVES, settings_class
from darkmatter.trainer.objectives.base import Objective
from darkmatter.trainer.objectives.wav2vec2 import (
    CODEBOOKS,
    GUMBEL_DECAY,
    SAMPLE_RATE,
    audio_inputs,
    frames,
    min_clip_samples,
    to_16k,
)

SECONDS = 0.25  # 4,000 samples, 12 frames


def objective(seconds: float = SECONDS, **model: Any) -> Objective:
    m = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64,
         "conv_dim": 16, "mask_ratio": 0.5, "mask_length": 3, "num_negatives": 5,
         "codevectors": 8, "projection_dim": 16, "temperature": 0.1, "dropout": 0.0, **model}  # fmt: skip
    cfg = build_config({"objective": "wav2vec2", "data": {"url": "unused", "audio_seconds": seconds},
                        "train": {"steps": 1}, "model": m}, settings_class)  # fmt: skip
    return OBJECTIVES["wav2vec2"](cfg, {"modality": "audio"})


def words(lengths: list[int], seed: int = 0, rate: int = SAMPLE_RATE) -> list[dict[str, Any]]:
    """Decoded samples as the reader gives them: word-like bursts (two gliding tones under an
    envelope, in noise), `lengths` samples long."""
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(lengths):
        t = np.arange(n) / rate
        f0, f1 = rng.uniform(150, 400), rng.uniform(600, 2000)
        tone = np.sin(2 * np.pi * (f0 + 80 * t) * t) + 0.5 * np.sin(2 * np.pi * f1 * t)
        env = np.sin(np.pi * np.clip(t / max(t[-1], 1e-9), 0, 1)) ** 2
        wave = 0.3 * env * tone + 0.01 * rng.standard_normal(n)
        out.append({"audio": wave.astype(np.float32), "sample_rate": rate, "__key__": f"w{i}"})
    return out


def test_loss_is_the_papers_contrastive_and_diversity_loss() -> None:
    """L = (sum over masked frames t of -log(exp(sim(c_t, q_t)/k) / sum over q in {q_t} and the
    negatives of exp(sim(c_t, q)/k)) + a * L_d * M) / M, with M the masked frames, sim the cosine,
    negatives equal to q_t left out, and L_d = (GV - perplexity) / GV, the perplexity that of the
    codebook choices' softmax averaged over masked frames (exp of its entropy, summed over the G
    codebooks). Recomputed frame by frame in float64 from the model's projected states, the
    quantizer's input and the batch's negative indices."""
    obj = objective()
    torch.manual_seed(0)
    model = obj.build_model().train()
    batch = obj.make_batch(words([5000, 2500, 4000]), torch.Generator().manual_seed(3))
    seen: dict[str, torch.Tensor] = {}
    model.quantizer.register_forward_hook(lambda mod, args, out: seen.update(x=args[0]))
    out = model(**batch)
    cfg = model.config
    c = out.projected_states.detach().double()
    q = out.projected_quantized_states.detach().double()
    mask, neg = batch["mask_time_indices"], batch["sampled_negative_indices"]
    b, t = mask.shape
    flat = q.reshape(b * t, -1)
    contrastive, m = 0.0, int(mask.sum())
    for i in range(b):
        for j in range(t):
            if not mask[i, j]:
                continue
            cands = [q[i, j]] + [
                flat[k] for k in neg[i, j].tolist() if not torch.equal(flat[k], q[i, j])
            ]
            sims = torch.stack([F.cosine_similarity(c[i, j], v, dim=0) for v in cands])
            contrastive -= float(torch.log_softmax(sims / cfg.contrastive_logits_temperature, 0)[0])
    logits = model.quantizer.weight_proj(seen["x"]).detach().double()
    probs = logits.reshape(b * t, CODEBOOKS, -1).softmax(-1)[mask.reshape(-1)]
    mean = probs.mean(0)  # [G, V]
    perplexity = float(torch.exp(-(mean * mean.log()).sum(-1)).sum())
    gv = CODEBOOKS * cfg.num_codevectors_per_group
    diversity = (gv - perplexity) / gv
    expected = (contrastive + cfg.diversity_loss_weight * diversity * m) / m
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-5)
    assert 1.0 < contrastive / m < 10.0  # about log(K + 1) = 1.8 at init, not a degenerate 0


def test_masks_and_negatives_are_functions_of_the_generator() -> None:
    obj = objective()
    samples = words([6000, 2500, 1000, 4000])
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    a = obj.make_batch(samples, torch.Generator().manual_seed(7))
    assert np.array_equal(np.random.get_state()[1], before)  # numpy's global RNG left as found
    again = obj.make_batch(samples, torch.Generator().manual_seed(7))
    other = obj.make_batch(samples, torch.Generator().manual_seed(8))
    assert a.keys() == again.keys() == other.keys()
    assert all(torch.equal(a[k], again[k]) for k in a)
    assert not torch.equal(a["mask_time_indices"], other["mask_time_indices"])
    mask, neg = a["mask_time_indices"], a["sampled_negative_indices"]
    n_frames = frames(round(SECONDS * SAMPLE_RATE))
    assert mask.shape == (4, n_frames) and neg.shape == (4, n_frames, 5)
    real = [frames(int(n)) for n in a["attention_mask"].sum(1)]
    for i in range(4):
        assert int(mask[i].sum()) >= 2 and not mask[i, real[i] :].any()  # padding never masked
        for j in np.flatnonzero(mask[i].numpy()):
            for k in neg[i, j].tolist():  # another masked frame of the same clip
                assert k // n_frames == i and k % n_frames != j and bool(mask[i, k % n_frames])


def test_clips_are_cropped_padded_and_normalized() -> None:
    obj = objective()
    n = round(SECONDS * SAMPLE_RATE)
    samples = words([6000, 2500, 1000])
    batch = obj.make_batch(samples, torch.Generator().manual_seed(1))
    x, att = batch["input_values"], batch["attention_mask"]
    assert x.shape == (3, n) and x.dtype == torch.float32
    # The long clip is a window of the original; the short one is whole; the shortest is
    # padded with silence that counts as audio up to the minimum length.
    assert att.sum(1).tolist() == [n, 2500, min_clip_samples(3)]
    for i, length in enumerate(att.sum(1).tolist()):
        real = x[i, :length].double()
        assert abs(float(real.mean())) < 1e-4
        assert float(real.var(unbiased=False)) == pytest.approx(1, rel=1e-3)
        assert not x[i, length:].any()
    raw = samples[0]["audio"].astype(np.float64)
    start = crop_start(raw, x[0].numpy())
    np.testing.assert_allclose(_unit(raw[start : start + n]), x[0].numpy(), atol=1e-4)
    others = {crop_start(raw, obj.make_batch(samples[:1], torch.Generator().manual_seed(s))
                         ["input_values"][0].numpy()) for s in range(2, 6)}  # fmt: skip
    assert others - {start}  # other generators crop elsewhere


def crop_start(raw: np.ndarray, window: np.ndarray) -> int:
    """Where in `raw` the normalized `window` was cut."""
    n = len(window)
    return int(np.argmin([np.abs(_unit(raw[s : s + n]) - window).max()
                          for s in range(len(raw) - n + 1)]))  # fmt: skip


def _unit(v: np.ndarray) -> np.ndarray:
    return (v - v.mean()) / np.sqrt(v.var() + 1e-7)


def test_resampling_keeps_the_pitch_and_bad_rates_name_the_sample() -> None:
    t = np.arange(8000) / 8000
    wave = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    up = to_16k(wave, 8000, "x")
    assert len(up) == 16000
    spectrum = np.abs(np.fft.rfft(up))
    assert np.argmax(spectrum) * SAMPLE_RATE / len(up) == pytest.approx(440, abs=1)
    assert len(to_16k(np.zeros(22050, np.float32), 22050, "x")) == 16000
    obj = objective()
    bad = words([4000])
    bad[0]["sample_rate"] = 0
    with pytest.raises(ValueError, match="sample w0: sample rate 0 is not a positive integer"):
        obj.make_batch(bad, torch.Generator().manual_seed(0))
    # Evaluation takes the first seconds of a clip, resampled: an 8 kHz clip of 0.5 s fills them.
    ev = audio_inputs([wave[:4000]], [8000], SECONDS, 3, ["e"])
    assert ev["attention_mask"].sum().item() == round(SECONDS * SAMPLE_RATE)


def test_config_errors_name_the_key() -> None:
    with pytest.raises(
        ConfigError,
        match=r"data.audio_seconds: 0.05 s gives 2 frames; model.mask_length=3 needs at least 4",
    ):
        objective(seconds=0.05)
    with pytest.raises(ConfigError, match="model.projection_dim: 15 is not divisible"):
        objective(projection_dim=15)
    with pytest.raises(ConfigError, match="model.num_negatives: expected >= 1, got 0"):
        objective(num_negatives=0)


def test_flops_are_what_the_model_computes() -> None:
    """Every multiply torch's counter sees (one forward, ×3 for training) plus the two
    element-wise products it does not count: the codevector sum (V·d per frame) and the K + 1
    cosine similarities (K + 1)·d. Whole clips, so no padding (which is not counted)."""
    obj = objective()
    model = obj.build_model().train()
    model.set_attn_implementation("eager")
    batch = obj.make_batch(words([5000, 4000, 6000]), torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(**batch)
    m, t = obj.settings, frames(round(SECONDS * SAMPLE_RATE))  # type: ignore[attr-defined]
    elementwise = 6 * 3 * t * (m.codevectors + m.num_negatives + 1) * m.projection_dim
    assert obj.flops(batch) == 3 * counter.get_total_flops() + elementwise
    assert obj.tokens(batch) == 3 * t
    lengths = model._get_feat_extract_output_lengths(torch.tensor([400, 719, 720, 4000, 16000]))
    assert (
        lengths.tolist() == [frames(n) for n in (400, 719, 720, 4000, 16000)] == [1, 1, 2, 12, 49]
    )


def test_gumbel_temperature_follows_the_optimizer_steps() -> None:
    obj = objective()
    model = obj.build_model().train()
    engine = type("Engine", (), {"module": model})()
    batch = obj.make_batch(words([4000, 4000]), torch.Generator().manual_seed(0))
    for step, want in ((0, 2.0), (100_000, 2.0 * GUMBEL_DECAY**100_000), (10**6, 0.5)):
        obj.after_step(engine, step)
        model(**batch)
        assert float(model.quantizer.temperature) == pytest.approx(want, rel=1e-6)
    assert "updates" in model.state_dict()  # checkpointed: a resumed run goes on from there


def test_wav2vec2_fits_a_fixed_batch() -> None:
    """Four clips, their masks fixed (one generator seed): 60 AdamW steps take the loss well
    below its start (about log(K + 1) plus the diversity term); the Gumbel noise keeps it jumpy."""
    obj = objective()
    torch.manual_seed(0)
    model = obj.build_model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = obj.make_batch(
        words([4000, 4000, 3500, 4000], seed=2), torch.Generator().manual_seed(0)
    )
    losses = []
    for _ in range(60):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert min(losses[-5:]) < 0.3 * losses[0], losses  # measured: 7%


@pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng missing: launch/ensure_espeak.sh"
)
def test_spoken_digits_through_prepare_and_decode(tmp_path: Path) -> None:
    import pyarrow.parquet as pq
    import soundfile

    from darkmatter.data_pipeline.prepare import prepare
    from darkmatter.data_pipeline.reader import decode
    from darkmatter.quickstart.speech import spoken_digits

    counts = spoken_digits(tmp_path / "wav", str(tmp_path / "task.parquet"), per_digit=2)
    assert counts["clips"] == 20
    table = pq.read_table(tmp_path / "task.parquet").to_pydict()
    assert sorted(table["label"]) == sorted(list(range(10)) * 2)
    split = dict(zip(table["speaker"], table["split"], strict=True))
    assert len(set(table["speaker"])) == len(split)  # a speaker is in one split only
    wave, rate = soundfile.read(io.BytesIO(table["audio"][0]))
    assert rate == SAMPLE_RATE and 0.2 < len(wave) / rate < 2.0 and np.abs(wave).max() > 0.05
    assert spoken_digits(tmp_path / "wav", str(tmp_path / "task.parquet"), per_digit=2) == counts

    import tarfile

    m = prepare([str(tmp_path / "wav")], str(tmp_path / "shards"), modality="audio")
    assert m.num_samples == 20
    with tarfile.open(tmp_path / "shards" / m.shards[0].name) as tar:
        member = next(x for x in tar.getmembers() if x.name.endswith(".wav"))
        raw = {"__key__": member.name[:-4], "wav": tar.extractfile(member).read()}  # type: ignore[union-attr]
    sample = decode(raw, "audio")
    assert sample["sample_rate"] == SAMPLE_RATE and sample["audio"].dtype == np.float32
    batch = objective(seconds=1.0).make_batch([sample], torch.Generator().manual_seed(0))
    assert int(batch["mask_time_indices"].sum()) >= 2
    assert math.isfinite(float(batch["input_values"].abs().max()))


def wav_bytes(sample: dict[str, Any], fmt: str = "WAV", channels: int = 1) -> bytes:
    import soundfile

    buf = io.BytesIO()
    wave = np.repeat(sample["audio"][:, None], channels, 1)
    soundfile.write(buf, wave, sample["sample_rate"], format=fmt, subtype="PCM_16")
    return buf.getvalue()


def test_labeled_audio_in_every_form_and_features_over_real_frames(tmp_path: Path) -> None:
    """The harness's audio path: labeled clips from a Parquet `audio` column (bytes or Hugging
    Face's {"bytes": …} structs), class folders of .wav/.flac and WebDataset .wav members; inputs
    made as in training (resampled, from the start, padded, normalized); features the mean of
    the last hidden state over the frames of real samples, not over the padding."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    from darkmatter.evaluation.probe import embed
    from darkmatter.evaluation.tasks import TaskError, TaskSpec, audio_inputs, load_labeled

    clips = words([3000, 6000, 2000, 5000], seed=4) + words([4000, 3000], seed=5, rate=8000)
    blobs = [
        wav_bytes(c, "FLAC" if i % 2 else "WAV", channels=1 + i % 2) for i, c in enumerate(clips)
    ]
    labels = [0, 1, 0, 1, 0, 1]
    pq.write_table(pa.table({"audio": blobs, "label": labels}), tmp_path / "t.parquet")
    pq.write_table(
        pa.table({"audio": [{"bytes": b, "path": None} for b in blobs], "label": labels}),
        tmp_path / "hf.parquet",
    )
    for i, (b, y) in enumerate(zip(blobs, labels, strict=True)):
        (tmp_path / "folders" / str(y)).mkdir(parents=True, exist_ok=True)
        (tmp_path / "folders" / str(y) / f"{i}.{'flac' if i % 2 else 'wav'}").write_bytes(b)
    (tmp_path / "wds").mkdir()
    with wds.TarWriter(str(tmp_path / "wds" / "000000.tar")) as tar:
        for i, (c, y) in enumerate(zip(clips, labels, strict=True)):
            tar.write({"__key__": f"{i:04d}", "wav": wav_bytes(c), "cls": str(y).encode()})
    inputs = {}
    for data in ("t.parquet", "hf.parquet", "folders", "wds"):
        got = load_labeled(TaskSpec(name="t", data=str(tmp_path / data)))
        assert (
            got.kind == "audio" and len(got.items) == 6 and sorted(got.labels) == [0, 0, 0, 1, 1, 1]
        )
        inputs[data] = audio_inputs(got.items, SECONDS, 3)
    x, att = inputs["t.parquet"]["input_values"], inputs["t.parquet"]["attention_mask"]
    assert torch.equal(x, inputs["hf.parquet"]["input_values"])
    n = round(SECONDS * SAMPLE_RATE)
    assert att.sum(1).tolist() == [3000, n, 2000, n, n, n]  # 8 kHz clips doubled, then cut
    np.testing.assert_allclose(
        x[1].numpy(), _unit(clips[1]["audio"][:n].astype(np.float64)), atol=2e-3
    )
    # Features: real frames only (a clip alone or padded in a batch: the same vector).
    torch.manual_seed(0)
    encoder = load_encoder_like(objective())
    feats = embed(encoder, {"input_values": x, "attention_mask": att})
    alone = embed(encoder, {"input_values": x[:1, :3000], "attention_mask": att[:1, :3000]})
    np.testing.assert_allclose(feats[0], alone[0], atol=1e-5)
    with pytest.raises(TaskError, match="audio item 1 of the task: not a readable WAV/FLAC file"):
        audio_inputs([blobs[0], b"RIFF not audio"], SECONDS, 3)


def load_encoder_like(obj: Objective) -> Any:
    """The encoder the harness builds from a wav2vec2 checkpoint's config (AutoModel)."""
    from transformers import AutoModel

    return AutoModel.from_config(obj.model_config()).eval()
