"""BYOL and MoCo v3: their losses against the papers' formulas computed by hand, the EMA update and its
schedule, the teacher's precision under bf16, ZeRO-3 accepted, and that each model fits a fixed
batch. MoCo's keys gathered on 2 ranks against the single-process loss of the whole batch:
tests/test_simclr.py. Two ranks under DeepSpeed, resumed bit-exactly with the teacher:
tests/test_objectives_resume.py."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from darkmatter.trainer.config import (
    Config,
    DataConfig,
    ModelConfig,
    TrainConfig,
)
from darkmatter.trainer.objectives import OBJECTIVES, check_config
from darkmatter.trainer.objectives.byol import BYOLSettings, regression_loss
from darkmatter.trainer.objectives.contrastive import info_nce
from darkmatter.trainer.objectives.moco import MoCoSettings
from darkmatter.trainer.objectives.momentum import momentum_at
from darkmatter.trainer.objectives.simclr import SimCLRSettings
from darkmatter.trainer.objectives.teacher import ema_update, frozen_copy
from tests.helpers import fit

SETTINGS = {"byol": BYOLSettings, "moco": MoCoSettings}


def _unit(v: torch.Tensor) -> list[float]:
    norm = math.sqrt(sum(float(x) ** 2 for x in v))
    return [float(x) / norm for x in v]


def info_nce_by_the_formula(q: torch.Tensor, k: torch.Tensor, t: float) -> float:
    """MoCo v3, algorithm 1, query by query: -log exp(q_i·k_i/t) / sum_j exp(q_i·k_j/t), the
    mean over queries, times 2t."""
    qs, ks = [_unit(v) for v in q.double()], [_unit(v) for v in k.double()]
    total = 0.0
    for i, qi in enumerate(qs):
        sims = [sum(a * b for a, b in zip(qi, kj, strict=True)) / t for kj in ks]
        total += -(sims[i] - math.log(sum(math.exp(s) for s in sims)))
    return 2 * t * total / len(qs)


def test_info_nce_equals_the_papers_formula() -> None:
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    for t in (0.2, 1.0):
        assert float(info_nce(q, k, t)) == pytest.approx(info_nce_by_the_formula(q, k, t), rel=1e-5)


def test_byol_loss_equals_the_papers_formula() -> None:
    """BYOL eq. 2: ‖q̄ - z̄‖² with q̄, z̄ the l2-normalized prediction and target."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    by_hand = np.mean([sum((a - b) ** 2 for a, b in zip(_unit(qi), _unit(ki), strict=True))
                       for qi, ki in zip(q.double(), k.double(), strict=True)])  # fmt: skip
    assert float(regression_loss(q, k)) == pytest.approx(by_hand, rel=1e-5)
    assert float(regression_loss(q, 3 * q)) == pytest.approx(0.0, abs=1e-6)  # scale-free


def _pair(teacher: torch.Tensor, online: torch.Tensor) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A one-weight online module and its teacher (frozen_copy), the teacher then set to
    `teacher`."""
    o = torch.nn.Module()
    o.w = torch.nn.Parameter(online.clone())
    t = torch.nn.Module()
    t.w = torch.nn.Parameter(torch.empty_like(online))
    frozen_copy(o, t)
    t.w = teacher.clone()
    return t, o


def test_momentum_schedule_and_the_ema_update() -> None:
    assert momentum_at(0, 100, 0.996) == pytest.approx(0.996)
    assert momentum_at(50, 100, 0.996) == pytest.approx(0.998)
    assert momentum_at(100, 100, 0.996) == pytest.approx(1.0)
    g = torch.Generator().manual_seed(0)
    teacher, online = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    t, o = _pair(teacher, online)
    assert not list(t.parameters()) and "w" in t.state_dict()  # a persistent buffer
    ema_update([(t, o)], 0.9)
    torch.testing.assert_close(t.w.double(), 0.9 * teacher.double() + 0.1 * online.double(),
                               rtol=1e-6, atol=1e-7)  # fmt: skip


def test_a_bf16_teacher_would_not_move_so_it_is_kept_in_fp32() -> None:
    """One EMA step of a real size, (1 - 0.996)·(online - teacher) with weights ~0.02 apart by
    ~1e-3: in bf16 it rounds away entirely; in fp32 it lands."""
    g = torch.Generator().manual_seed(0)
    teacher = 0.02 + 0.01 * torch.rand(1000, generator=g)
    online = teacher + 1e-3 * torch.randn(1000, generator=g)
    t, o = _pair(teacher.bfloat16(), online.bfloat16())
    ema_update([(t, o)], 0.996)
    assert torch.equal(t.w, teacher.bfloat16())  # nothing moved
    t, o = _pair(teacher, online)
    ema_update([(t, o)], 0.996)
    torch.testing.assert_close(t.w, 0.996 * teacher + 0.004 * online)


def deepspeed_bf16(model: torch.nn.Module) -> SimpleNamespace:
    """What DeepSpeed's engine does to a module under bf16 (engine._cast_module_mixed_precision):
    parameters to bf16, buffers left in fp32."""
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    return SimpleNamespace(module=model)


def digits(n: int) -> list[dict[str, np.ndarray]]:
    from sklearn.datasets import load_digits

    return [{"image": np.repeat((im * 255 / 16).astype(np.uint8)[..., None], 3, -1)}
            for im in load_digits().images[:n]]  # fmt: skip


def _objective(name: str) -> object:
    heads = {"patch_size": 4, "projection_dim": 16}
    settings = (SimCLRSettings(**heads) if name == "simclr"
                else SETTINGS[name](**heads, head_hidden_size=64))  # fmt: skip
    cfg = Config(
        objective=name, data=DataConfig(url="unused", image_size=16, min_crop_scale=0.5),
        train=TrainConfig(steps=40),
        model=ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
        objective_settings=settings,
    )  # fmt: skip
    return OBJECTIVES[name](cfg, {"modality": "image"})


def _weights(pairs: list) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(teacher buffers, online parameters), name by name."""
    teacher = [t.get_buffer(n) for t, o in pairs for n, _ in o.named_parameters()]
    return teacher, [p for _, o in pairs for p in o.parameters()]


