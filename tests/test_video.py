"""The video objective (VideoMAE with tube masking) and the video modality of prepare and the
reader: the loss against a by-hand reconstruction loss, the tube mask's structure, batches as a
function of the generator, the FLOP count against torch's counter, a fixed batch fitted, and
clips (GIF, WebP, MP4, Parquet) through prepare into shards of frames and back.
Two ranks under DeepSpeed: tests/test_objectives_resume.py."""

from __future__ import annotations

import io
import json
import tarfile
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from darkmatter.data_pipeline.prepare import PrepareError, prepare, read_clip
from darkmatter.data_pipeline.reader import decode, iter_dataset
from darkmatter.data_pipeline.transforms import IMAGE_MEAN, IMAGE_STD
from darkmatter.quickstart.video_data import moving_digits
from darkmatter.trainer.config import Config, ConfigError, DataConfig, ModelConfig, TrainConfig
from darkmatter.trainer.objectives import OBJECTIVES
from darkmatter.trainer.objectives.video import VideoObjective, VideoSettings, frame_indices


def objective(mask_ratio: float = 0.9, num_frames: int = 4, image_size: int = 16) -> Any:
    cfg = Config(
        objective="video",
        data=DataConfig(url="unused", image_size=image_size, num_frames=num_frames,
                        frame_stride=2),
        train=TrainConfig(steps=1),
        model=ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
        objective_settings=VideoSettings(patch_size=4, decoder_hidden_size=32,
                                         decoder_num_layers=1, mask_ratio=mask_ratio,
                                         tubelet_size=2),
    )  # fmt: skip
    return OBJECTIVES["video"](cfg, {"modality": "video"})


