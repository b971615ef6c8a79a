"""The evaluation harness: protocols against direct formulas, task files and their three kinds of
labeled data, claims on the real S3 server, and two watching harnesses (one killed and started
again mid-evaluation) against a training run that commits checkpoints to S3 and MLflow: every
checkpoint evaluated exactly once at its own step, a corrupt one reported, a torn one never
loaded."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from darkmatter import storage
from darkmatter.evaluation import claims
from darkmatter.evaluation.probe import knn
from darkmatter.evaluation.tasks import TaskError, TaskSpec, load_labeled, load_tasks
from tests.helpers import REPO_ROOT, toy_text_task, write_config


@pytest.mark.parametrize("blocks", [(256, 2048), (7, 5)])  # one block; 7 test x 5 train rows
def test_knn_is_the_weighted_cosine_vote(blocks: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(60, 8))
    labels = rng.integers(0, 3, size=60)
    train, test = np.arange(40), np.arange(40, 60)
    got = knn(feats, labels, train, test, k=5, temperature=0.1, queries=blocks[0], keys=blocks[1])
    f = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    want = []
    for i in test:  # the definition, one test example at a time
        sims = [(float(f[i] @ f[j]), j) for j in train]
        top = sorted(sims, reverse=True)[:5]
        votes = [0.0, 0.0, 0.0]
        for s, j in top:
            votes[labels[j]] += np.exp(s / 0.1)
        want.append(int(np.argmax(votes)))
    assert got.y_pred.tolist() == want
    assert got.accuracy == pytest.approx(np.mean(np.array(want) == labels[test]))


@pytest.mark.parametrize("block_bytes", [4 << 20, 256 * 32 * 8])  # 1 block; 2 (256 + 164 rows)
def test_linear_probe_reaches_scikit_learns_optimum(block_bytes: int) -> None:
    """The same objective as LogisticRegression(C) on standardized features, minimized to a
    tight tolerance: the same predictions as scikit-learn's solver run to that tolerance, on
    features of very different scales, with the mini-batches summed or not."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from darkmatter.evaluation.probe import linear_probe

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=600)
    centers = rng.normal(size=(4, 32)) * 0.3
    scales = rng.uniform(0.1, 10, size=32)
    feats = ((centers[labels] + rng.normal(size=(600, 32))) * scales).astype(np.float32)
    feats[:, 5] = 3.0  # a constant feature: scaled by 1, as scikit-learn does
    train, test = np.arange(420), np.arange(420, 600)
    scaler = StandardScaler().fit(feats[train])
    clf = LogisticRegression(C=0.5, tol=1e-8, max_iter=10000)
    want = clf.fit(scaler.transform(feats[train]), labels[train]).predict(
        scaler.transform(feats[test])
    )
    got = linear_probe(feats, labels, train, test, C=0.5, block_bytes=block_bytes)
    assert got.y_pred.tolist() == want.tolist()
    assert (got.n_train, got.n_test) == (420, 180) and 0.5 < got.accuracy < 1.0


def test_features_made_by_loader_workers_are_those_made_in_process(tmp_path: Path) -> None:
    """embed(workers=2): two DataLoader processes read a lazily loaded Parquet set and make the
    inputs (the encoder's process makes none), and the features are the same, in the same
    order, as made in process."""
    import os

    import torch
    from transformers import BertConfig, BertModel

    from darkmatter.evaluation.probe import Batches, embed

    texts = [f"row {i} " + "ab" * (i % 5) for i in range(70)]
    pq.write_table(pa.table({"text": texts, "label": [i % 2 for i in range(70)]}),
                   tmp_path / "t.parquet", row_group_size=16)  # fmt: skip
    data = load_labeled(TaskSpec(name="t", data=str(tmp_path / "t.parquet")))
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=64)).eval()  # fmt: skip
    makers = tmp_path / "pids"
    makers.mkdir()

    def make(rows: np.ndarray) -> dict[str, torch.Tensor]:
        (makers / str(os.getpid())).touch()
        ids = torch.tensor([[1 + ord(c) % 63 for c in (t + " " * 8)[:8]] for t in data.take(rows)])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    here = embed(model, Batches(70, make), batch_size=16, workers=0)
    assert [p.name for p in makers.iterdir()] == [str(os.getpid())]
    for p in makers.iterdir():
        p.unlink()
    there = embed(model, Batches(70, make), batch_size=16, workers=2)
    pids = {p.name for p in makers.iterdir()}
    assert len(pids) == 2 and str(os.getpid()) not in pids
    np.testing.assert_array_equal(np.asarray(here), np.asarray(there))
    data.close()


