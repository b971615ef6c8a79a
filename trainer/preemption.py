"""Preemption: the signals that ask a job to stop (the loop checkpoints at the next step
boundary, within a grace period), the exit code schedulers expect of it, and SLURM's requeue."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
import time
from typing import Any

log = logging.getLogger("darkmatter.train")

PREEMPTED_EXIT = 143  # 128 + SIGTERM: what schedulers expect of a job that stopped on request


class Preempted(Exception):
    """The job was asked to stop (a preemption signal); its checkpoint is committed."""

    def __init__(self, signal_name: str):
        super().__init__(f"preempted by {signal_name}")
        self.signal_name = signal_name


class Signals:
    """Preemption signals set a flag that the loop reads at the next step boundary. A watchdog
    ends the process when the grace period runs out, checkpoint or not: a torn save is safe."""

    def __init__(self, names: str, grace_s: float):
        self.received: str | None = None
        self.grace_s = grace_s
        for name in filter(None, (n.strip() for n in names.split(","))):
            signal.signal(getattr(signal, name), self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            log.warning("%s received: checkpointing at the end of this step", self.received)
            threading.Thread(target=self._watchdog, name="grace", daemon=True).start()

    def _watchdog(self) -> None:
        time.sleep(self.grace_s)
        log.error("grace period of %.0f s ran out before the checkpoint committed", self.grace_s)
        os._exit(PREEMPTED_EXIT)


def slurm_requeue() -> None:
    """Under SLURM, put the job back in the queue; it continues from the checkpoint just made."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if not job:
        return
    if task := os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{job}_{task}"
    if not re.fullmatch(r"\d+(_\d+)?", job):  # never pass an unchecked value to a command
        log.error("SLURM job id %r is malformed: not requeueing", job)
        return
    try:
        out = subprocess.run(
            ["scontrol", "requeue", job], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as e:  # no scontrol here, or it hangs
        log.error("scontrol requeue %s failed: %s", job, e)
        return
    if out.returncode:
        log.error("scontrol requeue %s failed: %s", job, out.stderr.strip())
    else:
        log.warning("requeued SLURM job %s", job)
