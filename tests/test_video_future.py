"""video_future (V-JEPA-style temporal prediction): the latent loss against the target encoder's
layer-normed states computed by hand, the pixel loss against VideoMAE's by-hand reconstruction
loss, predictions that never see the future frames, the future mask and batches as functions of
the generator, the FLOP count against torch's counter, the EMA target encoder (buffers, fp32,
following the context encoder), a fixed batch fitted, bad settings refused by key, and the
encoder the harness and export take. Two ranks under ZeRO-3, resumed bit-exactly:
tests/test_objectives_resume.py; a real run exported and loaded back: the slow test below."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModel, VideoMAEModel

from darkmatter.data_pipeline.transforms import IMAGE_MEAN, IMAGE_STD
from darkmatter.trainer import checkpoint_reader as reader
from darkmatter.trainer.config import Config, ConfigError, DataConfig, ModelConfig, TrainConfig
from darkmatter.trainer.objectives import OBJECTIVES, check_config
from darkmatter.trainer.objectives.momentum import momentum_at
from darkmatter.trainer.objectives.video_future import VideoFutureSettings
from tests.helpers import fit
from tests.test_video import clips, digit_clips, reconstruction_loss_by_hand


def config(target: str = "latent", num_frames: int = 8, steps: int = 40, **kw: Any) -> Config:
    cfg = Config(
        objective="video_future",
        data=DataConfig(url="unused", image_size=16, num_frames=num_frames, frame_stride=2),
        train=TrainConfig(steps=steps),
        model=ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
        objective_settings=VideoFutureSettings(patch_size=4, predictor_hidden_size=32,
                                               predictor_num_layers=1, target=target, **kw),
    )  # fmt: skip
    check_config(cfg)
    return cfg


def objective(target: str = "latent", **kw: Any) -> Any:
    return OBJECTIVES["video_future"](config(target, **kw), {"modality": "video"})


def model_for(obj: Any) -> Any:
    torch.manual_seed(0)
    return obj.build_model()


def future_index(n_slots: int, context_slots: int, per_frame: int) -> list[int]:
    """Token indices of the future tubes: time slot t, patch p is token t·per_frame + p."""
    return [t * per_frame + p for t in range(context_slots, n_slots) for p in range(per_frame)]


def test_latent_loss_is_the_l1_distance_to_the_target_encoders_normalized_future_states() -> None:
    obj = objective()  # 8 frames: 4 time slots of 16 tubes; context: the first 2 slots
    batch = obj.make_batch(clips(3), torch.Generator().manual_seed(0))
    model = model_for(obj).eval()
    with torch.no_grad():
        out = model(**batch)
        states = model.teacher["videomae"](batch["pixel_values"]).last_hidden_state  # [3, 64, 32]
    mean = states.mean(-1, keepdim=True)
    var = states.var(-1, unbiased=False, keepdim=True)
    target = ((states - mean) / torch.sqrt(var + 1e-5))[:, future_index(4, 2, 16)]
    assert out.logits.shape == (3, 32, 32)
    by_hand = (out.logits.double() - target.double()).abs().mean().item()
    assert out.loss.item() == pytest.approx(by_hand, rel=1e-5)
    # The check can tell: the context tubes' targets give another number.
    context = ((states - mean) / torch.sqrt(var + 1e-5))[:, :32]
    assert by_hand != pytest.approx((out.logits - context).abs().mean().item(), rel=1e-3)


def test_predictions_never_see_the_future_frames_the_target_does() -> None:
    obj = objective()
    batch = obj.make_batch(clips(2), torch.Generator().manual_seed(1))
    changed = batch["pixel_values"].clone()
    changed[:, 4:] = torch.randn_like(changed[:, 4:])  # frames 4-7: the future
    model = model_for(obj).eval()
    with torch.no_grad():
        a, b = model(**batch), model(**{**batch, "pixel_values": changed})
    assert torch.equal(a.logits, b.logits)
    assert a.loss.item() != pytest.approx(b.loss.item(), rel=1e-3)


def test_pixel_loss_is_the_normalized_pixel_error_of_the_future_tubes() -> None:
    obj = objective("pixels")
    batch = obj.make_batch(clips(3), torch.Generator().manual_seed(0))
    pixels, mask = batch["pixel_values"], batch["bool_masked_pos"]
    model = model_for(obj).eval()
    assert not hasattr(model, "teacher") and model.pairs() == []
    with torch.no_grad():
        out = model(**batch)
    unit = pixels * IMAGE_STD.unsqueeze(0) + IMAGE_MEAN.unsqueeze(0)  # back to [0, 1]
    by_hand = reconstruction_loss_by_hand(unit, mask, out.logits, ts=2, p=4)
    assert out.logits.shape == (3, 32, 2 * 4 * 4 * 3)
    assert out.loss.item() == pytest.approx(by_hand, rel=1e-5)


def test_the_future_mask_and_batches_are_functions_of_the_generator() -> None:
    obj = objective(num_frames=8, context_frames=2)  # context: 1 slot of 4; future: 3
    samples = clips(4, length=30)
    a = obj.make_batch(samples, torch.Generator().manual_seed(5))
    again = obj.make_batch(samples, torch.Generator().manual_seed(5))
    other = obj.make_batch(samples, torch.Generator().manual_seed(6))
    for k in a:
        assert torch.equal(a[k], again[k])
    assert not torch.equal(a["pixel_values"], other["pixel_values"])  # other frame offsets
    assert torch.equal(a["bool_masked_pos"], other["bool_masked_pos"])  # no random draw
    want = torch.zeros(64, dtype=torch.bool)
    want[future_index(4, 1, 16)] = True
    assert torch.equal(a["bool_masked_pos"], want.expand(4, -1))
    assert obj.tokens(a) == 4 * 16  # the context encoder sees 16 tubes a clip
    assert objective().settings.context_frames == 4  # the default: half the frames


@pytest.mark.parametrize("target", ["latent", "pixels"])
def test_flops_are_the_multiplies_the_model_runs(target: str) -> None:
    """torch's counter on one forward and backward: the context encoder on the context tubes,
    the predictor, and (latent) the target encoder's forward on every tube."""
    obj = objective(target)
    batch = obj.make_batch(clips(2), torch.Generator().manual_seed(0))
    model = model_for(obj)
    model.set_attn_implementation("eager")  # plain matmuls, counted
    with FlopCounterMode(display=False) as counter:
        model(**batch).loss.backward()
    assert obj.flops(batch) == counter.get_total_flops()
    assert obj.flops_inputs()["flops_per_sample"] == obj.sample_flops()


