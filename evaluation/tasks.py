"""Downstream tasks: labeled sets and what to run on them, declared in YAML.

```yaml
tasks:
  - name: fortunes_topics
    data: s3://bucket/tasks/topics.parquet  # a Parquet file, a folder of class folders, or a
                                            # folder/prefix of labeled WebDataset shards (.tar)
    label: label          # label column (Parquet) or member extension (WebDataset: cls)
    split: {test_fraction: 0.3, seed: 0}    # or {column: split}: rows "train" / "test"
    protocols:            # any of these, with their options (defaults shown)
      linear_probe: {C: 1.0}
      knn: {k: 20, temperature: 0.07}
      finetune: {epochs: 2, lr: 1.0e-4, batch_size: 32}
    metrics: [accuracy, macro_f1]
```

A labeled set holds texts or encoded images (PNG/JPEG bytes); the input kind is found from the
data (Parquet columns `text` / `image`, WebDataset members `.txt` / `.png` `.jpg`, files in the
class folders).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

from data_pipeline import storage
from data_pipeline.storage import open_url, read_bytes
from data_pipeline.transforms import images_to_tensor

PROTOCOLS = {
    "linear_probe": {"C": 1.0},
    "knn": {"k": 20, "temperature": 0.07},
    "finetune": {"epochs": 2, "lr": 1.0e-4, "batch_size": 32},
}
METRICS = ("accuracy", "macro_f1")
_IMAGE_EXT = (".png", ".jpg", ".jpeg")


class TaskError(ValueError):
    """A task file or a labeled set is wrong; the message names the file and key."""


@dataclass
class TaskSpec:
    name: str
    data: str
    label: str = "label"
    test_fraction: float = 0.3
    seed: int = 0
    split_column: str = ""
    protocols: dict[str, dict[str, Any]] = field(default_factory=lambda: {"linear_probe": {}})
    metrics: tuple[str, ...] = METRICS

    def options(self, protocol: str) -> dict[str, Any]:
        return {**PROTOCOLS[protocol], **self.protocols.get(protocol, {})}


@dataclass
class LabeledSet:
    name: str
    labels: np.ndarray  # [N] int
    texts: list[str] | None = None
    images: list[bytes] | None = None
    test_mask: np.ndarray | None = None  # [N] bool, when the data says which rows are test
    classes: list[str] = field(default_factory=list)  # label names, index = label id


def load_tasks(path: str) -> list[TaskSpec]:
    """Parse a tasks YAML; every error names the file and the task's key."""
    try:
        raw = yaml.safe_load(read_bytes(path).decode())
    except FileNotFoundError:
        raise TaskError(f"{path}: task file not found") from None
    except yaml.YAMLError as e:
        raise TaskError(f"{path}: malformed YAML ({e})") from None
    items = raw.get("tasks") if isinstance(raw, dict) else None
    if not isinstance(items, list) or not items:
        raise TaskError(f"{path}: expected a non-empty list under 'tasks:'")
    specs, names = [], set()
    for i, t in enumerate(items):
        where = f"{path}: tasks[{i}]"
        if not isinstance(t, dict):
            raise TaskError(f"{where}: expected a mapping")
        known = {"name", "data", "label", "split", "protocols", "metrics"}
        if unknown := set(t) - known:
            raise TaskError(f"{where}.{sorted(unknown)[0]}: unknown key (known: {sorted(known)})")
        for key in ("name", "data"):
            if not isinstance(t.get(key), str) or not t[key]:
                raise TaskError(f"{where}.{key}: required string")
        if t["name"] in names:
            raise TaskError(f"{where}.name: {t['name']!r} appears twice")
        names.add(t["name"])
        protocols = t.get("protocols") or {"linear_probe": {}}
        if isinstance(protocols, list):
            protocols = {p: {} for p in protocols}
        for p, opts in protocols.items():
            if p not in PROTOCOLS:
                raise TaskError(f"{where}.protocols.{p}: unknown (known: {', '.join(PROTOCOLS)})")
            if bad := set(opts or {}) - set(PROTOCOLS[p]):
                raise TaskError(f"{where}.protocols.{p}.{sorted(bad)[0]}: unknown option")
        metrics = tuple(t.get("metrics") or METRICS)
        if bad_m := [m for m in metrics if m not in METRICS]:
            raise TaskError(f"{where}.metrics: unknown {bad_m[0]!r} (known: {', '.join(METRICS)})")
        split = t.get("split") or {}
        frac = float(split.get("test_fraction", 0.3))
        if not 0 < frac < 1:
            raise TaskError(f"{where}.split.test_fraction: expected in (0, 1), got {frac}")
        specs.append(TaskSpec(
            name=t["name"], data=t["data"], label=str(t.get("label", "label")),
            test_fraction=frac, seed=int(split.get("seed", 0)),
            split_column=str(split.get("column", "")),
            protocols={p: dict(o or {}) for p, o in protocols.items()}, metrics=metrics,
        ))  # fmt: skip
    return specs


