"""The presets for the sizes people train (configs/large/): each resolves as `--dry-run` shows
it, and its model, built on the meta device (no memory), has the parameter count its paper
publishes, within 2%."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from darkmatter.trainer.checkpoint_reader import build_encoder
from darkmatter.trainer.config import ConfigError
from darkmatter.trainer.objectives import OBJECTIVES, load_config
from tests.helpers import REPO_ROOT

LARGE = REPO_ROOT / "configs" / "large"
# The encoder's parameters as each paper counts them (pooler included where the model has one).
PUBLISHED = {
    "bert_base_mlm": 110e6,  # Devlin et al. 2019
    "bert_large_mlm": 340e6,
    "bert_1b_mlm": 1.3e9,  # Shoeybi et al. 2019 (Megatron-LM), 24 x 2048
    "mae_vit_b16": 86e6,  # Dosovitskiy et al. 2021, table 1
    "mae_vit_l16": 307e6,
    "mae_vit_h14": 632e6,
    "moco_vit_b16": 86e6,
    "moco_vit_l16": 307e6,
    "wav2vec2_base": 95e6,  # Baevski et al. 2020
    "wav2vec2_large": 317e6,
}
# What `darkmatter prepare` puts in a dataset's meta: BERT's WordPiece vocabulary for text.
META = {
    "text": {"modality": "text", "vocab_size": 30522,
             "special_tokens": {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103}},
    "image": {"modality": "image"},
    "audio": {"modality": "audio"},
}  # fmt: skip


def test_every_large_preset_has_its_published_figure() -> None:
    assert sorted(p.stem for p in LARGE.glob("*.yaml")) == sorted(PUBLISHED)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_the_model_has_the_published_parameter_count(name: str) -> None:
    cfg = load_config(LARGE / f"{name}.yaml")
    objective = OBJECTIVES[cfg.objective](cfg, META[OBJECTIVES[cfg.objective].modality])
    with torch.device("meta"):
        encoder = build_encoder(objective.model_config(), pooler=True)
        full = objective.build_model()  # the whole pretraining model builds as configured
    count = sum(p.numel() for p in encoder.parameters())
    assert abs(count / PUBLISHED[name] - 1) <= 0.02, (name, count)
    assert sum(p.numel() for p in full.parameters()) >= count
    assert cfg.train.bf16 and cfg.checkpoint.root.startswith("s3://")


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_dry_run_resolves_the_global_batch(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    from darkmatter.cli import pretrain_main

    cfg = load_config(LARGE / f"{name}.yaml")
    world = 8 if cfg.train.global_batch_size % (8 * cfg.train.micro_batch_size) == 0 else 4
    assert pretrain_main([str(LARGE / f"{name}.yaml"), "--dry-run", "--nproc", str(world)]) == 0
    out = capsys.readouterr().out
    accum = cfg.train.global_batch_size // (world * cfg.train.micro_batch_size)
    assert f'"gradient_accumulation_steps": {accum}' in out, out[-2000:]
    assert f'"train_batch_size": {cfg.train.global_batch_size}' in out


def test_mae_decoder_heads_must_divide_its_width(tmp_path: Path) -> None:
    text = (LARGE / "mae_vit_b16.yaml").read_text().replace("decoder_num_heads: 16",
                                                           "decoder_num_heads: 0")  # fmt: skip
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match="model.decoder_hidden_size: 512 is not divisible by 12"):
        load_config(tmp_path / "c.yaml")
