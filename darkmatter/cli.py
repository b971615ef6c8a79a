"""The `darkmatter` command: prepare | pretrain | evaluate | export | runs | stack.

Each subcommand lives with the package that owns it and is imported only when used, so
`darkmatter stack status` does not pay for importing DeepSpeed. A failure prints one line on
stderr and no traceback:

* a user error (bad input; object storage or MLflow out of reach, or no credentials):
  `darkmatter <command>: error: <message>`, exit 2;
* a CUDA out-of-memory error: the same line with the rank, step and memory figures, exit 1;
* anything else (a bug, a library failing): `darkmatter <command>: crashed: <error>` and the path
  of a crash log that holds the full traceback (`RUN_DIR/` for pretrain, else `./.darkmatter/`,
  `crash-<command>-<time>.log`), exit 1.

`--debug` (before or after the command) or DARKMATTER_DEBUG=1 prints the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import linecache
import logging
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from darkmatter.storage.errors import describe_storage_error, stack_hint

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, RuntimeError)
COMMANDS = {
    "prepare": "turn text, image, audio or video files into WebDataset shards",
    "index": "a manifest for existing WebDataset shards or raw text files, read in place",
    "pretrain": "pretrain an encoder from a YAML config (and a.b=c overrides)",
    "evaluate": "downstream numbers for checkpoints, logged into their training run",
    "export": "a checkpoint's encoder as a transformers save_pretrained folder",
    "runs": "training runs in MLflow: list, show, compare",
    "stack": "the local S3 and MLflow servers: up, down, status",
}
# scheme://user:password@host: what an error line or a crash log must not show.
_USERINFO = re.compile(r"(?<=://)[^/@\s:]+:[^/@\s]+@")


@dataclass
class _Session:
    """What a failure report needs to know of the command that ran."""

    argv: tuple[str, ...] = ()  # the command's arguments, as given
    crash_dir: Path | None = None  # where crash logs go (pretrain: the run folder)
    worker: bool = False  # a training rank ran in this process (see _leave)


_session = _Session()


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
    p.add_argument(
        "--plan", action="store_true",
        help="print each rank's memory (parameters, gradients, optimizer states, activations "
        "with and without checkpointing) and whether it fits, then stop",
    )  # fmt: skip
    p.add_argument(
        "--gpu-memory", default="",
        help="with --plan: the memory of one device, e.g. 80GB or 24GiB (default: the local "
        "GPU's, else this host's memory shared by its ranks)",
    )  # fmt: skip
    p.add_argument(
        "--world-size", type=int, default=0,
        help="with --plan or --dry-run: the ranks the job will run on (default: --nproc, "
        "WORLD_SIZE, or 1)",
    )  # fmt: skip
    args = p.parse_intermixed_args(argv)

    from darkmatter.trainer.config import batch_plan, deepspeed_config, to_dict
    from darkmatter.trainer.objectives import load_config

    overrides = list(args.overrides)
    if args.resume_from:
        overrides.append(f"checkpoint.resume_from={args.resume_from}")
    cfg = load_config(args.config, overrides)
    _session.crash_dir = Path(cfg.train.run_dir)
    from darkmatter.quickstart.stack import release_unless

    release_unless("mlflow", cfg.tracking.tracking_uri)  # the stack's credentials stay with it
    world = args.world_size or args.nproc or int(os.environ.get("WORLD_SIZE", "1"))
    if args.plan:
        return _plan(cfg, world, args.gpu_memory, args.nproc)
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
        from darkmatter.trainer.preflight import preflight

        deepspeed_config(cfg, world)  # batch contradictions fail here, once
        preflight(cfg)
        return _torchrun(args.nproc, args.max_restarts, cfg.faults, argv)
    from darkmatter.trainer.train import run_worker

    _session.worker = True
    return run_worker(cfg)


def _plan(cfg: Any, world: int, gpu_memory: str, nproc: int) -> int:
    """`pretrain --plan`: the memory plan of one rank (trainer.memory_plan), and a warning when
    it does not fit. Plans with the data's meta when the data can be read from here."""
    import torch

    from darkmatter.trainer import memory_plan
    from darkmatter.trainer.config import deepspeed_config
    from darkmatter.trainer.objectives import OBJECTIVES
    from darkmatter.trainer.preflight import dataset_meta

    deepspeed_config(cfg, world)  # batch contradictions fail here
    if gpu_memory:
        capacity, where = memory_plan.parse_bytes(gpu_memory), "per device (--gpu-memory)"
    else:  # ranks on this host: --nproc's, torchrun's, else all of them
        here = nproc or int(os.environ.get("LOCAL_WORLD_SIZE", world))
        capacity, where = memory_plan.local_capacity(here)
    modality = OBJECTIVES[cfg.objective].modality
    try:
        meta = dataset_meta(cfg)
    except Exception as e:  # the plan does not need the data itself: say so and go on
        meta = memory_plan.PLANNING_META[modality]
        vocab = f" (vocabulary {meta['vocab_size']})" if "vocab_size" in meta else ""
        print(f"# data not read ({type(e).__name__}: {str(e).splitlines()[0][:240]}): "
              f"planned with the configured shapes{vocab}")  # fmt: skip
    host_is_device = not gpu_memory and not torch.cuda.is_available()
    lines, warnings = memory_plan.render(
        memory_plan.plan(cfg, meta, world), capacity, where, host_is_device
    )
    print("\n".join(lines))
    for w in warnings:
        print(w, file=sys.stderr)
    return 0


