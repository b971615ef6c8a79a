"""`darkmatter export CHECKPOINT_OR_RUN OUT_DIR`: the checkpoint's encoder as a `save_pretrained`
folder (safetensors weights, config, and the tokenizer for text, the image processor for images
or the feature extractor for audio), loadable by `AutoModel.from_pretrained` and
`AutoTokenizer` / `AutoImageProcessor` / `AutoFeatureExtractor`
(a T5 encoder, from the `span` objective, by `T5EncoderModel.from_pretrained`: AutoModel would
build the whole encoder-decoder around it).
ZeRO shards are consolidated with DeepSpeed's own zero_to_fp32; the checkpoint may be local or in
object storage, and its files are verified against its commit record first. Beside the encoder,
`pretraining_heads.safetensors` holds the rest of the pretraining model (its heads, decoder,
momentum teacher, quantizer), which `model.init_from` loads to continue pretraining from the
export exactly where the checkpoint stopped; AutoModel ignores it.

`--register NAME` also logs the export into the checkpoint's training run with MLflow's
transformers flavor (artifact `models/stepNNNNNNNN`) and registers it as a new version of model
NAME, tagged with the run and step."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from transformers import AutoConfig

import darkmatter.trainer.checkpoint_reader as reader
from darkmatter.evaluation.checkpoints import from_pretrained, load_encoder
from darkmatter.trainer.checkpoint_reader import HEADS_FILE, CheckpointRef


def export(target: str, output: str) -> tuple[CheckpointRef, Path]:
    ref = reader.fetch(reader.locate(target))
    out = Path(output)
    weights = reader.consolidated_state_dict(ref)
    encoder = load_encoder(ref, pretrained=True, state_dict=weights)  # seeded: BERT's pooler
    encoder.save_pretrained(str(out))
    reader.save_heads(ref, encoder, weights, out)
    # Where it came from: `darkmatter evaluate OUT_DIR` logs into the same run at the same step.
    (out / "darkmatter.json").write_text(json.dumps({**ref.meta, "tag": ref.tag}, indent=1))
    tok_url = ref.meta.get("tokenizer")
    if tok_url:
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        from darkmatter.storage import read_bytes

        tok = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_str(read_bytes(tok_url).decode()),
            unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
            mask_token="[MASK]", model_max_length=int(ref.meta["data"]["seq_len"]),
        )  # fmt: skip
        tok.save_pretrained(str(out))
    if ref.modality == "image":
        from transformers import ViTImageProcessor

        from darkmatter.data_pipeline.transforms import IMAGE_MEAN, IMAGE_STD

        size = int(ref.meta["data"]["image_size"])
        ViTImageProcessor(
            size={"height": size, "width": size}, resample=2,  # bilinear, as in training
            image_mean=IMAGE_MEAN.flatten().tolist(), image_std=IMAGE_STD.flatten().tolist(),
        ).save_pretrained(str(out))  # fmt: skip
    if ref.modality == "video":  # frames resized and normalized as the image objectives'
        from transformers import VideoMAEImageProcessor

        from darkmatter.data_pipeline.transforms import IMAGE_MEAN, IMAGE_STD

        size = int(ref.meta["data"]["image_size"])
        VideoMAEImageProcessor(
            size={"height": size, "width": size}, do_center_crop=False, resample=2,
            image_mean=IMAGE_MEAN.flatten().tolist(), image_std=IMAGE_STD.flatten().tolist(),
        ).save_pretrained(str(out))  # fmt: skip
    if ref.modality == "audio":  # 16 kHz, normalized per clip, padding masked: as in training
        from darkmatter.data_pipeline.transforms import feature_extractor

        feature_extractor().save_pretrained(str(out))
    return ref, out


def register(ref: CheckpointRef, out: Path, name: str) -> Any:
    """Log the export `out` into ref's training run and register it as a version of `name`."""
    import shutil

    import mlflow.transformers
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    from transformers import AutoImageProcessor, AutoTokenizer

    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    run_id = ref.meta.get("mlflow_run_id")
    if not uri:
        raise ValueError("--register: MLFLOW_TRACKING_URI is not set")
    if not run_id:
        raise ValueError(f"{ref.path}: --register needs a checkpoint from a run tracked in MLflow "
                         "(this one was trained with tracking off)")  # fmt: skip
    if ref.modality not in ("text", "image"):
        raise ValueError(f"--register: MLflow's transformers flavour has no feature-extraction "
                         f"task for {ref.modality} encoders; {out} loads with "
                         "AutoModel.from_pretrained (log it as an artifact instead)")  # fmt: skip
    components: dict[str, Any] = {"model": from_pretrained(out)}
    if ref.meta.get("tokenizer"):
        task, components["tokenizer"] = "feature-extraction", AutoTokenizer.from_pretrained(out)
    else:
        task = "image-feature-extraction"
        components["image_processor"] = AutoImageProcessor.from_pretrained(str(out))
    # Pinned explicitly: MLflow's inference of requirements imports packages we do not need.
    reqs = [f"{p}=={importlib.metadata.version(p)}" for p in ("torch", "transformers")]
    artifact_path = f"models/{ref.tag}"
    client = MlflowClient(tracking_uri=uri)
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.transformers.save_model(
            components, f"{tmp}/model", task=task, pip_requirements=reqs,
            metadata={"darkmatter_step": ref.step, "darkmatter_checkpoint": str(ref.path),
                      "objective": ref.meta["objective"]},
        )  # fmt: skip
        # Beside the flavour's weights (model/model/): what `model.init_from: models:/NAME/V`
        # needs to continue pretraining, the heads and the export's record.
        for extra in (HEADS_FILE, "darkmatter.json"):
            if (out / extra).is_file():
                shutil.copy(out / extra, f"{tmp}/model/model/{extra}")
        client.log_artifacts(run_id, f"{tmp}/model", artifact_path)
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(
        name, source=f"runs:/{run_id}/{artifact_path}", run_id=run_id,
        tags={"step": str(ref.step), "checkpoint": str(ref.path),
              "objective": ref.meta["objective"]},
        description=f"{ref.meta['objective']} encoder at step {ref.step} of run {run_id}",
    )  # fmt: skip
    client.set_tag(run_id, f"registered.{name}", f"version {version.version} (step {ref.step})")
    return version


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="darkmatter export", description=__doc__)
    p.add_argument("target", help="run folder, checkpoint root (local or s3://…) or step folder")
    p.add_argument("out_dir", nargs="?", help="folder to write")
    p.add_argument("--output", help="folder to write (same as OUT_DIR)")
    p.add_argument("--register", metavar="NAME", help="register it in MLflow's model registry")
    args = p.parse_args(argv)
    output = args.out_dir or args.output
    if not output:
        p.error("the output folder is required (OUT_DIR or --output)")
    ref, out = export(args.target, output)
    loader = reader.encoder_class(AutoConfig.from_pretrained(str(out))).__name__
    print(f"exported encoder to {out} (load with transformers.{loader}.from_pretrained)")
    if args.register:
        v = register(ref, out, args.register)
        print(f"registered {args.register} version {v.version}: step {ref.step} of run "
              f"{v.run_id} (load with mlflow.transformers.load_model('models:/"
              f"{args.register}/{v.version}'))")  # fmt: skip
    return 0
