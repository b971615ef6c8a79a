"""SimCLR: the loss against a direct formula, the all-gathered loss on 2 ranks against the
single-process loss of the concatenated batch (values and gradients; MoCo's InfoNCE too), the
heads' global batch norm (nn.BatchNorm1d exactly on one process; on 2 ranks, BatchNorm1d of the
concatenated batch), the views' determinism, and that the model fits a fixed batch. Two ranks
under DeepSpeed ZeRO-3, a step against one rank's: tests/test_two_view_ranks.py; resumed:
tests/test_objectives_resume.py."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from darkmatter.trainer.config import Config, DataConfig, ModelConfig, TrainConfig
from darkmatter.trainer.objectives import OBJECTIVES
from darkmatter.trainer.objectives.contrastive import (
    N_PARAMS,
    GlobalBatchNorm1d,
    augment,
    draw_view_params,
    info_nce,
    nt_xent,
)
from darkmatter.trainer.objectives.simclr import SimCLRSettings


def nt_xent_by_the_formula(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """Chen et al. 2020, eq. 1, one anchor at a time: l(i, j) = -log exp(s_ij/t) /
    sum_{k != i} exp(s_ik/t) over the 2N embeddings, averaged over all 2N anchors."""
    z = [F.normalize(v, dim=0) for v in torch.cat([z1, z2]).double()]
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        denom = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[j]) / t) / denom)
    return total / (2 * n)


def test_nt_xent_equals_the_papers_formula() -> None:
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    for t in (0.1, 0.5):
        expected = nt_xent_by_the_formula(z1, z2, t)
        assert float(nt_xent(z1, z2, t)) == pytest.approx(expected, rel=1e-5)


def _two_ranks(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)  # the global batch
    mine = slice(4 * rank, 4 * rank + 4)
    a, b = z1[mine].clone().requires_grad_(), z2[mine].clone().requires_grad_()
    loss = nt_xent(a, b, 0.2)
    loss.backward()
    # MoCo v3's InfoNCE in the same processes: queries a, keys of both ranks (no gradient).
    q = z1[mine].clone().requires_grad_()
    moco = info_nce(q, z2[mine], 0.2)
    moco.backward()
    bn = _bn_run(z1[mine], _bn_weights()[mine])
    torch.save({"loss": loss.detach(), "ga": a.grad, "gb": b.grad,
                "moco": moco.detach(), "gq": q.grad, "bn": bn}, f"{out}/rank{rank}.pt")  # fmt: skip
    dist.destroy_process_group()


def _bn_weights() -> torch.Tensor:
    """[8, 5]: the weights of a loss on the batch norm's outputs, so that the gradient through
    the statistics is not zero (it is for a plain sum)."""
    return torch.randn(8, 5, generator=torch.Generator().manual_seed(3))


def _bn_run(x: torch.Tensor, c: torch.Tensor, bn: torch.nn.Module | None = None) -> dict:
    """Two training steps' forwards of a batch norm with affine terms on rows x (the second on
    2·x), the loss sum(c·y) of each backward: outputs, gradients and running statistics."""
    bn = bn or GlobalBatchNorm1d(5)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, 5))
        bn.bias.copy_(torch.linspace(-1.0, 1.0, 5))
    x = x.clone().requires_grad_()
    ys = [bn(x), bn(2 * x)]
    sum((c * y).sum() for y in ys).backward()
    assert x.grad is not None and bn.weight.grad is not None
    return {"y": torch.cat([y.detach() for y in ys]), "gx": x.grad, "gw": bn.weight.grad,
            "gb": bn.bias.grad, "mean": bn.running_mean, "var": bn.running_var,
            "count": bn.num_batches_tracked}  # fmt: skip


def test_global_batch_norm_on_one_process_is_batch_norm() -> None:
    """Bit for bit nn.BatchNorm1d's forward, gradients and running statistics, in training and
    in eval, with and without affine terms and momentum; the same state_dict keys."""
    x, c = torch.randn(8, 5, generator=torch.Generator().manual_seed(0)), _bn_weights()
    got, want = _bn_run(x, c), _bn_run(x, c, torch.nn.BatchNorm1d(5))
    assert all(torch.equal(got[k], want[k]) for k in want)
    for kwargs in ({"affine": False}, {"momentum": None}):
        ours, torchs = GlobalBatchNorm1d(5, **kwargs), torch.nn.BatchNorm1d(5, **kwargs)
        for _ in range(3):
            assert torch.equal(ours(x), torchs(x))
        assert ours.state_dict().keys() == torchs.state_dict().keys()
        assert all(torch.equal(v, torchs.state_dict()[k]) for k, v in ours.state_dict().items())
        assert torch.equal(ours.eval()(x), torchs.eval()(x))


def test_gathered_loss_on_two_ranks_is_the_loss_of_the_whole_batch(tmp_path: Path) -> None:
    """Each rank holds half the batch; the mean of the ranks' losses is the single-process loss
    on the whole batch, and each rank's gradient (averaged over ranks, as data parallelism does)
    is the whole-batch gradient of its rows: gradients flow through the gather. The same for
    MoCo v3's InfoNCE, whose keys (from the teacher) carry no gradient."""
    from darkmatter.quickstart.stack import free_port

    mp.spawn(_two_ranks, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(8, 5, generator=g).requires_grad_()
    z2 = torch.randn(8, 5, generator=g).requires_grad_()
    whole = nt_xent(z1, z2, 0.2)
    whole.backward()
    torch.testing.assert_close((got[0]["loss"] + got[1]["loss"]) / 2, whole.detach())
    q = z1.detach().clone().requires_grad_()
    moco = info_nce(q, z2.detach(), 0.2)
    moco.backward()
    torch.testing.assert_close((got[0]["moco"] + got[1]["moco"]) / 2, moco.detach())
    for r in (0, 1):
        rows = slice(4 * r, 4 * r + 4)
        torch.testing.assert_close(got[r]["ga"] / 2, z1.grad[rows], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got[r]["gb"] / 2, z2.grad[rows], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got[r]["gq"] / 2, q.grad[rows], rtol=1e-5, atol=1e-7)
    # Global batch norm: rank r's half of nn.BatchNorm1d on the whole batch, for the loss summed
    # over the ranks (the gradients of the inputs flow back through the all-reduced statistics;
    # the weights' gradients summed over the ranks are the whole batch's).
    whole = _bn_run(torch.randn(8, 5, generator=torch.Generator().manual_seed(0)), _bn_weights(),
                    torch.nn.BatchNorm1d(5))  # fmt: skip
    bns = [got[r]["bn"] for r in (0, 1)]
    for r in (0, 1):
        rows = [*range(4 * r, 4 * r + 4), *range(8 + 4 * r, 12 + 4 * r)]  # both forwards' rows
        torch.testing.assert_close(bns[r]["y"], whole["y"][rows], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bns[r]["gx"], whole["gx"][4 * r : 4 * r + 4])
        for k in ("mean", "var", "count"):  # the same running statistics on every rank
            torch.testing.assert_close(bns[r][k], whole[k])
    for k in ("gw", "gb"):
        torch.testing.assert_close(bns[0][k] + bns[1][k], whole[k])


def test_views_are_a_function_of_the_generator() -> None:
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    p = draw_view_params(4, 2, 16, torch.Generator().manual_seed(7))
    assert p.shape == (4, 2, N_PARAMS)
    again = draw_view_params(4, 2, 16, torch.Generator().manual_seed(7))
    other = draw_view_params(4, 2, 16, torch.Generator().manual_seed(8))
    assert torch.equal(p, again) and not torch.equal(p, other)
    v1, v2 = augment(x, p[:, 0]), augment(x, p[:, 1])
    assert torch.equal(v1, augment(x, again[:, 0]))  # same parameters, same pixels
    assert not torch.equal(v1, v2) and v1.shape == x.shape
    assert float(v1.min()) >= 0.0 and float(v1.max()) <= 1.0
    # Crop boxes lie inside the image.
    assert bool((p[..., 0] >= 0).all() and (p[..., 0] + p[..., 2] <= 16 + 1e-4).all())
    # Parameters that do nothing give the image back.
    ident = p[:, 0].clone()
    ident[:, 0:2], ident[:, 2:4], ident[:, 4:6], ident[:, 10] = 0, 16, 0, 0
    torch.testing.assert_close(augment(x, ident), x, atol=1e-5, rtol=0)


def _objective() -> object:
    cfg = Config(
        objective="simclr", data=DataConfig(url="unused", image_size=16), train=TrainConfig(steps=1),
        model=ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
        objective_settings=SimCLRSettings(patch_size=4, projection_dim=16),
    )  # fmt: skip
    return OBJECTIVES["simclr"](cfg, {"modality": "image"})


def test_simclr_fits_a_fixed_batch() -> None:
    """Eight images, their views fixed (one generator seed): 40 AdamW steps take the loss from
    about log(15) (every embedding alike) to under half of it."""
    from sklearn.datasets import load_digits

    obj = _objective()
    digits = load_digits().images[:8]
    samples = [{"image": np.repeat((im * 255 / 16).astype(np.uint8)[..., None], 3, -1)}
               for im in digits]  # fmt: skip
    torch.manual_seed(0)
    model = obj.build_model()  # type: ignore[attr-defined]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = obj.make_batch(samples, torch.Generator().manual_seed(0))  # type: ignore[attr-defined]
    losses = []
    for _ in range(40):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - math.log(15)) < 0.8, losses[0]
    assert min(losses[-5:]) < 0.5 * losses[0], losses
