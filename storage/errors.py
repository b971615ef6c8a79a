"""The errors every storage failure that a user must act on is raised as, and the one place
that tells "nothing answers at the endpoint" and "no credentials" apart from other failures
(describe_storage_error), so that each is one line naming the endpoint or the variable."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

# Hosts of this machine: an endpoint there is most likely the local stack (`darkmatter stack`).
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "0.0.0.0"})
CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


# Endpoints that answered this process at least once. Nothing answering at one that never did
# is a setting to fix (a wrong URL, a stack not started), reported at once; at one that did,
# it is an outage (a server restarting) and worth the retry budget.
_answered: set[str] = set()


def mark_answered() -> None:
    """Record that the endpoint in use answered (storage.fs calls it after each success)."""
    _answered.add(endpoint_setting()[1])


class StorageError(RuntimeError):
    """Object storage is missing or unreachable; the message names the URL or bucket."""


class StorageUnreachable(StorageError):
    """Nothing answers at the object store's endpoint, or no credentials are set; the message
    names the endpoint (and the variable it came from) or the missing variables.

    `transient`: whether another try may succeed (a server restarting answers again; missing
    credentials stay missing), which is what storage.retry.is_permanent goes by.
    """

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


def endpoint_setting() -> tuple[str, str]:
    """(variable, value) of the S3 endpoint in use, as storage.fs reads it; ("", "") for
    AWS's default endpoint."""
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(var):
            return var, os.environ[var]
    return "", ""


def is_local(url: str) -> bool:
    """Whether a URL's host is this machine (where `darkmatter stack up` serves)."""
    try:
        return (urlsplit(url).hostname or "") in LOCAL_HOSTS
    except ValueError:  # not a URL at all
        return False


def stack_hint(url: str) -> str:
    """The sentence to append to an error about a server at `url`: how to start the local
    stack when the URL is on this machine, else nothing."""
    return "; if that is the local stack, `darkmatter stack up` starts it" if is_local(url) else ""


def describe_storage_error(exc: BaseException, url: str = "") -> StorageUnreachable | None:
    """The one-line error for `exc` (or any exception it was raised from) when it means that
    object storage cannot be reached at all or that no credentials are set; None for every
    other failure. `url` is the object or prefix that was being accessed, named in the line."""
    chain = _chain(exc)
    if line := _credentials_line(chain, url):
        return StorageUnreachable(line, transient=False)
    reason = _connection_reason(chain)
    if reason is None:
        return None
    var, endpoint = endpoint_setting()
    if endpoint:
        where = f"{_strip_userinfo(endpoint)} ({var})"
    else:
        where = (
            f"{_failed_endpoint(chain) or 'the default AWS endpoint'} (AWS_ENDPOINT_URL is not set)"
        )
    access = f" to access {url}" if url else ""
    line = f"cannot reach object storage at {where}{access}: {reason}{stack_hint(endpoint)}"
    return StorageUnreachable(line, transient=endpoint in _answered)


def _chain(exc: BaseException) -> list[BaseException]:
    """exc and the exceptions it was raised from or while handling, outermost first."""
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and all(cur is not s for s in seen):
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def _credentials_line(chain: list[BaseException], url: str) -> str:
    from botocore.exceptions import NoCredentialsError, PartialCredentialsError

    for e in chain:
        if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
            missing = [v for v in CREDENTIAL_VARS if not os.environ.get(v)] or list(CREDENTIAL_VARS)
            verb = "is" if len(missing) == 1 else "are"
            _, endpoint = endpoint_setting()
            hint = ""
            if not endpoint or is_local(endpoint):  # most likely: the local stack is not up
                hint = "; for the local stack, `darkmatter stack up` starts it and sets them"
            what = url or "object storage"
            return f"no credentials to access {what}: {' and '.join(missing)} {verb} not set{hint}"
    return ""


def _connection_reason(chain: list[BaseException]) -> str | None:
    """Why no connection was made, for the errors that mean exactly that; None otherwise (a
    reset or a 503 mid-transfer is another failure: the endpoint did answer)."""
    import socket

    from aiohttp import ClientConnectorError
    from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError

    if not any(isinstance(e, (EndpointConnectionError, ClientConnectorError)) for e in chain):
        return None
    if any(isinstance(e, ConnectionRefusedError) for e in chain):
        return "connection refused (nothing listens there)"
    if any(isinstance(e, socket.gaierror) for e in chain):
        return "host name not found"
    if any(isinstance(e, (ConnectTimeoutError, TimeoutError)) for e in chain):
        return "no answer (connect timeout)"
    return "no connection"


def _failed_endpoint(chain: list[BaseException]) -> str:
    for e in chain:
        endpoint = getattr(e, "kwargs", {}).get("endpoint_url")
        if endpoint:
            return str(endpoint)
    return ""


def _strip_userinfo(url: str) -> str:
    """A URL without a user:password@ part (never print credentials)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]).geturl()
