"""Decode checks of image, audio and video items: an item is written only after a full decode,
and keeps the member extension of its detected format. Video clips are decoded whole into RGB
frames (Pillow for animated GIF/WebP, PyAV for the rest) and stored as one member per frame.
"""

from __future__ import annotations

import io
import json
import re
import warnings
from typing import Any

import numpy as np

_IMAGE_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
_AUDIO_EXTENSIONS = {"WAV": "wav", "WAVEX": "wav", "RF64": "wav", "FLAC": "flac"}


class Undecodable(Exception):
    """An image, audio or video item the decoders refuse; the message says why."""


def _error_text(e: Exception) -> str:
    # Decoders name the BytesIO object (an address, different every run): drop it.
    text = str(getattr(e, "error_string", None) or e)  # libsndfile's own words
    return re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", text) or type(e).__name__


def image_extension(data: bytes) -> str:
    """The member extension of an encoded image, after decoding all of it."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF quirks and size warnings are not a verdict
            with Image.open(io.BytesIO(data)) as im:
                fmt = im.format
                im.load()  # verify() alone misses truncated JPEG data
    except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, bomb errors...
        raise Undecodable(_error_text(e)) from None
    if fmt not in _IMAGE_EXTENSIONS:
        raise Undecodable(f"unsupported image format {fmt}")
    return _IMAGE_EXTENSIONS[fmt]


def audio_extension(data: bytes) -> str:
    """The member extension of an audio file, after decoding all of it in blocks."""
    import soundfile

    frames = 0
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as f:
            fmt = f.format
            while block := len(f.read(65536, dtype="float32", always_2d=True)):
                frames += block
    except Exception as e:  # LibsndfileError, and whatever a broken header provokes
        raise Undecodable(_error_text(e)) from None
    if fmt not in _AUDIO_EXTENSIONS:
        raise Undecodable(f"unsupported audio format {fmt}")
    if frames == 0:
        raise Undecodable("no audio frames")
    return _AUDIO_EXTENSIONS[fmt]


def read_clip(data: bytes) -> tuple[list[np.ndarray], float | None, str]:
    """An encoded clip -> its RGB frames (uint8 [H, W, 3], all one size), its frame rate if the
    file says it, and the member extension its frames keep in shards: png for animated GIF/WebP
    (Pillow composes each frame over the previous ones), jpg for what PyAV decodes (lossy
    codecs). Raises ValueError naming why it cannot."""
    if data[:4] == b"GIF8" or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        (frames, fps), ext = _pillow_clip(data), "png"
    else:
        (frames, fps), ext = _av_clip(data), "jpg"
    if not frames:
        raise ValueError("no frames")
    if len({f.shape for f in frames}) > 1:
        raise ValueError(f"frames of different sizes {sorted({f.shape for f in frames})[:2]}")
    return frames, fps, ext


def _pillow_clip(data: bytes) -> tuple[list[np.ndarray], float | None]:
    from PIL import Image, ImageSequence

    frames, durations = [], []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                for frame in ImageSequence.Iterator(im):
                    frames.append(np.asarray(frame.convert("RGB"), dtype=np.uint8).copy())
                    durations.append(float(frame.info.get("duration") or 0))  # ms
    except Exception as e:  # OSError, SyntaxError, EOFError on truncated frames, bombs...
        raise ValueError(_error_text(e)) from None
    known = bool(durations) and min(durations) > 0
    return frames, round(1000.0 * len(durations) / sum(durations), 3) if known else None


def _av_clip(data: bytes) -> tuple[list[np.ndarray], float | None]:
    try:
        import av
    except ImportError:
        raise ValueError(
            "not an animated GIF/WebP, and PyAV, which decodes other video files, is not "
            "installed (pip install 'darkmatter[video]')"
        ) from None
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                return [], None
            rate = container.streams.video[0].average_rate
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except Exception as e:  # av.error.FFmpegError and its subclasses, OSError
        text = re.sub(r"^\[Errno -?\d+\] |: '<none>'$", "", _error_text(e))
        raise ValueError(f"not a decodable video: {text}") from None
    return frames, round(float(rate), 3) if rate else None


def video_members(data: bytes) -> dict[str, bytes]:
    """A clip's shard members: each frame encoded on its own, and the json of its counts."""
    from PIL import Image

    try:
        frames, fps, ext = read_clip(data)
    except ValueError as e:
        raise Undecodable(str(e)) from None
    members: dict[str, bytes] = {}
    for i, frame in enumerate(frames):
        buf = io.BytesIO()
        if ext == "jpg":
            Image.fromarray(frame).save(buf, format="JPEG", quality=95)
        else:
            Image.fromarray(frame).save(buf, format="PNG")
        members[f"{i:04d}.{ext}"] = buf.getvalue()
    info: dict[str, Any] = {"frames": len(frames)}
    if fps is not None:
        info["fps"] = fps
    members["json"] = json.dumps(info, sort_keys=True).encode()
    return members
