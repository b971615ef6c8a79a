"""DINO (and its iBOT option): the loss against DINO's eq. 3 and DINOv2's iBOT loss computed by
hand, the center's update (EMA of the mean over both ranks' teacher logits), the teacher
temperature's warmup, crops and masks as functions of the batch's generator, the FLOP count
against torch's FlopCounterMode, that the model fits a fixed batch, bad settings refused by
name, and the export: the teacher's ViT, loadable as a ViTModel. Two ranks under DeepSpeed,
resumed bit-exactly with teacher and center: tests/test_objectives_resume.py."""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.flop_counter import FlopCounterMode

from darkmatter.trainer.config import Config, ConfigError, DataConfig, ModelConfig, TrainConfig
from darkmatter.trainer.objectives import OBJECTIVES, check_config
from darkmatter.trainer.objectives.contrastive import H, W
from darkmatter.trainer.objectives.dino import (
    DINOModel,
    DINOSettings,
    dino_loss,
    draw_masks,
    ibot_loss,
    teacher_temp_at,
)

SMALL = {"patch_size": 4, "num_prototypes": 32, "head_hidden_size": 32, "bottleneck_dim": 16,
         "local_crops": 3, "local_crop_size": 8}  # fmt: skip


def config(image_size: int = 16, steps: int = 10, **settings: Any) -> Config:
    return Config(
        objective="dino",
        data=DataConfig(url="unused", image_size=image_size, flip_prob=0.0),
        train=TrainConfig(steps=steps),
        model=ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
        objective_settings=DINOSettings(**{**SMALL, **settings}),
    )


def objective(**settings: Any) -> Any:
    return OBJECTIVES["dino"](config(**settings), {"modality": "image"})


def images(n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [{"image": rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)} for _ in range(n)]


