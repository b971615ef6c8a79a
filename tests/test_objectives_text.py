"""The text objectives `clm` (GPT-2 causal LM) and `span` (T5 span corruption): their batches,
losses and FLOP counts against references computed here, and one short pretraining run each,
exported and loaded back."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from darkmatter.data_pipeline.prepare import DEFAULT_SPECIAL_IDS
from darkmatter.trainer.config import Config, DataConfig, ModelConfig, TrainConfig
from darkmatter.trainer.objectives import OBJECTIVES
from darkmatter.trainer.objectives.base import Objective
from darkmatter.trainer.objectives.span import NUM_SENTINELS, random_spans_noise_mask
from tests.helpers import metrics, run_darkmatter, write_config

VOCAB = 60  # the tokenizer's; span adds 100 sentinels above it
# prepare's trained tokenizer's special ids ([PAD]=0 [CLS]=2 [SEP]=3)
PAD_ID, CLS_ID, SEP_ID = (DEFAULT_SPECIAL_IDS[k] for k in ("pad", "cls", "sep"))
META = {"modality": "text", "vocab_size": VOCAB, "special_tokens": DEFAULT_SPECIAL_IDS}
# One thread for these tiny models: on a busy 2-core machine, torch's second thread spins
# waiting for the first and a 0.2 s test takes 30 s.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def objective(name: str, seq_len: int = 32, packing: bool = False, layers: int = 1) -> Objective:
    cfg = Config(
        objective=name, data=DataConfig(url="unused", seq_len=seq_len, packing=packing),
        train=TrainConfig(steps=1),
        model=ModelConfig(hidden_size=32, num_layers=layers, num_heads=2, intermediate_size=48,
                          dropout=0.0),
        objective_settings=OBJECTIVES[name].settings_class(),
    )  # fmt: skip
    return OBJECTIVES[name](cfg, META)


def documents(n: int, seed: int, lo: int = 4, hi: int = 40) -> list[dict[str, Any]]:
    """Samples as the reader gives them: [CLS] body [SEP], bodies of lo..hi-1 ordinary tokens."""
    rng = np.random.default_rng(seed)
    return [
        {"input_ids": np.concatenate([[CLS_ID], rng.integers(5, VOCAB, rng.integers(lo, hi)),
                                      [SEP_ID]]).astype(np.int64)}
        for _ in range(n)
    ]  # fmt: skip


def model_for(obj: Objective) -> Any:
    torch.manual_seed(0)
    return obj.build_model()


def overfit(obj: Objective, batch: dict[str, Any], steps: int = 40) -> tuple[float, float]:
    """(first loss, last loss) of `steps` AdamW steps on one fixed batch."""
    model = model_for(obj).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


def measured_flops(obj: Objective, batch: dict[str, Any]) -> int:
    """Multiply FLOPs of one forward and backward pass, counted by torch as they run."""
    model = model_for(obj)
    model.set_attn_implementation("eager")  # plain matmuls, counted on every backend
    with FlopCounterMode(display=False) as counter:
        model(**batch).loss.backward()
    return int(counter.get_total_flops())


# --- clm -----------------------------------------------------------------------------------------


def test_clm_loss_is_next_token_cross_entropy_over_real_tokens() -> None:
    obj = objective("clm")
    batch = obj.make_batch(documents(4, seed=1), torch.Generator().manual_seed(0))
    ids, attention = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == (4, 32) and (ids == PAD_ID).any()  # padded rows
    assert torch.equal(batch["labels"] == -100, attention == 0)
    with torch.no_grad():
        out = model_for(obj).eval()(**batch)
    target = ids[:, 1:].masked_fill(attention[:, 1:] == 0, -100)
    by_hand = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), target.reshape(-1))
    assert out.loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert obj.tokens(batch) == int(attention.sum())


def test_clm_packing_fills_rows_with_whole_documents() -> None:
    docs = documents(5, seed=2)
    batch = objective("clm", packing=True).make_batch(docs, torch.Generator().manual_seed(0))
    flat = np.concatenate([d["input_ids"] for d in docs])
    rows = -(-len(flat) // 32)
    assert batch["input_ids"].shape == (rows, 32)
    assert int(batch["attention_mask"][:-1].sum()) == (rows - 1) * 32  # only the last row pads
    assert batch["input_ids"].flatten()[: len(flat)].tolist() == flat.tolist()


def test_clm_overfits_one_batch() -> None:
    obj = objective("clm")
    first, last = overfit(obj, obj.make_batch(documents(4, seed=3), torch.Generator()))
    assert first == pytest.approx(math.log(VOCAB), rel=0.1)  # a fresh model is near uniform
    assert last < 0.1 * first, (first, last)


def test_clm_flops_match_the_counted_multiplies() -> None:
    """PaLM's formula as the objective applies it equals torch's count of the model's matrix
    multiplies, forward and backward, on a row without padding."""
    obj = objective("clm", seq_len=24, layers=2)
    docs = documents(1, seed=4, lo=22, hi=23)  # 24 tokens: one full row
    batch = obj.make_batch(docs, torch.Generator())
    assert int(batch["attention_mask"].sum()) == 24
    assert obj.flops(batch) == measured_flops(obj, batch)


# --- mlm -----------------------------------------------------------------------------------------


def test_mlm_head_at_the_chosen_positions_only_gives_transformers_loss_and_gradients() -> None:
    """The head scores only the chosen tokens; the loss and every gradient are those of
    transformers' BertForMaskedLM, which scores every position and ignores the rest."""
    from transformers import BertForMaskedLM

    obj = objective("mlm", layers=2)
    batch = obj.make_batch(documents(4, seed=6), torch.Generator().manual_seed(0))
    chosen = batch["labels"] != -100
    assert batch["chosen_positions"].tolist() == chosen.flatten().nonzero().flatten().tolist()
    model = model_for(obj)
    reference = BertForMaskedLM(model.config)
    reference.load_state_dict(model.state_dict())
    out = model(**batch)
    ref = reference(**{k: v for k, v in batch.items() if k != "chosen_positions"})
    assert out.logits.shape == (int(chosen.sum()), VOCAB) and ref.logits.shape == (4, 32, VOCAB)
    torch.testing.assert_close(out.logits, ref.logits[chosen], rtol=1e-5, atol=1e-5)
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-6)
    out.loss.backward()
    ref.loss.backward()
    grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    # Without chosen positions it is transformers' model: logits at every position.
    with torch.no_grad():
        assert model(input_ids=batch["input_ids"]).logits.shape == (4, 32, VOCAB)
    # Nothing chosen: a zero loss, not NaN.
    nothing = torch.full_like(batch["labels"], -100)
    none = model(input_ids=batch["input_ids"], labels=nothing,
                 chosen_positions=torch.zeros(0, dtype=torch.long))  # fmt: skip
    assert none.loss.item() == 0.0


