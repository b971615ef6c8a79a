"""Peer loaders: our reader vs webdataset, mosaicml-streaming and litdata, one S3 server, one run.

Ours is DataStream (data_pipeline/reader).

Data. One synthetic image set (`--samples`, default 20,000): JPEGs (quality 90) of 256 x 256
RGB, each a random gradient and sine pattern with noise drawn from (seed, index), so every image
costs about what a photo of that size costs to decode and all are about the same bytes (~22 kB).
Nothing is downloaded. The set is written once per format to the local S3 server (SeaweedFS,
started here on free ports), shards of `--shard-mib` (at most 1/8 of the set) in every format:
  * WebDataset tar shards (`<key>.jpg` members), read by plain webdataset and by us: indexed in
    place by `darkmatter index` (its defaults: no --checksum), nothing copied;
  * MDS shards (mosaicml-streaming's MDSWriter, columns key:str and jpg:bytes, no compression);
  * litdata chunks (`litdata.optimize`, items {key, jpg bytes}, no compression).

Reading. Every library reads with the same number of loader worker processes (`--workers`,
default 2), the same global batch (64), the shuffling it offers turned on, an empty local cache,
and the same work per sample: Pillow's JPEG decode and bilinear resize to 224 x 224 (uint8),
the batch stacked by numpy (channels first as a torch view). The peers decode and resize in
their DataLoader workers; ours decodes in its workers (DataStream's own decode) and resizes
there too (ReaderOptions.transform), and streams the shards by range (the sample offsets
`index` wrote). `--profile` adds ours as it was before each of those: `ours-resize-here` (no
transform: the training process resizes what the workers ship) and `ours-whole-shards`
(range_reads off: whole shards into the cache).
Per library and repetition, in a fresh process (peak memory is per process tree):
  * `samples_per_s`: samples after the first batch over the time from the first batch to the
    last of one epoch (steady state; `epoch_samples_per_s` counts from building the loader);
  * `first_batch_s`: building the loader (its index or manifest read) to the first batch;
  * `resume_s`: the loader's state saved at 50% of the epoch (after floor(N / 64 / 2) batches),
    a new loader with an empty cache restored from it, time to its first batch; `resume_exact`:
    that batch is the one the uninterrupted epoch got. Plain webdataset has no state: its resume
    is what a user can do, the same seeded pipeline told to skip what each worker gave (a stage
    before decoding; the DataLoader takes batches from its workers in turn), reading through it;
  * `peak_rss_mib` (and `peak_pss_mib`, which counts pages shared by forked workers once): the
    largest sum over the process tree (the process and its loader workers), sampled every
    0.2 s through the epoch and the resume;
  * `cpu_ms_per_sample`: user + system CPU of the process tree over the epoch, per sample (on a
    small or shared machine a steadier measure of the work than samples/s).
Repetitions run in alternating order (A B C D, D C B A, ...); medians are reported.

Elasticity 2 -> 1 (child_elastic): two ranks (two processes, torch.distributed gloo, RANK /
WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE set as torchrun sets them) read 32 samples each per
step of the same global batch 64; after 50% of the epoch's steps each saves its state and goes on
to the end (the uninterrupted epoch: the reference). Then one process at world size 1 resumes
from the saved states, as each library documents (ours: `load_state_dict` of every rank's state;
mosaicml-streaming and litdata: rank 0's `StreamingDataLoader.state_dict()`; webdataset: the
samples both ranks consumed, skipped), and reads to the end of the epoch. Repeats and skips are
counted by sample key against the reference's multiset: `exactly once`, `repeats`, `skips` or
`unsupported` (the library refused the state).

Requests (count_requests). Each library's epoch and resume run once more, through an HTTP proxy
in front of the S3 server (tests/faultproxy.py, no faults) that logs every request: GETs of
shards and of index files, HEADs, LISTs, per epoch and per resume.

Settings a peer needs here, each explained where it is made: litdata's obstore client is
allowed plain http:// (the local server's), and its dataset has drop_last=True at every world
size (it refuses a state saved with another drop_last); mosaicml-streaming's S3 client is made
again in each forked worker (shared, a read stalls for its 60 s timeout now and then), and
torchvision, which its package imports, is stood in for where it is missing.

Output: one JSON line per library, then a summary line with `ratio_vs_best_peer` (our
samples/s / the best peer's) and `resume_vs_best_peer` (our resume time / the best peer's).
`--quick` (`--samples 200`) is a smoke run. The peers are benchmark dependencies (the `bench`
extra); `--libraries` picks some.
"""

from __future__ import annotations

import abc
import argparse
import contextlib
import importlib
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from _common import log  # noqa: E402

LIBRARIES = ("ours", "webdataset", "mosaicml-streaming", "litdata")
PEERS = LIBRARIES[1:]
PROFILE_ROWS = ("ours-resize-here", "ours-whole-shards")  # `--profile`: ours as it was before
BATCH = 64  # the global batch: 64 at world size 1, 32 per rank at world size 2
IMAGE_SIZE = 256  # the stored JPEGs
RESIZE = 224  # what every loader hands the model
PARTITIONS = 64  # ours
SHUFFLE_BUFFER = 16  # ours, per partition (1024 in all), as bench/data_throughput.py
WDS_BUFFER = 512  # webdataset, per worker (1024 in all with 2 workers)
BUCKET = "s3://darkmatter"  # the private stack's bucket
Batch = tuple[list[str], Any]  # (sample keys, uint8 [B, 3, 224, 224] tensor or None)


# -- the work per sample ---------------------------------------------------------------------


def decode_resize(data: bytes) -> Any:
    """JPEG bytes -> uint8 [224, 224, 3] array: Pillow decode, RGB, bilinear resize."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        small = im.convert("RGB").resize((RESIZE, RESIZE), Image.Resampling.BILINEAR)
    return np.asarray(small, dtype=np.uint8)


def resize_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Ours: the reader's per-sample transform, run in its workers after the decode."""
    sample["image"] = resize_array(sample["image"])
    return sample


