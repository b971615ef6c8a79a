"""Downstream tasks: labeled sets and what to run on them, declared in YAML.

```yaml
tasks:
  - name: fortunes_topics
    data: s3://bucket/tasks/topics.parquet  # a Parquet file, a folder of class folders, or a
                                            # folder/prefix of labeled WebDataset shards (.tar)
    label: label          # label column (Parquet) or member extension (WebDataset: cls)
    split: {test_fraction: 0.3, seed: 0}    # or {column: split}: rows "train" / "test"
    protocols:            # any of these, with their options (defaults shown)
      linear_probe: {C: 1.0}  # or C: auto, cross-validated on the training rows (probe.py)
      knn: {k: 20, temperature: 0.07}
      finetune: {epochs: 2, lr: 1.0e-4, batch_size: 32}
    metrics: [accuracy, macro_f1]
```

A labeled set holds one kind of input (`KINDS`): texts, or encoded media files (PNG/JPEG images,
…) kept as bytes until an encoder's inputs are made. The kind is found from the data: the Parquet
column named after it (`text`, `image`, …), WebDataset members and class-folder files by suffix.
"""

from __future__ import annotations

import abc
import contextlib
import io
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

from darkmatter import storage
from darkmatter.data_pipeline import transforms
from darkmatter.data_pipeline.transforms import images_to_tensor
from darkmatter.storage import open_url, read_bytes

PROTOCOLS = {
    "linear_probe": {"C": 1.0},
    "knn": {"k": 20, "temperature": 0.07},
    "finetune": {"epochs": 2, "lr": 1.0e-4, "batch_size": 32},
}
METRICS = ("accuracy", "macro_f1")
Rows = Sequence[int] | np.ndarray  # indices into a labeled set
# Input kinds (an encoder's modality) and the file suffixes / WebDataset members that hold them.
KINDS: dict[str, tuple[str, ...]] = {
    "text": (".txt",),
    "image": (".png", ".jpg", ".jpeg"),
    "audio": (".wav", ".flac"),
    "video": (".gif", ".webp", ".mp4", ".webm", ".mkv", ".mov", ".avi"),  # animated, or PyAV's
}


def kind_of(name: str) -> str | None:
    """The input kind of a file name or WebDataset member extension (None: not an input)."""
    suffix = "." + name.lower().rsplit(".", 1)[-1]
    return next((k for k, suffixes in KINDS.items() if suffix in suffixes), None)


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
    kind: str  # a key of KINDS
    items: Sequence[Any]  # [N]: str for text, the encoded file's bytes otherwise (Items)
    test_mask: np.ndarray | None = None  # [N] bool, when the data says which rows are test
    classes: list[str] = field(default_factory=list)  # label names, index = label id

    def take(self, rows: Rows) -> list[Any]:
        """The inputs of `rows` (task indices), read now if the set reads them lazily."""
        if isinstance(self.items, Items):
            return self.items.take(rows)
        return [self.items[i] for i in rows]

    def close(self) -> None:
        """Remove what the set downloaded to read its inputs from (its shards, its file)."""
        if isinstance(self.items, Items):
            self.items.close()


class Items(Sequence[Any]):
    """A labeled set's inputs, read when a batch asks for them (`take`): its memory is what one
    batch's inputs take (and one Parquet row group's), not the set's size. The set's labels
    are read up front; a remote file or shard is downloaded once to a temporary folder (disk,
    not memory), removed by close()."""

    def __init__(self, n: int, tmp: tempfile.TemporaryDirectory[str] | None = None):
        self.n, self._tmp = n, tmp

    def __len__(self) -> int:
        return self.n

    @overload
    def __getitem__(self, i: int) -> Any: ...
    @overload
    def __getitem__(self, i: slice) -> list[Any]: ...
    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return self.take(range(*i.indices(self.n)))
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return self.take([i % self.n])[0]

    def __iter__(self) -> Iterator[Any]:
        for start in range(0, self.n, 256):
            yield from self.take(range(start, min(self.n, start + 256)))

    @abc.abstractmethod
    def take(self, rows: Rows) -> list[Any]:
        """The inputs of `rows`, in their order."""

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def _local_copy(url: str, name: str) -> tuple[str, tempfile.TemporaryDirectory[str] | None]:
    """`url` as a local path: itself, or a download into a temporary folder (returned)."""
    if not storage.is_remote(url):
        return url, None
    tmp = tempfile.TemporaryDirectory(prefix="darkmatter-task-")
    path = str(Path(tmp.name, name))
    storage.get_file(url, path)
    return path, tmp


