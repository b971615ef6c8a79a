"""Checkpoints under faults (one process, ZeRO-2): torn saves in each phase, a flipped byte, a
lost or garbled `latest`, a purge killed halfway, a checkpoint root in S3. After each fault the
job is started again and must end with exactly the losses of a run that never failed: every
step's loss compared with `==` (dropout on, so the RNG state must come back too)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from darkmatter import storage
from darkmatter.trainer import checkpoint as ckpt
from darkmatter.trainer import checkpoint_writer as ckpt_writer
from tests.helpers import metrics, run_darkmatter, write_config

STEPS = 9
TRAIN = {"zero_stage": 2, "steps": STEPS, "log_every": 1}


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in metrics(run_dir)]


def pretrain(cfg: Path, *overrides: str, failpoints: str = "") -> tuple[int, str]:
    env = {"DARKMATTER_FAILPOINTS": failpoints} if failpoints else None
    out = run_darkmatter("pretrain", str(cfg), *overrides, env=env)
    return out.returncode, out.stderr


@pytest.fixture(scope="module")
def reference(text_ds: str, tmp_path_factory: pytest.TempPathFactory) -> list[tuple[int, float]]:
    """The losses of the uninterrupted run."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = write_config(tmp / "c.yaml", text_ds, tmp / "run", train=TRAIN)
    rc, err = pretrain(cfg)
    assert rc == 0, err[-3000:]
    rows = losses(tmp / "run")
    assert [s for s, _ in rows] == list(range(1, STEPS + 1))
    return rows