def test_mlm_flops_match_the_counted_multiplies() -> None:
    """The encoder on every real token plus the head on the chosen ones: torch's count."""
    obj = objective("mlm", seq_len=24, layers=2)
    batch = obj.make_batch(documents(1, seed=4, lo=22, hi=23), torch.Generator().manual_seed(1))
    assert int(batch["attention_mask"].sum()) == 24 and 0 < len(batch["chosen_positions"]) < 24
    assert obj.flops(batch) == measured_flops(obj, batch)


# --- span ----------------------------------------------------------------------------------------


def spans_of(mask: torch.Tensor) -> list[int]:
    """Lengths of the runs of True."""
    out, run = [], 0
    for m in mask.tolist() + [False]:
        if m:
            run += 1
        elif run:
            out.append(run)
            run = 0
    return out


def test_noise_mask_has_t5s_noise_and_span_counts() -> None:
    gen = torch.Generator().manual_seed(0)
    for length in range(10, 400, 3):
        for _ in range(3):
            mask = random_spans_noise_mask(length, 0.15, gen)
            noise = round(length * 0.15)
            spans = spans_of(mask)
            assert mask.shape == (length,) and int(mask.sum()) == noise, length
            assert len(spans) == max(1, round(noise / 3)), length
            assert not mask[0] and mask[-1]  # T5 starts with kept tokens and ends with noise
    # Degenerate lengths, as T5 treats them: at least one noise and one kept token.
    assert random_spans_noise_mask(1, 0.15, gen).tolist() == [False]
    assert random_spans_noise_mask(2, 0.15, gen).tolist() == [False, True]
    assert int(random_spans_noise_mask(6, 0.15, gen).sum()) == 1


