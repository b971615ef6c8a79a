"""Decoding: a sample's raw tar members -> the arrays a model takes, per modality.

Nothing here unpickles: .npy members load with allow_pickle=False, and a sample that carries a
pickle member (.pyd, .pkl, ...) is refused whole. The shard index already makes such a sample a
hole; the check here keeps that true for raw samples from anywhere else."""

from __future__ import annotations

import io
import json
import re
from typing import Any

import numpy as np

from darkmatter.data_pipeline.reader.shards import PICKLE_EXTENSIONS

Sample = dict[str, Any]
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
AUDIO_EXTENSIONS = ("flac", "wav")
FRAME_MEMBER = re.compile(r"(\d+)\.(png|jpg|jpeg|webp)")  # a video sample's frames: 0000.png ...


def decode(raw: dict[str, Any], modality: str) -> Sample:
    """Raw tar members -> model inputs. Text: input_ids int32[n]; image: image uint8[H, W, 3];
    audio: audio float32[n] (channels averaged) and sample_rate; video: frames uint8[T, H, W, 3]
    (and fps when its json has it). Raises ValueError if it can't, or if a member is a pickle."""
    key = raw["__key__"]
    for member in raw:
        if not member.startswith("__") and member.rsplit(".", 1)[-1].lower() in PICKLE_EXTENSIONS:
            raise ValueError(f"pickle member {key}.{member} refused (the reader never unpickles)")
    out: Sample = {"__key__": key}
    if modality == "text":
        if "input_ids.npy" not in raw:
            raise ValueError("no input_ids.npy member")
        ids = np.load(io.BytesIO(raw["input_ids.npy"]), allow_pickle=False)
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise ValueError(f"input_ids.npy holds {ids.dtype}{list(ids.shape)}, not int[n]")
        out["input_ids"] = ids.astype(np.int32, copy=False)
    elif modality == "image":
        ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
        if ext is None:
            raise ValueError(f"no image member ({'/'.join(IMAGE_EXTENSIONS)})")
        from PIL import Image, ImageOps

        with Image.open(io.BytesIO(raw[ext])) as im:
            # Original camera bytes: honour the EXIF orientation so the pixels are upright.
            out["image"] = np.array(ImageOps.exif_transpose(im).convert("RGB"), dtype=np.uint8)
    elif modality == "audio":
        ext = next((e for e in AUDIO_EXTENSIONS if e in raw), None)
        if ext is None:
            raise ValueError(f"no audio member ({'/'.join(AUDIO_EXTENSIONS)})")
        import soundfile

        wave, rate = soundfile.read(io.BytesIO(raw[ext]), dtype="float32", always_2d=True)
        out["audio"], out["sample_rate"] = wave.mean(axis=1), int(rate)
    elif modality == "video":
        out.update(_decode_frames(raw))
    else:
        raise ValueError(f"unknown modality {modality!r}")
    return out


def _decode_frames(raw: dict[str, Any]) -> Sample:
    """A frame-sequence sample (prepare's video layout) -> frames uint8[T, H, W, 3] in frame
    order; its json's frame count, when given, must match what is there."""
    from PIL import Image

    numbered = sorted((int(m.group(1)), ext) for ext in raw
                      if (m := FRAME_MEMBER.fullmatch(ext)))  # fmt: skip
    if not numbered:
        raise ValueError("no frame members (0000.png, 0001.png ... or .jpg)")
    info = json.loads(raw["json"]) if "json" in raw else {}
    if not isinstance(info, dict):
        raise ValueError("json member is not an object")
    if "frames" in info and info["frames"] != len(numbered):
        raise ValueError(f"json says {info['frames']} frames, {len(numbered)} are present")
    frames = []
    for _, ext in numbered:
        with Image.open(io.BytesIO(raw[ext])) as im:
            frames.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
    if len({f.shape for f in frames}) > 1:
        raise ValueError(f"frames of different sizes {sorted({f.shape for f in frames})[:2]}")
    out: Sample = {"frames": np.stack(frames)}
    if isinstance(info.get("fps"), (int, float)):
        out["fps"] = float(info["fps"])
    return out
