"""Property-based tests (hypothesis) of every parser of untrusted bytes: the config loader, the
dataset manifest, the tar member parser, COMMIT.json and the claim records.

Over random and mutated inputs each parser either returns a usable result or raises its user
error (ConfigError, PrepareError, CheckpointError: one line naming the file or dotted key), or,
for the tar reader, turns bad data into holes. Nothing leaks a KeyError/TypeError/..., nothing
hangs or allocates what a header merely declares, and nothing is written outside the folder the
parser was given: each example runs in a fresh sandbox whose whole tree is compared afterwards.

The number of examples comes from the hypothesis profile (tests/conftest.py): "ci" by default,
DARKMATTER_HYPOTHESIS_PROFILE=soak for a long run.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import math
import os
import signal
import tarfile
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from darkmatter import storage
from darkmatter.data_pipeline.manifest import MANIFEST, Manifest, PrepareError, ShardInfo
from darkmatter.data_pipeline.reader import Hole, LocalShard, ReaderOptions, tar_members
from darkmatter.data_pipeline.reader.cache import IOStats, ShardCache
from darkmatter.evaluation import claims
from darkmatter.storage import Retry
from darkmatter.trainer import checkpoint as ckpt
from darkmatter.trainer.config import Config, ConfigError, to_dict
from darkmatter.trainer.objectives import load_config
from tests.helpers import REPO_ROOT, run_darkmatter

# -- shared machinery -----------------------------------------------------------------------

# Path parts a hostile name uses to leave its folder; the sandbox is deeper than three levels,
# so a name that escapes still lands inside it, where the tree comparison sees it.
HOSTILE_NAMES = ["../x", "../../x", "../../../x", "a/../../x", "/abs/x", "/", "", ".", "..",
                 "a\0b", "a/./b", "x/", "..\\x", "\u00e9\u4e2d.bin", "a" * 300]  # fmt: skip


@contextlib.contextmanager
def sandbox() -> Iterator[Path]:
    """A fresh run folder three levels inside a temporary tree; on exit, asserts that nothing
    was created anywhere in that tree outside the run folder."""
    with tempfile.TemporaryDirectory(prefix="fuzz-") as top:
        run = Path(top, "a", "b", "run")
        run.mkdir(parents=True)
        yield run
        outside = [p for p in Path(top).rglob("*") if p not in run.parents and run not in
                   p.parents and p != run]  # fmt: skip
        assert not outside, f"written outside the run folder: {outside}"


@contextlib.contextmanager
def within(seconds: float) -> Iterator[None]:
    """Fail (instead of hanging the suite) when the block runs longer than `seconds`."""

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"still running after {seconds} s: a parser loops")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def user_error(call: Callable[[], Any], kind: type[Exception], names: str) -> Any:
    """`call()`'s result, or None after a `kind` error of one line that contains `names`;
    any other exception fails the test (re-raised, with its traceback)."""
    try:
        return call()
    except kind as e:
        message = str(e)
        assert len(message.splitlines()) <= 1, f"a multi-line error: {message!r}"
        assert names in message, f"{message!r} does not name {names!r}"
        return None


def json_values(max_leaves: int = 12) -> st.SearchStrategy[Any]:
    """Any JSON document, with the awkward numbers (NaN, huge ints, -0.0) a file can hold."""
    scalars = (st.none() | st.booleans() | st.integers() | st.integers(-(2**200), 2**200)
               | st.sampled_from([10**400, -(10**400)])  # past the largest float
               | st.floats() | st.text(max_size=20) | st.sampled_from(HOSTILE_NAMES))  # fmt: skip
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
        ),
        max_leaves=max_leaves,
    )


def raw_documents() -> st.SearchStrategy[bytes]:
    """Bytes that are not a sane document: random, non-UTF-8, deeply nested, huge numbers."""
    return st.one_of(
        st.binary(max_size=200),
        json_values().map(lambda v: json.dumps(v).encode()),
        # Past the interpreter's recursion limit (1000) the parsers recurse no further.
        st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),
        st.integers(1, 3000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
        st.just(b"9" * 5000),
        st.just(b"\xff\xfe\x00{"),
    )


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path (keys and indices) into a nested JSON value, the root included."""
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def mutated(draw: st.DrawFn, valid: Any) -> Any:
    """`valid` with one to three random edits: a value replaced, a key deleted or renamed to a
    hostile name, a key added."""
    doc = copy.deepcopy(valid)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(doc)))
        if not path:
            doc = draw(json_values())
            continue
        parent = doc
        for p in path[:-1]:
            parent = parent[p]
        last = path[-1]
        op = draw(st.sampled_from(["replace", "delete", "rename", "add"]))
        if op == "replace":
            parent[last] = draw(json_values(max_leaves=4))
        elif isinstance(parent, dict) and op == "delete":
            del parent[last]
        elif isinstance(parent, dict) and op == "rename":
            parent[draw(st.sampled_from(HOSTILE_NAMES) | st.text(max_size=8))] = parent.pop(last)
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(json_values(max_leaves=4))
    return doc


