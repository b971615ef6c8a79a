"""Indexing existing WebDataset shards in place: `darkmatter index` from the shard writers'
sidecar counts and by walking tar headers, against downloading every shard whole, on a local
SeaweedFS S3 server, same threads for all.

Writes N shards in img2dataset's layout: `{shard:05d}.tar` (per sample, key shard*10^4+i: a
.jpg of ~--member-kb, a caption .txt and a .json), `{shard:05d}_stats.json` ({"count",
"successes", "failed_to_download", ...}) and `{shard:05d}.parquet` (one row per sample
attempted, with its status). Then times, side by side:
  * index_sidecar: `index(prefix)` as users run it: the listing, each shard counted by its
                   _stats.json (all read concurrently by one fsspec cat), one 64 KiB ranged GET
                   of each shard's first window (a tar?), and the first shard walked;
  * index_sizes:   the same folder as an OpenCLIP-style one (the _stats.json files replaced by
                   one sizes.json), and with --sidecar-only (no read per shard);
  * index_walk:    `--walk` (every header, one GET per window) over the first --walk-shards
                   shards: walking all of them costs ~S GETs per shard of S samples, minutes at
                   1000 shards here, so `ratio_walk` compares per-shard times;
  * download:      every shard fetched whole (8 MiB reads), as a reader that indexes by
                   fetching would.
and prints one JSON line: {"bench": "index_shards", "shards", "bytes", "index_sidecar_s",
"index_sizes_s", "index_sizes_only_s", "index_walk_s", "walk_shards", "download_s", "ratio"
(download_s / index_sidecar_s), "ratio_sizes", "ratio_walk" (per shard), "gets_per_shard_walk",
"gets_per_shard_sidecar" (ranged reads and sidecar files read, per shard), ...}.

The default shard: 256 samples of ~40 KB jpgs (+ caption and json), ~10.5 MB. img2dataset's
defaults write 256 px images at quality 95 (~20-40 KB each) in shards of 10000 samples (~300
MB); 1000 shards of that (300 GB) do not fit this 2-core machine, so the shards here hold fewer
samples of the same kind of image: 1000 of them (~10 GB) write in a few minutes. That choice
flatters no side: the walk costs a GET per ~1.5 samples whatever the shard size; a sidecar index
costs ~2 small GETs per shard and the download the shard's bytes, so the sidecar ratio grows
with shard size, and img2dataset's real shards, ~30x larger, give a ~30x higher one.

    python bench/index_shards.py                   # 1000 shards (~10 GB on the local server)
    python bench/index_shards.py --shards 200      # a quicker full-size run
    python bench/index_shards.py --smoke           # 20 small shards, seconds (+ the stack's
                                                   # start; --no-stack uses a running one)
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from _common import log  # noqa: E402

BUCKET = "s3://bench-index"


def shard_bytes(shard: int, samples: int, member_kb: int, payload: bytes) -> bytes:
    """One tar shard as img2dataset writes it: key.jpg, key.txt, key.json per sample; the jpgs
    vary from 0.75x to 1.25x member_kb, as encoded images do."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for i in range(samples):
            key = f"{shard:05d}{i:04d}"
            caption = f"a photo number {i} of shard {shard}".encode()
            meta = json.dumps({"key": key, "caption": caption.decode(), "width": 256,
                               "status": "success"}).encode()  # fmt: skip
            jpg = payload[: (member_kb << 10) * (3 + (i * 7919) % 3) // 4]
            for ext, data in (("jpg", jpg), ("txt", caption), ("json", meta)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 1_700_000_000
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sidecars(shard: int, samples: int) -> tuple[bytes, bytes]:
    """img2dataset's <shard>_stats.json and <shard>.parquet: 2 failed downloads per shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    stats = {"count": samples + 2, "successes": samples, "failed_to_download": 2,
             "failed_to_resize": 0, "status_dict": {"success": samples}}  # fmt: skip
    keys = [f"{shard:05d}{i:04d}" for i in range(samples + 2)]
    status = ["success"] * samples + ["failed_to_download"] * 2
    buf = io.BytesIO()
    pq.write_table(pa.table({"key": keys, "status": status}), buf)
    return json.dumps(stats).encode(), buf.getvalue()


def write_shards(prefix: str, n: int, samples: int, member_kb: int, workers: int) -> int:
    """n shards and their sidecars under prefix; returns the shards' total bytes."""
    import numpy as np

    from darkmatter import storage

    payload = np.random.default_rng(0).bytes(member_kb << 11)  # incompressible, like a jpg
    fs, _ = storage.filesystem(prefix)

    def put(i: int) -> int:
        data = shard_bytes(i, samples, member_kb, payload)
        stats, table = sidecars(i, samples)
        files = {f"{prefix[5:]}/{i:05d}.tar": data, f"{prefix[5:]}/{i:05d}_stats.json": stats,
                 f"{prefix[5:]}/{i:05d}.parquet": table}  # fmt: skip
        storage.with_retries(lambda: fs.pipe(files), "put")
        return len(data)

    with ThreadPoolExecutor(workers) as pool:
        return sum(pool.map(put, range(n)))


def as_open_clip(prefix: str, n: int, samples: int) -> None:
    """The folder as OpenCLIP's tooling leaves it: one sizes.json, no per-shard sidecars."""
    from darkmatter import storage

    fs, _ = storage.filesystem(prefix)
    fs.rm([f"{prefix[5:]}/{i:05d}{suffix}" for i in range(n) for suffix in ("_stats.json",
                                                                             ".parquet")])  # fmt: skip
    sizes = {f"{i:05d}.tar": samples for i in range(n)}
    storage.write_bytes(f"{prefix}/sizes.json", json.dumps(sizes).encode())


class Reads:
    """Counts what index reads: ranged GETs of shards, sidecar files."""

    def __init__(self) -> None:
        from darkmatter.data_pipeline import index as index_mod

        self.mod, self.ranged, self.files = index_mod, 0, 0
        self._range, self._json = index_mod._read_range, index_mod._read_json

    def __enter__(self) -> Reads:
        def ranged(*a: Any) -> bytes:
            self.ranged += 1  # one at a time under the GIL: += on an int is not torn here
            return bytes(self._range(*a))

        def files(urls: list[str]) -> dict[str, Any]:
            self.files += len(urls)
            return dict(self._json(urls))

        self.mod._read_range, self.mod._read_json = ranged, files
        return self

    def __exit__(self, *exc: object) -> None:
        self.mod._read_range, self.mod._read_json = self._range, self._json


def time_index(urls: list[str], out: str, workers: int, counting: str) -> tuple[float, Any, Reads]:
    from darkmatter.data_pipeline.index import index

    with Reads() as reads:
        t0 = time.perf_counter()
        m = index(urls, out, workers=workers, rebuild=True, counting=counting)
        return time.perf_counter() - t0, m, reads


def time_download(prefix: str, workers: int) -> float:
    """Every shard read whole, in 8 MiB ranged reads (as the reader's fetch does)."""
    from darkmatter import storage

    urls = [u for u in storage.list_files(prefix) if u.endswith(".tar")]
    t0 = time.perf_counter()

    def get(url: str) -> int:
        n = 0
        with storage.open_url(url, "rb", cache_type="none") as f:
            while chunk := f.read(8 << 20):
                n += len(chunk)
        return n

    with ThreadPoolExecutor(workers) as pool:
        total = sum(pool.map(get, urls))
    assert total > 0
    return time.perf_counter() - t0


def check(m: Any, shards: int, samples: int, sidecar: bool) -> None:
    assert len(m.shards) == shards and m.num_samples == shards * samples, m.num_samples
    assert m.modality == "image", m.modality
    want = {"counted_by_sidecar": shards - 1, "walked": 1} if sidecar else {
        "counted_by_sidecar": 0, "walked": shards}  # fmt: skip
    assert m.stats == want, m.stats


def run(args: argparse.Namespace) -> dict[str, Any]:
    from darkmatter import storage

    storage.make_bucket(BUCKET)
    prefix, out = f"{BUCKET}/shards", f"{BUCKET}/index"
    n, per, w = args.shards, args.samples_per_shard, args.workers
    walk_n = min(n, args.walk_shards)
    log(f"writing {n} shards of {per} x ~{args.member_kb} KB, img2dataset's layout")
    total = write_shards(prefix, n, per, args.member_kb, w)
    log(f"wrote {total / 2**30:.2f} GiB; indexing from the _stats.json sidecars")
    sidecar_s, m, sidecar_reads = time_index([prefix], out, w, "sidecar")
    check(m, n, per, sidecar=True)
    log(f"{sidecar_s:.2f} s; walking the headers of {walk_n} shards")
    walk_urls = [f"{prefix}/{{00000..{walk_n - 1:05d}}}.tar"]
    walk_s, m, walk_reads = time_index(walk_urls, f"{out}-walk", w, "walk")
    check(m, walk_n, per, sidecar=False)
    log(f"{walk_s:.2f} s; downloading every shard")
    download_s = time_download(prefix, w)
    log(f"{download_s:.2f} s; indexing from one sizes.json")
    as_open_clip(prefix, n, per)
    sizes_s, m, _ = time_index([prefix], f"{out}-sizes", w, "sidecar")
    check(m, n, per, sidecar=True)
    sizes_only_s, m, _ = time_index([prefix], f"{out}-sizes-only", w, "sidecar-only")
    check(m, n, per, sidecar=True)
    # The ratios from the figures as printed, so the line checks against itself.
    download_s, sidecar_s, sizes_s, sizes_only_s, walk_s = (
        round(t, 3) for t in (download_s, sidecar_s, sizes_s, sizes_only_s, walk_s)
    )
    return {
        "bench": "index_shards", "shards": n, "bytes": total, "samples_per_shard": per,
        "member_kb": args.member_kb, "workers": w,
        "index_sidecar_s": round(sidecar_s, 3), "index_sizes_s": round(sizes_s, 3),
        "index_sizes_only_s": round(sizes_only_s, 3), "index_walk_s": round(walk_s, 3),
        "walk_shards": walk_n, "download_s": round(download_s, 3),
        "ratio": round(download_s / sidecar_s, 2), "ratio_sizes": round(download_s / sizes_s, 2),
        "ratio_sizes_only": round(download_s / sizes_only_s, 2),
        "ratio_walk": round((download_s / n) / (walk_s / walk_n), 3),
        "gets_per_shard_walk": round(walk_reads.ranged / walk_n, 2),
        "gets_per_shard_sidecar": round((sidecar_reads.ranged + sidecar_reads.files) / n, 2),
        "machine": _common.machine(),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--shards", type=int, default=1000, help="shards to write and index")
    ap.add_argument("--samples-per-shard", type=int, default=256, help="samples per shard")
    ap.add_argument("--member-kb", type=int, default=40, help="mean size of a jpg member, KiB")
    ap.add_argument("--walk-shards", type=int, default=50,
                    help="shards the header walk is timed on (default %(default)s)")  # fmt: skip
    ap.add_argument("--workers", type=int, default=16, help="threads, for every side")
    ap.add_argument("--smoke", "--quick", action="store_true",
                    help="20 shards of 8 x 256 KB: seconds, for the smoke test")  # fmt: skip
    ap.add_argument("--no-stack", action="store_true",
                    help="use the S3 server the environment names (AWS_ENDPOINT_URL) instead of "
                    "starting a private stack (~20 s)")  # fmt: skip
    args = ap.parse_args(argv)
    if args.smoke:
        args.shards, args.samples_per_shard, args.member_kb, args.walk_shards = 20, 8, 256, 20
    if args.no_stack:
        result = run(args)
    else:
        with _common.workdir("darkmatter-bench-index-") as root, _common.local_stack(root):
            result = run(args)
    _common.emit(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
