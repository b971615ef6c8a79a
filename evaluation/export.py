"""`darkmatter export CHECKPOINT_OR_RUN --output DIR`: the checkpoint's encoder as a
`save_pretrained` folder (with its tokenizer for text), loadable by `AutoModel.from_pretrained`."""

from __future__ import annotations

import argparse
from pathlib import Path

from evaluation.checkpoints import load_encoder, resolve


def export(target: str, output: str) -> Path:
    ref = resolve(target)
    out = Path(output)
    encoder = load_encoder(ref, pretrained=True)
    encoder.save_pretrained(str(out))
    tok_url = ref.meta.get("tokenizer")
    if tok_url:
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        from data_pipeline.storage import read_bytes

        tok = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_str(read_bytes(tok_url).decode()),
            unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
            mask_token="[MASK]", model_max_length=int(ref.meta["data"]["seq_len"]),
        )  # fmt: skip
        tok.save_pretrained(str(out))
    return out


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="darkmatter export", description=__doc__)
    p.add_argument("target", help="run folder, checkpoints folder or one checkpoint folder")
    p.add_argument("--output", required=True, help="folder to write")
    args = p.parse_args(argv)
    out = export(args.target, args.output)
    print(f"exported encoder to {out} (load with transformers.AutoModel.from_pretrained)")
    return 0