def resize_array(arr: Any) -> Any:
    """Ours: a decoded uint8 [H, W, 3] array -> uint8 [224, 224, 3], as decode_resize does."""
    import numpy as np
    from PIL import Image

    small = Image.fromarray(arr).resize((RESIZE, RESIZE), Image.Resampling.BILINEAR)
    return np.asarray(small, dtype=np.uint8)


def collate(items: list[tuple[str, Any]]) -> Batch:
    """(key, image or None) pairs -> (keys, uint8 tensor [B, 3, 224, 224] or None): the arrays
    stacked by numpy (one copy, one thread, wherever it runs), channels first as a view."""
    import numpy as np
    import torch

    keys = [k for k, _ in items]
    images = [im for _, im in items if im is not None]
    return keys, (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) if images else None)


# -- data ------------------------------------------------------------------------------------


def jpeg(index: int, seed: int, size: int = IMAGE_SIZE) -> bytes:
    """Image `index` of the set: a random gradient and sine pattern with noise, quality 90."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng([seed, index])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    a, b, c = rng.uniform(-1, 1, size=3)
    freq = rng.uniform(1, 4)
    base = 0.5 + 0.25 * (a * xx + b * yy + c * np.sin(6.28 * freq * (xx + yy)))
    tint = rng.uniform(0.3, 1.0, size=3).astype(np.float32)
    img = base[..., None] * tint + rng.normal(0, 0.04, size=(size, size, 3)).astype(np.float32)
    out = io.BytesIO()
    Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8), "RGB").save(out, "JPEG",
                                                                             quality=90)  # fmt: skip
    return out.getvalue()


def _jpegs(args: tuple[int, int, int]) -> list[bytes]:
    lo, hi, seed = args
    return [jpeg(i, seed) for i in range(lo, hi)]


def generate(n: int, seed: int) -> list[bytes]:
    """The `n` JPEGs of the set, generated on every CPU (deterministic: a pure function of
    (seed, index))."""
    import multiprocessing as mp

    step = 500
    jobs = [(lo, min(n, lo + step), seed) for lo in range(0, n, step)]
    with mp.get_context("fork").Pool(os.cpu_count() or 1) as pool:
        return [b for part in pool.map(_jpegs, jobs) for b in part]


def key_of(i: int) -> str:
    return f"{i:08d}"


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """File descriptor 1 goes to 2 for the block (the peers' writers print progress to stdout,
    which is this script's results)."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def write_webdataset(images: list[bytes], url: str, shard_bytes: int, root: Path) -> dict[str, Any]:
    """Tar shards of `<key>.jpg` members at `url`, indexed in place for our reader (`darkmatter
    index`, default options: the manifest beside the shards, no sha256)."""
    import tarfile

    from darkmatter import storage
    from darkmatter.data_pipeline.index import index

    local = root / "wds"
    local.mkdir()
    groups: list[list[int]] = [[]]  # sample indices per shard, each ~shard_bytes of tar
    size = 0
    for i, data in enumerate(images):
        if size >= shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += len(data) + 1024  # its 512-byte header and padding, rounded up
    shards = [f"shard-{k:06d}.tar" for k in range(len(groups))]
    for name, group in zip(shards, groups, strict=True):
        with tarfile.open(local / name, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in group:
                member = tarfile.TarInfo(f"{key_of(i)}.jpg")
                member.size, member.mtime, member.mode = len(images[i]), 0, 0o644
                tar.addfile(member, io.BytesIO(images[i]))
    for name in shards:
        storage.put_file(str(local / name), f"{url}/{name}")
        (local / name).unlink()
    manifest = index([f"{url}/"], url)
    return {"url": url, "shards": [f"{url}/{n}" for n in shards], "objects": len(shards),
            "manifest_bytes": len(storage.read_bytes(f"{url}/manifest.json")),
            "samples": manifest.num_samples}  # fmt: skip


def write_mds(images: list[bytes], url: str, shard_bytes: int, root: Path) -> dict[str, Any]:
    """MDS shards (key: str, jpg: bytes, uncompressed) written by MDSWriter to `url`."""
    import_streaming()
    from streaming import MDSWriter

    from darkmatter import storage

    columns = {"key": "str", "jpg": "bytes"}
    with MDSWriter(out=(str(root / "mds"), url), columns=columns, size_limit=shard_bytes) as w:
        for i, data in enumerate(images):
            w.write({"key": key_of(i), "jpg": data})
    return {"url": url, "objects": len(storage.list_files(url)) - 1}


def _litdata_item(i: int) -> dict[str, Any]:
    return {"key": key_of(i), "jpg": _LITDATA_IMAGES[i]}


_LITDATA_IMAGES: list[bytes] = []  # what optimize's forked worker reads


def write_litdata(images: list[bytes], url: str, shard_bytes: int) -> dict[str, Any]:
    """litdata chunks of {key, jpg bytes} written by `litdata.optimize` to `url` (one forked
    worker: the chunks hold the samples in key order)."""
    litdata = import_litdata()
    from darkmatter import storage

    _LITDATA_IMAGES[:] = images
    try:
        litdata.optimize(fn=_litdata_item, inputs=list(range(len(images))), output_dir=url,
                         chunk_bytes=shard_bytes, num_workers=1, start_method="fork",
                         storage_options=litdata_storage(), verbose=False)  # fmt: skip
    finally:
        _LITDATA_IMAGES.clear()
    return {"url": url, "objects": len(storage.list_files(url)) - 1}


# -- the libraries ---------------------------------------------------------------------------


def import_streaming() -> Any:
    """mosaicml-streaming. Its package imports torchvision at import time, for its vision
    datasets only; where torchvision is absent (the project's CPU torch has no matching
    torchvision wheel on PyPI) stand-ins for the two names it imports are registered first."""
    try:
        import streaming

        return streaming
    except ModuleNotFoundError as e:
        if e.name != "torchvision":
            raise
    import types

    # transformers decides once whether torchvision exists: before the stand-ins (it has not).
    import transformers.feature_extraction_utils  # noqa: F401

    tv, datasets, transforms, functional = (types.ModuleType(f"torchvision{s}") for s in
                                            ("", ".datasets", ".transforms", ".transforms.functional"))  # fmt: skip
    datasets.VisionDataset = type("VisionDataset", (), {})  # type: ignore[attr-defined]
    functional.to_tensor = None  # type: ignore[attr-defined]
    tv.datasets, tv.transforms, transforms.functional = datasets, transforms, functional  # type: ignore[attr-defined]
    sys.modules.update({m.__name__: m for m in (tv, datasets, transforms, functional)})
    import streaming

    return streaming


def import_litdata() -> Any:
    """litdata, with plain-HTTP endpoints allowed for its obstore S3 client (the local server
    is http://; litdata's obstore client options have no setting for it)."""
    import litdata
    import litdata.streaming.downloader as downloader

    if os.environ.get("AWS_ENDPOINT_URL", "").startswith("http://"):
        downloader._OBSTORE_CLIENT_OPTIONS["allow_http"] = True  # type: ignore[index]
    return litdata


def litdata_storage() -> dict[str, Any]:
    return {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}


def close_iterator(it: Any) -> None:
    """Stop a DataLoader iterator's workers now (and reap them, so their CPU time counts): a
    torch iterator directly, or the generator a StreamingDataLoader wraps one in."""
    import gc

    if it is None:
        return
    if hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
    elif hasattr(it, "close"):
        it.close()
    gc.collect()


class Loader(abc.ABC):
    """One library's loader for one run: batches of (keys, images) and its state after them."""

    @abc.abstractmethod
    def __iter__(self) -> Iterator[Batch]:
        """The epoch's batches, from where the loader was restored."""

    @abc.abstractmethod
    def state(self) -> Any:
        """What restores a loader to here (the library's own state)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the library's workers and files."""


class OursLoader(Loader):
    """DataStream: decoded and resized in its workers (ReaderOptions.transform), its first
    samples after a start or resume read by range (the offsets `index` wrote)."""

    RESIZE_IN_WORKERS = True
    RANGE_READS = True

    def __init__(self, spec: dict[str, Any], rank: int, world: int, seed: int, cache: str,
                 states: list[Any] | None, decode: bool) -> None:  # fmt: skip
        from darkmatter.data_pipeline.reader import DataStream, ReaderOptions

        self.decode = decode
        options = ReaderOptions(
            shuffle_buffer=SHUFFLE_BUFFER, cache_dir=cache, range_reads=self.RANGE_READS,
            transform=resize_sample if decode and self.RESIZE_IN_WORKERS else None,
        )  # fmt: skip
        self.stream = DataStream(
            spec["urls"]["ours"], rank=rank, world_size=world, micro_batch_size=BATCH // world,
            num_workers=spec["workers"], seed=seed, partitions=PARTITIONS, options=options,
        )  # fmt: skip
        if states:
            self.stream.load_state_dict(states)

    def __iter__(self) -> Iterator[Batch]:
        while self.stream.step < self.stream.steps_per_epoch:
            samples = [s for micro in self.stream.next_step() for s in micro]
            yield collate([(s["__key__"], self._image(s["image"]) if self.decode else None)
                           for s in samples])  # fmt: skip

    @staticmethod
    def _image(arr: Any) -> Any:
        return arr if arr.shape[:2] == (RESIZE, RESIZE) else resize_array(arr)

    def state(self) -> Any:
        return self.stream.state_dict()

    def close(self) -> None:
        """DataStream.close(), bounded. It can block for ever where a worker stopped while
        sending a piece (Workers.close joins its receiver thread, which waits in the pipe for
        the rest of the piece, whose write end this process still holds): after 3 s the
        workers are reaped (their CPU time then counts), the closing thread is left behind and
        the hang is counted (CLOSE_HANGS)."""
        workers = self.stream._loader
        closing = threading.Thread(target=self.stream.close, daemon=True, name="ours-close")
        closing.start()
        closing.join(3.0)
        if closing.is_alive():
            CLOSE_HANGS.append(time.time())
            for proc in getattr(workers, "procs", []):
                proc.join(timeout=5.0)
                if proc.is_alive():
                    proc.kill()
                    proc.join()


CLOSE_HANGS: list[float] = []  # OursLoader.close calls that did not return


class _SkipPerWorker:
    """webdataset stage: worker w drops its first `skips[w]` samples (raw, before decoding)."""

    def __init__(self, skips: list[int]) -> None:
        self.skips = skips

    def __call__(self, src: Iterator[Any]) -> Iterator[Any]:
        import itertools

        import torch.utils.data

        info = torch.utils.data.get_worker_info()
        return itertools.islice(src, self.skips[info.id if info else 0], None)


def _wds_sample(decode: bool) -> Callable[[dict[str, Any]], tuple[str, Any]]:
    def one(sample: dict[str, Any]) -> tuple[str, Any]:
        return sample["__key__"], decode_resize(sample["jpg"]) if decode else None

    return one


class WebDatasetLoader(Loader):
    """Plain webdataset: seeded shard shuffle, shards split by rank (`split_by_node`) and
    worker, a seeded 512-sample shuffle buffer per worker, decoded in the workers.

    It has no state. `state()` is the samples each worker gave so far (the DataLoader takes
    batches from its workers in turn), and a resume skips them: at the same world size each
    worker its own count, at another the total split evenly over the workers (the shards are
    split differently: nothing better exists)."""

    def __init__(self, spec: dict[str, Any], rank: int, world: int, seed: int, cache: str,
                 states: list[Any] | None, decode: bool) -> None:  # fmt: skip
        import torch.utils.data
        import webdataset as wds

        # `webdataset.gopen` is also a function the package exports: take the module.
        importlib.import_module("webdataset.gopen").gopen_schemes["s3"] = _gopen_s3
        urls = spec["urls"]["webdataset"]
        self.workers = max(1, spec["workers"])
        self.world = world
        skips = [0] * self.workers
        if states and len(states) == 1 and states[0]["world"] == world:
            skips = list(states[0]["per_worker"])
        elif states:
            total = sum(sum(s["per_worker"]) for s in states)
            skips = [total // self.workers] * self.workers
        ds = wds.WebDataset(urls, shardshuffle=len(urls), seed=seed, handler=wds.reraise_exception,
                            nodesplitter=wds.split_by_node, empty_check=False)  # fmt: skip
        ds = ds.shuffle(WDS_BUFFER, initial=WDS_BUFFER, seed=seed)
        if any(skips):
            ds = ds.compose(_SkipPerWorker(skips))
        ds = ds.map(_wds_sample(decode)).batched(BATCH // world, collation_fn=collate, partial=True)
        self.loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=spec["workers"],
                                                  prefetch_factor=2 if spec["workers"] else None)  # fmt: skip
        self.per_worker = [0] * self.workers
        self._it: Any = None

    def __iter__(self) -> Iterator[Batch]:
        self._it = iter(self.loader)
        for j, (keys, images) in enumerate(self._it):
            self.per_worker[j % self.workers] += len(keys)
            yield keys, images

    def state(self) -> Any:
        return {"world": self.world, "per_worker": list(self.per_worker)}

    def close(self) -> None:
        close_iterator(self._it)


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> Any:
    """webdataset's opener for s3:// (it has none): the object through fsspec/s3fs, streamed."""
    from darkmatter import storage

    return storage.open_url(url, mode)


def _mosaic_dataset_class() -> Any:
    streaming = import_streaming()

    class Images(streaming.StreamingDataset):  # type: ignore[misc, name-defined]
        """StreamingDataset whose samples are (key, decoded image), decoded in the workers."""

        decode = True

        def __getitem__(self, i: int) -> tuple[str, Any]:
            s = super().__getitem__(i)
            return s["key"], decode_resize(s["jpg"]) if self.decode else None

    return Images


class StatefulLoader(Loader):
    """A peer's StreamingDataLoader (mosaicml-streaming's, litdata's): rank 0's state_dict()
    restores a resume, at any world size."""

    def start(self, loader: Any, states: list[Any] | None) -> None:
        self.loader = loader
        if states:
            self.loader.load_state_dict(states[0])
        self._it: Any = None

    def __iter__(self) -> Iterator[Batch]:
        self._it = iter(self.loader)
        yield from self._it

    def state(self) -> Any:
        return self.loader.state_dict()

    def close(self) -> None:
        close_iterator(self._it)


class MosaicLoader(StatefulLoader):
    """mosaicml-streaming: StreamingDataset (shuffle on, its default py1e algorithm and block
    size) in a StreamingDataLoader (forked workers, the default); state from
    StreamingDataLoader.state_dict()."""

    def __init__(self, spec: dict[str, Any], rank: int, world: int, seed: int, cache: str,
                 states: list[Any] | None, decode: bool) -> None:  # fmt: skip
        import_streaming()
        from streaming.base import StreamingDataLoader

        cls = _mosaic_dataset_class()
        cls.decode = decode
        self.ds = cls(remote=spec["urls"]["mosaicml-streaming"], local=cache, shuffle=True,
                      shuffle_seed=seed, batch_size=BATCH // world)  # fmt: skip
        # Its S3 client, made here for index.json, would be inherited by the forked workers
        # with its open connection: two processes on one socket, a read waits out the 60 s
        # read timeout now and then. Dropped, so that each worker makes its own.
        for stream in self.ds.streams:
            stream._downloader.clean_up()
        self.start(StreamingDataLoader(self.ds, batch_size=BATCH // world,
                                       num_workers=spec["workers"], collate_fn=collate,
                                       prefetch_factor=2 if spec["workers"] else None), states)  # fmt: skip


def _litdata_transform(decode: bool) -> Callable[[dict[str, Any]], tuple[str, Any]]:
    def one(item: dict[str, Any]) -> tuple[str, Any]:
        return item["key"], decode_resize(item["jpg"]) if decode else None

    return one


class LitdataLoader(StatefulLoader):
    """litdata: StreamingDataset (shuffle on, drop_last at every world size: a state saved with
    another drop_last is refused) with the decode as its `transform`, in a StreamingDataLoader;
    state from StreamingDataLoader.state_dict()."""

    def __init__(self, spec: dict[str, Any], rank: int, world: int, seed: int, cache: str,
                 states: list[Any] | None, decode: bool) -> None:  # fmt: skip
        litdata = import_litdata()

        self.ds = litdata.StreamingDataset(spec["urls"]["litdata"], cache_dir=cache, shuffle=True,
                                           drop_last=True, seed=seed,
                                           storage_options=litdata_storage(),
                                           transform=_litdata_transform(decode))  # fmt: skip
        self.start(litdata.StreamingDataLoader(self.ds, batch_size=BATCH // world,
                                               num_workers=spec["workers"], collate_fn=collate,
                                               prefetch_factor=2 if spec["workers"] else None),
                   states)  # fmt: skip


class OursResizeHereLoader(OursLoader):
    """`--profile`: DataStream without a transform, the resize run here (in the training
    process) on the decoded images its workers ship: the reader before ReaderOptions.transform."""

    RESIZE_IN_WORKERS = False


class OursWholeShardsLoader(OursLoader):
    """`--profile`: DataStream with range_reads off: every shard a start or resume needs is
    fetched whole before its first sample (the reader before reader/ranged.py)."""

    RANGE_READS = False


LOADERS: dict[str, type[Loader]] = {
    "ours": OursLoader,
    "ours-resize-here": OursResizeHereLoader,
    "ours-whole-shards": OursWholeShardsLoader,
    "webdataset": WebDatasetLoader,
    "mosaicml-streaming": MosaicLoader,
    "litdata": LitdataLoader,
}


def open_loader(lib: str, spec: dict[str, Any], cache: str, *, rank: int = 0, world: int = 1,
                seed: int = 0, states: list[Any] | None = None, decode: bool = True) -> Loader:  # fmt: skip
    """A loader of `lib` whose local cache is the folder `cache`."""
    return LOADERS[lib](spec, rank, world, seed, cache, states, decode)  # type: ignore[call-arg]


def new_cache(spec: dict[str, Any], lib: str) -> str:
    return tempfile.mkdtemp(prefix=f"{lib}-cache-", dir=spec["scratch"])


def cold(spec: dict[str, Any], lib: str, cache: str) -> str:
    """An empty cache for a loader after one that used `cache`, as on a fresh machine: a new
    folder, except for litdata, whose state names its cache folder (it refuses another), so
    `cache` emptied. (mosaicml-streaming must not reuse a folder in one process: its shared
    memory still describes the old one's files.)"""
    import shutil

    if lib != "litdata":
        return new_cache(spec, lib)
    shutil.rmtree(cache, ignore_errors=True)
    os.makedirs(cache)
    return cache


def warm_imports(lib: str) -> None:
    """Import what `lib`'s loader and the decode use, so that no timing includes imports."""
    import torch.utils.data  # noqa: F401

    decode_resize(jpeg(0, 0, 16))
    if lib.startswith("ours"):
        import darkmatter.data_pipeline.reader  # noqa: F401
    elif lib == "webdataset":
        import webdataset  # noqa: F401

        from darkmatter import storage  # noqa: F401
    elif lib == "mosaicml-streaming":
        import_streaming()
        from streaming.base import StreamingDataLoader  # noqa: F401
    else:
        import_litdata()


# -- measuring, in a child process per library ------------------------------------------------


class TreeMemory:
    """The largest RSS and PSS summed over this process and its descendants, sampled by a
    thread every `interval` seconds (PSS from /proc/<pid>/smaps_rollup, where Linux has it)."""

    def __init__(self, interval: float = 0.2) -> None:
        import psutil

        self.me = psutil.Process()
        self.peak_rss = self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="tree-memory")
        self._interval = interval

    def __enter__(self) -> TreeMemory:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()

    def sample(self) -> None:
        import psutil

        rss = pss = 0
        for p in [self.me, *self.me.children(recursive=True)]:
            try:
                r = p.memory_info().rss
                rss += r
                pss += _pss(p.pid) or r
            except (psutil.NoSuchProcess, psutil.AccessDenied, FileNotFoundError):
                continue
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)


def _pss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cpu_s() -> float:
    """User + system CPU seconds of this process and its reaped children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def half_batches(spec: dict[str, Any]) -> int:
    """Global batches in 50% of an epoch: floor(N / 64 / 2), the same for every library."""
    return max(1, spec["num_samples"] // BATCH // 2)


def child_epoch(lib: str, spec: dict[str, Any], seed: int, count: bool) -> dict[str, Any]:
    """One epoch (state saved at 50%), then a timed resume from that state with the cache
    emptied; with `count`, then the request counts of both (count_requests)."""
    warm_imports(lib)
    half = half_batches(spec)
    out: dict[str, Any] = {}
    cache = new_cache(spec, lib)
    with TreeMemory() as mem:
        cpu0 = _cpu_s()
        t0 = time.perf_counter()
        loader = open_loader(lib, spec, cache, seed=seed)
        n = batches = 0
        first = 0.0
        state: Any = None
        after_state: list[str] | None = None
        try:
            for keys, images in loader:
                assert images is not None and tuple(images.shape[1:]) == (3, RESIZE, RESIZE)
                n += len(keys)
                batches += 1
                first = first or time.perf_counter() - t0
                if state is not None and after_state is None:
                    after_state = keys
                if batches == half:
                    state = loader.state()
            total = time.perf_counter() - t0
        finally:
            loader.close()
        out.update(samples=n, batches=batches, first_batch_s=round(first, 3),
                   epoch_s=round(total, 3), epoch_samples_per_s=round(n / total, 1),
                   samples_per_s=round((n - len(after_state or [])) / max(total - first, 1e-9), 1),
                   cpu_ms_per_sample=round(1000 * (_cpu_s() - cpu0) / n, 3),
                   state_bytes=len(json.dumps(state)))  # fmt: skip
        state = json.loads(json.dumps(state))  # as a checkpoint holds it
        t1 = time.perf_counter()
        loader = open_loader(lib, spec, cold(spec, lib, cache), seed=seed, states=[state])
        try:
            keys, images = next(iter(loader))
            out["resume_s"] = round(time.perf_counter() - t1, 3)
        finally:
            loader.close()
        out["resume_exact"] = keys == after_state
    out.update(
        peak_rss_mib=round(mem.peak_rss / 2**20, 1), peak_pss_mib=round(mem.peak_pss / 2**20, 1)
    )
    if count:
        out["requests"] = count_requests(lib, spec, cache)
    if lib.startswith("ours"):
        out["close_hangs"] = len(CLOSE_HANGS)
        out["closes"] = 4 if count else 2
    return out


def count_requests(lib: str, spec: dict[str, Any], cache: str) -> dict[str, Any]:
    """The requests of one epoch (undecoded, state saved at 50%) and of one resume from that
    state (to its first batch), each from a cold cache, through a counting HTTP proxy in front
    of the S3 server (run here; the loader workers reach it over TCP)."""
    from tests.faultproxy import FaultProxy, is_object_get

    out: dict[str, Any] = {}
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "S3_ENDPOINT_URL")}
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        os.environ.update(AWS_ENDPOINT_URL=proxy.url, S3_ENDPOINT_URL=proxy.url)
        try:
            state: Any = None
            for phase in ("epoch", "resume"):
                proxy.reset_counts()
                loader = open_loader(lib, spec, cold(spec, lib, cache), states=[state] if state else None,
                                     decode=False)  # fmt: skip
                try:
                    for batches, _ in enumerate(loader, 1):
                        if phase == "resume":
                            break
                        if batches == half_batches(spec):
                            state = json.loads(json.dumps(loader.state()))
                finally:
                    loader.close()
                reqs = proxy.log
                objects = Counter(p.split("?")[0] for m, p in reqs if is_object_get(m, p))
                data = {p: k for p, k in objects.items() if _is_data(p)}
                out[phase] = {
                    "requests": len(reqs),
                    "by_method": dict(Counter(m for m, _ in reqs)),
                    "data_gets": sum(data.values()),
                    "data_objects": len(data),
                    "metadata_gets": sum(objects.values()) - sum(data.values()),
                    "lists": sum(1 for m, p in reqs if m == "GET" and not is_object_get(m, p)),
                }
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return out


def _is_data(path: str) -> bool:
    """A shard or chunk (not an index or manifest)."""
    return path.rsplit("/", 1)[-1].endswith((".tar", ".mds", ".bin"))


def child_elastic(libs: list[str], spec: dict[str, Any], root: Path) -> dict[str, Any]:
    """Rank RANK of 2, for every library in turn: the whole epoch at world size 2 (torch.
    distributed, gloo), the state saved at 50% of its steps, the keys before and after it.
    Then rank 0 alone, at world size 1 (the process group gone, RANK / WORLD_SIZE / LOCAL_*
    set as torchrun sets them for one process), resumes each library from what the ranks
    saved (ours and webdataset: every rank's state; the others: rank 0's, the one their
    trainers save) and reads to the end of the epoch. One process per rank for every library
    saves process start-ups; nothing here is timed."""
    import torch.distributed as dist

    for lib in libs:
        warm_imports(lib)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for lib in libs:
            elastic_rank(lib, spec, root / f"elastic-{lib}", rank, world)
            dist.barrier()
    finally:
        dist.destroy_process_group()
    if rank != 0:
        return {}
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    return {lib: elastic_resume(lib, spec, root / f"elastic-{lib}") for lib in libs}


def elastic_rank(lib: str, spec: dict[str, Any], out_dir: Path, rank: int, world: int) -> None:
    """One rank's epoch at world size 2. The ranks share one cache folder, as processes of one
    machine do, except litdata's (its index download waits 1 s for a lock the other rank
    holds, then goes on without the index: one folder per rank)."""
    out_dir.mkdir(exist_ok=True)
    cache = str(out_dir / (f"cache-rank{rank}" if lib == "litdata" else "cache-rank0"))
    os.makedirs(cache, exist_ok=True)
    loader = open_loader(lib, spec, cache, rank=rank, world=world, seed=spec["seed"],
                         decode=False)  # fmt: skip
    before: list[str] = []
    after: list[str] = []
    state: Any = None
    try:
        for batches, (keys, _) in enumerate(loader, 1):
            (after if state is not None else before).extend(keys)
            if batches == half_batches(spec):
                state = json.loads(json.dumps(loader.state()))  # as a checkpoint holds it
    finally:
        loader.close()
    del loader
    result = {"rank": rank, "before": before, "after": after, "state": state}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))


def elastic_resume(lib: str, spec: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """World size 1 from the ranks' states, to the end of the epoch; or why it was refused."""
    ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]
    states = [r["state"] for r in ranks] if lib in ("ours", "webdataset") else [ranks[0]["state"]]
    keys: list[str] = []
    try:
        cache = cold(spec, lib, str(out_dir / "cache-rank0"))
        loader = open_loader(lib, spec, cache, seed=spec["seed"], states=states, decode=False)
        try:
            for batch_keys, _ in loader:
                keys.extend(batch_keys)
        finally:
            loader.close()
    except Exception as e:  # the library refused the state
        return {"refused": f"{type(e).__name__}: {str(e).strip().splitlines()[-1]}"[:500]}
    (out_dir / "resumed.json").write_text(json.dumps(keys))
    return {"samples": len(keys)}