class ParquetItems(Items):
    """One column of a Parquet file, read a row group at a time (the last two kept)."""

    def __init__(self, path: str, column: str, tmp: tempfile.TemporaryDirectory[str] | None):
        self.file = pq.ParquetFile(path)
        meta = self.file.metadata
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.column = column
        self._groups: dict[int, pa.ChunkedArray] = {}
        super().__init__(int(self.starts[-1]), tmp)

    def _group(self, g: int) -> pa.ChunkedArray:
        if g not in self._groups:
            if len(self._groups) >= 2:
                del self._groups[next(iter(self._groups))]
            self._groups[g] = self.file.read_row_group(g, columns=[self.column]).column(0)
        return self._groups[g]

    def take(self, rows: Rows) -> list[Any]:
        index = np.asarray(rows, dtype=np.int64)
        groups = np.searchsorted(self.starts, index, side="right") - 1
        out: list[Any] = [None] * len(index)
        for g in dict.fromkeys(groups.tolist()):  # each group once, in the order first asked
            where = np.flatnonzero(groups == g)
            picked = self._group(g).take(pa.array(index[where] - self.starts[g])).to_pylist()
            for k, value in zip(where.tolist(), picked, strict=True):
                out[k] = value
        return out

    def close(self) -> None:
        self._groups.clear()
        super().close()


class MemberItems(Items):
    """One member of each sample of tar shards (downloaded), read at its offset."""

    def __init__(self, paths: list[str], shard: np.ndarray, offset: np.ndarray,
                 size: np.ndarray, text: bool, tmp: tempfile.TemporaryDirectory[str] | None):  # fmt: skip
        self.paths, self.shard, self.offset, self.size, self.text = paths, shard, offset, size, text
        super().__init__(len(shard), tmp)

    def take(self, rows: Rows) -> list[Any]:
        out: list[Any] = []
        with contextlib.ExitStack() as stack:
            handles: dict[int, Any] = {}
            for i in rows:
                s = int(self.shard[i])
                if s not in handles:
                    handles[s] = stack.enter_context(open(self.paths[s], "rb"))
                handles[s].seek(int(self.offset[i]))
                data = handles[s].read(int(self.size[i]))
                out.append(data.decode("utf-8", errors="replace") if self.text else data)
        return out


class FileItems(Items):
    """The files of a class-folder set, read (from storage) when asked."""

    def __init__(self, urls: list[str], text: bool):
        self.urls, self.text = urls, text
        super().__init__(len(urls))

    def take(self, rows: Rows) -> list[Any]:
        datas = [read_bytes(self.urls[i]) for i in rows]
        return [d.decode("utf-8", errors="replace") if self.text else d for d in datas]


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
            c = (opts or {}).get("C", 1.0) if p == "linear_probe" else 1.0
            if c != "auto" and (isinstance(c, bool) or not isinstance(c, (int, float)) or c <= 0):
                raise TaskError(f"{where}.protocols.linear_probe.C: expected a positive number "
                                f"or auto, got {c!r}")  # fmt: skip
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


