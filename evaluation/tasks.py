"""Labeled downstream sets: a Parquet file (local or in object storage) with a label column and
either a text column or an encoded-image column (PNG/JPEG bytes)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from data_pipeline.storage import open_url, read_bytes
from data_pipeline.transforms import images_to_tensor


@dataclass
class LabeledSet:
    name: str
    labels: np.ndarray  # [N] int
    texts: list[str] | None = None
    images: list[bytes] | None = None


def load_parquet(url: str, name: str, label_column: str = "label") -> LabeledSet:
    with open_url(url) as f:
        table = pq.read_table(f)
    cols = set(table.column_names)
    if label_column not in cols:
        raise ValueError(f"{url}: no label column {label_column!r} (columns: {sorted(cols)})")
    labels = np.asarray(table.column(label_column).to_pylist())
    if labels.dtype.kind not in "iu":
        _, labels = np.unique(labels, return_inverse=True)
    if "text" in cols:
        return LabeledSet(name, labels, texts=table.column("text").to_pylist())
    if "image" in cols:
        return LabeledSet(name, labels, images=table.column("image").to_pylist())
    raise ValueError(f"{url}: expected a 'text' or an 'image' column (columns: {sorted(cols)})")


def text_inputs(texts: list[str], tokenizer_url: str, seq_len: int) -> dict[str, torch.Tensor]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(read_bytes(tokenizer_url).decode())
    tok.enable_truncation(seq_len)
    tok.enable_padding(pad_id=0, pad_token="[PAD]", length=seq_len)
    enc = tok.encode_batch(texts)
    return {
        "input_ids": torch.tensor([e.ids for e in enc]),
        "attention_mask": torch.tensor([e.attention_mask for e in enc]),
    }


def image_inputs(images: list[bytes], size: int) -> dict[str, Any]:
    """Decoded and normalized exactly as the MAE objective's training batches."""
    from PIL import Image

    arrs = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in images]
    return {"pixel_values": images_to_tensor(arrs, size)}
