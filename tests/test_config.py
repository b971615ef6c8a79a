"""Config loading: types, unknown keys, overrides and batch arithmetic, each error naming its key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from darkmatter.trainer.config import (
    ConfigError,
    ModelConfig,
    batch_plan,
    data_sources,
    deepspeed_config,
    flatten,
    model_keys,
    to_dict,
)
from darkmatter.trainer.objectives import OBJECTIVES, load_config, settings_class

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
    examples = {p.stem: load_config(p) for p in (REPO / "configs" / "examples").glob("*.yaml")}
    mix = data_sources(examples["text_mixture"].data)
    assert [(s.name, s.weight) for s in mix] == [("web", 0.5), ("wiki", 0.3), ("books", 0.2)]
    assert [s.format for s in mix] == ["auto", "parquet", "auto"]
    assert examples["text_mixture"].data.pack == "documents"
    assert data_sources(examples["laion_in_place"].data)[0].url.endswith("{00000..09999}.tar")


@pytest.mark.parametrize(
    "data, message",
    [
        (
            "{url: a, sources: [{name: x, url: b}]}",
            "data.url: give either data.url or data.sources",
        ),
        (
            "{sources: [{name: x, url: a}, {name: x, url: b}]}",
            "data.sources[1].name: 'x' names two",
        ),
        ("{sources: [{name: x, url: a, weight: 0}]}", "data.sources[0].weight: expected > 0"),
        ("{sources: [{name: 'a b', url: a}]}", "data.sources[0].name: expected letters"),
        ("{sources: [{name: x, url: a, format: csv}]}", "data.sources[0].format: expected one of"),
        ("{sources: {name: x}}", "data.sources: expected a list"),
        ("{sources: [{url: a}]}", "data.sources[0].name: required key is missing"),
        ("{url: a, pack: rows}", "data.pack: expected one of none, documents"),
    ],
)
def test_source_errors_name_the_key(tmp_path: Path, data: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, f"objective: mlm\ndata: {data}\ntrain: {{steps: 1}}\n"))
    assert message in str(e.value)


def test_task_files_load() -> None:
    from darkmatter.evaluation.tasks import load_tasks

    names = []
    for tasks in sorted((REPO / "configs" / "tasks").glob("*.yaml")):
        for spec in load_tasks(str(tasks)):
            assert set(spec.protocols) == {"linear_probe", "knn"}, tasks
            names.append(spec.name)
    assert {"wordnet_supersenses", "fortunes_topics", "digits"} <= set(names)


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
        (
            "objective: mlm\ntrain: {steps: 1}\n",
            None,
            "data.url: give either data.url or data.sources (a mixture), not neither",
        ),
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
     ("simclr", None)],
)  # fmt: skip
def test_mask_ratio_defaults_to_the_objectives_own(
    tmp_path: Path, objective: str, expected: float | None
) -> None:
    """Unset (or 0), model.mask_ratio is the objective's paper's share (MAE hiding 15% like BERT
    would be a silent mistake), and that is the value logged; set, it is the user's; an
    objective that masks nothing has no such key."""
    text = BASE.replace("objective: mlm", f"objective: {objective}")
    cfg = load_config(write(tmp_path, text))
    if expected is None:
        assert not hasattr(cfg.objective_settings, "mask_ratio")
        with pytest.raises(
            ConfigError, match=f"model.mask_ratio: unknown key for objective {objective}"
        ):
            load_config(write(tmp_path, text), ["model.mask_ratio=0.5"])
        return
    assert cfg.objective_settings.mask_ratio == expected  # type: ignore[attr-defined]
    assert flatten(to_dict(cfg))["model.mask_ratio"] == expected
    zero = load_config(write(tmp_path, text), ["model.mask_ratio=0"])
    assert zero.objective_settings.mask_ratio == expected  # type: ignore[attr-defined]
    chosen = load_config(write(tmp_path, text), ["model.mask_ratio=0.5"])
    assert chosen.objective_settings.mask_ratio == 0.5  # type: ignore[attr-defined]
    assert flatten(to_dict(chosen))["model.mask_ratio"] == 0.5


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
    # grad_accum 0 with a global batch: the accumulation follows the number of ranks.
    held = load_config(write(tmp_path, BASE), ["train.grad_accum=0", "train.global_batch_size=16"])
    assert [batch_plan(held, w).grad_accum for w in (1, 2, 4)] == [4, 2, 1]
    with pytest.raises(ConfigError, match=r"train.global_batch_size: 16 is not a multiple of "
                       r"4 micro × 8 ranks = 32 \(change train.micro_batch_size"):  # fmt: skip
        batch_plan(held, 8)
    alone = load_config(write(tmp_path, BASE), ["train.grad_accum=0"])
    assert batch_plan(alone, 2).grad_accum == 1  # no global batch: 1
    with pytest.raises(ConfigError, match="train.grad_accum: expected >= 0"):
        load_config(write(tmp_path, BASE), ["train.grad_accum=-1"])
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
        "darkmatter pretrain: error: train_typo: unknown key (known here: checkpoint, data, deepspeed, faults, model, objective, storage, tracking, train)"
    ]


def test_each_objective_takes_its_own_model_keys(tmp_path: Path) -> None:
    """`model:` holds the common keys and the chosen objective's settings: a key of another
    objective is refused naming the key and the objective; the objective that owns it takes it,
    and dumps and MLflow params keep its name under `model.`."""
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, BASE), ["model.momentum=0.99"])
    assert str(e.value).startswith(
        "model.momentum: unknown key for objective mlm (known here: attention, dropout, "
        "hidden_size, init_from, intermediate_size, mask_ratio, num_heads, num_layers, "
        "whole_word_masking)"
    )
    byol = BASE.replace("objective: mlm", "objective: byol") + "model: {momentum: 0.99}\n"
    cfg = load_config(write(tmp_path, byol), ["model.num_layers=3"])
    assert cfg.objective_settings.momentum == 0.99  # type: ignore[attr-defined]
    assert cfg.model.num_layers == 3
    params = flatten(to_dict(cfg))
    assert params["model.momentum"] == 0.99 and params["model.num_layers"] == 3
    with pytest.raises(ConfigError, match=r"model.momentum: expected in \[0, 1\), got 1.5"):
        load_config(write(tmp_path, byol), ["model.momentum=1.5"])
    with pytest.raises(ConfigError, match="model.momentum: expected a number, got 'high'"):
        load_config(write(tmp_path, byol), ["model.momentum=high"])
    # `lr: 1e-3` is a string to PyYAML (YAML 1.1 wants 1.0e-3); a number here, as users mean it.
    text = byol.replace("grad_accum: 2}", "grad_accum: 2, lr: 1e-3}")
    assert yaml.safe_load(text)["train"]["lr"] == "1e-3"
    cfg = load_config(write(tmp_path, text), ["model.momentum=9.9E-1"])
    assert cfg.train.lr == 0.001 and cfg.objective_settings.momentum == 0.99  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="train.lr: expected a number, got '1e-3x'"):
        load_config(write(tmp_path, byol), ["train.lr=1e-3x"])


def test_settings_are_dataclasses_beside_their_objectives() -> None:
    """Every objective's settings class: its own fields only (none shadows a common key), each
    with a one-line-or-more docstring in its source, and defaults for all of them."""
    import ast
    import dataclasses
    import inspect

    common = {f.name for f in dataclasses.fields(ModelConfig)}
    for name, objective in OBJECTIVES.items():
        settings = settings_class(name)
        assert settings is objective.settings_class
        fields = [f.name for f in dataclasses.fields(settings)]
        assert not common.intersection(fields), (name, common.intersection(fields))
        assert model_keys(settings) == [*(f.name for f in dataclasses.fields(ModelConfig)), *fields]
        settings()  # every field has a default
        documented: set[str] = set()
        for cls in settings.__mro__:
            if not dataclasses.is_dataclass(cls):
                continue
            body = ast.parse(inspect.getsource(cls)).body[0].body  # type: ignore[attr-defined]
            for stmt, after in zip(body, body[1:], strict=False):
                if isinstance(stmt, ast.AnnAssign) and isinstance(after, ast.Expr):
                    documented.add(stmt.target.id)  # type: ignore[union-attr]
        assert documented.issuperset(fields), (name, set(fields) - documented)
        if objective.default_mask_ratio is not None:
            assert "mask_ratio" in fields, name


def test_dry_run_keeps_each_settings_name_and_value(capsys: pytest.CaptureFixture[str]) -> None:
    """The MAE preset's dry run: the model section holds the common keys, then MAE's own, with
    the names and values it showed when one flat ModelConfig held every objective's fields (the
    keys no objective but another read, such as tubelet_size or momentum, are gone). What it
    prints loads back to the same config."""
    from darkmatter.cli import pretrain_main

    assert pretrain_main([str(REPO / "configs" / "quickstart_mae.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    section = out.split("\nmodel:\n", 1)[1].split("\ntracking:\n", 1)[0]
    assert section.splitlines() == [
        "  hidden_size: 128", "  num_layers: 2", "  num_heads: 2", "  intermediate_size: 512",
        "  dropout: 0.1", "  attention: sdpa", "  init_from: ''",
        "  patch_size: 4", "  decoder_hidden_size: 64", "  decoder_num_layers: 1",
        "  decoder_num_heads: 0", "  mask_ratio: 0.75",
    ]  # fmt: skip


@pytest.mark.parametrize("preset", sorted((REPO / "configs").glob("quickstart_*.yaml")), ids=str)
def test_resolved_config_loads_back(tmp_path: Path, preset: Path) -> None:
    """What the dry run and the config.yaml artifact write (to_dict) is a config that loads to
    the same values: the objective's settings go back to it, the common keys to ModelConfig."""
    import yaml

    cfg = load_config(preset)
    again = load_config(write(tmp_path, yaml.safe_dump(to_dict(cfg), sort_keys=False)))
    assert to_dict(again) == to_dict(cfg)
    assert type(again.objective_settings) is settings_class(cfg.objective)


def test_config_never_imports_the_objectives() -> None:
    """Imports point one way: the objectives import trainer.config; config, and whatever it
    imports (in functions too), never imports the objectives."""
    import ast

    seen, todo = set(), ["darkmatter.trainer.config"]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")[1:]  # darkmatter.trainer.config -> trainer/config.py
        path = REPO.joinpath(*parts).with_suffix(".py")
        if not path.is_file():
            path = REPO.joinpath(*parts, "__init__.py")
        if not path.is_file():
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                todo += [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                todo += [a.name for a in node.names]
        todo = [m for m in todo if m.startswith("darkmatter.")]
    assert not [m for m in seen if m.startswith("darkmatter.trainer.objectives")]