@pytest.mark.parametrize("name", ["byol", "moco"])
def test_the_teacher_starts_as_the_online_network_and_follows_it(name: str) -> None:
    """Built equal; buffers, not parameters (the optimizer and ZeRO-3 never see them); kept fp32
    when the engine cast the model to bf16; after a step it sits between where it was and the
    online network, as the EMA at that step's momentum."""
    obj = _objective(name)
    model = obj.build_model()  # type: ignore[attr-defined]
    teacher, online = _weights(model.pairs())
    assert len(teacher) == len(online) > 10
    assert all(torch.equal(t, o) for t, o in zip(teacher, online, strict=True))
    assert not list(model.teacher.parameters()) and all(o.requires_grad for o in online)
    # The harness takes `vit.` alone (darkmatter.trainer.checkpoint_reader.ENCODER_PREFIX): a whole ViTModel.
    keys = model.state_dict().keys()
    encoder = {k.removeprefix("vit.") for k in keys if k.startswith("vit.")}
    assert encoder == set(model.teacher["vit"].state_dict())
    assert {k.split(".")[0] for k in keys} == {"vit", "projector", "predictor", "teacher"}
    engine = deepspeed_bf16(model)
    obj.prepare_engine(engine)  # type: ignore[attr-defined]
    teacher, online = _weights(model.pairs())
    assert all(t.dtype == torch.float32 for t in teacher) and online[0].dtype == torch.bfloat16
    assert model.teacher["projector"][1].running_mean.dtype == torch.float32
    batch = obj.make_batch(digits(4), torch.Generator().manual_seed(0))  # type: ignore[attr-defined]
    assert torch.isfinite(model(**batch).loss)  # bf16 online network, fp32 teacher, BN in both
    before = [t.clone() for t in teacher]
    with torch.no_grad():
        for o in online:
            o.add_(0.5)
    obj.after_step(engine, 10)  # type: ignore[attr-defined]
    m = momentum_at(10, 40, 0.996)
    for t, b, o in zip(teacher, before, online, strict=True):
        torch.testing.assert_close(t, m * b + (1 - m) * o.float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["byol", "moco"])
def test_zero3_is_accepted(name: str) -> None:
    """The teacher is buffers, which ZeRO-3 does not partition (2 ranks under ZeRO-3:
    tests/test_teacher.py)."""
    cfg = Config(objective=name, data=DataConfig(url="unused"),
                 train=TrainConfig(steps=1, zero_stage=3),
                 objective_settings=SETTINGS[name]())  # fmt: skip
    check_config(cfg)


@pytest.mark.parametrize(
    ("name", "start", "frac"), [("byol", 4.0, 0.1), ("moco", 2 * 0.2 * 2 * math.log(8), 0.15)]
)
def test_fits_a_fixed_batch(name: str, start: float, frac: float) -> None:
    """Eight digits, their views fixed: the loss starts where the formula says for unrelated
    embeddings (BYOL: 2·(2 - 2·0) = 4; MoCo: 2·2t·log 8) and 40 AdamW steps, with the teacher
    following at its schedule, take it below a tenth (BYOL; measured 3.6 to 0.12) or
    0.15 (MoCo; 1.9 to 0.17) of the start."""
    obj = _objective(name)
    samples = digits(8)
    torch.manual_seed(0)
    model = obj.build_model()  # type: ignore[attr-defined]
    batch = obj.make_batch(samples, torch.Generator().manual_seed(0))  # type: ignore[attr-defined]
    losses = fit(obj, model, batch, steps=40, lr=3e-3)
    assert abs(losses[0] - start) < 0.3 * start, losses[0]
    assert min(losses[-5:]) < frac * losses[0], losses


def test_simclr_runs_under_deepspeeds_bf16_cast() -> None:
    """The batch norm of a head under DeepSpeed's bf16 (bf16 weights, fp32 running statistics)
    fails in torch unless prepare_engine aligns the statistics; simclr shares that path."""
    obj = _objective("simclr")
    model = obj.build_model()  # type: ignore[attr-defined]
    engine = deepspeed_bf16(model)
    batch = obj.make_batch(digits(4), torch.Generator().manual_seed(0))  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="expected scalar type"):
        model(**batch)
    obj.prepare_engine(engine)  # type: ignore[attr-defined]
    assert torch.isfinite(model(**batch).loss)
