"""Raw text sources read in place: jsonl (also .gz/.zst), plain text files and Parquet, indexed
into *units* (index_raw_file) and read back one unit at a time (open_unit).

A unit is the reader's "shard" (order.py numbers its samples like a tar shard's):
  * Parquet: one row group; samples are its rows (the footer gives the count, and a read fetches
    the footer and the text column's chunk of that row group, nothing else).
  * jsonl and text: a byte range [start, stop) of an uncompressed file; a line belongs to the
    range that holds its first byte. jsonl: one sample per non-blank line (an unparsable line is
    a sample, a hole when read). text: one document per non-blank line, split and stripped as
    `darkmatter prepare` splits them. A compressed file (.gz, .zst) is one whole-file unit.
A unit reader has the LocalShard interface (shards.py): `.name`, `.bad`, `.read(j)`, `.key(j)`,
`.close()`. Samples are {"__key__", "__shard__", "txt": UTF-8 bytes}, keys stable and unique:
"name:row_group:row" (Parquet), "name@offset" (jsonl, text; "+k" for a text line's k-th part).
Bad input is a Hole whose reason names the kind, the file and the place; a unit whose sample
count is not the manifest's (the file changed since `darkmatter index`) is `bad` as a whole.
"""

from __future__ import annotations

import abc
import json
import posixpath
from collections.abc import Iterator
from typing import Any

from darkmatter import storage
from darkmatter.data_pipeline.manifest import Manifest, PrepareError, ShardInfo
from darkmatter.data_pipeline.prepare.sources import _column_kind_ok, _universal_lines
from darkmatter.data_pipeline.reader.options import DataError, ReaderOptions
from darkmatter.data_pipeline.reader.shards import Hole

RAW_FORMATS = ("jsonl", "text", "parquet")
COMPRESSED = (".gz", ".zst")  # fsspec decompresses by suffix (zstd through `zstandard`)
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".txt": "text",
             ".parquet": "parquet", ".tar": "tar"}  # fmt: skip
_CHUNK = 8 << 20  # bytes per read while streaming through a file


def _decompress_errors() -> tuple[type[Exception], ...]:
    import gzip

    try:
        from zstandard import ZstdError
    except ImportError:  # then fsspec cannot open .zst files either, and says so
        return (gzip.BadGzipFile, EOFError)
    return (gzip.BadGzipFile, EOFError, ZstdError)


# A corrupt or truncated compressed file. Caught inside the retried call: with_retries would
# take it for a network error and try again until its budget is spent. (A body cut short by
# the network reads the same: the unit is then bad at once rather than tried again.)
_DECOMPRESS_ERRORS = _decompress_errors()


def detect_format(name: str) -> str | None:
    """The format of a file by its name (data.format auto), or None for a foreign file:
    tar, parquet, jsonl (.jsonl, .ndjson, .json lines) or text (.txt), each of the line formats
    also compressed (.gz, .zst)."""
    base = posixpath.basename(name).lower()
    stem, suffix = posixpath.splitext(base)
    if suffix in COMPRESSED:
        fmt = _SUFFIXES.get(posixpath.splitext(stem)[1])
        return fmt if fmt in ("jsonl", "text") else None
    return _SUFFIXES.get(suffix)


def is_compressed(name: str) -> bool:
    return posixpath.splitext(name.lower())[1] in COMPRESSED


# -- documents of a line ----------------------------------------------------------------------
def _text_docs(line: bytes) -> list[str]:
    """A text file's documents on one line, as prepare reads them (universal newlines, stripped,
    blank parts dropped)."""
    parts = _universal_lines(line.decode("utf-8", errors="replace"))
    return [p.strip() for p in parts if p.strip()]


def _docs_in_line(line: bytes, fmt: str) -> int:
    if fmt == "jsonl":
        return 1 if line.strip() else 0
    return len(_text_docs(line))


def _lines(f: Any, base: int = 0) -> Iterator[tuple[int, bytes]]:
    """(offset, line without its newline) of every line of an open binary file, read in chunks
    (fsspec's readline costs a block copy per line on S3)."""
    pos, rest = base, b""
    while chunk := f.read(_CHUNK):
        parts = (rest + chunk).split(b"\n")
        rest = parts.pop()
        for line in parts:
            yield pos, line
            pos += len(line) + 1
    if rest:
        yield pos, rest