def test_linear_probe_C_auto_is_scikit_learns_cross_validated_choice() -> None:
    """C: auto on features where C=1 overfits (few examples, many noise dimensions): the C of
    the grid with scikit-learn's best cross-validated accuracy on the same stratified folds of
    the training rows (the test rows unseen), a far smaller one, and a better test score."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from darkmatter.evaluation.probe import C_FOLDS, C_GRID, linear_probe

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, size=450)
    feats = rng.normal(size=(450, 120)).astype(np.float32)
    feats[:, :3] += 1.2 * np.eye(3, dtype=np.float32)[labels]  # 3 informative dimensions
    train, test = np.arange(150), np.arange(150, 450)
    folds = StratifiedKFold(C_FOLDS, shuffle=True, random_state=7)
    scores = [cross_val_score(make_pipeline(StandardScaler(), LogisticRegression(
        C=c, tol=1e-8, max_iter=10000)), feats[train], labels[train], cv=folds).mean()
        for c in C_GRID]  # fmt: skip
    want = C_GRID[int(np.argmax(np.round(scores, 9)))]
    auto = linear_probe(feats, labels, train, test, C="auto", seed=7)
    fixed = linear_probe(feats, labels, train, test, C=1.0)
    assert want == auto.C and want <= 0.03, (scores, auto.C)
    assert fixed.C == 1.0 and auto.accuracy > fixed.accuracy + 0.03, (auto.accuracy, fixed.accuracy)


def test_features_stream_into_a_file_a_batch_at_a_time(tmp_path: Path) -> None:
    """embed makes each batch's inputs when it needs them and can write the features to an
    .npy file: the same features as from inputs made up front, read back by rows."""
    import torch
    from transformers import BertConfig, BertModel

    from darkmatter.evaluation.probe import Batches, FeatureFile, embed

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=16, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=64)).eval()  # fmt: skip
    ids = torch.randint(1, 16, (50, 6))
    asked: list[int] = []

    def make(rows: np.ndarray) -> dict[str, torch.Tensor]:
        asked.append(len(rows))
        return {
            "input_ids": ids[rows],
            "attention_mask": torch.ones(len(rows), 6, dtype=torch.long),
        }

    streamed = embed(model, Batches(50, make), batch_size=16, out=tmp_path / "f.npy")
    whole = embed(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert asked == [16, 16, 16, 2] and isinstance(streamed, FeatureFile)
    assert isinstance(whole, np.ndarray)
    np.testing.assert_allclose(np.load(tmp_path / "f.npy"), whole, rtol=1e-5, atol=1e-6)
    for rows in ([40, 3, 17, 17, 49], [5, 6, 7, 8, 6], [], [49]):  # sparse, dense, none, last
        got = streamed[np.array(rows, dtype=np.int64)]
        np.testing.assert_allclose(got, whole[rows], rtol=1e-5, atol=1e-6)
    with pytest.raises(IndexError, match="rows out of range"):
        streamed[np.array([50])]
    streamed.close()


def test_finetune_trains_the_encoder_and_its_head() -> None:
    import torch
    from transformers import BertConfig, BertModel

    from darkmatter.evaluation.probe import finetune

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=16, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=64))  # fmt: skip
    labels = np.arange(80) % 2
    ids = torch.full((80, 6), 1)
    ids[:, 2] = torch.as_tensor(5 + labels)  # the class is one token, in the middle
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    before = model.encoder.layer[0].attention.self.query.weight.clone()
    got = finetune(model, inputs, labels, np.arange(60), np.arange(60, 80), epochs=3, lr=3e-3,
                   batch_size=8)  # fmt: skip
    assert got.accuracy == 1.0 and got.macro_f1 == 1.0 and (got.n_train, got.n_test) == (60, 20)
    assert not torch.equal(before, model.encoder.layer[0].attention.self.query.weight)


def _png(value: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()


def test_labeled_sets_in_s3_read_their_inputs_when_a_batch_asks(
    bucket: str, tmp_path: Path
) -> None:  # fmt: skip
    """Parquet and WebDataset task data in the S3 server: loading reads the labels and leaves
    the inputs where they are (a Parquet file's input column a row group at a time, at most two
    kept; a shard's members at their offsets); a batch's rows come back in its order, across
    row groups and shards; close() removes the downloaded copies."""
    import webdataset as wds

    from darkmatter import storage

    texts = [f"example {i} " + "word " * (i % 7) for i in range(1000)]
    pq.write_table(pa.table({"text": texts, "label": [i % 3 for i in range(1000)]}),
                   tmp_path / "t.parquet", row_group_size=100)  # fmt: skip
    storage.write_bytes(f"{bucket}/task/t.parquet", (tmp_path / "t.parquet").read_bytes())
    data = load_labeled(TaskSpec(name="p", data=f"{bucket}/task/t.parquet"))
    items = data.items
    assert data.labels.tolist() == [i % 3 for i in range(1000)] and len(items) == 1000
    assert items._groups == {}  # type: ignore[attr-defined]  # no input read yet
    rows = [950, 5, 951, 7, 420]
    assert data.take(rows) == [texts[i] for i in rows]
    assert sorted(items._groups) == [0, 4]  # type: ignore[attr-defined]  # read 9, 0, 4: last two
    assert items[-1] == texts[-1] and list(items)[::250] == texts[::250]
    [local] = list(Path(items._tmp.name).iterdir())  # type: ignore[attr-defined]
    data.close()
    assert not local.exists()

    (tmp_path / "wds").mkdir()
    with wds.ShardWriter(str(tmp_path / "wds" / "shard-%06d.tar"), maxcount=40) as sink:
        for i in range(100):
            sink.write({"__key__": f"s{i:04d}", "jpg": _png(i), "cls": str(i % 2)})
    for f in sorted((tmp_path / "wds").iterdir()):
        storage.write_bytes(f"{bucket}/wds/{f.name}", f.read_bytes())
    shards = load_labeled(TaskSpec(name="w", data=f"{bucket}/wds"))
    assert shards.kind == "image" and shards.labels.tolist() == [i % 2 for i in range(100)]
    assert shards.take([99, 0, 41]) == [_png(99), _png(0), _png(41)]  # shards 2, 0, 1
    downloaded = sorted(Path(shards.items._tmp.name).iterdir())  # type: ignore[attr-defined]
    assert len(downloaded) == 3
    shards.close()
    assert not any(f.exists() for f in downloaded)


def test_task_files_and_the_three_kinds_of_labeled_data(tmp_path: Path) -> None:
    # A folder of class folders (images).
    for cls in ("cat", "dog"):
        (tmp_path / "folder" / cls).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "folder" / cls / f"{i}.png").write_bytes(_png(10 * i))
    # Labeled WebDataset shards, written with webdataset's own writer.
    import webdataset as wds

    (tmp_path / "wds").mkdir()
    with wds.TarWriter(str(tmp_path / "wds" / "shard-000000.tar")) as sink:
        for i in range(4):
            sink.write({"__key__": f"s{i}", "txt": f"text {i}", "cls": str(i % 2)})
    # Parquet with its own split column.
    pq.write_table(pa.table({"text": ["a", "b", "c", "d"], "label": ["x", "y", "x", "y"],
                             "split": ["train", "train", "test", "test"]}),
                   tmp_path / "t.parquet")  # fmt: skip
    (tmp_path / "tasks.yaml").write_text(f"""
tasks:
  - {{name: pets, data: {tmp_path / "folder"}}}
  - {{name: shards, data: {tmp_path / "wds"}, protocols: [knn]}}
  - name: split
    data: {tmp_path / "t.parquet"}
    split: {{column: split}}
    protocols: {{linear_probe: {{C: 0.5}}, finetune: {{epochs: 1}}}}
""")
    pets, shards, split = load_tasks(str(tmp_path / "tasks.yaml"))
    assert split.options("linear_probe") == {"C": 0.5}
    assert split.options("finetune") == {"epochs": 1, "lr": 1e-4, "batch_size": 32}
    a = load_labeled(pets)
    assert a.classes == ["cat", "dog"] and a.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert a.kind == "image" and len(a.items) == 6 and a.items[0][:4] == b"\x89PNG"
    b = load_labeled(shards)
    assert b.kind == "text" and list(b.items) == [f"text {i}" for i in range(4)]
    assert b.labels.tolist() == [0, 1, 0, 1]
    c = load_labeled(split)
    assert c.test_mask is not None and c.test_mask.tolist() == [False, False, True, True]

    bad = tmp_path / "bad.yaml"
    for text, message in (
        ("tasks: []", "expected a non-empty list under 'tasks:'"),
        ("tasks: [{name: a}]", "tasks[0].data: required string"),
        ("tasks: [{name: a, data: x, protocols: [svm]}]", "tasks[0].protocols.svm: unknown"),
        ("tasks: [{name: a, data: x, protocols: {knn: {kk: 1}}}]", "protocols.knn.kk: unknown"),
        ("tasks: [{name: a, data: x, split: {test_fraction: 2}}]", "expected in (0, 1)"),
    ):
        bad.write_text(text)
        with pytest.raises(TaskError, match=message.replace("(", r"\(").replace(")", r"\)")
                           .replace("[", r"\[").replace("]", r"\]")):  # fmt: skip
            load_tasks(str(bad))
    with pytest.raises(TaskError, match="no such file or folder"):
        load_labeled(TaskSpec(name="gone", data=str(tmp_path / "nothing")))
    with pytest.raises(TaskError, match=r"gone.parquet: no such file \(task gone\)"):
        load_labeled(TaskSpec(name="gone", data=str(tmp_path / "gone.parquet")))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(TaskError, match="junk.parquet: not a readable Parquet file"):
        load_labeled(TaskSpec(name="junk", data=str(tmp_path / "junk.parquet")))


def test_preflight_names_the_missing_label_and_the_file(bucket: str, tmp_path: Path) -> None:
    """Each kind of labeled data, in object storage: what a task needs is checked from the
    schema or the first sample, and a `darkmatter evaluate` of a task that lacks it fails
    before the checkpoint (here none) is looked for."""
    import webdataset as wds

    from darkmatter.evaluation.tasks import preflight

    pq.write_table(pa.table({"text": ["a", "b"], "topic": ["x", "y"]}), tmp_path / "t.parquet")
    with wds.TarWriter(str(tmp_path / "s.tar")) as sink:
        sink.write({"__key__": "s0", "txt": "text", "cls": "0"})
    with wds.TarWriter(str(tmp_path / "unlabeled.tar")) as sink:
        sink.write({"__key__": "s0", "txt": "text", "json": b"{}"})
    root = f"{bucket}/preflight"
    for name in ("t.parquet", "s.tar", "unlabeled.tar"):
        folder = {"t.parquet": "", "s.tar": "wds/", "unlabeled.tar": "bare/"}[name]
        storage.write_bytes(f"{root}/{folder}{name}", (tmp_path / name).read_bytes())

    preflight(TaskSpec(name="ok", data=f"{root}/t.parquet", label="topic"))
    preflight(TaskSpec(name="ok", data=f"{root}/wds"))
    cases = [
        (TaskSpec(name="a", data=f"{root}/t.parquet"),
         f"{root}/t.parquet: no column 'label' (columns: ['text', 'topic'])"),
        (TaskSpec(name="b", data=f"{root}/t.parquet", label="topic", split_column="split"),
         f"{root}/t.parquet: no column 'split'"),
        (TaskSpec(name="c", data=f"{root}/wds", label="topic"),
         f"{root}/wds/s.tar: sample s0 has no .topic member (the task's label); it has .cls, .txt"),
        (TaskSpec(name="d", data=f"{root}/bare"),
         f"{root}/bare/unlabeled.tar: sample s0 has no .cls member"),
    ]  # fmt: skip
    for spec, message in cases:
        with pytest.raises(TaskError) as e:
            preflight(spec)
        assert message in str(e.value), (str(e.value), message)
    out = subprocess.run(
        [sys.executable, "-m", "darkmatter.cli", "evaluate", str(tmp_path / "no-run"),
         "--task", f"{root}/t.parquet", "--label-column", "category"],
        cwd=REPO_ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode != 0
    assert f"{root}/t.parquet: no column 'category'" in out.stderr.strip().splitlines()[-1]


def test_claims_are_exclusive_expire_and_are_taken_over(bucket: str) -> None:
    url = f"{bucket}/eval/claims/run/step00000010.json"
    # A lease long enough that a stalled machine cannot expire it between two calls.
    a = claims.try_claim(url, "harness-a", ttl_s=60.0)
    assert a is not None
    assert claims.try_claim(url, "harness-b", ttl_s=1.0) is None  # live claim: refused
    a.ttl_s = 0.2  # its last renewal has a short lease ...
    assert a.renew()
    time.sleep(0.5)  # ... and a stops renewing (it "died"): the claim expires
    b = claims.try_claim(url, "harness-b", ttl_s=30.0)
    assert b is not None
    assert not a.renew() and a.lost  # the old owner finds out
    a.release()  # not the owner any more: leaves b's claim alone
    assert json.loads(storage.read_bytes(url))["owner"] == "harness-b"
    again = claims.try_claim(url, "harness-b", ttl_s=30.0)  # its own claim, e.g. after a restart
    assert again is not None
    assert again.release()  # never deleted (no conditional DELETE): marked released, free
    assert json.loads(storage.read_bytes(url))["state"] == "released"


def _harness(exp: str, tasks: Path, name: str, log: Path, failpoints: str = "") -> subprocess.Popen:  # type: ignore[type-arg]
    cmd = [sys.executable, "-m", "darkmatter.cli", "evaluate", "--watch", exp, "--tasks",
           str(tasks), "--poll-s", "0.5", "--claim-ttl-s", "4", "--id", name]  # fmt: skip
    env = {**os.environ, "DARKMATTER_FAILPOINTS": failpoints}
    return subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=open(log, "a"), stderr=subprocess.STDOUT,
                            env=env)  # fmt: skip


def _wait(what: str, cond: Any, timeout: float = 300) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if got := cond():
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.e2e
@pytest.mark.slow  # make test's budget; test_claims_race.py races two harnesses on real MLflow
def test_two_harnesses_evaluate_each_checkpoint_once(
    stack: Any, bucket: str, text_ds: str, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=stack.mlflow_uri)
    tasks = toy_text_task(bucket, tmp_path, 120)
    exp = "harness"
    logs = {n: tmp_path / f"{n}.log" for n in ("a", "b")}
    # Harness a watches first, alone, so the first checkpoint is its; it is SIGKILLed in the
    # middle of that evaluation: its metrics are logged, its tag is not, its claim is held.
    a = _harness(exp, tasks, "a", logs["a"], failpoints="eval.after_metrics@10")
    b: Any = None
    root = f"{bucket}/ckpt"
    try:
        run_dir = tmp_path / "run"
        cfg = write_config(
            tmp_path / "c.yaml", text_ds, run_dir,
            train={"steps": 40, "log_every": 5, "zero_stage": 0},
            checkpoint={"every": 10, "root": root, "keep_last": 10},
            tracking={"enabled": True, "experiment": exp, "run_name": "watched"},
        )  # fmt: skip
        train_log = tmp_path / "train.log"
        train = subprocess.Popen([sys.executable, "-m", "darkmatter.cli", "pretrain", str(cfg)],
                                 cwd=REPO_ROOT, stdout=train_log.open("w"),  # noqa: SIM115
                                 stderr=subprocess.STDOUT)  # fmt: skip
        assert a.wait(timeout=300) == -signal.SIGKILL
        # Then a second harness, and a again under the same id (a restarted pod): between
        # them, step 10 must get its tag without a second set of metrics.
        b = _harness(exp, tasks, "b", logs["b"])
        a = _harness(exp, tasks, "a", logs["a"])
        assert train.wait(timeout=600) == 0, train_log.read_text()[-3000:]
        run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
        _wait("harness a to start again", lambda: logs["a"].read_text().count("watching") == 2)

        def done() -> list[str]:
            tags = client.get_run(run_id).data.tags
            marks = [tags.get(f"eval.step{s:08d}") for s in (10, 20, 30, 40)]
            return marks if all(marks) else []

        assert _wait("all four checkpoints evaluated", done) == ["done"] * 4

        # A torn checkpoint (no commit record) and a corrupt one appear in the index.
        step40 = storage.join(root, "step00000040")
        for name in ("step00000050", "step00000060"):
            for url in storage.list_files(step40):
                dest = url.replace("step00000040", name)
                storage.write_bytes(dest, storage.read_bytes(url))
        storage.delete(f"{root}/step00000060/COMMIT.json")  # torn
        record = json.loads(storage.read_bytes(f"{root}/step00000050/COMMIT.json"))
        record.update(tag="step00000050", step=50)  # a committed copy, then a flipped byte
        storage.write_bytes(f"{root}/step00000050/COMMIT.json", json.dumps(record).encode())
        victim = f"{root}/step00000050/mp_rank_00_model_states.pt"
        data = bytearray(storage.read_bytes(victim))
        data[len(data) // 2] ^= 0xFF
        storage.write_bytes(victim, bytes(data))
        (tmp_path / "index").mkdir()
        got = client.download_artifacts(run_id, "checkpoints/index.json", str(tmp_path / "index"))
        index = json.loads(Path(got).read_text())
        last = index["checkpoints"][-1]
        for step in (50, 60):
            tag = f"step{step:08d}"
            index["checkpoints"].append({**last, "step": step, "tag": tag,
                                         "uri": storage.join(root, tag)})  # fmt: skip
        client.log_text(run_id, json.dumps(index), "checkpoints/index.json")

        def marked() -> list[str]:
            tags = client.get_run(run_id).data.tags
            marks = [tags.get("eval.step00000050", ""), tags.get("eval.step00000060", "")]
            return marks if all(marks) else []

        corrupt, torn = _wait("the corrupt and the torn checkpoint reported", marked)
        assert corrupt.startswith("corrupt:") and "sha256 mismatch" in corrupt, corrupt
        assert torn.startswith("skipped:") and "no committed checkpoint" in torn, torn
    finally:
        for proc in (a, b):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        rcs = [proc.wait(timeout=60) for proc in (a, b) if proc is not None]
    assert rcs == [0, 0], [p.read_text()[-3000:] for p in logs.values()]

    # A later one-shot on the run id finds nothing left to do.
    again = subprocess.run([sys.executable, "-m", "darkmatter.cli", "evaluate", run_id, "--tasks",
                            str(tasks)], cwd=REPO_ROOT, capture_output=True, text=True)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout.strip().splitlines()[-1])["event"] == "stopped"
    assert "done" not in json.loads(again.stdout.strip().splitlines()[-1])

    # Exactly once per checkpoint, at its own step, for every metric; nothing for 50 and 60.
    for key in ("eval/toy/linear_probe/accuracy", "eval/toy/knn/macro_f1",
                "eval/toy/linear_probe/accuracy_random_init"):  # fmt: skip
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == [10, 20, 30, 40], (key, steps)
    history = client.get_metric_history(run_id, "eval/toy/linear_probe/accuracy")
    assert all(0.0 <= m.value <= 1.0 for m in history)
    stopped = [json.loads(ln) for p in logs.values() for ln in p.read_text().splitlines()
               if ln.startswith('{"event": "stopped"')]  # fmt: skip
    # The killed a never printed its count; whoever took step 10 over only completed it.
    assert sum(s.get("done", 0) for s in stopped) <= 3  # steps 20, 30 and 40
    assert sum(s.get("completed", 0) for s in stopped) == 1
    arts = client.download_artifacts(run_id, "eval", str(tmp_path / "arts"))
    table = pq.read_table(os.path.join(arts, "results.parquet")).to_pylist()
    assert sorted({r["step"] for r in table}) == [10, 20, 30, 40]
    assert len(table) == 4 * 8  # 4 steps x (2 protocols x 2 metrics, each with random init)
    for tag in ("step00000010", "step00000020", "step00000030", "step00000040"):
        assert (Path(arts) / "toy" / tag / "confusion_linear_probe.png").stat().st_size > 1000
        assert (Path(arts) / "toy" / tag / "embedding_pca.png").stat().st_size > 1000
    assert sorted(p.name for p in Path(arts, "toy").iterdir()) == [
        "step00000010", "step00000020", "step00000030", "step00000040"]  # fmt: skip


def test_deployments_speak_the_cli(tmp_path: Path) -> None:
    """The Kubernetes Deployment and the SLURM job script start `darkmatter evaluate --watch`
    with flags the CLI knows (the job script is run for real, with `echo` as the command)."""
    import yaml

    from darkmatter.evaluation.cli import parser

    docs = list(yaml.safe_load_all((REPO_ROOT / "launch/k8s/evaluator.yaml").read_text()))
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    env = {e["name"] for e in container["env"]}
    args = container["args"]
    assert args[0] == "evaluate"
    for a in args:  # every $(VAR) the args use is defined in the container's env
        if a.startswith("$("):
            assert a[2:-1] in env, a
    ns = parser().parse_args(args[1:])
    assert ns.watch == "$(EXPERIMENT)" and ns.id == "$(POD_NAME)" and ns.tasks.endswith(".yaml")
    # Evaluating on the GPU, the pod asks for one (and for a node that has one).
    assert ns.device == "cuda" and container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert deploy["spec"]["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.present"] == "true"
    tasks_cm = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["tasks.yaml"]
    (tmp_path / "tasks.yaml").write_text(tasks_cm)
    assert load_tasks(str(tmp_path / "tasks.yaml"))[0].name == "topics"

    script = REPO_ROOT / "launch/slurm/evaluate.sbatch"
    env_vars = {**os.environ, "DARKMATTER": "echo", "EXPERIMENT": "exp", "TASKS": "t.yaml",
                "MLFLOW_TRACKING_URI": "http://127.0.0.1:1", "SLURM_JOB_ID": "42",
                "EVAL_STATE": "s3://b/state"}  # fmt: skip
    out = subprocess.run(["bash", str(script)], env=env_vars, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    argv = out.stdout.split()
    assert argv[0] == "evaluate"
    ns = parser().parse_args(argv[1:])
    assert (ns.watch, ns.tasks, ns.id, ns.state) == ("exp", "t.yaml", "slurm-42", "s3://b/state")
    assert ns.device == "cuda" and "#SBATCH --gres=gpu:1" in script.read_text()
    on_cpu = subprocess.run(["bash", str(script)], env={**env_vars, "DEVICE": "cpu"},
                            capture_output=True, text=True)  # fmt: skip
    assert parser().parse_args(on_cpu.stdout.split()[1:]).device == "cpu"
    missing = subprocess.run(["bash", str(script)], env={**env_vars, "EXPERIMENT": ""},
                             capture_output=True, text=True)  # fmt: skip
    assert missing.returncode != 0 and "set EXPERIMENT" in missing.stderr


class PagedRuns:
    """An MlflowClient's search_runs over `n` runs, `max_results` a page, with page tokens."""

    def __init__(self, n: int) -> None:
        self.runs = [f"run-{i}" for i in range(n)]
        self.tokens: list[str | None] = []

    def get_experiment_by_name(self, name: str) -> Any:
        from types import SimpleNamespace

        return SimpleNamespace(experiment_id="1")

    def search_runs(self, experiment_ids: list[str], filter_string: str = "",
                    max_results: int = 1000, order_by: Any = None, page_token: Any = None) -> Any:  # fmt: skip
        from mlflow.store.entities.paged_list import PagedList

        self.tokens.append(page_token)
        start = int(page_token or 0)
        end = start + min(max_results, 1000)  # the server's cap, whatever is asked for
        return PagedList(self.runs[start:end], str(end) if end < len(self.runs) else None)


def test_run_search_walks_every_page() -> None:
    from darkmatter.evaluation.harness import Harness
    from darkmatter.evaluation.runs import search_all_runs

    client = PagedRuns(2500)
    assert search_all_runs(client, ["1"]) == client.runs  # all of them, in order, once
    assert client.tokens == [None, "1000", "2000"]
    harness = Harness(client, [TaskSpec(name="toy", data="unused.parquet")])
    assert harness.runs("experiment") == client.runs  # not the first 1,000 only


@pytest.mark.e2e
def test_run_search_pages_on_the_real_server(stack: Any) -> None:
    from mlflow.tracking import MlflowClient

    from darkmatter.evaluation.harness import Harness
    from darkmatter.evaluation.runs import search_all_runs

    client = MlflowClient(tracking_uri=stack.mlflow_uri)
    exp = client.create_experiment(f"pages-{os.getpid()}-{time.time_ns()}")
    made = [client.create_run(exp).info.run_id for _ in range(5)]
    newest_first = ["attributes.start_time DESC"]
    got = [r.info.run_id for r in search_all_runs(client, [exp], order_by=newest_first,
                                                  page_size=2)]  # fmt: skip
    assert sorted(got) == sorted(made) and len(got) == 5  # 3 pages, nothing lost or repeated
    assert got == [r.info.run_id for r in client.search_runs([exp], order_by=newest_first)]
    name = client.get_experiment(exp).name
    harness = Harness(client, [TaskSpec(name="toy", data="unused.parquet")])
    assert sorted(r.info.run_id for r in harness.runs(name)) == sorted(made)
