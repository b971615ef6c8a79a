"""`darkmatter prepare`: turn a text corpus or an image folder into WebDataset shards.

Algorithm (text):
  1. Expand the inputs (files, or folders walked recursively in sorted order) into the list of
     supported files: .txt and extension-less files (a document per non-empty line, or
     fortune-cookie format where a line holding only `%` separates documents), .jsonl (field
     `text_field`) and .parquet (column `text_field`, read in record batches).
  2. Pass 1 (only without --tokenizer): stream every document into a WordPiece trainer
     (BERT normalizer and pre-tokenizer; [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4).
  3. Pass 2: stream the documents again, encode them in small batches ("[CLS] doc [SEP]",
     never truncated) and append `{__key__, input_ids.npy, txt}` samples to the current tar.
Images: every .png/.jpg/.jpeg/.webp under the inputs becomes `{__key__, png}` (RGB, re-encoded).

Shards `shard-000000.tar`, ... are written straight to the output through a hashing wrapper, so
bytes and sha256 come for free; a shard is closed once its tar size reaches `shard_bytes`. Tar
headers use a fixed mtime, so the same input and tokenizer give byte-identical shards. The
manifest is removed first and written last: a half-written dataset never has a manifest.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import posixpath
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from webdataset import TarWriter

from data_pipeline import storage

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TEXT_SUFFIXES = {".txt", ".jsonl", ".parquet", ""}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
DEFAULT_SHARD_BYTES = 64 * 2**20
_ENCODE_BATCH = 256  # documents per encode_batch call: parallel, yet bounded memory
_TAR_BLOCK = 512


class PrepareError(ValueError):
    """A user error in the inputs of `darkmatter prepare`; the message names the path."""


# -- manifest -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    """What a prepared dataset holds; `digest` identifies its content (shard hashes in order)."""

    modality: str
    shards: list[ShardInfo]
    tokenizer: str | None = None
    version: int = 1
    num_samples: int = field(init=False)
    digest: str = field(init=False)

    def __post_init__(self) -> None:
        self.num_samples = sum(s.samples for s in self.shards)
        self.digest = hashlib.sha256("".join(s.sha256 for s in self.shards).encode()).hexdigest()

    def to_json(self) -> str:
        d = {
            "version": self.version,
            "modality": self.modality,
            "num_samples": self.num_samples,
            "tokenizer": self.tokenizer,
            "shards": [asdict(s) for s in self.shards],
            "digest": self.digest,
        }
        return json.dumps(d, indent=1) + "\n"

    def save(self, url: str) -> None:
        storage.write_bytes(storage.join(url, MANIFEST), self.to_json().encode())

    @classmethod
    def load(cls, url: str) -> Manifest:
        where = storage.join(url, MANIFEST)
        try:
            d = json.loads(storage.read_bytes(where))
        except FileNotFoundError:
            raise PrepareError(
                f"no manifest.json at {url}: run `darkmatter prepare` first"
            ) from None
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise PrepareError(f"{where}: not a JSON manifest: {e}") from None
        if not isinstance(d, dict) or d.get("version") != 1:
            raise PrepareError(f"{where}: not a version 1 darkmatter manifest")
        try:
            m = cls(d["modality"], [ShardInfo(**s) for s in d["shards"]], d.get("tokenizer"))
        except (KeyError, TypeError) as e:
            raise PrepareError(f"{where}: malformed manifest: {e!r}") from None
        # A manifest edited by hand (or a truncated copy) must not pass silently.
        if (m.num_samples, m.digest) != (d.get("num_samples"), d.get("digest")):
            raise PrepareError(f"{where}: num_samples/digest do not match its shard list")
        return m


# -- inputs ---------------------------------------------------------------------------------


def _suffix(url: str) -> str:
    return posixpath.splitext(posixpath.basename(url))[1].lower()


def _expand(inputs: list[str], suffixes: set[str]) -> list[str]:
    """Files of the inputs with a supported suffix; folders recurse in sorted order."""
    if not inputs:
        raise PrepareError("no inputs given")
    files: list[str] = []
    for url in inputs:
        if not storage.exists(url):
            raise PrepareError(f"input not found: {url}")
        found = storage.list_files(url)
        if found == [url]:  # named explicitly: an unsupported suffix is a mistake, not noise
            if _suffix(url) not in suffixes:
                raise PrepareError(
                    f"unsupported input file {url} (expected one of {sorted(suffixes)})"
                )
            files.append(url)
            continue
        # In folders skip dotfiles and foreign files (fortune's .dat indexes, .u8 symlinks).
        files += [
            f for f in found if _suffix(f) in suffixes and not posixpath.basename(f).startswith(".")
        ]
    return files


def _is_fortune(url: str) -> bool:
    with storage.open_url(url, "rt", encoding="utf-8", errors="replace") as f:
        return any(line.rstrip("\r\n") == "%" for line in f)


def _plain_documents(url: str, fortune: bool) -> Iterator[str]:
    with storage.open_url(url, "rt", encoding="utf-8", errors="replace") as f:
        if not fortune:
            for line in f:
                if line.strip():
                    yield line.strip()
            return
        lines: list[str] = []
        for line in f:
            line = line.rstrip("\r\n")
            if line == "%":
                if "\n".join(lines).strip():
                    yield "\n".join(lines).strip()
                lines = []
            else:
                lines.append(line)
        if "\n".join(lines).strip():
            yield "\n".join(lines).strip()


def _jsonl_documents(url: str, text_field: str) -> Iterator[str]:
    with storage.open_url(url, "rt", encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)[text_field]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise PrepareError(
                    f"{url}:{lineno}: not a JSON object with a {text_field!r} field"
                ) from None
            if not isinstance(value, str):
                raise PrepareError(f"{url}:{lineno}: field {text_field!r} is not a string")
            if value.strip():
                yield value


def _parquet_documents(url: str, text_field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with storage.open_url(url, "rb") as f:
        pf = pq.ParquetFile(f)
        if text_field not in pf.schema_arrow.names:
            raise PrepareError(
                f"{url}: no column {text_field!r} (columns: {pf.schema_arrow.names})"
            )
        kind = pf.schema_arrow.field(text_field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise PrepareError(f"{url}: column {text_field!r} holds {kind}, not strings")
        for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
            for value in batch.column(0).to_pylist():
                if isinstance(value, str) and value.strip():
                    yield value


def _documents(
    files: list[str], text_field: str, text_format: str, fortune: dict[str, bool]
) -> Iterator[str]:
    """Every document of the files in order; `fortune` memoizes format detection across passes."""
    for url in files:
        suffix = _suffix(url)
        if suffix == ".jsonl":
            yield from _jsonl_documents(url, text_field)
        elif suffix == ".parquet":
            yield from _parquet_documents(url, text_field)
        else:
            if url not in fortune:
                fortune[url] = text_format == "fortune" or (
                    text_format == "auto" and _is_fortune(url)
                )
            yield from _plain_documents(url, fortune[url])


# -- tokenizer ------------------------------------------------------------------------------


def train_tokenizer(documents: Iterable[str], vocab_size: int, lowercase: bool = True) -> Any:
    """A BERT-style WordPiece tokenizer trained on a stream of documents."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import WordPieceTrainer

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    tok.train_from_iterator(documents, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    return tok


def _load_tokenizer(url: str) -> Any:
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_str(storage.read_bytes(url).decode())
    except FileNotFoundError:
        raise PrepareError(f"tokenizer not found: {url}") from None
    except Exception as e:  # the Rust side raises plain Exception on a malformed file
        raise PrepareError(f"{url}: not a tokenizers tokenizer.json: {e}") from None
    missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
    if missing:
        raise PrepareError(f"{url}: tokenizer lacks special tokens {missing}")
    ids = tok.encode("x").ids
    if not ids or ids[0] != tok.token_to_id("[CLS]") or ids[-1] != tok.token_to_id("[SEP]"):
        raise PrepareError(f"{url}: tokenizer does not wrap text in [CLS] ... [SEP]")
    return tok


def _tokenizer_configs(lowercase: bool) -> dict[str, bytes]:
    """The small files that let `transformers` load the folder like a BERT tokenizer."""
    names = ["pad", "unk", "cls", "sep", "mask"]
    specials = {f"{n}_token": t for n, t in zip(names, SPECIAL_TOKENS, strict=True)}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "do_lower_case": lowercase, **specials}
    return {
        "tokenizer_config.json": json.dumps(config, indent=1).encode(),
        "special_tokens_map.json": json.dumps(specials, indent=1).encode(),
    }


