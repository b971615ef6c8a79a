"""Self-contained checkpoints and a safe, complete export. One tiny MLM run (ZeRO-2) reads its
data from the S3 server and commits its checkpoints to a local folder; then:

- each checkpoint carries the dataset's tokenizer (listed and verified by its commit record), so
  with the S3 endpoint closed the local checkpoint still exports and evaluates, while a copy
  without it (a checkpoint from before) cannot, and exports from the dataset's URL once S3 is
  back;
- `export RUN_DIR` follows the checkpoint.root the run folder records, to S3;
- an export is all or nothing: a failure leaves no folder and keeps an earlier export intact;
- loaders refuse an incomplete export, naming the missing file;
- the exported BERT has no untrained pooler, and its README says how to pool.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from darkmatter import storage
from darkmatter.cli import main
from darkmatter.evaluation import export as ex
from darkmatter.trainer import checkpoint as ckpt
from darkmatter.trainer import checkpoint_reader as reader
from darkmatter.trainer import checkpoint_writer as ckpt_writer
from tests.helpers import run_darkmatter, synthetic_corpus, write_config

TAG = "step00000006"
CLOSED = "http://127.0.0.1:1"  # nothing listens on port 1: object storage out of reach


@pytest.fixture(scope="module")
def trained(stack: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The run: data on S3, checkpoints in RUN_DIR/checkpoints (steps 3 and 6)."""
    from darkmatter.data_pipeline.prepare import prepare

    tmp = tmp_path_factory.mktemp("export")
    bucket = f"s3://export-{uuid.uuid4().hex[:12]}"
    storage.make_bucket(bucket)
    data = f"{bucket}/text"
    prepare([str(synthetic_corpus(tmp / "corpus.txt"))], data, modality="text", vocab_size=200,
            shard_bytes=100_000)  # fmt: skip
    run_dir = tmp / "run"
    # Hidden 128 (~200k weights, 0.8 MB): DeepSpeed's module file adds ~10 kB of records to the
    # weights, which at hidden 32 would be a fifth of them and here is 1%.
    cfg = write_config(tmp / "c.yaml", data, run_dir,
                       model={"hidden_size": 128, "intermediate_size": 256})  # fmt: skip
    out = run_darkmatter("pretrain", str(cfg))
    assert out.returncode == 0, out.stderr[-3000:]
    texts = [f"the red fox number {i} jumps" if i % 2 else f"the blue owl near the river {i}"
             for i in range(60)]  # fmt: skip
    pq.write_table(pa.table({"text": texts, "label": [i % 2 for i in range(60)]}),
                   tmp / "task.parquet")  # fmt: skip
    return {"tmp": tmp, "run_dir": run_dir, "bucket": bucket, "task": tmp / "task.parquet"}


@pytest.fixture(scope="module")
def exported(trained: dict[str, Any]) -> Path:
    ex.export(str(trained["run_dir"]), str(trained["tmp"] / "export"))
    return Path(trained["tmp"] / "export")


def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", CLOSED)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # the control's failure, fast