def preflight(spec: TaskSpec) -> None:
    """What can be checked of the task's data without reading it all, before any checkpoint is
    fetched: a Parquet file's columns (its schema alone: the label, the split column, an input
    column), a WebDataset's first sample (its label and input members), a folder's first
    CLASS/FILE. TaskError naming the file and what it lacks."""
    url = spec.data.rstrip("/")
    if url.endswith(".parquet"):
        try:
            with open_url(url) as f:
                cols = set(pq.read_schema(f).names)
        except FileNotFoundError:
            raise TaskError(f"{url}: no such file (task {spec.name})") from None
        except pa.ArrowInvalid as e:
            raise TaskError(f"{url}: not a readable Parquet file (task {spec.name}): {e}") from None
        for col in filter(None, (spec.label, spec.split_column)):
            if col not in cols:
                raise TaskError(f"{url}: no column {col!r} (columns: {sorted(cols)})")
        if not cols & set(KINDS):
            wanted = " or ".join(repr(k) for k in KINDS)
            raise TaskError(f"{url}: expected a column {wanted} (columns: {sorted(cols)})")
        return
    files = storage.list_files(url)
    if not files:
        raise TaskError(f"{url}: no such file or folder (task {spec.name})")
    shards = sorted(f for f in files if f.endswith(".tar"))
    if shards:
        _check_first_sample(shards[0], "cls" if spec.label == "label" else spec.label)
    elif not any(
        len(rel := f[len(url) :].strip("/").split("/")) == 2 and kind_of(rel[-1]) for f in files
    ):
        suffixes = "|".join(s.lstrip(".") for k in KINDS.values() for s in k)
        raise TaskError(f"{url}: no CLASS/FILE.{suffixes} files")


def _check_first_sample(shard: str, label_key: str) -> None:
    """The first sample of a labeled shard has the label member and an input member."""
    import tarfile

    members: list[str] = []
    key = None
    with open_url(shard) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for info in tar:
            if not info.isfile() or "." not in Path(info.name).name:
                continue
            stem, ext = Path(info.name).name.split(".", 1)
            sample = str(Path(info.name).parent / stem)
            if key is None:
                key = sample
            if sample != key:
                break
            members.append(ext)
    if key is None:
        raise TaskError(f"{shard}: an empty shard (no samples)")
    if label_key not in members:
        raise TaskError(f"{shard}: sample {key} has no .{label_key} member (the task's label); "
                        f"it has {', '.join('.' + m for m in members)}")  # fmt: skip
    if not any(m != label_key and kind_of(m) for m in members):
        raise TaskError(f"{shard}: sample {key} has no input member (.txt, an image…)")


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
    """The labels (and split) read whole; the input column a row group at a time (ParquetItems)
    from a local copy of a remote file."""
    tmp = None
    try:
        path, tmp = _local_copy(url, "task.parquet")
        cols = set(pq.read_schema(path).names)
        for col in filter(None, (label_column, split_column)):
            if col not in cols:
                raise TaskError(f"{url}: no column {col!r} (columns: {sorted(cols)})")
        kind = next((k for k in KINDS if k in cols), None)
        if kind is None:
            wanted = " or ".join(repr(k) for k in KINDS)
            raise TaskError(f"{url}: expected a column {wanted} (columns: {sorted(cols)})")
        table = pq.read_table(path, columns=list(dict.fromkeys(filter(None, (label_column,
                                                                             split_column)))))  # fmt: skip
        labels, classes = _encode(table.column(label_column).to_pylist(), url)
        test = None
        if split_column:
            test = np.asarray([str(v) == "test" for v in table.column(split_column).to_pylist()])
        items = ParquetItems(path, kind, tmp)
    except FileNotFoundError:
        _cleanup(tmp)
        raise TaskError(f"{url}: no such file (task {name})") from None
    except pa.ArrowInvalid as e:
        _cleanup(tmp)
        raise TaskError(f"{url}: not a readable Parquet file (task {name}): {e}") from None
    except BaseException:
        _cleanup(tmp)
        raise
    return LabeledSet(name, labels, kind, items, test_mask=test, classes=classes)


