"""Decoded samples/s: our streaming reader (DataStream) vs a plain webdataset pipeline.

Both read THE SAME shards from THE SAME local S3 server (SeaweedFS, started here on free ports),
text (the input_ids .npy decoded to int32) and images (JPEG decoded to RGB uint8 HxWx3), with
  * 2 DataLoader worker processes each, world size 1;
  * the same total shuffle buffer: ours holds `shuffle_buffer` raw samples in each of its 64
    partitions (64 x 16 = 1024 in all, 512 per worker); webdataset's `.shuffle(512,
    initial=512)` runs in each of its 2 workers (1024 in all), raw bytes before decoding in both;
  * the same samples per message from a worker (half a 64-sample batch: one "piece" of ours,
    `.batched(32)` for webdataset) and the DataLoader's prefetch_factor 2;
  * the same number of samples consumed (one epoch of ours), every one of them decoded, and
    no other member decoded (webdataset's `.decode(..., only=...)`);
  * shard order shuffled per run in both (ours: its epoch permutation; webdataset:
    `shardshuffle`), the run's seed for both.
Webdataset 1.0 has no s3:// opener of its own; one is registered in `gopen_schemes` that opens
the object with fsspec/s3fs (the same client our reader uses), streaming it.
Our reader does more per byte by design: it fetches each shard whole into a local cache, checks
its sha256, indexes its tar headers and reads members by offset; a DataLoader worker (slot) of
ours owns every other partition and fetches every shard that holds samples of them (with fewer
shards than partitions, as here: every shard, in both workers).

A run is timed from building the reader (ours reads manifest.json) to the last sample, worker
start-up included; a warm-up run of each comes first, then repetitions of the two interleaved
(A B, B A, ...), and the medians are reported with their ratio (ours / webdataset). Also
reported: the time to the first batch, the rate after it (`after_first`), and the MiB of shards
our workers fetched (`ours_fetched_mib`, vs `dataset_mib`).

`--profile` instead runs both in-process (num_workers=0) under cProfile and prints where the
time goes. `--quick` is a small run for smoke tests.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from _common import log  # noqa: E402

PARTITIONS = 64
MICRO_BATCH = 64
WORKERS = 2


# -- webdataset over S3 ----------------------------------------------------------------------


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> Any:
    """webdataset's opener for s3:// URLs: the object through fsspec/s3fs, streamed."""
    from darkmatter import storage

    return storage.open_url(url, mode)


def _register_s3_opener() -> None:
    import importlib

    # `webdataset.gopen` is also the name of a function the package exports: take the module.
    importlib.import_module("webdataset.gopen").gopen_schemes["s3"] = _gopen_s3


def _npy_ids(key: str, data: bytes) -> Any:
    """webdataset decoder for the text member, the same work as our reader's decode()."""
    import numpy as np

    if key != "input_ids.npy":
        return None
    ids = np.load(io.BytesIO(data), allow_pickle=False)
    return ids.astype(np.int32, copy=False)


def webdataset_loader(urls: list[str], modality: str, buffer: int, per_msg: int, seed: int,
                      workers: int) -> Any:  # fmt: skip
    import torch.utils.data
    import webdataset as wds

    _register_s3_opener()
    ds = wds.WebDataset(
        urls, shardshuffle=len(urls), seed=seed, handler=wds.reraise_exception,
        empty_check=False,
    ).shuffle(buffer, initial=buffer)  # fmt: skip
    if modality == "text":
        ds = ds.decode(_npy_ids, only=["input_ids.npy"])
    else:
        ds = ds.decode("rgb8", only=["jpg", "jpeg", "png", "webp"])
    ds = ds.batched(per_msg, collation_fn=None, partial=True)
    if workers == 0:
        return iter(ds)
    # collate_fn as ours: batches stay lists of numpy samples (the default would convert).
    loader = torch.utils.data.DataLoader(
        ds, batch_size=None, num_workers=workers, collate_fn=_identity, prefetch_factor=2
    )
    return iter(loader)


