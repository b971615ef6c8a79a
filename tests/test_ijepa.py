"""I-JEPA: the multi-block masks (sizes by the paper's formula, context disjoint from the
targets, rectangular batches, functions of the generator), the loss against a by-hand
computation block by block, the target encoder (no gradient, EMA after each step, fp32 under
bf16), the FLOP count against torch's counter, a fixed batch fitted, bad configs refused by
name, and the export: the target encoder as a plain ViTModel. Two ranks under DeepSpeed, resumed
bit-exactly: tests/test_objectives_resume.py."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from darkmatter.trainer.config import Config, ConfigError, DataConfig, ModelConfig, TrainConfig
from darkmatter.trainer.objectives import OBJECTIVES, check_config
from darkmatter.trainer.objectives.ijepa import IJEPASettings, block_size, multiblock_masks
from darkmatter.trainer.objectives.momentum import momentum_at
from tests.helpers import fit


def config(image_size: int = 32, zero_stage: int = 0, **settings: Any) -> Config:
    s = {"patch_size": 4, "predictor_hidden_size": 32, "predictor_depth": 1, **settings}
    return Config(
        objective="ijepa", data=DataConfig(url="unused", image_size=image_size),
        train=TrainConfig(steps=40, zero_stage=zero_stage),
        model=ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
        objective_settings=IJEPASettings(**s),
    )  # fmt: skip


def objective(**settings: Any) -> Any:
    cfg = config(**settings)
    check_config(cfg)
    return OBJECTIVES["ijepa"](cfg, {"modality": "image"})


def digits(n: int) -> list[dict[str, np.ndarray]]:
    from sklearn.datasets import load_digits

    return [{"image": np.repeat((im * 255 / 16).astype(np.uint8)[..., None], 3, -1)}
            for im in load_digits().images[:n]]  # fmt: skip


def model_for(obj: Any) -> Any:
    torch.manual_seed(0)
    return obj.build_model()


# -- masks -----------------------------------------------------------------------------------


def test_block_sizes_follow_the_papers_formula() -> None:
    """I-JEPA's _sample_block_size on its 14x14 grid: one draw sets scale and aspect ratio;
    area int(196·scale), rows round(√(area·r)), cols round(√(area/r))."""
    assert block_size(0.0, [0.15, 0.2], [0.75, 1.5], 14) == (5, 6)  # area 29, r 0.75
    assert block_size(1.0, [0.15, 0.2], [0.75, 1.5], 14) == (8, 5)  # area 39, r 1.5
    assert block_size(0.5, [0.85, 1.0], [1.0, 1.0], 14) == (13, 13)  # the context block
    assert block_size(1.0, [0.85, 1.0], [1.0, 1.0], 8) == (8, 8)  # may span the grid


def rectangle(indices: torch.Tensor, side: int) -> tuple[int, int]:
    """(rows, cols) of the block `indices` fill; fails unless they fill a whole rectangle."""
    rows, cols = indices // side, indices % side
    r, c = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
    assert len(indices) == r * c == len(set(indices.tolist())), indices
    return r, c


def test_masks_are_disjoint_rectangular_blocks_drawn_from_the_generator() -> None:
    s, side = IJEPASettings(), 8
    areas, ratios = [], []
    for seed in range(30):
        context, targets = multiblock_masks(6, side, s, torch.Generator().manual_seed(seed))
        assert targets.shape[:2] == (6, 4) and context.shape[0] == 6 and context.shape[1] >= 1
        sizes = {rectangle(t, side) for t in targets.flatten(0, 1)}
        assert len(sizes) == 1  # one target size per batch: the tensors are rectangular
        ((rows, cols),) = sizes
        areas.append(rows * cols / side**2)
        ratios.append(rows / cols)
        for c, ts in zip(context, targets, strict=True):
            assert not set(c.tolist()) & set(ts.flatten().tolist())  # context never sees a target
            assert torch.equal(c, c.sort().values)  # row-major, truncated from the end
    # Within the settings' ranges up to the rounding of rows and cols on an 8x8 grid.
    assert min(areas) >= 0.1 and max(areas) <= 0.25 and len(set(areas)) > 1
    assert min(ratios) >= 0.5 and max(ratios) <= 2.0 and len(set(ratios)) > 1
    a = multiblock_masks(6, side, s, torch.Generator().manual_seed(7))
    b = multiblock_masks(6, side, s, torch.Generator().manual_seed(7))
    c = multiblock_masks(6, side, s, torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_make_batch_is_a_function_of_the_generator() -> None:
    obj = objective()
    a = obj.make_batch(digits(4), torch.Generator().manual_seed(0))
    b = obj.make_batch(digits(4), torch.Generator().manual_seed(0))
    assert all(torch.equal(a[k], b[k]) for k in ("pixel_values", "context", "targets"))
    assert a["pixel_values"].shape == (4, 3, 32, 32)
    assert obj.tokens(a) == 4 * (a["context"].shape[1] + 1)  # context patches and [CLS]


# -- the model -------------------------------------------------------------------------------


def sincos_by_hand(dim: int, side: int) -> np.ndarray:
    """MAE's / I-JEPA's get_2d_sincos_pos_embed, as their numpy code writes it."""

    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), axis=0).astype(np.float64)
    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)


def loss_by_hand(model: Any, batch: dict[str, torch.Tensor]) -> float:
    """Image by image, block by block: the online ViT on the whole image with attention only to
    [CLS] and the context patches (its outputs there are the context-only encoding), the
    predictor's blocks on [projected context + position, mask token + position], the teacher's
    full-image outputs normalized per patch by hand; the squared error over every block."""
    px, context, targets = batch["pixel_values"], batch["context"], batch["targets"]
    p = model.predictor
    total, count = 0.0, 0
    for i in range(px.shape[0]):
        keys = torch.zeros(1, 65, dtype=torch.long)
        keys[0, 0], keys[0, 1 + context[i]] = 1, 1
        ctx = model.vit(pixel_values=px[i : i + 1], attention_mask=keys).last_hidden_state
        ctx = ctx[0, 1 + context[i]]  # [Nc, D]
        t = model.teacher["vit"](pixel_values=px[i : i + 1]).last_hidden_state[0, 1:].double()
        t = (t - t.mean(-1, keepdim=True)) / torch.sqrt(
            t.var(-1, unbiased=False, keepdim=True) + 1e-5
        )
        for block in targets[i]:
            z = torch.cat([p.embed(ctx) + p.positions[context[i]],
                           p.mask_token[0] + p.positions[block]])[None]  # fmt: skip
            for layer in p.layers:
                z = layer(z)
            pred = p.proj(p.norm(z[0, -len(block) :])).double()
            total += float(((pred - t[block]) ** 2).sum())
            count += pred.numel()
    return total / count


def test_loss_is_the_squared_error_of_each_block_by_hand() -> None:
    obj = objective()
    model = model_for(obj).eval()
    np.testing.assert_allclose(model.predictor.positions.numpy(), sincos_by_hand(32, 8), atol=1e-6)
    batch = obj.make_batch(digits(3), torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(**batch)
        # Moving the teacher away from the online network: the targets are the teacher's.
        g = torch.Generator().manual_seed(1)
        for b in model.teacher.buffers():
            b.add_(0.05 * torch.randn(b.shape, generator=g))
        moved = model(**batch)
        assert float(moved.loss) == pytest.approx(loss_by_hand(model, batch), rel=1e-5)
    assert (out.targets - moved.targets).abs().max() > 0.1
    assert torch.equal(out.predictions, moved.predictions)


def test_the_target_encoder_gets_no_gradient_and_follows_by_ema() -> None:
    """Buffers only, equal to the online encoder when built; a backward leaves them untouched;
    after a step they sit at the EMA of the step's momentum; under DeepSpeed's bf16 cast the
    engine hook keeps them fp32."""
    obj = objective()
    model = model_for(obj)
    teacher, online = model.teacher["vit"], model.vit
    assert not list(model.teacher.parameters())
    names = [n for n, _ in online.named_parameters()]
    assert all(torch.equal(teacher.get_buffer(n), p) for n, p in online.named_parameters())
    before = {n: teacher.get_buffer(n).clone() for n in names}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(**obj.make_batch(digits(4), torch.Generator().manual_seed(0))).loss.backward()
    assert online.embeddings.patch_embeddings.projection.weight.grad.abs().sum() > 0
    assert all(torch.equal(teacher.get_buffer(n), before[n]) for n in names)
    opt.step()
    obj.after_step(SimpleNamespace(module=model), 10)
    m = momentum_at(10, 40, 0.996)
    for n, p in online.named_parameters():
        torch.testing.assert_close(teacher.get_buffer(n), m * before[n] + (1 - m) * p.detach())
    for p in model.parameters():  # what DeepSpeed's engine does under bf16
        p.data = p.data.to(torch.bfloat16)
    model.teacher.to(torch.bfloat16)  # what zero.Init does to tensors built under ZeRO-3
    obj.prepare_engine(SimpleNamespace(module=model))
    assert all(b.dtype == torch.float32 for b in model.teacher.buffers())
    batch = obj.make_batch(digits(2), torch.Generator().manual_seed(0))
    batch["pixel_values"] = batch["pixel_values"].bfloat16()
    assert torch.isfinite(model(**batch).loss)  # bf16 online network, fp32 teacher


def test_flops_are_the_multiplies_the_model_runs() -> None:
    """torch's counter on one forward and backward (eager attention: plain matmuls)."""
    obj = objective()
    batch = obj.make_batch(digits(3), torch.Generator().manual_seed(0))
    model = model_for(obj)
    model.set_attn_implementation("eager")
    assert model.predictor.config._attn_implementation == "eager"
    with FlopCounterMode(display=False) as counter:
        model(**batch).loss.backward()
    assert obj.flops(batch) == counter.get_total_flops()


