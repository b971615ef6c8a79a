"""Wall time of a short `darkmatter pretrain` process, start to exit, with the startup measures
(darkmatter/startup.py: fewer garbage collections while torch, transformers and DeepSpeed are
imported, none over them at exit; engine.import_muon_uncompiled: DeepSpeed's Muon module
imported without compiling its kernels) vs the same command without them.

Both run the same 2-step BERT MLM job (one rank, ZeRO-2, tracking off, the final checkpoint saved) on one
prepared text dataset, as separate processes:

    darkmatter  python -m darkmatter.cli pretrain CONFIG       (the program: measures on)
    plain       python -c "<import DeepSpeed's Muon module as DeepSpeed does; then
                darkmatter.cli.main(argv)>" pretrain CONFIG     (in-process call: measures off)

Also the time to import darkmatter.trainer.train alone, with and without the measures. A
warm-up of each comes first, then repetitions in the order A B B A ...; medians are reported,
`ratio` = darkmatter / plain (lower is better). 2-rank jobs start each rank as `darkmatter`
does, so the saving counts once per rank there (and once more for the launching process).

    python bench/startup.py            # 4 repetitions (~4 min on 2 cores)
    python bench/startup.py --quick    # 1 repetition
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from _common import log  # noqa: E402

PLAIN = (
    "import sys, deepspeed.runtime.zero.muon.muon_optimizer; from darkmatter.cli import main; "
    "sys.exit(main(sys.argv[1:]))"
)
IMPORT = "import darkmatter.trainer.train"
IMPORT_MEASURED = (
    "from darkmatter import startup; startup.begin(); import darkmatter.trainer.train; "
    "from darkmatter.trainer.engine import import_muon_uncompiled; import_muon_uncompiled(); "
    "startup.end()"
)
IMPORT_PLAIN = "import darkmatter.trainer.train, deepspeed.runtime.zero.muon.muon_optimizer"


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=_common.REPO_ROOT, capture_output=True, text=True)
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one repetition")
    ap.add_argument("--reps", type=int, default=4)
    args = ap.parse_args()
    reps = 1 if args.quick else args.reps
    import yaml

    with _common.workdir("dm-bench-startup-") as root:
        corpus = _common.write_text_corpus(root / "corpus.txt", 2_000)
        prep = subprocess.run(
            [sys.executable, "-m", "darkmatter.cli", "prepare", str(corpus), "--output",
             str(root / "ds"), "--modality", "text", "--vocab-size", "2000"],
            cwd=_common.REPO_ROOT, capture_output=True, text=True,
        )  # fmt: skip
        if prep.returncode != 0:
            raise SystemExit(f"darkmatter prepare failed: {prep.stderr[-2000:]}")
        cfg = root / "c.yaml"
        cfg.write_text(yaml.safe_dump({
            "objective": "mlm",
            "data": {"url": str(root / "ds"), "num_workers": 1, "seq_len": 32},
            "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2,
                      "intermediate_size": 64},
            "train": {"steps": 2, "micro_batch_size": 8, "log_every": 1, "zero_stage": 2,
                      "run_dir": str(root / "run")},
            "checkpoint": {"every": 1000},
            "tracking": {"enabled": False},
        }))  # fmt: skip
        commands = {
            "darkmatter": [sys.executable, "-m", "darkmatter.cli", "pretrain", str(cfg)],
            "plain": [sys.executable, "-c", PLAIN, "pretrain", str(cfg)],
            "import_darkmatter": [sys.executable, "-c", IMPORT_MEASURED],
            "import_plain": [sys.executable, "-c", IMPORT_PLAIN],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        log("warm-up")
        for cmd in commands.values():
            timed(cmd)
        for rep in range(reps):
            order = list(commands) if rep % 2 == 0 else list(reversed(commands))
            for name in order:
                times[name].append(timed(commands[name]))
            log(f"repetition {rep + 1}/{reps}: " +
                ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()))  # fmt: skip
    med = {name: round(_common.median(t), 2) for name, t in times.items()}
    _common.emit({
        "benchmark": "startup", "reps": reps, "pretrain_s": med["darkmatter"],
        "pretrain_plain_s": med["plain"], "ratio": round(med["darkmatter"] / med["plain"], 3),
        "import_s": med["import_darkmatter"], "import_plain_s": med["import_plain"],
        "import_ratio": round(med["import_darkmatter"] / med["import_plain"], 3),
        "machine": _common.machine(),
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
