"""Throughput features: each one changes how the work is done, never what is computed.

Activation checkpointing, the attention kernel and the AdamW kernel are checked against their
reference on the same model and batch; packing is checked on its rows; bad settings fail with
the key named. One short `darkmatter pretrain` run trains with all of them on. torch.compile is exercised by
bench/features.py, not here: a cold inductor compile costs about a minute on 2 cores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from darkmatter.data_pipeline.prepare import DEFAULT_SPECIAL_IDS
from darkmatter.trainer.config import ConfigError
from darkmatter.trainer.objectives import load_config
from darkmatter.trainer.objectives.mlm import MLMObjective, pack
from tests.helpers import metrics, run_darkmatter, write_config

PAD_ID, CLS_ID, SEP_ID = (DEFAULT_SPECIAL_IDS[k] for k in ("pad", "cls", "sep"))
META = {"vocab_size": 200, "special_tokens": DEFAULT_SPECIAL_IDS}


def _cfg(tmp_path: Path, *overrides: str):  # type: ignore[no-untyped-def]
    path = write_config(tmp_path / "c.yaml", "unused", tmp_path / "run",
                        model={"dropout": 0.0, "num_layers": 2})  # fmt: skip
    return load_config(path, list(overrides))


def _batch(obj: MLMObjective, n: int = 4) -> dict[str, torch.Tensor]:
    rng = np.random.RandomState(0)
    docs = [
        np.concatenate([[CLS_ID], rng.randint(5, 200, rng.randint(5, 29)), [SEP_ID]])
        for _ in range(n)
    ]
    return obj.make_batch([{"input_ids": d} for d in docs], torch.Generator().manual_seed(0))


def _loss_and_grads(cfg, batch):  # type: ignore[no-untyped-def]
    from darkmatter.trainer.engine import set_throughput_features

    obj = MLMObjective(cfg, META)
    torch.manual_seed(0)
    model = obj.build_model()
    set_throughput_features(model, cfg)
    model.train()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_pack_fills_rows_end_to_end() -> None:
    docs = [np.array([CLS_ID, 10, 11, SEP_ID]), np.array([CLS_ID, *range(20, 30), SEP_ID]),
            np.array([CLS_ID, 40, SEP_ID])]  # fmt: skip
    rows = pack(docs, seq_len=8, pad_id=PAD_ID)
    flat = np.concatenate(docs)
    assert rows.shape == (3, 8)  # 19 tokens -> ceil(19 / 8) rows
    assert rows.flatten()[: len(flat)].tolist() == flat.tolist()  # nothing dropped or reordered
    assert rows.flatten()[len(flat) :].tolist() == [PAD_ID] * (24 - len(flat))


def test_packing_removes_padding(tmp_path: Path) -> None:
    padded = MLMObjective(_cfg(tmp_path), META)
    packed = MLMObjective(_cfg(tmp_path, "data.packing=true"), META)
    a, b = _batch(padded, 8), _batch(packed, 8)
    # The same real tokens (no document here is longer than a row), in fewer, fuller rows.
    assert int(a["attention_mask"].sum()) == int(b["attention_mask"].sum())
    assert b["input_ids"].shape[0] < a["input_ids"].shape[0]
    assert float(b["attention_mask"][:-1].float().mean()) == 1.0  # only the last row has padding


def test_activation_checkpointing_gives_the_same_loss_and_gradients(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    batch = _batch(MLMObjective(cfg, META))
    loss, grads = _loss_and_grads(cfg, batch)
    loss_ckpt, grads_ckpt = _loss_and_grads(_cfg(tmp_path, "train.activation_checkpointing=true"),
                                            batch)  # fmt: skip
    assert torch.equal(loss, loss_ckpt)
    for name, g in grads.items():
        torch.testing.assert_close(grads_ckpt[name], g, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("name", ["simclr", "moco", "byol", "dino"])
def test_activation_checkpointing_reaches_the_vit_inside_the_two_view_models(
    name: str, tmp_path: Path
) -> None:
    """Their host models hold a ViTModel (and heads, a teacher): checkpointing enabled on the
    host checkpoints the ViT's layers, and the step computes what it computes without."""
    from darkmatter.trainer.engine import set_throughput_features
    from darkmatter.trainer.objectives import OBJECTIVES

    rng = np.random.RandomState(0)
    images = [{"image": rng.randint(0, 255, (16, 16, 3), dtype=np.uint8)} for _ in range(4)]
    out = {}
    for on in (False, True):
        path = write_config(tmp_path / "v.yaml", "unused", tmp_path / "run", objective=name,
                            data={"image_size": 16},
                            model={"hidden_size": 32, "num_heads": 2, "intermediate_size": 64,
                                   "patch_size": 4})  # fmt: skip
        cfg = load_config(path, [f"train.activation_checkpointing={str(on).lower()}"])
        obj = OBJECTIVES[name](cfg, {"modality": "image"})
        torch.manual_seed(0)
        model = obj.build_model()
        set_throughput_features(model, cfg)
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.vit.modules()) is on
        model.train()
        loss = model(**obj.make_batch(images, torch.Generator().manual_seed(0))).loss
        loss.backward()
        out[on] = (
            loss.detach(),
            {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
        )
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-6, atol=1e-7)
    assert out[True][1].keys() == out[False][1].keys() and out[True][1]
    for n, g in out[False][1].items():
        torch.testing.assert_close(out[True][1][n], g, rtol=1e-5, atol=1e-7, msg=n)


