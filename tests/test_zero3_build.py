"""ZeRO-3 builds the model partitioned: on 2 ranks (gloo, one launch for every check), each rank
holds about half of every objective's parameters right after construction, the partitioned
weights are exactly those of a whole (ZeRO-0/1/2) build of the same seed, weight decay is grouped
by the real shapes, the built model trains, and `model.init_from` loads an export into the
partitioned model."""

from __future__ import annotations

import faulthandler
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

# Every objective ZeRO-3 accepts (byol and moco are refused: their EMA teacher), tiny.
OBJECTIVES = ("mlm", "clm", "span", "mae", "simclr", "video", "wav2vec2")
MODEL = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64,
         "decoder_hidden_size": 32, "projection_dim": 32, "conv_dim": 32, "codevectors": 16,
         "num_negatives": 4, "mask_length": 2, "dropout": 0.0}  # fmt: skip


def _config(name: str, stage: int, run_dir: Path) -> Any:
    import yaml

    from darkmatter.trainer.config import model_keys
    from darkmatter.trainer.objectives import load_config, settings_class

    keys = model_keys(settings_class(name))  # each objective takes its own of MODEL's keys
    raw = {"objective": name,
           "data": {"url": "unused", "seq_len": 32, "image_size": 16, "num_frames": 4,
                    "audio_seconds": 0.2},
           "model": {k: v for k, v in MODEL.items() if k in keys},
           "train": {"steps": 10, "micro_batch_size": 2, "zero_stage": stage, "warmup_steps": 1,
                     "run_dir": str(run_dir)},
           "tracking": {"enabled": False}}  # fmt: skip
    path = run_dir / f"{name}-{stage}-{os.environ['RANK']}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


def _bytes(params: list[torch.nn.Parameter]) -> tuple[int, int]:
    """(bytes this rank holds, bytes of the whole tensors), each parameter once."""
    held = whole = 0
    for p in {id(p): p for p in params}.values():
        local = p.ds_tensor if hasattr(p, "ds_tensor") else p.data
        held += local.numel() * local.element_size() + (
            p.data.numel() * p.element_size() if hasattr(p, "ds_tensor") else 0
        )
        whole += int(getattr(p, "ds_numel", p.numel())) * p.element_size()
    return held, whole


