"""The local stack: an S3-compatible object store (SeaweedFS) and an MLflow tracking server
(with its basic-auth app) on 127.0.0.1. What each server is and why: see
:mod:`darkmatter.quickstart.servers`.

Design:

* Both servers run as detached background processes (own session, so one ``killpg`` stops a
  server together with the workers it forks), with stdout/stderr in log files.
* Everything lives in one state dir (``$DARKMATTER_STACK_DIR`` or ``./.darkmatter/stack``), and
  stays there across ``down`` / ``up`` and a crash of either server: ``s3/`` (the object
  store's volumes and metadata), ``mlflow.db`` and ``mlflow-auth.db`` (SQLite stores),
  ``artifacts/`` (served by MLflow over HTTP), ``secrets.env`` (the stack's credentials),
  ``<service>.pid``, ``<service>.log``, and ``env``, the ``KEY=VALUE`` file clients load to
  find the stack (see :func:`load_env_defaults`). Only ``down --purge`` deletes data.
* ``up`` is idempotent: a healthy stack of ours is left alone; a port held by anything else
  is a one-line :class:`StackError`, never a half-started stack.
* "Ours" means: the pid in our pid file is alive and its command line is the server we start,
  which guards against a stale pid file whose pid the OS has since reused.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from darkmatter.quickstart import servers
from darkmatter.quickstart.servers import HOST, REGION, port_in_use
from darkmatter.quickstart.servers import free_port as free_port  # re-exported for tests, bench

log = logging.getLogger(__name__)

SERVICES = ("s3", "mlflow")
DEFAULT_BUCKET = "darkmatter"
DEFAULT_PORTS = {"s3": 9000, "mlflow": 5000}
PORT_ENV = {"s3": "DARKMATTER_S3_PORT", "mlflow": "DARKMATTER_MLFLOW_PORT"}
# A substring of each server's command line, to tell our process from a reused pid.
CMDLINE_MARK = {"s3": "weed mini", "mlflow": "mlflow server"}
HEALTH_PATH = {"s3": "/healthz", "mlflow": "/health"}
SERVICE_DATA = {"s3": ("s3",), "mlflow": ("mlflow.db", "mlflow-auth.db", "artifacts")}
# What `down --purge` deletes: every byte of data the stack keeps (and its credentials).
DATA_PATHS = ("s3", "mlflow.db", "mlflow-auth.db", "artifacts", "secrets.env", "s3-ports.json")


class StackError(RuntimeError):
    """The stack cannot be started or reached; the message is one line meant for the user."""


@dataclass
class StackInfo:
    """What ``up`` returns: where the servers are and the env a client needs."""

    s3_endpoint: str
    mlflow_uri: str
    state_dir: str
    env: dict[str, str]
    already_running: bool = False


@dataclass
class ServiceStatus:
    """One server as ``status`` sees it; ``pid`` is None unless our process is alive."""

    name: str
    pid: int | None
    url: str
    healthy: bool
    log: str = field(default="", repr=False)
    data: list[tuple[str, int]] = field(default_factory=list)  # (path, bytes) it keeps


# --------------------------------------------------------------------------- paths and state


def resolve_state_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """The stack's state dir (absolute, so pid files survive a ``cd``)."""
    raw = path or os.environ.get("DARKMATTER_STACK_DIR") or os.path.join(".darkmatter", "stack")
    return Path(raw).expanduser().resolve()


def default_port(service: str) -> int:
    raw = os.environ.get(PORT_ENV[service], str(DEFAULT_PORTS[service]))
    try:
        return int(raw)
    except ValueError:
        raise StackError(f"{PORT_ENV[service]}={raw!r} is not a port number") from None


def url_for(port: int) -> str:
    return f"http://{HOST}:{port}"


def _pid_file(sdir: Path, service: str) -> Path:
    return sdir / f"{service}.pid"


def _log_file(sdir: Path, service: str) -> Path:
    return sdir / f"{service}.log"


def _env_file(sdir: Path) -> Path:
    return sdir / "env"


