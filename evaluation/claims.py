"""Claims: which harness evaluates which checkpoint, so that harnesses side by side never
duplicate work.

A claim is one small JSON record per (run, checkpoint) under the harness state folder:
`{owner, token, state, claimed_at, expires_at}`. Every transition is a conditional write
(storage.write_if: S3's If-None-Match / If-Match, an exclusive lock for a local folder) against
the version its writer last saw, so a harness can only change a claim nobody changed since:

    acquire   create if absent, or replace one that is released, done, expired or this
              owner's own (a restart under the same id), if unchanged since it was read
    renew     extend it (state "held"), if still at the version this claim last wrote
    release   overwrite it with state "released", likewise; complete: state "done"

A claim is never deleted: S3 has no portable conditional DELETE, and an unconditional one by a
harness that stalled past its lease would remove the claim of the harness that took over (and a
third one would evaluate the checkpoint again). A stale holder's writes fail (412) instead and
it learns it has lost the claim. "done" frees the claim like "released": whether a checkpoint
has results is the run's `eval.<tag>` tag in MLflow, which the next holder reads first.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import threading
import time
import uuid
from typing import Any

from darkmatter import storage

log = logging.getLogger("darkmatter.evaluation")

HELD, RELEASED, DONE = "held", "released", "done"


def harness_id() -> str:
    """host-pid-random: unique per process unless --id gives a stable one (a pod's name)."""
    return f"{platform.node()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Claim:
    """A held claim. `renew()` keeps it alive; `complete()` or `release()` gives it up."""

    def __init__(self, url: str, owner: str, version: str, ttl_s: float):
        self.url, self.owner, self.version, self.ttl_s = url, owner, version, ttl_s
        self.token = uuid.uuid4().hex  # this acquisition, whatever the owner's name
        self.lost = False  # another harness took it over (or our write failed the check)
        self.finished = False  # released or completed by us
        self._lock = threading.Lock()  # the renewal thread and the caller share self.version
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self, state: str) -> bytes:
        now = time.time()
        return json.dumps({"owner": self.owner, "token": self.token, "state": state,
                           "claimed_at": now, "expires_at": now + self.ttl_s}).encode()  # fmt: skip

    def _transition(self, state: str) -> bool:
        """Write `state` if the claim is still at the version we last wrote; False (and `lost`)
        if another harness changed it meanwhile."""
        with self._lock:
            if self.lost or self.finished:
                return False
            version = storage.write_if(self.url, self._body(state), self.version)
            if version is None:
                self.lost = True
                log.warning("claim %s was taken over by another harness", self.url)
                return False
            self.version = version
            self.finished = state != HELD
            return True

    def renew(self) -> bool:
        """Extend the claim; False (and `lost`) if another harness has taken it meanwhile."""
        return self._transition(HELD)

    def keep_alive(self) -> None:
        """Renew every third of the ttl in a background thread until released."""

        def loop() -> None:
            while not self._stop.wait(self.ttl_s / 3):
                try:
                    if not self.renew():
                        return
                except Exception as e:  # storage hiccup: try again next time
                    log.warning("renewing claim %s failed: %s", self.url, e)

        self._thread = threading.Thread(target=loop, name="claim-renewal", daemon=True)
        self._thread.start()

    def complete(self) -> bool:
        """The results are in MLflow: mark the claim done (and free). False if it was lost."""
        return self._finish(DONE)

    def release(self) -> bool:
        """Give the claim up unfinished. A no-op (False) once completed, or if another harness
        holds it now: its claim is left as it is."""
        return self._finish(RELEASED)

    def _finish(self, state: str) -> bool:
        self._stop.set()
        if self._thread and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        try:
            return self._transition(state)
        except Exception as e:  # the claim expires on its own: say so, do not mask the outcome
            log.warning("could not mark claim %s %s (it expires in %.0f s): %s", self.url,
                        state, self.ttl_s, e)  # fmt: skip
            return False


def try_claim(url: str, owner: str, ttl_s: float) -> Claim | None:
    """Claim `url` for `owner`, or None if a live claim of another harness holds it (or another
    harness claimed it between our read and our write)."""
    current = storage.read_versioned(url)
    if current is not None and not _free(url, _parse(current[0]), owner):
        return None
    claim = Claim(url, owner, "", ttl_s)
    version = storage.write_if(url, claim._body(HELD), current[1] if current else None)
    if version is None:
        return None  # another harness was faster
    claim.version = version
    return claim


def _free(url: str, held: dict[str, Any], owner: str) -> bool:
    """Whether a claim record can be taken: given up, this owner's own, or expired."""
    if held.get("state") in (RELEASED, DONE) or held.get("owner") == owner:
        return True
    now = time.time()
    try:
        expires_at = float(held.get("expires_at", 0))
    except (TypeError, ValueError, OverflowError):  # garbled (or past any float): expired
        expires_at = 0.0
    if expires_at > now:
        return False
    log.warning("taking over %s: %s's claim expired %.0f s ago", url, held.get("owner"),
                now - expires_at)  # fmt: skip
    return True


def _parse(data: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(data)
        return parsed if isinstance(parsed, dict) else {}
    except (ValueError, RecursionError):  # a garbled claim counts as expired
        return {}
