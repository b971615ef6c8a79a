"""What a `darkmatter` process spends starting and exiting (darkmatter/startup.py,
engine.import_muon_uncompiled; bench/startup.py measures both): checked in fresh interpreters,
since pytest's own has long imported everything."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.helpers import REPO_ROOT

ENGINE = textwrap.dedent(
    """
    import gc, sys
    from darkmatter import startup
    default = gc.get_threshold()
    startup.begin()
    assert gc.get_threshold() == (100_000, *default[1:]), gc.get_threshold()
    from darkmatter.trainer import engine as eng
    from darkmatter.trainer.config import deepspeed_config
    from darkmatter.trainer.objectives import OBJECTIVES, load_config
    import yaml, tempfile, os
    path = os.path.join(tempfile.mkdtemp(), "c.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({"objective": "mae", "data": {"url": "unused", "image_size": 16},
                        "model": {"hidden_size": 16, "num_layers": 1, "num_heads": 2,
                                  "intermediate_size": 32, "patch_size": 4},
                        "train": {"steps": 1, "micro_batch_size": 2, "zero_stage": 2},
                        "tracking": {"enabled": False}}, f)
    cfg = load_config(path, [])
    eng.init_distributed()
    objective = OBJECTIVES["mae"](cfg, {"modality": "image"})
    engine, hf_ds = eng.build_engine(cfg, deepspeed_config(cfg, 1), objective.build_model)
    assert engine.zero_optimization_stage() == 2
    # DeepSpeed imported its Muon module to check the optimizer's type, without compiling.
    assert eng.MUON in sys.modules
    assert "torch._inductor.compile_fx" not in sys.modules, "inductor was imported"
    from deepspeed.runtime import compiler
    from deepspeed.runtime.zero.muon import original_muon
    assert compiler.compile() is __import__("torch").compile  # put back as it was
    assert original_muon.muon_update.__wrapped__.__name__ == "muon_update"
    startup.settle()
    assert gc.get_threshold() == default and gc.get_freeze_count() > 100_000
    eng.shutdown()
    print("ok")
    """
)


def test_an_engine_builds_without_compiling_muon_and_collections_come_back() -> None:
    out = subprocess.run([sys.executable, "-c", ENGINE], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_only_the_program_changes_collections() -> None:
    """main(argv) in-process (tests, embedding) leaves the collector alone; the program (argv
    None) raises the threshold for its start and freezes everything as it returns."""
    code = textwrap.dedent(
        """
        import gc, sys
        from darkmatter import cli
        default = gc.get_threshold()
        seen = []
        cli._main = lambda argv: seen.append((list(argv), gc.get_threshold()[0])) or 0
        assert cli.main(["runs", "--x"]) == 0  # in-process
        assert gc.get_threshold() == default and gc.get_freeze_count() == 0
        sys.argv = ["darkmatter", "runs", "--x"]
        assert cli.main() == 0  # the program
        assert seen == [(["runs", "--x"], default[0]), (["runs", "--x"], 100_000)], seen
        assert gc.get_freeze_count() > 0
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