def test_noise_span_lengths_are_random_with_mean_three() -> None:
    gen = torch.Generator().manual_seed(1)
    lengths = [n for _ in range(500) for n in spans_of(random_spans_noise_mask(120, 0.15, gen))]
    assert len(lengths) == 500 * 6 and sum(lengths) == 500 * 18  # 18 noise tokens in 6 spans
    counts = np.bincount(lengths)
    assert counts[1] > counts[2] > counts[3] > counts[4] > 0  # cut points uniform: 1 most likely


def test_mean_span_length_one_corrupts_single_tokens() -> None:
    """model.mean_span_length: 1 (T5's i.i.d. corruption): every noise span is one token, so
    the targets alternate sentinel, token; the noise count is still round(0.15 L)."""
    obj = objective("span", seq_len=64, packing=True)
    obj.settings.mean_span_length = 1.0
    gen = torch.Generator().manual_seed(2)
    for length in (20, 63, 127):
        mask = random_spans_noise_mask(length, 0.15, gen, mean_span=1.0)
        assert spans_of(mask) == [1] * round(0.15 * length), length
    batch = obj.make_batch(documents(6, seed=9, lo=30, hi=60), gen)
    for labels in batch["labels"]:
        target = labels[labels != -100].tolist()[:-1]  # without the closing [SEP]
        assert all(t >= VOCAB for t in target[0::2]) and all(t < VOCAB for t in target[1::2])


def test_span_refuses_a_mean_span_below_one() -> None:
    from darkmatter.trainer.config import ConfigError

    cfg = objective("span").cfg
    cfg.objective_settings.mean_span_length = 0.5  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="model.mean_span_length: expected >= 1, got 0.5"):
        OBJECTIVES["span"].validate(cfg)


def test_masks_are_a_pure_function_of_the_generator_seed() -> None:
    # Long enough for several spans each (one span sits at the end whatever the seed).
    obj, docs = objective("span", seq_len=128), documents(8, seed=5, lo=60, hi=120)
    a = obj.make_batch(docs, torch.Generator().manual_seed(7))
    torch.manual_seed(123)  # the global RNG plays no part
    b = obj.make_batch(docs, torch.Generator().manual_seed(7))
    c = obj.make_batch(docs, torch.Generator().manual_seed(8))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["input_ids"], c["input_ids"])


def reconstruct(inputs: list[int], target: list[int]) -> list[int]:
    """The sequence the pair was made from: each sentinel in the input replaced by what follows
    it in the target. Also checks that the sentinels are <extra_id_0>, <extra_id_1>, ... in
    order (V + 99, V + 98, ...), and that both end with [SEP]."""
    top = VOCAB + NUM_SENTINELS - 1
    assert inputs[-1] == SEP_ID and target[-1] == SEP_ID
    in_sentinels = [t for t in inputs if t >= VOCAB]
    assert in_sentinels == [top - i for i in range(len(in_sentinels))]
    assert [t for t in target if t >= VOCAB] == in_sentinels
    spans: dict[int, list[int]] = {}
    for t in target[:-1]:
        if t >= VOCAB:
            current = spans.setdefault(t, [])
        else:
            current.append(t)
    assert all(spans.values())  # no empty span
    out: list[int] = []
    for t in inputs[:-1]:
        out.extend(spans[t] if t >= VOCAB else [t])
    return out + [SEP_ID]