def test_fits_a_fixed_batch() -> None:
    """Eight digits, masks fixed, the teacher following at its schedule: the loss starts at
    that of predicting zero (1: the targets are layer-normed) and 40 AdamW steps take it below
    0.6 of that (measured: 0.997 -> 0.48)."""
    obj = objective()
    batch = obj.make_batch(digits(8), torch.Generator().manual_seed(0))
    losses = fit(obj, model_for(obj), batch, steps=40, lr=1e-2)
    assert losses[0] == pytest.approx(1.0, abs=0.05)
    assert losses[-1] < 0.6 * losses[0], losses[::5]


# -- configs and export ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"image_size": 30}, "data.image_size"),
        ({"target_scale": [0.3, 0.2]}, "model.target_scale"),
        ({"target_scale": [0.0, 0.2]}, "model.target_scale"),
        ({"context_scale": [0.85, 1.2]}, "model.context_scale"),
        ({"target_aspect": [0.75]}, "model.target_aspect"),
        ({"num_targets": 6, "target_scale": [0.2, 0.2]}, "model.num_targets"),  # 6 x 12 > 64
        ({"image_size": 8}, "model.target_scale"),  # a 2x2 grid: blocks of no patch
        ({"predictor_hidden_size": 33}, "model.predictor_hidden_size"),
        ({"momentum": 1.0}, "model.momentum"),
    ],
)
def test_bad_configs_are_refused_by_name(overrides: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        check_config(config(**overrides))


def test_zero3_is_accepted() -> None:
    check_config(config(zero_stage=3))  # the teacher is buffers, which ZeRO-3 leaves whole


def test_the_export_is_the_target_encoder_as_a_plain_vit(tmp_path: Path) -> None:
    from transformers import ViTModel

    from darkmatter.evaluation.export import POOLING
    from darkmatter.evaluation.probe import embed
    from darkmatter.trainer import checkpoint_reader as reader

    obj = objective()
    model = model_for(obj)
    with torch.no_grad():
        for b in model.teacher.buffers():
            b.mul_(0.5)  # a teacher that differs from the online encoder
    ref = SimpleNamespace(meta={"objective": "ijepa"})
    weights = reader.encoder_weights(ref, model.state_dict())  # type: ignore[arg-type]
    encoder = reader.build_encoder(model.config)
    encoder.load_state_dict(weights, strict=True)
    encoder.save_pretrained(tmp_path)
    loaded, info = ViTModel.from_pretrained(tmp_path, add_pooling_layer=False,
                                            output_loading_info=True)  # fmt: skip
    assert not info["missing_keys"] and not info["unexpected_keys"]
    px = obj.make_batch(digits(4), torch.Generator().manual_seed(0))["pixel_values"]
    features = embed(loaded.eval(), {"pixel_values": px})
    with torch.no_grad():
        teacher = model.teacher["vit"](pixel_values=px).last_hidden_state[:, 1:].mean(1)
    np.testing.assert_allclose(features, teacher.numpy(), rtol=1e-5, atol=1e-6)
    assert "hidden[:, 1:].mean(1)" in POOLING["ijepa"][1]