# -- the config loader ----------------------------------------------------------------------

CONFIGS = sorted((REPO_ROOT / "configs").glob("quickstart_*.yaml"))


def _dotted_keys() -> list[str]:
    """Every dotted key the quickstart configs set, their sections, and some unknown ones."""
    keys: set[str] = {"nosuch", "train.nosuch", "model.nosuch.deeper", "data.url.x"}
    for path in CONFIGS:
        raw = yaml.safe_load(path.read_text())
        for p in _paths(raw):
            if p:
                keys.add(".".join(map(str, p)))
    return sorted(keys)


DOTTED = _dotted_keys()


def config_values() -> st.SearchStrategy[Any]:
    """Values a user (or a typo) puts in a config: wrong types, extremes, NaN (deep nesting:
    test_config_unreadable_files)."""
    return json_values(max_leaves=6) | st.sampled_from(
        [0, -1, 2**63, -(2**70), 10**400, math.nan, math.inf, -math.inf, 1e308, "", "0"]
    )


def yaml_scalar(value: Any) -> str:
    """`value` as the text after `key=` in an override (YAML flow style, one line)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**9).removesuffix("\n...\n")


def _finite_floats(obj: Any, key: str = "") -> list[str]:
    """Dotted keys of the non-finite floats in a config dict."""
    if isinstance(obj, dict):
        return [k for name, v in obj.items() for k in _finite_floats(v, f"{key}.{name}")]
    if isinstance(obj, float) and not math.isfinite(obj):
        return [key.lstrip(".")]
    return []


def check_config(text: bytes, overrides: list[str], touched: str | None) -> None:
    """load_config on `text` (+ overrides): a Config that survives its own dump, or one
    ConfigError line naming the file, an override or the dotted key that was edited."""
    with sandbox() as run:
        path = run / "c.yaml"
        path.write_bytes(text)
        try:
            with within(20):
                cfg = load_config(path, overrides)
        except ConfigError as e:
            message = str(e)
            assert len(message.splitlines()) <= 1, f"a multi-line error: {message!r}"
            assert ": " in message, f"{message!r} is not 'where: what'"
            if touched and touched.isprintable():  # the key, a section above it, the file
                parts = touched.split(".")
                names = [touched, f"{path}:"]
                names += [".".join(parts[:i]) + ":" for i in range(1, len(parts))]
                assert any(n in message for n in names), f"{message!r} names none of {names}"
            return
        assert isinstance(cfg, Config)
        d = to_dict(cfg)
        assert not _finite_floats(d), f"non-finite values accepted: {_finite_floats(d)}"
        again = run / "again.yaml"  # what --dry-run prints must load back to the same config
        again.write_text(yaml.safe_dump(d, sort_keys=False))
        assert to_dict(load_config(again)) == d


@given(text=st.text(max_size=300) | raw_documents().map(lambda b: b.decode("latin-1")))
def test_config_random_documents(text: str) -> None:
    check_config(text.encode("utf-8", "surrogatepass"), [], None)


@given(data=st.data())
def test_config_random_bytes_and_overrides(data: st.DataObject) -> None:
    text = data.draw(raw_documents())
    overrides = data.draw(st.lists(st.text(max_size=30), max_size=3))
    check_config(text, overrides, None)


@given(
    base=st.sampled_from(CONFIGS),
    key=st.sampled_from(DOTTED) | st.text(max_size=12),
    value=config_values(),
    as_override=st.booleans(),
)
def test_config_mutated(base: Path, key: str, value: Any, as_override: bool) -> None:
    check_mutated_config(base, key, value, as_override)


def check_mutated_config(base: Path, key: str, value: Any, as_override: bool) -> None:
    """One key of a working config set to anything, in the file or as an `a.b=c` override."""
    raw = yaml.safe_load(base.read_text())
    if as_override:  # what the key is once the CLI has split `KEY=VALUE` at the first '='
        touched = key.split("=", 1)[0].strip()
        check_config(yaml.safe_dump(raw).encode(), [f"{key}={yaml_scalar(value)}"], touched)
        return
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    check_config(yaml.safe_dump(raw).encode(), [], key)


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("train.lr=.nan", "train.lr"),  # NaN passed every range check (NaN < x is False)
        ("data.cache_gb=.inf", "data.cache_gb"),
        ("model.num_heads=0", "model.num_heads"),  # was a ZeroDivisionError
        ("train.steps=[", "train.steps"),  # was a raw yaml ParserError (a traceback)
        ("train.steps=!!python/object:os.system ls", "train.steps"),
        ("train.steps=" + "9" * 5000, "train.steps"),  # int() digit limit: a bare ValueError
    ],
)
def test_config_found_by_fuzzing(override: str, named: str) -> None:
    """The inputs hypothesis found, pinned: each is now one error naming its key."""
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS[0], [override])
    assert named in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "text", [b"\xff\xfe objective: mlm", b"[" * 20_000, b"objective: mlm\ntrain: " + b"{a: " * 5000]
)
def test_config_unreadable_files_name_the_file(tmp_path: Path, text: bytes) -> None:
    """Non-UTF-8 bytes and nesting deeper than the parser's recursion limit: the file's name."""
    path = tmp_path / "bad.yaml"
    path.write_bytes(text)
    with pytest.raises(ConfigError, match=str(path)):
        load_config(path)


# -- the manifest ---------------------------------------------------------------------------


def _manifest_doc(shards: int = 2) -> dict[str, Any]:
    infos = [ShardInfo(f"shard-{i:06d}.tar", 3, 1024, hashlib.sha256(b"%d" % i).hexdigest())
             for i in range(shards)]  # fmt: skip
    doc: dict[str, Any] = json.loads(Manifest("text", infos, "tokenizer.json").to_json())
    return doc


def _resigned(doc: Any) -> Any:
    """`doc` with num_samples and digest recomputed from its shard list where that is possible,
    so mutations reach the checks behind the digest (an attacker can recompute it too)."""
    with contextlib.suppress(Exception):
        doc["num_samples"] = sum(s["samples"] for s in doc["shards"])
        doc["digest"] = hashlib.sha256("".join(s["sha256"] for s in doc["shards"]).encode()
                                       ).hexdigest()  # fmt: skip
    return doc


def check_manifest(data: bytes) -> None:
    """Manifest.load: a manifest whose every shard can be fetched into the cache folder (and
    nowhere else), or one PrepareError line naming manifest.json."""
    with sandbox() as run:
        url = f"memory://fuzz-{uuid.uuid4().hex}/ds"
        storage.write_bytes(storage.join(url, MANIFEST), data)
        try:
            m = user_error(lambda: Manifest.load(url), PrepareError, MANIFEST)
            if m is None:
                return
            assert isinstance(m.num_samples, int) and m.num_samples >= 0
            assert all(type(s.samples) is int and s.samples >= 0 for s in m.shards)
            for s in m.shards[:3]:  # what the reader fetches: names and sha256 become paths
                storage.write_bytes(storage.join(url, s.name), b"\0" * 1024)
            # One try: a fetch that fails here fails for good (the default budget waits minutes).
            opts = ReaderOptions(
                cache_dir=str(run / "cache"), verify=False, retry=Retry(attempts=1)
            )
            cache = ShardCache(url, m, opts, IOStats())
            try:
                for i in range(min(3, len(m.shards))):
                    assert isinstance(cache.acquire(i), LocalShard)
            finally:
                cache.close()
        finally:
            storage.filesystem(url)[0].rm(url.removeprefix("memory://").split("/")[0],
                                          recursive=True)  # fmt: skip


@given(data=raw_documents())
def test_manifest_random(data: bytes) -> None:
    check_manifest(data)


@given(doc=mutated(_manifest_doc()), resign=st.booleans())
def test_manifest_mutated(doc: Any, resign: bool) -> None:
    check_manifest(json.dumps(_resigned(doc) if resign else doc).encode())


@pytest.mark.parametrize(
    ("field", "value"),
    [("name", "../../../escape.tar"), ("name", "/etc/passwd"), ("sha256", "../../../owned"),
     ("samples", -5), ("samples", 2.5), ("samples", True), ("bytes", "x"), ("name", 5)],
)  # fmt: skip
def test_manifest_found_by_fuzzing(field: str, value: Any) -> None:
    """Shard entries Manifest.load used to accept: names and digests that are paths out of the
    dataset or the shard cache, and counts that are not counts."""
    doc = _manifest_doc()
    doc["shards"][0][field] = value
    with sandbox() as run:
        (run / MANIFEST).write_text(json.dumps(_resigned(doc)))
        with pytest.raises(PrepareError, match=f"{MANIFEST}.*shards\\[0\\]"):
            Manifest.load(str(run))


# -- tar shards -----------------------------------------------------------------------------

MEMBER_NAMES = st.sampled_from(["s0.txt", "s0.input_ids.npy", "s1.txt", "dir/s2.png", "s3.pkl",
                                "../../x.txt", "/abs/x.txt", "a\0b.txt", "n" * 150 + ".txt",
                                "\u00e9t\u00e9.txt", "s0.txt"]) | st.text(max_size=20)  # fmt: skip


@st.composite
def tar_files(draw: st.DrawFn) -> bytes:
    """A tar in one of the three formats, of random members (duplicate keys, names with ../,
    absolute, NUL, long)."""
    fmt = draw(st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]))
    members = draw(st.lists(st.tuples(MEMBER_NAMES, st.binary(max_size=700)), max_size=6))
    buf = io.BytesIO()
    try:
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    except (ValueError, UnicodeError):
        assume(False)  # a name this format cannot hold: tarfile refuses to write it
    return buf.getvalue()


def read_shard(data: bytes, expected: int, cap: int = 1 << 20) -> list[dict[str, Any] | Hole]:
    """Index a shard file of these bytes and read every sample the manifest would ask for;
    asserts the reader's contract: a sample or a Hole each, in bounded time and memory."""
    with sandbox() as run:
        path = run / "shard.tar"
        path.write_bytes(data)
        shard = LocalShard("shard.tar", str(path), expected)
        tracemalloc.start()
        try:
            with within(10):
                shard.index(cap)
                out = [shard.read(j) for j in range(expected)]
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            shard.close()
        # Headers may declare any size: only what the file holds is ever read into memory.
        assert peak < 4 * len(data) + (1 << 20), (
            f"{peak} bytes allocated for a {len(data)}-byte file"
        )
        for sample in out:
            assert isinstance(sample, (dict, Hole)), type(sample)
            if isinstance(sample, dict):
                sizes = [len(v) for k, v in sample.items() if not k.startswith("__")]
                assert all(n <= cap for n in sizes) and sum(sizes) <= len(data)
        return out


