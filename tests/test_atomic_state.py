"""Local state files (mlflow_run.json, claims on a local root, resume markers, the truncated
metrics file, the evaluator's output line) are written through one helper, storage.put_atomic:
a temp file, fsync, rename. A writer SIGKILLed at any moment leaves the old content or the new,
never a torn or empty file; the same loop with a plain write shows what that guards against."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from darkmatter import storage
from darkmatter.trainer.resume import truncate_metrics
from tests.helpers import REPO_ROOT

# Rewrites state.json forever, each version {"i": i, "pad": "x" * (PAD + i % 997)}: a reader can
# tell a whole version from a torn one by its length. argv: folder, "atomic" or "plain".
WRITER = """
import json, sys
from pathlib import Path
from darkmatter.storage import put_atomic
folder, how = sys.argv[1], sys.argv[2]
start = json.loads((Path(folder) / "state.json").read_text())["i"] + 1
print("ready", flush=True)
for i in range(start, 10**9):
    data = json.dumps({"i": i, "pad": "x" * (%d + i %% 997)}).encode()
    if how == "atomic":
        put_atomic(folder, "state.json", data)
    else:
        (Path(folder) / "state.json").write_bytes(data)
"""
PAD = 256 * 1024  # bytes per version: a plain write is caught half-done often


def _kill_mid_loop(folder: Path, how: str, kills: int) -> tuple[list[int], int]:
    """Start the writer and SIGKILL it at a random moment, `kills` times; after each, read the
    file. Returns (the version seen after each kill, how many reads were torn or empty)."""
    (folder / "state.json").write_text(json.dumps({"i": 0, "pad": "x" * PAD}))
    rng = random.Random(0)
    seen, torn = [], 0
    for _ in range(kills):
        proc = subprocess.Popen([sys.executable, "-c", WRITER % PAD, str(folder), how],
                                cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        time.sleep(rng.uniform(0.005, 0.08))  # somewhere in the loop
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        proc.stdout.close()
        try:
            state = json.loads((folder / "state.json").read_text())
            assert len(state["pad"]) == PAD + state["i"] % 997
            seen.append(state["i"])
        except (ValueError, AssertionError):
            torn += 1
            (folder / "state.json").write_text(json.dumps({"i": 0, "pad": "x" * PAD}))
    return seen, torn


def test_a_state_file_survives_sigkill_mid_rewrite(tmp_path: Path) -> None:
    seen, torn = _kill_mid_loop(tmp_path, "atomic", kills=20)
    assert torn == 0
    assert seen == sorted(seen) and seen[-1] >= 10  # it kept moving on: kills landed mid-loop


@pytest.mark.slow
def test_a_plain_rewrite_is_torn_by_sigkill(tmp_path: Path) -> None:
    """The control: what the atomic helper prevents does happen with a plain write."""
    _, torn = _kill_mid_loop(tmp_path, "plain", kills=20)
    assert torn > 0


def test_truncating_metrics_keeps_the_old_file_when_killed_before_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (5, 10, 15, 20)]
    path.write_text("".join(ln + "\n" for ln in lines))
    before = path.read_bytes()

    def die(src: str, dst: str) -> None:
        raise KeyboardInterrupt("killed")  # the process dies between the write and the rename

    with monkeypatch.context() as m:
        m.setattr(os, "replace", die)
        with pytest.raises(KeyboardInterrupt):
            truncate_metrics(path, 10)
    assert path.read_bytes() == before  # the old lines, whole
    truncate_metrics(path, 10)
    assert [json.loads(ln)["step"] for ln in path.read_text().splitlines()] == [5, 10]


def test_a_local_claim_write_is_atomic_and_leaves_no_temp_file(tmp_path: Path) -> None:
    url = str(tmp_path / "claims" / "run" / "step00000010.json")
    version = storage.write_if(url, b'{"owner": "a"}', None)
    assert version is not None
    assert storage.write_if(url, b'{"owner": "b"}', version) is not None
    assert storage.write_if(url, b'{"owner": "c"}', version) is None  # stale version: refused
    assert json.loads(Path(url).read_bytes()) == {"owner": "b"}
    assert sorted(p.name for p in Path(url).parent.iterdir()) == [
        "step00000010.json", "step00000010.json.lock"]  # fmt: skip