def _read_pid(sdir: Path, service: str) -> int | None:
    try:
        return int(_pid_file(sdir, service).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _is_ours(pid: int | None, service: str) -> bool:
    """Alive and running our server (not a reused pid)."""
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # someone else's process: certainly not ours
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not cmdline.exists():
        return True  # no /proc (macOS): trust the pid file
    try:
        text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return CMDLINE_MARK[service] in text


def read_env_file(sdir: Path) -> dict[str, str]:
    return servers.read_env_lines(_env_file(sdir))


def _recorded_urls(sdir: Path) -> dict[str, str]:
    """URLs of the stack recorded in the env file, else those of the default ports."""
    env = read_env_file(sdir)
    return {
        "s3": env.get("AWS_ENDPOINT_URL") or url_for(default_port("s3")),
        "mlflow": env.get("MLFLOW_TRACKING_URI") or url_for(default_port("mlflow")),
    }


# --------------------------------------------------------------------------- probes


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def healthy(service: str, base_url: str) -> bool:
    return http_ok(base_url + HEALTH_PATH[service])


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------- processes


def _command(service: str, port: int, sdir: Path, bucket: str) -> list[str]:
    if service == "s3":
        return servers.s3_command(port, sdir, bucket)
    return servers.mlflow_command(port, sdir)


def _child_env(service: str, sdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    # MLflow 3's job runner forks ~6 huey consumers: heavy on small machines, unused here.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    env["PYTHONUNBUFFERED"] = "1"  # logs appear as they happen, for the startup error tail
    # A tracking URI or credentials inherited from the caller must not reach the servers.
    for key in ("MLFLOW_TRACKING_URI", *servers.CLIENT_SECRETS):
        env.pop(key, None)
    if service == "mlflow":
        env.update(servers.mlflow_env(sdir))
    return env


def _spawn(service: str, port: int, sdir: Path, bucket: str) -> subprocess.Popen[bytes]:
    cmd = _command(service, port, sdir, bucket)
    with open(_log_file(sdir, service), "ab") as log_f:
        proc = subprocess.Popen(
            cmd,
            cwd=sdir,  # mlflow writes stray files (mlruns, ...) into its cwd
            env=_child_env(service, sdir),
            stdin=subprocess.DEVNULL,
            stdout=log_f,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # survives the CLI; its own group for killpg
        )
    _pid_file(sdir, service).write_text(f"{proc.pid}\n")
    return proc


def _wait_healthy(
    service: str, proc: subprocess.Popen[bytes], url: str, sdir: Path, deadline: float
) -> None:
    log = _log_file(sdir, service)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(
                f"{service} server exited with code {proc.returncode} during startup; "
                f"last lines of {log}:\n{_log_tail(log)}"
            )
        if healthy(service, url):
            return
        time.sleep(0.25)
    raise StackError(f"{service} server at {url} not healthy in time; see {log}")


def _stop_pid(pid: int, timeout: float) -> None:
    """SIGTERM the process group, then SIGKILL it if it has not exited by the timeout."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _group_alive(pid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    """Some process of the group still runs (zombies do not count: a slow init may take
    seconds to reap the orphans, and a zombie holds no port)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pgid, os.WNOHANG)  # reap it ourselves if it is our child
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited while we looked
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            return True
    return False


# --------------------------------------------------------------------------- public API


def up(
    s3_port: int | None = None,
    mlflow_port: int | None = None,
    state_dir: str | os.PathLike[str] | None = None,
    timeout: float = 120.0,
    bucket: str = DEFAULT_BUCKET,
) -> StackInfo:
    """Start both servers (or find ours already up), create ``bucket``, write the env file."""
    sdir = resolve_state_dir(state_dir)
    sdir.mkdir(parents=True, exist_ok=True)
    running = _running_stack(sdir)
    if running is not None:
        _check_same_ports(running, s3_port, mlflow_port)
        return running
    ports = {"s3": s3_port or default_port("s3"), "mlflow": mlflow_port or default_port("mlflow")}
    _stop_services(sdir, timeout=10.0)  # leftovers of a half-dead stack, stale pid files
    for service in SERVICES:
        _check_port_free(service, ports[service])
    return _start(sdir, ports, timeout, bucket)


def _start(sdir: Path, ports: dict[str, int], timeout: float, bucket: str) -> StackInfo:
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        # Both start at once: MLflow's import + migrations dominate, S3 hides behind them.
        for service in SERVICES:
            procs[service] = _spawn(service, ports[service], sdir, bucket)
        deadline = time.monotonic() + timeout
        for service, proc in procs.items():
            _wait_healthy(service, proc, url_for(ports[service]), sdir, deadline)
        env = stack_env(ports["s3"], ports["mlflow"], sdir)
        _create_bucket(env, bucket, deadline)
        _write_env_file(sdir, env)
    except servers.ServerSetupError as e:
        raise StackError(str(e)) from None
    except BaseException:
        # Never leave a half-started stack behind: the next `up` would trip over it.
        for service, proc in procs.items():
            _stop_pid(proc.pid, timeout=5.0)
            _pid_file(sdir, service).unlink(missing_ok=True)
        raise
    return StackInfo(env["AWS_ENDPOINT_URL"], env["MLFLOW_TRACKING_URI"], str(sdir), env)


# Variables a private stack sets, and those that would send clients elsewhere than to it.
_PRIVATE_VARS = (
    "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
    "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
    "DARKMATTER_STACK_DIR",
)  # fmt: skip
_SHADOWING_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN")


@contextlib.contextmanager
def private(state_dir: str | os.PathLike[str], timeout: float = 180.0) -> Iterator[StackInfo]:
    """A stack of our own on free ports (tests, benchmarks): os.environ points at it while the
    block runs and is restored afterwards; the servers are always stopped."""
    saved = {k: os.environ.get(k) for k in (*_PRIVATE_VARS, *_SHADOWING_VARS)}
    try:
        info = up(s3_port=free_port(), mlflow_port=free_port(), state_dir=state_dir,
                  timeout=timeout)  # fmt: skip
        for key in _SHADOWING_VARS:
            os.environ.pop(key, None)
        os.environ.update(info.env)
        os.environ["DARKMATTER_STACK_DIR"] = str(state_dir)
        yield info
    finally:
        down(state_dir)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def down(state_dir: str | os.PathLike[str] | None = None, timeout: float = 10.0) -> list[str]:
    """Stop both servers; returns the names of those that were running. Data stays."""
    return _stop_services(resolve_state_dir(state_dir), timeout)


def purge(state_dir: str | os.PathLike[str] | None = None) -> list[tuple[str, int]]:
    """Stop the stack and delete its data (objects, runs, artifacts, credentials): the only
    call that deletes any. Returns what was deleted, as (path, bytes)."""
    sdir = resolve_state_dir(state_dir)
    down(sdir)
    removed = []
    for name in DATA_PATHS:
        path = sdir / name
        if path.exists():
            removed.append((str(path), _size(path)))
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    return removed


def status(state_dir: str | os.PathLike[str] | None = None) -> list[ServiceStatus]:
    sdir = resolve_state_dir(state_dir)
    urls = _recorded_urls(sdir)
    result = []
    for service in SERVICES:
        pid = _read_pid(sdir, service)
        ours = _is_ours(pid, service)
        result.append(
            ServiceStatus(
                name=service,
                pid=pid if ours else None,
                url=urls[service],
                healthy=ours and healthy(service, urls[service]),
                log=str(_log_file(sdir, service)),
                data=[(str(sdir / p), _size(sdir / p)) for p in SERVICE_DATA[service]],
            )
        )
    return result


def _size(path: Path) -> int:
    """Bytes under path (0 if it is not there)."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # a file the server removed while we walked
                total += (Path(root) / name).stat().st_size
    return total


# The stack's variables by service. A service is taken from the stack whole or not at all: a
# user who set AWS_ACCESS_KEY_ID for a real endpoint and forgot AWS_ENDPOINT_URL must not have
# the stack's endpoint filled in beside it.
SERVICE_VARS = {
    "s3": ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"),
    "mlflow": ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"),
}
# Set by the caller, each of these means another endpoint for that service. A region alone
# does not: shells set it for everything.
_ELSEWHERE_MARKS = {
    "s3": ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
           "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"),
    "mlflow": SERVICE_VARS["mlflow"],
}  # fmt: skip
_taken: dict[str, list[str]] = {}  # service -> the variables load_env_defaults set


def load_env_defaults(state_dir: str | os.PathLike[str] | None = None) -> bool:
    """Point this process at a running local stack, service by service, unless the caller's
    environment names another endpoint for that service. Each variable taken is named in one
    log line, and so is a service left out. Cheap (no HTTP): checks the pid files only."""
    sdir = resolve_state_dir(state_dir)
    env = read_env_file(sdir)
    if not env or not all(_is_ours(_read_pid(sdir, s), s) for s in SERVICES):
        return False
    for service, keys in SERVICE_VARS.items():
        other = [
            k for k in _ELSEWHERE_MARKS[service] if os.environ.get(k, env.get(k)) != env.get(k)
        ]
        if other:
            log.info("the local stack is up, but %s is set: its %s is not used", other[0], service)
            continue
        taken = [k for k in keys if k in env and k not in os.environ]
        for key in taken:
            os.environ[key] = env[key]
        if taken:
            _taken[service] = taken
            log.info("using the local stack's %s (%s): %s", service, sdir, ", ".join(taken))
    return True


def release_unless(service: str, endpoint: str) -> None:
    """Give back what :func:`load_env_defaults` took for ``service`` when the config names
    another endpoint for it: the stack's credentials never go to someone else's server."""
    taken = _taken.get(service, [])
    if (
        not endpoint
        or not taken
        or endpoint.rstrip("/") == os.environ.get(taken[0], "").rstrip("/")
    ):
        return
    for key in _taken.pop(service):
        os.environ.pop(key, None)
    log.info("the config names %s for %s: the local stack's %s are not used",
             endpoint, service, ", ".join(taken))  # fmt: skip


def stack_env(s3_port: int, mlflow_port: int, sdir: Path) -> dict[str, str]:
    """The variables a client needs to use the stack."""
    creds = servers.stack_secrets(sdir)
    return {
        "AWS_ENDPOINT_URL": url_for(s3_port),
        "AWS_ACCESS_KEY_ID": creds["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": creds["AWS_SECRET_ACCESS_KEY"],
        "AWS_DEFAULT_REGION": REGION,
        "MLFLOW_TRACKING_URI": url_for(mlflow_port),
        "MLFLOW_TRACKING_USERNAME": creds["MLFLOW_TRACKING_USERNAME"],
        "MLFLOW_TRACKING_PASSWORD": creds["MLFLOW_TRACKING_PASSWORD"],
    }


# --------------------------------------------------------------------------- up/down helpers


def _running_stack(sdir: Path) -> StackInfo | None:
    """Our stack in ``sdir``, if both servers are ours and healthy."""
    env = read_env_file(sdir)
    urls = _recorded_urls(sdir)
    for service in SERVICES:
        if not (_is_ours(_read_pid(sdir, service), service) and healthy(service, urls[service])):
            return None
    return StackInfo(urls["s3"], urls["mlflow"], str(sdir), env, already_running=True)


def _check_same_ports(info: StackInfo, s3_port: int | None, mlflow_port: int | None) -> None:
    for name, url, port in (
        ("s3", info.s3_endpoint, s3_port),
        ("mlflow", info.mlflow_uri, mlflow_port),
    ):
        if port is not None and url != url_for(port):
            raise StackError(
                f"the stack in {info.state_dir} is already up with {name} at {url}, not port "
                f"{port} (run `darkmatter stack down` first)"
            )


def _check_port_free(service: str, port: int) -> None:
    if port_in_use(port):
        raise StackError(
            f"port {port} on {HOST} is already in use "
            f"(set {PORT_ENV[service]} or stop the other process)"
        )


def _stop_services(sdir: Path, timeout: float) -> list[str]:
    stopped = []
    for service in reversed(SERVICES):
        pid = _read_pid(sdir, service)
        if _is_ours(pid, service):
            assert pid is not None
            _stop_pid(pid, timeout)
            stopped.append(service)
        _pid_file(sdir, service).unlink(missing_ok=True)
    return stopped


def _create_bucket(env: dict[str, str], bucket: str, deadline: float) -> None:
    """Create ``bucket`` (``weed mini -bucket`` makes it too, once its filer is up): retried
    until the deadline, as the S3 gateway answers health checks before its filer is ready."""
    import boto3  # slow import, needed only here
    import botocore.exceptions

    s3 = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )
    while True:
        try:
            with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
                s3.create_bucket(Bucket=bucket)
            s3.head_bucket(Bucket=bucket)
            return
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            if time.monotonic() > deadline:
                raise StackError(
                    f"cannot create bucket {bucket!r} at {env['AWS_ENDPOINT_URL']}: {e}"
                ) from None
            time.sleep(0.25)


def _write_env_file(sdir: Path, env: dict[str, str]) -> None:
    # Atomic (a concurrent load_env_defaults sees old or new) and 0600: it holds credentials.
    servers.write_private(_env_file(sdir), "".join(f"{k}={v}\n" for k, v in env.items()))


# --------------------------------------------------------------------------- CLI


def cli(argv: list[str]) -> int:
    """``darkmatter stack up|down [--purge]|status``; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "up":
            return _cli_up(args)
        if args.command == "down":
            return _cli_down(args)
        return _cli_status(args)
    except StackError as e:
        print(f"darkmatter stack: error: {e}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", help="default: $DARKMATTER_STACK_DIR or ./.darkmatter/stack")
    common.add_argument("--s3-port", type=int, help=f"default: ${PORT_ENV['s3']} or 9000")
    common.add_argument("--mlflow-port", type=int, help=f"default: ${PORT_ENV['mlflow']} or 5000")
    parser = argparse.ArgumentParser(
        prog="darkmatter stack",
        description="The local stack on 127.0.0.1: an S3 object store (SeaweedFS) and an "
        "MLflow server (with basic auth). Its data stays in the state folder across down and "
        "up; only `down --purge` deletes it.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up_p = sub.add_parser(
        "up", parents=[common], help="start the stack (no-op if already up)",
        description="Start both servers, or find them up; the data of earlier runs is kept.",
    )  # fmt: skip
    up_p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for health")
    down_p = sub.add_parser(
        "down", parents=[common], help="stop the stack (its data stays)",
        description="Stop both servers. Their data stays in the state folder for the next up.",
    )  # fmt: skip
    down_p.add_argument(
        "--purge", action="store_true",
        help="also delete all stack data: objects, MLflow runs and artifacts, credentials",
    )  # fmt: skip
    sub.add_parser(
        "status", parents=[common], help="show each service, where its data lives and its size",
        description="Show each server (pid, URL, health) and where its data lives, with sizes.",
    )  # fmt: skip
    return parser


def _cli_up(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    info = up(args.s3_port, args.mlflow_port, args.state_dir, timeout=args.timeout)
    took = f"started in {time.monotonic() - t0:.1f}s"
    print(f"darkmatter stack: {'already up' if info.already_running else took} ({info.state_dir})")
    print(f"  s3      {info.s3_endpoint}   bucket s3://{DEFAULT_BUCKET}")
    print(f"  mlflow  {info.mlflow_uri}")
    print(f"  data    {info.state_dir} (kept across down/up; `stack down --purge` deletes it)")
    env_file = _env_file(Path(info.state_dir))
    print("darkmatter commands pick this up by themselves; for other tools (it holds the")
    print(f"stack's credentials): set -a; . {env_file}; set +a")
    return 0


def _cli_down(args: argparse.Namespace) -> int:
    if args.purge:
        removed = purge(args.state_dir)
        print(f"darkmatter stack: stopped, and deleted all stack data ({len(removed)} paths):")
        for path, size in removed:
            print(f"  {_human(size):>9}  {path}")
        return 0
    stopped = down(args.state_dir)
    where = resolve_state_dir(args.state_dir)
    if stopped:
        print(f"darkmatter stack: stopped {', '.join(stopped)}; data kept in {where}")
    else:
        print(f"darkmatter stack: nothing was running; data kept in {where}")
    return 0


def _cli_status(args: argparse.Namespace) -> int:
    services = status(args.state_dir)
    for s in services:
        pid = str(s.pid) if s.pid else "-"
        print(f"{s.name:<7} pid {pid:<8} {s.url:<24} healthy: {'yes' if s.healthy else 'no'}")
        for path, size in s.data:
            print(f"  {_human(size):>9}  {path}")
    return 0 if all(s.healthy for s in services) else 1


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


if __name__ == "__main__":
    raise SystemExit(cli(sys.argv[1:]))
