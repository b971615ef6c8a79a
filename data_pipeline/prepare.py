"""`darkmatter prepare`: turn text, image, audio or video inputs into WebDataset shards plus a
manifest.

Algorithm:
  1. Inputs. Expand the inputs (files, or folders walked recursively in sorted order; dotfiles
     and foreign suffixes in folders are skipped) into the ordered list of supported files with
     their sizes and versions (mtime or ETag):
       text:  .txt and extension-less files (a document per non-empty line, or fortune-cookie
              format where a line holding only `%` separates documents; `auto` means fortune
              when such a line occurs in the first MiB), .jsonl (field `text_field`), .parquet
              (string column `text_field`);
       image: .png/.jpg/.jpeg/.webp files, .parquet (binary column `image_field`, or a struct
              column with a binary `bytes` field, as Hugging Face datasets store images);
       audio: .wav/.flac files, .parquet (binary column `audio_field`, or such a struct);
       video: animated .gif/.webp files (Pillow), .mp4/.webm/.mkv/.mov/.avi (PyAV, the optional
              `video` extra), .parquet (binary column `video_field` of such bytes, or a struct).
  2. Plan. The ordered input is cut into work *units*, a pure function of the inputs and the
     options, never of --workers. A piece of input is a whole media or fortune file, a byte range
     of `unit_bytes` of a line-based file (.txt lines, .jsonl; a line belongs to the range that
     holds its first byte) or one Parquet row group; consecutive pieces join a unit until it
     holds `unit_bytes` of input. Items (documents, images, audio files) are numbered within
     their unit; sample keys are `UUUUUU-IIIIIIII` (unit, item): unique and free of dots.
  3. Resume. The fingerprint is the input list (URL, size, version) plus every option that
     shapes the output. If `_progress/plan.json` holds the same fingerprint and the output's
     tokenizer.json still has the sha256 recorded there, that tokenizer is reused: training is
     not reproducible, and resumed units must share one tokenizer. The run id hashes the
     fingerprint with the tokenizer's sha256.
  4. Dedup (optional). A parallel pass hashes every item (sha256 of the document's UTF-8, or of
     the file bytes, before any decode check: a copy of an undecodable file counts as a
     duplicate); walking the units in input order, the parent keeps the first occurrence of
     each hash and tells each unit which of its item numbers to drop.
  5. Tokenizer (text, without --tokenizer, unless resumed): WordPiece trained in the parent in
     one pass over the kept documents (BERT normalizer and pre-tokenizer; [PAD]=0 [UNK]=1
     [CLS]=2 [SEP]=3 [MASK]=4). A given tokenizer may number them otherwise (BERT's WordPiece
     vocabulary has [CLS]=101) but must have all five; the manifest records their ids.
  6. Output. manifest.json is removed (from here on the dataset is incomplete); unless resumed,
     plan.json is removed, the tokenizer files are written, then the new plan.json.
  7. Units. A unit whose record `_progress/unit-UUUUUU.json` carries this run id and whose shards
     all read back with the recorded size and sha256 is reused. The others run in a process pool
     (spawn context: s3fs is not fork-safe), each writing `shard-UUUUUU-KKKKKK.tar` through a
     hashing wrapper (bytes and sha256 for free), rolling over at `shard_bytes` of tar or
     `shard_samples` samples, and then its record. Text samples are `{input_ids.npy, txt}`
     ("[CLS] doc [SEP]", never truncated, encoded in small batches). Images and audio keep their
     original bytes under the extension of their detected format (jpg, png, webp; wav, flac)
     after a full decode check; an undecodable item is skipped and counted, or an error with
     `strict`. A video clip is decoded whole and stored as a frame sequence: one member per
     frame, `NNNN.png` (GIF/WebP sources, lossless) or `NNNN.jpg` (lossy codecs), and `json` =
     {"frames": n, "fps": f} (fps when the source says it). With `key_field`, JSONL/Parquet samples also get `json` = {"id": value}.
  8. Manifest. Shards are listed in (unit, shard) order, with `stats` (units, skipped,
     duplicates) and, for text, `special_tokens` ({"pad": id, "unk": id, "cls": id, "sep": id,
     "mask": id}, of the tokenizer used). Shard files of prepare's naming (this version's or
     the older `shard-NNNNNN.tar`) and unit records that this run does not list are deleted, then
     manifest.json is written last. `_progress/` stays, so a re-run only verifies.
Tar headers use a fixed mtime and owner, and each unit depends only on its own input and the
tokenizer, so the same inputs and tokenizer give byte-identical shards whatever the number of
workers. Memory stays bounded: inputs are streamed; the parent holds the plan, the shard list and
(with dedup) one 32-byte hash per distinct item plus the numbers of the dropped ones.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import posixpath
import re
import sys
import tarfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from darkmatter import storage

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
PROGRESS = "_progress"
PLAN = "plan.json"
# The tokens the text objectives need, under the names the manifest's `special_tokens` uses.
SPECIAL_NAMES = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
SPECIAL_TOKENS = list(SPECIAL_NAMES.values())  # in the order a trained tokenizer numbers them
# What a text manifest without `special_tokens` means: it predates the field, when prepare's
# own trained tokenizer numbered SPECIAL_TOKENS from 0.
DEFAULT_SPECIAL_IDS = {name: i for i, name in enumerate(SPECIAL_NAMES)}
MODALITIES = ("text", "image", "audio", "video")
TEXT_SUFFIXES = {".txt", ".jsonl", ".parquet", ""}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".parquet"}
AUDIO_SUFFIXES = {".wav", ".flac", ".parquet"}
AV_SUFFIXES = {".mp4", ".webm", ".mkv", ".mov", ".avi"}  # decoded by PyAV (optional)
VIDEO_SUFFIXES = {".gif", ".webp", ".parquet"} | AV_SUFFIXES
DEFAULT_SHARD_BYTES = 64 * 2**20
UNIT_SHARDS = 8  # default unit: the input bytes of about 8 shards, so few shards are partial
_FORMAT = 2  # bump when the same inputs and options would give other shards
_ENCODE_BATCH = 256  # documents per encode_batch call: parallel, yet bounded memory
_TEXT_ROWS = 1024  # Parquet rows per batch for strings
_MEDIA_ROWS = 64  # ... and for encoded images/audio, which are much larger
_TAR_BLOCK = 512
_FORTUNE_SNIFF = 2**20
_READ_CHUNK = 2**20
_REPORT_SECONDS = 0.25  # how often a worker sends progress to the parent
_SKIPPED_EXAMPLES = 5  # undecodable inputs named per unit (the rest are counted)
_IMAGE_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
_AUDIO_EXTENSIONS = {"WAV": "wav", "WAVEX": "wav", "RF64": "wav", "FLAC": "flac"}
_SHARD_NAME = re.compile(r"shard-\d{6,}(-\d{6,})?\.tar")  # this version's and the one before
_RECORD_NAME = re.compile(r"unit-(\d{6,})\.json")


class PrepareError(ValueError):
    """A user error in the inputs of `darkmatter prepare`; the message names the path."""


class _Undecodable(Exception):
    """An image, audio or video item the decoders refuse; the message says why."""


# -- manifest -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class PrepareRun:
    """What one prepare() call did (not part of the manifest file)."""

    units: int
    reused: int
    written: int
    skipped_examples: list[str]


@dataclass
class Manifest:
    """What a prepared dataset holds; `digest` identifies its content (shard hashes in order)."""

    modality: str
    shards: list[ShardInfo]
    tokenizer: str | None = None
    version: int = 1
    num_samples: int = field(init=False)
    digest: str = field(init=False)
    stats: dict[str, int] | None = None
    """Optional counts from prepare: units, skipped (undecodable inputs), duplicates."""
    special_tokens: dict[str, int] | None = None
    """Text: the tokenizer's id of each SPECIAL_NAMES token; DEFAULT_SPECIAL_IDS if not given."""
    run: PrepareRun | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.num_samples = sum(s.samples for s in self.shards)
        self.digest = hashlib.sha256("".join(s.sha256 for s in self.shards).encode()).hexdigest()
        if self.tokenizer and self.special_tokens is None:
            self.special_tokens = dict(DEFAULT_SPECIAL_IDS)

    def to_json(self) -> str:
        d: dict[str, Any] = {
            "version": self.version,
            "modality": self.modality,
            "num_samples": self.num_samples,
            "tokenizer": self.tokenizer,
            "shards": [asdict(s) for s in self.shards],
            "digest": self.digest,
        }
        if self.stats is not None:
            d["stats"] = self.stats
        if self.special_tokens is not None:
            d["special_tokens"] = self.special_tokens
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
        specials = d.get("special_tokens")
        if specials is not None:
            if not (
                isinstance(specials, dict)
                and specials.keys() == SPECIAL_NAMES.keys()
                and all(type(v) is int and v >= 0 for v in specials.values())
            ):
                raise PrepareError(
                    f"{where}: special_tokens must map {sorted(SPECIAL_NAMES)} to ids, "
                    f"got {specials!r}"
                )
            m.special_tokens = specials
        # A manifest edited by hand (or a truncated copy) must not pass silently.
        if (m.num_samples, m.digest) != (d.get("num_samples"), d.get("digest")):
            raise PrepareError(f"{where}: num_samples/digest do not match its shard list")
        if isinstance(d.get("stats"), dict):
            m.stats = d["stats"]
        return m