def clips(n: int, length: int = 10, seed: int = 0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [{"frames": rng.integers(0, 256, (length, 20, 20, 3), dtype=np.uint8)}
            for _ in range(n)]  # fmt: skip


def digit_clips(n: int) -> list[dict[str, Any]]:
    out = []
    for gif, _, _ in moving_digits():
        out.append({"frames": np.stack(read_clip(gif)[0])})
        if len(out) == n:
            return out
    raise AssertionError


def model_for(obj: VideoObjective) -> Any:
    torch.manual_seed(0)
    return obj.build_model()


def reconstruction_loss_by_hand(
    unit: torch.Tensor, mask: torch.Tensor, logits: torch.Tensor, ts: int, p: int
) -> float:
    """VideoMAE's loss written out: cut each clip of [0, 1] pixels [T, 3, H, W] into tubes of
    ts frames × p × p, tube by tube in (time, row, column) order; normalize each hidden tube's
    pixels per channel (mean, unbiased std + 1e-6, over its ts·p·p values); the mean squared
    error of the predictions of the hidden tubes, in that order, against them."""
    b, t, c, h, w = unit.shape
    total, count = 0.0, 0
    for i in range(b):
        targets = []
        for n, (tt, y, x) in enumerate(
            (tt, y, x) for tt in range(t // ts) for y in range(h // p) for x in range(w // p)
        ):
            if not mask[i, n]:
                continue
            tube = unit[i, tt * ts : (tt + 1) * ts, :, y * p : (y + 1) * p, x * p : (x + 1) * p]
            values = tube.permute(0, 2, 3, 1).reshape(-1, c).double()  # (frame, row, col) x C
            norm = (values - values.mean(0)) / (values.std(0, unbiased=True) + 1e-6)
            targets.append(norm.reshape(-1))
        pred = logits[i].double()
        assert pred.shape == (len(targets), ts * p * p * c)
        total += float(((pred - torch.stack(targets)) ** 2).sum())
        count += pred.numel()
    return total / count


def test_loss_is_the_normalized_pixel_error_of_the_hidden_tubes_only() -> None:
    obj = objective()
    batch = obj.make_batch(clips(3), torch.Generator().manual_seed(0))
    pixels, mask = batch["pixel_values"], batch["bool_masked_pos"]
    assert pixels.shape == (3, 4, 3, 16, 16) and mask.shape == (3, 2 * 16)
    with torch.no_grad():
        out = model_for(obj).eval()(**batch)
    unit = pixels * IMAGE_STD.unsqueeze(0) + IMAGE_MEAN.unsqueeze(0)  # back to [0, 1]
    by_hand = reconstruction_loss_by_hand(unit, mask, out.logits, ts=2, p=4)
    assert out.loss.item() == pytest.approx(by_hand, rel=1e-5)
    # The check can tell: every tube, or unnormalized pixels, give another number.
    assert by_hand != pytest.approx(reconstruction_loss_by_hand(unit, ~mask, out.logits[:, :4],
                                                                ts=2, p=4), rel=1e-3)  # fmt: skip


def test_tube_mask_hides_the_same_patches_in_every_time_slot() -> None:
    obj = objective(num_frames=8)  # 4 time slots of 16 patches; 0.9 hides int(14.4) = 14
    mask = obj.make_batch(clips(6), torch.Generator().manual_seed(3))["bool_masked_pos"]
    slots = mask.view(6, 4, 16)
    assert torch.equal(slots, slots[:, :1].expand(-1, 4, -1))  # tubes: one spatial mask
    assert slots[:, 0].sum(1).tolist() == [14] * 6
    assert len({tuple(m.tolist()) for m in slots[:, 0]}) == 6  # a mask of its own per clip
    assert obj.visible() == 4 * 2 and obj.tokens({"pixel_values": torch.zeros(6)}) == 6 * 8
    with pytest.raises(ConfigError, match="model.mask_ratio"):
        objective(mask_ratio=0.05)  # hides no patch of 16


def test_batches_are_a_function_of_the_generator() -> None:
    obj = objective()
    samples = clips(4, length=30)  # longer than the window of 4 frames at stride 2 (7 frames)
    a = obj.make_batch(samples, torch.Generator().manual_seed(5))
    again = obj.make_batch(samples, torch.Generator().manual_seed(5))
    other = obj.make_batch(samples, torch.Generator().manual_seed(6))
    for k in a:
        assert torch.equal(a[k], again[k])
    assert not torch.equal(a["bool_masked_pos"], other["bool_masked_pos"])
    assert not torch.equal(a["pixel_values"], other["pixel_values"])  # other frame offsets
    starts = {frame_indices(30, 4, 2, torch.Generator().manual_seed(s))[0] for s in range(300)}
    assert starts == set(range(24))  # every offset that fits, and none beyond
    assert frame_indices(30, 4, 2) == [11, 13, 15, 17]  # evaluation: the centred window
    assert frame_indices(3, 4, 2) == [0, 1, 1, 2]  # a short clip: evenly spaced


def test_flops_are_the_multiplies_the_model_runs() -> None:
    """torch's counter on one forward and backward: the encoder on visible tubes only."""
    obj = objective(num_frames=8)
    batch = obj.make_batch(clips(2), torch.Generator().manual_seed(0))
    model = model_for(obj)
    model.set_attn_implementation("eager")  # plain matmuls, counted; the decoder's too
    assert model.decoder.config._attn_implementation == "eager"
    with FlopCounterMode(display=False) as counter:
        model(**batch).loss.backward()
    assert obj.flops(batch) == counter.get_total_flops()


def test_fits_a_fixed_batch() -> None:
    """Four moving-digit clips, masks fixed: 120 AdamW steps take the loss under a third of
    its start (measured: 0.51 -> 0.08)."""
    obj = objective(mask_ratio=0.75)
    batch = obj.make_batch(digit_clips(4), torch.Generator().manual_seed(0))
    model = model_for(obj).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(120):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 3, losses[::10]


# -- prepare and the reader -------------------------------------------------------------------


def animated(frames: list[np.ndarray], fmt: str) -> bytes:
    buf = io.BytesIO()
    ims = [Image.fromarray(f) for f in frames]
    ims[0].save(buf, format=fmt, save_all=True, append_images=ims[1:], duration=125, loop=0,
                **({"lossless": True} if fmt == "WEBP" else {}))  # fmt: skip
    return buf.getvalue()


def mp4(frames: list[np.ndarray]) -> bytes:
    av = pytest.importorskip("av")
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode())
    return buf.getvalue()


def members(shard: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    with tarfile.open(shard) as tar:
        for name in tar.getnames():
            key, _, ext = name.partition(".")
            out.setdefault(key, []).append(ext)
    return out


def test_clips_go_through_prepare_as_frame_sequences_and_back(tmp_path: Path) -> None:
    gifs = [gif for gif, _, _ in islice(moving_digits(), 3)]
    rng = np.random.default_rng(0)
    webp_frames = [rng.integers(0, 256, (24, 20, 3), dtype=np.uint8) for _ in range(5)]
    src = tmp_path / "clips"
    src.mkdir()
    for i, gif in enumerate(gifs):
        (src / f"a{i}.gif").write_bytes(gif)
    (src / "b.webp").write_bytes(animated(webp_frames, "WEBP"))
    (src / "notes.txt").write_text("not a clip: skipped in a folder")
    m = prepare([str(src)], str(tmp_path / "out"), modality="video", workers=1)
    assert (m.modality, m.num_samples, m.stats["skipped"]) == ("video", 4, 0)  # type: ignore[index]
    layout = members(next((tmp_path / "out").glob("shard-*.tar")))
    assert layout["000000-00000000"] == [f"{i:04d}.png" for i in range(16)] + ["json"]

    got = list(iter_dataset(str(tmp_path / "out")))
    for sample, gif in zip(got, gifs, strict=False):
        assert np.array_equal(sample["frames"], np.stack(read_clip(gif)[0]))  # PNG: lossless
        assert sample["frames"].shape == (16, 32, 32, 3) and sample["fps"] == 10.0
    assert np.array_equal(got[3]["frames"], np.stack(webp_frames)) and got[3]["fps"] == 8.0


def test_mp4_through_pyav(tmp_path: Path) -> None:
    smooth = [np.full((32, 32, 3), 16 * i, dtype=np.uint8) for i in range(10)]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "c.mp4").write_bytes(mp4(smooth))
    prepare([str(tmp_path / "in")], str(tmp_path / "out"), modality="video", workers=1)
    layout = members(next((tmp_path / "out").glob("shard-*.tar")))
    assert layout["000000-00000000"] == [f"{i:04d}.jpg" for i in range(10)] + ["json"]
    (got,) = iter_dataset(str(tmp_path / "out"))
    assert got["frames"].shape == (10, 32, 32, 3) and got["fps"] == 8.0
    assert np.abs(got["frames"].astype(int) - np.stack(smooth)).max() <= 6  # mpeg4, JPEG: lossy


def test_parquet_video_column_and_undecodable_clips(tmp_path: Path) -> None:
    gifs = [gif for gif, _, _ in islice(moving_digits(), 3)]
    broken = gifs[1][: len(gifs[1]) // 2]  # cut mid-frame
    table = pa.table({"video": [gifs[0], broken, gifs[2]], "id": ["x", "y", "z"]})
    pq.write_table(table, tmp_path / "clips.parquet")
    m = prepare([str(tmp_path / "clips.parquet")], str(tmp_path / "out"), modality="video",
                key_field="id", workers=1)  # fmt: skip
    assert m.num_samples == 2 and m.run is not None
    assert m.run.skipped_examples[0].startswith(f"{tmp_path / 'clips.parquet'} row 1: ")
    got = list(iter_dataset(str(tmp_path / "out")))
    assert np.array_equal(got[1]["frames"], np.stack(read_clip(gifs[2])[0]))
    shard = next((tmp_path / "out").glob("shard-*.tar"))
    with tarfile.open(shard) as tar:
        info = json.loads(tar.extractfile("000000-00000002.json").read())  # type: ignore[union-attr]
    assert info == {"fps": 10.0, "frames": 16, "id": "z"}

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "cut.gif").write_bytes(broken)
    with pytest.raises(PrepareError, match=r"cannot decode video .*cut\.gif: "):
        prepare([str(tmp_path / "bad")], str(tmp_path / "strict"), modality="video",
                strict=True, workers=1)  # fmt: skip


def test_decode_refuses_incomplete_frame_sequences() -> None:
    frame = io.BytesIO()
    Image.new("RGB", (8, 8)).save(frame, format="PNG")
    raw: dict[str, Any] = {"__key__": "k", "0000.png": frame.getvalue(),
                           "0001.png": frame.getvalue(), "json": b'{"frames": 3}'}  # fmt: skip
    with pytest.raises(ValueError, match="json says 3 frames, 2 are present"):
        decode(raw, "video")
    with pytest.raises(ValueError, match="no frame members"):
        decode({"__key__": "k", "json": b"{}"}, "video")
    raw["json"] = b'{"frames": 2}'
    assert decode(raw, "video")["frames"].shape == (2, 8, 8, 3)