def child_main(args: argparse.Namespace) -> int:
    spec = json.loads(Path(args.spec).read_text())
    for name in ("litdata", "streaming", "lightning_utilities"):  # their INFO lines, to stderr
        __import__("logging").getLogger(name).setLevel("WARNING")
    with stdout_to_stderr():
        if args.child == "epoch":
            result = child_epoch(args.library, spec, args.seed, args.count)
        else:
            result = child_elastic(args.library.split(","), spec, Path(args.out_dir))
    Path(args.result).write_text(json.dumps(result))
    return 0


# -- the parent --------------------------------------------------------------------------------


def run_child(
    lib: str, mode: str, spec_file: Path, extra: list[str], env: dict[str, str]
) -> subprocess.Popen[bytes]:
    """Start `mode` for `lib` in a fresh interpreter; its output goes to stderr."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--library", lib,
           "--spec", str(spec_file), *extra]  # fmt: skip
    return subprocess.Popen(cmd, cwd=_common.REPO_ROOT, env={**os.environ, **env},
                            stdout=sys.stderr.fileno(), stderr=sys.stderr.fileno())  # fmt: skip


def wait_child(
    proc: subprocess.Popen[bytes], result: Path, what: str, timeout: float
) -> dict[str, Any]:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise SystemExit(f"peer_loaders: {what} ran over {timeout:.0f} s") from None
    if rc != 0 or not result.exists():
        raise SystemExit(f"peer_loaders: {what} failed (exit code {rc}; its log is above)")
    out: dict[str, Any] = json.loads(result.read_text())
    result.unlink()
    return out


def child(lib: str, mode: str, spec_file: Path, extra: list[str], timeout: float,
          env: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    result = spec_file.parent / f"result-{lib}-{mode}.json"
    proc = run_child(lib, mode, spec_file, [*extra, "--result", str(result)], env or {})
    return wait_child(proc, result, f"{lib} ({mode})", timeout)


def measure(libs: list[str], spec_file: Path, reps: int, count: bool,
            timeout: float) -> dict[str, list[dict[str, Any]]]:  # fmt: skip
    """Each library's epoch + resume, `reps` times, in alternating order (the request counts
    after the first repetition's timings)."""
    runs: dict[str, list[dict[str, Any]]] = {lib: [] for lib in libs}
    for rep in range(reps):
        order = libs if rep % 2 == 0 else list(reversed(libs))
        for lib in order:
            extra = ["--seed", str(rep)] + (
                ["--count"] if count and rep == 0 and lib in LIBRARIES else []
            )
            r = child(lib, "epoch", spec_file, extra, timeout)
            runs[lib].append(r)
            log(f"  rep {rep} {lib}: {r['samples_per_s']:.0f} samples/s, first batch "
                f"{r['first_batch_s']:.2f} s, resume {r['resume_s']:.2f} s "
                f"(exact: {r['resume_exact']}), peak RSS {r['peak_rss_mib']:.0f} MiB, "
                f"{r['cpu_ms_per_sample']:.2f} CPU ms/sample")  # fmt: skip
    return runs