# -- indexing ---------------------------------------------------------------------------------
def index_raw_file(
    url: str, name: str, fmt: str, text_field: str, size: int, version: str,
    unit_bytes: int = 64 << 20,
) -> list[ShardInfo]:  # fmt: skip
    """The units of one raw file (`name` relative to the dataset's root), in file order. Units
    that hold no sample (a range inside one long line) are left out. PrepareError for a file
    that cannot be a source: not Parquet, no `text_field` column, a first record without it."""
    try:
        if fmt == "parquet":
            return _index_parquet(url, name, text_field, version)
        if fmt in ("jsonl", "text"):
            return _index_lines(url, name, fmt, text_field, size, version, unit_bytes)
    except FileNotFoundError:
        raise PrepareError(f"input not found: {url}") from None
    raise PrepareError(f"{url}: format {fmt!r} is not one of {', '.join(RAW_FORMATS)}")


def _index_parquet(url: str, name: str, text_field: str, version: str) -> list[ShardInfo]:
    """One unit per row group, from the footer only."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def footer() -> Any:
        with storage.open_url(url, "rb", cache_type="none") as fh:  # ranged reads only
            try:
                return pq.ParquetFile(fh).metadata
            except pa.ArrowException as e:  # returned, not raised: no retry fixes the bytes
                return e

    meta = storage.with_retries(footer, f"index of {url}")
    if isinstance(meta, Exception):
        raise PrepareError(f"{url}: not a Parquet file: {meta}")
    schema = meta.schema.to_arrow_schema()
    if text_field not in schema.names:
        raise PrepareError(
            f"{url}: no column {text_field!r} (columns: {schema.names}; "
            "choose with data.text_field)"
        )
    kind = schema.field(text_field).type
    if not _column_kind_ok(kind, "text"):
        raise PrepareError(f"{url}: column {text_field!r} holds {kind}, not strings")
    units = []
    for i in range(meta.num_row_groups):
        rg = meta.row_group(i)
        size = sum(rg.column(j).total_compressed_size for j in range(rg.num_columns))
        if rg.num_rows:
            units.append(ShardInfo(name, rg.num_rows, size, None, format="parquet",
                                   version=version, row_group=i))  # fmt: skip
    return units


def _index_lines(
    url: str, name: str, fmt: str, text_field: str, size: int, version: str, unit_bytes: int
) -> list[ShardInfo]:
    """Samples per byte range of unit_bytes (a compressed file: one unit), counted by streaming
    through the file once."""
    compressed = is_compressed(url)

    def count() -> tuple[dict[int, int], bytes | None] | Exception:
        counts: dict[int, int] = {}
        first: bytes | None = None
        with storage.open_url(url, "rb", compression="infer") as f:
            try:
                for offset, line in _lines(f):
                    n = _docs_in_line(line, fmt)
                    first = line if first is None and n else first
                    k = 0 if compressed else offset // unit_bytes
                    counts[k] = counts.get(k, 0) + n
            except _DECOMPRESS_ERRORS as e:  # returned, not raised: see _DECOMPRESS_ERRORS
                return e
        return counts, first

    got = storage.with_retries(count, f"index of {url}")
    if isinstance(got, Exception):
        raise PrepareError(f"{url}: cannot decompress: {got}")
    counts, first = got
    if fmt == "jsonl" and first is not None:
        _check_first_record(url, first, text_field)
    if compressed:
        return [ShardInfo(name, counts.get(0, 0), size, None, format=fmt, version=version)]
    return [
        ShardInfo(name, n, min(size, (k + 1) * unit_bytes) - k * unit_bytes, None, format=fmt,
                  version=version, start=k * unit_bytes, stop=min(size, (k + 1) * unit_bytes))
        for k, n in sorted(counts.items()) if n
    ]  # fmt: skip


def _check_first_record(url: str, line: bytes, text_field: str) -> None:
    """A file whose first record is an object without the text field is the wrong field name,
    not bad data: an error now rather than a file of holes later."""
    try:
        record = json.loads(line.decode("utf-8", errors="replace"))
    except json.JSONDecodeError:
        return  # a bad line is a hole at read time; the next ones may be fine
    if isinstance(record, dict) and text_field not in record:
        raise PrepareError(
            f"{url}: the first record has no field {text_field!r} (fields: "
            f"{sorted(record)[:20]}; choose with data.text_field)"
        )


# -- reading ----------------------------------------------------------------------------------
class _BadSample(Exception):
    """A sample that is a hole; the message is its reason."""


class RawUnit(abc.ABC):
    """A unit's samples in memory (one unit at a time: a byte range or a row group's column)."""

    def __init__(self, name: str, where: str, expected: int):
        self.name, self.where, self.expected = name, where, expected
        self.bad: str | None = None
        self.keys: list[str] = []

    def _check_count(self) -> None:
        if self.bad is None and len(self.keys) != self.expected:
            self.bad = (
                f"holds {len(self.keys)} samples, the manifest says {self.expected} "
                f"({self.where} changed since it was indexed)"
            )

    def key(self, j: int) -> str:
        return self.keys[j] if j < len(self.keys) else f"{self.name}#{j}"

    def read(self, j: int) -> dict[str, Any] | Hole:
        """Raw sample j: {__key__, __shard__, txt}, or the Hole it is."""
        if self.bad is not None:
            return Hole(self.name, self.key(j), self.bad)
        try:
            text = self._text(j)
        except _BadSample as e:
            return Hole(self.name, self.keys[j], str(e))
        return {"__key__": self.keys[j], "__shard__": self.name, "txt": text.encode()}

    @abc.abstractmethod
    def _text(self, j: int) -> str:
        """Sample j's document; raises _BadSample with the reason it is a hole."""

    def close(self) -> None:
        self.keys = []


