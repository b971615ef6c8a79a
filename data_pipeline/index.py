"""`darkmatter index`: a manifest (version 2) for data that already exists, read where it lies.

Input: WebDataset tar shards (img2dataset, OpenCLIP, LAION layouts; prepared shards too) and raw
text files (jsonl, Parquet, text, Hugging Face dataset folders of Parquet), given as paths,
folders, globs, brace ranges (`shard-{00000..09999}.tar`) or s3:// prefixes. Nothing is copied
or rewritten: the manifest's `root` is the longest common folder of the inputs and the shard
names are relative to it.

A tar shard is indexed from its headers alone, by ranged reads: a window (64 KiB) is read at a
header's offset, every header inside it is parsed (shards.parse_window), and the next read
starts at the first header the window did not hold. While that header lies within one more
window (small members), the window doubles, up to 2 MiB (a ranged GET costs about what 2 MiB
cost to transfer); a member that skips further sets it back to 64 KiB. So a shard of S samples
whose members are larger than the window costs about S reads whatever its size, one of small
members about its size / 2 MiB; `--checksum` reads every byte instead (to record sha256s). Samples are counted as webdataset groups them (consecutive members
with one key), with each shard's member extensions; the dataset's modality is the one whose
extension is in every sample of the first shard (video, then image, audio, text: jpg+txt
captioned images are images). Raw text files are cut into units by reader/formats.py.

Sidecars: the shard writers users have already recorded each shard's count beside it
(img2dataset: `<shard>_stats.json`, "successes"; OpenCLIP-style folders: `sizes.json`,
{"00000.tar": N}; webdataset's wids index: a .json with "wids_version" and a "shardlist" of
{"url", "nsamples"}). Where one counts a shard, its headers are not walked: one ranged read of
its first window checks that it is a tar (`--sidecar-only`: no read at all), and its `members`
stay None; the manifest's stats say how many shards were counted each way. The first tar shard
is always walked (the modality and extensions come from it) and checked against its sidecar;
where they disagree, no sidecar is trusted. A sidecar can still be wrong for another shard: the
reader turns a shard holding fewer samples than the manifest says into trailing holes
("truncated tar: k of N samples present") and refuses one holding more ("holds N samples, the
manifest says M": every sample of it a hole), so training never reads a wrong sample, but
only `--walk` (every shard's headers) counts exactly.

Growth: re-indexing into a folder whose manifest lists a prefix of the new listing (same names,
sizes and versions, in order) writes a new manifest whose `history` lists the old version, keeps
the old one as manifest.v{N}.json, and reads only the new files. A listed file that changed is
an error (a dataset may grow, never change under a run) unless `rebuild`.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import logging
import os
import posixpath
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from darkmatter import storage
from darkmatter.data_pipeline import offsets
from darkmatter.data_pipeline.manifest import MANIFEST, TOKENIZER, Manifest, PrepareError, ShardInfo
from darkmatter.data_pipeline.reader.shards import TarCursor, _split_name, parse_window
from darkmatter.storage.fs import reaching

log = logging.getLogger(__name__)

DEFAULT_EXTENSIONS = {
    **dict.fromkeys(("jpg", "jpeg", "png", "webp"), "image"),
    **dict.fromkeys(("txt", "input_ids.npy"), "text"),
    **dict.fromkeys(("flac", "wav", "mp3"), "audio"),
    **dict.fromkeys(("mp4", "webm"), "video"),
    **dict.fromkeys(("json", "cls"), "metadata"),
}
MODALITIES = ("video", "image", "audio", "text")  # the first wins when a sample has several
FORMATS = {"auto": None, "webdataset": "tar", "jsonl": "jsonl", "parquet": "parquet",
           "text": "text"}  # fmt: skip
WINDOW = 64 << 10  # bytes per ranged read of tar headers
MAX_STRIDE = 2 << 20  # the window grows to this over small members: a GET costs ~4 ms of CPU,
# what 2 MiB cost to transfer at ~500 MB/s
_MAX_WINDOW = 64 << 20  # a long-name or pax record larger than this is not a header
_OWN_FILES = (MANIFEST, TOKENIZER, "manifest.v*.json")


@dataclass(frozen=True)
class Listed:
    """One input file: its URL, size and version (ETag, or mtime where there is none)."""

    url: str
    size: int
    version: str
    fmt: str


@dataclass
class TarScan:
    """What a tar shard's headers say."""

    samples: list[list[str]] = field(default_factory=list)  # member extensions per sample
    gets: int = 0  # ranged reads it took
    truncated_at: int | None = None  # offset of the header whose member runs past the end
    corrupt: str | None = None  # a bad header after some good ones
    starts: list[int] = field(default_factory=lambda: [0])  # sample byte ranges (offsets.py)


