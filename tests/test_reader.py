"""DataStream: one epoch order for every world size and worker count, exact and elastic resume.

The order's definition is in data_pipeline/reader/order.py: global sample g of an epoch is output
g // P of partition g % P, and step t trains on g in [t·B, (t+1)·B). These tests run the ranks
of a layout one after another in this process (ranks are independent readers) and compare what
they yield with an uninterrupted single-rank run.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from darkmatter.data_pipeline.prepare import prepare
from darkmatter.data_pipeline.reader import (
    DataError,
    DataStream,
    EpochPlan,
    LocalShard,
    ReaderOptions,
    Slot,
    iter_dataset,
)

N = 611  # samples: not a multiple of anything below, so partitions drop a tail
P = 72  # partitions: divisible by every world_size x slots in 1..4 x 1..3
B = 72  # global batch
BUF = 6


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("reader")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(f"document {i} " + "word " * (i % 17) + "\n" for i in range(N)))
    # Small shards of uneven sample counts, so partitions straddle shard boundaries.
    m = prepare(
        [str(corpus)], str(root / "ds"), modality="text", vocab_size=100, shard_bytes=30_000
    )
    assert m.num_samples == N and len(m.shards) >= 8
    assert len({s.samples for s in m.shards}) > 1
    return str(root / "ds")


def open_rank(url: str, rank: int, world: int, workers: int, **kw: Any) -> DataStream:
    accum = kw.pop("grad_accum", 1)
    return DataStream(
        url, rank=rank, world_size=world, micro_batch_size=B // world // accum, grad_accum=accum,
        num_workers=workers, seed=kw.pop("seed", 5), partitions=kw.pop("partitions", P),
        options=ReaderOptions(shuffle_buffer=kw.pop("buf", BUF), **kw),
    )  # fmt: skip


def run_layout(
    url: str, world: int, workers: int, steps: int, resume: list[dict[str, Any]] | None = None
) -> tuple[list[list[tuple[int, str]]], list[dict[str, Any]]]:
    """Each rank's yield sequence [(g, key), ...] per rank, and the states they end with."""
    per_rank, states = [], []
    for rank in range(world):
        s = open_rank(url, rank, world, workers)
        if resume is not None:
            s.load_state_dict(resume)
        seq = []
        for _ in range(steps):
            micro_batches = s.next_step()
            start = (s.epoch, s.step - 1)  # the step just taken (next_step may start an epoch)
            for micro in micro_batches:
                for sample in micro:
                    g = sample["__index__"]
                    # Every sample a rank yields at step t belongs to global step t.
                    assert g // B == start[1], (g, start)
                    seq.append((start[0] * 10**6 + g, sample["__key__"]))
        per_rank.append(seq)
        states.append(s.state_dict())
        s.close()
    return per_rank, states


def global_sequence(pieces: list[list[tuple[int, str]]]) -> list[str]:
    """Place every yielded key at its global index; duplicates and gaps fail loudly."""
    where: dict[int, str] = {}
    for seq in pieces:
        for g, key in seq:
            assert g not in where, f"global sample {g} yielded twice"
            where[g] = key
    order = sorted(where)
    assert order == list(range(order[0], order[0] + len(order))) or _two_epochs(order)
    return [where[g] for g in order]


def _two_epochs(order: list[int]) -> bool:
    first = [g for g in order if g < 10**6]
    second = [g - 10**6 for g in order if g >= 10**6]
    return first == list(range(len(first))) and second == list(range(len(second)))


@pytest.fixture(scope="module")
def baseline(dataset: str) -> tuple[int, list[str]]:
    steps = open_rank(dataset, 0, 1, 0).steps_per_epoch
    seq, _ = run_layout(dataset, 1, 0, 2 * steps)
    return steps, global_sequence(seq)


def test_epoch_plan_is_exactly_the_documented_order(dataset: str) -> None:
    s = open_rank(dataset, 0, 1, 0)
    plan = EpochPlan(s.manifest, 5, 0, P, B)
    assert plan.part_len == N // P and plan.steps == P * (N // P) // B == s.steps_per_epoch
    # Partitions tile the epoch's shard sequence without overlap, in order.
    covered = [(seg.shard, j) for p in range(P) for seg in plan.segments(p) for j in
               range(seg.start, seg.stop)]  # fmt: skip
    assert len(covered) == len(set(covered)) == P * plan.part_len
    assert [plan.locate(p, i) for p in range(P) for i in range(plan.part_len)] == covered
    # The shard permutation changes with the epoch and the seed, not otherwise.
    assert plan.shard_order == EpochPlan(s.manifest, 5, 0, P, B).shard_order
    assert plan.shard_order != EpochPlan(s.manifest, 5, 1, P, B).shard_order
    assert plan.shard_order != EpochPlan(s.manifest, 6, 0, P, B).shard_order
    s.close()