class LineUnit(RawUnit):
    """A jsonl or text unit: its lines (jsonl: parsed when read) or documents (text)."""

    def __init__(self, name: str, where: str, expected: int, fmt: str, field: str):
        super().__init__(name, where, expected)
        self.fmt, self.field = fmt, field
        self.items: list[tuple[int, bytes | str]] = []  # (byte offset, jsonl line or document)

    def load(self, lines: Iterator[tuple[int, bytes]]) -> None:
        for offset, line in lines:
            if self.fmt == "jsonl":
                if line.strip():
                    self.items.append((offset, line))
                    self.keys.append(f"{self.name}@{offset}")
                continue
            for k, doc in enumerate(_text_docs(line)):
                self.items.append((offset, doc))
                self.keys.append(f"{self.name}@{offset}" + (f"+{k}" if k else ""))
        self._check_count()

    def _text(self, j: int) -> str:
        offset, item = self.items[j]
        if isinstance(item, str):
            return item
        where = f"byte {offset} of {self.name}"
        try:
            record = json.loads(item.decode("utf-8", errors="replace"))
        except json.JSONDecodeError as e:
            raise _BadSample(f"bad jsonl line: {where}: {e}") from None
        if not isinstance(record, dict):
            raise _BadSample(f"bad jsonl line: {where}: a {type(record).__name__}, not an object")
        if self.field not in record:
            raise _BadSample(f"no text field: {where} has no {self.field!r}")
        return _checked_text(record[self.field], where)

    def close(self) -> None:
        super().close()
        self.items = []


class ParquetUnit(RawUnit):
    """A Parquet row group's text column."""

    def __init__(self, name: str, where: str, expected: int, row_group: int, field: str):
        super().__init__(name, where, expected)
        self.row_group, self.field = row_group, field
        self.column: Any = None  # pyarrow array of the row group's texts

    def load(self, column: Any) -> None:
        self.column = column
        self.keys = [f"{self.name}:{self.row_group}:{i}" for i in range(len(column))]
        self._check_count()

    def _text(self, j: int) -> str:
        return _checked_text(self.column[j].as_py(), f"row {j} of {self.where}")

    def close(self) -> None:
        super().close()
        self.column = None


def _checked_text(value: Any, where: str) -> str:
    """A document, or _BadSample: null, not a string, blank (prepare writes no sample for a
    blank document; here the place already counts as one)."""
    if value is None:
        raise _BadSample(f"null text: {where}")
    if not isinstance(value, str):
        raise _BadSample(f"not text: {where} holds a {type(value).__name__}")
    if not value.strip():
        raise _BadSample(f"empty document: {where}")
    return value


