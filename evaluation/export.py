"""`darkmatter export CHECKPOINT_OR_RUN OUT_DIR`: the checkpoint's encoder as a `save_pretrained`
folder (safetensors weights, config, and the tokenizer for text, the image processor for images
or the feature extractor for audio), loadable by `AutoModel.from_pretrained` and
`AutoTokenizer` / `AutoImageProcessor` / `AutoFeatureExtractor`
(a T5 encoder, from the `span` objective, by `T5EncoderModel.from_pretrained`: AutoModel would
build the whole encoder-decoder around it).
ZeRO shards are consolidated with DeepSpeed's own zero_to_fp32 (weights_only: a checkpoint file
never runs code); the checkpoint may be local or in object storage, or found from a run folder
(its own checkpoints/ or the checkpoint.root it records), and its files are verified against its
commit record first. The tokenizer or processor settings come from the checkpoint itself, so a
local checkpoint exports with its dataset's storage out of reach (older checkpoints: from the
dataset's URL). Beside the encoder, `pretraining_heads.safetensors` holds the rest of the
pretraining model (its heads, decoder, momentum teacher, quantizer), which `model.init_from`
loads to continue pretraining from the export exactly where the checkpoint stopped; AutoModel
ignores it. The encoder has no pooler: none of the objectives trains one (BERT's and ViT's
AutoModel add it unless told `add_pooling_layer=False`); README.md in the export says how to
pool its features.

All or nothing: the export is written into a temporary sibling folder and renamed to OUT_DIR once
complete; its record, darkmatter.json, is written last and lists every file, and loaders refuse a
folder that lacks one (`checkpoint_reader.missing_export_files`). A failure leaves no OUT_DIR; an
existing export there is replaced only by a complete one, and a folder that is no export is
never touched.

`--register NAME` also logs the export into the checkpoint's training run with MLflow's
transformers flavor (artifact `models/stepNNNNNNNN`) and registers it as a new version of model
NAME, tagged with the run and step."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from transformers import AutoConfig

import darkmatter.trainer.checkpoint_reader as reader
from darkmatter import storage
from darkmatter.evaluation.checkpoints import from_pretrained, load_encoder
from darkmatter.trainer.checkpoint_reader import EXPORT_RECORD, HEADS_FILE, CheckpointRef

# How each objective's features are best pooled from `last_hidden_state` [B, T, D] (what its
# loss trained), for the export's README.md.
_MASKED_MEAN = (
    "the mean over real tokens",
    'mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)\n'
    "features = (hidden * mask).sum(1) / mask.sum(1)  # [B, D]",
)
POOLING: dict[str, tuple[str, str]] = {
    "mlm": _MASKED_MEAN,  # masked-language modelling never trains [CLS] as a summary
    "clm": _MASKED_MEAN,
    "span": _MASKED_MEAN,
    "mae": ("the mean over the patch tokens (token 0 is [CLS], which MAE does not train)",
            "features = hidden[:, 1:].mean(1)  # [B, D]"),
    "simclr": ("the mean over all tokens, as the contrastive loss was trained",
               "features = hidden.mean(1)  # [B, D]"),
    "video": ("the mean over the tubes (VideoMAE has no [CLS])",
              "features = hidden.mean(1)  # [B, D]"),
    "wav2vec2": ("the mean over the frames of each (unpadded) clip",
                 "features = hidden.mean(1)  # [B, D]"),
}  # fmt: skip
POOLING["moco"] = POOLING["byol"] = POOLING["simclr"]
POOLING["ijepa"] = POOLING["mae"]  # I-JEPA average-pools the patch tokens; [CLS] is no summary
POOLING["video_future"] = POOLING["video"]  # a VideoMAEModel too: no [CLS], mean of the tubes
POOLING["dino"] = ("the [CLS] token's final state (after the last layer norm), as DINO trained it",
                  "features = hidden[:, 0]  # [B, D]")  # fmt: skip
INPUT_CLASS = {"text": "AutoTokenizer", "image": "AutoImageProcessor",
               "video": "AutoImageProcessor", "audio": "AutoFeatureExtractor"}  # fmt: skip


def export(target: str, output: str) -> tuple[CheckpointRef, Path]:
    """Write the checkpoint `target` names as an export folder at `output`, all or nothing."""
    out = Path(output)
    _check_output(out)
    ref = reader.fetch(reader.locate(target))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        _write(ref, tmp)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ref, out


def _check_output(out: Path) -> None:
    """Refuse, before any work, an output that is neither new, empty nor an export."""
    if not out.exists():
        return
    if out.is_dir() and not any(out.iterdir()):
        return
    if out.is_dir() and ((out / EXPORT_RECORD).is_file() or (out / "config.json").is_file()):
        return  # an earlier export: replaced once the new one is complete
    raise ValueError(f"{out}: exists and is not an export folder; choose a new output folder")


def _write(ref: CheckpointRef, folder: Path) -> None:
    """Every file of the export into `folder`, its record last."""
    weights = reader.consolidated_state_dict(ref)
    encoder = load_encoder(ref, pretrained=True, state_dict=weights)
    encoder.save_pretrained(str(folder))
    reader.save_heads(ref, encoder, weights, folder)
    _save_inputs(ref, folder)
    (folder / "README.md").write_text(readme(ref, encoder))
    files = sorted(p.name for p in folder.iterdir())
    record = {**ref.meta, "tag": ref.tag, "export_files": files}
    (folder / EXPORT_RECORD).write_text(json.dumps(record, indent=1))
    for name in (*files, EXPORT_RECORD):  # on disk before the rename makes the folder visible
        with open(folder / name, "rb") as f:
            os.fsync(f.fileno())
    storage.fsync_dir(folder)


def _save_inputs(ref: CheckpointRef, folder: Path) -> None:
    """The tokenizer (text) or processor settings, from the checkpoint's own copy when it has
    one, else (older checkpoints) the dataset's tokenizer or the settings rebuilt from meta."""
    if ref.modality == "text":
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        from darkmatter.storage import read_bytes

        tok = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_str(read_bytes(ref.tokenizer_url).decode()),
            unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
            mask_token="[MASK]", model_max_length=int(ref.meta["data"]["seq_len"]),
        )  # fmt: skip
        tok.save_pretrained(str(folder))
    elif own := ref.asset(reader.PREPROCESSOR_FILE):
        shutil.copyfile(own, folder / reader.PREPROCESSOR_FILE)
    elif (processor := reader.preprocessor(ref.modality, ref.meta["data"])) is not None:
        processor.save_pretrained(str(folder))


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the complete export `tmp` to `out`; an earlier export there is moved aside first
    and deleted only once the new one is in place."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
        os.rename(out, old)
    os.rename(tmp, out)
    storage.fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old)


