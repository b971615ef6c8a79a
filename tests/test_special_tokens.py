"""Special-token ids come from the tokenizer, never from constants: `prepare --tokenizer` with
BERT's numbering ([PAD]=0 [UNK]=100 [CLS]=101 [SEP]=102 [MASK]=103) records them in the
manifest, and the text objectives pad, mask and delimit with them."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from darkmatter.data_pipeline.prepare import Manifest, PrepareError, cli, prepare
from darkmatter.trainer.config import Config, DataConfig, ModelConfig, TrainConfig
from darkmatter.trainer.objectives import OBJECTIVES
from darkmatter.trainer.train import dataset_meta
from tests.helpers import synthetic_corpus

BERT_IDS = {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103}
# The synthetic corpus's words but "river", which becomes [UNK] in every document.
WORDS = ["the", "red", "brown", "green", "blue", "white", "black", "fox", "dog", "cat", "owl",
         "bee", "elk", "number", "jumps", "over", "lazy", "near", *map(str, range(50))]  # fmt: skip


def bert_like_tokenizer(path: Path, with_mask: bool = True) -> Path:
    """A WordPiece tokenizer.json numbered as BERT's: [PAD]=0, [unusedN] fillers 1..99, [UNK]=100,
    [CLS]=101, [SEP]=102, [MASK]=103 (or [unused100] there), then WORDS."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {"[PAD]": 0, **{f"[unused{i}]": i for i in range(1, 100)}}
    vocab.update({"[UNK]": 100, "[CLS]": 101, "[SEP]": 102})
    vocab["[MASK]" if with_mask else "[unused100]"] = 103
    vocab.update({w: 104 + i for i, w in enumerate(WORDS)})
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 101), ("[SEP]", 102)],
    )
    tok.save(str(path))
    return path


def config(url: str, objective: str = "mlm", mask_ratio: float = 0.0) -> Config:
    settings = OBJECTIVES[objective].settings_class()
    if mask_ratio:  # mlm, span
        settings.mask_ratio = mask_ratio  # type: ignore[attr-defined]
    return Config(
        objective=objective, data=DataConfig(url=url, seq_len=32), train=TrainConfig(steps=1),
        model=ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=48,
                          dropout=0.0),
        objective_settings=settings,
    )  # fmt: skip