# -- listing ------------------------------------------------------------------------------------
def _version(info: dict[str, Any]) -> str:
    if etag := offsets.etag_of(info):
        return etag
    return str(info.get("mtime") or info.get("LastModified") or info.get("created") or "")


def _format_of(url: str, fmt: str | None, from_folder: bool) -> str | None:
    """The file's format, or None to leave it out (a foreign file in a folder)."""
    from darkmatter.data_pipeline.reader.formats import detect_format

    base = posixpath.basename(url)
    if from_folder and (base.startswith(".") or any(fnmatch.fnmatch(base, p) for p in _OWN_FILES)):
        return None
    found = detect_format(url)
    if from_folder:  # a folder also holds READMEs and metadata (.json): only data files count
        ok = found is not None and not base.endswith(".json") and fmt in (None, found)
        return found if ok else None
    if fmt is None and found is None:
        raise PrepareError(f"{url}: cannot tell its format from its name; pass --format")
    return fmt or found


def _entries(fs: Any, path: str, pattern: bool) -> tuple[dict[str, Any], bool]:
    """(path -> info of the files a path or glob names, whether they come from a folder)."""
    if pattern:
        found = fs.glob(path, detail=True)
    else:
        try:
            found = {path: fs.info(path)}
        except FileNotFoundError:
            return {}, False
    files = {p: i for p, i in found.items() if i.get("type") != "directory"}
    folders = [p for p, i in found.items() if i.get("type") == "directory"]
    for folder in folders:
        files.update(fs.find(folder, detail=True))
    return files, bool(folders)


def expand(urls: list[str], fmt: str | None = None) -> tuple[list[Listed], str]:
    """Every input file the URLs name, sorted by URL, and the root: the longest folder that
    holds every input (a folder given, or the one a pattern starts in: not the files' own, so
    that files added in new subfolders later keep the names they have). PrepareError for a URL
    that names no file."""
    from braceexpand import braceexpand

    out: dict[str, Listed] = {}
    bases = []
    for url in urls:
        patterns = list(braceexpand(url))
        fs, _ = storage.filesystem(patterns[0])
        scheme = url.split("://", 1)[0] + "://" if "://" in url else ""
        if len(patterns) > 1:
            found = _brace_entries(fs, url, patterns)
            folder = False
        else:
            _, path = storage.filesystem(url)
            with reaching(url):
                found, folder = _entries(fs, path, any(c in path for c in "*?["))
        listed = []
        for path, info in found.items():
            full = scheme + path if scheme else path
            if (f := _format_of(full, fmt, folder)) is not None:
                listed.append(Listed(full, int(info.get("size") or 0), _version(info), f))
        if not listed:
            raise PrepareError(f"{url}: matches no input file")
        out.update((x.url, x) for x in _without_shard_metadata(listed))
        bases.append(_base(url, folder))
    return [out[u] for u in sorted(out)], common_root(bases)


def _without_shard_metadata(listed: list[Listed]) -> list[Listed]:
    """The files less img2dataset's per-shard metadata: a `<shard>.parquet` (one row per sample
    attempted) beside each `<shard>.tar` describes the shard; it is no text data."""
    tars = {x.url.removesuffix(".tar") for x in listed if x.fmt == "tar"}
    meta = [x for x in listed if x.fmt == "parquet" and x.url.removesuffix(".parquet") in tars]
    if meta:
        log.info("%d .parquet files beside the .tar shards of the same names (img2dataset's "
                 "per-shard metadata) are not indexed", len(meta))  # fmt: skip
    skip = {x.url for x in meta}
    return [x for x in listed if x.url not in skip]


def _base(url: str, folder: bool) -> str:
    """The folder an input names: itself, the folder its pattern starts in, or its file's."""
    cuts = [url.find(c) for c in "*?[{" if c in url]
    if cuts:
        return posixpath.dirname(url[: min(cuts)])
    return url.rstrip("/") if folder else posixpath.dirname(url)