@pytest.mark.parametrize("packing", [False, True])
def test_span_inputs_and_targets_reconstruct_the_documents(packing: bool) -> None:
    obj = objective("span", packing=packing)
    for seed in range(5):
        docs = documents(6, seed=seed, hi=50)  # some longer than seq_len: truncated
        batch = obj.make_batch(docs, torch.Generator().manual_seed(seed))
        rows = []
        for ids, att, labels in zip(
            *(batch[k] for k in ("input_ids", "attention_mask", "labels")), strict=True
        ):
            inputs, target = ids[att == 1].tolist(), labels[labels != -100].tolist()
            assert len(inputs) <= 32 and PAD_ID not in inputs
            rows.append(reconstruct(inputs, target))
        if packing:  # pieces of 31 tokens, each closed by [SEP]
            flat = np.concatenate([d["input_ids"] for d in docs]).tolist()
            assert [t for r in rows for t in r[:-1]] == flat
            assert all(len(r) == 32 for r in rows[:-1])
        else:  # each document, truncated to 31 tokens and closed by [SEP]
            want = [d["input_ids"][:-1][:31].tolist() + [SEP_ID] for d in docs]
            assert rows == want
        assert obj.tokens(batch) == int(batch["attention_mask"].sum()) + int(
            (batch["labels"] != -100).sum()
        )


def test_span_loss_is_cross_entropy_of_the_targets() -> None:
    obj = objective("span")
    batch = obj.make_batch(documents(4, seed=6), torch.Generator().manual_seed(0))
    assert (batch["labels"] == -100).any()  # targets of different lengths, padded
    with torch.no_grad():
        out = model_for(obj).eval()(**batch)
    logits = out.logits  # [B, T_out, V + 100]: the decoder's inputs are the labels shifted right
    assert logits.shape[-1] == VOCAB + NUM_SENTINELS
    by_hand = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))
    assert out.loss.item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_span_overfits_one_batch() -> None:
    obj = objective("span")
    first, last = overfit(obj, obj.make_batch(documents(4, seed=7), torch.Generator()))
    assert first == pytest.approx(math.log(VOCAB + NUM_SENTINELS), rel=0.1)
    assert last < 0.1 * first, (first, last)


def test_span_flops_match_the_counted_multiplies() -> None:
    """The docstring's formula (encoder, decoder, cross-attention, LM head) equals torch's count
    of the model's matrix multiplies, forward and backward, for one sequence pair."""
    obj = objective("span", seq_len=48, layers=2)
    batch = obj.make_batch(documents(1, seed=8, lo=40, hi=41), torch.Generator().manual_seed(0))
    assert obj.flops(batch) == measured_flops(obj, batch)


def test_span_decoder_layers_reach_the_model_and_the_flops() -> None:
    """model.decoder_layers sets T5Config.num_decoder_layers (0: num_layers, as T5), and the
    FLOPs formula counts that many decoder blocks."""
    obj = objective("span", seq_len=48, layers=2)
    assert obj.model_config().num_decoder_layers == 2
    obj.settings.decoder_layers = 1  # type: ignore[attr-defined]
    model = model_for(obj)
    assert (len(model.encoder.block), len(model.decoder.block)) == (2, 1)
    assert obj.flops_inputs()["decoder_layers"] == 1
    batch = obj.make_batch(documents(1, seed=8, lo=40, hi=41), torch.Generator().manual_seed(0))
    assert obj.flops(batch) == measured_flops(obj, batch)


def test_span_refuses_negative_decoder_layers() -> None:
    from darkmatter.trainer.config import ConfigError

    cfg = objective("span").cfg
    cfg.objective_settings.decoder_layers = -1  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="model.decoder_layers: expected >= 0, got -1"):
        OBJECTIVES["span"].validate(cfg)