def shard_samples(ds: Path) -> list[dict[str, Any]]:
    """Every sample's input_ids, as the reader gives them to make_batch."""
    out = []
    for shard in sorted(ds.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in sorted(tar.getmembers(), key=lambda m: m.name):
                if m.name.endswith(".input_ids.npy"):
                    f = tar.extractfile(m)
                    assert f is not None
                    out.append({"input_ids": np.load(io.BytesIO(f.read())).astype(np.int64)})
    return out


def test_bert_numbered_tokenizer_reaches_manifest_and_objectives(tmp_path: Path) -> None:
    corpus = synthetic_corpus(tmp_path / "corpus.txt", n=600)
    tok = bert_like_tokenizer(tmp_path / "bert.json")
    ds = tmp_path / "ds"
    m = prepare([str(corpus)], str(ds), modality="text", tokenizer=str(tok), workers=1)
    assert m.special_tokens == BERT_IDS
    assert json.loads((ds / "manifest.json").read_text())["special_tokens"] == BERT_IDS
    assert Manifest.load(str(ds)) == m

    meta = dataset_meta(config(str(ds)))
    assert meta["special_tokens"] == BERT_IDS and meta["vocab_size"] == 104 + len(WORDS)
    samples = shard_samples(ds)
    assert len(samples) == 600
    assert all(s["input_ids"][0] == 101 and s["input_ids"][-1] == 102 for s in samples)
    assert all(100 in s["input_ids"] for s in samples)  # "river"

    # mask_ratio 0.9: nearly every ordinary token is chosen, so ~600 random replacements.
    mlm = OBJECTIVES["mlm"](config(str(ds), "mlm", mask_ratio=0.9), meta)
    assert mlm.model_config().pad_token_id == 0
    batch = mlm.make_batch(samples, torch.Generator().manual_seed(0))
    ids = torch.where(batch["labels"] != -100, batch["labels"], 0)  # the originals, where chosen
    inputs, chosen = batch["input_ids"], batch["labels"] != -100
    padding = batch["attention_mask"] == 0
    assert padding.any() and (inputs[padding] == 0).all()  # padded with BERT's [PAD]
    specials = torch.tensor(sorted(BERT_IDS.values()))
    assert not torch.isin(batch["labels"][chosen], specials).any()  # never mask a special
    assert (inputs[:, 0] == 101).all()  # [CLS] in every row, never masked
    ordinary = sum(int((~torch.isin(torch.from_numpy(s["input_ids"]), specials)).sum())
                   for s in samples)  # fmt: skip
    assert abs(chosen.sum().item() / ordinary - 0.9) < 0.02
    as_mask = inputs[chosen] == 103
    assert abs(as_mask.float().mean().item() - 0.8) < 0.02
    assert (inputs == 4).sum() < 20  # only a random draw's [unused4], never the mask
    swapped = chosen & (inputs != 103) & (inputs != ids)
    drawn = inputs[swapped]
    assert swapped.sum() > 500
    assert not torch.isin(drawn, specials).any()  # replacements are never special ids
    assert (drawn < 100).sum() > 300  # ... but any other id, [unusedN] included, as BERT

    clm = OBJECTIVES["clm"](config(str(ds), "clm"), meta).model_config()
    assert (clm.bos_token_id, clm.eos_token_id, clm.pad_token_id) == (101, 102, 0)
    span = OBJECTIVES["span"](config(str(ds), "span"), meta)
    t5 = span.model_config()
    assert (t5.pad_token_id, t5.eos_token_id, t5.decoder_start_token_id) == (0, 102, 0)
    batch = span.make_batch(samples[:4], torch.Generator().manual_seed(0))
    assert [row[row != 0][-1].item() for row in batch["input_ids"]] == [102] * 4
    top = 104 + len(WORDS) + 99  # <extra_id_0> = V + 99
    assert batch["labels"][:, 0].tolist() == [top] * 4


def test_prepare_refuses_a_tokenizer_without_mask(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = synthetic_corpus(tmp_path / "corpus.txt", n=20)
    tok = bert_like_tokenizer(tmp_path / "nomask.json", with_mask=False)
    with pytest.raises(
        PrepareError, match=r"nomask\.json: tokenizer lacks special token\(s\) \[MASK\]"
    ):
        prepare([str(corpus)], str(tmp_path / "ds"), modality="text", tokenizer=str(tok))
    argv = [str(corpus), "--output", str(tmp_path / "ds"), "--modality", "text",
            "--tokenizer", str(tok), "--quiet"]  # fmt: skip
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "[MASK]" in err[0] and str(tok) in err[0], err
    assert not (tmp_path / "ds" / "manifest.json").exists()


def test_manifest_without_special_tokens_means_prepares_own_ids(tmp_path: Path) -> None:
    """Manifests written before the field: prepare's trained tokenizer, [PAD]=0 ... [MASK]=4."""
    corpus = synthetic_corpus(tmp_path / "corpus.txt", n=40)
    old, bert = tmp_path / "old", tmp_path / "bert"
    prepare([str(corpus)], str(old), modality="text", vocab_size=80, workers=1)
    prepare([str(corpus)], str(bert), modality="text", tokenizer=str(bert_like_tokenizer(
        tmp_path / "bert.json")), workers=1)  # fmt: skip
    for ds in (old, bert):
        doc = json.loads((ds / "manifest.json").read_text())
        del doc["special_tokens"]
        (ds / "manifest.json").write_text(json.dumps(doc))

    defaults = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    assert Manifest.load(str(old)).special_tokens == defaults
    assert dataset_meta(config(str(old)))["special_tokens"] == defaults
    # An old dataset of a tokenizer numbered otherwise is refused, not trained wrong.
    assert Manifest.load(str(bert)).special_tokens == defaults
    with pytest.raises(ValueError, match=r"special_tokens .* disagree with .*tokenizer\.json"):
        dataset_meta(config(str(bert)))

    doc = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**doc, "special_tokens": {"pad": "0"}}))
    with pytest.raises(PrepareError, match="special_tokens must map"):
        Manifest.load(str(old))