# -- inputs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputFile:
    url: str
    size: int
    version: str  # mtime or ETag: an edited file changes the fingerprint even at equal size


@dataclass(frozen=True)
class _Options:
    """Everything a worker needs to read and write units (picklable)."""

    modality: str
    text_field: str
    media_field: str  # image_field, audio_field or video_field
    key_field: str | None
    shard_bytes: int
    shard_samples: int | None
    unit_bytes: int
    strict: bool


def _suffix(url: str) -> str:
    return posixpath.splitext(posixpath.basename(url))[1].lower()


def _input_file(url: str, info: dict[str, Any]) -> InputFile:
    version = next((info[k] for k in ("ETag", "etag", "mtime", "LastModified") if k in info), "")
    return InputFile(url, int(info.get("size") or 0), str(version))


def _expand(inputs: list[str], suffixes: set[str]) -> list[InputFile]:
    """Files of the inputs with a supported suffix; folders recurse in sorted order."""
    if not inputs:
        raise PrepareError("no inputs given")
    files: list[InputFile] = []
    for url in inputs:
        if not storage.exists(url):
            raise PrepareError(f"input not found: {url}")
        fs, path = storage.filesystem(url)
        if not fs.isdir(path):  # named explicitly: an unsupported suffix is a mistake, not noise
            if _suffix(url) not in suffixes:
                raise PrepareError(
                    f"unsupported input file {url} (expected one of {sorted(suffixes)})"
                )
            files.append(_input_file(url, fs.info(path)))
            continue
        # One listing with sizes, not a request per file. In folders skip dotfiles and foreign
        # files (fortune's .dat indexes, .u8 symlinks).
        scheme = url.split("://", 1)[0] + "://" if "://" in url else ""
        for p, info in sorted(fs.find(path, detail=True).items()):
            name = posixpath.basename(p)
            if _suffix(p) in suffixes and not name.startswith("."):
                files.append(_input_file(scheme + p, info))
    return files


@dataclass(frozen=True)
class Piece:
    """A contiguous part of one input file: kind 'file' or 'fortune' (whole file), 'lines' or
    'jsonl' (byte range [start, stop)), 'parquet' (row groups [start, stop))."""

    url: str
    kind: str
    start: int = 0
    stop: int = 0


@dataclass(frozen=True)
class Unit:
    index: int
    pieces: tuple[Piece, ...]


@dataclass
class Item:
    data: str | bytes  # a document, or an image's / audio file's encoded bytes
    source: str  # where it came from, for messages
    ident: Any = None  # the key_field value (JSONL/Parquet inputs)


def _is_fortune(url: str) -> bool:
    """A line holding only '%' in the first MiB: sniffing stays cheap for huge plain files."""
    with storage.open_url(url, "rb") as f:
        head = f.read(_FORTUNE_SNIFF)
        complete = len(head) < _FORTUNE_SNIFF
    lines = _universal_lines(head.decode("utf-8", errors="replace"))
    if not complete:
        lines = lines[:-1]  # the last line may be cut short ('%' of '%%x')
    return any(line == "%" for line in lines)


