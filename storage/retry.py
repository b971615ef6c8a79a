"""Retries: one budget (Retry, the `storage.retry` config section) for every transfer that must
survive a flaky object store, and the line between errors worth another try (503 SlowDown,
resets, timeouts) and those no retry fixes (403, bad credentials, a missing object or bucket).

The budget is `attempts` tries at most, and no try starts after `deadline_s`: waits grow from
`base_s`, doubling per failure up to `max_s`, each shortened by a random share of up to `jitter`
so that ranks throttled together do not come back in lockstep. The default deadline (10 minutes)
rides out a throttling storm of a few minutes; a 403 or a missing bucket fails at once.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TypeVar

from darkmatter.storage.errors import StorageError, StorageUnreachable

log = logging.getLogger("darkmatter.storage")
T = TypeVar("T")
# Its own generator: a retry must never move the global `random` state that seeded code uses.
_JITTER = random.Random()


@dataclass(frozen=True)
class Retry:
    """How hard to try one storage call. The same budget serves shard fetches, checkpoint
    uploads and checkpoint fetches, so a resume survives exactly the faults a save survives."""

    attempts: int = 40
    """Tries per transfer in all, the first included (1: never retry). With the default waits
    40 tries take longer than deadline_s, so the deadline is what ends a long storm."""
    base_s: float = 0.5
    """Seconds to wait after the first failure; doubled after each further one, up to max_s."""
    max_s: float = 30.0
    """The longest wait between two tries, in seconds."""
    jitter: float = 0.5
    """Share of each wait drawn at random (0: exact waits; 1: anywhere from 0 to the full wait)."""
    deadline_s: float = 600.0
    """Seconds from a transfer's first try after which no further try starts: a storm longer
    than this fails the transfer (and the job, for a shard fetch)."""

    def delay(self, failures: int, draw: float = 1.0) -> float:
        """Seconds to wait after `failures` (>= 1) failed tries; `draw` in [0, 1) is the random
        part (1.0: the wait before jitter)."""
        full = min(self.max_s, self.base_s * 2 ** (failures - 1))
        return float(full * (1.0 - self.jitter * (1.0 - draw)))

    def problem(self) -> str | None:
        """The first field out of range, as 'name: expected ..., got ...', or None."""
        if self.attempts < 1:
            return f"attempts: expected >= 1, got {self.attempts}"
        for f in fields(self):
            if f.name != "attempts" and getattr(self, f.name) < 0:
                return f"{f.name}: expected >= 0, got {getattr(self, f.name)}"
        if self.jitter > 1:
            return f"jitter: expected in [0, 1], got {self.jitter}"
        if self.deadline_s <= 0:
            return f"deadline_s: expected > 0, got {self.deadline_s}"
        return None


# Error codes S3 answers that no retry fixes, by what they mean to the user.
_DENIED = ("AccessDenied", "Forbidden", "403", "AllAccessDisabled", "AccountProblem")
# (Credentials that are not set at all: storage.fs raises StorageUnreachable, see errors.py.)
_CREDENTIALS = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                "InvalidSecurity", "RequestTimeTooSkewed")  # fmt: skip
_NO_BUCKET = ("NoSuchBucket",)


def _codes(e: BaseException) -> list[str]:
    """S3 error codes carried by `e` and by the error it was raised from or while handling."""
    return [getattr(err, "response", {}).get("Error", {}).get("Code", "")
            for err in (e, e.__cause__, e.__context__) if err is not None]  # fmt: skip


def is_permanent(e: BaseException) -> bool:
    """Errors no retry can fix: the object or bucket does not exist, access is denied (403),
    the credentials are missing or wrong. Everything else (503 SlowDown, resets, timeouts) is
    worth another try."""
    if isinstance(e, StorageUnreachable):  # a server that is restarting answers again
        return not e.transient
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, StorageError)):
        return True
    return any(c in _DENIED + _CREDENTIALS + _NO_BUCKET for c in _codes(e))


def permanent_reason(e: BaseException, what: str) -> str | None:
    """Why a permanent error that is not one object's absence (a 403, refused or missing
    credentials, a missing bucket) is one, naming the bucket of the s3:// URL in `what`; None
    for any other error (a missing object, a local file's error: their messages say enough)."""
    if isinstance(e, StorageUnreachable):
        return None  # its message names the endpoint or the missing variables already
    m = re.search(r"s3://([^/\s]+)", what)
    if m is None:
        return None
    bucket, codes = m.group(1), _codes(e)
    if any(c in _NO_BUCKET for c in codes):
        return f"bucket {bucket!r} does not exist"
    if any(c in _CREDENTIALS for c in codes):
        code = next(c for c in codes if c in _CREDENTIALS)
        return (f"bucket {bucket!r} refused the credentials ({code}): check "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")  # fmt: skip
    if isinstance(e, PermissionError) or any(c in _DENIED for c in codes):
        return (f"access to bucket {bucket!r} is denied (403): check the credentials and the "
                "bucket's policy")  # fmt: skip
    return None


def with_retries(
    call: Callable[[], T], what: str, policy: Retry = Retry(), *,
    on_retry: Callable[[], None] | None = None,
) -> T:  # fmt: skip
    """`call()`, tried again after transient errors within `policy`'s budget. `what` names the
    transfer and its URL ("upload of s3://bucket/key"). A missing object (FileNotFoundError)
    is raised as it is; any other permanent error (see is_permanent) at once as a StorageError
    naming the bucket; a transient one, once the budget is spent, as a StorageError saying how
    many tries over how long. `on_retry` is called before each wait (to count retries)."""
    start = time.monotonic()
    failures = 0
    while True:
        try:
            return call()
        except Exception as e:
            if is_permanent(e):
                reason = permanent_reason(e, what)
                if reason is None:
                    raise
                raise StorageError(f"{what}: {reason}") from e
            failures += 1
            spent = time.monotonic() - start
            delay = policy.delay(failures, _JITTER.random())
            if failures >= policy.attempts or spent + delay > policy.deadline_s:
                raise StorageError(
                    f"{what} failed {failures} times in {spent:.1f} s (storage.retry: "
                    f"attempts={policy.attempts}, deadline_s={policy.deadline_s:g}): {e}"
                ) from e
            log.warning("%s failed (%s); retrying in %.1f s", what, e, delay)
            if on_retry is not None:
                on_retry()
            time.sleep(delay)