# -- shards ---------------------------------------------------------------------------------


class _HashingWriter:
    """A write-only file object that counts and hashes what it forwards."""

    def __init__(self, f: Any):
        self.f, self.bytes, self.sha = f, 0, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.bytes += len(data)
        self.f.write(data)
        return len(data)

    def flush(self) -> None:
        self.f.flush()


def _member_bytes(sample: dict[str, Any]) -> int:
    """Tar bytes a sample adds: a header block plus the data padded to whole blocks."""
    sizes = [len(v) for k, v in sample.items() if not k.startswith("_")]
    return sum(_TAR_BLOCK + -(-n // _TAR_BLOCK) * _TAR_BLOCK for n in sizes)


class ShardWriter:
    """Writes samples into `shard-NNNNNN.tar` files under a URL, rolling over at `shard_bytes`."""

    def __init__(self, url: str, shard_bytes: int):
        self.url, self.shard_bytes = url, shard_bytes
        self.shards: list[ShardInfo] = []
        self._file: Any = None
        self._hasher: _HashingWriter | None = None
        self._tar: TarWriter | None = None
        self._samples = self._size = 0

    def _open(self) -> None:
        name = f"shard-{len(self.shards):06d}.tar"
        self._file = storage.open_url(storage.join(self.url, name), "wb")
        self._hasher = _HashingWriter(self._file)
        # encoder=False: values are bytes already (webdataset would pickle unknown types);
        # mtime=0 makes the tar bytes, hence sha256 and digest, reproducible.
        self._tar = TarWriter(self._hasher, encoder=False, mtime=0)
        self._samples = self._size = 0

    def next_key(self) -> str:
        return f"{len(self.shards):06d}-{self._samples:08d}"

    def write(self, sample: dict[str, Any]) -> None:
        if self._tar is None:
            self._open()
        assert self._tar is not None
        self._tar.write(sample)
        self._samples += 1
        self._size += _member_bytes(sample)
        if self._size >= self.shard_bytes:
            self.close()

    def close(self) -> None:
        if self._tar is None:
            return
        assert self._hasher is not None
        self._tar.close()  # TarWriter leaves a caller's file object open
        self._file.close()  # the upload happens here for object stores
        name = f"shard-{len(self.shards):06d}.tar"
        self.shards.append(
            ShardInfo(name, self._samples, self._hasher.bytes, self._hasher.sha.hexdigest())
        )
        self._tar = self._hasher = self._file = None
        self._samples = self._size = 0  # next_key() already names the next shard's first sample


def _npy_bytes(ids: list[int]) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(ids, dtype=np.int32), allow_pickle=False)
    return buf.getvalue()


def _write_text(writer: ShardWriter, docs: Iterator[str], tok: Any) -> None:
    batch: list[str] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == _ENCODE_BATCH:
            _write_text_batch(writer, batch, tok)
            batch = []
    if batch:
        _write_text_batch(writer, batch, tok)


def _write_text_batch(writer: ShardWriter, batch: list[str], tok: Any) -> None:
    for doc, enc in zip(batch, tok.encode_batch(batch), strict=True):
        sample = {
            "__key__": writer.next_key(),
            "input_ids.npy": _npy_bytes(enc.ids),
            "txt": doc.encode(),
        }
        writer.write(sample)


def _png_bytes(url: str) -> bytes:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(storage.read_bytes(url))) as im:
            # Honour the camera's EXIF orientation so the pixels are upright.
            rgb = ImageOps.exif_transpose(im).convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise PrepareError(f"cannot decode image {url}: {e}") from None
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return buf.getvalue()