@given(data=tar_files())
def test_tar_agrees_with_tarfile(data: bytes) -> None:
    """A well-formed tar of any members: every regular member's bytes are the ones tarfile
    reads, under the same name."""
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        want = [(m.name, t.extractfile(m).read()) for m in t.getmembers() if m.isreg()]  # type: ignore[union-attr]
    with sandbox() as run:
        (run / "s.tar").write_bytes(data)
        with open(run / "s.tar", "rb") as f:
            got = [(name, data[offset : offset + size]) for name, offset, size in tar_members(f)]
    assert got == want
    read_shard(
        data, expected=max(1, len({n.rpartition("/")[2].partition(".")[0] for n, _ in want}))
    )


@st.composite
def broken_tars(draw: st.DrawFn) -> bytes:
    """A valid tar, then damaged: bytes overwritten (header fields above all), a size field set
    to a huge, negative or non-octal value, or the file cut short."""
    data = bytearray(draw(tar_files()))
    assume(len(data) >= 512)
    for _ in range(draw(st.integers(1, 4))):
        if len(data) < 512:  # cut short already: nothing left to damage
            break
        header = 512 * draw(st.integers(0, len(data) // 512 - 1))
        edit = draw(st.sampled_from(["bytes", "size", "checksum", "truncate", "pax"]))
        if edit == "bytes":
            at = header + draw(st.sampled_from([0, 100, 124, 136, 148, 156, 257, 345, 511]))
            chunk = draw(st.binary(min_size=1, max_size=12))
            data[at : at + len(chunk)] = chunk
        elif edit == "size":
            field = draw(
                st.sampled_from(
                    [
                        b"-0000001000\0",
                        b"77777777777\0",
                        b"99999999999\0",
                        b"\x80" + (2**40).to_bytes(11, "big"),
                        b"\xff" * 12,
                        b"0o17\0       ",
                        b"           \0",
                    ]
                )
            )
            data[header + 124 : header + 136] = field
            _checksum(data, header)
        elif edit == "checksum":
            _checksum(data, header)  # a header whose other edits still pass the checksum
        elif edit == "pax":
            record = draw(st.sampled_from([b"0 path=x\n", b"-9 path=x\n", b"16 size=-100000\n",
                                           b"30 size=1099511627776\n", b"99999 path=x\n",
                                           b"13 path=../../x\n", b"9 size\n", b"x"]))  # fmt: skip
            data[:0] = _pax_header(record)
        else:
            data = data[: draw(st.integers(0, len(data) - 1))]
    return bytes(data)


def _checksum(data: bytearray, header: int) -> None:
    """Make the header at `header` pass its checksum whatever its other fields hold."""
    block = data[header : header + 512]
    if len(block) == 512:
        total = sum(block[:148]) + sum(block[156:]) + 8 * 32
        data[header + 148 : header + 156] = b"%06o\0 " % (total % 8**6)


def _pax_header(records: bytes) -> bytes:
    """A pax extended header block holding `records` verbatim, valid checksum included."""
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, len(records)
    return info.tobuf(format=tarfile.USTAR_FORMAT) + records + bytes(-len(records) % 512)


@given(data=broken_tars(), expected=st.integers(1, 5))
def test_tar_broken(data: bytes, expected: int) -> None:
    read_shard(data, expected)


@given(data=st.binary(min_size=1, max_size=3000), expected=st.integers(1, 3))
def test_tar_random_bytes(data: bytes, expected: int) -> None:
    read_shard(data, expected)


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d[:124] + b"-0000001000\0" + d[136:],  # negative octal size: looped for ever
        lambda d: _pax_header(b"0 path=x\n") + d,  # pax record of length 0: looped for ever
        lambda d: _pax_header(b"16 size=-100000\n") + d,  # negative pax size: read backwards
    ],
)
def test_tar_found_by_fuzzing(damage: Callable[[bytes], bytes]) -> None:
    """Headers that made the parser loop for ever or walk backwards: now a hole that says why."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("k.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    data = bytearray(damage(buf.getvalue()))
    _checksum(data, len(data) - len(buf.getvalue()))
    (sample,) = read_shard(bytes(data), expected=1)
    assert isinstance(sample, Hole) and "tar" in sample.reason, sample


def test_tar_duplicate_member_is_a_hole() -> None:
    """Two members of one sample with the same extension: which one is the sample? Neither."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for data in (b"first", b"second"):
            info = tarfile.TarInfo("k.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (sample,) = read_shard(buf.getvalue(), expected=1)
    assert isinstance(sample, Hole) and sample.reason == "duplicate member: txt appears twice"


def test_tar_declared_size_is_never_allocated() -> None:
    """A header declaring 2**40 bytes of data in a 1.5 kB file: a hole, and no 1 TB buffer."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("k.txt")
        info.size = 10
        tar.addfile(info, io.BytesIO(b"0123456789"))
    data = bytearray(buf.getvalue())
    data[124:136] = b"\x80" + (2**40).to_bytes(11, "big")
    _checksum(data, 0)
    (sample,) = read_shard(bytes(data), expected=1, cap=2**41)
    assert sample == Hole("shard.tar", "k", "truncated tar")


# -- COMMIT.json ----------------------------------------------------------------------------

TAG = "step00000007"


def _commit_doc(files: dict[str, bytes]) -> dict[str, Any]:
    return {"version": ckpt.COMMIT_VERSION, "tag": TAG, "step": 7, "world_size": 2,
            "committed_at": "2026-01-01T00:00:00Z",
            "files": {n: {"size": len(b), "sha256": hashlib.sha256(b).hexdigest()}
                      for n, b in files.items()}}  # fmt: skip


FILES = {"mp_rank_00_model_states.pt": b"model", "trainer_state_rank0.json": b"{}",
         "trainer_state_rank1.json": b"{}", "rng_rank1.pt": b"rng"}  # fmt: skip


def check_commit(data: bytes) -> None:
    """read_commit of a remote checkpoint, then a resume's fetch of every file it lists: a
    record whose files land in the staging folder (and nowhere else), or one CheckpointError
    line naming COMMIT.json (CorruptCheckpoint when garbled)."""
    with sandbox() as run:
        root = f"memory://fuzz-{uuid.uuid4().hex}/ckpt"
        try:
            storage.write_bytes(storage.join(root, TAG, ckpt.COMMIT), data)
            record = user_error(lambda: ckpt.read_commit(root, TAG), ckpt.CheckpointError,
                                ckpt.COMMIT)  # fmt: skip
            if record is None:
                return
            ckpt.index_entry(root, record)  # what tracking publishes: every field is there
            for rank in range(2):
                ckpt.files_to_fetch(record, rank, 2, leader=rank == 0)
            for name in record["files"]:  # the objects exist; their bytes may not match
                storage.write_bytes(storage.join(root, TAG, name), FILES.get(name, b"?"))
            staging = run / "staging"
            folder = user_error(
                lambda: ckpt.fetch(root, TAG, staging, everything=True, record=record),
                ckpt.CorruptCheckpoint, "",
            )  # fmt: skip
            if folder is not None:  # every listed file, nothing else, none of them elsewhere
                got = {p.relative_to(staging / TAG).as_posix() for p in (staging / TAG).rglob("*")
                       if p.is_file()}  # fmt: skip
                assert got == set(record["files"])
        finally:
            storage.filesystem(root)[0].rm(root.removeprefix("memory://").split("/")[0],
                                           recursive=True)  # fmt: skip


@given(data=raw_documents())
def test_commit_random(data: bytes) -> None:
    check_commit(data)


@given(doc=mutated(_commit_doc(FILES)))
def test_commit_mutated(doc: Any) -> None:
    check_commit(json.dumps(doc).encode())


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["files"].update({"../../../escape.pt": d["files"]["rng_rank1.pt"]}),
        lambda d: d["files"].update({"/tmp/abs.pt": d["files"]["rng_rank1.pt"]}),
        lambda d: d.update(files=[1]),  # was an AttributeError
        lambda d: d.update(world_size="two"),  # accepted; the resume failed on int("two")
        lambda d: d.pop("step"),  # accepted; the checkpoint index failed with a KeyError
        lambda d: d["files"]["rng_rank1.pt"].update(size=True),
    ],
)
def test_commit_found_by_fuzzing(edit: Callable[[dict[str, Any]], None]) -> None:
    """Records read_commit used to accept or crash on: file names that are paths out of the
    staging folder (a resume downloaded there), and fields its readers then tripped over."""
    doc = _commit_doc(FILES)
    edit(doc)
    with sandbox() as run:
        (run / TAG).mkdir()
        (run / TAG / ckpt.COMMIT).write_text(json.dumps(doc))
        with pytest.raises(ckpt.CorruptCheckpoint, match="garbled commit record"):
            ckpt.read_commit(str(run), TAG)


# -- claim records --------------------------------------------------------------------------


def _claim_doc(owner: str = "other", expires_in: float = 600.0) -> dict[str, Any]:
    now = time.time()
    return {"owner": owner, "token": uuid.uuid4().hex, "state": claims.HELD,
            "claimed_at": now, "expires_at": now + expires_in}  # fmt: skip


def _live_elsewhere(data: bytes) -> bool:
    """The contract: only a readable, held, unexpired claim of another owner blocks; anything
    garbled counts as expired."""
    try:
        held = json.loads(data)
        expires_at = float(held["expires_at"])
    except Exception:
        return False
    return (isinstance(held, dict) and held.get("state") not in (claims.RELEASED, claims.DONE)
            and held.get("owner") != "me" and expires_at > time.time())  # fmt: skip


def check_claim(data: bytes) -> None:
    """try_claim over an existing record of these bytes: None exactly when a live claim of
    another harness is there, else a held claim of ours; never an exception, and nothing
    written beside the claims folder."""
    with sandbox() as run:
        url = str(run / "claims" / "run1" / f"{TAG}.json")
        storage.write_bytes(url, data)
        claim = claims.try_claim(url, "me", ttl_s=60.0)
        if _live_elsewhere(data):
            assert claim is None
        else:
            assert claim is not None
            now = json.loads(Path(url).read_bytes())
            assert (now["owner"], now["state"], now["token"]) == ("me", claims.HELD, claim.token)
            assert claim.release() and json.loads(Path(url).read_bytes())["state"] == "released"


@given(data=raw_documents())
def test_claim_random(data: bytes) -> None:
    check_claim(data)


@given(doc=mutated(_claim_doc()), owner=st.sampled_from(["me", "other"]))
def test_claim_mutated(doc: Any, owner: str) -> None:
    if isinstance(doc, dict) and owner == "me":
        doc["owner"] = owner
    check_claim(json.dumps(doc).encode())


@pytest.mark.parametrize(
    "data",
    [
        b'{"owner": "x", "state": "held", "expires_at": 1' + b"0" * 400 + b"}",
        b"[" * 100_000 + b"]" * 100_000,
    ],
)
def test_claim_found_by_fuzzing(data: bytes) -> None:
    """A claim whose expiry no float can hold (was an OverflowError) and one nested deeper than
    the JSON parser's recursion (was a RecursionError): garbled, so expired, so ours."""
    check_claim(data)


# -- through the CLI ------------------------------------------------------------------------


def _error_line(proc: Any) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ": error: " in ln]
    assert len(errors) == 1, proc.stderr[-2000:]
    line: str = errors[0]
    return line


