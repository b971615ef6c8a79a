"""The evaluator reads checkpoints only under its trusted roots: a run's `checkpoints/index.json`
(data anyone with write access to the run can change) that points elsewhere, on a local folder
or on the stack's real S3 server, is refused, named in the log and in the run's tags, and
nothing is read from it; the run's own checkpoints are still followed."""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from darkmatter import storage
from darkmatter.evaluation.cli import parser
from darkmatter.evaluation.harness import Harness, Pending, _refusal, within
from darkmatter.evaluation.tasks import TaskSpec

SPEC = TaskSpec(name="toy", data="unused.parquet")


@pytest.mark.parametrize(
    ("uri", "root", "inside"),
    [
        ("s3://b/ckpt/step1", "s3://b/ckpt", True),
        ("s3://b/ckpt", "s3://b/ckpt/", True),
        ("S3://b/ckpt/step1", "s3://b/ckpt", True),
        ("s3://b/ckpt-evil/step1", "s3://b/ckpt", False),  # a sibling sharing the prefix
        ("s3://b/ckpt/../other/step1", "s3://b/ckpt", False),
        ("s3://b//ckpt/./step1", "s3://b/ckpt", True),
        ("s3://other/ckpt/step1", "s3://b/ckpt", False),
        ("gs://b/ckpt/step1", "s3://b/ckpt", False),
        ("/data/ckpt/step1", "s3://data/ckpt", False),
        ("file:///data/ckpt/step1", "/data/ckpt", True),
        ("/data/ckpt/./step1", "file:///data/ckpt", True),
        ("/data/ckpt/../etc", "/data/ckpt", False),
        ("/data/ckpt2", "/data/ckpt", False),
        ("runs/a/checkpoints/step1", "runs/a/checkpoints", True),
        ("mlflow-artifacts:/1/abc/artifacts/x", "mlflow-artifacts:/1/abc/artifacts", True),
    ],
)
def test_within(uri: str, root: str, inside: bool) -> None:
    assert within(uri, root) is inside


def test_a_symlink_out_of_a_root_is_outside_it(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "root" / "step1").symlink_to(tmp_path / "elsewhere")
    assert not within(str(tmp_path / "root" / "step1"), str(tmp_path / "root"))
    assert within(str(tmp_path / "root" / "step2"), str(tmp_path / "root"))


def test_refusal_names_the_uri_and_rejects_odd_tags() -> None:
    roots = ["s3://b/ckpt"]
    assert _refusal("step1", ["s3://b/ckpt", "s3://b/ckpt/step1"], roots) == ""
    why = _refusal("step1", ["s3://b/ckpt", "s3://x/step1"], roots)
    assert (
        why == "s3://x/step1 is outside the trusted roots (s3://b/ckpt; evaluation.trusted_roots)"
    )
    assert "not a plain name" in _refusal("../../x", ["s3://b/ckpt/x"], roots)


def test_default_roots_are_the_runs_own_and_the_option_replaces_them() -> None:
    info = SimpleNamespace(artifact_uri="mlflow-artifacts:/1/abc/artifacts")
    run = SimpleNamespace(info=info, data=SimpleNamespace(params={
        "checkpoint.root": "", "train.run_dir": "runs/x"}))  # fmt: skip
    assert Harness(None, [SPEC]).roots(run) == ["runs/x/checkpoints", info.artifact_uri]
    run.data.params["checkpoint.root"] = "s3://b/ckpt"
    assert Harness(None, [SPEC]).roots(run) == ["s3://b/ckpt", info.artifact_uri]
    pinned = Harness(None, [SPEC], trusted_roots=("s3://team/ckpt",))
    assert pinned.roots(run) == ["s3://team/ckpt"]
    args = parser().parse_args(["--watch", "e", "--trusted-root", "s3://a", "--trusted-root", "/b"])
    assert args.trusted_root == ["s3://a", "/b"]


# -- a malicious index in a real MLflow run --------------------------------------------------