def _worker(rank: int, port: int, out: str, text_meta: dict[str, Any]) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    faulthandler.enable()  # a native abort prints where each thread was
    import deepspeed

    from darkmatter.trainer import engine as eng
    from darkmatter.trainer.config import deepspeed_config
    from darkmatter.trainer.objectives import OBJECTIVES as REGISTRY

    eng.init_distributed()
    results: dict[str, Any] = {}
    for name in OBJECTIVES:
        meta = text_meta if REGISTRY[name].modality == "text" else {}
        whole_cfg = _config(name, 2, Path(out))
        objective = REGISTRY[name](whole_cfg, meta)
        torch.manual_seed(whole_cfg.train.seed)  # what build_engine does before building
        whole = objective.build_model()
        expected = {k: v.detach().clone() for k, v in whole.named_parameters()}
        groups = [len(g["params"]) for g in eng.param_groups(whole, 0.01)]
        del whole

        cfg = _config(name, 3, Path(out))
        objective = REGISTRY[name](cfg, meta)
        seen: dict[str, Any] = {}

        def build(
            objective: Any = objective, seen: dict[str, Any] = seen,
            expected: dict[str, torch.Tensor] = expected,
        ) -> Any:  # fmt: skip
            model = objective.build_model()
            seen["held"], seen["whole"] = _bytes(list(model.parameters()))
            seen["groups"] = [len(g["params"]) for g in eng.param_groups(model, 0.01)]
            differ = []
            for key, p in model.named_parameters():
                with deepspeed.zero.GatheredParameters([p]):
                    if not torch.equal(p.data, expected[key]):
                        differ.append(key)
            seen["differ"] = differ
            return model

        engine, hf_ds = eng.build_engine(cfg, deepspeed_config(cfg, 2), build)
        results[name] = {**seen, "whole_groups": groups}
        if name == "mlm":  # one step of the built engine
            g = torch.Generator().manual_seed(rank)
            ids = torch.randint(5, int(meta["vocab_size"]), (2, 32), generator=g)
            labels = ids.masked_fill(torch.rand(ids.shape, generator=g) > 0.3, -100)
            loss = engine(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
            engine.backward(loss)
            engine.step()
            results[name]["loss"] = float(loss)
            results[name]["steps"] = engine.global_steps
        engine.destroy()
        del engine, hf_ds
    results["init_from"] = _init_from_partitioned(Path(out), rank, text_meta)
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    eng.shutdown(together=True)


def _init_from_partitioned(out: Path, rank: int, meta: dict[str, Any]) -> list[str]:
    """model.init_from under ZeRO-3: an encoder folder and its heads (as `darkmatter export`
    writes them, from a whole model of another seed) loaded into the partitioned model. Returns
    the names of the engine's weights that differ from the source's."""
    import deepspeed
    from safetensors.torch import save_file

    from darkmatter.trainer import engine as eng
    from darkmatter.trainer.checkpoint_reader import HEADS_FILE
    from darkmatter.trainer.config import deepspeed_config
    from darkmatter.trainer.objectives import OBJECTIVES as REGISTRY

    cfg = _config("mlm", 3, out)
    torch.manual_seed(7)
    source = REGISTRY["mlm"](cfg, meta).build_model()
    folder = out / "export"
    if rank == 0:
        source.bert.save_pretrained(str(folder))
        seen = {v.data_ptr() for v in source.bert.state_dict().values()}
        heads = {}
        for k, v in source.state_dict().items():
            if not k.startswith("bert.") and v.data_ptr() not in seen:  # tied weights once
                heads[k] = v
                seen.add(v.data_ptr())
        save_file(heads, str(folder / HEADS_FILE))
        (folder / "darkmatter.json").write_text(json.dumps({"objective": "mlm"}))
    eng.barrier()
    cfg.model.init_from = str(folder)
    objective = REGISTRY["mlm"](cfg, meta)
    engine, hf_ds = eng.build_engine(cfg, deepspeed_config(cfg, 2), objective.build_model)
    want = source.state_dict()
    differ = []
    for key, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            if not torch.equal(p.data, want[key]):
                differ.append(key)
    engine.destroy()
    return differ


@pytest.mark.distributed
def test_zero3_builds_every_objective_partitioned_with_the_whole_builds_weights(
    text_ds: str, tmp_path: Path
) -> None:
    from darkmatter.trainer.config import Config, DataConfig, TrainConfig
    from darkmatter.trainer.objectives.mlm import MLMSettings
    from darkmatter.trainer.train import dataset_meta
    from tests.helpers import free_port

    meta = dataset_meta(Config(objective="mlm", data=DataConfig(url=text_ds),
                               train=TrainConfig(steps=1), objective_settings=MLMSettings()))  # fmt: skip
    mp.spawn(_worker, args=(free_port(), str(tmp_path), meta), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for name in OBJECTIVES:
        for r in ranks:
            got = r[name]
            # Right after construction each rank holds its half (partitions are padded to equal
            # sizes, so a little more), never the whole model.
            assert got["held"] <= 1.15 * got["whole"] / 2, (name, got["held"], got["whole"])
            assert got["differ"] == [], (name, got["differ"][:5])
            assert got["groups"] == got["whole_groups"], name  # decay grouped by ds_shape
    assert [r["init_from"] for r in ranks] == [[], []]  # every weight of the export, partitioned
    losses = [r["mlm"]["loss"] for r in ranks]
    assert all(0 < x < 10 for x in losses) and [r["mlm"]["steps"] for r in ranks] == [1, 1]