def _brace_entries(fs: Any, url: str, patterns: list[str]) -> dict[str, Any]:
    """A brace range's files: each folder listed once (not one request per name)."""
    wanted = {storage.filesystem(p)[1] for p in patterns}
    found: dict[str, Any] = {}
    for folder in sorted({posixpath.dirname(p) for p in wanted}):
        with reaching(url):
            try:
                listing = fs.ls(folder, detail=True)
            except FileNotFoundError:
                listing = []
        found.update((i["name"], i) for i in listing if i["name"] in wanted)
    missing = sorted(wanted - found.keys())
    if missing:
        raise PrepareError(f"{url}: {len(missing)} of its {len(wanted)} files do not exist, "
                           f"the first {missing[0]}")  # fmt: skip
    return found


def common_root(folders: list[str]) -> str:
    """The longest folder that holds every folder (absolute for local paths)."""
    if storage.is_remote(folders[0]):
        scheme = folders[0].split("://", 1)[0] + "://"
        return scheme + posixpath.commonpath([u[len(scheme) :] for u in folders])
    return os.path.commonpath([os.path.abspath(u.removeprefix("file://")) for u in folders])


def _relative(url: str, root: str) -> str:
    if "://" in root and not root.startswith("file://"):
        return url[len(root) :].lstrip("/")
    return os.path.relpath(os.path.abspath(url.removeprefix("file://")), root).replace(os.sep, "/")


# -- one tar shard ------------------------------------------------------------------------------
def scan_tar(
    url: str, size: int, window: int = WINDOW, max_gets: int | None = None,
    max_window: int = MAX_STRIDE,
) -> TarScan:  # fmt: skip
    """Walk a tar shard header to header with ranged reads (see the module docstring); with
    `max_gets`, stop after that many reads (the samples are then the shard's first ones)."""
    fs, path = storage.filesystem(url)
    cur, scan, grow, key, end = TarCursor(), TarScan(), window, None, 0
    while not cur.ended and cur.pos + 512 <= size and scan.gets != max_gets:
        start = cur.pos
        buf = _read_range(fs, path, url, start, min(size, start + grow))
        scan.gets += 1
        try:
            for name, offset, length in parse_window(buf, start, cur):
                k, ext = _split_name(name)
                if k != key:
                    if key is not None:
                        scan.starts.append(end)
                    key = k
                    scan.samples.append([])
                scan.samples[-1].append(ext)
                end = offset + (length + 511) // 512 * 512
                if offset + length > size and scan.truncated_at is None:
                    scan.truncated_at = offset - 512
        except ValueError as e:  # TarFormatError, or a number field that is not one
            if not scan.samples:
                raise PrepareError(f"{url}: not a tar file: {e}") from None
            scan.corrupt = str(e)
            break
        if cur.pos == start and not cur.ended:  # a long-name or pax record beyond the window
            if grow >= _MAX_WINDOW:
                raise PrepareError(f"{url}: a tar record at byte {start} over {grow} bytes")
            grow *= 4
        elif cur.pos - (start + len(buf)) < grow:  # small members: more headers per read
            grow = min(2 * grow, max(window, max_window))
        else:
            grow = window
    if scan.truncated_at is None and not cur.ended and cur.pos < size and max_gets is None:
        scan.truncated_at = cur.pos  # a header cut short
    if key is not None:
        scan.starts.append(end)
    if size == 0:
        raise PrepareError(f"{url}: not a tar file: empty")
    return scan