def _universal_lines(text: str) -> list[str]:
    """Split like Python's text mode reads (\\r\\n, \\r and \\n all end a line)."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _byte_ranges(f: InputFile, kind: str, size: int) -> list[tuple[Piece, int]]:
    return [
        (Piece(f.url, kind, a, min(a + size, f.size)), min(a + size, f.size) - a)
        for a in range(0, f.size, size)
    ]


def _column_kind_ok(kind: Any, modality: str) -> bool:
    import pyarrow as pa

    if modality == "text":
        return bool(pa.types.is_string(kind) or pa.types.is_large_string(kind))
    if pa.types.is_struct(kind):  # Hugging Face's Image()/Audio(): {bytes, path}
        i = kind.get_field_index("bytes")
        return i >= 0 and _column_kind_ok(kind.field(i).type, modality)
    return bool(pa.types.is_binary(kind) or pa.types.is_large_binary(kind))


def _parquet_pieces(f: InputFile, opts: _Options) -> list[tuple[Piece, int]]:
    """One piece per row group, weighed by its compressed size; checks the columns first."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    column = opts.text_field if opts.modality == "text" else opts.media_field
    flag = {"text": "--text-field", "image": "--image-field", "audio": "--audio-field",
            "video": "--video-field"}  # fmt: skip
    with storage.open_url(f.url, "rb") as fh:
        try:
            meta = pq.ParquetFile(fh).metadata
        except (pa.ArrowInvalid, OSError) as e:
            raise PrepareError(f"{f.url}: not a Parquet file: {e}") from None
    schema = meta.schema.to_arrow_schema()
    if column not in schema.names:
        raise PrepareError(
            f"{f.url}: no column {column!r} (columns: {schema.names}; "
            f"choose with {flag[opts.modality]})"
        )
    kind = schema.field(column).type
    if not _column_kind_ok(kind, opts.modality):
        want = "strings" if opts.modality == "text" else f"encoded {opts.modality} bytes"
        raise PrepareError(f"{f.url}: column {column!r} holds {kind}, not {want}")
    if opts.key_field and opts.key_field not in schema.names:
        raise PrepareError(
            f"{f.url}: no column {opts.key_field!r} for --key-field (columns: {schema.names})"
        )
    pieces = []
    for i in range(meta.num_row_groups):
        rg = meta.row_group(i)
        weight = sum(rg.column(j).total_compressed_size for j in range(rg.num_columns))
        pieces.append((Piece(f.url, "parquet", i, i + 1), max(1, weight)))
    return pieces


def _pieces(f: InputFile, opts: _Options, text_format: str) -> list[tuple[Piece, int]]:
    """The pieces of one file with their weights (input bytes)."""
    suffix = _suffix(f.url)
    if suffix == ".parquet":
        return _parquet_pieces(f, opts)
    if opts.modality != "text":
        return [(Piece(f.url, "file"), f.size + _TAR_BLOCK)]  # a header's worth per file
    if suffix == ".jsonl":
        return _byte_ranges(f, "jsonl", opts.unit_bytes)
    fortune = text_format == "fortune" or (text_format == "auto" and _is_fortune(f.url))
    # Fortune files are small and split on '%' lines, so they stay whole.
    return (
        [(Piece(f.url, "fortune"), f.size)]
        if fortune
        else _byte_ranges(f, "lines", opts.unit_bytes)
    )


def _plan(files: list[InputFile], opts: _Options, text_format: str) -> list[Unit]:
    """Consecutive pieces grouped into units of at least unit_bytes (the last may be smaller)."""
    units: list[Unit] = []
    current: list[Piece] = []
    weight = 0
    for f in files:
        for piece, w in _pieces(f, opts, text_format):
            last = current[-1] if current else None
            if (
                last is not None
                and piece.kind in ("lines", "jsonl", "parquet")
                and (last.url, last.kind, last.stop) == (piece.url, piece.kind, piece.start)
            ):  # adjacent ranges of one file: one piece, one open
                current[-1] = Piece(last.url, last.kind, last.start, piece.stop)
            else:
                current.append(piece)
            weight += w
            if weight >= opts.unit_bytes:
                units.append(Unit(len(units), tuple(current)))
                current, weight = [], 0
    if current:
        units.append(Unit(len(units), tuple(current)))
    return units


# -- reading items --------------------------------------------------------------------------


def _line_range(url: str, start: int, stop: int) -> Iterator[tuple[int, bytes]]:
    """(offset, line) for the lines whose first byte lies in [start, stop)."""
    with storage.open_url(url, "rb") as f:
        pos = start
        if start > 0:
            f.seek(start - 1)
            pos = start - 1 + len(f.readline())  # the end of a line that began earlier
        while pos < stop:
            line = f.readline()
            if not line:
                return
            yield pos, line
            pos += len(line)


def _line_number(url: str, offset: int) -> int:
    """The 1-based number of the line at byte `offset` (for error messages: reads the prefix)."""
    n, done = 1, 0
    with storage.open_url(url, "rb") as f:
        while done < offset:
            chunk = f.read(min(_READ_CHUNK, offset - done))
            if not chunk:
                break
            n, done = n + chunk.count(b"\n"), done + len(chunk)
    return n


def _lines_items(piece: Piece) -> Iterator[Item]:
    for _, line in _line_range(piece.url, piece.start, piece.stop):
        for part in _universal_lines(line.decode("utf-8", errors="replace")):
            if part.strip():
                yield Item(part.strip(), piece.url)


def _fortune_items(url: str) -> Iterator[Item]:
    with storage.open_url(url, "rt", encoding="utf-8", errors="replace") as f:
        lines: list[str] = []
        for line in f:
            line = line.rstrip("\r\n")
            if line == "%":
                if "\n".join(lines).strip():
                    yield Item("\n".join(lines).strip(), url)
                lines = []
            else:
                lines.append(line)
        if "\n".join(lines).strip():
            yield Item("\n".join(lines).strip(), url)


def _jsonl_items(piece: Piece, opts: _Options) -> Iterator[Item]:
    field_name, key = opts.text_field, opts.key_field
    for offset, raw in _line_range(piece.url, piece.start, piece.stop):
        line = raw.decode("utf-8", errors="replace")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            value = record[field_name]
        except (json.JSONDecodeError, KeyError, TypeError):
            where = f"{piece.url}:{_line_number(piece.url, offset)}"
            raise PrepareError(f"{where}: not a JSON object with a {field_name!r} field") from None
        if not isinstance(value, str):
            where = f"{piece.url}:{_line_number(piece.url, offset)}"
            raise PrepareError(f"{where}: field {field_name!r} is not a string")
        if value.strip():
            yield Item(value, piece.url, record.get(key) if key else None)