def test_the_target_encoder_is_fp32_buffers_that_follow_the_context_encoder() -> None:
    """Built equal to the context encoder; buffers (no optimizer state, whole under ZeRO-3);
    fp32 after DeepSpeed's bf16 cast; after a step, the EMA at that step's momentum."""
    obj = objective(steps=40)
    model = model_for(obj)
    teacher, online = model.teacher["videomae"], model.videomae
    names = [n for n, _ in online.named_parameters()]
    assert len(names) > 10 and not list(teacher.parameters())
    assert all(torch.equal(teacher.get_buffer(n), p) for n, p in online.named_parameters())
    for p in model.parameters():  # what DeepSpeed's engine does under bf16
        p.data = p.data.to(torch.bfloat16)
    engine = SimpleNamespace(module=model)
    obj.prepare_engine(engine)
    assert all(teacher.get_buffer(n).dtype == torch.float32 for n in names)
    batch = obj.make_batch(clips(2), torch.Generator().manual_seed(0))
    batch["pixel_values"] = batch["pixel_values"].bfloat16()
    assert torch.isfinite(model(**batch).loss)  # bf16 context encoder, fp32 target encoder
    before = {n: teacher.get_buffer(n).clone() for n in names}
    with torch.no_grad():
        for p in online.parameters():
            p.add_(0.5)
    obj.after_step(engine, 10)
    m = momentum_at(10, 40, obj.settings.momentum)
    for n, p in online.named_parameters():
        want = m * before[n] + (1 - m) * p.float()
        torch.testing.assert_close(teacher.get_buffer(n), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("target", "frac"), [("latent", 0.5), ("pixels", 0.6)])
def test_fits_a_fixed_batch(target: str, frac: float) -> None:
    """Four moving-digit clips: 60 AdamW steps, the target encoder following at its schedule,
    take the loss below `frac` of its start (measured: latent 0.80 -> 0.19, pixels 0.57 -> 0.25)."""
    obj = objective(target, steps=60)
    batch = obj.make_batch(digit_clips(4), torch.Generator().manual_seed(0))
    losses = fit(obj, model_for(obj).train(), batch, steps=60, lr=1e-2)
    assert min(losses[-5:]) < frac * losses[0], losses[::10]


@pytest.mark.parametrize(
    ("settings", "data", "message"),
    [
        ({"context_frames": 3}, {}, "model.context_frames: expected a positive multiple"),
        ({"context_frames": 8}, {}, "model.context_frames: 8 leaves no frame"),
        ({"context_frames": 0}, {"num_frames": 2}, "model.context_frames: expected a positive"),
        ({"tubelet_size": 3}, {}, "model.tubelet_size: 3 does not divide data.num_frames=8"),
        ({"target": "frames"}, {}, "model.target: expected one of latent, pixels"),
        ({"predictor_hidden_size": 33}, {}, "model.predictor_hidden_size: 33"),
        ({"momentum": 1.0}, {}, "model.momentum: expected in"),
        ({"patch_size": 5}, {}, "data.image_size: 16 is not divisible by model.patch_size=5"),
    ],
)
def test_bad_settings_are_refused_by_key(
    settings: dict[str, Any], data: dict[str, Any], message: str
) -> None:
    s = VideoFutureSettings(**{"patch_size": 4, **settings})
    cfg = Config(objective="video_future", train=TrainConfig(steps=1),
                 data=DataConfig(url="unused", image_size=16, **{"num_frames": 8, **data}),
                 objective_settings=s)  # fmt: skip
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)