def _read_range(fs: Any, path: str, url: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of an object: one ranged GET, within the retry budget."""
    data: bytes = storage.with_retries(
        lambda: fs.cat_file(path, start=start, end=end), f"read of {url}"
    )
    return data


def _sha256(url: str) -> str:
    def read() -> str:
        sha = hashlib.sha256()
        with storage.open_url(url, "rb", cache_type="none") as f:
            while chunk := f.read(8 << 20):
                sha.update(chunk)
        return sha.hexdigest()

    return storage.with_retries(read, f"checksum of {url}")


def _index_tar(item: Listed, name: str, checksum: bool) -> tuple[ShardInfo, TarScan]:
    scan = scan_tar(item.url, item.size)
    if scan.truncated_at is not None or scan.corrupt:
        what = (
            f"corrupt ({scan.corrupt})"
            if scan.corrupt
            else f"truncated at byte {scan.truncated_at}"
        )
        log.warning("%s: %s: %d samples indexed, the last one is a hole when read", item.url,
                    what, len(scan.samples))  # fmt: skip
    members = Counter(ext for sample in scan.samples for ext in sample)
    info = ShardInfo(
        name, len(scan.samples), item.size, _sha256(item.url) if checksum else None,
        version=item.version, members=dict(sorted(members.items())),
    )  # fmt: skip
    return info, scan


# -- sidecars: the counts the shard writers recorded --------------------------------------------
COUNTING = ("sidecar", "sidecar-only", "walk")
STATS_SUFFIX = "_stats.json"  # img2dataset: <shard>_stats.json beside <shard>.tar
SIZES = "sizes.json"  # OpenCLIP / webdataset: {"00000.tar": N, ...} in the shard folder
_MAX_WIDS_CANDIDATES = 8  # other .json files read to find a wids index; more: none is read


def sidecar_counts(tars: list[Listed]) -> dict[str, tuple[int, str]]:
    """url -> (samples, the sidecar that says so) for the tar shards a sidecar counts. A shard
    two sidecars disagree on is left out (walked), with one warning."""
    found: dict[str, dict[str, int]] = {}
    folders: dict[str, list[Listed]] = {}
    for item in tars:
        folders.setdefault(posixpath.dirname(item.url), []).append(item)
    for folder, items in folders.items():
        present = _folder_names(folder)
        for source, counts in _folder_sidecars(folder, items, present):
            for url, n in counts.items():
                found.setdefault(url, {})[source] = n
    out, disputed = {}, []
    for url, by_source in found.items():
        if len(set(by_source.values())) == 1:
            out[url] = (next(iter(by_source.values())), next(iter(by_source)))
        else:
            disputed.append(f"{url} ({', '.join(f'{k}: {v}' for k, v in by_source.items())})")
    if disputed:
        log.warning("%d shards whose sidecars disagree on their count are walked, the first %s",
                    len(disputed), disputed[0])  # fmt: skip
    return out


def _folder_names(folder: str) -> set[str]:
    """The names of the files in a folder (one listing)."""
    fs, path = storage.filesystem(folder)
    with reaching(folder):
        return {posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)}


def _folder_sidecars(
    folder: str, items: list[Listed], present: set[str]
) -> list[tuple[str, dict[str, int]]]:
    """(sidecar kind, shard url -> samples) for each kind of sidecar in the folder."""
    out = []
    stats = [x.url.removesuffix(".tar") + STATS_SUFFIX for x in items]
    stats = [u for u in stats if posixpath.basename(u) in present]
    if stats:
        got = {u.removesuffix(STATS_SUFFIX) + ".tar": d for u, d in _read_json(stats).items()}
        out.append((f"img2dataset {STATS_SUFFIX}", _counts(got, "successes")))
    if SIZES in present:
        sizes = _read_json([storage.join(folder, SIZES)])
        for d in sizes.values():
            out.append((SIZES, _counts({storage.join(folder, k): n for k, n in d.items()})))
    others = sorted(n for n in present if _maybe_wids(n))
    if 0 < len(others) <= _MAX_WIDS_CANDIDATES:
        for url, d in _read_json([storage.join(folder, n) for n in others]).items():
            if d.get("wids_version") is not None and isinstance(d.get("shardlist"), list):
                out.append((f"wids {posixpath.basename(url)}", _wids_counts(folder, d)))
    return out


def _maybe_wids(name: str) -> bool:
    own = any(fnmatch.fnmatch(name, p) for p in _OWN_FILES)
    return name.endswith(".json") and not own and name != SIZES and STATS_SUFFIX not in name


def _wids_counts(folder: str, d: dict[str, Any]) -> dict[str, int]:
    """A wids index's shardlist; its urls are relative to the index's folder unless absolute."""
    got = {}
    for entry in d["shardlist"]:
        if isinstance(entry, dict) and isinstance(entry.get("url"), str):
            u = entry["url"]
            absolute = "://" in u or u.startswith("/")
            got[u if absolute else storage.join(folder, u)] = entry.get("nsamples")
    return _counts(got)


def _counts(raw: dict[str, Any], key: str | None = None) -> dict[str, int]:
    """url -> count for the entries whose count (the value, or its `key`) is a non-negative
    integer (a bool is not one)."""
    out = {}
    for url, value in raw.items():
        if key is not None:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            out[url] = value
    return out


def _read_json(urls: list[str]) -> dict[str, Any]:
    """url -> parsed JSON object, fetched concurrently (fsspec's cat of a list); a file that
    cannot be read or is no JSON object is left out with a warning (its shards are walked)."""
    fs, _ = storage.filesystem(urls[0])
    paths = {storage.filesystem(u)[1]: u for u in urls}
    got = storage.with_retries(lambda: fs.cat(list(paths), on_error="return"), "sidecar read")
    out = {}
    for path, data in got.items():
        url = paths.get(path) or paths.get(path.lstrip("/")) or path
        try:
            if isinstance(data, Exception):
                raise data
            d = json.loads(data)
            if not isinstance(d, dict):
                raise ValueError("not a JSON object")
            out[url] = d
        except (OSError, ValueError) as e:
            log.warning("%s: not a readable sidecar (%s): its shards are walked", url, e)
    return out


# -- the dataset ------------------------------------------------------------------------------
def _modality_of(ext: str, mapping: dict[str, str]) -> str | None:
    return mapping.get(ext) or mapping.get(ext.rsplit(".", 1)[-1].lower())


def detect_modality(shard: str, scan: TarScan, mapping: dict[str, str]) -> str:
    """The modality whose extension is in every sample of `scan` (MODALITIES order breaks ties)."""
    common: set[str] | None = None
    for sample in scan.samples:
        have = {m for e in sample if (m := _modality_of(e, mapping)) in MODALITIES}
        common = have if common is None else common & have
    for m in MODALITIES:
        if common and m in common:
            return m
    exts = sorted({e for sample in scan.samples for e in sample})
    raise PrepareError(
        f"{shard}: no modality is in every sample (extensions: {', '.join(exts) or 'none'}); "
        "pass --modality, or map an extension with --ext EXT=MODALITY"
    )


def _warn_unmapped(infos: list[ShardInfo], mapping: dict[str, str]) -> dict[str, str]:
    """The extensions found -> modality; one warning per extension that maps to none."""
    found: dict[str, tuple[int, str]] = {}
    for info in infos:
        for ext, n in (info.members or {}).items():
            total, first = found.get(ext, (0, info.name))
            found[ext] = (total + n, first)
    out = {}
    for ext, (total, first) in sorted(found.items()):
        m = _modality_of(ext, mapping)
        if m is None:
            log.warning("extension .%s (%d members, first in %s) maps to no modality: kept as "
                        "metadata (map it with --ext %s=MODALITY)", ext, total, first, ext)  # fmt: skip
        out[ext] = m or "metadata"
    return out


def _reusable(old: Manifest | None, listed: list[Listed], names: list[str]) -> int:
    """How many leading input files the old manifest already indexed unchanged; PrepareError
    naming the first one that changed (or vanished) under it."""
    if old is None:
        return 0
    old_files: list[tuple[str, ShardInfo]] = []
    for s in old.shards:
        if not old_files or old_files[-1][0] != s.name:
            old_files.append((s.name, s))
    for i, (name, s) in enumerate(old_files):
        if i >= len(names) or names[i] != name:
            raise PrepareError(f"{name}: indexed before, but not the input's file number {i} "
                               "now (gone, or a new file sorts before it); pass --rebuild")  # fmt: skip
        same_size = s.format != "tar" or s.bytes == listed[i].size
        if not same_size or s.version != listed[i].version:
            raise PrepareError(f"{listed[i].url}: changed since it was indexed (size or version); "
                               "a dataset may grow, never change: pass --rebuild")  # fmt: skip
    return len(old_files)


def _load_old(out: str, rebuild: bool) -> Manifest | None:
    if rebuild or not storage.exists(storage.join(out, MANIFEST)):
        return None
    return Manifest.load(out)


def index(
    urls: list[str], out: str, *, checksum: bool = False, extensions: dict[str, str] | None = None,
    modality: str | None = None, workers: int = 16, fmt: str = "auto", text_field: str = "text",
    tokenizer: str | None = None, rebuild: bool = False, counting: str = "sidecar",
) -> Manifest:  # fmt: skip
    """Index the files `urls` name into a manifest at `out` (see the module docstring); returns
    it. An unchanged listing returns the manifest already there, writing nothing."""
    if fmt not in FORMATS:
        raise PrepareError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if counting not in COUNTING:
        raise PrepareError(f"counting: expected one of {', '.join(COUNTING)}, got {counting!r}")
    listed, root = expand(urls, FORMATS[fmt])
    names = [_relative(x.url, root) for x in listed]
    for name in names:
        if problem := storage.name_problem(name):
            raise PrepareError(f"{name}: {problem}")
    old = _load_old(out, rebuild)
    keep = _reusable(old, listed, names)
    if old is not None and keep == len(listed):
        if tokenizer or modality not in (None, old.modality):
            log.warning("%s: the listing is unchanged: --tokenizer/--modality are ignored "
                        "(pass --rebuild to apply them)", out)  # fmt: skip
        return old
    mapping = {**DEFAULT_EXTENSIONS, **(extensions or {})}
    done = _index_files(listed[keep:], names[keep:], checksum, text_field, counting, workers, out)
    kept = set(names[:keep])
    reused = [s for s in (old.shards if old else []) if s.name in kept]
    shards = reused + [s for infos, _ in done for s in infos]
    m = _build(shards, done, old, modality, mapping, root, out, text_field, tokenizer)
    _write(m, old, out)
    return m


def _index_files(
    listed: list[Listed], names: list[str], checksum: bool, text_field: str, counting: str,
    workers: int, out: str,
) -> list[tuple[list[ShardInfo], TarScan | None]]:  # fmt: skip
    """Each file's units, and a tar shard's scan where its headers were walked. The first tar
    shard is always walked (the modality and member extensions come from it) and checks the
    sidecar counts: where it disagrees with its sidecar, every shard is walked. A walked
    shard's sample offsets are written under `out` (offsets.py)."""
    tars = [x for x in listed if x.fmt == "tar"]
    # --checksum reads every byte anyway: walking the headers costs nothing more.
    counts = sidecar_counts(tars) if tars and counting != "walk" and not checksum else {}
    first = tars[0].url if tars else None

    def one(item: Listed, name: str) -> tuple[list[ShardInfo], TarScan | None]:
        count = None if item.url == first else counts.get(item.url)
        return _index_one(item, name, checksum, text_field, count, counting, out)

    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="darkmatter-index") as pool:
        done = list(pool.map(one, listed, names))  # the first shard's walk beside the others
        by_sidecar = [i for i, (x, (_, scan)) in enumerate(zip(listed, done, strict=True))
                      if x.fmt == "tar" and scan is None]  # fmt: skip
        if counts and _contradicts(tars[0], done[listed.index(tars[0])][1], counts):
            counts = {}
            for i, walked in zip(by_sidecar, pool.map(lambda i: one(listed[i], names[i]),
                                                      by_sidecar), strict=True):  # fmt: skip
                done[i] = walked
            by_sidecar = []
    counted = [counts[listed[i].url][1] for i in by_sidecar]
    if counted:
        _log_counting(len(tars), counted, counting)
    return done


def _contradicts(first: Listed, scan: TarScan | None, counts: dict[str, tuple[int, str]]) -> bool:
    """Whether the first shard's headers contradict its sidecar (then none is trusted)."""
    said = counts.get(first.url)
    if scan is None or said is None or said[0] == len(scan.samples):
        return False
    log.warning("%s: its %s says %d samples, its headers hold %d: the sidecars are not trusted, "
                "every shard is walked", first.url, said[1], said[0], len(scan.samples))  # fmt: skip
    return True


def _log_counting(n_tars: int, sources: list[str], counting: str) -> None:
    """One line: how many tar shards which sidecars counted."""
    by_source = ", ".join(f"{n} by {source}" for source, n in Counter(sources).most_common())
    log.info("%d of %d tar shards counted from sidecars (%s), %s, the rest walked header by "
             "header; a wrong sidecar count shows when read (holes, or a refused shard): "
             "--walk counts every shard exactly", len(sources), n_tars, by_source,
             "not read" if counting == "sidecar-only" else "their first window read")  # fmt: skip


def _index_one(
    item: Listed, name: str, checksum: bool, text_field: str,
    count: tuple[int, str] | None, counting: str, out: str,
) -> tuple[list[ShardInfo], TarScan | None]:  # fmt: skip
    if item.fmt == "tar" and count is not None:
        if counting == "sidecar":  # one ranged read: a tar (else PrepareError naming it)
            scan_tar(item.url, item.size, max_gets=1)
        return [ShardInfo(name, count[0], item.size, None, version=item.version)], None
    if item.fmt == "tar":
        info, scan = _index_tar(item, name, checksum)
        if scan.truncated_at is None and not scan.corrupt and info.samples and item.version:
            starts = np.asarray(scan.starts, np.uint64)
            offsets.write(out, offsets.SampleOffsets(info.identity, item.version, starts))
        return [info], scan
    from darkmatter.data_pipeline.reader.formats import index_raw_file

    return index_raw_file(item.url, name, item.fmt, text_field, item.size, item.version), None


def _build(
    shards: list[ShardInfo], done: list[tuple[list[ShardInfo], TarScan | None]],
    old: Manifest | None, modality: str | None, mapping: dict[str, str], root: str, out: str,
    text_field: str, tokenizer: str | None,
) -> Manifest:  # fmt: skip
    """The new manifest: modality, extensions, tokenizer, root and history settled."""
    tars = [s for s in shards if s.format == "tar"]
    if modality is None:
        first = next(((infos[0], scan) for infos, scan in done if scan and scan.samples), None)
        if old is not None:
            modality = old.modality
        elif first is not None:
            modality = detect_modality(first[0].name, first[1], mapping)
        else:
            modality = "text"  # raw text files only
    new_root = None if _same_folder(root, out) else root
    if old is not None and old.root != new_root:
        raise PrepareError(f"{out}: indexed files under {old.root or out} before, under "
                           f"{new_root or out} now; pass --rebuild")  # fmt: skip
    if old is not None and modality != old.modality:
        raise PrepareError(
            f"{out}: indexed as {old.modality} before, {modality} now; pass --rebuild"
        )
    if len(tars) < len(shards) and modality != "text":
        raise PrepareError(f"{out}: raw text files (jsonl, Parquet, text) in a {modality} dataset")
    m = Manifest(
        modality, shards, version=2,
        root=new_root,
        text_field=text_field if len(tars) < len(shards) else None,
        extensions=_warn_unmapped(tars, mapping) if tars else None,
        history=list(old.history) + [_entry(old)] if old is not None else [],
    )  # fmt: skip
    if tars:  # how each tar shard was counted: a sidecar's count has no members recorded
        sidecar = sum(s.members is None for s in tars)
        m.stats = {"counted_by_sidecar": sidecar, "walked": len(tars) - sidecar}
        m.offsets = sidecar < len(tars)  # each walked shard's offsets were written
    if tokenizer:
        _add_tokenizer(m, tokenizer, out)
    elif old is not None and old.tokenizer:
        m.tokenizer, m.special_tokens = old.tokenizer, old.special_tokens
    return m


def _entry(old: Manifest) -> dict[str, Any]:
    return {"digest": old.digest, "shards": len(old.shards), "num_samples": old.num_samples}


def _same_folder(root: str, out: str) -> bool:
    if storage.is_remote(out):
        return root.rstrip("/") == out.rstrip("/")
    return os.path.abspath(out.removeprefix("file://")) == root


def _add_tokenizer(m: Manifest, tokenizer: str, out: str) -> None:
    """Copy the tokenizer beside the manifest and record its special token ids, as prepare does."""
    from darkmatter.data_pipeline.prepare.tokenizer import load_tokenizer, special_token_ids

    if m.modality != "text":
        raise PrepareError(f"--tokenizer: the dataset is {m.modality}, not text")
    url = tokenizer if tokenizer.endswith(".json") else storage.join(tokenizer, TOKENIZER)
    tok = load_tokenizer(url)  # checked before it is copied: the five tokens, [CLS] … [SEP]
    storage.makedirs(out)
    storage.write_bytes(storage.join(out, TOKENIZER), storage.read_bytes(url))
    m.tokenizer, m.special_tokens = TOKENIZER, special_token_ids(tok, url)


def _write(m: Manifest, old: Manifest | None, out: str) -> None:
    """The old manifest kept as manifest.v{N}.json, then the new one, last and atomically."""
    storage.makedirs(out)
    if old is not None:
        storage.put_atomic(out, f"manifest.v{len(old.history) + 1}.json", old.to_json().encode())
    storage.put_atomic(out, MANIFEST, m.to_json().encode())


def ensure_manifest(
    url: str, out_dir: str, fmt: str = "auto", text_field: str = "text",
    tokenizer: str | None = None, workers: int = 16,
) -> str:  # fmt: skip
    """A dataset URL with a manifest for `url`: `url` itself if it has one, else `out_dir`,
    where `url`'s files are indexed (an index already there is reused while the listing is
    unchanged, and grown when files were added)."""
    if storage.exists(storage.join(url, MANIFEST)):
        return url
    index([url], out_dir, fmt=fmt, text_field=text_field, tokenizer=tokenizer, workers=workers)
    return out_dir


# -- the command --------------------------------------------------------------------------------
def _parse_ext(values: list[str]) -> dict[str, str]:
    out = {}
    for item in filter(None, ",".join(values).split(",")):
        ext, sep, modality = item.strip().partition("=")
        if not sep or not ext or modality not in (*MODALITIES, "metadata"):
            raise PrepareError(f"--ext {item!r}: expected EXT=MODALITY, MODALITY one of "
                               f"{', '.join((*MODALITIES, 'metadata'))}")  # fmt: skip
        out[ext.lstrip(".").lower()] = modality
    return out


def cli(argv: list[str]) -> int:
    """`darkmatter index URL... --out DATASET_URL ...`"""
    p = argparse.ArgumentParser(
        prog="darkmatter index",
        description="Write a manifest for existing WebDataset shards or raw text files (jsonl, "
        "Parquet, text), where they lie: nothing is copied. Tar shards are indexed from their "
        "headers by ranged reads, or counted from the sample counts their writers left beside "
        "them where there are some (img2dataset's <shard>_stats.json, a sizes.json, a wids "
        "index .json): then one ranged read per shard. A sidecar can be wrong: a shard holding "
        "fewer samples than it says reads as trailing holes ('truncated tar'), one holding more "
        "is refused whole ('holds N samples, the manifest says M'); --walk is exact. Re-running "
        "it on a grown listing adds a dataset version.",
    )
    p.add_argument("urls", nargs="+", metavar="URL",
                   help="files, folders, globs, brace ranges ({00000..00099}) or s3:// prefixes")  # fmt: skip
    p.add_argument("--out", required=True, metavar="DATASET_URL",
                   help="where manifest.json goes (s3://, file://… or a folder)")  # fmt: skip
    p.add_argument("--checksum", action="store_true",
                   help="record each shard's sha256: reads every byte of every shard")  # fmt: skip
    p.add_argument("--ext", action="append", default=[], metavar="EXT=MODALITY,...",
                   help="map member extensions to modalities (image, text, audio, video, metadata)")  # fmt: skip
    p.add_argument("--modality", choices=MODALITIES,
                   help="the dataset's modality (default: found in the first shard's samples)")  # fmt: skip
    p.add_argument("--workers", type=int, default=16, metavar="N",
                   help="files indexed at once (threads; default %(default)s)")  # fmt: skip
    p.add_argument("--format", default="auto", choices=list(FORMATS),
                   help="the files' format (default: by extension)")  # fmt: skip
    p.add_argument("--text-field", default="text", metavar="NAME",
                   help="jsonl key / Parquet column of the text (default %(default)s)")  # fmt: skip
    p.add_argument("--tokenizer", metavar="PATH",
                   help="text: a tokenizer.json to copy beside the manifest (else data.tokenizer)")  # fmt: skip
    count = p.add_mutually_exclusive_group()
    count.add_argument("--walk", dest="counting", action="store_const", const="walk",
                       default="sidecar",
                       help="count every tar shard from its headers (exact), not from sidecars")  # fmt: skip
    count.add_argument("--sidecar-only", dest="counting", action="store_const",
                       const="sidecar-only",
                       help="take sidecar counts without reading the shards at all (by default "
                       "one ranged read of each checks it is a tar)")  # fmt: skip
    p.add_argument("--rebuild", action="store_true",
                   help="index afresh even where the listing changed under an earlier index")  # fmt: skip
    try:
        args = p.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse already printed
        return int(e.code or 0)
    try:
        m = index(args.urls, args.out, checksum=args.checksum, extensions=_parse_ext(args.ext),
                  modality=args.modality, workers=args.workers, fmt=args.format,
                  text_field=args.text_field, tokenizer=args.tokenizer, rebuild=args.rebuild,
                  counting=args.counting)  # fmt: skip
    except (PrepareError, storage.StorageError, OSError) as e:
        print(f"darkmatter index: error: {e}", file=sys.stderr)
        return 2
    grown = f" (version {len(m.history) + 1})" if m.history else ""
    print(f"indexed {m.num_samples} {m.modality} samples in {len(m.shards)} units at "
          f"{args.out}{grown}")  # fmt: skip
    return 0
