"""Config loading: types, unknown keys, overrides and batch arithmetic, each error naming its key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from darkmatter.trainer.config import (
    ConfigError,
    batch_plan,
    deepspeed_config,
    flatten,
    load_config,
    to_dict,
)

REPO = Path(__file__).resolve().parents[1]
BASE = """
objective: mlm
data: {url: s3://bucket/ds}
train: {steps: 10, micro_batch_size: 4, grad_accum: 2}
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_presets_load() -> None:
    for preset in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(preset)
        assert cfg.train.steps > 0, preset
    from darkmatter.evaluation.tasks import load_tasks

    for tasks in sorted((REPO / "configs" / "tasks").glob("*.yaml")):
        (spec,) = load_tasks(str(tasks))
        assert set(spec.protocols) == {"linear_probe", "knn"}, tasks


def test_defaults_and_overrides(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, BASE), ["train.lr=0.01", "model.num_layers=3", "train.bf16=true"]
    )
    assert cfg.train.lr == 0.01 and cfg.model.num_layers == 3 and cfg.train.bf16 is True
    assert cfg.data.seq_len == 128  # default
    assert flatten(to_dict(cfg))["train.steps"] == 10


@pytest.mark.parametrize(
    "text, override, message",
    [
        (BASE + "bogus: 1\n", None, "bogus: unknown key"),
        (BASE, "train.stpes=5", "train.stpes: unknown key"),
        (BASE, "train.steps=ten", "train.steps: expected an integer, got 'ten'"),
        (BASE, "train.zero_stage=5", "train.zero_stage: expected 0-3, got 5"),
        (BASE, "train.bf16=1", "train.bf16: expected true/false"),
        (BASE, "objective=simclrr", "objective: unknown 'simclrr'"),
        (BASE, "model.mask_ratio=1.5", "model.mask_ratio: expected in (0, 1)"),
        ("objective: mlm\ndata: {url: x}\n", None, "train.steps: required key is missing"),
        ("objective: mlm\ntrain: {steps: 1}\n", None, "data.url: required key is missing"),
        (BASE, "trainsteps", "expected KEY=VALUE"),
        (BASE, "train.ckpt_every=5", "train.ckpt_every: unknown key"),  # now checkpoint.every
        (BASE, "checkpoint.keep_last=0", "checkpoint.keep_last: expected >= 1, got 0"),
        (BASE, "faults.signals=SIGTERM,SIGFOO", "faults.signals: 'SIGFOO' is not a signal name"),
        (BASE, "faults.grace_s=-1", "faults.grace_s: expected >= 0, got -1.0"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, override: str | None, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text), [override] if override else [])
    assert message in str(e.value)


@pytest.mark.parametrize(
    ("objective", "expected"),
    [("mlm", 0.15), ("span", 0.15), ("mae", 0.75), ("video", 0.9), ("wav2vec2", 0.65),
     ("simclr", 0.0)],
)  # fmt: skip
def test_mask_ratio_defaults_to_the_objectives_own(
    tmp_path: Path, objective: str, expected: float
) -> None:
    """Unset, model.mask_ratio is the objective's paper's share (MAE hiding 15% like BERT would
    be a silent mistake); set, it is the user's; an objective that masks nothing keeps 0."""
    text = BASE.replace("objective: mlm", f"objective: {objective}")
    assert load_config(write(tmp_path, text)).model.mask_ratio == expected
    if expected:
        chosen = load_config(write(tmp_path, text), ["model.mask_ratio=0.5"])
        assert chosen.model.mask_ratio == 0.5


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    p = write(tmp_path, "objective: mlm\ndata: {url: [unclosed\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: line \d+ malformed YAML"):
        load_config(p)


def test_batch_arithmetic(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE))
    assert batch_plan(cfg, 2).global_batch_size == 16
    ds = deepspeed_config(cfg, 2)
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == 2
    bad = load_config(write(tmp_path, BASE), ["train.global_batch_size=10"])
    with pytest.raises(
        ConfigError,
        match=r"train.global_batch_size: 10 contradicts 4 micro × 2 accumulation × 2 ranks = 16",
    ):
        deepspeed_config(bad, 2)
    clash = load_config(write(tmp_path, BASE), ["deepspeed.zero_optimization.stage=3"])
    with pytest.raises(ConfigError, match="deepspeed.zero_optimization.stage: 3 contradicts"):
        deepspeed_config(clash, 2)


def test_dry_run_prints_everything_and_starts_nothing(tmp_path: Path) -> None:
    p = write(tmp_path, BASE)
    out = subprocess.run(
        [sys.executable, "-m", "darkmatter.cli", "pretrain", str(p), "--nproc", "2", "--dry-run", "train.lr=0.002"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "lr: 0.002" in out.stdout
    assert '"train_batch_size": 16' in out.stdout
    assert "4 micro × 2 accumulation × 2 ranks = 16 global batch" in out.stdout


def test_cli_config_error_is_one_line(tmp_path: Path) -> None:
    p = write(tmp_path, BASE + "train_typo: 1\n")
    out = subprocess.run(
        [sys.executable, "-m", "darkmatter.cli", "pretrain", str(p)],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 2
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert lines == [
        "darkmatter pretrain: error: train_typo: unknown key (known here: checkpoint, data, deepspeed, faults, model, objective, tracking, train)"
    ]
