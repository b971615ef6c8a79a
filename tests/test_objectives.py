"""Objectives on their own: masking statistics and the models they build."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from darkmatter.data_pipeline.prepare import DEFAULT_SPECIAL_IDS
from darkmatter.trainer.config import Config, DataConfig, ModelConfig, TrainConfig
from darkmatter.trainer.objectives import OBJECTIVES
from darkmatter.trainer.objectives.mae import MAESettings
from darkmatter.trainer.objectives.mlm import SpecialIds, mask_tokens, pad_and_truncate

IDS = SpecialIds(**DEFAULT_SPECIAL_IDS)  # prepare's trained tokenizer: [PAD]=0 ... [MASK]=4


def test_mlm_masking_follows_80_10_10() -> None:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (256, 128), generator=gen)
    ids[:, 0] = 2  # [CLS] is never chosen
    inputs, labels = mask_tokens(ids, 0.15, IDS.mask, IDS.lookup(1000), gen)
    chosen = labels != -100
    assert not chosen[:, 0].any()
    assert abs(chosen.float().mean().item() - 0.15 * 127 / 128) < 0.005
    as_mask = (inputs == IDS.mask) & chosen
    kept = (inputs == ids) & chosen
    n = chosen.sum().item()
    assert abs(as_mask.sum().item() / n - 0.8) < 0.02
    assert abs(kept.sum().item() / n - 0.1) < 0.02  # (a random swap to the same id is ~0.1%)
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(inputs[~chosen], ids[~chosen])


def test_whole_word_masking_chooses_every_piece_of_a_word(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from darkmatter.data_pipeline.prepare.tokenizer import train_tokenizer
    from darkmatter.trainer.config import ConfigError
    from darkmatter.trainer.objectives.mlm import continuation_lookup
    from tests.helpers import synthetic_corpus

    docs = synthetic_corpus(tmp_path / "c.txt").read_text().splitlines()
    tok = train_tokenizer(lambda _: iter(docs), 60)  # small: most words are several pieces
    (tmp_path / "tokenizer.json").write_text(tok.to_str())
    vocab = tok.get_vocab_size()
    cont = continuation_lookup(str(tmp_path / "tokenizer.json"), vocab)
    rows = [e.ids[:48] for e in tok.encode_batch(docs[:512])]
    ids = torch.tensor([r + [IDS.pad] * (48 - len(r)) for r in rows])
    assert 0.2 < cont[ids].float().mean() < 0.8  # many words are split

    def split_words(chosen: torch.Tensor) -> int:
        """Words of which some pieces are chosen and some are not."""
        word = (~cont[ids]).cumsum(1)
        split = 0
        for b in range(len(ids)):
            for w in word[b].unique():
                picked = chosen[b][word[b] == w]
                split += int(picked.any() and not picked.all())
        return split

    gen = torch.Generator().manual_seed(0)
    inputs, labels = mask_tokens(ids, 0.3, IDS.mask, IDS.lookup(vocab), gen, cont)
    chosen = labels != -100
    assert split_words(chosen) == 0
    real = ~IDS.lookup(vocab)[ids]
    assert abs(chosen[real].float().mean().item() - 0.3) < 0.03  # about the same share of tokens
    gen = torch.Generator().manual_seed(0)
    _, token_labels = mask_tokens(ids, 0.3, IDS.mask, IDS.lookup(vocab), gen)
    assert split_words(token_labels != -100) > 100  # token-level masking splits words

    bpe = json.loads(tok.to_str())
    bpe["model"]["type"] = "BPE"
    (tmp_path / "bpe.json").write_text(json.dumps(bpe))
    with pytest.raises(ConfigError, match=r"whole_word_masking needs a WordPiece tokenizer; .*bpe"):
        continuation_lookup(str(tmp_path / "bpe.json"), vocab)


def test_truncation_keeps_the_closing_sep() -> None:
    out = pad_and_truncate([np.array([2, 7, 8, 9, 10, 3]), np.array([2, 7, 3])], 4, 0, 3)
    assert out.tolist() == [[2, 7, 8, 3], [2, 7, 3, 0]]


def test_mae_model_has_sincos_position_embeddings() -> None:
    """transformers 5 builds ViT-MAE with all-zero (frozen) position embeddings; ours are set."""
    cfg = Config(
        objective="mae", data=DataConfig(url="unused", image_size=16), train=TrainConfig(steps=1),
        model=ModelConfig(hidden_size=32, num_heads=2, intermediate_size=64),
        objective_settings=MAESettings(patch_size=2, decoder_hidden_size=32, mask_ratio=0.75),
    )  # fmt: skip
    model = OBJECTIVES["mae"](cfg, {"modality": "image"}).build_model()
    pos = model.vit.embeddings.position_embeddings[0, 1:]  # [64 patches, 32]
    assert pos.abs().sum() > 0 and not pos.requires_grad
    assert torch.unique(pos, dim=0).shape[0] == 64  # every patch position is distinct
    assert model.decoder.decoder_pos_embed.abs().sum() > 0