def _cleanup(tmp: tempfile.TemporaryDirectory[str] | None) -> None:
    if tmp is not None:
        tmp.cleanup()


def _one_kind(kinds: set[str], where: str) -> str:
    if len(kinds) > 1:
        raise TaskError(f"{where}: mixes {' and '.join(sorted(kinds))} inputs; a task has one kind")
    return kinds.pop()


def load_folder(url: str, files: list[str], name: str) -> LabeledSet:
    """URL/CLASS/FILE: the folder name is the label; files of one kind (.txt, images, …)."""
    values, urls, kinds = [], [], set()
    for f in files:
        rel = f[len(url) :].strip("/").split("/")
        kind = kind_of(rel[-1])
        if len(rel) != 2 or kind is None:
            continue  # not CLASS/FILE of a known kind
        urls.append(f)
        values.append(rel[0])
        kinds.add(kind)
    if not values:
        suffixes = "|".join(s.lstrip(".") for k in KINDS.values() for s in k)
        raise TaskError(f"{url}: no CLASS/FILE.{suffixes} files")
    labels, classes = _encode(values, url)
    kind = _one_kind(kinds, url)
    return LabeledSet(name, labels, kind, FileItems(urls, kind == "text"), classes=classes)


def load_webdataset(shards: list[str], name: str, label_key: str = "cls") -> LabeledSet:
    """Labeled WebDataset shards (local or in object storage, as webdataset's ShardWriter and
    img2dataset write them): each sample, the tar members that share its key, has a label member
    (`.cls` unless `label:` says otherwise) and an input member (`.txt`, an image, … by KINDS;
    the first by name). The shards are downloaded once (local ones read in place) and indexed:
    labels read, inputs left in the shards at their offsets (MemberItems)."""
    label_key = "cls" if label_key == "label" else label_key
    tmp = tempfile.TemporaryDirectory(prefix="darkmatter-task-")
    try:
        paths: list[str] = []
        values: list[str] = []
        kinds: set[str] = set()
        where: list[tuple[int, int, int]] = []  # per sample: (shard, offset, size)
        for s, url in enumerate(shards):
            path = url
            if storage.is_remote(url):
                path = f"{tmp.name}/{s:06d}.tar"
                storage.get_file(url, path)
            paths.append(path)
            with tarfile.open(path, mode="r") as tar:
                for key, members in _samples(tar):
                    if label_key not in members:
                        raise TaskError(f"{url}: sample {key} has no .{label_key} member")
                    info = members[label_key]
                    label = tar.extractfile(info)
                    values.append(label.read().decode().strip() if label else "")
                    found = [(m, k) for m in sorted(members)
                             if m != label_key and (k := kind_of(m))]  # fmt: skip
                    if not found:
                        raise TaskError(f"{url}: sample {key} has no input member (.txt, an "
                                        "image…)")  # fmt: skip
                    member, kind = found[0]
                    kinds.add(kind)
                    where.append((s, members[member].offset_data, members[member].size))
        if not values:
            raise TaskError(f"{shards[0]}: no samples in {len(shards)} shard(s) (task {name})")
        labels, classes = _encode(values, shards[0])
        kind = _one_kind(kinds, shards[0])
        index = np.asarray(where, dtype=np.int64)
        items = MemberItems(paths, index[:, 0], index[:, 1], index[:, 2], kind == "text", tmp)
    except BaseException:
        tmp.cleanup()
        raise
    return LabeledSet(name, labels, kind, items, classes=classes)


def _samples(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, tarfile.TarInfo]]]:
    """A shard's samples as webdataset groups them: consecutive files whose names share the
    part before the first dot of the base name (the key); {extension: member} each."""
    key: str | None = None
    members: dict[str, tarfile.TarInfo] = {}
    for info in tar:
        name = Path(info.name).name
        if not info.isfile() or "." not in name or name.startswith("__"):
            continue
        stem, ext = name.split(".", 1)
        sample = str(Path(info.name).parent / stem)
        if sample != key and key is not None:
            yield key, members
            members = {}
        key = sample
        members[ext.lower()] = info
    if key is not None:
        yield key, members


