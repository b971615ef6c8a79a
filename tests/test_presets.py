"""Every quickstart preset earns its place: each `configs/quickstart_*.yaml`, run as a user runs
it (2 processes, its own steps and recipe, on the quickstart's data for its modality, prepared
into a local folder), gives an encoder whose linear probe beats the same architecture at random
init on its task, by at least MIN_MARGIN. The margins are recorded, one JSON line per preset, in
the file DARKMATTER_PRESET_LOG names (docs/OBJECTIVES.md's table comes from it).

Marker `presets` (`make test-presets`, ~1.5 hours on a 2-core machine): each preset trains for
its full steps, so this tier is neither in make test nor in CI's slow tier; it is run when a
preset or an objective changes, and its results go in docs/OBJECTIVES.md with the date."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO_ROOT, run_darkmatter

pytestmark = [pytest.mark.presets, pytest.mark.distributed, pytest.mark.timeout(3600)]

PRESETS = sorted(p.name for p in (REPO_ROOT / "configs").glob("quickstart_*.yaml"))
# A probe beats random init by more than noise: the held-out splits have 500-1,100 samples,
# where one point is 5-11 of them.
MIN_MARGIN = 0.01
# The quickstart's downstream task for each modality (configs/tasks/), re-pointed at local data.
TASK = {"text": "text.yaml", "image": "digits.yaml", "audio": "spoken_digits.yaml",
        "video": None}  # fmt: skip


def _tasks_file(folder: Path, modality: str, parquet: Path) -> Path:
    """The modality's tasks file with its data at `parquet`; video has no file in configs/tasks
    (its labels are the digit of each clip): a task of its own with the defaults."""
    if TASK[modality] is None:
        spec = {"tasks": [{"name": "moving_digits", "data": str(parquet),
                           "split": {"test_fraction": 0.3, "seed": 0},
                           "protocols": {"linear_probe": {"C": 1.0}, "knn": {"k": 20}},
                           "metrics": ["accuracy"]}]}  # fmt: skip
    else:
        spec = yaml.safe_load((REPO_ROOT / "configs" / "tasks" / TASK[modality]).read_text())
        for task in spec["tasks"]:  # text: the other-source task first, then the fortunes
            task["data"] = str(parquet.with_name(f"{task['name']}.parquet"))
    out = folder / "tasks.yaml"
    out.write_text(yaml.safe_dump(spec))
    return out


def _prepare(modality: str, folder: Path) -> tuple[Path, Path]:
    """The quickstart's data for `modality` in `folder`: (prepared dataset, tasks file)."""
    from darkmatter.data_pipeline.prepare import prepare
    from darkmatter.quickstart import run

    parquet = folder / "task.parquet"
    if modality == "text":
        files = run.text_corpus(folder / "raw")
        prepare(files, str(folder / "ds"), modality="text", vocab_size=run.VOCAB_SIZE)
        run.wordnet_task(str(folder / "wordnet_supersenses.parquet"))
        run.text_task(str(folder / "fortunes_topics.parquet"))
    elif modality == "image":
        run.digits(folder / "raw", str(parquet))
        prepare([str(folder / "raw")], str(folder / "ds"), modality="image")
    elif modality == "audio":
        from darkmatter.quickstart.speech import spoken_digits

        spoken_digits(folder / "raw", str(parquet))
        prepare([str(folder / "raw")], str(folder / "ds"), modality="audio")
    else:
        from darkmatter.quickstart.video_data import write_moving_digits

        write_moving_digits(folder / "raw", str(parquet))
        prepare([str(folder / "raw")], str(folder / "ds"), modality="video")
    return folder / "ds", _tasks_file(folder, modality, parquet)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Each modality's data, prepared once, on first use."""
    cache: dict[str, tuple[Path, Path]] = {}

    class Lazy(dict):  # type: ignore[type-arg]
        def __missing__(self, modality: str) -> tuple[Path, Path]:
            cache[modality] = _prepare(modality, tmp_path_factory.mktemp(modality))
            return cache[modality]

    return Lazy()


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_beats_random_init(
    preset: str, data: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    from darkmatter.trainer.objectives import OBJECTIVES

    config = REPO_ROOT / "configs" / preset
    objective = yaml.safe_load(config.read_text())["objective"]
    dataset, tasks = data[OBJECTIVES[objective].modality]
    run_dir = tmp_path / "run"
    start = time.monotonic()
    out = run_darkmatter("pretrain", str(config), f"data.url={dataset}", f"train.run_dir={run_dir}",
                         "tracking.enabled=false", "--nproc", "2", timeout=3000)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    seconds = time.monotonic() - start
    ev = run_darkmatter("evaluate", str(run_dir), "--tasks", str(tasks), "--no-mlflow")
    assert ev.returncode == 0, ev.stderr[-3000:]
    result = json.loads(ev.stdout.strip().splitlines()[-1])
    knn = {k: v for k, v in result["metrics"].items() if "/knn/accuracy" in k}
    row = {
        "preset": preset, "objective": objective, "task": result["task"], "steps": result["step"],
        "probe": result["pretrained"]["accuracy"], "random": result["random_init"]["accuracy"],
        "margin": result["pretrained"]["accuracy"] - result["random_init"]["accuracy"],
        "knn": knn, "pretrain_s": round(seconds), "n_test": result["pretrained"]["n_test"],
    }  # fmt: skip
    if log := os.environ.get("DARKMATTER_PRESET_LOG"):
        with open(log, "a") as f:
            f.write(json.dumps(row) + "\n")
    print(json.dumps(row))
    assert row["margin"] >= MIN_MARGIN, row