@pytest.mark.slow  # two CLI processes, ~15 s: the error paths they reach run in-process above
def test_cli_bad_config_and_bad_manifest(tmp_path: Path) -> None:
    """`darkmatter pretrain` on a config the fuzzer broke, and on a dataset whose manifest names
    a shard outside it: exit 2, one error line, no traceback, nothing written."""
    raw = yaml.safe_load((REPO_ROOT / "configs" / "quickstart_mlm.yaml").read_text())
    raw["train"]["run_dir"] = str(tmp_path / "run")
    raw["tracking"] = {"enabled": False}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**raw, "train": {**raw["train"], "lr": math.nan}}))
    line = _error_line(run_darkmatter("pretrain", str(bad)))
    assert line.endswith("train.lr: expected a finite number, got nan"), line
    ds = tmp_path / "ds"
    ds.mkdir()
    doc = _manifest_doc()
    doc["shards"][1]["name"] = "../../outside.tar"
    (ds / MANIFEST).write_text(json.dumps(_resigned(doc)))
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({**raw, "data": {**raw["data"], "url": str(ds)}}))
    line = _error_line(run_darkmatter("pretrain", str(good)))
    assert f"{ds / MANIFEST}: shards[1].name: '../../outside.tar' is not a relative path" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "ds", "good.yaml"]