def _torchrun(nproc: int, max_restarts: int, faults: Any, argv: list[str]) -> int:
    """Start torchrun on this machine, with this same command (minus the launcher flags) as the
    worker. Preemption signals sent to this process are passed on to torchrun, which passes them
    to the ranks and gives them faults.grace_s to checkpoint before it kills them."""
    import signal

    from darkmatter.quickstart.servers import free_port

    worker_args = [a for i, a in enumerate(argv) if not _is_launcher_flag(argv, i)]
    signals = ",".join(sorted({"SIGTERM", "SIGINT", *filter(None, faults.signals.split(","))}))
    cmd = [
        # c10d rendezvous, not static: each restart is a new round with fresh store keys (a
        # static rendezvous reuses them, and a restarted group can read the dead one's addresses).
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
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
        "index": lazy("darkmatter.data_pipeline.index"),
        "pretrain": pretrain_main,
        "evaluate": lazy("darkmatter.evaluation.cli"),
        "export": lazy("darkmatter.evaluation.export"),
        "runs": lazy("darkmatter.evaluation.runs"),
        "stack": lazy("darkmatter.quickstart.stack"),
    }


def _parser() -> argparse.ArgumentParser:
    """The top level: the commands, and --debug. Each command parses its own arguments."""
    width = max(map(len, COMMANDS))
    listing = "\n".join(f"  {name:<{width}}  {what}" for name, what in COMMANDS.items())
    p = argparse.ArgumentParser(
        prog="darkmatter",
        description="Distributed self-supervised pretraining: prepare data, pretrain, evaluate "
        "and export encoders.",
        epilog=f"commands:\n{listing}\n\n`darkmatter COMMAND --help` describes each command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--debug", action="store_true",
                   help="print the full traceback of a failure (also: DARKMATTER_DEBUG=1)")  # fmt: skip
    p.add_argument("command", metavar="COMMAND", choices=list(COMMANDS),
                   help="one of the commands listed below")  # fmt: skip
    p.add_argument("args", nargs=argparse.REMAINDER, help="the command's own arguments")
    return p


def _take_debug(argv: list[str]) -> tuple[list[str], bool]:
    """argv without its `--debug` flags (before a `--`), and whether there was one: the flag is
    accepted before and after the command, which never see it."""
    end = argv.index("--") if "--" in argv else len(argv)
    kept = [a for a in argv[:end] if a != "--debug"] + argv[end:]
    return kept, len(kept) != len(argv)


def main(argv: list[str] | None = None) -> int:
    """The `darkmatter` program (argv None: sys.argv), or one command called in-process."""
    if argv is not None:
        return _main(argv)
    from darkmatter import startup

    startup.begin()
    try:
        return _main(sys.argv[1:])
    finally:
        startup.end()


def _main(argv: list[str]) -> int:
    argv, debug = _take_debug(list(argv))
    if debug:  # in the environment, so torchrun's workers print tracebacks too
        os.environ["DARKMATTER_DEBUG"] = "1"
    commands = _subcommands()
    if not argv or argv[0] not in commands:  # help, or a mistake: argparse says which
        _parser().parse_args(argv)
        return 2
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
    global _session
    _session = _Session(argv=tuple(rest))  # nothing left over from an earlier call (tests)
    if command != "stack":
        from darkmatter.quickstart.stack import load_env_defaults

        load_env_defaults()  # `darkmatter stack up` then any command: endpoints just work
    try:
        return commands[command](rest)
    except SystemExit:  # argparse's --help and usage errors: already printed
        raise
    except BaseException as e:
        if os.environ.get("DARKMATTER_DEBUG", "") not in ("", "0"):
            raise
        return _leave(report(command, e))


