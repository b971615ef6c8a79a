"""Moving digits: short clips for the video objective, made from real handwritten digits.

No package installs real video offline, so the clips are generated (in the spirit of Moving
MNIST) from the 1,797 handwritten digits bundled with scikit-learn: each digit, upscaled 3×,
moves across a black canvas in one of eight directions at 1 or 2 pixels a frame, bouncing off
the edges, and is written as an animated GIF (the format `darkmatter prepare --modality video`
reads with Pillow). Two labels per clip: the digit (what a frame shows) and the initial
direction (what only the motion across frames shows).

    python -m darkmatter.quickstart.video_data OUT_FOLDER TASK.parquet
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

FRAMES = 16
CANVAS = 32
SCALE = 3  # 8×8 digits -> 24×24: most tubes show part of the digit (at 2×, most were black)
# Image coordinates (y grows downwards): "N" moves up.
DIRECTIONS = {
    "E": (1, 0), "NE": (1, -1), "N": (0, -1), "NW": (-1, -1),
    "W": (-1, 0), "SW": (-1, 1), "S": (0, 1), "SE": (1, 1),
}  # fmt: skip


def _bounce(p: int, v: int, hi: int) -> tuple[int, int]:
    """One step of p by v inside [0, hi], reflecting off either edge."""
    p += v
    if p < 0:
        return -p, -v
    if p > hi:
        return 2 * hi - p, -v
    return p, v


def _path(rng: np.random.Generator, heading: str, frames: int, room: int) -> list[tuple[int, int]]:
    """Top-left corners for each frame, every one different from the one before it: a GIF
    writer merges identical consecutive frames, which would shorten the clip."""
    while True:
        speed = int(rng.integers(1, 3))
        vx, vy = (speed * c for c in DIRECTIONS[heading])
        x, y = (int(v) for v in rng.integers(0, room + 1, size=2))
        path = [(x, y)]
        for _ in range(frames - 1):
            x, vx = _bounce(x, vx, room)
            y, vy = _bounce(y, vy, room)
            path.append((x, y))
        if all(a != b for a, b in zip(path, path[1:], strict=False)):
            return path


def moving_digits(
    seed: int = 0, frames: int = FRAMES, canvas: int = CANVAS
) -> Iterator[tuple[bytes, int, str]]:
    """(GIF bytes, digit, initial direction) for each of scikit-learn's 1,797 digits, in order;
    a function of `seed`."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    names = list(DIRECTIONS)
    size = 8 * SCALE
    for img, digit in zip(d.images, d.target, strict=True):
        glyph = Image.fromarray((img * (255.0 / 16.0)).round().astype(np.uint8), mode="L")
        glyph = glyph.resize((size, size), Image.Resampling.BILINEAR)
        heading = names[int(rng.integers(len(names)))]
        clip = []
        for x, y in _path(rng, heading, frames, canvas - size):
            frame = Image.new("L", (canvas, canvas))
            frame.paste(glyph, (x, y))
            clip.append(frame)
        buf = io.BytesIO()
        clip[0].save(buf, format="GIF", save_all=True, append_images=clip[1:], duration=100,
                     loop=0)  # fmt: skip
        yield buf.getvalue(), int(digit), heading


def write_moving_digits(folder: Path, task_url: str, seed: int = 0) -> int:
    """GIF files in `folder` for pretraining (no labels) and a labeled Parquet at `task_url`
    (columns video, label = the digit, direction) for the probe; returns the clip count."""
    from darkmatter.quickstart.run import write_parquet

    folder.mkdir(parents=True, exist_ok=True)
    videos, labels, directions = [], [], []
    for i, (gif, digit, heading) in enumerate(moving_digits(seed)):
        (folder / f"{i:05d}.gif").write_bytes(gif)
        videos.append(gif)
        labels.append(digit)
        directions.append(heading)
    write_parquet({"video": videos, "label": labels, "direction": directions}, task_url)
    return len(videos)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(
            "usage: python -m darkmatter.quickstart.video_data OUT_FOLDER TASK.parquet"
        )
    n = write_moving_digits(Path(sys.argv[1]), sys.argv[2])
    print(f"{n} clips in {sys.argv[1]}, labels in {sys.argv[2]}")
