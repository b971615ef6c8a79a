"""Retries: one policy (Retry) for every transfer that must survive a flaky object store, and
the line between errors worth another try (503 SlowDown, resets, timeouts) and those no retry
fixes (403, a missing object or bucket)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from darkmatter.storage.errors import StorageError

log = logging.getLogger("darkmatter.storage")
T = TypeVar("T")


@dataclass(frozen=True)
class Retry:
    """How hard to try one storage call: `retries` attempts after the first, waiting
    `backoff_s`, then twice that, ... at most `max_delay_s` between attempts.

    The same budget serves checkpoint uploads and checkpoint fetches (checkpoint.upload_retries),
    so a resume survives exactly the faults a save survives. The data reader resumes a broken
    shard body where it stopped and keeps its own loop (data.retries), on the same schedule."""

    retries: int = 5
    backoff_s: float = 0.5
    max_delay_s: float = 30.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (0-based)."""
        return float(min(self.max_delay_s, self.backoff_s * 2**attempt))


def is_permanent(e: BaseException) -> bool:
    """Errors no retry can fix: the object does not exist, access is denied (403), the
    bucket is missing. Everything else (503 SlowDown, resets, timeouts) is worth another try."""
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, StorageError)):
        return True
    for err in (e, e.__cause__):
        code = getattr(err, "response", {}).get("Error", {}).get("Code", "")
        if code in ("AccessDenied", "Forbidden", "403", "NoSuchBucket", "InvalidAccessKeyId",
                    "SignatureDoesNotMatch"):  # fmt: skip
            return True
    return False


def with_retries(call: Callable[[], T], what: str, policy: Retry = Retry()) -> T:
    """`call()`, tried again after transient errors per `policy`; a permanent error (see
    is_permanent) is raised at once. After the last attempt the error is raised as it is,
    with `what` and the number of attempts added to its message when it is an OSError."""
    for attempt in range(policy.retries + 1):
        try:
            return call()
        except Exception as e:
            if is_permanent(e):
                raise
            if attempt == policy.retries:
                raise StorageError(f"{what} failed {attempt + 1} times: {e}") from e
            delay = policy.delay(attempt)
            log.warning("%s failed (%s); retrying in %.1f s", what, e, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")
