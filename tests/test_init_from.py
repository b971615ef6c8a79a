"""Continued pretraining (`model.init_from`): a run exported (and registered in MLflow) is the
start of a new run, from a folder, from S3 and from the model registry. The new model's loss on
a batch is the exported model's (encoder and heads: the checkpoint's whole pretraining model),
far below a random init's; an encoder without heads gives the encoder only; a model that does not
fit is refused in preflight with one line naming both sides."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from darkmatter.trainer.config import ConfigError
from darkmatter.trainer.objectives import load_config
from tests.helpers import metrics, run_darkmatter, synthetic_corpus, write_config

# The slow tier (CI runs it after make test): the shared export (train, export, register) and
# the runs from it cost ~90 s that make test's 20-minute budget lacks.
pytestmark = pytest.mark.slow

REGISTERED = "init-from-encoder"


@pytest.fixture(scope="module")
def exported(stack: Any, text_ds: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 40-step MLM run (ZeRO-2, tracked in MLflow, every step logged), exported with
    --register: the run folder's `export/`, and version 1 of REGISTERED."""
    root = tmp_path_factory.mktemp("init-from")
    cfg = write_config(
        root / "c.yaml", text_ds, root / "run",
        train={"steps": 40, "log_every": 1, "lr": 0.005}, checkpoint={"every": 40},
        model={"dropout": 0.0},
        tracking={"enabled": True, "experiment": "init-from", "tracking_uri": stack.mlflow_uri},
    )  # fmt: skip
    out = run_darkmatter("pretrain", str(cfg), env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    exp = run_darkmatter("export", str(root / "run"), str(root / "run/export"),
                         "--register", REGISTERED)  # fmt: skip
    assert exp.returncode == 0, exp.stderr[-3000:]
    return root / "run"


def _config(tmp_path: Path, text_ds: str, init_from: str, *overrides: str) -> Any:
    cfg = write_config(tmp_path / "next.yaml", text_ds, tmp_path / "next",
                       model={"dropout": 0.0, "init_from": init_from})  # fmt: skip
    return load_config(cfg, list(overrides))


def _batch(objective: Any) -> dict[str, Any]:
    """8 lines of the corpus, tokenized as `prepare` did, masked by a fixed generator."""
    from tokenizers import Tokenizer

    from darkmatter.storage import read_bytes

    tok = Tokenizer.from_str(read_bytes(objective.meta["tokenizer_url"]).decode())
    lines = synthetic_corpus(Path(objective.cfg.train.run_dir).parent / "corpus.txt", 8)
    samples = [{"input_ids": np.array(tok.encode(line).ids)}
               for line in lines.read_text().splitlines()]  # fmt: skip
    return objective.make_batch(samples, torch.Generator().manual_seed(0))


def _loss(model: torch.nn.Module, batch: dict[str, Any]) -> float:
    with torch.no_grad():
        return float(model(**batch).loss)


def _started_from(cfg: Any) -> tuple[Any, torch.nn.Module]:
    """The objective (through preflight, as a run makes it) and its model with init_from
    loaded, as build_engine loads it."""
    from darkmatter.trainer import engine as eng
    from darkmatter.trainer import init_from
    from darkmatter.trainer.train import preflight

    objective = preflight(cfg)
    torch.manual_seed(cfg.train.seed)
    model = objective.build_model()
    init_from.load(model, cfg, eng.gathered)
    return objective, model


@pytest.mark.e2e
@pytest.mark.parametrize("source", ["folder", "registry"])
def test_init_from_continues_the_exported_model(
    exported: Path, text_ds: str, tmp_path: Path, source: str
) -> None:
    from darkmatter.evaluation.checkpoints import consolidated_state_dict, resolve

    uri = str(exported / "export") if source == "folder" else f"models:/{REGISTERED}/1"
    objective, model = _started_from(_config(tmp_path, text_ds, uri))
    batch = _batch(objective)
    # The exported model: the checkpoint's whole pretraining model (encoder and MLM head).
    torch.manual_seed(1)
    reference = objective.build_model()
    reference.load_state_dict(consolidated_state_dict(resolve(str(exported))))
    torch.manual_seed(0)
    random = _loss(objective.build_model(), batch)
    got, want = _loss(model, batch), _loss(reference, batch)
    assert got == pytest.approx(want, rel=1e-6, abs=1e-6)
    assert got < 0.6 * random, (got, random)  # random init: about ln(vocabulary)
    assert random == pytest.approx(math.log(int(objective.meta["vocab_size"])), rel=0.1)


@pytest.mark.e2e
def test_an_encoder_without_heads_starts_the_encoder_only(
    exported: Path, text_ds: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A plain save_pretrained encoder (the export less its heads file and record): the encoder's
    weights load, the MLM head's transform keeps its init (a warning names it), the decoder
    follows the word embeddings it is tied to."""
    plain = tmp_path / "plain"
    shutil.copytree(exported / "export", plain)
    (plain / "pretraining_heads.safetensors").unlink()
    (plain / "darkmatter.json").unlink()
    _, whole = _started_from(_config(tmp_path, text_ds, str(exported / "export")))
    with caplog.at_level("WARNING", logger="darkmatter.init_from"):
        objective, model = _started_from(_config(tmp_path, text_ds, str(plain)))
    assert "cls.predictions.transform.dense.weight" in caplog.text
    assert "bert." not in caplog.text  # every encoder weight was there
    for name, p in whole.bert.state_dict().items():
        torch.testing.assert_close(model.bert.state_dict()[name], p, rtol=0, atol=0, msg=name)
    decoder = model.cls.predictions.decoder.weight
    assert decoder is model.bert.embeddings.word_embeddings.weight
    batch = _batch(objective)
    torch.manual_seed(0)
    random = _loss(objective.build_model(), batch)
    assert _loss(whole, batch) < _loss(model, batch) < random


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.hidden_size=64"], "model.init_from: hidden_size 32 in {src}/config.json, 64 in this config"),
        (["model.num_layers=2"], "model.init_from: num_hidden_layers 1 in {src}/config.json, 2 in this config"),
        (["data.seq_len=64"], "model.init_from: max_position_embeddings 32 in {src}/config.json, 64 in this config"),
        (["objective=clm"], "model.init_from: model_type bert in {src}/config.json, gpt2 in this config"),
    ],
)  # fmt: skip
def test_a_model_that_does_not_fit_is_refused_naming_both_sides(
    exported: Path, text_ds: str, tmp_path: Path, overrides: list[str], message: str
) -> None:
    from darkmatter.trainer.train import preflight

    src = exported / "export"
    with pytest.raises(ConfigError) as e:
        preflight(_config(tmp_path, text_ds, str(src), *overrides))
    assert str(e.value) == message.format(src=src)


@pytest.mark.e2e
def test_another_vocabulary_is_refused(exported: Path, text_ds: str, tmp_path: Path) -> None:
    """A dataset with a tokenizer of another size, and one of the same size whose ids differ (the
    export's tokenizer with two tokens swapped): both refused in preflight."""
    import json

    from darkmatter.data_pipeline.prepare import prepare
    from darkmatter.trainer.train import preflight

    corpus = tmp_path / "other.txt"
    corpus.write_text("".join(f"zebra {i} quartz {i * 7} umbrella violet\n" for i in range(300)))
    other = tmp_path / "other-ds"
    prepare([str(corpus)], str(other), modality="text", vocab_size=200, shard_bytes=100_000)
    src = exported / "export"
    where = re.escape(f"{src}/config.json")
    with pytest.raises(
        ConfigError, match=rf"^model.init_from: vocab_size \d+ in {where}, \d+ in this config$"
    ):
        preflight(_config(tmp_path, str(other), str(src)))

    swapped = tmp_path / "swapped"
    shutil.copytree(src, swapped)
    tok = json.loads((swapped / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[-2:]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (swapped / "tokenizer.json").write_text(json.dumps(tok))
    message = (
        rf"^model.init_from: the tokenizer of {re.escape(str(swapped))} \(\d+ tokens\) "
        r"differs from the dataset's \(.*\): 2 tokens have other ids$"
    )
    with pytest.raises(ConfigError, match=message):
        preflight(_config(tmp_path, text_ds, str(swapped)))


@pytest.mark.e2e
def test_init_from_s3_starts_the_run_where_the_export_stopped(
    exported: Path, text_ds: str, tmp_path: Path, bucket: str
) -> None:
    """`darkmatter pretrain` with init_from on S3: the same seed and data as the exported run, so
    its first step sees the exported run's first batch, at a loss near the exported run's last
    rather than the random init's first."""
    from darkmatter.storage import put_file

    for f in (exported / "export").iterdir():
        put_file(str(f), f"{bucket}/encoders/mlm/{f.name}")
    cfg = write_config(tmp_path / "c.yaml", text_ds, tmp_path / "next",
                       train={"steps": 2, "log_every": 1}, model={"dropout": 0.0,
                       "init_from": f"{bucket}/encoders/mlm"})  # fmt: skip
    out = run_darkmatter("pretrain", str(cfg), env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    before = metrics(exported)
    first = metrics(tmp_path / "next")[0]
    assert first["step"] == 1 and before[0]["step"] == 1
    assert first["loss"] < 0.6 * before[0]["loss"], (first["loss"], before[0]["loss"])
    assert first["loss"] < before[-1]["loss"] + 0.5, (first["loss"], before[-1]["loss"])


def test_an_export_whose_encoder_is_the_teacher_continues_teacher_and_student(
    tmp_path: Path,
) -> None:
    """ijepa (as dino and video_future) exports its EMA target encoder (`teacher.vit.`): an
    init_from of that export puts it back in the teacher and the online encoder, from the heads
    file, in `vit.` — both as the checkpoint had them, though they differ (momentum 0.5). The
    export as another objective's encoder (mae's init_from) starts the teacher as the online
    network, as a fresh start does."""
    from darkmatter.data_pipeline.prepare import prepare
    from darkmatter.quickstart.run import digits
    from darkmatter.trainer import checkpoint_reader as reader

    digits(tmp_path / "png", str(tmp_path / "digits.parquet"))
    prepare([str(tmp_path / "png")], str(tmp_path / "ds"), modality="image")
    model = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64,
             "patch_size": 2, "predictor_hidden_size": 32, "predictor_depth": 1,
             "momentum": 0.5}  # fmt: skip
    cfg = write_config(tmp_path / "c.yaml", str(tmp_path / "ds"), tmp_path / "run",
                       objective="ijepa", data={"image_size": 16}, model=model,
                       train={"steps": 3, "zero_stage": 0}, checkpoint={"every": 3})  # fmt: skip
    out = run_darkmatter("pretrain", str(cfg), env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    exp = run_darkmatter("export", str(tmp_path / "run"), str(tmp_path / "export"))
    assert exp.returncode == 0, exp.stderr[-3000:]
    saved = reader.consolidated_state_dict(reader.resolve(str(tmp_path / "run")))
    key = "embeddings.patch_embeddings.projection.weight"
    assert not torch.equal(saved["teacher.vit." + key], saved["vit." + key])
    nxt = load_config(cfg, [f"model.init_from={tmp_path / 'export'}"])
    _, started = _started_from(nxt)
    weights = started.state_dict()
    for name in ("teacher.vit." + key, "vit." + key, "teacher.vit.layernorm.weight"):
        torch.testing.assert_close(weights[name].float(), saved[name], rtol=0, atol=0)
