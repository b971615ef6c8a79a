"""No code from checkpoint data: a checkpoint file whose unpickling would run code (its pickle
calls `exec`, which writes a marker file) is refused, with one line naming the file, wherever
it would be loaded: consolidation under ZeRO (DeepSpeed's zero_to_fp32), the ZeRO-0 module file,
DeepSpeed's universal converter (a subprocess) and a resume (DeepSpeed's engine loader). The
marker is never written. Also: the converter's worker count and timeout are config, and a
timeout is a clear error."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from darkmatter.cli import main
from darkmatter.trainer import checkpoint as ckpt
from darkmatter.trainer import checkpoint_reader as reader
from tests.helpers import run_darkmatter, write_config

TAG = "step00000003"
OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


class Exploit:
    """Pickles as a call to `exec` that writes `marker`: what a hostile checkpoint holds."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",))


def hostile(path: Path, marker: Path) -> Path:
    """A torch.save file (zip format, as DeepSpeed's) whose module state runs code on loading."""
    torch.save({"module": {"w": torch.zeros(2)}, "extra": Exploit(marker)}, path)
    return path


def commit(folder: Path) -> None:
    """A commit record that lists (and so vouches for) every file of the folder, as an attacker
    who can write the checkpoint can write one too."""
    files = {p.name: {"size": p.stat().st_size, "sha256": ckpt.sha256_file(p)}
             for p in sorted(folder.iterdir()) if p.name != ckpt.COMMIT}  # fmt: skip
    record = {"version": ckpt.COMMIT_VERSION, "tag": folder.name, "step": ckpt.step_of(folder.name),
              "world_size": 1, "committed_at": "2026-01-01T00:00:00Z", "files": files}  # fmt: skip
    (folder / ckpt.COMMIT).write_text(json.dumps(record))


def crafted(root: Path, zero_stage: int, marker: Path) -> Path:
    """A committed checkpoint of a tiny BERT whose weight files are hostile: DeepSpeed's
    module file (what every loader reads first) and, under ZeRO, its optimizer partition."""
    from transformers import BertConfig

    folder = root / TAG
    folder.mkdir(parents=True)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64)  # fmt: skip
    (folder / "model_config.json").write_text(config.to_json_string())
    meta = {"objective": "mlm", "step": 3, "zero_stage": zero_stage, "modality": "text",
            "tokenizer": "", "data": {"seq_len": 8}, "assets": []}  # fmt: skip
    (folder / "darkmatter.json").write_text(json.dumps(meta))
    hostile(folder / reader.ZERO0_WEIGHTS, marker)
    if zero_stage:
        hostile(folder / OPTIM, marker)
    commit(folder)
    return folder