def _parquet_items(piece: Piece, opts: _Options) -> Iterator[Item]:
    import pyarrow.parquet as pq

    text = opts.modality == "text"
    column = opts.text_field if text else opts.media_field
    columns = [column] + ([opts.key_field] if opts.key_field not in (None, column) else [])
    with storage.open_url(piece.url, "rb") as fh:
        pf = pq.ParquetFile(fh)
        row = sum(pf.metadata.row_group(i).num_rows for i in range(piece.start))
        batches = pf.iter_batches(
            batch_size=_TEXT_ROWS if text else _MEDIA_ROWS,
            columns=columns,
            row_groups=list(range(piece.start, piece.stop)),
        )
        for batch in batches:
            values = batch.column(column).to_pylist()
            idents = batch.column(opts.key_field).to_pylist() if opts.key_field else None
            for i, value in enumerate(values):
                if isinstance(value, dict):  # {bytes, path}
                    value = value.get("bytes")
                ident = idents[i] if idents is not None else None
                # Nulls and blank documents are no items, as empty lines are not.
                if text and isinstance(value, str) and value.strip():
                    yield Item(value, piece.url, ident)
                elif not text and value is not None:
                    yield Item(value, f"{piece.url} row {row + i}", ident)
            row += len(values)


def _piece_items(piece: Piece, opts: _Options) -> Iterator[Item]:
    if piece.kind == "file":
        yield Item(storage.read_bytes(piece.url), piece.url)
    elif piece.kind == "lines":
        yield from _lines_items(piece)
    elif piece.kind == "fortune":
        yield from _fortune_items(piece.url)
    elif piece.kind == "jsonl":
        yield from _jsonl_items(piece, opts)
    elif piece.kind == "parquet":
        yield from _parquet_items(piece, opts)
    else:
        raise AssertionError(piece.kind)


def _unit_items(unit: Unit, opts: _Options) -> Iterator[Item]:
    """The unit's items in input order; their position is the item number in sample keys."""
    for piece in unit.pieces:
        yield from _piece_items(piece, opts)


def _sample_key(unit: int, item: int) -> str:
    return f"{unit:06d}-{item:08d}"


# -- validation of media --------------------------------------------------------------------


def _error_text(e: Exception) -> str:
    # Decoders name the BytesIO object (an address, different every run): drop it.
    text = str(getattr(e, "error_string", None) or e)  # libsndfile's own words
    return re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", text) or type(e).__name__


def _image_extension(data: bytes) -> str:
    """The member extension of an encoded image, after decoding all of it."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF quirks and size warnings are not a verdict
            with Image.open(io.BytesIO(data)) as im:
                fmt = im.format
                im.load()  # verify() alone misses truncated JPEG data
    except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, bomb errors...
        raise _Undecodable(_error_text(e)) from None
    if fmt not in _IMAGE_EXTENSIONS:
        raise _Undecodable(f"unsupported image format {fmt}")
    return _IMAGE_EXTENSIONS[fmt]


def _audio_extension(data: bytes) -> str:
    """The member extension of an audio file, after decoding all of it in blocks."""
    import soundfile

    frames = 0
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as f:
            fmt = f.format
            while block := len(f.read(65536, dtype="float32", always_2d=True)):
                frames += block
    except Exception as e:  # LibsndfileError, and whatever a broken header provokes
        raise _Undecodable(_error_text(e)) from None
    if fmt not in _AUDIO_EXTENSIONS:
        raise _Undecodable(f"unsupported audio format {fmt}")
    if frames == 0:
        raise _Undecodable("no audio frames")
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


def _video_members(data: bytes) -> dict[str, bytes]:
    """A clip's shard members: each frame encoded on its own, and the json of its counts."""
    from PIL import Image

    try:
        frames, fps, ext = read_clip(data)
    except ValueError as e:
        raise _Undecodable(str(e)) from None
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
        special_tokens=[(t, tok.token_to_id(t)) for t in ("[CLS]", "[SEP]")],
    )
    return tok


def special_token_ids(tok: Any, url: str) -> dict[str, int]:
    """The tokenizer's id of each SPECIAL_NAMES token, or PrepareError naming the missing ones."""
    ids = {name: tok.token_to_id(token) for name, token in SPECIAL_NAMES.items()}
    missing = [SPECIAL_NAMES[name] for name, i in ids.items() if i is None]
    if missing:
        raise PrepareError(
            f"{url}: tokenizer lacks special token(s) {' '.join(missing)}, "
            "which the text objectives need"
        )
    return ids


def _load_tokenizer(url: str) -> Any:
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_str(storage.read_bytes(url).decode())
    except FileNotFoundError:
        raise PrepareError(f"tokenizer not found: {url}") from None
    except Exception as e:  # the Rust side raises plain Exception on a malformed file
        raise PrepareError(f"{url}: not a tokenizers tokenizer.json: {e}") from None
    special_token_ids(tok, url)
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


_worker_tokenizer: tuple[str, Any] | None = None  # (sha256, Tokenizer), one per process


def _tokenizer_for(url: str, sha: str) -> Any:
    """The run's tokenizer, read once per process and checked against the plan's sha256."""
    global _worker_tokenizer
    if _worker_tokenizer is None or _worker_tokenizer[0] != sha:
        from tokenizers import Tokenizer

        data = storage.read_bytes(url)
        if hashlib.sha256(data).hexdigest() != sha:
            raise PrepareError(f"{url} changed while prepare was running")
        _worker_tokenizer = (sha, Tokenizer.from_str(data.decode()))
    return _worker_tokenizer[1]


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