@pytest.fixture(scope="module")
def crashed(text_ds: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run killed (SIGKILL) right after step 8, with checkpoints 3 and 6 committed."""
    tmp = tmp_path_factory.mktemp("crashed")
    cfg = write_config(tmp / "c.yaml", text_ds, tmp / "run", train=TRAIN,
                       checkpoint={"every": 3, "async_save": False})  # fmt: skip
    rc, err = pretrain(cfg, failpoints="train.step@8")
    assert rc == -9, err[-3000:]
    assert ckpt.committed_tags(str(tmp / "run/checkpoints")) == ["step00000003", "step00000006"]
    return tmp


def copy_of(crashed: Path, dest: Path) -> tuple[Path, Path]:
    """A copy of the crashed run (its folder and a config pointing at the copy)."""
    shutil.copytree(crashed / "run", dest / "run")
    cfg = dest / "c.yaml"
    cfg.write_text(
        (crashed / "c.yaml").read_text().replace(str(crashed / "run"), str(dest / "run"))
    )
    return cfg, dest / "run"


@pytest.mark.parametrize(
    ("phase", "resumes_at"),
    [
        ("ckpt.after_write", 3),  # rank files written, nothing committed
        # every rank done, commit record not yet written (slow tier: ~20 s each, like purge)
        pytest.param("ckpt.before_commit", 3, marks=pytest.mark.slow),
        ("ckpt.before_latest", 6),  # committed: `latest` is only a hint
        # the purge of step 3 interrupted after its commit record went
        pytest.param("ckpt.purge", 6, marks=pytest.mark.slow),
    ],
)
def test_torn_save_resumes_from_the_last_commit(
    phase: str, resumes_at: int, text_ds: str, tmp_path: Path, reference: list
) -> None:  # type: ignore[type-arg]
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", text_ds, run_dir, train=TRAIN,
                       checkpoint={"every": 3, "keep_last": 1})  # fmt: skip
    rc, err = pretrain(cfg, failpoints=f"{phase}@6")
    assert rc == -9, err[-3000:]  # killed by SIGKILL at the failpoint
    root = str(run_dir / "checkpoints")
    tags = ckpt.committed_tags(root)
    assert tags[-1] == ckpt.tag_for(resumes_at)
    rc, err = pretrain(cfg)
    assert rc == 0, err[-3000:]
    assert f"(step {resumes_at})" in err
    assert losses(run_dir) == reference  # bit for bit, every step
    assert ckpt.committed_tags(root) == ["step00000009"]  # keep_last=1; torn folders gone
    assert ckpt.all_tags(root) == ["step00000009"]


def test_flipped_byte_is_named_and_the_previous_checkpoint_used(
    crashed: Path, tmp_path: Path, reference: list
) -> None:  # type: ignore[type-arg]
    cfg, run_dir = copy_of(crashed, tmp_path)
    victim = run_dir / "checkpoints/step00000006/zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    rc, err = pretrain(cfg)
    assert rc == 0, err[-3000:]
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt: sha256 mismatch" in err
    assert "(step 3)" in err
    assert losses(run_dir) == reference
    # The corrupt checkpoint is moved aside, whole, never deleted.
    root = run_dir / "checkpoints"
    assert f"moved checkpoint step00000006 to {root}/quarantine/step00000006" in err
    kept = root / "quarantine/step00000006"
    assert (kept / ckpt.COMMIT).is_file() and (kept / victim.name).read_bytes() == bytes(data)
    assert "step00000006" in ckpt.committed_tags(str(root))  # written again by this run


@pytest.mark.parametrize("damage", ["lost", "garbled"])
def test_lost_or_garbled_latest_resumes_from_the_newest_commit(
    damage: str, crashed: Path, tmp_path: Path, reference: list
) -> None:  # type: ignore[type-arg]
    cfg, run_dir = copy_of(crashed, tmp_path)
    latest = run_dir / "checkpoints/latest"
    if damage == "lost":
        latest.unlink()
    else:
        latest.write_bytes(b"\x00step0000\xff")
    rc, err = pretrain(cfg)
    assert rc == 0, err[-3000:]
    assert "(step 6)" in err
    assert losses(run_dir) == reference
    assert latest.read_text() == "step00000009"


def test_no_complete_checkpoint_is_an_error_not_a_fresh_start(
    crashed: Path, tmp_path: Path
) -> None:
    cfg, run_dir = copy_of(crashed, tmp_path)
    for record in (run_dir / "checkpoints").glob("step*/COMMIT.json"):
        record.unlink()
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    rc, err = pretrain(cfg)
    assert rc == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("darkmatter pretrain: error: ") and "no checkpoint under" in last, last
    assert "has a commit record" in last
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before  # nothing lost


def test_checkpoints_in_s3_survive_a_torn_upload_and_a_lost_staging_folder(
    bucket: str, text_ds: str, tmp_path: Path, reference: list
) -> None:  # type: ignore[type-arg]
    run_dir = tmp_path / "run"
    root = f"{bucket}/ckpts/run1"
    cfg = write_config(tmp_path / "c.yaml", text_ds, run_dir, train=TRAIN,
                       checkpoint={"every": 3, "root": root})  # fmt: skip
    rc, err = pretrain(cfg, failpoints="ckpt.upload@6")  # killed after the first file's upload
    assert rc == -9, err[-3000:]
    assert ckpt.committed_tags(root) == ["step00000003"]
    assert ckpt.all_tags(root) == ["step00000003", "step00000006"]  # a torn upload
    shutil.rmtree(run_dir / "staging")  # the machine is gone: only S3 has the checkpoint
    assert not (run_dir / "checkpoints").exists()
    rc, err = pretrain(cfg)
    assert rc == 0, err[-3000:]
    assert f"resuming from {root}/step00000003 (step 3)" in err
    assert losses(run_dir) == reference
    record = ckpt.read_commit(root, "step00000009")
    assert record["world_size"] == 1 and "rng_rank0.pt" in record["files"]
    for name, want in record["files"].items():  # what S3 holds is what was committed
        assert len(storage.read_bytes(f"{root}/step00000009/{name}")) == want["size"]
    assert storage.read_bytes(f"{root}/latest") == b"step00000009"
    # Export straight from object storage (downloaded, verified, ZeRO shards consolidated).
    out = run_darkmatter("export", root, str(tmp_path / "export"))
    assert out.returncode == 0, out.stderr[-3000:]
    from transformers import AutoModel

    assert AutoModel.from_pretrained(tmp_path / "export").config.hidden_size == 32
    # Staging copies are deleted once uploaded; the resume downloaded step 3 and verified it.
    assert not (run_dir / "staging/rank0/step00000009").exists()
    [restored] = (run_dir / "staging").glob("restore-*/step00000003")
    assert sorted(p.name for p in restored.iterdir()) == sorted(
        ckpt.read_commit(root, "step00000003")["files"]
    )


def test_each_rank_fetches_only_its_own_partitions() -> None:
    names = [
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "rng_rank0.pt", "rng_rank1.pt", "trainer_state_rank0.json", "trainer_state_rank1.json",
        "zero_to_fp32.py", "darkmatter.json",
    ]  # fmt: skip
    assert [n for n in names if ckpt.needed_by(n, 1)] == [
        "mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng_rank1.pt",
        "trainer_state_rank1.json", "zero_to_fp32.py", "darkmatter.json",
    ]  # fmt: skip
    record = {"world_size": 2, "files": dict.fromkeys(names)}
    shared = ["darkmatter.json", "mp_rank_00_model_states.pt", "zero_to_fp32.py"]
    # The first rank of a machine fetches the shared files; rank 0 every rank's trainer state.
    assert ckpt.files_to_fetch(record, 0, 2, leader=True) == sorted([
        *shared, "zero_pp_rank_0_mp_rank_00_optim_states.pt", "rng_rank0.pt",
        "trainer_state_rank0.json", "trainer_state_rank1.json",
    ])  # fmt: skip
    assert ckpt.files_to_fetch(record, 1, 2, leader=False) == sorted([
        "zero_pp_rank_1_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "rng_rank1.pt", "trainer_state_rank1.json",
    ])  # fmt: skip
    # Another world size: the machine's first rank fetches every file the converter reads (the
    # RNG states are not restored then); a rank the writer did not have reads rank 0's state.
    assert ckpt.files_to_fetch(record, 0, 1, leader=True) == sorted(set(names) - {"rng_rank1.pt"})
    assert ckpt.files_to_fetch(record, 2, 4, leader=False) == ["trainer_state_rank0.json"]


def test_snapshot_is_a_frozen_copy_that_keeps_types_and_sharing() -> None:
    import torch

    weight = torch.arange(6.0).reshape(2, 3)
    state = {"module": {"emb": weight, "decoder": weight, "row": weight[1]},
             "shapes": [torch.Size([2, 3])], "pair": (1, "a")}  # fmt: skip
    snap = ckpt_writer.snapshot(state)
    weight.add_(100)  # training goes on
    assert torch.equal(snap["module"]["emb"], torch.arange(6.0).reshape(2, 3))
    assert snap["module"]["emb"] is snap["module"]["decoder"]  # tied weights stay one tensor
    assert torch.equal(snap["module"]["row"], torch.tensor([3.0, 4.0, 5.0]))
    assert type(snap["shapes"][0]) is torch.Size and snap["pair"] == (1, "a")
    # The next save copies into the same buffers (no new allocation) once the last one is done.
    pool: list = []  # type: ignore[type-arg]
    first = ckpt_writer.snapshot(state, pool)
    buffer = first["module"]["emb"]
    weight.add_(1)
    second = ckpt_writer.snapshot(state, pool)
    assert second["module"]["emb"] is buffer and torch.equal(buffer, weight)


def test_retention_keeps_the_newest_and_every_mth(tmp_path: Path) -> None:
    root = tmp_path / "ckpts"
    for step in range(5, 55, 5):  # committed 5..50, a torn 27 and the newest 50
        folder = root / ckpt.tag_for(step)
        folder.mkdir(parents=True)
        (folder / "weights.pt").write_bytes(b"x")
        (folder / ckpt.COMMIT).write_text("{}")
    (root / ckpt.tag_for(27)).mkdir()
    doomed = ckpt.purge(str(root), ckpt.tag_for(50), keep_last=2, keep_every=20)
    assert ckpt.all_tags(str(root)) == [ckpt.tag_for(s) for s in (20, 40, 45, 50)]
    assert sorted(doomed) == [ckpt.tag_for(s) for s in (5, 10, 15, 25, 27, 30, 35)]


def test_resume_from_another_run_continues_bit_exact(
    crashed: Path, text_ds: str, tmp_path: Path, reference: list
) -> None:  # type: ignore[type-arg]
    run_dir = tmp_path / "fork"
    cfg = write_config(tmp_path / "c.yaml", text_ds, run_dir, train=TRAIN, checkpoint={"every": 3})
    source = crashed / "run/checkpoints/step00000003"
    rc, err = pretrain(cfg, "--resume-from", str(source))
    assert rc == 0, err[-3000:]
    assert f"resuming from {source} (step 3)" in err
    assert losses(run_dir) == reference[3:]  # steps 4-9, as if never interrupted
    # A restart of this job continues from its own checkpoints, not from the source again.
    rc, err = pretrain(cfg, "--resume-from", str(source), "train.steps=9")
    assert rc == 0 and "(step 9)" in err, err[-3000:]


def test_checkpoint_files_hold_tensors_and_plain_data_only(crashed: Path) -> None:
    import torch

    folder = crashed / "run/checkpoints/step00000006"
    allowed = {  # inert DeepSpeed records, allowlisted by name in trainer.engine
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.utils.tensor_fragment.fragment_address",
    }
    pickles = sorted(folder.glob("*.pt"))
    assert len(pickles) == 3  # model states, this rank's optimizer partition, its RNG
    for path in pickles:
        assert set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path))) <= allowed
    record = ckpt.read_commit(str(crashed / "run/checkpoints"), "step00000006")
    assert {p.name for p in folder.iterdir()} - {ckpt.COMMIT} == set(record["files"])
    assert all(n.endswith((".pt", ".json", ".py")) for n in record["files"])


def test_failed_uploads_are_retried_then_reported(
    stack: Any, bucket: str, text_ds: str, tmp_path: Path
) -> None:
    """S3 answers 503 SlowDown to 16 checkpoint uploads in a row (botocore's own retries off,
    s3fs tries 5 times per call). Step 3: 5 + 5 failures exhaust storage.retry.attempts=2, so
    it is reported and not committed; training goes on. Step 6: 5 failures, our retry succeeds."""
    from tests.faultproxy import FaultProxy

    root = f"{bucket}/ckpts/flaky"
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", text_ds, run_dir,
                       train={"zero_stage": 2, "steps": 6, "log_every": 3},
                       checkpoint={"every": 3, "root": root},
                       storage={"retry": {"attempts": 2}})  # fmt: skip
    with FaultProxy(stack.s3_endpoint, methods=("PUT",), plan=["slowdown"] * 16,
                    match=lambda p: "/ckpts/flaky/step" in p) as proxy:  # fmt: skip
        env = {"AWS_ENDPOINT_URL": proxy.url, "AWS_MAX_ATTEMPTS": "1"}
        out = run_darkmatter("pretrain", str(cfg), env=env)
        assert proxy.counts["slowdown"] == 16
    assert out.returncode == 0, out.stderr[-3000:]
    assert "checkpoint step00000003 not committed: rank 0: upload of" in out.stderr
    assert "failed 2 times" in out.stderr and "retrying in" in out.stderr
    assert ckpt.committed_tags(root) == ["step00000006"]
    record = ckpt.read_commit(root, "step00000006")
    for name, want in record["files"].items():
        assert len(storage.read_bytes(f"{root}/step00000006/{name}")) == want["size"]


def test_resume_into_another_architecture_names_the_keys(crashed: Path, tmp_path: Path) -> None:
    cfg, run_dir = copy_of(crashed, tmp_path)
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    rc, err = pretrain(cfg, "model.hidden_size=64", "model.intermediate_size=96")
    assert rc == 2
    last = err.strip().splitlines()[-1]
    assert last == (
        f"darkmatter pretrain: error: {run_dir}/checkpoints/step00000006 was written for another "
        "model: hidden_size 32 in the checkpoint, 64 here; intermediate_size 64 in the "
        "checkpoint, 96 here"
    ), last
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before  # untouched
