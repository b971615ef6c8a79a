"""Fault injection points, for the fault-catalogue tests.

`DARKMATTER_FAILPOINTS` holds comma-separated `name@step` or `name@step@rank` entries; code asks
`hit(name, step, rank)` at the place a fault can strike, e.g. `ckpt.after_write@6` kills the
process right after rank files of the step-6 checkpoint are written, before they are uploaded or
committed. Unset (always, outside tests), `hit` is one dictionary lookup. `train.pause@8@1`
holds rank 1 for `DARKMATTER_FAILPOINT_PAUSE_S` seconds (default 5) after step 8: a test can
act on the job (cut a link) while it stands still at a known step.
"""

from __future__ import annotations

import os
import signal
import time

_ENV = "DARKMATTER_FAILPOINTS"


def _parse(text: str) -> dict[str, list[tuple[int, int | None]]]:
    points: dict[str, list[tuple[int, int | None]]] = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        name, _, rest = entry.partition("@")
        step, _, rank = rest.partition("@")
        points.setdefault(name, []).append((int(step), int(rank) if rank else None))
    return points


_POINTS = _parse(os.environ.get(_ENV, ""))


def hit(name: str, step: int, rank: int) -> bool:
    """True when the failpoint `name` is armed for this step and rank; each fires once per
    process (a step redone after a rollback does not fail again)."""
    points = _POINTS.get(name, [])
    for i, (at_step, at_rank) in enumerate(points):
        if at_step == step and at_rank in (None, rank):
            del points[i]
            return True
    return False


def kill_if(name: str, step: int, rank: int) -> None:
    """SIGKILL this process at an armed failpoint: no handler, no cleanup, like a lost node."""
    if hit(name, step, rank):
        os.kill(os.getpid(), signal.SIGKILL)


def pause_if(name: str, step: int, rank: int) -> None:
    """Sleep DARKMATTER_FAILPOINT_PAUSE_S seconds (default 5) at an armed failpoint: the peers
    wait in their next collective, which a pause shorter than the collective timeout survives."""
    if hit(name, step, rank):
        time.sleep(float(os.environ.get("DARKMATTER_FAILPOINT_PAUSE_S", "5")))