class Spy:
    """Every URL the storage layer opens, and every checkpoint the harness locates."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import darkmatter.storage.conditional as conditional
        import darkmatter.storage.fs as fs
        from darkmatter.evaluation import harness

        self.urls: list[str] = []
        self.located: list[str] = []
        real_fs, real_locate = fs.filesystem, harness.reader.locate

        def filesystem(url: str) -> Any:
            self.urls.append(url)
            return real_fs(url)

        def locate(target: str) -> Any:
            self.located.append(target)
            return real_locate(target)

        for module in (fs, conditional, storage):
            monkeypatch.setattr(module, "filesystem", filesystem)
        monkeypatch.setattr(harness.reader, "locate", locate)


def _run(client: Any, exp: str, param_root: str, index: dict[str, Any] | str) -> str:
    exp_id = client.get_experiment_by_name(exp) or client.create_experiment(exp)
    exp_id = getattr(exp_id, "experiment_id", exp_id)
    run_id = str(client.create_run(exp_id).info.run_id)
    client.log_param(run_id, "checkpoint.root", param_root)
    text = index if isinstance(index, str) else json.dumps(index)
    client.log_text(run_id, text, "checkpoints/index.json")
    return run_id


def _index(root: str, uris: dict[int, str]) -> dict[str, Any]:
    return {"root": root, "checkpoints": [{"step": s, "tag": f"step{s:08d}", "uri": u}
                                          for s, u in uris.items()]}  # fmt: skip


@pytest.fixture(params=["local", "s3"])
def layout(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[int, str]]:
    """(the run's own checkpoint root, step -> a uri outside it that the index names)."""
    bucket = str(request.getfixturevalue("bucket"))
    elsewhere = tmp_path / "elsewhere" / "step00000020"
    elsewhere.mkdir(parents=True)  # something real to read, were it followed
    (elsewhere / "COMMIT.json").write_text("{}")
    storage.write_bytes(f"{bucket}/other/step00000030/COMMIT.json", b"{}")
    if request.param == "local":
        root = str(tmp_path / "run" / "checkpoints")
        Path(root).mkdir(parents=True)
        (Path(root) / "step00000050").symlink_to(elsewhere)
        return root, {20: f"file://{elsewhere}", 30: f"{bucket}/other/step00000030",
                      40: f"{root}/../../elsewhere/step00000020",
                      50: f"{root}/step00000050"}  # fmt: skip
    root = f"{bucket}/ckpt"
    return root, {20: f"file://{elsewhere}", 30: f"{bucket}/other/step00000030",
                  40: f"{root}/../other/step00000030", 50: f"{bucket}/ckpt-evil/step00000050"}  # fmt: skip


def _evil(url: str) -> bool:
    return any(name in url for name in ("elsewhere", "/other/", "ckpt-evil", "step00000050"))


@pytest.mark.e2e
def test_an_index_pointing_outside_the_roots_is_refused_and_nothing_is_read(
    stack: Any, layout: tuple[str, dict[int, str]], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=stack.mlflow_uri)
    root, evil = layout
    own = storage.join(root, "step00000010")  # the run's own: followed (it is not there)
    exp = f"trusted-{uuid.uuid4().hex[:8]}"
    run_id = _run(client, exp, root, _index(root, {10: own, **evil}))
    # An index whose root itself is elsewhere: every entry refused, naming that root.
    moved = _run(client, exp, root, _index(evil[30].rsplit("/", 1)[0], {60: evil[30]}))
    garbled = _run(client, exp, root, '{"root": "x", "checkpoints": 5}')
    spy = Spy(monkeypatch)
    caplog.set_level(logging.INFO, logger="darkmatter.evaluation")

    counts = Harness(client, [SPEC], owner="h").watch(exp, once=True)

    assert counts == {"skipped": 1, "refused": len(evil) + 1}
    assert spy.located == [own]
    assert [u for u in spy.urls if _evil(u)] == []
    tags = client.get_run(run_id).data.tags
    assert tags["eval.step00000010"].startswith("skipped:")
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    for step, uri in evil.items():
        assert tags[f"eval.step{step:08d}"].startswith(f"refused: {uri} is outside the trusted "
                                                       f"roots ({root}, ")  # fmt: skip
        assert sum(uri in e and f"step{step:08d}" in e for e in errors) == 1, (uri, errors)
    moved_root = evil[30].rsplit("/", 1)[0]
    assert (
        client.get_run(moved).data.tags["eval.step00000060"].startswith(f"refused: {moved_root} ")
    )
    assert any(garbled in e and "malformed" in e for e in errors)
    # Recorded: the next look refuses nothing again and reads nothing.
    caplog.clear()
    spy.located.clear()
    assert Harness(client, [SPEC], owner="h").watch(exp, once=True) == {}
    assert spy.located == [] and not any("refusing" in r.getMessage() for r in caplog.records)


@pytest.mark.e2e
def test_trusted_roots_replace_the_default(
    stack: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=stack.mlflow_uri)
    root, team = str(tmp_path / "run" / "checkpoints"), tmp_path / "team"
    (team / "step00000020").mkdir(parents=True)
    exp = f"pinned-{uuid.uuid4().hex[:8]}"
    run_id = _run(client, exp, root, _index(str(team), {20: f"file://{team}/step00000020"}))
    other = _run(client, exp, root, _index(root, {10: storage.join(root, "step00000010")}))
    spy = Spy(monkeypatch)
    h = Harness(client, [SPEC], owner="h", state=str(tmp_path / "state"),
                trusted_roots=(str(team),))  # fmt: skip
    p = h.pending(client.get_run(run_id))
    assert p == [Pending(run_id, "step00000020", 20, f"file://{team}/step00000020", str(team))]
    assert h.process(p[0]) == "skipped"  # followed: an empty folder, no commit record
    assert spy.located == [f"file://{team}/step00000020"]
    refused = h.pending(client.get_run(other))[0]
    assert refused.refused.startswith(f"{root} is outside the trusted roots ({team};")
