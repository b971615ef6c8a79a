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
from typing import Any

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, RuntimeError)


def _fail(command: str, message: str) -> int:
    print(f"darkmatter {command}: error: {message}", file=sys.stderr)
    return 2


def pretrain_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="darkmatter pretrain", description="Pretrain an encoder.")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="a.b=c overrides, e.g. train.steps=100")
    p.add_argument("--nproc", type=int, default=0, help="start torchrun with N local processes")
    p.add_argument(
        "--max-restarts", type=int, default=0,
        help="with --nproc: restart the whole group up to N times after a rank fails",
    )  # fmt: skip
    p.add_argument(
        "--resume-from", default="",
        help="start from this checkpoint (a step folder or a checkpoint root) instead of the "
        "newest one of this run (sets checkpoint.resume_from)",
    )  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="print the resolved configs and stop")
    args = p.parse_intermixed_args(argv)

    from darkmatter.trainer.config import batch_plan, deepspeed_config, to_dict
    from darkmatter.trainer.objectives import load_config

    overrides = list(args.overrides)
    if args.resume_from:
        overrides.append(f"checkpoint.resume_from={args.resume_from}")
    cfg = load_config(args.config, overrides)
    from darkmatter.quickstart.stack import release_unless

    release_unless("mlflow", cfg.tracking.tracking_uri)  # the stack's credentials stay with it
    world = args.nproc or int(os.environ.get("WORLD_SIZE", "1"))
    if args.dry_run:  # secrets are shown as *** (as everywhere the config is written)
        import yaml

        from darkmatter.trainer.tracking import redact

        print("# resolved config")
        print(yaml.safe_dump(redact(to_dict(cfg)), sort_keys=False), end="")
        print("# deepspeed config")
        print(json.dumps(redact(deepspeed_config(cfg, world)), indent=2))
        print(f"# batch: {batch_plan(cfg, world).describe()}")
        return 0
    if args.nproc and "RANK" not in os.environ:
        from darkmatter.trainer.train import preflight

        deepspeed_config(cfg, world)  # batch contradictions fail here, once
        preflight(cfg)
        return _torchrun(args.nproc, args.max_restarts, cfg.faults, argv)
    from darkmatter.trainer.train import run_worker

    return run_worker(cfg)


def _torchrun(nproc: int, max_restarts: int, faults: Any, argv: list[str]) -> int:
    """Start torchrun on this machine, with this same command (minus the launcher flags) as the
    worker. Preemption signals sent to this process are passed on to torchrun, which passes them
    to the ranks and gives them faults.grace_s to checkpoint before it kills them."""
    import signal

    from darkmatter.trainer.engine import _free_port

    worker_args = [a for i, a in enumerate(argv) if not _is_launcher_flag(argv, i)]
    signals = ",".join(sorted({"SIGTERM", "SIGINT", *filter(None, faults.signals.split(","))}))
    cmd = [
        # c10d rendezvous, not static: each restart is a new round with fresh store keys (a
        # static rendezvous reuses them, and a restarted group can read the dead one's addresses).
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}",
        f"--max-restarts={max_restarts}", f"--signals-to-handle={signals}",
        f"--shutdown-timeout={int(faults.grace_s) + 10}",
        "-m", "darkmatter.cli", "pretrain", *worker_args,
    ]  # fmt: skip
    # Each round (a restart) gets a fresh store on a new port: with the agent's store shared
    # across rounds, a restarted gloo group can pick up its dead predecessor's keys and hang.
    env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    child = subprocess.Popen(cmd, env=env)
    received: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        received.append(signum)
        child.send_signal(signum)

    for name in faults.signals.split(","):
        if name.strip():
            signal.signal(getattr(signal, name.strip()), forward)
    code = child.wait()
    if received and signal.SIGINT not in received:
        return 143  # stopped on request, with a checkpoint: what schedulers expect
    return code


def _is_launcher_flag(argv: list[str], i: int) -> bool:
    """--nproc and --max-restarts (and their values) are for this process, not the workers."""
    flags = ("--nproc", "--max-restarts")
    a = argv[i]
    return (
        a in flags
        or a.startswith(tuple(f + "=" for f in flags))
        or (i > 0 and argv[i - 1] in flags)
    )


def _subcommands() -> dict[str, Callable[[list[str]], int]]:
    def lazy(module: str, attr: str = "cli") -> Callable[[list[str]], int]:
        def run(argv: list[str]) -> int:
            import importlib

            fn: Callable[[list[str]], int] = getattr(importlib.import_module(module), attr)
            return fn(argv)

        return run

    return {
        "prepare": lazy("darkmatter.data_pipeline.prepare"),
        "pretrain": pretrain_main,
        "evaluate": lazy("darkmatter.evaluation.cli"),
        "export": lazy("darkmatter.evaluation.export"),
        "runs": lazy("darkmatter.evaluation.runs"),
        "stack": lazy("darkmatter.quickstart.stack"),
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
    for noisy in ("aiobotocore", "botocore", "s3fs", "urllib3", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # DeepSpeed's compiled ops belong to this environment (`make venv` builds them there): two
    # environments sharing one cache would rebuild each other's.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    command, rest = argv[0], argv[1:]
    if command != "stack":
        from darkmatter.quickstart.stack import load_env_defaults

        load_env_defaults()  # `darkmatter stack up` then any command: endpoints just work
    try:
        return commands[command](rest)
    except USER_ERRORS as e:
        if os.environ.get("DARKMATTER_DEBUG"):
            raise
        code = _fail(command, str(e).splitlines()[0] if str(e) else type(e).__name__)
        if command == "pretrain" and "torch.distributed" in sys.modules:
            # A training process that failed still holds what the traceback keeps alive
            # (engine, process groups, their C++ threads); left to interpreter teardown, one of
            # them can abort the exit (SIGABRT, "terminate called without an active
            # exception") over the error line. Everything worth keeping is written by now
            # (tracker finished, data workers stopped), so leave without the teardown.
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code


if __name__ == "__main__":
    sys.exit(main())