def elasticity(libs: list[str], spec_file: Path, root: Path, timeout: float) -> dict[str, Any]:
    """2 -> 1 at 50% of the epoch (child_elastic): repeated and skipped samples of each library
    against its uninterrupted epoch at world size 2."""
    from darkmatter.quickstart.servers import free_port

    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}  # fmt: skip
        result = root / f"result-elastic-rank{rank}.json"
        extra = ["--out-dir", str(root), "--result", str(result)]
        procs.append((run_child(",".join(libs), "elastic", spec_file, extra, env), result))
    resumed = [wait_child(p, r, f"elasticity (rank {k})", timeout * len(libs))
               for k, (p, r) in enumerate(procs)][0]  # fmt: skip
    return {lib: count_elastic(root / f"elastic-{lib}", resumed[lib]) for lib in libs}


def count_elastic(out_dir: Path, resumed: dict[str, Any]) -> dict[str, Any]:
    """Repeats and skips of the 2 -> 1 run by key, against the uninterrupted world-size-2
    epoch's multiset of keys (a library that pads an epoch with repeats is not charged them)."""
    ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]
    reference = Counter(k for r in ranks for k in r["before"] + r["after"])
    out: dict[str, Any] = {"reference_samples": sum(reference.values()),
                           "reference_unique": len(reference),
                           "before_resume": sum(len(r["before"]) for r in ranks)}  # fmt: skip
    if "refused" in resumed:
        return out | {"result": "unsupported", "repeats": None, "skips": None,
                      "error": resumed["refused"]}  # fmt: skip
    seen = Counter(k for r in ranks for k in r["before"])
    after = json.loads((out_dir / "resumed.json").read_text())
    seen.update(after)
    repeats = sum(max(0, c - reference[k]) for k, c in seen.items())
    skips = sum(max(0, c - seen[k]) for k, c in reference.items())
    result = "exactly once" if repeats == skips == 0 else " + ".join(
        w for w, n in (("repeats", repeats), ("skips", skips)) if n)  # fmt: skip
    return out | {"result": result, "repeats": repeats, "skips": skips,
                  "after_resume": len(after)}  # fmt: skip