def readme(ref: CheckpointRef, encoder: Any) -> str:
    """The export's README.md: where it comes from, how to load it and how to pool."""
    loader = reader.encoder_class(encoder.config).__name__
    kwargs = reader.pooler_kwargs(encoder.config, encoder.state_dict())
    no_pooler = ", add_pooling_layer=False" if kwargs == {"add_pooling_layer": False} else ""
    inputs = INPUT_CLASS[ref.modality]
    how, code = POOLING[ref.meta["objective"]]
    run = ref.meta.get("mlflow_run_id") or "not tracked"
    pooler = (
        f"\nThe encoder has no pooler: no objective here trains one. `{loader}` would add an "
        "untrained one (and report its weights missing) without `add_pooling_layer=False`.\n"
        if no_pooler else ""
    )  # fmt: skip
    return f"""# {ref.meta["objective"]} encoder, step {ref.step}

Exported by `darkmatter export` from checkpoint {ref.tag} (MLflow run: {run}).

```python
import torch
from transformers import {inputs}, {loader}

model = {loader}.from_pretrained("PATH"{no_pooler}).eval()
prepare = {inputs}.from_pretrained("PATH")
inputs = prepare(...)  # text, images or clips: see transformers' {inputs}
with torch.no_grad():
    hidden = model(**inputs).last_hidden_state  # [B, T, D]
{code}
```
{pooler}
Features: {how}. `{HEADS_FILE}` holds the rest of the pretraining model, for
`model.init_from`; transformers ignores it.
"""


def register(ref: CheckpointRef, out: Path, name: str) -> Any:
    """Log the export `out` into ref's training run and register it as a version of `name`."""
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
    if ref.modality == "text":
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
        shutil.copy(out / HEADS_FILE, f"{tmp}/model/model/{HEADS_FILE}")
        # The flavour lays its files out its own way: its copy of the record lists none.
        record = json.loads((out / EXPORT_RECORD).read_text())
        record.pop("export_files", None)
        Path(f"{tmp}/model/model/{EXPORT_RECORD}").write_text(json.dumps(record, indent=1))
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
    if args.register:  # now, not after the export: MLflow's client retries for minutes
        from darkmatter.evaluation.runs import check_reachable

        check_reachable(os.environ.get("MLFLOW_TRACKING_URI", ""))
    ref, out = export(args.target, output)
    loader = reader.encoder_class(AutoConfig.from_pretrained(str(out))).__name__
    print(f"exported encoder to {out} (load with transformers.{loader}.from_pretrained); "
          f"{out / 'README.md'} says with which arguments, and how to pool")  # fmt: skip
    if args.register:
        v = register(ref, out, args.register)
        print(f"registered {args.register} version {v.version}: step {ref.step} of run "
              f"{v.run_id} (load with mlflow.transformers.load_model('models:/"
              f"{args.register}/{v.version}'))")  # fmt: skip
    return 0
