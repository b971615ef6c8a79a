"""data.pack: documents for the text objectives on rows (mlm, clm): the greedy placement into
exactly data.pack_rows rows and its dropped-token count, the equivalence that matters (a
document's tokens get the logits of the document alone in its own row: no attention across a
boundary, positions restarting), the loss over real tokens only, the figures for the log, and
span's refusal."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from darkmatter.trainer.config import Config, ConfigError, DataConfig, ModelConfig, TrainConfig
from darkmatter.trainer.objectives import OBJECTIVES, check_config
from darkmatter.trainer.objectives.base import Objective
from darkmatter.trainer.objectives.mlm import (
    Piece,
    TextObjective,
    pad_and_truncate,
    place_documents,
)

VOCAB = 60
SPECIALS = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}  # prepare's trained tokenizer's
PAD, CLS, SEP = SPECIALS["pad"], SPECIALS["cls"], SPECIALS["sep"]
META = {"modality": "text", "vocab_size": VOCAB, "special_tokens": SPECIALS}
SEQ = 32


def objective(
    name: str, rows: int = 2, attention: str = "sdpa", dropout: float = 0.0, **data: Any
) -> TextObjective:
    cfg = Config(
        objective=name,
        data=DataConfig(**{"url": "unused", "seq_len": SEQ, "pack": "documents",
                           "pack_rows": rows, **data}),
        train=TrainConfig(steps=1, micro_batch_size=4),
        model=ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=48,
                          dropout=dropout, attention=attention),
        objective_settings=OBJECTIVES[name].settings_class(),
    )  # fmt: skip
    obj = OBJECTIVES[name](cfg, META)
    assert isinstance(obj, TextObjective)
    return obj


def doc(body: int, seed: int) -> np.ndarray:
    """[CLS] + `body` ordinary tokens + [SEP]: body + 2 tokens."""
    rng = np.random.default_rng(seed)
    return np.concatenate([[CLS], rng.integers(5, VOCAB, body), [SEP]]).astype(np.int64)


def samples(docs: list[np.ndarray]) -> list[dict[str, Any]]:
    return [{"input_ids": d} for d in docs]


def model_for(obj: Objective, attention: str) -> Any:
    torch.manual_seed(0)
    model = obj.build_model().eval()
    model.set_attn_implementation(attention)
    return model


# --- placement ---------------------------------------------------------------------------------


def test_place_documents_greedy_in_order_splits_long_ones_and_counts_what_is_dropped() -> None:
    # Rows of 10: [4 5 .] [10, the first piece of the 13]; its last 3 and then the 1 find
    # row 1 (the open row: rows are never revisited) full and no row 2: both dropped.
    placed, dropped = place_documents([4, 5, 13, 1], rows=2, seq_len=10)
    assert placed == [Piece(0, 0, 0, 0, 4), Piece(1, 0, 0, 4, 5), Piece(2, 0, 1, 0, 10)]
    assert dropped == 3 + 1
    # The last row stays open to a later, shorter document: 7 is dropped, 2 fills row 1's end.
    placed, dropped = place_documents([6, 6, 7, 2], rows=2, seq_len=10)
    assert [(p.doc, p.row, p.col) for p in placed] == [(0, 0, 0), (1, 1, 0), (3, 1, 6)]
    assert dropped == 7


@pytest.mark.parametrize("name", ["mlm", "clm"])
def test_rows_are_exactly_pack_rows_whatever_the_documents(name: str) -> None:
    obj = objective(name, rows=3)
    cases = {
        "one short": [doc(3, 0)],
        "many short": [doc(2, s) for s in range(30)],  # 4 tokens each: 8 a row, 6 dropped
        "longer than a row": [doc(70, 1), doc(10, 2)],  # 72 = 32 + 32 + 8, then 12 fits row 2
        "nothing": [],
    }
    want_dropped = {"one short": 0, "many short": 6 * 4, "longer than a row": 0, "nothing": 0}
    for case, docs in cases.items():
        batch = obj.make_batch(samples(docs), torch.Generator().manual_seed(0))
        assert batch["input_ids"].shape == (3, SEQ), case
        assert batch["attention_mask"].shape == (3, 1, SEQ, SEQ), case
        total = sum(len(d) for d in docs)
        packed = batch["packed"]
        assert packed.dropped_tokens == want_dropped[case], case
        assert obj.tokens(batch) + packed.dropped_tokens == total, case
        assert int((batch["input_ids"] != PAD).sum()) == obj.tokens(batch), case


def test_pack_rows_zero_means_the_micro_batch_size() -> None:
    batch = objective("mlm", rows=0).make_batch(samples([doc(5, 0)]), torch.Generator())
    assert batch["input_ids"].shape == (4, SEQ)  # train.micro_batch_size


def test_positions_restart_and_mask_is_block_diagonal() -> None:
    obj = objective("clm", rows=1)
    batch = obj.make_batch(samples([doc(2, 0), doc(3, 1)]), torch.Generator())  # 4 + 5 tokens
    assert batch["position_ids"][0, :9].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4]
    mask = batch["attention_mask"][0, 0]
    assert mask[5, 4] and mask[5, 5] and not mask[5, 6]  # causal within the second document
    assert not mask[5, :4].any() and not mask[2, 4:].any()  # nothing across the boundary
    assert mask[20, 9] and not mask[20, :9].any()  # padding attends to padding only


# --- the equivalence -----------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["mlm", "clm"])
def test_packed_documents_get_the_logits_they_get_alone(name: str, attention: str) -> None:
    """A row holding documents A and B (and a second row holding C) gives each document's tokens
    the logits the document gets alone in its own padded row, as data.pack: none runs it."""
    obj = objective(name, rows=2, attention=attention)
    docs = [doc(8, 0), doc(12, 1), doc(20, 2)]  # 10 + 14 in row 0; 22 starts row 1
    batch = obj.to_device(obj.text_inputs(samples(docs)), "cpu", bf16=False)
    assert "packed" not in batch  # the host's figures never reach the model
    model = model_for(obj, attention)
    alone_ids = pad_and_truncate(docs, SEQ, PAD, SEP)
    with torch.no_grad():
        packed = model(**batch).logits
        alone = model(input_ids=alone_ids, attention_mask=(alone_ids != PAD).long()).logits
        # The control: the same row attending across the boundary, positions running on.
        crossing = model(input_ids=batch["input_ids"]).logits
    a, b, c = (len(d) for d in docs)
    pairs = [(packed[0, :a], alone[0, :a]), (packed[0, a : a + b], alone[1, :b]),
             (packed[1, :c], alone[2, :c])]  # fmt: skip
    for i, (got, want) in enumerate(pairs):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"document {i}")
    assert not torch.allclose(crossing[0, a : a + b], alone[1, :b], atol=1e-3)


def test_clm_packed_loss_is_the_unpacked_loss() -> None:
    """Same predictions, same logits: the packed loss averages exactly the next-token terms of
    the documents alone; no padding, no first token scored against the document before it."""
    docs = [doc(8, 3), doc(12, 4), doc(20, 5)]
    packed_obj = objective("clm", rows=2)
    batch = packed_obj.to_device(
        packed_obj.make_batch(samples(docs), torch.Generator()), "cpu", False
    )
    starts = batch["position_ids"] == 0
    assert (batch["labels"][starts] == -100).all()
    assert int((batch["labels"] != -100).sum()) == sum(len(d) - 1 for d in docs)
    alone_ids = pad_and_truncate(docs, SEQ, PAD, SEP)
    alone_labels = alone_ids.masked_fill(alone_ids == PAD, -100)
    model = model_for(packed_obj, "sdpa")
    with torch.no_grad():
        packed_loss = model(**batch).loss
        alone_loss = model(input_ids=alone_ids, attention_mask=(alone_ids != PAD).long(),
                           labels=alone_labels).loss  # fmt: skip
    assert packed_loss.item() == pytest.approx(alone_loss.item(), rel=1e-5)


def test_mlm_loss_is_over_the_chosen_real_tokens_only() -> None:
    obj = objective("mlm", rows=2)
    batch = obj.make_batch(
        samples([doc(20, s) for s in range(3)]), torch.Generator().manual_seed(1)
    )
    labels, ids = batch["labels"], batch["input_ids"]
    assert (labels[ids == PAD] == -100).all() and (labels != -100).sum() > 0
    model = model_for(obj, "sdpa")
    with torch.no_grad():
        out = model(**obj.to_device(batch, "cpu", False))
    chosen = labels != -100
    assert out.logits.shape[0] == int(chosen.sum())  # the head scores the chosen tokens only
    by_hand = F.cross_entropy(out.logits, labels[chosen])
    assert out.loss.item() == pytest.approx(by_hand.item(), rel=1e-6)


# --- figures for the log -------------------------------------------------------------------------


def test_counts_tokens_and_flops_are_those_of_the_documents() -> None:
    docs = [doc(8, 0), doc(12, 1), doc(20, 2), doc(28, 3)]  # 10 14 | 22 | 30: dropped with 2 rows
    obj = objective("clm", rows=2)
    batch = obj.make_batch(samples(docs), torch.Generator())
    assert obj.counts(batch) == {
        "data/pack/tokens": 46.0, "data/pack/slots": 64.0, "data/pack/dropped_tokens": 30.0,
    }  # fmt: skip
    assert obj.tokens(batch) == 46
    # FLOPs: each document's, as if it ran alone in a row of its own (masked scores are no work).
    unpacked = objective("clm", pack="none")
    alone = unpacked.make_batch(samples(docs[:3]), torch.Generator())
    assert obj.flops(batch) == unpacked.flops(alone)
    assert unpacked.counts(alone) == {}


def test_eager_attention_gets_an_additive_mask_in_the_models_dtype() -> None:
    obj = objective("mlm", attention="eager")
    batch = obj.to_device(obj.make_batch(samples([doc(4, 0)]), torch.Generator()), "cpu", bf16=True)
    mask = batch["attention_mask"]
    assert mask.dtype == torch.bfloat16
    assert mask[0, 0, 0, 0] == 0 and mask[0, 0, 0, 10] == torch.finfo(torch.bfloat16).min


def test_mlm_trains_with_document_packing() -> None:
    """A few AdamW steps, dropout on, through make_batch and to_device as the trainer runs them:
    the loss is finite and falls."""
    obj = objective("mlm", rows=4, dropout=0.1)
    torch.manual_seed(0)
    model = obj.build_model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    docs = samples([doc(int(n), s) for s, n in enumerate([3, 40, 9, 17, 25, 6, 12])])
    losses = []
    for step in range(30):
        batch = obj.to_device(
            obj.make_batch(docs, torch.Generator().manual_seed(step)), "cpu", False
        )
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert np.mean(losses[:5]) == pytest.approx(np.log(VOCAB), rel=0.1)  # near uniform at first
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


# --- what is refused -----------------------------------------------------------------------------


def test_span_refuses_document_packing() -> None:
    with pytest.raises(ValueError, match="data.pack: documents is not supported by span: T5"):
        objective("span")


@pytest.mark.parametrize(
    "change, error",
    [({"packing": True}, "data.packing: true packs documents across boundaries"),
     ({"attention": "flash_attention_2"}, "model.attention: .* flash_attention_2 does not")],
)  # fmt: skip
def test_conflicting_settings_are_config_errors(change: dict[str, Any], error: str) -> None:
    attention = change.pop("attention", "sdpa")
    with pytest.raises(ConfigError, match=error):
        objective("mlm", attention=attention, **change)
    cfg = Config(
        objective="clm", data=DataConfig(url="unused", pack="documents", **change),
        train=TrainConfig(steps=1), model=ModelConfig(attention=attention),
        objective_settings=OBJECTIVES["clm"].settings_class(),
    )  # fmt: skip
    with pytest.raises(ConfigError, match=error):
        check_config(cfg)


# --- end to end ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_pretrain_mlm_with_document_packing_from_s3(stack: Any, tmp_path: Path) -> None:
    """`darkmatter pretrain` (1 process, DeepSpeed ZeRO-2, 6 steps) with data.pack: documents on
    a dataset on the S3 server: the trainer's make_batch, to_device and engine run the packed
    rows, and the loss is finite and falls."""
    from darkmatter import storage
    from darkmatter.data_pipeline.prepare import prepare
    from tests.helpers import metrics, run_darkmatter, synthetic_corpus, write_config

    url = f"s3://packing-{uuid.uuid4().hex[:12]}/ds"
    storage.make_bucket(url)
    prepare([str(synthetic_corpus(tmp_path / "corpus.txt"))], url, modality="text",
            vocab_size=200, shard_bytes=100_000)  # fmt: skip
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", url, run_dir,
                       data={"pack": "documents", "pack_rows": 3})  # fmt: skip
    out = run_darkmatter("pretrain", str(cfg), env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    rows = metrics(run_dir)
    losses = [r["loss"] for r in rows]
    assert len(losses) == 3 and all(map(np.isfinite, losses)) and losses[-1] < losses[0]
    assert all(r["tokens_per_s"] > 0 for r in rows)