def _add_sample(tar: tarfile.TarFile, sample: dict[str, Any]) -> None:
    """Members `key.ext` in sorted order, with the fixed headers webdataset's TarWriter writes
    with mtime=0: the tar bytes depend on the sample only."""
    key = sample["__key__"]
    for ext in sorted(k for k in sample if not k.startswith("_")):
        data = sample[ext]
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        info.uname = info.gname = "bigdata"
        tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Writes samples into `{prefix}KKKKKK.tar` files under a URL, rolling over at
    `shard_bytes` of tar or `max_samples` samples."""

    def __init__(
        self,
        url: str,
        shard_bytes: int,
        prefix: str = "shard-",
        max_samples: int | None = None,
    ):
        self.url, self.shard_bytes, self.prefix = url, shard_bytes, prefix
        self.max_samples = max_samples
        self.shards: list[ShardInfo] = []
        self.bytes_written = 0  # closed shards plus the open one's bytes so far
        self._file: Any = None
        self._hasher: _HashingWriter | None = None
        self._tar: tarfile.TarFile | None = None
        self._samples = self._size = 0

    def _name(self) -> str:
        return f"{self.prefix}{len(self.shards):06d}.tar"

    def _open(self) -> None:
        self._file = storage.open_url(storage.join(self.url, self._name()), "wb")
        self._hasher = _HashingWriter(self._file)
        # Stream mode only ever writes; the tar outlives this call and is closed by close().
        fileobj: Any = self._hasher
        fmt = tarfile.USTAR_FORMAT  # as webdataset's TarWriter
        self._tar = tarfile.open(fileobj=fileobj, mode="w|", format=fmt)  # noqa: SIM115
        self._samples = self._size = 0

    def write(self, sample: dict[str, Any]) -> None:
        if self._tar is None:
            self._open()
        assert self._tar is not None and self._hasher is not None
        before = self._hasher.bytes
        _add_sample(self._tar, sample)
        self.bytes_written += self._hasher.bytes - before
        self._samples += 1
        self._size += _member_bytes(sample)
        if self._size >= self.shard_bytes or self._samples == self.max_samples:
            self.close()

    def close(self) -> None:
        if self._tar is None:
            return
        assert self._hasher is not None
        before = self._hasher.bytes
        self._tar.close()  # end-of-archive blocks; a caller's file object stays open
        self._file.close()  # the upload happens here for object stores
        self.bytes_written += self._hasher.bytes - before
        self.shards.append(
            ShardInfo(self._name(), self._samples, self._hasher.bytes, self._hasher.sha.hexdigest())
        )
        self._tar = self._hasher = self._file = None
        self._samples = self._size = 0

    def abort(self) -> None:
        """Close an unfinished shard without listing it: its unit has no record and is redone.
        (Left open, the tar stream would try to finish itself at garbage collection.)"""
        for obj in (self._tar, self._file):
            with contextlib.suppress(Exception):
                if obj is not None:
                    obj.close()
        self._tar = self._hasher = self._file = None


def _npy_bytes(ids: list[int]) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(ids, dtype=np.int32), allow_pickle=False)
    return buf.getvalue()


def _json_member(ident: Any, info: dict[str, Any] | None = None) -> bytes:
    return json.dumps({**(info or {}), "id": ident}, sort_keys=True, default=str).encode()


def _write_text_batch(writer: ShardWriter, batch: list[tuple[str, Item]], tok: Any) -> None:
    docs = [str(item.data) for _, item in batch]
    for (key, item), doc, enc in zip(batch, docs, tok.encode_batch(docs), strict=True):
        sample = {"__key__": key, "input_ids.npy": _npy_bytes(enc.ids), "txt": doc.encode()}
        if item.ident is not None:
            sample["json"] = _json_member(item.ident)
        writer.write(sample)


# -- units: records, and the work done in worker processes -----------------------------------


@dataclass
class _UnitRecord:
    """`_progress/unit-UUUUUU.json`: a unit's shards, written once they are all closed."""

    run: str
    unit: int
    shards: list[ShardInfo]
    items: int
    skipped: int
    duplicates: int
    skipped_examples: list[str]

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> _UnitRecord:
        d = json.loads(data)
        d["shards"] = [ShardInfo(**s) for s in d["shards"]]
        return cls(**d)


@dataclass(frozen=True)
class _UnitJob:
    unit: Unit
    output_url: str
    run: str
    tokenizer_url: str | None
    tokenizer_sha: str
    dropped: frozenset[int]  # item numbers removed as duplicates


def _record_url(output_url: str, unit: int) -> str:
    return storage.join(output_url, PROGRESS, f"unit-{unit:06d}.json")


_report: Callable[[int, int], None] | None = None  # (samples, bytes) -> progress bar, per process


class _Ticker:
    """Batches a unit's progress into a message every _REPORT_SECONDS."""

    def __init__(self) -> None:
        self.samples = self.bytes = 0
        self.last = time.monotonic()

    def add(self, samples: int, nbytes: int, flush: bool = False) -> None:
        self.samples, self.bytes = self.samples + samples, self.bytes + nbytes
        now = time.monotonic()
        if _report is not None and (flush or now - self.last >= _REPORT_SECONDS):
            if self.samples or self.bytes:
                _report(self.samples, self.bytes)
            self.samples = self.bytes = 0
            self.last = now


def _write_unit(job: _UnitJob, opts: _Options) -> _UnitRecord:
    """Write one unit's shards, then its record (so a record always means finished shards)."""
    u = job.unit.index
    text = opts.modality == "text"
    tok = _tokenizer_for(job.tokenizer_url, job.tokenizer_sha) if job.tokenizer_url else None
    writer = ShardWriter(job.output_url, opts.shard_bytes, f"shard-{u:06d}-", opts.shard_samples)
    # An image or audio file is kept as it is; a video clip becomes a sequence of frames.
    check = {"image": _image_extension, "audio": _audio_extension}.get(opts.modality)
    items = skipped = duplicates = 0
    examples: list[str] = []
    batch: list[tuple[str, Item]] = []
    ticker = _Ticker()
    try:
        for i, item in enumerate(_unit_items(job.unit, opts)):
            items += 1
            if i in job.dropped:
                duplicates += 1
                continue
            before = writer.bytes_written
            if text:
                batch.append((_sample_key(u, i), item))
                if len(batch) == _ENCODE_BATCH:
                    _write_text_batch(writer, batch, tok)
                    ticker.add(len(batch), writer.bytes_written - before)
                    batch = []
                continue
            assert isinstance(item.data, bytes)
            try:
                members = {check(item.data): item.data} if check else _video_members(item.data)
            except _Undecodable as e:
                if opts.strict:
                    raise PrepareError(
                        f"cannot decode {opts.modality} {item.source}: {e}"
                    ) from None
                skipped += 1
                if len(examples) < _SKIPPED_EXAMPLES:
                    examples.append(f"{item.source}: {e}")
                continue
            sample: dict[str, Any] = {"__key__": _sample_key(u, i), **members}
            if item.ident is not None:
                sample["json"] = _json_member(item.ident, json.loads(members.get("json", b"{}")))
            writer.write(sample)
            ticker.add(1, writer.bytes_written - before)
        before = writer.bytes_written
        if batch:
            _write_text_batch(writer, batch, tok)
        writer.close()
        ticker.add(len(batch), writer.bytes_written - before, flush=True)
    except BaseException:
        writer.abort()
        raise
    record = _UnitRecord(job.run, u, writer.shards, items, skipped, duplicates, examples)
    storage.write_bytes(_record_url(job.output_url, u), record.to_json())
    return record


def _hash_unit(unit: Unit, opts: _Options) -> bytes:
    """The sha256 of every item of a unit, concatenated (32 bytes each, in item order)."""
    out = bytearray()
    for item in _unit_items(unit, opts):
        data = item.data.encode() if isinstance(item.data, str) else item.data
        out += hashlib.sha256(data).digest()
    return bytes(out)