def _identity(x: Any) -> Any:
    return x


class Run(NamedTuple):
    """One timed run: seconds to the first batch and to the last sample, and counters."""

    first_s: float
    total_s: float
    counters: dict[str, float]


def run_webdataset(urls: list[str], modality: str, samples: int, buffer: int, seed: int,
                   workers: int = WORKERS) -> Run:  # fmt: skip
    """Consume `samples` decoded samples from a fresh webdataset pipeline."""
    t0 = time.perf_counter()
    it = webdataset_loader(urls, modality, buffer, MICRO_BATCH // max(1, workers), seed, workers)
    n, first = 0, 0.0
    key = "input_ids.npy" if modality == "text" else "jpg"
    try:
        while n < samples:
            batch = next(it)[: samples - n]  # the last one may give more than needed
            for sample in batch:
                assert sample[key] is not None
            n += len(batch)
            first = first or time.perf_counter() - t0
        total = time.perf_counter() - t0
    finally:
        if hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
    if n != samples:
        raise RuntimeError(f"webdataset gave {n} samples, wanted {samples}")
    return Run(first, total, {})


# -- ours ------------------------------------------------------------------------------------


def make_stream(url: str, shuffle_buffer: int, seed: int, cache: Path, workers: int = WORKERS):  # type: ignore[no-untyped-def]
    from darkmatter.data_pipeline.reader import DataStream, ReaderOptions

    return DataStream(
        url, rank=0, world_size=1, micro_batch_size=MICRO_BATCH, num_workers=workers,
        seed=seed, partitions=PARTITIONS,
        options=ReaderOptions(shuffle_buffer=shuffle_buffer, cache_dir=str(cache)),
    )  # fmt: skip


def run_ours(url: str, modality: str, samples: int, shuffle_buffer: int, seed: int, cache: Path,
             workers: int = WORKERS) -> Run:  # fmt: skip
    """Consume `samples` decoded samples from a fresh DataStream (manifest read included)."""
    # A cold shard cache for every run, as webdataset streams every run from S3.
    cache = Path(tempfile.mkdtemp(dir=cache))
    t0 = time.perf_counter()
    stream = make_stream(url, shuffle_buffer, seed, cache, workers)
    n, first = 0, 0.0
    key = "input_ids" if modality == "text" else "image"
    try:
        while n < samples:
            for micro in stream.next_step():
                for sample in micro:
                    assert sample[key] is not None
                n += len(micro)
            first = first or time.perf_counter() - t0
        total = time.perf_counter() - t0
        counters = stream.summary()
    finally:
        stream.close()
        shutil.rmtree(cache, ignore_errors=True)
    if n != samples or counters["skipped"]:
        raise RuntimeError(f"ours gave {n} samples ({counters['skipped']} skipped), not {samples}")
    return Run(first, total, counters)


# -- data ------------------------------------------------------------------------------------


def prepare_datasets(root: Path, modalities: list[str], text_docs: int, images: int,
                     shard_bytes: int) -> dict[str, Any]:  # fmt: skip
    """Datasets on S3; per modality its url, shard urls, sample count and size."""
    from darkmatter.data_pipeline.prepare import prepare
    from darkmatter.data_pipeline.reader import Manifest

    out: dict[str, Any] = {}
    for modality in modalities:
        if modality == "text":
            log(f"writing {text_docs} synthetic documents")
            inputs = [str(_common.write_text_corpus(root / "corpus.txt", text_docs))]
        else:
            log(f"writing {images} synthetic JPEG images")
            inputs = [str(_common.write_images(root / "images", images))]
        url = f"s3://darkmatter/bench/{modality}"
        t0 = time.perf_counter()
        prepare(inputs, url, modality=modality, vocab_size=4000, shard_bytes=shard_bytes)
        m = Manifest.load(url)
        log(
            f"prepared {modality}: {m.num_samples} samples in {len(m.shards)} shards of "
            f"~{sum(s.bytes for s in m.shards) / len(m.shards) / 2**20:.1f} MiB "
            f"in {time.perf_counter() - t0:.0f} s"
        )
        out[modality] = {
            "url": url,
            "shards": [f"{url}/{s.name}" for s in m.shards],
            "num_samples": m.num_samples,
            "num_shards": len(m.shards),
            "mib": round(sum(s.bytes for s in m.shards) / 2**20, 1),
        }
    return out


# -- main ------------------------------------------------------------------------------------


def measure(ds: dict[str, Any], modality: str, reps: int, shuffle_buffer: int, cache: Path,
            samples: int) -> dict[str, Any]:  # fmt: skip
    buffer = PARTITIONS * shuffle_buffer // WORKERS  # per webdataset worker: the same total
    runs: dict[str, list[Run]] = {"ours": [], "webdataset": []}
    fns = {
        "ours": lambda seed: run_ours(ds["url"], modality, samples, shuffle_buffer, seed, cache),
        "webdataset": lambda seed: run_webdataset(ds["shards"], modality, samples, buffer, seed),
    }
    log(f"{modality}: {samples} samples per run, a warm-up run of each, then {reps} reps each")
    for name, fn in fns.items():
        r = fn(1000)
        log(f"  warm-up {name}: {r.total_s:.2f} s ({r.first_s:.2f} s to the first batch)")
    for rep in range(reps):
        order = list(fns) if rep % 2 == 0 else list(reversed(fns))
        for name in order:
            r = fns[name](rep)
            runs[name].append(r)
            log(
                f"  rep {rep} {name}: {r.total_s:.2f} s, {samples / r.total_s:.0f} samples/s, "
                f"{r.first_s:.2f} s to the first batch"
            )
    med = {name: _common.median([r.total_s for r in rs]) for name, rs in runs.items()}
    first = {name: _common.median([r.first_s for r in rs]) for name, rs in runs.items()}
    # After the first batch: samples/s once the pipeline is full (the first batch excluded).
    after = {
        name: _common.median([(samples - MICRO_BATCH) / (r.total_s - r.first_s) for r in rs])
        for name, rs in runs.items()
    }
    last = runs["ours"][-1].counters
    return {
        "ours_samples_per_s": round(samples / med["ours"], 1),
        "webdataset_samples_per_s": round(samples / med["webdataset"], 1),
        "ratio": round(med["webdataset"] / med["ours"], 3),
        "ours_first_batch_s": round(first["ours"], 2),
        "webdataset_first_batch_s": round(first["webdataset"], 2),
        "ours_after_first_samples_per_s": round(after["ours"], 1),
        "webdataset_after_first_samples_per_s": round(after["webdataset"], 1),
        "after_first_ratio": round(after["ours"] / after["webdataset"], 3),
        "ours_s": [round(r.total_s, 2) for r in runs["ours"]],
        "webdataset_s": [round(r.total_s, 2) for r in runs["webdataset"]],
        "samples": samples,
        "shards": ds["num_shards"],
        "dataset_mib": ds["mib"],
        "ours_fetched_mib": round(last["bytes_read"] / 2**20, 1),
    }


def profile(ds: dict[str, Any], modality: str, shuffle_buffer: int, cache: Path,
            samples: int) -> None:  # fmt: skip
    """Both readers in-process (num_workers=0) under cProfile, then the cost of each stage of
    our shard pipeline (download, sha256, write, tar index) shard by shard; to stderr."""
    import hashlib

    from darkmatter import storage
    from darkmatter.data_pipeline.reader import LocalShard

    buffer = PARTITIONS * shuffle_buffer  # one process holds the whole buffer in both
    for name, fn in (
        ("ours", lambda: run_ours(ds["url"], modality, samples, shuffle_buffer, 0, cache, 0)),
        ("webdataset", lambda: run_webdataset(ds["shards"], modality, samples, buffer, 0, 0)),
    ):
        prof = cProfile.Profile()
        prof.enable()
        r = fn()
        prof.disable()
        print(f"\n===== {modality} / {name}: {r.total_s:.2f} s, {samples / r.total_s:.0f} "
              f"samples/s, first batch {r.first_s:.2f} s (in-process; the profile sees the "
              "main thread only)", file=sys.stderr)  # fmt: skip
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(15)
        print(out.getvalue(), file=sys.stderr)
    stages = dict.fromkeys(("download", "sha256", "write", "tar_index"), 0.0)
    path = cache / "profile.tar"
    cache.mkdir(parents=True, exist_ok=True)
    members = 0
    for url in ds["shards"]:
        t0 = time.perf_counter()
        with storage.open_url(url, "rb", cache_type="none") as f:
            data = f.read()
        t1 = time.perf_counter()
        hashlib.sha256(data).hexdigest()
        t2 = time.perf_counter()
        path.write_bytes(data)
        t3 = time.perf_counter()
        local = LocalShard(url, str(path), 1 << 30)
        local.index(1 << 30)
        t4 = time.perf_counter()
        members += sum(len(m) for m in local.members)
        for k, v in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            stages[k] += v
    path.unlink()
    print(f"===== {modality}: our shard pipeline, {len(ds['shards'])} shards "
          f"({ds['mib']} MiB, {members} members), one thread: "
          + ", ".join(f"{k} {v:.2f} s" for k, v in stages.items()), file=sys.stderr)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small, fast run (smoke test)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions of each reader")
    ap.add_argument("--modality", choices=["text", "image", "both"], default="both")
    ap.add_argument("--shuffle-buffer", type=int, default=16, help="per partition (64 of them)")
    ap.add_argument("--profile", action="store_true", help="cProfile both in-process instead")
    ap.add_argument("--text-docs", type=int, default=None, help="text samples to generate")
    ap.add_argument("--images", type=int, default=None, help="images to generate")
    ap.add_argument("--shard-mib", type=float, default=None, help="prepare's shard size")
    args = ap.parse_args(argv)
    if args.quick:
        text_docs, images, shard_mib, reps = 6_000, 1_500, 1.0, 1
    else:
        text_docs, images, shard_mib, reps = 40_000, 24_000, 4.0, 3
    text_docs = args.text_docs or text_docs
    images = args.images or images
    shard_bytes = int((args.shard_mib or shard_mib) * 2**20)
    reps = args.reps or reps
    modalities = ["text", "image"] if args.modality == "both" else [args.modality]
    started = time.perf_counter()
    with _common.workdir("darkmatter-bench-throughput-") as root, _common.local_stack(root):
        data = prepare_datasets(root, modalities, text_docs, images, shard_bytes)
        cache = root / "cache"
        cache.mkdir()
        result: dict[str, Any] = {"bench": "data_throughput"}
        for modality in modalities:
            ds = data[modality]
            # Whole steps of our reader: one epoch.
            usable = ds["num_samples"] // PARTITIONS * PARTITIONS
            samples = usable // MICRO_BATCH * MICRO_BATCH
            if args.profile:
                profile(ds, modality, args.shuffle_buffer, cache, samples)
                continue
            result[modality] = measure(ds, modality, reps, args.shuffle_buffer, cache, samples)
    if args.profile:
        return 0
    ratios = [result[m]["ratio"] for m in modalities]
    result.update(
        ratio=min(ratios),
        workers=WORKERS,
        shuffle_buffer_total=PARTITIONS * args.shuffle_buffer,
        samples={m: result[m]["samples"] for m in modalities},
        reps=reps,
        quick=args.quick,
        machine=_common.machine(),
        wall_s=round(time.perf_counter() - started, 1),
    )
    _common.emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
