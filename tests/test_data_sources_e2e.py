"""The data users have, end to end: `darkmatter pretrain` at 2 ranks on a weighted mixture of a
prepared dataset, raw jsonl and .txt-only WebDataset shards written by webdataset's own
ShardWriter, all in the stack's S3 server; the raw sources are indexed in place at the start,
tokenized on the fly, packed by document; the run is stopped and resumed, and the per-source
counts reach MLflow."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from darkmatter import storage
from darkmatter.data_pipeline.prepare import prepare
from tests.helpers import run_darkmatter, synthetic_corpus, write_config

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

WEIGHTS = {"prepared": 0.5, "web": 0.3, "tars": 0.2}


def _txt_shards(lines: list[str], folder: Path, per_shard: int) -> list[Path]:
    """.txt-only shards in webdataset's own layout (its ShardWriter: key.txt members)."""
    import webdataset as wds

    folder.mkdir()
    with wds.ShardWriter(str(folder / "part-%05d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i, line in enumerate(lines):
            sink.write({"__key__": f"doc{i:06d}", "txt": line})
    return sorted(folder.glob("*.tar"))


def test_mixture_of_prepared_jsonl_and_foreign_shards_trains_resumes_and_counts(
    stack, bucket: str, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    corpus = synthetic_corpus(tmp_path / "corpus.txt", n=600)
    prepare([str(corpus)], f"{bucket}/prepared", modality="text", vocab_size=200)
    lines = corpus.read_text().splitlines()
    web = "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(lines[:300]))
    storage.write_bytes(f"{bucket}/web/part-0.jsonl", web.encode())
    for shard in _txt_shards(lines[300:], tmp_path / "tars", per_shard=100):
        storage.write_bytes(f"{bucket}/tars/{shard.name}", shard.read_bytes())
    with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(f"{bucket}/tars/part-00000.tar"))) as t:
        assert {m.name.rsplit(".", 1)[1] for m in t.getmembers()} == {"txt"}

    run_dir = tmp_path / "run"
    urls = {"prepared": f"{bucket}/prepared", "web": f"{bucket}/web/part-0.jsonl",
            "tars": f"{bucket}/tars/part-{{00000..00002}}.tar"}  # fmt: skip
    data = {
        "url": None, "sources": [{"name": n, "url": urls[n], "weight": w} for n, w in WEIGHTS.items()],
        "tokenizer": f"{bucket}/prepared/tokenizer.json", "pack": "documents", "pack_rows": 4,
        "partitions": 32, "num_workers": 1, "seq_len": 32, "shuffle_buffer": 16,
    }  # fmt: skip
    cfg = write_config(
        tmp_path / "c.yaml", "", run_dir, data=data,
        train={"steps": 4, "micro_batch_size": 8, "log_every": 2},
        checkpoint={"every": 4},
        tracking={"enabled": True, "experiment": "sources-e2e", "run_name": "mixture"},
    )  # fmt: skip
    raw = yaml.safe_load(cfg.read_text())
    del raw["data"]["url"]  # a mixture names its sources instead
    cfg.write_text(yaml.safe_dump(raw))

    first = run_darkmatter("pretrain", str(cfg), "--nproc", "2")
    assert first.returncode == 0, first.stderr[-4000:]
    for name in ("web", "tars"):  # indexed in place, never copied
        manifest = json.loads((run_dir / "data" / name / "manifest.json").read_text())
        assert manifest["root"].startswith(bucket), manifest["root"]
    assert not (run_dir / "data" / "prepared").exists()

    again = run_darkmatter("pretrain", str(cfg), "train.steps=8", "--nproc", "2")
    assert again.returncode == 0, again.stderr[-4000:]
    assert "resuming from" in again.stderr

    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    last = rows[-1]
    total = 8 * 16  # steps x global batch
    counts = {n: last[f"data/source/{n}/consumed"] for n in WEIGHTS}  # the whole run's
    assert sum(counts.values()) == total, counts
    since_resume = sum(last[f"data/source/{n}/samples"] for n in WEIGHTS)  # this job's
    assert since_resume == total // 2
    for n, w in WEIGHTS.items():  # handed out in chunks of world size x workers = 2 samples
        assert abs(counts[n] - w * total) <= 2, counts
    assert 0.5 < last["data/pack/efficiency"] <= 1.0
    assert last["data_skipped"] == 0

    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=stack.mlflow_uri)
    history = client.get_metric_history(run_id, "data/source/web/consumed")
    assert {m.step: m.value for m in history}[8] == counts["web"]
    assert client.get_metric_history(run_id, "data/pack/dropped_tokens")