def report(command: str, e: BaseException) -> int:
    """Print the one line for a failure of `command` (and write the crash log it names, if
    any); returns the exit code."""
    if isinstance(e, KeyboardInterrupt):
        print(f"darkmatter {command}: interrupted", file=sys.stderr)
        return 130
    torch = sys.modules.get("torch")  # not imported: no tensor, so no out-of-memory either
    if torch is not None and isinstance(e, torch.OutOfMemoryError):
        print(f"darkmatter {command}: error: {_oom_line(e)} (traceback: "
              f"{crash_log(command, e)})", file=sys.stderr)  # fmt: skip
        return 1
    if (line := user_error(e)) is not None:
        return _fail(command, line)
    where = crash_log(command, e)
    print(f"darkmatter {command}: crashed: {type(e).__name__}: {_first_line(e)} (full traceback "
          f"in {where}; --debug prints it)", file=sys.stderr)  # fmt: skip
    return 1


def user_error(e: BaseException) -> str | None:
    """The line to print when `e` is the user's to act on, else None (a crash)."""
    if isinstance(e, USER_ERRORS) and _meant_for_the_user(e):
        return _first_line(e)
    if (unreachable := describe_storage_error(e)) is not None:
        return str(unreachable)
    return _tracking_unreachable(e)


def _meant_for_the_user(e: BaseException) -> bool:
    """ValueError and FileNotFoundError say what input is wrong; a RuntimeError does when our
    code raised it on purpose (its class is ours, or a `raise` statement of ours is where it
    started). One from inside torch or DeepSpeed, or from an operation of ours that failed
    in torch's C++, is a failure to investigate: it gets a crash log."""
    if not isinstance(e, RuntimeError) or type(e).__module__.startswith("darkmatter"):
        return True
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return True
    frame = tb.tb_frame
    ours = str(frame.f_globals.get("__name__", "")).startswith("darkmatter")
    line = linecache.getline(frame.f_code.co_filename, tb.tb_lineno).strip()
    return ours and line.startswith("raise")


def _tracking_unreachable(e: BaseException) -> str | None:
    """One line naming MLFLOW_TRACKING_URI when `e` (or what it was raised from) is MLflow's
    client failing to connect to it, however deep it was raised."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    host = uri.split("://", 1)[-1].split("/", 1)[0].rsplit("@", 1)[-1]
    if not uri.startswith(("http://", "https://")) or not host:
        return None
    signs = ("Failed to establish a new connection", "Connection refused", "Max retries exceeded",
             "Name or service not known", "Connection aborted")  # fmt: skip
    cur: BaseException | None = e
    for _ in range(20):  # the chain of causes, bounded
        if cur is None:
            return None
        text = str(cur)
        if host in text and any(s in text for s in signs):
            where = _USERINFO.sub("***@", uri)
            return (f"MLflow tracking server at {where} is unreachable (from "
                    f"MLFLOW_TRACKING_URI){stack_hint(uri)}")  # fmt: skip
        cur = cur.__cause__ or cur.__context__
    return None


def _oom_line(e: BaseException) -> str:
    """trainer.train notes the rank, step and memory figures on an out-of-memory error of
    training; elsewhere torch's own first line (it states the figures on a GPU)."""
    notes = [n for n in getattr(e, "__notes__", []) if n.startswith("out of memory")]
    return notes[-1] if notes else f"out of memory: {_first_line(e)}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return _USERINFO.sub("***@", text.splitlines()[0]) if text else type(e).__name__


def crash_log(command: str, e: BaseException) -> Path:
    """Write the full traceback of `e` and where it happened to a new crash log; returns its
    path. Written whole or not at all (a temporary file renamed into place)."""
    rank = os.environ.get("RANK", "")
    suffix = f"-rank{rank}" if rank and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    stem = f"crash-{command}-{time.strftime('%Y%m%d-%H%M%S')}{suffix}"
    header = [
        f"command: darkmatter {' '.join([command, *_session.argv])}",
        f"time: {time.strftime('%Y-%m-%d %H:%M:%S %z')}", f"cwd: {os.getcwd()}",
        f"host: {platform.node()}  python {platform.python_version()}  pid {os.getpid()}",
        f"rank: {rank or '-'} of {os.environ.get('WORLD_SIZE', '-')}", "",
    ]  # fmt: skip
    text = "\n".join(header) + "".join(traceback.format_exception(e))
    from darkmatter.storage import put_atomic

    for folder in (_session.crash_dir or Path(".darkmatter"), Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = _unused(folder, stem)
            put_atomic(str(folder), path.name, _USERINFO.sub("***@", text).encode())
            return path.absolute()
        except OSError:
            continue  # a read-only or full run folder: the temporary folder then
    return Path("(no crash log: neither the run folder nor the temporary folder is writable)")


def _unused(folder: Path, stem: str) -> Path:
    """folder/stem.log, or stem-2.log, ... when a crash in the same second took that name."""
    path, n = folder / f"{stem}.log", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}.log"
    return path


def _leave(code: int) -> int:
    """The exit code to return; a training rank exits right here instead (os._exit)."""
    if _session.worker:
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