def load_tokenizer(tokenizer_url: str, seq_len: int) -> Any:
    """A run's tokenizer (prepare's tokenizer.json), truncating and padding to seq_len."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(read_bytes(tokenizer_url).decode())
    tok.enable_truncation(seq_len)
    tok.enable_padding(pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]", length=seq_len)
    return tok


def text_inputs(texts: list[str], tok: Any) -> dict[str, torch.Tensor]:
    """Tokenized with a run's tokenizer (load_tokenizer)."""
    enc = tok.encode_batch(texts)
    return {
        "input_ids": torch.tensor([e.ids for e in enc]),
        "attention_mask": torch.tensor([e.attention_mask for e in enc]),
    }


def export_text_inputs(
    texts: list[str], folder_or_tokenizer: Path | Any
) -> dict[str, torch.Tensor]:
    """Tokenized with the export's own tokenizer (its folder, or the tokenizer loaded from it),
    padded to its model_max_length."""
    from transformers import AutoTokenizer

    tok = folder_or_tokenizer
    if isinstance(tok, (str, Path)):
        tok = AutoTokenizer.from_pretrained(str(tok))
    enc = tok(texts, padding="max_length", truncation=True, max_length=tok.model_max_length,
              return_tensors="pt")  # fmt: skip
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def image_inputs(images: list[bytes], size: int) -> dict[str, Any]:
    """Decoded and normalized exactly as the MAE objective's training batches."""
    from PIL import Image

    arrs = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in images]
    return {"pixel_values": images_to_tensor(arrs, size)}


def video_inputs(
    clips: list[Any], num_frames: int, stride: int, size: int, first: int = 0
) -> dict[str, Any]:
    """Clip bytes (animated GIF/WebP, or what PyAV decodes; or {"bytes": …} structs) decoded
    and made into inputs as the video objective's training batches are, with the centred
    window of frames where training draws its offset. `first`: the task's index of clips[0],
    for the error line."""
    from darkmatter.data_pipeline.prepare import read_clip

    frames = []
    for i, clip in enumerate(clips, start=first):
        data = clip.get("bytes") if isinstance(clip, dict) else clip
        if not isinstance(data, bytes):
            raise TaskError(f"video item {i} of the task: {type(data).__name__}, not clip bytes")
        try:
            frames.append(np.stack(read_clip(data)[0]))
        except (ValueError, TypeError) as e:
            raise TaskError(f"video item {i} of the task: not a readable clip ({e})") from None
    return {"pixel_values": transforms.clips_to_tensor(frames, num_frames, stride, size)}


def audio_inputs(
    clips: list[Any], seconds: float, mask_length: int, first: int = 0
) -> dict[str, torch.Tensor]:
    """WAV/FLAC bytes (or Hugging Face's {"bytes": …} audio structs) decoded, channels averaged,
    and made into inputs as the wav2vec2 objective's training batches are (resampled to 16 kHz,
    normalized, padded), from the start of each clip where training crops at random. `first`:
    the task's index of clips[0], for the error line."""
    import soundfile

    waves, rates = [], []
    for i, clip in enumerate(clips, start=first):
        data = clip.get("bytes") if isinstance(clip, dict) else clip
        try:
            wave, rate = soundfile.read(io.BytesIO(data or b""), dtype="float32", always_2d=True)
        except (soundfile.LibsndfileError, TypeError, RuntimeError) as e:
            raise TaskError(
                f"audio item {i} of the task: not a readable WAV/FLAC file ({e})"
            ) from None
        waves.append(wave.mean(axis=1))
        rates.append(int(rate))
    where = [f"audio item {i} of the task" for i in range(first, first + len(clips))]
    return transforms.audio_inputs(waves, rates, seconds, mask_length, where)
