"""The `darkmatter` command: prepare | pretrain | evaluate | export | runs | stack.

Each subcommand lives with the package that owns it and is imported only when used, so
`darkmatter stack status` does not pay for importing DeepSpeed. A user error prints one line,
`darkmatter <command>: error: <message>`, and exits 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, RuntimeError)


def _fail(command: str, message: str) -> int:
    print(f"darkmatter {command}: error: {message}", file=sys.stderr)
    return 2


def pretrain_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="darkmatter pretrain", description="Pretrain an encoder.")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="a.b=c overrides, e.g. train.steps=100")
    p.add_argument("--nproc", type=int, default=0, help="start torchrun with N local processes")
    p.add_argument("--dry-run", action="store_true", help="print the resolved configs and stop")
    args = p.parse_intermixed_args(argv)

    from trainer.config import batch_plan, deepspeed_config, load_config, to_dict

    cfg = load_config(args.config, args.overrides)
    world = args.nproc or int(os.environ.get("WORLD_SIZE", "1"))
    if args.dry_run:
        import yaml

        print("# resolved config")
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        print("# deepspeed config")
        print(json.dumps(deepspeed_config(cfg, world), indent=2))
        print(f"# batch: {batch_plan(cfg, world).describe()}")
        return 0
    if args.nproc and "RANK" not in os.environ:
        from trainer.train import preflight

        deepspeed_config(cfg, world)  # batch contradictions fail here, once
        preflight(cfg)
        return _torchrun(args.nproc, argv)
    from trainer.train import run_worker

    return run_worker(cfg)


def _torchrun(nproc: int, argv: list[str]) -> int:
    """Start torchrun on this machine, with this same command (minus --nproc) as the worker."""
    from trainer.engine import _free_port

    worker_args = [a for i, a in enumerate(argv) if not _is_nproc(argv, i)]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1", f"--master-port={_free_port()}",
        "-m", "trainer.cli", "pretrain", *worker_args,
    ]  # fmt: skip
    return subprocess.call(cmd)


def _is_nproc(argv: list[str], i: int) -> bool:
    a = argv[i]
    return a == "--nproc" or a.startswith("--nproc=") or (i > 0 and argv[i - 1] == "--nproc")


def _subcommands() -> dict[str, Callable[[list[str]], int]]:
    def lazy(module: str, attr: str = "cli") -> Callable[[list[str]], int]:
        def run(argv: list[str]) -> int:
            import importlib

            fn: Callable[[list[str]], int] = getattr(importlib.import_module(module), attr)
            return fn(argv)

        return run

    return {
        "prepare": lazy("data_pipeline.prepare"),
        "pretrain": pretrain_main,
        "evaluate": lazy("evaluation.cli"),
        "export": lazy("evaluation.export"),
        "runs": lazy("evaluation.runs"),
        "stack": lazy("trainer.stack"),
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _subcommands()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: darkmatter {" + ",".join(commands) + "} ...", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    logging.basicConfig(
        level=os.environ.get("DARKMATTER_LOG", "INFO"),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    for noisy in ("aiobotocore", "botocore", "s3fs", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    command, rest = argv[0], argv[1:]
    if command != "stack":
        from trainer.stack import load_env_defaults

        load_env_defaults()  # `darkmatter stack up` then any command: endpoints just work
    try:
        return commands[command](rest)
    except USER_ERRORS as e:
        if os.environ.get("DARKMATTER_DEBUG"):
            raise
        return _fail(command, str(e).splitlines()[0] if str(e) else type(e).__name__)


if __name__ == "__main__":
    sys.exit(main())