def digits(n: int) -> list[dict[str, Any]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return [{"image": np.repeat((im * 255 / 16).astype(np.uint8)[..., None], 3, -1)}
            for im in d.images[:n]]  # fmt: skip


def model_for(obj: Any) -> DINOModel:
    torch.manual_seed(0)
    model: DINOModel = obj.build_model()
    return model


# -- the losses, by hand -----------------------------------------------------------------------


def _softmax(v: list[float]) -> list[float]:
    top = max(v)
    e = [math.exp(x - top) for x in v]
    return [x / sum(e) for x in e]


def _cross_entropy(target: list[float], logits: list[float], temp: float) -> float:
    p = _softmax([x / temp for x in logits])
    return -sum(q * math.log(pi) for q, pi in zip(target, p, strict=True))


def test_dino_loss_equals_the_papers_formula() -> None:
    """DINO's eq. 3, crop pair by crop pair and image by image: the teacher's centered, sharpened
    softmax of global crop i against the student's softmax of every crop j != i."""
    g = torch.Generator().manual_seed(0)
    crops, b, k = 5, 3, 7
    s = [torch.randn(b, k, generator=g) for _ in range(crops)]
    t = [torch.randn(b, k, generator=g) for _ in range(2)]
    c = torch.randn(1, k, generator=g)
    tt, ts = 0.05, 0.1
    terms = []
    for i in range(2):
        for j in range(crops):
            if j == i:
                continue
            per_image = []
            for n in range(b):
                target = _softmax([(x - y) / tt for x, y in zip(t[i][n].tolist(), c[0].tolist(),
                                                                 strict=True)])  # fmt: skip
                per_image.append(_cross_entropy(target, s[j][n].tolist(), ts))
            terms.append(sum(per_image) / b)
    assert len(terms) == 2 * (crops - 1)
    by_hand = sum(terms) / len(terms)
    assert float(dino_loss(s, t, c, tt, ts)) == pytest.approx(by_hand, rel=1e-5)


def test_ibot_loss_weights_each_image_by_its_masked_patches() -> None:
    """DINOv2's iBOT loss: masked patches only, each weighted 1 / (its image's masked patches),
    summed and divided by the number of images (also those without masks)."""
    g = torch.Generator().manual_seed(1)
    masks = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    m, k, tt, ts = int(masks.sum()), 5, 0.07, 0.1
    s, t = torch.randn(m, k, generator=g), torch.randn(m, k, generator=g)
    c = torch.randn(1, k, generator=g)
    owner = [row for row in range(3) for col in range(4) if masks[row, col]]
    counts = masks.sum(1).tolist()
    by_hand = 0.0
    for i in range(m):
        target = _softmax([(x - y) / tt for x, y in zip(t[i].tolist(), c[0].tolist(), strict=True)])
        by_hand += _cross_entropy(target, s[i].tolist(), ts) / counts[owner[i]]
    weights = (1.0 / masks.sum(1, keepdim=True).clamp(min=1)).expand_as(masks)[masks]
    assert float(ibot_loss(s, t, weights, 3, c, tt, ts)) == pytest.approx(by_hand / 3, rel=1e-5)


def test_ibot_loss_reads_masked_patches_only() -> None:
    """The model's patch loss changes with the student's state at a masked patch and not at an
    unmasked one (and with masks, the model's loss is dino + ibot)."""
    obj = objective(ibot=True, mask_probability=1.0)
    model = model_for(obj).eval()
    g = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(4, 16, 32, generator=g), torch.randn(4, 16, 32, generator=g)
    masks = draw_masks(4, 16, g, 1.0, 0.25, 0.25)
    assert masks.sum(1).tolist() == [4, 4, 4, 4]
    base = model.masked_patch_loss(student, teacher, masks)
    hidden, shown = masks.nonzero()[0].tolist(), (~masks).nonzero()[0].tolist()
    moved = student.clone()
    moved[shown[0], shown[1]] += 5.0
    assert torch.equal(model.masked_patch_loss(moved, teacher, masks), base)
    moved[hidden[0], hidden[1]] += 5.0
    assert not torch.equal(model.masked_patch_loss(moved, teacher, masks), base)
    out = model(**obj.make_batch(images(4), torch.Generator().manual_seed(0)))
    assert float(out.ibot_loss) > 0
    assert out.loss.item() == pytest.approx(float(out.dino_loss + out.ibot_loss), rel=1e-6)


# -- the center and the temperature ------------------------------------------------------------


def _center_ranks(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = centers_only()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 4, generator=g)[rank]  # rank r's teacher logits of one step
    model.get_buffer("center_sum").add_(logits.sum(0))
    model.get_buffer("center_count").add_(logits.shape[0])
    DINOModel.update_centers(model, 0.9)  # type: ignore[arg-type]
    torch.save(model.center.clone(), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def centers_only() -> torch.nn.Module:
    """What update_centers reads of a DINOModel: its center buffers (K = 4), center 1."""
    m = torch.nn.Module()
    m.centers = ("center",)  # type: ignore[assignment]
    m.register_buffer("center", torch.ones(1, 4))
    m.register_buffer("center_sum", torch.zeros(4))
    m.register_buffer("center_count", torch.zeros(()))
    return m


@pytest.mark.slow  # two spawned processes import the trainer: ~20 s on a quiet machine
@pytest.mark.distributed
def test_center_is_the_ema_of_the_mean_over_every_rank(tmp_path: Path) -> None:
    from darkmatter.quickstart.stack import free_port

    mp.spawn(_center_ranks, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    every = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(0)).reshape(12, 4)
    want = 0.9 * torch.ones(1, 4) + 0.1 * every.mean(0, keepdim=True)
    torch.testing.assert_close(got[0], want)
    assert torch.equal(got[0], got[1])  # every rank keeps the same center


def test_after_step_moves_center_temperature_and_teacher() -> None:
    """after_step: the center from the step's teacher logits (the sums restart), the teacher
    temperature on DINO's warmup (0.04 -> teacher_temp, linear), the teacher by EMA."""
    assert teacher_temp_at(0, 10, 0.07) == pytest.approx(0.04)
    assert teacher_temp_at(5, 10, 0.07) == pytest.approx(0.055)
    assert teacher_temp_at(10, 10, 0.07) == teacher_temp_at(99, 10, 0.07) == 0.07
    assert teacher_temp_at(0, 0, 0.07) == 0.07
    obj = objective(teacher_temp_warmup_steps=10, momentum=0.5)
    model = model_for(obj).train()
    assert float(model.teacher_temp) == pytest.approx(0.04)
    out = model(**obj.make_batch(images(4), torch.Generator().manual_seed(0)))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    before = model.teacher["vit"].get_buffer("embeddings.cls_token").clone()
    obj.after_step(SimpleNamespace(module=model), 5)
    want = 0.9 * torch.zeros(1, 32) + 0.1 * out.teacher.mean(0, keepdim=True)
    torch.testing.assert_close(model.center, want)
    assert float(model.center_count) == 0 and not model.center_sum.any()
    assert float(model.teacher_temp) == pytest.approx(0.055)
    m = 1 - 0.5 * (math.cos(math.pi * 5 / 10) + 1) / 2  # momentum_at(5, 10, 0.5)
    torch.testing.assert_close(model.teacher["vit"].get_buffer("embeddings.cls_token"),
                               m * before + (1 - m) * model.vit.embeddings.cls_token.detach())  # fmt: skip


# -- crops, masks, counts ----------------------------------------------------------------------


def test_crops_are_a_function_of_the_generator_and_the_local_crop_size() -> None:
    obj = objective(local_crops=3, local_crop_size=8, ibot=True)
    batch = obj.make_batch(images(4), torch.Generator().manual_seed(7))
    again = obj.make_batch(images(4), torch.Generator().manual_seed(7))
    other = obj.make_batch(images(4), torch.Generator().manual_seed(8))
    for key in ("global_params", "local_params", "masks"):
        assert torch.equal(batch[key], again[key]) and not torch.equal(batch[key], other[key])
    assert batch["local_params"].shape == (4, 3, 11) and batch["masks"].shape == (8, 16)
    area = lambda p: p[..., W] * p[..., H] / 16**2  # noqa: E731 - a crop's share of the image
    assert area(batch["global_params"]).min() >= 0.4 - 0.05  # the box is clamped to >= 2 px
    assert area(batch["local_params"]).max() <= 0.4 * 1.01
    model = model_for(obj)
    glob, local = model.crops(batch["pixel_values"], batch["global_params"], batch["local_params"])
    assert glob.shape == (8, 3, 16, 16) and local.shape == (12, 3, 8, 8)
    wide = objective(local_crops=2, local_crop_size=12)
    b12 = wide.make_batch(images(4), torch.Generator().manual_seed(7))
    _, local12 = model_for(wide).crops(
        b12["pixel_values"], b12["global_params"], b12["local_params"]
    )
    assert local12.shape == (8, 3, 12, 12)


def test_masks_share_and_probability() -> None:
    """Each masked crop hides round(r·P) patches, r in [min, max]; about `probability` of the
    crops are masked; the same generator draws the same masks."""
    masks = draw_masks(2000, 16, torch.Generator().manual_seed(0), 0.5, 0.1, 0.5)
    counts = masks.sum(1)
    assert set(counts.tolist()) <= set(range(2, 9)) | {0}  # round(0.1·16) = 2 .. round(0.5·16)
    assert abs(float((counts > 0).float().mean()) - 0.5) < 0.05
    assert torch.equal(masks, draw_masks(2000, 16, torch.Generator().manual_seed(0), 0.5, 0.1, 0.5))


def test_flops_equal_torchs_count_of_the_model() -> None:
    """The formula (student on every crop forward and backward, teacher on the global crops
    forward, patch heads on masked patches) against FlopCounterMode over the model's modules
    (kornia's few crop-box multiplies, outside them, are not counted); tokens: the student's."""
    obj = objective(ibot=True, mask_probability=1.0)
    batch = obj.make_batch(images(4), torch.Generator().manual_seed(0))
    model = model_for(obj).train()
    model.set_attn_implementation("eager")  # plain matmuls, counted
    with FlopCounterMode(display=False) as counter:
        model(**batch).loss.backward()
    counts = counter.get_flop_counts()
    modules = ("vit", "head", "patch_head", "teacher.vit", "teacher.head", "teacher.patch_head")
    counted = sum(sum(counts[f"DINOModel.{m}"].values()) for m in modules)
    assert obj.flops(batch) == counted
    assert obj.tokens(batch) == 4 * (2 * 17 + 3 * 5)


def test_fits_a_fixed_batch() -> None:
    """Eight digits, crops and masks fixed, the quickstart's head (batch norm) and teacher
    temperature: 40 AdamW steps (teacher, center and temperature updated after each) take the
    loss (dino + ibot) under half its start (measured 7.5 -> 2.0), and the teacher's centered
    softmax stays sharp (entropy far below log K: no collapse to the uniform distribution)."""
    obj = objective(ibot=True, momentum=0.9, steps=40, head_batch_norm=True, teacher_temp=0.04)
    batch = obj.make_batch(digits(8), torch.Generator().manual_seed(0))
    model = model_for(obj).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(1, 41):
        out = model(**batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        obj.after_step(SimpleNamespace(module=model), step)
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] / 2, losses[::5]
    q = ((out.teacher - model.center) / model.teacher_temp).softmax(-1)
    assert float(-(q * q.log()).sum(-1).mean()) < math.log(32) / 2


def test_prepare_engine_keeps_teacher_and_center_in_fp32() -> None:
    """zero.Init casts what a model builds to bf16 under ZeRO-3: prepare_engine puts the
    teacher, the centers and the temperature back in fp32; the student stays bf16, its head's
    batch norm statistics too (DeepSpeed's casting leaves them fp32), and it runs."""
    obj = objective(ibot=True, head_batch_norm=True)
    model = model_for(obj).to(torch.bfloat16)
    bn = model.head.mlp[1]
    bn.running_mean, bn.running_var = bn.running_mean.float(), bn.running_var.float()
    obj.prepare_engine(SimpleNamespace(module=model))
    assert all(b.dtype == torch.float32 for b in model.teacher.buffers() if b.is_floating_point())
    for name in ("center", "patch_center", "teacher_temp"):
        assert model.get_buffer(name).dtype == torch.float32
    assert model.vit.embeddings.cls_token.dtype == torch.bfloat16
    assert bn.running_mean.dtype == torch.bfloat16
    out = model.train()(**obj.make_batch(images(4), torch.Generator().manual_seed(0)))
    assert out.teacher.dtype == torch.float32 and math.isfinite(out.loss.item())


# -- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image_size", "settings", "message"),
    [
        (16, {"local_crop_size": 6}, "model.local_crop_size: 6 is not divisible by model.patch_size=4"),
        (18, {}, "data.image_size: 18 is not divisible by model.patch_size=4"),
        (16, {"local_crops": -1}, "model.local_crops: expected >= 0, got -1"),
        (16, {"teacher_temp": 0.0}, "model.teacher_temp: expected > 0"),
        (16, {"momentum": 1.0}, "model.momentum: expected in [0, 1)"),
        (16, {"local_crop_min_scale": 0.5}, "model.local_crop_min_scale: expected in (0, model.global_crop_scale]"),
        (16, {"mask_min_ratio": 0.6}, "model.mask_max_ratio:"),
    ],
)  # fmt: skip
def test_bad_settings_are_refused_by_name(
    image_size: int, settings: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):  # fmt: skip
        check_config(config(image_size=image_size, **settings))


def test_a_text_dataset_is_refused_in_one_line(tmp_path: Path) -> None:
    """Preflight (what `pretrain --nproc N` runs before starting anything) names the keys
    (objective, data.url), the objective's modality and the dataset's."""
    from darkmatter.data_pipeline.prepare import prepare
    from darkmatter.trainer.objectives import load_config
    from darkmatter.trainer.train import preflight
    from tests.helpers import synthetic_corpus, write_config

    corpus = synthetic_corpus(tmp_path / "c.txt", n=50)
    prepare([str(corpus)], str(tmp_path / "ds"), modality="text", vocab_size=100)
    path = write_config(tmp_path / "c.yaml", str(tmp_path / "ds"), tmp_path / "run",
                        objective="dino", data={"image_size": 16}, model={"patch_size": 4})  # fmt: skip
    with pytest.raises(ValueError) as err:
        preflight(load_config(path))
    line = str(err.value)
    assert "\n" not in line
    assert "objective: 'dino' trains on image" in line
    assert f"data.url ({tmp_path / 'ds'}) holds text data" in line


# -- export --------------------------------------------------------------------------------------


def test_the_export_is_the_teachers_vit_and_loads_as_a_vit_model(tmp_path: Path) -> None:
    """The encoder export and evaluation take is `teacher.vit.` (not the student's), without
    iBOT's mask token; saved with save_pretrained it loads as a ViTModel (AutoModel too) with
    no weight missing or left over, and computes the teacher's states."""
    from transformers import AutoModel, ViTModel

    from darkmatter.trainer import checkpoint_reader as reader

    obj = objective(ibot=True)
    model = model_for(obj).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)  # the student moves away from its teacher
    ref = SimpleNamespace(meta={"objective": "dino"})
    weights = reader.encoder_weights(ref, model.state_dict())  # type: ignore[arg-type]
    assert "embeddings.mask_token" not in weights
    encoder = reader.build_encoder(obj.model_config())
    missing, unexpected = encoder.load_state_dict(weights, strict=False)
    assert not missing and not unexpected
    encoder.save_pretrained(tmp_path / "export")
    loaded, info = ViTModel.from_pretrained(tmp_path / "export", add_pooling_layer=False,
                                            output_loading_info=True)  # fmt: skip
    assert not any(info.values()), info
    assert type(AutoModel.from_pretrained(tmp_path / "export", add_pooling_layer=False)) is ViTModel
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.teacher["vit"](pixel_values=x).last_hidden_state
        student = model.vit(pixel_values=x).last_hidden_state
        got = loaded.eval()(pixel_values=x).last_hidden_state
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, student)
    assert loaded.config.feature_pooling == "cls"  # the harness pools [CLS] of an export too


def test_the_harness_pools_dinos_cls_token_and_other_vits_patch_mean() -> None:
    """DINO's loss trains [CLS] alone: its encoder config says so (feature_pooling) and the
    harness's features are [CLS]'s final state; a ViT without the attribute keeps the patch
    mean."""
    from transformers import ViTConfig, ViTModel

    from darkmatter.evaluation.probe import embed

    cfg = ViTConfig(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=1,
                    num_attention_heads=2, intermediate_size=32)  # fmt: skip
    model = ViTModel(cfg, add_pooling_layer=False).eval()
    pixels = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    hidden = model(pixel_values=pixels).last_hidden_state.detach()
    features = embed(model, {"pixel_values": pixels})
    np.testing.assert_allclose(features, hidden[:, 1:].mean(1), rtol=1e-5, atol=1e-6)
    model.config.feature_pooling = "cls"
    features = embed(model, {"pixel_values": pixels})
    np.testing.assert_allclose(features, hidden[:, 0], rtol=1e-5, atol=1e-6)