# -- the slow tier: the same properties, many more examples ------------------------------------

SOAK = settings(settings.get_profile("soak"))


@pytest.mark.slow
@SOAK
@given(base=st.sampled_from(CONFIGS), key=st.sampled_from(DOTTED) | st.text(max_size=12),
       value=config_values(), as_override=st.booleans())  # fmt: skip
def test_soak_config(base: Path, key: str, value: Any, as_override: bool) -> None:
    check_mutated_config(base, key, value, as_override)


@pytest.mark.slow
@SOAK
@given(doc=mutated(_manifest_doc()) | raw_documents(), resign=st.booleans())
def test_soak_manifest(doc: Any, resign: bool) -> None:
    check_manifest(
        doc if isinstance(doc, bytes) else json.dumps(_resigned(doc) if resign else doc).encode()
    )


@pytest.mark.slow
@SOAK
@given(data=broken_tars() | st.binary(min_size=1, max_size=3000), expected=st.integers(1, 5))
def test_soak_tar(data: bytes, expected: int) -> None:
    read_shard(data, expected)


@pytest.mark.slow
@SOAK
@given(doc=mutated(_commit_doc(FILES)) | raw_documents())
def test_soak_commit(doc: Any) -> None:
    check_commit(doc if isinstance(doc, bytes) else json.dumps(doc).encode())


@pytest.mark.slow
@SOAK
@given(doc=mutated(_claim_doc()) | raw_documents())
def test_soak_claim(doc: Any) -> None:
    check_claim(doc if isinstance(doc, bytes) else json.dumps(doc).encode())


def test_profiles_are_registered() -> None:
    """make test runs the "ci" profile unless DARKMATTER_HYPOTHESIS_PROFILE names another."""
    ci, soak = settings.get_profile("ci"), settings.get_profile("soak")
    assert ci.max_examples < soak.max_examples
    assert ci.deadline is None and soak.deadline is None  # load, not code, sets the pace here
    wanted = os.environ.get("DARKMATTER_HYPOTHESIS_PROFILE", "ci")
    current = settings.default
    assert current is not None and current.max_examples == settings.get_profile(wanted).max_examples