def load_labeled(spec: TaskSpec) -> LabeledSet:
    """The task's labeled set, from whichever form its data takes."""
    url = spec.data.rstrip("/")
    if url.endswith(".parquet"):
        return load_parquet(url, spec.name, spec.label, spec.split_column)
    files = storage.list_files(url)
    if not files:
        raise TaskError(f"{url}: no such file or folder (task {spec.name})")
    if any(f.endswith(".tar") for f in files):
        return load_webdataset([f for f in files if f.endswith(".tar")], spec.name, spec.label)
    return load_folder(url, files, spec.name)


def _encode(values: list[Any], where: str) -> tuple[np.ndarray, list[str]]:
    if any(v is None for v in values):
        raise TaskError(f"{where}: missing labels")
    classes = sorted({str(v) for v in values})
    index = {c: i for i, c in enumerate(classes)}
    return np.asarray([index[str(v)] for v in values], dtype=np.int64), classes


def load_parquet(
    url: str, name: str, label_column: str = "label", split_column: str = ""
) -> LabeledSet:
    try:
        with open_url(url) as f:
            table = pq.read_table(f)
    except FileNotFoundError:
        raise TaskError(f"{url}: no such file (task {name})") from None
    except pa.ArrowInvalid as e:
        raise TaskError(f"{url}: not a readable Parquet file (task {name}): {e}") from None
    cols = set(table.column_names)
    for col in filter(None, (label_column, split_column)):
        if col not in cols:
            raise TaskError(f"{url}: no column {col!r} (columns: {sorted(cols)})")
    labels, classes = _encode(table.column(label_column).to_pylist(), url)
    test = None
    if split_column:
        test = np.asarray([str(s) == "test" for s in table.column(split_column).to_pylist()])
    if "text" in cols:
        texts = table.column("text").to_pylist()
        return LabeledSet(name, labels, texts=texts, test_mask=test, classes=classes)
    if "image" in cols:
        images = table.column("image").to_pylist()
        return LabeledSet(name, labels, images=images, test_mask=test, classes=classes)
    raise TaskError(f"{url}: expected a 'text' or an 'image' column (columns: {sorted(cols)})")


def load_folder(url: str, files: list[str], name: str) -> LabeledSet:
    """URL/CLASS/FILE: the folder name is the label; images or .txt files."""
    values, texts, images = [], [], []
    for f in files:
        rel = f[len(url) :].strip("/").split("/")
        if len(rel) != 2:
            continue  # not CLASS/FILE
        ext = Path(rel[1]).suffix.lower()
        if ext == ".txt":
            texts.append(read_bytes(f).decode("utf-8", errors="replace"))
        elif ext in _IMAGE_EXT:
            images.append(read_bytes(f))
        else:
            continue
        values.append(rel[0])
    if texts and images:
        raise TaskError(f"{url}: mixes .txt files and images; a task has one kind of input")
    if not values:
        raise TaskError(f"{url}: no CLASS/FILE.txt or CLASS/FILE.png|jpg files")
    labels, classes = _encode(values, url)
    if texts:
        return LabeledSet(name, labels, texts=texts, classes=classes)
    return LabeledSet(name, labels, images=images, classes=classes)


def load_webdataset(shards: list[str], name: str, label_key: str = "cls") -> LabeledSet:
    """Labeled WebDataset shards (local or in object storage), read with webdataset: each
    sample has a label member (`.cls` unless `label:` says otherwise) and a `.txt` or an image."""
    import tempfile

    import webdataset as wds

    label_key = "cls" if label_key == "label" else label_key
    values, texts, images = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        local = []
        for i, url in enumerate(shards):
            path = f"{tmp}/{i:06d}.tar"
            storage.get_file(url, path)
            local.append(path)
        for sample in wds.WebDataset(local, shardshuffle=False, empty_check=False):
            key = sample.get("__key__")
            if label_key not in sample:
                raise TaskError(f"{shards[0]}: sample {key} has no .{label_key} member")
            values.append(sample[label_key].decode().strip())
            if "txt" in sample:
                texts.append(sample["txt"].decode("utf-8", errors="replace"))
            elif img := next((sample[e] for e in ("png", "jpg", "jpeg") if e in sample), None):
                images.append(img)
            else:
                raise TaskError(f"{shards[0]}: sample {key} has neither .txt nor an image")
    if texts and images:
        raise TaskError(f"{shards[0]}: mixes text and image samples")
    labels, classes = _encode(values, shards[0])
    if texts:
        return LabeledSet(name, labels, texts=texts, classes=classes)
    return LabeledSet(name, labels, images=images, classes=classes)


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


def export_text_inputs(texts: list[str], folder: Path) -> dict[str, torch.Tensor]:
    """Tokenized with the export's own tokenizer, padded to its model_max_length."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    enc = tok(texts, padding="max_length", truncation=True, max_length=tok.model_max_length,
              return_tensors="pt")  # fmt: skip
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def image_inputs(images: list[bytes], size: int) -> dict[str, Any]:
    """Decoded and normalized exactly as the MAE objective's training batches."""
    from PIL import Image

    arrs = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in images]
    return {"pixel_values": images_to_tensor(arrs, size)}
