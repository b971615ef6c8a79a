"""Inputs of `darkmatter prepare`: finding the input files, cutting them into work units, and
reading a unit's items (documents, or the encoded bytes of images, audio files and clips).

A unit is a pure function of the inputs and the options (never of the number of workers): a
piece is a whole media or fortune file, a byte range of a line-based file (a line belongs to the
range that holds its first byte) or one Parquet row group; consecutive pieces join a unit until
it holds `unit_bytes` of input. Items are numbered within their unit, in input order.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from darkmatter import storage
from darkmatter.data_pipeline.manifest import PrepareError
from darkmatter.data_pipeline.prepare.shard_writer import TAR_BLOCK

MODALITIES = ("text", "image", "audio", "video")
TEXT_SUFFIXES = {".txt", ".jsonl", ".parquet", ""}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".parquet"}
AUDIO_SUFFIXES = {".wav", ".flac", ".parquet"}
AV_SUFFIXES = {".mp4", ".webm", ".mkv", ".mov", ".avi"}  # decoded by PyAV (optional)
VIDEO_SUFFIXES = {".gif", ".webp", ".parquet"} | AV_SUFFIXES
_TEXT_ROWS = 1024  # Parquet rows per batch for strings
_MEDIA_ROWS = 64  # ... and for encoded images/audio, which are much larger
_FORTUNE_SNIFF = 2**20
READ_CHUNK = 2**20


@dataclass(frozen=True)
class InputFile:
    url: str
    size: int
    version: str  # mtime or ETag: an edited file changes the fingerprint even at equal size


@dataclass(frozen=True)
class Options:
    """Everything a worker needs to read and write units (picklable)."""

    modality: str
    text_field: str
    media_field: str  # image_field, audio_field or video_field
    key_field: str | None
    shard_bytes: int
    shard_samples: int | None
    unit_bytes: int
    strict: bool


def file_suffix(url: str) -> str:
    return posixpath.splitext(posixpath.basename(url))[1].lower()


def _input_file(url: str, info: dict[str, Any]) -> InputFile:
    version = next((info[k] for k in ("ETag", "etag", "mtime", "LastModified") if k in info), "")
    return InputFile(url, int(info.get("size") or 0), str(version))


def _walk(fs: Any, path: str, scheme: str, suffixes: set[str]) -> Iterator[InputFile]:
    """The supported files below a folder, one level listed at a time (never the whole tree).

    Entries sort by name with "/" appended to folders: the order of sorting every full path,
    as a whole-tree listing would (`a.txt` < `a/x` since "." < "/"). In folders skip dotfiles
    and foreign files (fortune's .dat indexes, .u8 symlinks).
    """
    entries = fs.ls(path, detail=True)
    keyed = []
    for info in entries:
        p = info["name"].rstrip("/")
        if p == path.rstrip("/"):
            continue  # some stores list the folder itself
        folder = info.get("type") == "directory"
        keyed.append((posixpath.basename(p) + ("/" if folder else ""), p, folder, info))
    del entries
    for _, p, folder, info in sorted(keyed, key=lambda e: e[0]):
        name = posixpath.basename(p)
        if folder:
            yield from _walk(fs, p, scheme, suffixes)
        elif file_suffix(p) in suffixes and not name.startswith("."):
            yield _input_file(scheme + p, info)


def expand_inputs(inputs: list[str], suffixes: set[str]) -> Iterator[InputFile]:
    """Files of the inputs with a supported suffix, streamed; folders recurse in sorted order."""
    if not inputs:
        raise PrepareError("no inputs given")
    for url in inputs:
        if not storage.exists(url):
            raise PrepareError(f"input not found: {url}")
        fs, path = storage.filesystem(url)
        if not fs.isdir(path):  # named explicitly: an unsupported suffix is a mistake, not noise
            if file_suffix(url) not in suffixes:
                raise PrepareError(
                    f"unsupported input file {url} (expected one of {sorted(suffixes)})"
                )
            yield _input_file(url, fs.info(path))
            continue
        scheme = url.split("://", 1)[0] + "://" if "://" in url else ""
        yield from _walk(fs, path, scheme, suffixes)


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


def _parquet_pieces(f: InputFile, opts: Options) -> list[tuple[Piece, int]]:
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


def _pieces(f: InputFile, opts: Options, text_format: str) -> list[tuple[Piece, int]]:
    """The pieces of one file with their weights (input bytes)."""
    suffix = file_suffix(f.url)
    if suffix == ".parquet":
        return _parquet_pieces(f, opts)
    if opts.modality != "text":
        return [(Piece(f.url, "file"), f.size + TAR_BLOCK)]  # a header's worth per file
    if suffix == ".jsonl":
        return _byte_ranges(f, "jsonl", opts.unit_bytes)
    fortune = text_format == "fortune" or (text_format == "auto" and _is_fortune(f.url))
    # Fortune files are small and split on '%' lines, so they stay whole.
    return (
        [(Piece(f.url, "fortune"), f.size)]
        if fortune
        else _byte_ranges(f, "lines", opts.unit_bytes)
    )


def plan_units(files: Iterable[InputFile], opts: Options, text_format: str) -> Iterator[Unit]:
    """Consecutive pieces grouped into units of at least unit_bytes (the last may be smaller),
    streamed: a unit is yielded as soon as it is complete."""
    n = 0
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
                yield Unit(n, tuple(current))
                n, current, weight = n + 1, [], 0
    if current:
        yield Unit(n, tuple(current))


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
            chunk = f.read(min(READ_CHUNK, offset - done))
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


def _jsonl_items(piece: Piece, opts: Options) -> Iterator[Item]:
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


def _parquet_items(piece: Piece, opts: Options) -> Iterator[Item]:
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


def _piece_items(piece: Piece, opts: Options) -> Iterator[Item]:
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


def unit_items(unit: Unit, opts: Options) -> Iterator[Item]:
    """The unit's items in input order; their position is the item number in sample keys."""
    for piece in unit.pieces:
        yield from _piece_items(piece, opts)


def sample_key(unit: int, item: int) -> str:
    return f"{unit:06d}-{item:08d}"
