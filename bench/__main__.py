"""`python -m bench`: run every benchmark, one after the other, and write their results as a
Markdown table (for docs/BENCHMARKS.md) plus the raw JSON lines.

Each benchmark runs as its own process, exactly as `python bench/<name>.py` would; its last line
of stdout is its JSON result. The table names each benchmark's headline figure, its target and
whether this run met it (targets hold for full-size runs; --quick leaves that column empty). A benchmark that fails is reported in the table with its error line and
makes the exit status 1; the others still run.

    python -m bench                       # all of them (about an hour and a half on 2 cores)
    python -m bench --quick               # every one in its smoke-test size (minutes)
    python -m bench --only zero_memory trainer_overhead --out results.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _common  # noqa: E402


@dataclass(frozen=True)
class Bench:
    name: str
    headline: str  # the key of the JSON result that the target is about
    target: str  # "<= 1.03", ">= 0.9", or "" (no target: a measurement)
    quick: tuple[str, ...] = ("--quick",)
    needs_gpu: bool = False

    def met(self, value: float) -> bool | None:
        if not self.target:
            return None
        op, bound = self.target.split()
        return value <= float(bound) if op == "<=" else value >= float(bound)


BENCHMARKS = (
    Bench("data_throughput", "ratio", ">= 0.9"),
    Bench("resume_latency", "ratio", "<= 1.2"),
    Bench("checkpoint_stall", "ratio", "<= 0.1"),
    Bench("tracking_overhead", "ratio", "<= 1.01"),
    Bench("trainer_overhead", "ratio", "<= 1.03"),
    Bench("zero_memory", "worst_ratio", "<= 1.15"),
    Bench("raw_text", "ratio_jsonl", ""),
    Bench("index_shards", "ratio", ">= 5"),
    Bench("features", "", ""),
    Bench("startup", "ratio", ""),
    Bench("memory_plan", "worst_error", "<= 0.15"),
    Bench("text_transfer", "wordnet_probe_margin", ">= 10"),
    Bench("mlm_head", "ratio", ">= 1.2"),
    Bench("eval_memory", "peak_ratio", "<= 1.3"),
    Bench("gpu", "mlm_mfu_vs_target", ">= 1.0", quick=("--tiny",), needs_gpu=True),
)


def run(bench: Bench, quick: bool) -> dict[str, Any]:
    """One benchmark in its own process: its JSON result, or {"error": ...}."""
    cmd = [sys.executable, str(HERE / f"{bench.name}.py"), *(bench.quick if quick else ())]
    _common.log(f"running {' '.join(cmd[1:])}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=_common.REPO_ROOT, stdout=subprocess.PIPE, text=True)
    wall = round(time.perf_counter() - t0, 1)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": f"exit status {proc.returncode}", "wall_s": wall}
    try:
        result: dict[str, Any] = json.loads(lines[-1])
    except json.JSONDecodeError:
        return {"error": f"last line is not JSON: {lines[-1][:200]!r}", "wall_s": wall}
    result.setdefault("wall_s", wall)
    return result


def table(results: dict[str, dict[str, Any]], quick: bool) -> str:
    """The Markdown table, then each JSON line."""
    when = datetime.date.today().isoformat()
    out = [
        f"Run of `python -m bench{' --quick' if quick else ''}` on {when}: {_common.machine()}.",
        "",
        "| Benchmark | Figure | Value | Target | Met | Wall s |",
        "|---|---|---|---|---|---|",
    ]
    for bench in BENCHMARKS:
        if bench.name not in results:
            continue
        r = results[bench.name]
        if "error" in r or "skipped" in r:
            why = r.get("error") or r["skipped"]
            out.append(f"| {bench.name} | {bench.headline or '-'} | {why} | "
                       f"{bench.target or '-'} | - | {r.get('wall_s', '-')} |")  # fmt: skip
            continue
        value = r.get(bench.headline) if bench.headline else None
        # Targets are about full-size runs; a smoke-test size is not held to them.
        met = bench.met(float(value)) if value is not None and not quick else None
        out.append(f"| {bench.name} | {bench.headline or 'see JSON'} | "
                   f"{value if value is not None else '-'} | {bench.target or '-'} | "
                   f"{'-' if met is None else ('yes' if met else '**no**')} | "
                   f"{r.get('wall_s', '-')} |")  # fmt: skip
    out += ["", "JSON lines:", ""]
    out += [f"- `{name}`: `{json.dumps(r)}`" for name, r in results.items()]
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="each benchmark's smoke-test size")
    ap.add_argument("--only", nargs="+", choices=[b.name for b in BENCHMARKS])
    ap.add_argument("--out", default="", help="also write the table to this file")
    ap.add_argument("--json", default="", help="also write the results, by name, to this file")
    args = ap.parse_args()
    import torch

    gpu = torch.cuda.is_available()
    results: dict[str, dict[str, Any]] = {}
    for bench in BENCHMARKS:
        if args.only and bench.name not in args.only:
            continue
        if bench.needs_gpu and not gpu and not args.quick:
            results[bench.name] = {"skipped": "no GPU here (--quick runs its CPU smoke test)"}
            continue
        results[bench.name] = run(bench, args.quick)
    text = table(results, args.quick)
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