def test_span_learning_rates_follow_t5s_initialization() -> None:
    """model.relative_lr: a weight's learning rate is train.lr times its std at T5's init (the
    embedding's 1, q's (d·d_kv)^-1/2, wo's d_ff^-1/2 ...): each matrix as built has that std,
    and the engine's optimizer gives each group train.lr times it (Adafactor's scaling, the
    optimizer T5's init is made for). Without it, every weight gets train.lr."""
    from darkmatter.trainer.engine import build_optimizer

    obj = objective("span", layers=1)
    model = model_for(obj)
    scales = {n: obj.lr_scale(n) for n, _ in model.named_parameters()}
    assert scales["shared.weight"] == 1.0 and scales["encoder.final_layer_norm.weight"] == 1.0
    assert scales["encoder.block.0.layer.0.SelfAttention.q.weight"] == (32 * 16) ** -0.5
    assert scales["decoder.block.0.layer.2.DenseReluDense.wo.weight"] == 48**-0.5
    for name, p in model.named_parameters():
        if p.numel() >= 1024:  # large enough for its sample std to be within 10% of the init's
            assert p.detach().std().item() == pytest.approx(scales[name], rel=0.1), name
    obj.cfg.train.lr = 0.01
    groups = build_optimizer(model, obj.cfg, obj.lr_scale).param_groups
    got = {id(p): g["lr"] for g in groups for p in g["params"]}
    # Decayed: q, wo, the other matrices (d^-1/2), the embedding; not decayed: the norms.
    assert len(got) == len(scales) and len(groups) == 5
    assert all(got[id(p)] == 0.01 * scales[n] for n, p in model.named_parameters())
    obj.settings.relative_lr = False  # type: ignore[attr-defined]
    assert {g["lr"] for g in build_optimizer(model, obj.cfg, obj.lr_scale).param_groups} == {0.01}


def test_span_refuses_more_spans_than_sentinels() -> None:
    with pytest.raises(ValueError, match="data.seq_len: 4096 tokens .* more than the 100"):
        objective("span", seq_len=4096)


# --- end to end ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["clm", "span"])
def test_pretrain_export_and_load(
    name: str, text_ds: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`darkmatter pretrain` (1 process, ZeRO-2, 6 steps) and `darkmatter export` (its command
    function, in this process: it needs DeepSpeed's zero_to_fp32 here anyway); the export loads
    with the class the command names and computes the evaluation encoder's features."""
    from transformers import AutoModel, AutoTokenizer, GPT2Model, T5EncoderModel

    from darkmatter.evaluation import export
    from darkmatter.evaluation.checkpoints import load_encoder, resolve
    from darkmatter.evaluation.probe import embed
    from darkmatter.evaluation.tasks import export_text_inputs

    run_dir = tmp_path / "run"
    # span's train.lr is that of a std-1 weight (model.relative_lr): its preset's 1e-2.
    cfg = write_config(tmp_path / "c.yaml", text_ds, run_dir, objective=name,  # type: ignore[arg-type]
                       data={"packing": True}, checkpoint={"every": 6},
                       train={"lr": 0.01 if name == "span" else 0.002})  # fmt: skip
    out = run_darkmatter("pretrain", str(cfg), env=ONE_THREAD)
    assert out.returncode == 0, out.stderr[-3000:]
    losses = [r["loss"] for r in metrics(run_dir)]
    assert len(losses) == 3 and all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000006"

    assert export.cli([str(run_dir), str(tmp_path / "export")]) == 0
    # GPT-2's encoder is what AutoModel builds; T5's AutoModel is the encoder-decoder.
    cls: Any = {"clm": GPT2Model, "span": T5EncoderModel}[name]
    loader: Any = AutoModel if name == "clm" else T5EncoderModel
    assert f"(load with transformers.{loader.__name__}.from_pretrained)" in capsys.readouterr().out
    model = loader.from_pretrained(tmp_path / "export").eval()
    assert type(model) is cls
    assert json.loads((tmp_path / "export/config.json").read_text())["architectures"] == [
        cls.__name__
    ]
    texts = ["the red fox jumps over the lazy dog", "a blue owl", "near the green river 7"]
    inputs = export_text_inputs(texts, tmp_path / "export")
    assert AutoTokenizer.from_pretrained(tmp_path / "export").model_max_length == 32
    ref = load_encoder(resolve(str(run_dir)))
    assert type(ref) is cls
    exported, evaluated = embed(model, inputs), embed(ref, inputs)
    assert exported.shape == (3, 32) and np.array_equal(exported, evaluated)
    # Pretrained, not a fresh init: the features differ from the random-init twin's.
    fresh = embed(load_encoder(resolve(str(run_dir)), pretrained=False), inputs)
    assert not np.allclose(exported, fresh)