@pytest.mark.parametrize(("target", "prefix"), [("latent", "teacher.videomae."),
                                                ("pixels", "videomae.")])  # fmt: skip
def test_the_harness_takes_the_target_encoder_or_else_the_context_encoder(
    target: str, prefix: str, tmp_path: Path
) -> None:
    """The encoder the harness and export take (checkpoint_reader.encoder_weights): latent
    targets' EMA target encoder, as V-JEPA evaluates; pixel targets have only the context
    encoder. It is a whole VideoMAEModel, which AutoModel loads back from save_pretrained."""
    obj = objective(target)
    model = model_for(obj)
    if target == "latent":  # the two encoders differ, as after training
        with torch.no_grad():
            for p in model.videomae.parameters():
                p.add_(0.1)
    weights = model.state_dict()
    ref = SimpleNamespace(meta={"objective": "video_future"})
    sd = reader.encoder_weights(ref, weights)  # type: ignore[arg-type]
    assert sd.keys() == VideoMAEModel(model.config).state_dict().keys()
    assert all(torch.equal(v, weights[prefix + k]) for k, v in sd.items())
    model.config.save_pretrained(tmp_path / "ckpt")
    encoder = reader.build_encoder(reader.encoder_config(tmp_path / "ckpt" / "config.json"))
    encoder.load_state_dict(sd, strict=True)
    encoder.save_pretrained(tmp_path / "export")
    loaded = AutoModel.from_pretrained(tmp_path / "export").eval()
    assert type(loaded) is VideoMAEModel
    x = obj.make_batch(clips(2), torch.Generator().manual_seed(0))["pixel_values"]
    with torch.no_grad():
        want = (model.teacher["videomae"] if target == "latent" else model.videomae)(x)
        assert torch.equal(loaded(x).last_hidden_state, want.last_hidden_state)


@pytest.mark.slow
@pytest.mark.distributed
def test_pretrain_export_and_load(tmp_path: Path) -> None:
    """`darkmatter pretrain` (1 process, ZeRO-3, bf16, 4 steps) and `darkmatter export`: the
    export is a VideoMAEModel that AutoModel loads, holding the EMA target encoder of the last
    checkpoint (fp32, moved away from its start), not the context encoder."""
    from darkmatter.data_pipeline.prepare import prepare
    from darkmatter.evaluation import export
    from tests.helpers import metrics, run_darkmatter, write_config
    from tests.test_objectives_resume import final_weights, moving_clips

    moving_clips(tmp_path / "gif", n=96)
    prepare([str(tmp_path / "gif")], str(tmp_path / "ds"), modality="video", workers=1)
    run_dir = tmp_path / "run"
    cfg = write_config(
        tmp_path / "c.yaml", str(tmp_path / "ds"), run_dir, objective="video_future",
        data={"image_size": 16, "num_frames": 4, "frame_stride": 2, "shuffle_buffer": 16},
        model={"patch_size": 4, "predictor_hidden_size": 32, "predictor_num_layers": 1,
               "momentum": 0.9},
        train={"steps": 4, "zero_stage": 3, "bf16": True, "log_every": 1},
        checkpoint={"every": 4, "async_save": False},
    )  # fmt: skip
    out = run_darkmatter("pretrain", str(cfg), env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(metrics(run_dir)) == 4
    assert export.cli([str(run_dir), str(tmp_path / "export")]) == 0
    model = AutoModel.from_pretrained(tmp_path / "export")
    assert type(model) is VideoMAEModel
    record = json.loads((tmp_path / "export" / "config.json").read_text())
    assert record["architectures"] == ["VideoMAEModel"]
    final = final_weights(run_dir / "checkpoints" / "step00000004")
    exported = model.state_dict()
    name = "embeddings.patch_embeddings.projection.weight"
    assert final["teacher.videomae." + name].dtype == torch.float32
    assert all(
        torch.equal(v, final["teacher.videomae." + k].to(v.dtype)) for k, v in exported.items()
    )
    assert not torch.equal(exported[name], final["videomae." + name].to(exported[name].dtype))
    assert np.isfinite(final["teacher.videomae." + name].numpy()).all()