# -- entry points ---------------------------------------------------------------------------


def prepare(
    inputs: list[str],
    output_url: str,
    *,
    modality: str,
    text_field: str = "text",
    text_format: str = "auto",
    tokenizer: str | None = None,
    vocab_size: int = 8000,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    lowercase: bool = True,
) -> Manifest:
    """Write the shards, tokenizer (text) and manifest of a dataset to `output_url`."""
    if modality not in ("text", "image"):
        raise PrepareError(f"modality must be 'text' or 'image', got {modality!r}")
    if text_format not in ("auto", "lines", "fortune"):
        raise PrepareError(f"text_format must be auto, lines or fortune, got {text_format!r}")
    if shard_bytes <= 0:
        raise PrepareError(f"shard size must be positive, got {shard_bytes} bytes")
    where = ", ".join(inputs)
    files = _expand(inputs, TEXT_SUFFIXES if modality == "text" else IMAGE_SUFFIXES)
    if modality == "image" and not files:
        raise PrepareError(f"no images found in {where}")
    storage.check_bucket(output_url)  # before a long tokenizer training, not after

    fortune: dict[str, bool] = {}

    def docs() -> Iterator[str]:  # a fresh pass over the corpus on each call
        return _documents(files, text_field, text_format, fortune)

    tok: Any = None
    if modality == "text":
        if next(docs(), None) is None:
            raise PrepareError(f"no text documents found in {where}")
        tok = (
            _load_tokenizer(tokenizer)
            if tokenizer
            else train_tokenizer(docs(), vocab_size, lowercase)
        )
        # Whole documents, whatever the tokenizer file says: the trainer crops to seq_len.
        tok.no_truncation()
        tok.no_padding()

    storage.makedirs(output_url)
    storage.delete(storage.join(output_url, MANIFEST))  # from here on the dataset is incomplete
    writer = ShardWriter(output_url, shard_bytes)
    if modality == "text":
        storage.write_bytes(storage.join(output_url, TOKENIZER), tok.to_str(pretty=True).encode())
        for name, data in _tokenizer_configs(lowercase).items():
            storage.write_bytes(storage.join(output_url, name), data)
        _write_text(writer, docs(), tok)
    else:
        for url in files:
            writer.write({"__key__": writer.next_key(), "png": _png_bytes(url)})
    writer.close()
    manifest = Manifest(modality, writer.shards, TOKENIZER if modality == "text" else None)
    manifest.save(output_url)
    return manifest


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def cli(argv: list[str]) -> int:
    """`darkmatter prepare INPUT [INPUT ...] --output URL --modality text|image ...`"""
    p = argparse.ArgumentParser(prog="darkmatter prepare", description=__doc__.split("\n")[0])
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files or folders (recursed)")
    p.add_argument(
        "--output", required=True, metavar="URL", help="s3://bucket/prefix, file://… or a folder"
    )
    p.add_argument("--modality", required=True, choices=["text", "image"])
    p.add_argument(
        "--text-field", default="text", metavar="NAME", help="JSONL field / Parquet column"
    )
    p.add_argument(
        "--text-format",
        default="auto",
        choices=["auto", "lines", "fortune"],
        help=".txt layout: a document per line, or fortune files split by '%%' lines",
    )
    p.add_argument(
        "--tokenizer", metavar="PATH", help="an existing tokenizer.json instead of training one"
    )
    p.add_argument("--vocab-size", type=int, default=8000, metavar="N")
    p.add_argument("--shard-size-mb", type=float, default=64.0, metavar="F")
    p.add_argument("--cased", action="store_true", help="do not lowercase (trained tokenizer only)")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse already printed
        return int(e.code or 0)
    try:
        m = prepare(
            args.inputs, args.output, modality=args.modality, text_field=args.text_field,
            text_format=args.text_format, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
            shard_bytes=int(args.shard_size_mb * 2**20), lowercase=not args.cased,
        )  # fmt: skip
    # OSError covers FileNotFoundError and object-store refusals (PermissionError).
    except (PrepareError, storage.StorageError, OSError) as e:
        print(f"darkmatter prepare: error: {e}", file=sys.stderr)
        return 2
    size = _human(sum(s.bytes for s in m.shards))
    print(
        f"prepared {m.num_samples} {m.modality} samples in {len(m.shards)} shards ({size}) at {args.output}"
    )
    if m.tokenizer:
        print(f"tokenizer: {storage.join(args.output, m.tokenizer)}")
    return 0
