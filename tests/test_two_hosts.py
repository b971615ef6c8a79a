"""Two hosts for real: one torchrun node in each of two network namespaces, joined by a veth
pair (tests/netns.py), a c10d rendezvous across the link, ZeRO-2 over gloo on the veth
addresses. The link is cut after a committed checkpoint and two more steps: both nodes must fail
within the configured collective timeout (faults.collective_timeout_s), not torch's 30-minute
default. With the link back, a new rendezvous resumes from the checkpoint and the steps after it
repeat the first run's losses bit for bit, up to the last step.

Both nodes share this machine's filesystem: the dataset and the checkpoint root are local
folders, as a shared file system would be; tracking is off (the local stack listens on the
machine's loopback, which is not reachable from inside the namespaces).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from darkmatter.trainer import checkpoint as ckpt
from tests import netns
from tests.helpers import REPO_ROOT, metrics, write_config

pytestmark = pytest.mark.distributed

STEPS, EVERY, CUT_AT = 10, 4, 6  # checkpoint at 4, link cut after step 6 (= 4 + 2)
COLLECTIVE_TIMEOUT_S = 8
PAUSE_S = 2  # rank 1 stands still after step 6 while the link goes down
# Linux gives up on a TCP connection with unacknowledged data after tcp_retries2 retransmissions
# (15 by default: about 15 minutes). torchrun's agent on the node that does not host the
# rendezvous store waits for the store's answer on such a connection (torch's TCPStore has no
# timeout left at that point), so it would outlive the job by that long. 5 retransmissions end
# the connection about 12.6 s after the cut: later than the collective timeout (the workers fail
# on it first), soon enough for the test.
TCP_RETRIES2 = 5


@pytest.fixture
def hosts() -> Iterator[netns.Hosts]:
    """Two namespaces joined by a veth pair, removed (with every process inside) afterwards."""
    reason = netns.unavailable()
    if reason:
        pytest.skip(reason)
    made = netns.create(str(os.getpid()))
    try:
        for i in (0, 1):
            made.sysctl(i, "net.ipv4.tcp_retries2", str(TCP_RETRIES2))
        yield made
    finally:
        made.destroy()


class Job:
    """One torchrun node per namespace, both started at once, logs in files."""

    def __init__(self, hosts: netns.Hosts, cfg: Path, logs: Path, rdzv_id: str, port: int,
                 env: dict[str, str] | None = None):  # fmt: skip
        self.logs = [logs / f"{rdzv_id}-node{i}.log" for i in (0, 1)]
        self.files: list[IO[Any]] = [open(p, "w") for p in self.logs]  # noqa: SIM115
        self.procs = [
            subprocess.Popen(
                hosts.cmd(i, self._torchrun(hosts, i, cfg, rdzv_id, port)),
                cwd=REPO_ROOT,
                stdout=self.files[i],
                stderr=subprocess.STDOUT,
                env={
                    **os.environ,
                    **(env or {}),
                    # gloo binds the link's address, not what the hostname resolves to
                    "GLOO_SOCKET_IFNAME": hosts.ifnames[i],
                    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
                },
            )
            for i in (0, 1)
        ]

    @staticmethod
    def _torchrun(hosts: netns.Hosts, i: int, cfg: Path, rdzv_id: str, port: int) -> list[str]:
        """launch/torchrun.sh, as on a cluster node; its settings are variables."""
        settings = {
            "NNODES": "2", "NPROC_PER_NODE": "1", "RDZV_ID": rdzv_id,
            "RDZV_ENDPOINT": f"{hosts.addrs[0]}:{port}",
            # Node 0 hosts the rendezvous store (its address is not the hostname's, so torchrun
            # cannot tell by itself); LOCAL_ADDR is what the workers get as MASTER_ADDR.
            "RDZV_CONF": f"is_host={int(i == 0)},join_timeout=60,read_timeout=10",
            "LOCAL_ADDR": hosts.addrs[i], "MAX_RESTARTS": "0", "MONITOR_INTERVAL": "0.5",
            "PYTHON": sys.executable,
        }  # fmt: skip
        env = [f"{k}={v}" for k, v in settings.items()]
        return ["env", *env, "bash", str(REPO_ROOT / "launch" / "torchrun.sh"), str(cfg)]

    def wait(self, timeout: float) -> list[int]:
        """Both exit codes; fails the test (with both logs' tails) past `timeout`."""
        deadline = time.monotonic() + timeout
        try:
            return [p.wait(timeout=max(0.1, deadline - time.monotonic())) for p in self.procs]
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"job still running after {timeout:.0f} s\n{self.tails()}"
            ) from None

    def running(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def tails(self, chars: int = 2500) -> str:
        return "\n".join(
            f"--- node {i}:\n{p.read_text()[-chars:]}" for i, p in enumerate(self.logs)
        )

    def output(self, i: int) -> str:
        return self.logs[i].read_text()

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for f in self.files:
            f.close()


def logged_steps(run_dir: Path) -> list[int]:
    """Steps in metrics.jsonl so far (complete lines only: rank 0 may be writing one)."""
    path = run_dir / "metrics.jsonl"
    text = path.read_text() if path.is_file() else ""
    return [json.loads(line)["step"] for line in text.split("\n")[:-1] if line]


@pytest.mark.slow  # 45 s of make test's 20 minutes; CI's slow tier runs it
def test_link_cut_fails_within_the_collective_timeout_and_a_restart_resumes_bit_exact(
    hosts: netns.Hosts, text_ds: str, tmp_path: Path
) -> None:
    run_dir, root = tmp_path / "run", tmp_path / "checkpoints"  # one folder seen by both nodes
    cfg = write_config(
        tmp_path / "c.yaml", text_ds, run_dir,
        train={"zero_stage": 2, "steps": STEPS, "log_every": 1},
        checkpoint={"every": EVERY, "root": str(root)},
        faults={"collective_timeout_s": COLLECTIVE_TIMEOUT_S},
    )  # fmt: skip
    pause = {"DARKMATTER_FAILPOINTS": f"train.pause@{CUT_AT}@1",
             "DARKMATTER_FAILPOINT_PAUSE_S": str(PAUSE_S)}  # fmt: skip

    job = Job(hosts, cfg, tmp_path, "first", 29400, env=pause)
    try:
        deadline = time.monotonic() + 150
        while CUT_AT not in logged_steps(run_dir):
            assert job.running(), f"a node ended before step {CUT_AT}:\n{job.tails()}"
            assert time.monotonic() < deadline, f"no step {CUT_AT} in time:\n{job.tails()}"
            time.sleep(0.02)
        hosts.set_link(1, up=False)  # rank 1 is paused, rank 0 waits in step 7's all-reduce
        cut = time.monotonic()
        assert not hosts.link_is_up(0) and not hosts.link_is_up(1)
        codes = job.wait(timeout=120)
        took = time.monotonic() - cut
    finally:
        job.close()
    assert all(code != 0 for code in codes), (codes, job.tails())
    # The configured timeout, not torch's 30 minutes, ended the workers...
    for i in (0, 1):
        assert f"Timed out waiting {COLLECTIVE_TIMEOUT_S * 1000}ms" in job.output(i), job.tails()
    # ...and both launchers were gone soon after (node 1's once TCP gave up on the link).
    assert took < COLLECTIVE_TIMEOUT_S + 20, f"{took:.1f} s after the cut\n{job.tails()}"
    first = metrics(run_dir)
    assert [r["step"] for r in first] == list(range(1, CUT_AT + 1))  # nothing after the cut
    assert ckpt.committed_tags(str(root)) == [ckpt.tag_for(EVERY)]

    hosts.set_link(1, up=True)
    job = Job(hosts, cfg, tmp_path, "second", 29401)  # a new rendezvous, no failpoint
    try:
        codes = job.wait(timeout=150)
    finally:
        job.close()
    assert codes == [0, 0], job.tails()
    both = job.output(0) + job.output(1)
    assert f"checkpoints/{ckpt.tag_for(EVERY)} (step {EVERY})" in both  # resumed there
    second = metrics(run_dir)
    assert [r["step"] for r in second] == list(range(1, STEPS + 1))  # to the end
    # The steps after the checkpoint that the first run logged before the cut: same losses,
    # compared with == (same world size, data position, RNG state).
    redone = [(r["step"], r["loss"]) for r in second if EVERY < r["step"] <= CUT_AT]
    assert redone == [(r["step"], r["loss"]) for r in first if r["step"] > EVERY]
    assert len(redone) == CUT_AT - EVERY
    assert ckpt.committed_tags(str(root))[-1] == ckpt.tag_for(STEPS)
