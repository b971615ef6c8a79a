"""Two "hosts" on one machine for tests: two Linux network namespaces joined by a veth pair.

Each namespace has its own `lo` and one end of the link, with an address from a private /30
that exists only inside the two namespaces (nothing is routed to or from the machine's own
network). Processes started with `Hosts.cmd(i, ...)` see only their namespace's interfaces
while sharing the machine's filesystem, so two torchrun nodes can meet over the link, and the
link can be cut (`set_link`) like a network failure between two machines. Needs root or
CAP_NET_ADMIN and the `ip` tool (iproute2); `unavailable()` says why not.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass

# The link's subnet: private (RFC 1918), and only ever configured inside the two namespaces.
SUBNET = "10.213.7.0/30"
ADDRS = ("10.213.7.1", "10.213.7.2")
IFNAMES = ("dmveth0", "dmveth1")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and out.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip() or out.returncode}")
    return out


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None when they can): no `ip`, or not permitted."""
    if not shutil.which("ip"):
        return "the ip tool (iproute2) is not installed"
    probe = f"dmprobe{os.getpid()}"
    out = _ip("netns", "add", probe, check=False)
    if out.returncode:
        return f"ip netns add is not permitted here (needs root or CAP_NET_ADMIN): {out.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@dataclass
class Hosts:
    """Two namespaces `names[i]`, each with interface `IFNAMES[i]` at `ADDRS[i]`."""

    names: tuple[str, str]

    @property
    def addrs(self) -> tuple[str, str]:
        return ADDRS

    @property
    def ifnames(self) -> tuple[str, str]:
        return IFNAMES

    def cmd(self, i: int, argv: list[str]) -> list[str]:
        """`argv` run inside namespace i (the environment passes through unchanged)."""
        return ["ip", "netns", "exec", self.names[i], *argv]

    def set_link(self, i: int, up: bool) -> None:
        """Bring host i's end of the link down (the peer loses its carrier too) or back up."""
        _ip("-n", self.names[i], "link", "set", IFNAMES[i], "up" if up else "down")

    def sysctl(self, i: int, key: str, value: str) -> None:
        """Set a network sysctl of namespace i only (net.* keys are per namespace)."""
        out = subprocess.run(self.cmd(i, ["sysctl", "-qw", f"{key}={value}"]),
                             capture_output=True, text=True, timeout=30)  # fmt: skip
        if out.returncode:
            raise RuntimeError(f"sysctl {key}={value} in {self.names[i]}: {out.stderr.strip()}")

    def link_is_up(self, i: int) -> bool:
        out = _ip("-n", self.names[i], "-o", "link", "show", IFNAMES[i])
        return "state UP" in out.stdout

    def pids(self, i: int) -> list[int]:
        """Processes running in namespace i (all of them started by this object's user)."""
        out = _ip("netns", "pids", self.names[i], check=False)
        return [int(p) for p in out.stdout.split()]

    def kill_all(self, timeout: float = 10.0) -> None:
        """SIGKILL every process left in either namespace and wait until they are gone."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            left = [p for i in (0, 1) for p in self.pids(i)]
            if not left:
                return
            for pid in left:
                with contextlib.suppress(ProcessLookupError):  # ended meanwhile
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)

    def destroy(self) -> None:
        """Kill what runs inside, then delete both namespaces (which deletes the veth pair)."""
        self.kill_all()
        for name in self.names:
            _ip("netns", "del", name, check=False)


def create(tag: str) -> Hosts:
    """Two namespaces named `dm-TAG-0` / `dm-TAG-1` (make TAG unique: include the pid), joined
    by a veth pair, `lo` and the link up. Whatever was made is removed again if a step fails."""
    hosts = Hosts((f"dm-{tag}-0", f"dm-{tag}-1"))
    try:
        for name in hosts.names:
            _ip("netns", "add", name)
        # Both ends are created directly inside their namespaces: never on the machine's side.
        _ip("link", "add", IFNAMES[0], "netns", hosts.names[0], "type", "veth",
            "peer", "name", IFNAMES[1], "netns", hosts.names[1])  # fmt: skip
        prefix = SUBNET.split("/")[1]
        for i, name in enumerate(hosts.names):
            _ip("-n", name, "link", "set", "lo", "up")
            _ip("-n", name, "addr", "add", f"{ADDRS[i]}/{prefix}", "dev", IFNAMES[i])
            _ip("-n", name, "link", "set", IFNAMES[i], "up")
    except BaseException:
        hosts.destroy()
        raise
    return hosts
