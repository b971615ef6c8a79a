"""Decoding: a sample's raw tar members -> the arrays a model takes, per modality.

Nothing here unpickles: .npy members load with allow_pickle=False, and a sample that carries a
pickle member (.pyd, .pkl, ...) is refused whole. The shard index already makes such a sample a
hole; the check here keeps that true for raw samples from anywhere else.

Text read raw (a "txt" member and no input_ids.npy: jsonl, Parquet and text files, or users'
WebDataset shards) is tokenized here, in the slot that decodes it, into exactly the input_ids a
prepared shard holds ("[CLS] doc [SEP]", the tokenizer's own normalization), with the Tokenizer
built once per process from ReaderOptions.text."""

from __future__ import annotations

import io
import json
import re
from typing import Any

import numpy as np

from darkmatter.data_pipeline.reader.options import TextSpec
from darkmatter.data_pipeline.reader.shards import PICKLE_EXTENSIONS

Sample = dict[str, Any]
# The member extensions each modality reads, first found first; `darkmatter index` maps member
# extensions to modalities with the same lists.
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
AUDIO_EXTENSIONS = ("flac", "wav", "mp3")
VIDEO_EXTENSIONS = ("mp4", "webm")  # an encoded clip as one member (users' shards)
TEXT_EXTENSIONS = ("input_ids.npy", "txt")
FRAME_MEMBER = re.compile(r"(\d+)\.(png|jpg|jpeg|webp)")  # a video sample's frames: 0000.png ...


def decode(raw: dict[str, Any], modality: str, text: TextSpec | None = None) -> Sample:
    """Raw tar members -> model inputs. Text: input_ids int32[n] (from input_ids.npy, or a txt
    member tokenized with `text`); image: image uint8[H, W, 3]; audio: audio float32[n]
    (channels averaged) and sample_rate; video: frames uint8[T, H, W, 3] (and fps when known).
    Raises ValueError if it can't, or if a member is a pickle."""
    key = raw["__key__"]
    for member in raw:
        if not member.startswith("__") and member.rsplit(".", 1)[-1].lower() in PICKLE_EXTENSIONS:
            raise ValueError(f"pickle member {key}.{member} refused (the reader never unpickles)")
    out: Sample = {"__key__": key}
    if modality == "text":
        out["input_ids"] = _decode_text(raw, text)
    elif modality == "image":
        ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
        if ext is None:
            raise ValueError(f"no image member ({'/'.join(IMAGE_EXTENSIONS)})")
        from PIL import Image, ImageOps

        with Image.open(io.BytesIO(raw[ext])) as im:
            # Original camera bytes: honour the EXIF orientation so the pixels are upright.
            # In place, and no conversion of what is RGB already: neither copies the pixels.
            ImageOps.exif_transpose(im, in_place=True)
            rgb = im if im.mode == "RGB" else im.convert("RGB")
            out["image"] = np.array(rgb, dtype=np.uint8)
    elif modality == "audio":
        ext = next((e for e in AUDIO_EXTENSIONS if e in raw), None)
        if ext is None:
            raise ValueError(f"no audio member ({'/'.join(AUDIO_EXTENSIONS)})")
        out["audio"], out["sample_rate"] = _decode_audio(raw[ext], ext)
    elif modality == "video":
        clip = next((e for e in VIDEO_EXTENSIONS if e in raw), None)
        out.update(_decode_clip(raw[clip]) if clip else _decode_frames(raw))
    else:
        raise ValueError(f"unknown modality {modality!r}")
    return out


def _decode_text(raw: dict[str, Any], text: TextSpec | None) -> np.ndarray:
    """int32[n]: the sample's input_ids.npy, or its txt member encoded as prepare encodes."""
    if "input_ids.npy" in raw:
        ids = np.load(io.BytesIO(raw["input_ids.npy"]), allow_pickle=False)
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise ValueError(f"input_ids.npy holds {ids.dtype}{list(ids.shape)}, not int[n]")
        return ids.astype(np.int32, copy=False)
    if "txt" not in raw:
        raise ValueError("no input_ids.npy or txt member")
    if text is None:
        raise ValueError("raw text (a txt member) needs a tokenizer: set data.tokenizer")
    doc = raw["txt"].decode("utf-8")  # invalid UTF-8 raises: the sample becomes a hole
    # encode(), one document, never encode_batch(): encode runs on this thread only, so the
    # tokenizers library never starts its thread pool in a process that data workers are forked
    # from (a pool used before a fork makes it warn and turn parallelism off in every child).
    # Workers are the parallelism here. Prepare writes tok.encode_batch(docs)[i].ids, which are
    # the same ids: the post-processor adds [CLS] ... [SEP] in both.
    ids = _tokenizer(text).encode(doc).ids
    if not ids or ids[0] != text.cls_id or ids[-1] != text.sep_id:
        raise ValueError("the tokenizer did not wrap the text in [CLS] ... [SEP]")
    return np.asarray(ids, dtype=np.int32)


_TOKENIZERS: dict[str, Any] = {}  # TextSpec.digest -> Tokenizer, per process (fork: inherited)


def _tokenizer(text: TextSpec) -> Any:
    tok = _TOKENIZERS.get(text.digest)
    if tok is None:
        from tokenizers import Tokenizer

        tok = _TOKENIZERS[text.digest] = Tokenizer.from_str(text.tokenizer_json)
    return tok


def _decode_audio(data: bytes, ext: str) -> tuple[np.ndarray, int]:
    """float32[n] (channels averaged) and the sample rate."""
    import soundfile

    if ext == "mp3" and tuple(map(int, soundfile.__libsndfile_version__.split(".")[:2])) < (1, 1):
        raise ValueError(
            f"mp3 needs libsndfile >= 1.1, this soundfile has {soundfile.__libsndfile_version__}"
        )
    wave, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return wave.mean(axis=1), int(rate)


def _decode_clip(data: bytes) -> Sample:
    """An encoded clip member (mp4, webm) -> frames uint8[T, H, W, 3] and fps when known. PyAV
    decodes it (optional: read_clip's error says how to install it when it is missing)."""
    from darkmatter.data_pipeline.prepare.media import read_clip

    frames, fps, _ = read_clip(data)
    out: Sample = {"frames": np.stack(frames)}
    if fps is not None:
        out["fps"] = fps
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