def _shard_matches(url: str, info: ShardInfo) -> bool:
    """The object exists with the recorded size and sha256 (read back in full)."""
    fs, path = storage.filesystem(url)
    try:
        if int(fs.info(path).get("size", -1)) != info.bytes:
            return False
        sha, n = hashlib.sha256(), 0
        with fs.open(path, "rb") as f:
            while chunk := f.read(_READ_CHUNK):
                sha.update(chunk)
                n += len(chunk)
    except FileNotFoundError:
        return False
    return n == info.bytes and sha.hexdigest() == info.sha256


def _verify_unit(output_url: str, unit: int, run: str) -> _UnitRecord | None:
    """The unit's record if it belongs to this run and all its shards check out."""
    try:
        record = _UnitRecord.from_json(storage.read_bytes(_record_url(output_url, unit)))
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None  # missing, or torn by a crash: redo the unit
    if record.run != run or record.unit != unit:
        return None
    ok = all(_shard_matches(storage.join(output_url, s.name), s) for s in record.shards)
    return record if ok else None


def _init_worker(queue: Any) -> None:
    global _report
    # The processes are the parallelism; a Rust thread pool per process would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if queue is not None:
        # Progress may be lost, but a worker must never hang at exit flushing it into a pipe
        # the parent has stopped reading (after another unit failed).
        queue.cancel_join_thread()
        _report = lambda samples, nbytes: queue.put((samples, nbytes))  # noqa: E731


# -- running units in parallel --------------------------------------------------------------


def _progress_bar(enabled: bool, desc: str, unit: str, total: int | None = None) -> Any:
    from tqdm import tqdm

    # Counted units (a known total) read best unscaled; samples and documents as 12.3k.
    return tqdm(
        desc=desc,
        unit=unit,
        total=total,
        disable=not enabled,
        file=sys.stderr,
        unit_scale=total is None,
    )