def summarize(lib: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    med = _common.median
    out: dict[str, Any] = {"library": lib}
    for name in ("samples_per_s", "epoch_samples_per_s", "first_batch_s", "resume_s",
                 "peak_rss_mib", "peak_pss_mib", "cpu_ms_per_sample"):  # fmt: skip
        out[name] = round(med([float(r[name]) for r in runs]), 3)
    out["resume_exact"] = all(r["resume_exact"] for r in runs)
    out["samples"] = runs[0]["samples"]
    out["state_bytes"] = runs[0]["state_bytes"]
    out["runs"] = {name: [r[name] for r in runs] for name in ("samples_per_s", "first_batch_s",
                                                                "resume_s")}  # fmt: skip
    if "close_hangs" in runs[0]:  # ours: DataStream.close() calls that never returned
        out["close_hangs"] = (
            f"{sum(r['close_hangs'] for r in runs)} of {sum(r['closes'] for r in runs)}"
        )
    if lib == "webdataset":
        out["resume_method"] = (
            "no state: the same seeded pipeline, each worker skipping what it gave"
        )
    return out


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("torch", "webdataset", "mosaicml-streaming", "litdata", "pillow"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def check_installed(libs: list[str]) -> None:
    from importlib.util import find_spec

    dist = {"mosaicml-streaming": "streaming", "litdata": "litdata", "webdataset": "webdataset"}
    missing = [lib for lib in libs if lib in dist and find_spec(dist[lib]) is None]
    if missing:
        raise SystemExit(f"peer_loaders: {', '.join(missing)} not installed; see bench/README.md "
                         "(the bench extra), or leave them out with --libraries")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--samples", type=int, default=None,
                    help="images in the set (default 20,000; at least 128)")  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="a smoke run: --samples 200")
    ap.add_argument("--workers", type=int, default=2, help="loader worker processes, every library")
    ap.add_argument("--reps", type=int, default=None,
                    help="timed epochs per library (default 3; 1 under 2,000 samples)")  # fmt: skip
    ap.add_argument("--shard-mib", type=float, default=32.0,
                    help="shard/chunk size of every format (at most 1/8 of the set)")  # fmt: skip
    ap.add_argument("--libraries", nargs="+", default=list(LIBRARIES), metavar="LIB",
                    help=f"some of {', '.join(LIBRARIES)}")  # fmt: skip
    ap.add_argument("--profile", action="store_true",
                    help="also time ours resizing in this process, and ours without range "
                    "reads")  # fmt: skip
    ap.add_argument("--bucket", metavar="S3_URL",
                    help="write the data here, on the S3 server the environment names "
                    "(AWS_ENDPOINT_URL), instead of starting a private stack (tests: the "
                    "session's stack)")  # fmt: skip
    ap.add_argument("--no-elastic", action="store_true", help="leave out the 2 -> 1 resume")
    ap.add_argument("--no-requests", action="store_true", help="leave out the request counts")
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=["epoch", "elastic"],
                    help=argparse.SUPPRESS)  # fmt: skip
    ap.add_argument("--count", action="store_true", help=argparse.SUPPRESS)
    for name in ("--library", "--spec", "--result", "--out-dir"):
        ap.add_argument(name, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child_main(args)
    bad = [lib for lib in args.libraries if lib not in LIBRARIES]
    if bad:
        ap.error(f"--libraries: unknown {', '.join(bad)} (choose from {', '.join(LIBRARIES)})")
    samples = args.samples or (200 if args.quick else 20_000)
    if samples < 2 * BATCH or args.workers < 1 or args.shard_mib <= 0:
        ap.error("need --samples >= 128, --workers >= 1 and --shard-mib > 0")
    if args.bucket and not (args.bucket.startswith("s3://") and os.environ.get("AWS_ENDPOINT_URL")):
        ap.error("--bucket needs an s3:// URL and AWS_ENDPOINT_URL set")
    if PARTITIONS % (2 * args.workers):
        ap.error(f"--workers must divide {PARTITIONS // 2} (our reader: 2 ranks x workers slots)")
    libs = [lib for lib in LIBRARIES if lib in args.libraries]
    check_installed(libs)
    timed = libs + (list(PROFILE_ROWS) if args.profile and "ours" in libs else [])
    reps = args.reps or (3 if samples >= 2000 else 1)
    timeout = 120 + samples / 20  # per child: generous at ~1 ms of work a sample
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    with contextlib.ExitStack() as stack:
        root = stack.enter_context(_common.workdir("darkmatter-bench-peers-"))
        if not args.bucket:
            stack.enter_context(_common.local_stack(root))
        os.environ["S3_ENDPOINT_URL"] = os.environ["AWS_ENDPOINT_URL"]  # mosaicml-streaming's
        os.environ.setdefault("LITDATA_CACHE_DIR", str(root / "litdata-cache"))
        base = f"{(args.bucket or BUCKET).rstrip('/')}/bench/peers"
        spec, formats = write_data(libs, samples, args.shard_mib, args.workers, root, base)
        spec_file = root / "spec.json"
        spec_file.write_text(json.dumps(spec))
        log(f"epochs and resumes: {reps} per library, alternating order")
        runs = measure(timed, spec_file, reps, not args.no_requests, timeout)
        elastic = {}
        if not args.no_elastic:
            log(f"elasticity 2 -> 1 at 50% of the epoch: {', '.join(libs)} at once")
            elastic = elasticity(libs, spec_file, root, timeout)
            for lib, e in elastic.items():
                log(f"  {lib}: {e['result']} ({e})")
    rows = []
    for lib in timed:
        row = summarize(lib, runs[lib]) | {
            "format": formats["ours" if lib.startswith("ours") else lib]
        }
        if lib in elastic:
            row["elastic_2_to_1"] = elastic[lib]
        if "requests" in runs[lib][0] and lib in formats:
            row["requests"] = runs[lib][0]["requests"]
            row["requests"]["data_gets_per_object_per_epoch"] = round(
                row["requests"]["epoch"]["data_gets"] / formats[lib]["objects"], 2)  # fmt: skip
        rows.append(row)
        _common.emit({"bench": "peer_loaders", **row})
    summary: dict[str, Any] = {"bench": "peer_loaders", "summary": True}
    by = {r["library"]: r for r in rows}
    peers = [r for r in rows if r["library"] in PEERS]
    if "ours" in by and peers:
        best = max(peers, key=lambda r: r["samples_per_s"])
        fastest = min(peers, key=lambda r: r["resume_s"])
        summary.update(
            ratio_vs_best_peer=round(by["ours"]["samples_per_s"] / best["samples_per_s"], 3),
            best_peer=best["library"],
            resume_vs_best_peer=round(by["ours"]["resume_s"] / fastest["resume_s"], 3),
            best_resume_peer=fastest["library"],
        )  # fmt: skip
        if "ours-resize-here" in by:
            summary["resize_here_ratio_vs_best_peer"] = round(
                by["ours-resize-here"]["samples_per_s"] / best["samples_per_s"], 3)  # fmt: skip
        if "ours-whole-shards" in by:
            summary["whole_shards_resume_vs_best_peer"] = round(
                by["ours-whole-shards"]["resume_s"] / fastest["resume_s"], 3)  # fmt: skip
    summary.update(
        samples_per_s={r["library"]: r["samples_per_s"] for r in rows},
        cpu_ms_per_sample={r["library"]: r["cpu_ms_per_sample"] for r in rows},
        resume_s={r["library"]: r["resume_s"] for r in rows},
        elastic_2_to_1={lib: e["result"] for lib, e in elastic.items()},
        samples=samples, workers=args.workers, global_batch=BATCH, reps=reps,
        image=f"{IMAGE_SIZE}x{IMAGE_SIZE} JPEG q90 -> {RESIZE}x{RESIZE}",
        versions=versions(), machine=_common.machine(),
        load_average_1m=[round(load_before, 2), round(os.getloadavg()[0], 2)],
        wall_s=round(time.perf_counter() - started, 1),
    )  # fmt: skip
    _common.emit(summary)
    return 0


def write_data(libs: list[str], n: int, shard_mib: float, workers: int, root: Path,
               base: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:  # fmt: skip
    """The image set in each library's format on the S3 server; the children's spec."""
    t0 = time.perf_counter()
    images = generate(n, seed=0)
    total = sum(len(b) for b in images)
    shard_bytes = int(min(shard_mib * 2**20, total / 8))
    log(f"{n} JPEGs, {total / n / 1024:.1f} KiB each on average ({total / 2**20:.0f} MiB), made "
        f"in {time.perf_counter() - t0:.0f} s; shards of ~{shard_bytes / 2**20:.1f} MiB")  # fmt: skip
    formats: dict[str, dict[str, Any]] = {}
    with stdout_to_stderr():
        if "ours" in libs or "webdataset" in libs:
            t0 = time.perf_counter()
            wds = write_webdataset(images, f"{base}/wds", shard_bytes, root)
            log(f"WebDataset: {wds['objects']} shards in {time.perf_counter() - t0:.0f} s")
            formats["ours"] = formats["webdataset"] = {"kind": "WebDataset tar", **wds}
        if "mosaicml-streaming" in libs:
            t0 = time.perf_counter()
            formats["mosaicml-streaming"] = {"kind": "MDS",
                                             **write_mds(images, f"{base}/mds", shard_bytes, root)}  # fmt: skip
            log(f"MDS in {time.perf_counter() - t0:.0f} s")
        if "litdata" in libs:
            t0 = time.perf_counter()
            formats["litdata"] = {"kind": "litdata optimize",
                                  **write_litdata(images, f"{base}/litdata", shard_bytes)}  # fmt: skip
            log(f"litdata chunks in {time.perf_counter() - t0:.0f} s")
    scratch = root / "scratch"
    scratch.mkdir()
    spec = {
        "urls": {"ours": f"{base}/wds", "webdataset": formats.get("webdataset", {}).get("shards"),
                 "mosaicml-streaming": f"{base}/mds", "litdata": f"{base}/litdata"},
        "num_samples": n, "workers": workers, "seed": 0, "scratch": str(scratch),
    }  # fmt: skip
    for f in formats.values():
        f.pop("shards", None)
        f.pop("url", None)
    return spec, formats


if __name__ == "__main__":
    sys.exit(main())