def test_activation_checkpointing_on_a_model_without_it_fails_naming_the_class(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from darkmatter.trainer.objectives import OBJECTIVES
    from darkmatter.trainer.objectives.contrastive import ViTHostModel
    from darkmatter.trainer.preflight import check_activation_checkpointing

    path = write_config(tmp_path / "v.yaml", "unused", tmp_path / "run", objective="simclr",
                        data={"image_size": 16}, model={"patch_size": 4})  # fmt: skip
    objective = OBJECTIVES["simclr"](load_config(path), {"modality": "image"})
    check_activation_checkpointing(objective)  # supported: nothing to say
    monkeypatch.setattr(ViTHostModel, "supports_gradient_checkpointing", False)
    with pytest.raises(ConfigError, match=r"train.activation_checkpointing: SimCLRModel \(objective "
                       r"simclr\) does not support activation checkpointing; set it to false"):  # fmt: skip
        check_activation_checkpointing(objective)


def test_sdpa_matches_eager_attention(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "model.attention=eager")
    batch = _batch(MLMObjective(cfg, META))
    loss, grads = _loss_and_grads(cfg, batch)
    loss_sdpa, grads_sdpa = _loss_and_grads(_cfg(tmp_path, "model.attention=sdpa"), batch)
    torch.testing.assert_close(loss_sdpa, loss, rtol=1e-5, atol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(grads_sdpa[name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_adamw_kernels_take_the_same_step(impl: str, tmp_path: Path) -> None:
    from darkmatter.trainer.engine import build_optimizer

    def one_step(cfg):  # type: ignore[no-untyped-def]
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.LayerNorm(16))
        opt = build_optimizer(model, cfg)
        model(torch.ones(4, 16)).square().mean().backward()
        opt.step()
        return [p.detach().clone() for p in model.parameters()], opt

    ref, ref_opt = one_step(_cfg(tmp_path, "train.adamw_impl=loop"))
    got, opt = one_step(_cfg(tmp_path, f"train.adamw_impl={impl}"))
    assert opt.defaults[impl] is True and ref_opt.defaults["foreach"] is False
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]  # norms/biases: none
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.attention=flash"], "model.attention: unknown 'flash'"),
        (["train.adamw_impl=apex"], "train.adamw_impl: unknown 'apex'"),
        (["train.offload_optimizer=true", "train.zero_stage=0"],
         "train.offload_optimizer: needs train.zero_stage 1-3, got 0"),
        (["data.min_crop_scale=0"], r"data.min_crop_scale: expected in \(0, 1\], got 0"),
        (["data.flip_prob=1.5"], r"data.flip_prob: expected in \[0, 1\], got 1.5"),
        (["faults.collective_timeout_s=0"], "faults.collective_timeout_s: expected > 0, got 0"),
    ],
)  # fmt: skip
def test_bad_feature_settings_name_the_key(
    overrides: list[str], message: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=message):
        _cfg(tmp_path, *overrides)


def test_offload_sets_deepspeeds_offload_section(tmp_path: Path) -> None:
    from darkmatter.trainer.config import deepspeed_config

    ds = deepspeed_config(_cfg(tmp_path, "train.offload_optimizer=true"), 2)
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}


def test_pretrain_with_every_feature_on(text_ds: str, tmp_path: Path) -> None:
    """Packing, activation checkpointing, sdpa and fused AdamW together under ZeRO-2: the loss
    falls and throughput is reported."""
    run_dir = tmp_path / "run"
    cfg = write_config(
        tmp_path / "all.yaml", text_ds, run_dir,
        data={"packing": True},
        train={"steps": 8, "log_every": 2, "activation_checkpointing": True,
               "adamw_impl": "fused", "zero_stage": 2},
        model={"attention": "sdpa", "dropout": 0.0},
    )  # fmt: skip
    out = run_darkmatter("pretrain", str(cfg), timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert all(r["tokens_per_s"] > 0 for r in rows)
