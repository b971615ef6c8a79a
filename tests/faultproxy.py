"""A fault-injecting HTTP reverse proxy for tests, to put in front of the local S3 server (SeaweedFS).

Point a client at ``proxy.url`` instead of the S3 endpoint (``AWS_ENDPOINT_URL`` or
``client_kwargs={"endpoint_url": proxy.url}``); every request is forwarded to the upstream
unchanged (method, path and query, headers including Host, Range and Authorization, body) and the
response is streamed back, except that some object GETs get a fault instead:

* ``"slowdown"``: a 503 with S3's ``SlowDown`` error body, without forwarding the request.
* ``"reset"``: the request is forwarded, the status line, the headers and the first
  ``reset_fraction`` of the body are sent, then the connection is reset (RST, via
  ``SO_LINGER (1, 0)``); the RST drops whatever the kernel had not sent yet, so the client may
  see fewer body bytes than that before ``ECONNRESET``.
* ``"truncate"``: the request is forwarded, the headers (with the full Content-Length) and the
  first ``truncate_fraction`` of the body are sent, then the connection is closed (FIN).

Candidates for faults are object GETs only: GET requests whose path names a key after the bucket
(``/bucket/key``), not bucket listings; ``match(path)`` narrows them further. With
``methods=("PUT",)`` object uploads are the candidates instead (a SlowDown is answered after the
body has been read, as S3 does). The schedule is
deterministic, counted over candidates in arrival order (1-based):

* ``FaultProxy(upstream, every=3, faults=("slowdown", "reset", "truncate"))``: candidates 3, 6,
  9, 12, ... get slowdown, reset, truncate, slowdown, ... in turn;
* ``FaultProxy(upstream, plan=["reset", None, "truncate"])``: candidate k gets ``plan[k - 1]``
  (None: clean) and every candidate after the plan is clean;
* ``max_faults`` caps the number of faults injected in all.

``deny(method, path)``, when given, answers every request it returns true for with a 403 and
S3's ``AccessDenied`` body, without forwarding it (counted as ``forbidden``): a bucket or prefix
the credentials may not touch. ``counts`` also has one ``METHOD`` counter per HTTP method, and
``LIST`` for bucket listings (GETs without a key), so a test can count requests by kind.

``set_schedule(...)`` replaces the schedule (and restarts candidate numbering) while the proxy
runs, e.g. to write data cleanly and then read it back with faults.

Request bodies are read by Content-Length or, for ``Transfer-Encoding: chunked``, de-chunked and
forwarded with a Content-Length (an ``aws-chunked`` Content-Encoding inside passes through
untouched). Upstream responses are re-sent with their Content-Length, or chunked when the upstream
sent none. Client connections are kept alive (HTTP/1.1); each request opens its own upstream
connection. Standard library only.

What s3fs (aiobotocore/aiohttp) does with each fault, as measured (see test_faultproxy.py):
SlowDown is retried by botocore (up to ``AWS_MAX_ATTEMPTS``, 5 by default) and then by s3fs
(5 tries), finally raising ``OSError(errno.EBUSY)`` caused by botocore's ``ClientError``; a reset or
a truncation surfaces as ``aiohttp.ClientPayloadError`` ("Not enough data to satisfy content
length"), which s3fs retries 5 times before raising it (it is not an OSError). Never a short
read without an error.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import os
import socket
import struct
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType

FAULT_KINDS = ("slowdown", "reset", "truncate")

ACCESS_DENIED_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
    b"<Message>Access Denied</Message><RequestId>FAULTPROXY</RequestId></Error>"
)
SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
)

# Hop-by-hop headers (RFC 9110 7.6.1), never forwarded; Expect is answered by the proxy itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)

_COPY_CHUNK = 64 * 1024


# The faults answered with an S3 error instead of being forwarded: status, reason, body.
_S3_ERRORS: dict[str, tuple[int, str, bytes]] = {
    "forbidden": (403, "Forbidden", ACCESS_DENIED_BODY),
    "slowdown": (503, "Slow Down", SLOWDOWN_BODY),
}


def is_object_get(method: str, path: str, methods: Sequence[str] = ("GET",)) -> bool:
    """A request for an object (``/bucket/key...`` with a non-empty key, not a bucket listing)
    whose method is one of ``methods`` (object GETs by default)."""
    if method not in methods:
        return False
    bucket, _, key = urllib.parse.urlsplit(path).path.lstrip("/").partition("/")
    return bool(bucket and key)


class FaultProxy:
    """A threaded reverse proxy to ``upstream`` that injects faults into object GETs.

    Use as a context manager (``with FaultProxy(...) as proxy:``) or call ``start``/``stop``.
    ``url`` is ``http://127.0.0.1:PORT`` once started; ``counts`` is a snapshot of the counters;
    ``injected`` lists ``(kind, path)`` of each fault in order.
    """

    def __init__(
        self,
        upstream: str,
        *,
        every: int = 0,
        faults: Sequence[str] = FAULT_KINDS,
        plan: Sequence[str | None] | None = None,
        max_faults: int | None = None,
        match: Callable[[str], bool] | None = None,
        truncate_fraction: float = 0.5,
        reset_fraction: float = 0.0,
        upstream_timeout: float = 60.0,
        idle_timeout: float = 60.0,
        methods: Sequence[str] = ("GET",),
        deny: Callable[[str, str], bool] | None = None,
    ) -> None:
        parts = urllib.parse.urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be an http:// URL, not {upstream!r}")
        self.upstream = upstream
        self._upstream_addr = (parts.hostname, parts.port or 80)
        if not (0.0 <= truncate_fraction < 1.0 and 0.0 <= reset_fraction < 1.0):
            raise ValueError("truncate_fraction and reset_fraction must be in [0, 1)")
        self.truncate_fraction = truncate_fraction
        self.reset_fraction = reset_fraction
        self.upstream_timeout = upstream_timeout
        self.idle_timeout = idle_timeout
        self.methods = tuple(methods)
        self.deny = deny
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self.injected: list[tuple[str, str]] = []
        self.log: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self.set_schedule(every=every, faults=faults, plan=plan, max_faults=max_faults, match=match)
        self.reset_counts()

    # ----------------------------------------------------------------------- schedule

    def set_schedule(
        self,
        *,
        every: int = 0,
        faults: Sequence[str] = FAULT_KINDS,
        plan: Sequence[str | None] | None = None,
        max_faults: int | None = None,
        match: Callable[[str], bool] | None = None,
    ) -> None:
        """Replace the fault schedule; candidate numbering and the fault cap start over.

        With neither ``every`` nor ``plan`` the proxy forwards everything cleanly.
        """
        if every < 0:
            raise ValueError("every must be >= 0")
        if every and plan is not None:
            raise ValueError("give either every= or plan=, not both")
        faults = tuple(faults)
        if every and not faults:
            raise ValueError("every= needs at least one fault kind")
        plan = tuple(plan) if plan is not None else None
        for kind in (*faults, *(plan or ())):
            if kind is not None and kind not in FAULT_KINDS:
                raise ValueError(f"unknown fault {kind!r}; expected one of {FAULT_KINDS}")
        with self._lock:
            self.every = every
            self.faults = faults
            self.plan = plan
            self.max_faults = max_faults
            self.match = match
            self._candidates = 0
            self._scheduled_faults = 0

    def _fault_for(self, method: str, path: str) -> str | None:
        """Count the request; the fault it gets, if any (called once per request)."""
        with self._lock:
            self._counts["requests"] += 1
            self.log.append((method, path))
            kind_of = "LIST" if method == "GET" and not is_object_get(method, path) else method
            self._counts[kind_of] = self._counts.get(kind_of, 0) + 1
            if self.deny is not None and self.deny(method, path):
                return "forbidden"
            if not is_object_get(method, path, self.methods) or (
                self.match and not self.match(path)
            ):
                return None
            self._counts["candidates"] += 1
            self._candidates += 1
            k = self._candidates
            kind: str | None = None
            if self.plan is not None:
                kind = self.plan[k - 1] if k <= len(self.plan) else None
            elif self.every and k % self.every == 0:
                kind = self.faults[(k // self.every - 1) % len(self.faults)]
            if kind is None:
                return None
            if self.max_faults is not None and self._scheduled_faults >= self.max_faults:
                return None
            self._scheduled_faults += 1
            return kind

    # ----------------------------------------------------------------------- counters

    def _bump(self, key: str, path: str | None = None) -> None:
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + 1
            if path is not None:
                self.injected.append((key, path))

    @property
    def counts(self) -> dict[str, int]:
        """Snapshot: ``requests`` (received), ``candidates`` (object GETs eligible for faults),
        ``forwarded`` (sent upstream), ``upstream_errors``, and per fault kind the number
        injected."""
        with self._lock:
            return dict(self._counts)

    @property
    def faults_injected(self) -> int:
        with self._lock:
            return sum(self._counts[k] for k in FAULT_KINDS)

    def reset_counts(self) -> None:
        with self._lock:
            self._counts = dict.fromkeys(
                ("requests", "candidates", "forwarded", "upstream_errors", "forbidden",
                 *FAULT_KINDS), 0,
            )  # fmt: skip
            self.injected = []
            self.log = []

    # ----------------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the proxy is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        if self._server is not None:
            raise RuntimeError("the proxy is already running")
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.name = f"FaultProxy:{server.server_address[1]}"
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        # Kept-alive client connections: end them so their handler threads exit now.
        with self._lock:
            conns = list(self._connections)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.url if self._server is not None else "stopped"
        return f"FaultProxy({self.upstream!r} at {where}, counts={self.counts})"


def _make_handler(proxy: FaultProxy) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(_ProxyHandler):
        pass

    Handler.proxy = proxy
    Handler.timeout = proxy.idle_timeout
    return Handler


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    proxy: FaultProxy

    def setup(self) -> None:
        super().setup()
        with self.proxy._lock:
            self.proxy._connections.add(self.connection)

    def finish(self) -> None:
        with self.proxy._lock:
            self.proxy._connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def handle(self) -> None:
        # OSError: the client went away (or we reset it); nothing left to answer.
        with contextlib.suppress(OSError):
            super().handle()

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: tests read counts, not logs

    # Every method goes the same way.
    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    # ----------------------------------------------------------------------- request

    def _read_body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length = self.headers.get("Content-Length")
        if length is None:
            return None
        return self.rfile.read(int(length))

    def _read_chunked(self) -> bytes:
        parts: list[bytes] = []
        while True:
            line = self.rfile.readline(65537)
            size = int(line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                # Trailers, up to the blank line.
                while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            parts.append(self.rfile.read(size))
            self.rfile.readline(65537)  # CRLF after the chunk

    def _forward_headers(self, headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        named = {
            name.strip().lower()
            for key, value in headers
            if key.lower() == "connection"
            for name in value.split(",")
        }
        return [
            (k, v) for k, v in headers if k.lower() not in HOP_BY_HOP and k.lower() not in named
        ]

    def _handle(self) -> None:
        proxy = self.proxy
        body = self._read_body()
        fault = proxy._fault_for(self.command, self.path)
        if fault in _S3_ERRORS:  # answered here, never forwarded
            proxy._bump(fault, self.path)
            status, reason, error_body = _S3_ERRORS[fault]
            self.send_response_only(status, reason)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(error_body)))
            self.send_header("x-amz-request-id", "FAULTPROXY")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(error_body)
            return

        # Host and everything end-to-end as the client sent them (SigV4 signs Host).
        headers = self._forward_headers(list(self.headers.items()))
        if body is not None:
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
            headers.append(("Content-Length", str(len(body))))
        upstream = http.client.HTTPConnection(*proxy._upstream_addr, timeout=proxy.upstream_timeout)
        try:
            try:
                upstream.putrequest(
                    self.command, self.path, skip_host=True, skip_accept_encoding=True
                )
                for key, value in headers:
                    upstream.putheader(key, value)
                upstream.endheaders(body)
                resp = upstream.getresponse()
            except OSError as e:
                proxy._bump("upstream_errors")
                self._send_error_body(502, f"upstream {proxy.upstream}: {e}")
                return
            proxy._bump("forwarded")
            self._relay(resp, fault)
        finally:
            upstream.close()

    def _send_error_body(self, status: int, message: str) -> None:
        data = message.encode()
        self.send_response_only(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    # ----------------------------------------------------------------------- response

    def _relay(self, resp: http.client.HTTPResponse, fault: str | None) -> None:
        no_body = self.command == "HEAD" or resp.status in (204, 304) or resp.status < 200
        length = resp.getheader("Content-Length")
        # Faults need a known length; read a body of unknown length fully first.
        if fault is not None and not no_body and length is None:
            data = resp.read()
            length = str(len(data))
            source: http.client.HTTPResponse | None = None
        else:
            data = b""
            source = resp
        chunked = not no_body and length is None

        self.send_response_only(resp.status, resp.reason)
        for key, value in self._forward_headers(resp.getheaders()):
            if chunked and key.lower() == "content-length":
                continue
            if fault is not None and key.lower() == "content-length":
                value = length  # type: ignore[assignment]
            self.send_header(key, value)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if no_body:
            return

        if fault is None:
            self._copy_body(resp, chunked)
            return

        total = int(length)  # type: ignore[arg-type]
        fraction = (
            self.proxy.truncate_fraction if fault == "truncate" else self.proxy.reset_fraction
        )
        keep = int(total * fraction)
        if source is not None:
            data = source.read(keep)
        self.wfile.write(data[:keep])
        self.wfile.flush()
        self.proxy._bump(fault, self.path)
        if fault == "reset":
            self._reset_connection()
        else:
            self.close_connection = True  # FIN after the partial body

    def _copy_body(self, resp: http.client.HTTPResponse, chunked: bool) -> None:
        while True:
            block = resp.read1(_COPY_CHUNK) if chunked else resp.read(_COPY_CHUNK)
            if not block:
                break
            if chunked:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
            else:
                self.wfile.write(block)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _reset_connection(self) -> None:
        """Abort the client connection with a TCP RST (SO_LINGER on, zero timeout)."""
        self.close_connection = True
        sock = self.connection
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # Close the descriptor now: socket.close() would wait for rfile/wfile to be closed, and
        # socketserver's own shutdown(SHUT_WR) would send a FIN first. After detach() the socket
        # object and its files only see a closed descriptor (OSError, which handle() ignores).
        with contextlib.suppress(OSError):
            os.close(sock.detach())