def one_error_line(capsys: pytest.CaptureFixture[str], command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith(f"darkmatter {command}: error: "), err[-5:]
    return err[-1]


def test_the_crafted_file_runs_code_when_unpickled_without_weights_only(tmp_path: Path) -> None:
    """The control: what the other tests refuse really is hostile."""
    marker = tmp_path / "ran"
    path = hostile(tmp_path / "x.pt", tmp_path / "ran")
    torch.load(path, weights_only=False)
    assert marker.read_text() == "code ran"


def test_export_refuses_a_hostile_zero_partition(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Consolidation (DeepSpeed's zero_to_fp32 passes weights_only=False) is forced to
    weights_only: refused, the file named, nothing written."""
    marker = tmp_path / "ran"
    folder = crafted(tmp_path / "ckpts", zero_stage=2, marker=marker)
    assert main(["export", str(folder), str(tmp_path / "out")]) == 2
    line = one_error_line(capsys, "export")
    assert f"{folder / reader.ZERO0_WEIGHTS}: refused to load: it would call exec" in line
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpts"]  # no OUT, no partial folder


def test_evaluate_refuses_a_hostile_module_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "ran"
    folder = crafted(tmp_path / "ckpts", zero_stage=0, marker=marker)
    task = tmp_path / "task.parquet"
    pq.write_table(pa.table({"text": ["a b", "c d"] * 10, "label": [0, 1] * 10}), task)
    assert main(["evaluate", str(folder), "--task", str(task), "--no-mlflow"]) == 2
    line = one_error_line(capsys, "evaluate")
    assert f"{folder / reader.ZERO0_WEIGHTS}: refused to load: it would call exec" in line
    assert not marker.exists()


def test_universal_conversion_refuses_a_hostile_partition(tmp_path: Path) -> None:
    """DeepSpeed's converter runs in a subprocess whose every torch.load is forced to
    weights_only (the variable was stripped from its environment before)."""
    from darkmatter.trainer import engine as eng

    marker = tmp_path / "ran"
    folder = crafted(tmp_path / "ckpts", zero_stage=2, marker=marker)
    with pytest.raises(reader.UnsafeCheckpoint, match="it would call exec") as e:
        eng.to_universal(folder, tmp_path / "universal" / TAG)
    assert str(e.value).split(":")[0] in (str(folder / reader.ZERO0_WEIGHTS), str(folder / OPTIM))
    assert not marker.exists()


def test_universal_conversion_timeout_is_a_clear_error(tmp_path: Path) -> None:
    import psutil

    from darkmatter.trainer import engine as eng

    folder = crafted(tmp_path / "ckpts", zero_stage=2, marker=tmp_path / "ran")
    t0 = time.monotonic()
    with pytest.raises(reader.CheckpointError, match=r"universal_timeout_s=0.5 s \(stopped\)"):
        eng.to_universal(folder, tmp_path / "universal" / TAG, workers=2, timeout_s=0.5)
    assert time.monotonic() - t0 < 10  # killed, not waited for

    def cmdline(p: psutil.Process) -> str:
        try:
            return " ".join(p.cmdline())
        except psutil.Error:  # exited, or a zombie (another test's child not reaped yet): dead
            return ""

    left = [p for p in psutil.Process().children(recursive=True)
            if "ds_to_universal" in cmdline(p)]  # fmt: skip
    assert left == []  # the converter and its pool of workers are gone


@pytest.mark.parametrize(
    ("override", "message"),
    [("checkpoint.universal_workers=0", "checkpoint.universal_workers: expected >= 1, got 0"),
     ("checkpoint.universal_timeout_s=0", "checkpoint.universal_timeout_s: expected > 0, got 0")],
)  # fmt: skip
def test_universal_settings_are_checked(tmp_path: Path, override: str, message: str) -> None:
    from darkmatter.trainer.config import ConfigError
    from darkmatter.trainer.objectives import load_config

    cfg = write_config(tmp_path / "c.yaml", "unused", tmp_path / "run")
    assert load_config(cfg, ["checkpoint.universal_workers=3"]).checkpoint.universal_workers == 3
    with pytest.raises(ConfigError, match=message):
        load_config(cfg, [override])


@pytest.mark.slow  # two `darkmatter pretrain` processes: ~30 s
def test_resume_refuses_a_hostile_module_file(text_ds: str, tmp_path: Path) -> None:
    """A real run's checkpoint whose module file is replaced (and its commit record with it):
    the resume (DeepSpeed's engine loader) refuses it with one line and runs nothing."""
    marker = tmp_path / "ran"
    cfg = write_config(tmp_path / "c.yaml", text_ds, tmp_path / "run",
                       train={"zero_stage": 0, "steps": 3}, checkpoint={"every": 3})  # fmt: skip
    out = run_darkmatter("pretrain", str(cfg))
    assert out.returncode == 0, out.stderr[-3000:]
    folder = tmp_path / "run/checkpoints" / TAG
    hostile(folder / reader.ZERO0_WEIGHTS, marker)
    commit(folder)
    out = run_darkmatter("pretrain", str(cfg), "train.steps=6")
    assert out.returncode == 2, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last == (f"darkmatter pretrain: error: {folder / reader.ZERO0_WEIGHTS}: refused to "
                    "load: it would call exec; checkpoint files may hold only tensors "
                    "and plain data (weights_only=True)"), last  # fmt: skip
    assert not marker.exists()


def test_the_watching_harness_tags_a_hostile_checkpoint_and_goes_on(
    stack: Any, tmp_path: Path
) -> None:
    """In watch mode a refused file is one corrupt checkpoint (tagged on its run), not the end
    of the evaluator."""
    from mlflow.tracking import MlflowClient

    from darkmatter.evaluation.harness import Harness, Pending
    from darkmatter.evaluation.tasks import load_tasks

    marker = tmp_path / "ran"
    folder = crafted(tmp_path / "ckpts", zero_stage=2, marker=marker)
    task = tmp_path / "task.parquet"
    pq.write_table(pa.table({"text": ["a b", "c d"] * 10, "label": [0, 1] * 10}), task)
    spec = tmp_path / "tasks.yaml"
    spec.write_text(f"tasks:\n  - name: t\n    data: {task}\n    label: label\n")
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment(f"hostile-{time.time_ns()}")).info.run_id
    harness = Harness(client, load_tasks(str(spec)), state=str(tmp_path / "state"),
                      cache_dir=str(tmp_path / "cache"))  # fmt: skip
    pending = Pending(run_id, TAG, 3, str(folder), str(folder.parent))
    assert harness.process(pending) == "corrupt"
    tag = client.get_run(run_id).data.tags[f"eval.{TAG}"]
    assert tag.startswith("corrupt: ") and "refused to load: it would call exec" in tag
    assert not marker.exists()


def test_a_hostile_rng_file_is_refused_by_name(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    (tmp_path / "trainer_state_rank0.json").write_text(json.dumps({"version": ckpt.STATE_VERSION}))
    torch.save(
        {"torch": torch.get_rng_state(), "extra": Exploit(marker)}, tmp_path / "rng_rank0.pt"
    )
    with pytest.raises(ckpt.CheckpointError, match=r"rng_rank0\.pt: refused to load"):
        ckpt.read_rank_state(tmp_path, 0)
    assert not marker.exists()
