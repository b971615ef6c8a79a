"""Claims: which harness evaluates which checkpoint, so that harnesses side by side never
duplicate work.

A claim is one small JSON object per (run, checkpoint) under the harness state folder, written
with a conditional write (S3's If-None-Match / If-Match, a lock for a local folder): created only
if absent, taken over only if unchanged since it was read and expired, renewed by its owner while
it works. A harness that dies stops renewing; its claim expires and another harness (or itself,
restarted with the same id) takes it.
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


def harness_id() -> str:
    """host-pid-random: unique per process unless --id gives a stable one (a pod's name)."""
    return f"{platform.node()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Claim:
    """A held claim. `renew()` keeps it alive; `release()` removes it."""

    def __init__(self, url: str, owner: str, version: str, ttl_s: float):
        self.url, self.owner, self.version, self.ttl_s = url, owner, version, ttl_s
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        now = time.time()
        return json.dumps({"owner": self.owner, "claimed_at": now,
                           "expires_at": now + self.ttl_s}).encode()  # fmt: skip

    def renew(self) -> bool:
        """Extend the claim; False (and `lost`) if another harness has taken it meanwhile."""
        if self.lost:
            return False
        version = storage.write_if(self.url, self._body(), self.version)
        if version is None:
            self.lost = True
            log.warning("claim %s was taken over by another harness", self.url)
            return False
        self.version = version
        return True

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

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=30)
        current = storage.read_versioned(self.url)
        if current and json.loads(current[0]).get("owner") == self.owner:
            storage.delete(self.url)


def try_claim(url: str, owner: str, ttl_s: float) -> Claim | None:
    """Claim `url` for `owner`, or None if a live claim of another harness holds it."""
    now = time.time()
    claim = Claim(url, owner, "", ttl_s)
    current = storage.read_versioned(url)
    if current is not None:
        held: dict[str, Any] = _parse(current[0])
        if held.get("owner") != owner and held.get("expires_at", 0) > now:
            return None
        if held.get("owner") != owner:
            log.warning("taking over %s: %s's claim expired %.0f s ago", url, held.get("owner"),
                        now - held.get("expires_at", now))  # fmt: skip
    version = storage.write_if(url, claim._body(), current[1] if current else None)
    if version is None:
        return None  # another harness was faster
    claim.version = version
    return claim


def _parse(data: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(data)
        return parsed if isinstance(parsed, dict) else {}
    except ValueError:  # a garbled claim counts as expired
        return {}
