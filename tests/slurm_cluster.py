"""A real single-host SLURM cluster for tests: munged, slurmctld and slurmd on this machine.

Everything lives in one folder (configuration, munge key and socket, state, spool, logs) and
listens on free ports of 127.0.0.1, so it never touches a system SLURM or munge. Client
commands find it through SLURM_CONF, which `SlurmCluster.env` sets. The node is `localhost`
with the machine's CPUs and a number of GPUs that exist only as a count (GRES whose device
files are empty stand-ins), so job scripts that ask for `--gpus-per-node` run unchanged on a
CPU machine.

Debian 12's slurm-wlm is 22.05: authentication is munge's (auth/slurm came in 23.11); without
cgroups, processes are tracked through /proc (proctrack/linuxproc) and tasks are not bound
(task/none). A requeued job may start again `cred_expire` + 1 seconds after its requeue (120 s
by default; 5 is the least SLURM accepts), and the main scheduler looks at pending jobs every
`sched_interval` seconds (60 by default), so both are turned down here.

`unavailable()` says why such a cluster cannot run here (binaries missing, not root), for a
skip; `cluster()` brings it up and tears it down, ending only the processes it started.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from darkmatter.quickstart.stack import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "sinfo", "scancel", "squeue", "srun")
SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")
NODE = "localhost"
CRED_EXPIRE_S = 5  # the least SLURM takes: a requeued job may start 6 s after its requeue


class SlurmError(RuntimeError):
    """The test cluster could not start, or a command against it failed."""


def _which(name: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN])
    return shutil.which(name, path=path)


def unavailable() -> str | None:
    """Why a test cluster cannot run on this machine (None: it can)."""
    missing = [b for b in (*DAEMONS, *CLIENTS) if _which(b) is None]
    if missing:
        return (
            f"SLURM is not installed ({', '.join(missing)} missing): "
            "run launch/ensure_slurm.sh as root"
        )
    if os.geteuid() != 0:
        return "a test SLURM cluster runs its daemons as root (SlurmUser=root); not root here"
    return None


@dataclass
class SlurmCluster:
    """A running cluster: its folder, configuration and the environment of client commands."""

    root: Path
    conf: Path
    cpus: int
    gpus: int
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """os.environ plus SLURM_CONF: what sbatch, scontrol & co. need to find this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> str:
        """Run a SLURM client command against this cluster; its stdout."""
        out = subprocess.run(
            list(args), env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and out.returncode:
            raise SlurmError(f"{' '.join(args)}: {(out.stderr or out.stdout).strip()}")
        return out.stdout

    def sbatch(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> int:
        """Submit a batch job (`args` as on sbatch's command line); its job id."""
        out = subprocess.run(
            ["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, cwd=cwd,
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        if out.returncode:
            raise SlurmError(f"sbatch {' '.join(args)}: {out.stderr.strip()}")
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        text = self.run("scontrol", "show", "job", "--oneliner", str(job_id))
        return dict(re.findall(r"(\w+(?::\w+)?)=(\S*)", text))

    def wait_state(self, job_id: int, states: set[str], timeout: float) -> dict[str, str]:
        """Poll until the job is in one of `states`; the job's fields then."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)  # each poll is a process: keep the CPUs for the job
        raise SlurmError(
            f"job {job_id} not in {sorted(states)} after {timeout:.0f} s: "
            f"{info.get('JobState')} ({info.get('Reason')}); logs in {self.root / 'log'}"
        )

    def node_state(self) -> str:
        return self.run("sinfo", "--noheader", "--nodes", NODE, "-o", "%T", check=False).strip()


def _config(root: Path, cpus: int, gpus: int, ctld_port: int, slurmd_port: int) -> str:
    socket = root / "munge" / "munge.socket"
    memory_mb = 1024
    return "\n".join([
        "ClusterName=darkmatter-test",
        f"SlurmctldHost={NODE}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={socket},cred_expire={CRED_EXPIRE_S}",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc",  # no cgroups here
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "MpiDefault=none",
        "SwitchType=switch/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SchedulerType=sched/backfill",
        "SchedulerParameters=sched_interval=1,bf_interval=1",
        "ReturnToService=2",
        "JobRequeue=1",
        "KillWait=30",  # SLURM's default: a requeued rank has that long to exit
        "GresTypes=gpu",
        f"NodeName={NODE} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} "
        f"Gres=gpu:{gpus} State=UNKNOWN",
        f"PartitionName=debug Nodes={NODE} Default=YES MaxTime=INFINITE State=UP",
        "",
    ])  # fmt: skip


def _start(cluster: SlurmCluster, name: str, args: list[str]) -> None:
    exe = _which(name)
    assert exe is not None
    log = open(cluster.root / "log" / f"{name}.out", "wb")  # noqa: SIM115 (the daemon's)
    cluster.procs[name] = subprocess.Popen(
        [exe, *args], env=cluster.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        start_new_session=True,
    )  # fmt: skip
    log.close()


def _wait(what: str, cond: Callable[[], bool], cluster: SlurmCluster, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        for name, proc in cluster.procs.items():
            if proc.poll() is not None:
                raise SlurmError(f"{name} exited with {proc.returncode} before {what}: "
                                 f"{_tail(cluster.root / 'log', name)}")  # fmt: skip
        time.sleep(0.1)
    raise SlurmError(f"timed out after {timeout:.0f} s waiting for {what}; logs in "
                     f"{cluster.root / 'log'}")  # fmt: skip


def _tail(logs: Path, name: str) -> str:
    texts = [p.read_text(errors="replace") for p in sorted(logs.glob(f"{name}*")) if p.is_file()]
    lines = "\n".join(texts).strip().splitlines()
    return " | ".join(lines[-3:]) or "no log"


@contextlib.contextmanager
def cluster(
    root: Path, cpus: int = 2, gpus: int = 2, timeout: float = 30
) -> Iterator[SlurmCluster]:
    """Bring up munged, slurmctld and slurmd under `root`, wait until the node is idle, and
    tear everything down on exit: jobs cancelled, daemons stopped, and any process still
    carrying this cluster's SLURM_CONF (job steps left behind) killed."""
    reason = unavailable()
    if reason:
        raise SlurmError(reason)
    root = root.resolve()
    conf = root / "slurm.conf"
    if len(str(root / "munge" / "munge.socket")) > 100:  # sun_path holds 108 bytes
        raise SlurmError(f"{root}: too long a path for munge's socket")
    for sub in ("munge", "state", "spool", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "munge").chmod(0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    conf.write_text(_config(root, cpus, gpus, free_port(), free_port()))
    # Stand-ins for GPU device files (SLURM drops a GPU without one): task/none binds nothing,
    # so they are only counted; a task sees CUDA_VISIBLE_DEVICES, which a CPU build ignores.
    (root / "dev").mkdir(exist_ok=True)
    for i in range(gpus):
        (root / "dev" / f"gpu{i}").touch()
    (root / "gres.conf").write_text(
        "".join(f"NodeName={NODE} Name=gpu File={root / 'dev' / f'gpu{i}'}\n" for i in range(gpus))
    )
    c = SlurmCluster(root=root, conf=conf, cpus=cpus, gpus=gpus)
    try:
        m = root / "munge"
        # --force: the test's temp folders are not world-searchable, which munged checks for.
        _start(c, "munged", ["--foreground", "--force", f"--socket={m / 'munge.socket'}",
                             f"--key-file={key}", f"--pid-file={m / 'munged.pid'}",
                             f"--seed-file={m / 'munged.seed'}",
                             f"--log-file={root / 'log' / 'munged.log'}"])  # fmt: skip
        _wait("munged's socket", (m / "munge.socket").exists, c, timeout)
        _start(c, "slurmctld", ["-D", "-c", "-f", str(conf)])
        _start(c, "slurmd", ["-D", "-N", NODE, "-f", str(conf)])
        _wait(f"node {NODE} idle", lambda: c.node_state() == "idle", c, timeout)
        yield c
    finally:
        _teardown(c)


def _teardown(c: SlurmCluster) -> None:
    """Cancel every job, SIGKILL what is left of its tasks after a few seconds (they carry the
    cluster's SLURM_CONF), stop the daemons, then SIGKILL anything of the cluster left."""
    marker = f"SLURM_CONF={c.conf}".encode()
    daemons = {p.pid for p in c.procs.values()}
    if "slurmctld" in c.procs and c.procs["slurmctld"].poll() is None:
        with contextlib.suppress(subprocess.TimeoutExpired, SlurmError):
            c.run("scancel", "--full", "--user", "root", check=False, timeout=10)
            deadline = time.monotonic() + 15
            killed_at = time.monotonic() + 3  # SLURM's own kill first; then ours
            while c.run("squeue", "--noheader", check=False, timeout=10).strip():
                if time.monotonic() > deadline:
                    break
                if time.monotonic() > killed_at:  # the tasks, not SLURM's own processes
                    _kill([p for p in _carrying(marker) if p not in daemons and not _slurm(p)])
                time.sleep(0.2)
    for name in reversed(list(c.procs)):
        proc = c.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    _kill(_carrying(marker))


def _slurm(pid: int) -> bool:
    """Whether `pid` is one of SLURM's processes (slurmstepd & co.), not a job's."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip().startswith("slurm")
    except OSError:
        return False


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _carrying(marker: bytes) -> list[int]:
    """Processes (other than this one) whose environment holds `marker`: everything this
    cluster's daemons started, since each inherits the cluster's SLURM_CONF."""
    pids = []
    for env in Path("/proc").glob("[0-9]*/environ"):
        pid = int(env.parent.name)
        if pid == os.getpid():
            continue
        try:
            if marker in env.read_bytes().split(b"\0"):
                pids.append(pid)
        except OSError:
            continue
    return pids