def test_two_epochs_differ_and_each_uses_each_sample_once(baseline: tuple[int, list[str]]) -> None:
    steps, seq = baseline
    one, two = seq[: steps * B], seq[steps * B :]
    assert len(one) == len(two) == steps * B == P * (N // P)
    assert len(set(one)) == len(one) and len(set(two)) == len(two)
    assert one != two and set(one) != set(two)  # a different permutation drops another tail


def test_shuffle_buffer_mixes_within_partitions(dataset: str) -> None:
    """Without a buffer, partition p's outputs are its inputs in order; with one they move."""
    plain = open_rank(dataset, 0, 1, 0, buf=0)
    keys = [s["__key__"] for s in plain.next_step()[0]]
    plan = EpochPlan(plain.manifest, 5, 0, P, B)
    in_order = [s["__key__"] for s in iter_dataset(dataset)]
    starts = [
        sum(sh.samples for sh in plain.manifest.shards[:i])
        for i in range(len(plain.manifest.shards))
    ]
    first_of = [plan.locate(p, 0) for p in range(P)]  # step 0 takes output 0 of each partition
    assert keys == [in_order[starts[shard] + j] for shard, j in first_of]
    plain.close()
    shuffled = open_rank(dataset, 0, 1, 0)
    assert [s["__key__"] for s in shuffled.next_step()[0]] != keys
    shuffled.close()


@pytest.mark.parametrize(("world", "workers"), [(2, 2), (3, 0), (4, 3)])
def test_any_layout_yields_the_same_global_sequence(
    dataset: str, baseline: tuple[int, list[str]], world: int, workers: int
) -> None:
    steps, seq = baseline
    pieces, _ = run_layout(dataset, world, workers, steps)
    assert global_sequence(pieces) == seq[: steps * B]


layouts = st.tuples(st.integers(1, 4), st.integers(0, 3))


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(first=layouts, second=layouts, third=layouts, data=st.data())
def test_interrupted_and_elastic_resume_is_exactly_once(
    dataset: str,
    baseline: tuple[int, list[str]],
    first: tuple[int, int],
    second: tuple[int, int],
    third: tuple[int, int],
    data: st.DataObject,
) -> None:
    """Stop anywhere in two epochs, resume on any world size / worker count, twice."""
    steps, seq = baseline
    total = 2 * steps
    a = data.draw(st.integers(0, total), label="first stop")
    b = data.draw(st.integers(a, total), label="second stop")
    p1, s1 = run_layout(dataset, *first, a)
    p2, s2 = run_layout(dataset, *second, b - a, resume=s1)
    p3, _ = run_layout(dataset, *third, total - b, resume=s2)
    assert global_sequence(p1 + p2 + p3) == seq
    # Unsorted, rank by rank: resuming on the same layout continues each rank's own sequence.
    if first == second:
        whole, _ = run_layout(dataset, *first, b)
        assert [x + y for x, y in zip(p1, p2, strict=True)] == whole


def test_resume_reads_back_only_the_shuffle_buffer(
    dataset: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cost of a resume: one read per buffered sample, wherever in the epoch it happens."""
    reads: list[int] = []
    real = LocalShard.read

    def counting(self: LocalShard, j: int) -> Any:
        reads.append(j)
        return real(self, j)

    monkeypatch.setattr(LocalShard, "read", counting)
    for stop in (1, 7):  # early and late in an epoch of 8 steps
        _, states = run_layout(dataset, 1, 0, stop)
        parts = {int(p): st for p, st in states[0]["parts"].items()}
        buffered = sum(len(st["buf"]) for st in parts.values())
        assert 0 < buffered <= P * BUF
        s = open_rank(dataset, 0, 1, 0)
        reads.clear()
        slot = Slot(s.spec, 0, 0, parts)  # rebuilds every partition from its state
        assert len(reads) == buffered
        assert all(part.out == stop * B // P for part in slot.parts.values())
        slot.close()
        s.close()


def test_state_mismatches_are_refused_with_the_reason(dataset: str, tmp_path: Path) -> None:
    _, states = run_layout(dataset, 2, 0, 2)
    s = open_rank(dataset, 0, 1, 0, seed=6)
    with pytest.raises(ValueError, match="seed was 5, is 6 now"):
        s.load_state_dict(states)
    s = open_rank(dataset, 0, 1, 0, partitions=36)
    with pytest.raises(ValueError, match="partitions was 72, is 36 now"):
        s.load_state_dict(states)
    s = open_rank(dataset, 0, 1, 0)
    with pytest.raises(ValueError, match=r"no state for partitions \[1, 3, 5"):
        s.load_state_dict(states[:1])  # rank 1's file lost
    with pytest.raises(ValueError, match="dataset \\(manifest digest\\) was"):
        s.load_state_dict([{**st, "dataset_digest": "0" * 64} for st in states])
    with pytest.raises(ValueError, match="positions"):
        s.load_state_dict([states[0], {**states[1], "step": 1}])
    s.load_state_dict(states)
    assert (s.epoch, s.step) == (0, 2)


def test_layout_and_size_errors(dataset: str) -> None:
    with pytest.raises(ValueError, match="multiples of world_size x max\\(1, num_workers\\) = 8"):
        open_rank(dataset, 0, 4, 2, partitions=36)
    with pytest.raises(ValueError, match="give no full global batch"):
        DataStream(dataset, rank=0, world_size=1, micro_batch_size=700, partitions=1)
    with pytest.raises(ValueError, match="rank 2 is not in"):
        open_rank(dataset, 2, 2, 0)


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_two_ranks_two_workers_interrupted_at_first_middle_last_batch(
    dataset: str, baseline: tuple[int, list[str]], where: str
) -> None:
    """The fault catalogue's case, spelled out: 2 ranks x 2 workers stopped after the first,
    a middle or the last batch of an epoch, resumed on the same layout."""
    steps, seq = baseline
    stop = {"first": 1, "middle": steps // 2, "last": steps}[where]
    before, states = run_layout(dataset, 2, 2, stop)
    after, _ = run_layout(dataset, 2, 2, steps - stop + 1, resume=states)  # into epoch 2
    whole, _ = run_layout(dataset, 2, 2, steps + 1)
    assert [x + y for x, y in zip(before, after, strict=True)] == whole
    assert global_sequence(before + after) == seq[: steps * B + B]


def _large_pieces(slot: int) -> Any:
    """Endless 8 MB pieces (a step of decoded images): each takes a worker's queue feeder
    thread many pipe writes, so a stop arrives while one is half-written."""
    import itertools

    return (bytes([slot]) * (8 << 20) for _ in itertools.count())


def test_close_returns_while_a_worker_was_writing_a_large_piece() -> None:
    """Workers.close right after a step, workers running ahead with large pieces: it returns
    within seconds every time (it used to wait forever on a half-written piece: the receiver
    read on, and this process's own copy of the pipe's write end kept it from seeing EOF)."""
    import threading

    from darkmatter.data_pipeline.reader.workers import Workers

    for _ in range(6):
        pool = Workers(_large_pieces, rank=0, slots=2)
        step = pool.next_step()
        assert [len(p) for p in step] == [8 << 20, 8 << 20] and step[1][:1] == b"\x01"
        closing = threading.Thread(target=pool.close, daemon=True)
        closing.start()
        closing.join(timeout=20)
        assert not closing.is_alive(), "close() is stuck"
        assert not any(p.is_alive() for p in pool.procs)


def _count_tokens(sample: dict[str, Any]) -> dict[str, Any]:
    if sample["__key__"].endswith("7"):
        raise ValueError("no sevens")
    sample["tokens"] = len(sample["input_ids"])
    return sample


def test_a_transform_runs_in_the_workers_and_its_error_names_the_sample(dataset: str) -> None:
    """ReaderOptions.transform runs on each decoded sample where it was decoded (in the worker
    processes here); its exception stops the stream with one line naming the sample."""
    import os

    def where(sample: dict[str, Any]) -> dict[str, Any]:
        sample["pid"] = os.getpid()
        return sample

    s = open_rank(dataset, 0, 1, 2, transform=where)
    try:
        pids = {x["pid"] for x in s.next_step()[0]}
    finally:
        s.close()
    assert len(pids) == 2 and os.getpid() not in pids
    s = open_rank(dataset, 0, 1, 2, transform=_count_tokens)
    try:
        with pytest.raises(DataError) as e:
            for _ in range(s.steps_per_epoch):
                for x in s.next_step()[0]:
                    assert x["tokens"] == len(x["input_ids"])
    finally:
        s.close()
    assert re.fullmatch(
        r"shard \S+\.tar, sample \S+7: data transform _count_tokens failed: "
        r"ValueError: no sevens",
        str(e.value),
    ), str(e.value)


def test_arena_moves_large_arrays_and_pickles_the_rest() -> None:
    """A piece's large arrays go through the worker's shared arena (any dtype, layout and
    shape, copied back out as the rank's own arrays); small ones, object arrays and what does
    not fit in a slot stay in the piece as they were."""
    import pickle

    import numpy as np

    from darkmatter.data_pipeline.reader import workers
    from darkmatter.data_pipeline.reader.cache import IOStats
    from darkmatter.data_pipeline.reader.slots import Piece

    rng = np.random.default_rng(0)
    big = rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)
    wave = rng.standard_normal(40_000).astype(np.float32)
    strided = rng.standard_normal((300, 200))[:, ::2]  # float64, not contiguous
    huge = np.zeros(workers.ARENA_SLOT_BYTES // 8 + 1, np.float64)  # over a slot: pickled
    small = np.arange(10)
    arena = workers.Arena(3)
    sent = []
    for k in range(5):  # around the slots more than once
        items = [(0, {"image": big + k, "ids": small}), (1, None),
                 (2, {"audio": wave * k, "x": strided, "huge": huge})]  # fmt: skip
        piece = Piece(0, k, 0, items, {}, [], IOStats())
        packed = pickle.loads(pickle.dumps(arena.pack(piece)))  # as the queue sends it
        assert len(pickle.dumps(packed)) < huge.nbytes + 4096  # only `huge` travels inline
        assert isinstance(packed.items[0][1]["image"], workers._InArena)
        assert isinstance(packed.items[2][1]["huge"], np.ndarray)
        got = arena.unpack(packed)
        sent.append(got)
        assert np.array_equal(got.items[0][1]["image"], big + k)
        assert np.array_equal(got.items[0][1]["ids"], small) and got.items[1][1] is None
        assert got.items[2][1]["audio"].dtype == np.float32
        assert np.array_equal(got.items[2][1]["audio"], wave * k)
        assert np.array_equal(got.items[2][1]["x"], strided)
    # Received arrays are copies: later pieces in the same slot do not change them.
    assert all(np.array_equal(p.items[0][1]["image"], big + k) for k, p in enumerate(sent))


def test_image_decode_is_upright_rgb_whatever_the_stored_mode() -> None:
    """A camera JPEG whose EXIF says "rotate 90° clockwise to view" decodes upright; grayscale
    and palette images decode to 3 channels; plain RGB decodes to exactly Pillow's pixels."""
    import io

    import numpy as np
    from PIL import Image

    from darkmatter.data_pipeline.reader.decode import decode

    def encoded(im: Image.Image, fmt: str, **kw: Any) -> bytes:
        buf = io.BytesIO()
        im.save(buf, fmt, **kw)
        return buf.getvalue()

    wide = Image.new("RGB", (40, 20), (200, 30, 30))
    wide.paste((30, 30, 200), (0, 0, 10, 20))  # a blue left edge: where it goes shows the turn
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the stored pixels are turned 90° counter-clockwise
    turned = decode({"__key__": "a", "jpg": encoded(wide, "JPEG", quality=95, exif=exif)}, "image")
    img = turned["image"]
    assert img.shape == (40, 20, 3) and img.dtype == np.uint8
    assert img[:8, :, 2].mean() > 150 and img[-8:, :, 2].mean() < 80  # blue at the top now

    plain = encoded(wide, "JPEG", quality=95)
    got = decode({"__key__": "b", "jpg": plain}, "image")["image"]
    assert np.array_equal(got, np.asarray(Image.open(io.BytesIO(plain)).convert("RGB")))
    assert got.flags.writeable  # a transform may work on it in place
    for mode in ("L", "P", "RGBA"):
        png = encoded(wide.convert(mode), "PNG")
        assert decode({"__key__": mode, "png": png}, "image")["image"].shape == (20, 40, 3)