def evaluate(target: Path, task: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    capsys.readouterr()
    rc = main(["evaluate", str(target), "--task", str(task), "--no-mlflow",
               "--protocols", "linear_probe"])  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0, err[-3000:]
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def test_a_local_checkpoint_exports_and_evaluates_with_storage_out_of_reach(
    trained: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, root = trained["run_dir"], str(trained["run_dir"] / "checkpoints")
    # The checkpoint carries the dataset's tokenizer, committed like its weights.
    folder = run_dir / "checkpoints" / TAG
    meta = json.loads((folder / "darkmatter.json").read_text())
    assert meta["assets"] == [reader.TOKENIZER_FILE]
    dataset_tokenizer = storage.read_bytes(meta["tokenizer"])
    assert meta["tokenizer"].startswith(trained["bucket"])
    assert (folder / reader.TOKENIZER_FILE).read_bytes() == dataset_tokenizer
    want = ckpt.read_commit(root, TAG)["files"][reader.TOKENIZER_FILE]
    assert want["sha256"] == ckpt.sha256_file(folder / reader.TOKENIZER_FILE)
    # The run folder says where its checkpoints are.
    record = json.loads((run_dir / reader.ROOT_RECORD).read_text())
    assert record == {"root": root}
    # A checkpoint from before checkpoints carried it: the same, less the tokenizer.
    old = trained["tmp"] / "old" / TAG
    shutil.copytree(folder, old)
    (old / reader.TOKENIZER_FILE).unlink()
    (old / "darkmatter.json").write_text(json.dumps({**meta, "assets": []}))
    record = ckpt.read_commit(root, TAG)
    del record["files"][reader.TOKENIZER_FILE]
    record["files"]["darkmatter.json"] = {
        "size": (old / "darkmatter.json").stat().st_size,
        "sha256": ckpt.sha256_file(old / "darkmatter.json"),
    }
    (old / ckpt.COMMIT).write_text(json.dumps(record))

    offline(monkeypatch)
    out = trained["tmp"] / "offline-export"
    ex.export(str(run_dir), str(out))
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()
    on_checkpoint = evaluate(run_dir, trained["task"], capsys)
    on_export = evaluate(out, trained["task"], capsys)
    assert on_checkpoint["step"] == on_export["step"] == 6
    assert on_checkpoint["pretrained"] == on_export["pretrained"]
    assert on_checkpoint["pretrained"]["accuracy"] > 0.9
    # The control: the old checkpoint needs the dataset's storage, which is out of reach...
    with pytest.raises(Exception, match="127.0.0.1:1"):
        ex.export(str(old), str(trained["tmp"] / "old-export"))
    assert not (trained["tmp"] / "old-export").exists()
    # ...and exports from the dataset's URL once it is back, with the same tokenizer.
    monkeypatch.undo()
    ex.export(str(old), str(trained["tmp"] / "old-export"))
    from transformers import AutoTokenizer

    text = "the red fox number 7 jumps over the lazy owl"
    a, b = (AutoTokenizer.from_pretrained(p) for p in (out, trained["tmp"] / "old-export"))
    assert a(text)["input_ids"] == b(text)["input_ids"] and len(a(text)["input_ids"]) > 5


def test_export_of_a_run_folder_follows_its_checkpoint_root_to_s3(
    trained: dict[str, Any], tmp_path: Path
) -> None:
    root = f"{trained['bucket']}/checkpoints/run1"
    src = trained["run_dir"] / "checkpoints" / TAG
    for f in sorted(src.iterdir()):
        storage.put_file(str(f), f"{root}/{TAG}/{f.name}")
    run_dir = tmp_path / "run"  # a run folder whose checkpoints are all in S3
    run_dir.mkdir()
    with pytest.raises(FileNotFoundError, match="no committed checkpoint"):
        reader.locate(str(run_dir))
    ckpt_writer.record_root(run_dir, root)  # what the trainer writes at start
    assert reader.locate(str(run_dir)).root == root
    ref, out = ex.export(str(run_dir), str(tmp_path / "export"))
    assert ref.step == 6
    meta = json.loads((out / "darkmatter.json").read_text())
    assert meta["tag"] == TAG and "model.safetensors" in meta["export_files"]


def test_a_failed_export_leaves_no_folder_and_keeps_an_earlier_one(
    trained: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir, out = str(trained["run_dir"]), tmp_path / "out"

    def disk_full(*args: Any) -> None:
        raise OSError("No space left on device")

    with monkeypatch.context() as m:
        m.setattr(reader, "save_heads", disk_full)  # fails after the encoder is written
        with pytest.raises(OSError, match="No space left"):
            ex.export(run_dir, str(out))
    assert list(tmp_path.iterdir()) == []  # no OUT, no partial folder beside it
    ex.export(run_dir, str(out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(json.loads(before["darkmatter.json"])["export_files"]) == set(before) - {
        "darkmatter.json"
    }
    with monkeypatch.context() as m:
        m.setattr(reader, "save_heads", disk_full)
        with pytest.raises(OSError, match="No space left"):
            ex.export(run_dir, str(out))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    ex.export(run_dir, str(out))  # a complete export replaces it
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert sorted(p.name for p in out.iterdir()) == sorted(before)
    # A folder that is no export is never written into.
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match="exists and is not an export folder"):
        ex.export(run_dir, str(tmp_path / "notes"))
    assert [p.name for p in (tmp_path / "notes").iterdir()] == ["todo.txt"]


@pytest.mark.parametrize("lost", ["tokenizer.json", "model.safetensors", reader.HEADS_FILE])
def test_an_incomplete_export_is_refused_naming_the_missing_file(
    exported: Path, tmp_path: Path, lost: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from darkmatter.evaluation.checkpoints import ExportRef
    from darkmatter.trainer import init_from
    from darkmatter.trainer.config import ConfigError

    partial = tmp_path / "partial"
    shutil.copytree(exported, partial)
    (partial / lost).unlink()
    with pytest.raises(ValueError, match=f"incomplete export: {lost} is missing"):
        ExportRef(partial)
    task = tmp_path / "task.parquet"  # a task that passes preflight: the export is what fails
    pq.write_table(pa.table({"text": ["a", "b"], "label": [0, 1]}), task)
    assert main(["evaluate", str(partial), "--task", str(task), "--no-mlflow"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (f"darkmatter evaluate: error: {partial}: incomplete export: {lost} is "
                    "missing (export it again)"), last  # fmt: skip
    with pytest.raises(ConfigError, match=f"model.init_from: {partial} .*{lost}"):
        init_from.fetch(str(partial))


def test_the_export_has_no_untrained_pooler_and_says_how_to_pool(
    trained: dict[str, Any], exported: Path
) -> None:
    import torch
    from safetensors import safe_open
    from transformers import AutoModel, AutoTokenizer

    from darkmatter.evaluation.checkpoints import from_pretrained, load_encoder, resolve
    from darkmatter.evaluation.probe import embed

    with safe_open(str(exported / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    assert names and not [n for n in names if n.startswith("pooler.")]
    model, info = AutoModel.from_pretrained(exported, add_pooling_layer=False,
                                            output_loading_info=True)  # fmt: skip
    assert model.pooler is None
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # Without the flag, transformers adds its pooler and says it is untrained: the README says so.
    _, plain = AutoModel.from_pretrained(exported, output_loading_info=True)
    assert sorted(plain["missing_keys"]) == ["pooler.dense.bias", "pooler.dense.weight"]
    readme = (exported / "README.md").read_text()
    assert 'AutoModel.from_pretrained("PATH", add_pooling_layer=False)' in readme
    assert "(hidden * mask).sum(1) / mask.sum(1)" in readme
    assert "mlm encoder, step 6" in readme
    # The recipe, as written, gives the evaluation encoder's features.
    tok = AutoTokenizer.from_pretrained(exported)
    inputs = tok(["the red fox", "a blue owl near the river"], padding="max_length",
                 max_length=32, return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    features = (hidden * mask).sum(1) / mask.sum(1)
    ours = load_encoder(resolve(str(trained["run_dir"])))
    assert ours.pooler is None and from_pretrained(exported).pooler is None
    want = embed(ours, {k: inputs[k] for k in ("input_ids", "attention_mask")})
    np.testing.assert_allclose(features.numpy(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # DeepSpeed's converter in a process of its own: ~15-30 s
def test_a_real_zero2_checkpoint_converts_to_universal_with_weights_only(
    trained: dict[str, Any], tmp_path: Path
) -> None:
    """DeepSpeed's converter reads the run's real ZeRO-2 files with every load forced to
    weights_only (its records allowed, nothing else): it converts every parameter."""
    from darkmatter.trainer import engine as eng

    src = trained["run_dir"] / "checkpoints" / TAG
    eng.to_universal(src, tmp_path / TAG)  # 2 extract workers: a pool of processes
    converted = {p.parent.name for p in (tmp_path / TAG / "zero").glob("*/fp32.pt")}
    weights = reader.consolidated_state_dict(reader.resolve(str(src)))
    assert converted and converted <= set(weights)
    assert "bert.embeddings.word_embeddings.weight" in converted


@pytest.mark.parametrize(
    ("modality", "cls", "size"),
    [("image", "ViTImageProcessor", {"height": 24, "width": 24}),
     ("video", "VideoMAEImageProcessor", {"height": 24, "width": 24}),
     ("audio", "Wav2Vec2FeatureExtractor", None)],
)  # fmt: skip
def test_image_video_and_audio_checkpoints_carry_their_processor_settings(
    modality: str, cls: str, size: dict[str, int] | None, tmp_path: Path
) -> None:
    """What rank 0 adds to every save of a non-text run: the processor's settings as
    save_pretrained writes them, which export copies and transformers loads."""
    import transformers

    assets = ckpt_writer.input_assets({}, modality, {"image_size": 24})
    assert list(assets) == [reader.PREPROCESSOR_FILE]
    (tmp_path / reader.PREPROCESSOR_FILE).write_bytes(assets[reader.PREPROCESSOR_FILE])
    loader = (transformers.AutoFeatureExtractor if modality == "audio"
              else transformers.AutoImageProcessor)  # fmt: skip
    processor = loader.from_pretrained(str(tmp_path))
    assert type(processor).__name__.removesuffix("Pil") == cls  # Pil: without torchvision
    if size is not None:
        assert processor.size == size
        assert processor.image_mean == pytest.approx([0.485, 0.456, 0.406])
    else:
        assert processor.sampling_rate == 16_000


def test_an_evaluation_reads_the_module_weights_once_without_optimizer_states(
    trained: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ZeRO-2 checkpoint in S3, evaluated: of its weights only DeepSpeed's module file is
    downloaded (<= 1.1x the model's fp32 bytes; the optimizer states, twice that, are not), its
    weights are the fp32 masters an export reads (an fp32 run), kept as one safetensors file
    keyed by the commit record; a second evaluation downloads no weight file."""
    import torch

    from darkmatter.evaluation.checkpoints import commit_digest, evaluation_weights

    src = trained["run_dir"] / "checkpoints" / TAG
    root = f"{trained['bucket']}/evaluated"
    for f in sorted(src.iterdir()):
        storage.write_bytes(f"{root}/{TAG}/{f.name}", f.read_bytes())
    got: list[tuple[str, int]] = []
    download = storage.get_file

    def counting(url: str, path: str) -> None:
        download(url, path)
        got.append((url.rsplit("/", 1)[1], Path(path).stat().st_size))

    monkeypatch.setattr(storage, "get_file", counting)
    cache = str(tmp_path / "cache")
    loc = reader.locate(root)
    ref = reader.fetch(loc, cache, weights="none")
    assert ref.meta["zero_stage"] == 2 and all(name in reader.RECORDS + reader.ASSETS
                                               for name, _ in got)  # fmt: skip
    got.clear()
    weights = evaluation_weights(loc, ref, cache)
    masters = reader.consolidated_state_dict(reader.resolve(str(src)))
    model_bytes = sum(4 * v.numel() for v in {v.data_ptr(): v for v in masters.values()}.values())
    assert [name for name, _ in got] == [reader.ZERO0_WEIGHTS]
    assert sum(size for _, size in got) <= 1.1 * model_bytes, (got, model_bytes)
    assert sum(f.stat().st_size for f in src.glob("*optim_states.pt")) > 2 * model_bytes
    assert weights.keys() == masters.keys()
    assert all(torch.equal(weights[k], masters[k]) for k in masters)
    [cached] = Path(cache).rglob("*.safetensors")
    assert cached.stem == commit_digest(loc)
    assert not (ref.path / reader.ZERO0_WEIGHTS).exists()  # the cache file replaced it

    got.clear()
    again = evaluation_weights(loc, reader.fetch(loc, cache, weights="none"), cache)
    assert got == []  # records verified in the cache, weights from the safetensors file
    assert again.keys() == masters.keys()
    assert all(torch.equal(again[k], masters[k]) for k in masters)
    tied = ("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight")
    assert again[tied[0]].data_ptr() == again[tied[1]].data_ptr()  # the tie, kept


def test_a_second_machine_takes_the_weights_from_the_runs_artifacts(
    stack: Any, trained: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--weights-artifact (RunArtifacts, the MLflow server over HTTP): the first harness
    publishes its weights cache file to the run; a harness with an empty cache downloads that
    one file and no checkpoint file, and gets the same weights. A torn artifact is not used: the
    weights come from the checkpoint again. forget_weights then empties that cache."""
    import torch
    from mlflow.tracking import MlflowClient

    from darkmatter.evaluation.checkpoints import (
        commit_digest,
        evaluation_weights,
        forget_weights,
    )
    from darkmatter.evaluation.harness import RunArtifacts

    src = trained["run_dir"] / "checkpoints" / TAG
    root = f"{trained['bucket']}/shared"
    for f in sorted(src.iterdir()):
        storage.write_bytes(f"{root}/{TAG}/{f.name}", f.read_bytes())
    client = MlflowClient(tracking_uri=stack.mlflow_uri)
    exp = client.create_experiment(f"weights-{uuid.uuid4().hex[:8]}")
    run_id = client.create_run(exp).info.run_id
    store = RunArtifacts(client, run_id)
    loc = reader.locate(root)
    first = evaluation_weights(loc, reader.fetch(loc, str(tmp_path / "a"), weights="none"),
                               str(tmp_path / "a"), store)  # fmt: skip
    name = f"{commit_digest(loc)}.safetensors"
    assert [a.path for a in client.list_artifacts(run_id, RunArtifacts.FOLDER)] == [
        f"{RunArtifacts.FOLDER}/{name}"
    ]

    got: list[str] = []
    download = storage.get_file
    monkeypatch.setattr(storage, "get_file",
                        lambda url, path: (got.append(url.rsplit("/", 1)[1]), download(url, path)))  # fmt: skip
    ref = reader.fetch(loc, str(tmp_path / "b"), weights="none")
    got.clear()
    second = evaluation_weights(loc, ref, str(tmp_path / "b"), store)
    assert got == []  # no checkpoint file: the artifact alone
    assert second.keys() == first.keys()
    assert all(torch.equal(second[k], first[k]) for k in first)

    # A torn artifact (a harness died mid-upload, a bad copy): unreadable, so not used.
    torn = tmp_path / "torn" / name
    torn.parent.mkdir()
    torn.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    client.log_artifact(run_id, str(torn), RunArtifacts.FOLDER)
    ref = reader.fetch(loc, str(tmp_path / "c"), weights="none")
    got.clear()
    third = evaluation_weights(loc, ref, str(tmp_path / "c"), store)
    assert got == [reader.ZERO0_WEIGHTS]
    assert all(torch.equal(third[k], first[k]) for k in first)

    # What a watching harness does once the checkpoint is evaluated: its cache is emptied.
    assert list(Path(tmp_path / "c").rglob("*.safetensors")) and ref.path.is_dir()
    forget_weights(loc, ref, str(tmp_path / "c"))
    assert not list(Path(tmp_path / "c").rglob("*.safetensors")) and not ref.path.exists()