class _Runner:
    """Runs unit functions in a spawn process pool, or in this process for one worker or task.

    Results come back as tasks finish, with their task number; the order of completion never
    matters to the output. A failed task cancels the tasks not yet started; running ones finish
    (and record their units), so a re-run loses nothing.
    """

    def __init__(self, workers: int, show: bool):
        self.workers, self.show = workers, show
        self._pool: ProcessPoolExecutor | None = None
        self._queue: Any = None

    def __enter__(self) -> _Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _start(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn: workers must not inherit the parent's s3fs client or tokenizer threads.
            ctx = multiprocessing.get_context("spawn")
            self._queue = ctx.Queue() if self.show else None
            self._pool = ProcessPoolExecutor(
                self.workers, mp_context=ctx, initializer=_init_worker, initargs=(self._queue,)
            )
        return self._pool

    def run(
        self, fn: Callable[..., Any], tasks: list[tuple[Any, ...]], bar: Any = None
    ) -> Iterator[tuple[int, Any]]:
        global _report
        if self.workers == 1 or len(tasks) <= 1:
            _report = self._bar_updater(bar)
            try:
                for i, args in enumerate(tasks):
                    yield i, fn(*args)
            finally:
                _report = None
            return
        pool = self._start()
        index: dict[Future[Any], int] = {pool.submit(fn, *args): i for i, args in enumerate(tasks)}
        pending = set(index)
        try:
            while pending:
                done, pending = wait(pending, timeout=_REPORT_SECONDS, return_when=FIRST_COMPLETED)
                self._drain(bar)
                for future in sorted(done, key=index.__getitem__):
                    try:
                        result = future.result()
                    except BrokenProcessPool:
                        raise PrepareError(
                            "a worker process died (killed, or out of memory?); finished units "
                            "are kept: run the same command again to resume"
                        ) from None
                    yield index[future], result
        finally:
            for future in pending:
                future.cancel()
            self._drain(bar)

    def _bar_updater(self, bar: Any) -> Callable[[int, int], None] | None:
        if bar is None or not self.show:
            return None

        def update(samples: int, nbytes: int) -> None:
            _bar_add(bar, samples, nbytes)

        return update

    def _drain(self, bar: Any) -> None:
        if self._queue is None or bar is None:
            return
        import queue

        while True:
            try:
                samples, nbytes = self._queue.get_nowait()
            except queue.Empty:
                return
            _bar_add(bar, samples, nbytes)


def _bar_add(bar: Any, samples: int, nbytes: int) -> None:
    bar.written = getattr(bar, "written", 0) + nbytes
    bar.set_postfix_str(f"{bar.written / 2**20:.1f} MiB written", refresh=False)
    bar.update(samples)


def _dedup(
    units: list[Unit], opts: _Options, runner: _Runner, show: bool
) -> tuple[dict[int, frozenset[int]], int]:
    """Item numbers to drop per unit (a hash seen earlier in input order), and the item count.

    Units hash in parallel; their results are consumed strictly in unit order, so the first
    occurrence wins whatever order the workers finish in.
    """
    seen: set[bytes] = set()
    dropped: dict[int, frozenset[int]] = {}
    waiting: dict[int, bytes] = {}
    cursor = items = 0
    with _progress_bar(show, "hashing", "unit", len(units)) as bar:
        for u, digests in runner.run(_hash_unit, [(unit, opts) for unit in units]):
            bar.update(1)
            waiting[u] = digests
            while cursor in waiting:
                digests = waiting.pop(cursor)
                drop = []
                for i in range(len(digests) // 32):
                    d = digests[32 * i : 32 * i + 32]
                    if d in seen:
                        drop.append(i)
                    else:
                        seen.add(d)
                items += len(digests) // 32
                if drop:
                    dropped[cursor] = frozenset(drop)
                cursor += 1
    return dropped, items


# -- entry points ---------------------------------------------------------------------------


def _fingerprint(files: list[InputFile], settings: dict[str, Any]) -> str:
    doc = {"format": _FORMAT, "files": [[f.url, f.size, f.version] for f in files], **settings}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _read_json(url: str) -> Any:
    try:
        return json.loads(storage.read_bytes(url))
    except (FileNotFoundError, ValueError):
        return None


def _resumable_tokenizer(output_url: str, fingerprint: str, text: bool) -> bytes | None:
    """The output's tokenizer.json (b"" without text) if plan.json says it belongs to these
    inputs and options; None when the run must start afresh."""
    plan = _read_json(storage.join(output_url, PROGRESS, PLAN))
    if not isinstance(plan, dict) or plan.get("fingerprint") != fingerprint:
        return None
    if not text:
        return b""
    try:
        data = storage.read_bytes(storage.join(output_url, TOKENIZER))
    except FileNotFoundError:
        return None
    return data if hashlib.sha256(data).hexdigest() == plan.get("tokenizer_sha256") else None


def _remove_stale(output_url: str, shards: list[ShardInfo], units: int) -> None:
    """Delete shards and unit records of our naming that this dataset no longer lists (left by
    an earlier prepare into the same output): nothing unlisted survives next to the manifest."""
    keep = {s.name for s in shards}
    for url in storage.list_files(output_url):
        name = posixpath.basename(url)
        parent = posixpath.basename(posixpath.dirname(url))
        if parent != PROGRESS and _SHARD_NAME.fullmatch(name) and name not in keep:
            storage.delete(storage.join(output_url, name))
        match = _RECORD_NAME.fullmatch(name)
        if parent == PROGRESS and match and int(match.group(1)) >= units:
            storage.delete(storage.join(output_url, PROGRESS, name))


def _default_workers() -> int:
    return min(4, os.cpu_count() or 1)


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
    shard_samples: int | None = None,
    image_field: str = "image",
    audio_field: str = "audio",
    video_field: str = "video",
    key_field: str | None = None,
    workers: int | None = None,
    unit_bytes: int | None = None,
    dedup: bool = False,
    strict: bool = False,
    progress: bool | None = None,
) -> Manifest:
    """Write the shards, tokenizer (text) and manifest of a dataset to `output_url`.

    `workers` processes write units in parallel (default min(4, CPUs)); the output does not
    depend on it. `unit_bytes` is the input size of a work unit (default 8 shards' worth).
    `progress`: a bar on stderr (default: when stderr is a terminal). A re-run with the same
    inputs and options resumes: finished, verified units are kept. The returned manifest's
    `run` says how many units were reused and names some skipped inputs.
    """
    workers = _default_workers() if workers is None else workers
    unit_bytes = UNIT_SHARDS * shard_bytes if unit_bytes is None else unit_bytes
    _check_options(modality, text_format, shard_bytes, shard_samples, workers, unit_bytes)
    show = sys.stderr.isatty() if progress is None else progress
    text = modality == "text"
    media_field = {"image": image_field, "audio": audio_field, "video": video_field}
    opts = _Options(
        modality, text_field, media_field.get(modality, ""), key_field,
        shard_bytes, shard_samples, unit_bytes, strict,
    )  # fmt: skip

    where = ", ".join(inputs)
    suffixes = {"text": TEXT_SUFFIXES, "image": IMAGE_SUFFIXES, "audio": AUDIO_SUFFIXES,
                "video": VIDEO_SUFFIXES}  # fmt: skip
    files = _expand(inputs, suffixes[modality])
    if not text and not files:
        what = {"image": "images", "audio": "audio files", "video": "video clips"}[modality]
        raise PrepareError(f"no {what} found in {where}")
    if modality == "video" and any(_suffix(f.url) in AV_SUFFIXES for f in files):
        try:
            import av  # noqa: F401
        except ImportError:
            first = next(f.url for f in files if _suffix(f.url) in AV_SUFFIXES)
            raise PrepareError(
                f"{first}: decoding {_suffix(first)} files needs PyAV "
                "(pip install 'darkmatter[video]')"
            ) from None
    storage.check_bucket(output_url)  # before a long tokenizer training, not after
    units = _plan(files, opts, text_format)
    given = _load_tokenizer(tokenizer) if tokenizer and text else None
    settings = {
        "options": {k: v for k, v in asdict(opts).items() if k != "strict"},  # same output
        "text_format": text_format,
        "dedup": dedup,
        "vocab_size": vocab_size,
        "lowercase": lowercase,
        "tokenizer": given.to_str() if given is not None else None,
    }
    fingerprint = _fingerprint(files, settings)

    with _Runner(workers, show) as runner:
        dropped: dict[int, frozenset[int]] = {}
        items: int | None = None
        if dedup:
            dropped, items = _dedup(units, opts, runner, show)
        if text and (items == 0 or (items is None and not _has_items(units, opts))):
            raise PrepareError(f"no text documents found in {where}")

        tok_json = _resumable_tokenizer(output_url, fingerprint, text)
        resumed = tok_json is not None
        if text and tok_json is None:
            if given is None:
                given = _train(units, opts, dropped, vocab_size, lowercase, show)
            # Whole documents, whatever the tokenizer file says: the trainer crops to seq_len.
            given.no_truncation()
            given.no_padding()
            tok_json = given.to_str(pretty=True).encode()
        tok_sha = hashlib.sha256(tok_json).hexdigest() if text and tok_json else ""
        specials = None
        if text and tok_json:  # of the tokenizer the shards are encoded with, resumed or not
            from tokenizers import Tokenizer

            specials = special_token_ids(
                Tokenizer.from_str(tok_json.decode()), storage.join(output_url, TOKENIZER)
            )
        run = hashlib.sha256(f"{fingerprint}:{tok_sha}".encode()).hexdigest()

        storage.makedirs(output_url)
        storage.delete(storage.join(output_url, MANIFEST))  # from here on the dataset is incomplete
        if not resumed:
            plan = {"fingerprint": fingerprint, "tokenizer_sha256": tok_sha or None, "run": run,
                    "units": len(units), "files": len(files)}  # fmt: skip
            _start_run(output_url, plan, tok_json if text else None)
        if text:
            for name, data in _tokenizer_configs(lowercase).items():
                storage.write_bytes(storage.join(output_url, name), data)

        records = _reuse_units(output_url, len(units), run, runner, show)
        reused = len(records)
        tok_url = storage.join(output_url, TOKENIZER) if text else None
        jobs = [
            (_UnitJob(unit, output_url, run, tok_url, tok_sha, dropped.get(u, frozenset())), opts)
            for u, unit in enumerate(units)
            if u not in records
        ]
        with _progress_bar(show, "writing", "sample") as bar:
            for _, record in runner.run(_write_unit, jobs, bar):
                records[record.unit] = record

    ordered = [records[u] for u in range(len(units))]
    manifest = _finish(output_url, modality, ordered, where, specials)
    examples = [e for r in ordered for e in r.skipped_examples]
    manifest.run = PrepareRun(len(units), reused, len(units) - reused, examples[:_SKIPPED_EXAMPLES])
    return manifest


def _check_options(
    modality: str,
    text_format: str,
    shard_bytes: int,
    shard_samples: int | None,
    workers: int,
    unit_bytes: int,
) -> None:
    if modality not in MODALITIES:
        raise PrepareError(f"modality must be text, image, audio or video, got {modality!r}")
    if text_format not in ("auto", "lines", "fortune"):
        raise PrepareError(f"text_format must be auto, lines or fortune, got {text_format!r}")
    if shard_bytes <= 0:
        raise PrepareError(f"shard size must be positive, got {shard_bytes} bytes")
    if shard_samples is not None and shard_samples < 1:
        raise PrepareError(f"shard_samples must be at least 1, got {shard_samples}")
    if workers < 1:
        raise PrepareError(f"workers must be at least 1, got {workers}")
    if unit_bytes <= 0:
        raise PrepareError(f"unit size must be positive, got {unit_bytes} bytes")


def _start_run(output_url: str, plan: dict[str, Any], tokenizer: bytes | None) -> None:
    """A fresh run: the old plan goes first, so that a crash before the new one is written
    cannot resume the old run with a new tokenizer."""
    plan_url = storage.join(output_url, PROGRESS, PLAN)
    storage.delete(plan_url)
    if tokenizer is not None:
        storage.write_bytes(storage.join(output_url, TOKENIZER), tokenizer)
    storage.write_bytes(plan_url, json.dumps(plan, indent=1).encode())


def _finish(
    output_url: str,
    modality: str,
    records: list[_UnitRecord],
    where: str,
    specials: dict[str, int] | None,
) -> Manifest:
    """The manifest of the units' shards, written last, once nothing stale is left."""
    shards = [s for r in records for s in r.shards]
    stats = {
        "units": len(records),
        "skipped": sum(r.skipped for r in records),
        "duplicates": sum(r.duplicates for r in records),
    }
    tokenizer = TOKENIZER if modality == "text" else None
    manifest = Manifest(modality, shards, tokenizer, stats=stats, special_tokens=specials)
    if manifest.num_samples == 0:
        raise PrepareError(
            f"no usable {modality} samples in {where} "
            f"({stats['skipped']} undecodable, {stats['duplicates']} duplicates)"
        )
    _remove_stale(output_url, shards, len(records))
    manifest.save(output_url)
    return manifest


def _has_items(units: list[Unit], opts: _Options) -> bool:
    return any(next(_unit_items(unit, opts), None) is not None for unit in units)


def _train(
    units: list[Unit],
    opts: _Options,
    dropped: dict[int, frozenset[int]],
    vocab_size: int,
    lowercase: bool,
    show: bool,
) -> Any:
    """The single training pass, in the parent, over the documents that will be written."""

    def documents() -> Iterator[str]:
        with _progress_bar(show, "tokenizer", "doc") as bar:
            for unit in units:
                drop = dropped.get(unit.index, frozenset())
                for i, item in enumerate(_unit_items(unit, opts)):
                    if i not in drop:
                        bar.update(1)
                        yield str(item.data)

    return train_tokenizer(documents(), vocab_size, lowercase)


def _reuse_units(
    output_url: str, units: int, run: str, runner: _Runner, show: bool
) -> dict[int, _UnitRecord]:
    """Records of this run whose shards verify; one listing finds the candidates."""
    names = {posixpath.basename(u) for u in storage.list_files(storage.join(output_url, PROGRESS))}
    candidates = [u for u in range(units) if f"unit-{u:06d}.json" in names]
    records: dict[int, _UnitRecord] = {}
    with _progress_bar(show and bool(candidates), "verifying", "unit", len(candidates)) as bar:
        tasks = [(output_url, u, run) for u in candidates]
        for _, record in runner.run(_verify_unit, tasks):
            bar.update(1)
            if record is not None:
                records[record.unit] = record
    return records


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def cli(argv: list[str]) -> int:
    """`darkmatter prepare INPUT [INPUT ...] --output URL --modality text|image|audio|video ...`"""
    p = argparse.ArgumentParser(prog="darkmatter prepare", description=__doc__.split("\n")[0])
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files or folders (recursed)")
    p.add_argument(
        "--output", required=True, metavar="URL", help="s3://bucket/prefix, file://… or a folder"
    )
    p.add_argument("--modality", required=True, choices=list(MODALITIES))
    p.add_argument(
        "--text-field", default="text", metavar="NAME", help="JSONL field / Parquet column"
    )
    p.add_argument(
        "--image-field", default="image", metavar="NAME", help="Parquet column of image bytes"
    )
    p.add_argument(
        "--audio-field", default="audio", metavar="NAME", help="Parquet column of audio bytes"
    )
    p.add_argument(
        "--video-field", default="video", metavar="NAME", help="Parquet column of video bytes"
    )
    p.add_argument(
        "--key-field",
        metavar="NAME",
        help="JSONL field / Parquet column kept as {'id': value} in a json member",
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
    p.add_argument("--shard-samples", type=int, metavar="N", help="at most N samples per shard")
    p.add_argument(
        "--unit-size-mb",
        type=float,
        metavar="F",
        help="input per work unit, the grain of parallelism and resume (default 8 shards)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=_default_workers(),
        metavar="N",
        help="processes writing shards (default %(default)s); the output does not depend on it",
    )
    p.add_argument("--dedup", action="store_true", help="drop exact duplicate documents/files")
    p.add_argument(
        "--strict", action="store_true", help="an undecodable image/audio/video file is an error"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--cased", action="store_true", help="do not lowercase (trained tokenizer only)")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse already printed
        return int(e.code or 0)
    unit_bytes = int(args.unit_size_mb * 2**20) if args.unit_size_mb is not None else None
    try:
        m = prepare(
            args.inputs, args.output, modality=args.modality, text_field=args.text_field,
            text_format=args.text_format, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
            shard_bytes=int(args.shard_size_mb * 2**20), lowercase=not args.cased,
            shard_samples=args.shard_samples, image_field=args.image_field,
            audio_field=args.audio_field, video_field=args.video_field,
            key_field=args.key_field, workers=args.workers,
            unit_bytes=unit_bytes, dedup=args.dedup, strict=args.strict,
            progress=False if args.quiet else None,
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
    stats, run = m.stats or {}, m.run
    if run is not None:
        print(
            f"{run.units} work units ({run.written} written, {run.reused} reused); "
            f"skipped {stats.get('skipped', 0)} undecodable inputs; "
            f"removed {stats.get('duplicates', 0)} duplicates"
        )
        for example in run.skipped_examples:
            print(f"darkmatter prepare: skipped {example}", file=sys.stderr)
    return 0
