"""`darkmatter export CHECKPOINT_OR_RUN OUT_DIR`: the checkpoint's encoder as a `save_pretrained`
folder (safetensors weights, config, and the tokenizer for text or the image processor for
images), loadable by `AutoModel.from_pretrained` and `AutoTokenizer` / `AutoImageProcessor`.
ZeRO shards are consolidated with DeepSpeed's own zero_to_fp32; the checkpoint may be local or in
object storage, and its files are verified against its commit record first."""

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
    if ref.meta["objective"] == "mae":
        from transformers import ViTImageProcessor

        from data_pipeline.transforms import IMAGE_MEAN, IMAGE_STD

        size = int(ref.meta["data"]["image_size"])
        ViTImageProcessor(
            size={"height": size, "width": size}, resample=2,  # bilinear, as in training
            image_mean=IMAGE_MEAN.flatten().tolist(), image_std=IMAGE_STD.flatten().tolist(),
        ).save_pretrained(str(out))  # fmt: skip
    return out


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="darkmatter export", description=__doc__)
    p.add_argument("target", help="run folder, checkpoint root (local or s3://…) or step folder")
    p.add_argument("out_dir", nargs="?", help="folder to write")
    p.add_argument("--output", help="folder to write (same as OUT_DIR)")
    args = p.parse_args(argv)
    output = args.out_dir or args.output
    if not output:
        p.error("the output folder is required (OUT_DIR or --output)")
    out = export(args.target, output)
    print(f"exported encoder to {out} (load with transformers.AutoModel.from_pretrained)")
    return 0