def open_unit(url: str, info: ShardInfo, manifest: Manifest, opts: ReaderOptions) -> RawUnit:
    """The unit `info` of the raw file at `url`, read within the storage.retry budget. A missing
    file makes it `bad` ("missing shard"); a 403, refused credentials, a missing bucket or a
    spent budget raise DataError naming the bucket."""
    unit = _new_unit(info, manifest.text_field or "text")
    try:
        storage.with_retries(lambda: _load(unit, url, info), f"read of {url}", opts.retry)
    except FileNotFoundError:
        unit.bad = "missing shard"
    except storage.StorageError as e:
        raise DataError(str(e)) from None
    return unit


def _new_unit(info: ShardInfo, field: str) -> RawUnit:
    if info.format == "parquet":
        assert info.row_group is not None, info
        where = f"row group {info.row_group} of {info.name}"
        return ParquetUnit(info.name, where, info.samples, info.row_group, field)
    if info.format in ("jsonl", "text"):
        where = (info.name if is_compressed(info.name) else
                 f"{info.name} bytes {info.start}-{'' if info.stop is None else info.stop}")  # fmt: skip
        return LineUnit(info.name, where, info.samples, info.format, field)
    raise DataError(f"{info.name}: format {info.format!r} is not one of {', '.join(RAW_FORMATS)}")


def _load(unit: RawUnit, url: str, info: ShardInfo) -> None:
    """One try at reading the unit into memory (from scratch: a retry starts over)."""
    unit.close()
    if isinstance(unit, ParquetUnit):
        _load_parquet(url, unit)
    else:
        assert isinstance(unit, LineUnit)
        try:
            unit.load(_read_lines(url, info, is_compressed(info.name)))
        except _DECOMPRESS_ERRORS as e:
            unit.bad = f"unreadable file: {unit.where}: {e}"


def _read_lines(url: str, info: ShardInfo, whole: bool) -> Iterator[tuple[int, bytes]]:
    """The lines of the unit's range (offsets in the file; decompressed ones for .gz/.zst)."""
    if whole:
        with storage.open_url(url, "rb", compression="infer") as f:
            return _blob_lines(f.read(), 0)
    start, stop = info.start, info.stop
    with storage.open_url(url, "rb", cache_type="none") as f:  # each read one ranged GET
        lo = max(0, start - 1)
        f.seek(lo)
        blob = f.read(stop - lo) if stop is not None else f.read()
        # The last line that starts before `stop` runs on to its newline.
        while blob and not blob.endswith(b"\n") and (tail := f.read(1 << 16)):
            cut = tail.find(b"\n")
            blob += tail if cut < 0 else tail[: cut + 1]
            if cut >= 0:
                break
    # From byte start-1, the first line that starts at or after `start`.
    first = 0 if start == 0 else blob.find(b"\n") + 1 if b"\n" in blob else len(blob)
    return _blob_lines(blob[first:], lo + first)


def _blob_lines(blob: bytes, base: int) -> Iterator[tuple[int, bytes]]:
    """(offset, line) of the lines of a blob that starts at file offset `base`."""
    lines = blob.split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # what follows the last newline
    pos = base
    for line in lines:
        yield pos, line
        pos += len(line) + 1


def _load_parquet(url: str, unit: ParquetUnit) -> None:
    """Fetch the footer and the row group's text column chunk (ranged reads). A file that is
    no longer what was indexed (not Parquet, fewer row groups, no such column) makes the unit
    `bad`, at once: no retry fixes the bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    column = pa.array([], pa.string())  # a row group that is gone holds 0 samples: bad
    with storage.open_url(url, "rb", cache_type="none") as fh:
        try:
            pf = pq.ParquetFile(fh)
            names = pf.schema_arrow.names
            if unit.field not in names:
                unit.bad = (f"missing column: no column {unit.field!r} in {unit.where} "
                            f"(columns: {names})")  # fmt: skip
                return
            if unit.row_group < pf.metadata.num_row_groups:
                table = pf.read_row_group(unit.row_group, columns=[unit.field])
                column = table.column(0).combine_chunks()
        except pa.ArrowException as e:
            unit.bad = f"unreadable parquet: {unit.where}: {e}"
            return
    unit.load(column)
