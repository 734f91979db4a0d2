"""A small fault-injecting HTTP proxy for tests: sits between S3 clients and moto's server on 127.0.0.1.

Point `AWS_ENDPOINT_URL` at `proxy.endpoint`; clients then sign their requests for the proxy's host, and the proxy
forwards each request unchanged (method, path, query, headers including Host, body) to the upstream server. Faults
are chosen per request, before anything is forwarded, so a failed request never reaches the store:

- `fail_next(n)`: the next `n` matching requests fail;
- `fail_every(k)`: every k-th matching request fails;
- `down` / `set_down()`: every matching request fails until `set_down(False)`.

A fault answers with an S3-style XML error (`status=500` / `503`) or drops the connection without a response
(`status=None`). `methods` restricts a fault to some HTTP methods (e.g. `("PUT", "POST")`: uploads only) and `path`
to requests whose path (with the query) contains that text (e.g. one object key).

`max_faults_per_request` makes faults transient: the same request (method + path with query, which is how a client's
retries of one upload or read look) is failed at most that many times by `fail_next`/`fail_every`; clients that retry
more often than that always get through. Counters: `requests` (seen, by method in `seen`), `faults` (injected, by
kind in `injected`), `forwarded`; `transfers` lists (method, path, response body bytes) of every forwarded request,
and `body_bytes` sums them: the bytes a client fetched, counted at the HTTP layer.
"""

from __future__ import annotations

import http.client
import socket
import threading
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit
from xml.sax.saxutils import escape

Methods = Iterable[str] | None
MAX_BODY = 256 << 20  # requests larger than this are refused (tests upload small checkpoints)
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
}
ERRORS = {
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("SlowDown", "Please reduce your request rate."),
}


@dataclass
class Rule:
    """One fault source: which requests it matches and how they fail."""

    methods: frozenset[str] | None  # None: every method
    path: str | None  # None: every path; else a substring of the request path (with the query)
    status: int | None  # HTTP error status, or None to drop the connection
    remaining: int | None = None  # fail_next: how many failures are left
    every: int | None = None  # fail_every: fail each k-th matching request
    matched: int = field(default=0)

    def matches(self, method: str, path: str) -> bool:
        return (self.methods is None or method in self.methods) and (self.path is None or self.path in path)

    def fires(self) -> bool:
        """Called for a matching request; True when this request must fail."""
        self.matched += 1
        if self.remaining is not None:
            if self.remaining <= 0:
                return False
            self.remaining -= 1
            return True
        return self.every is not None and self.matched % self.every == 0


class FaultProxy:
    """A threaded HTTP proxy on 127.0.0.1 (a free port) in front of `upstream`, with controllable faults."""

    def __init__(
        self, upstream: str, max_faults_per_request: int | None = None, timeout: float = 60.0, log_size: int = 10_000
    ) -> None:
        parts = urlsplit(upstream)
        if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"FaultProxy only forwards to loopback, not {upstream!r}")
        self.upstream = (parts.hostname, parts.port or 80)
        self.timeout = timeout
        self.max_faults_per_request = max_faults_per_request
        self.failed: Counter[tuple[str, str]] = Counter()  # faults injected per (method, path)
        self.lock = threading.Lock()
        self.rules: list[Rule] = []
        self.down_rule: Rule | None = None
        self.seen: Counter[str] = Counter()  # requests by method
        self.injected: Counter[str] = Counter()  # faults by "METHOD status" / "METHOD drop"
        self.forwarded = 0
        self.transfers: list[tuple[str, str, int]] = []  # (method, path, response body bytes), forwarded requests
        self.log: deque[tuple[str, str, str]] = deque(maxlen=log_size)  # (method, path, outcome)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="faultproxy", daemon=True)

    # ------------------------------------------------------------------ lifecycle
    @property
    def endpoint(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ faults
    def fail_next(self, n: int, status: int | None = 503, methods: Methods = None, path: str | None = None) -> None:
        """The next `n` matching requests fail with `status`, or drop the connection when status is None."""
        with self.lock:
            self.rules.append(Rule(_methods(methods), path, status, remaining=n))

    def fail_every(self, k: int, status: int | None = 503, methods: Methods = None, path: str | None = None) -> None:
        """Every k-th matching request fails with `status`, or drops the connection when status is None."""
        if k < 1:
            raise ValueError(f"fail_every: k must be >= 1, got {k}")
        with self.lock:
            self.rules.append(Rule(_methods(methods), path, status, every=k))

    def set_down(
        self, down: bool = True, status: int | None = 503, methods: Methods = None, path: str | None = None
    ) -> None:
        """While down, every matching request fails; `set_down(False)` brings the endpoint back."""
        with self.lock:
            self.down_rule = Rule(_methods(methods), path, status) if down else None

    def clear(self) -> None:
        """Remove every fault (counters are kept)."""
        with self.lock:
            self.rules.clear()
            self.down_rule = None

    @property
    def down(self) -> bool:
        return self.down_rule is not None

    @property
    def requests(self) -> int:
        return sum(self.seen.values())

    @property
    def faults(self) -> int:
        return sum(self.injected.values())

    def body_bytes(self, method: str = "GET", path: str = "") -> tuple[int, int]:
        """(response body bytes, requests) of the forwarded `method` requests whose path contains `path`."""
        with self.lock:
            sizes = [n for m, p, n in self.transfers if m == method and path in p]
        return sum(sizes), len(sizes)

    def _decide(self, method: str, path: str) -> Rule | None:
        """Count the request and return the rule that fails it, if any."""
        with self.lock:
            self.seen[method] += 1
            if self.down_rule is not None and self.down_rule.matches(method, path):
                fault = self.down_rule
            else:
                fired = [r for r in self.rules if r.matches(method, path) and r.fires()]  # all rules count it
                limit = self.max_faults_per_request
                fault = fired[0] if fired and (limit is None or self.failed[method, path] < limit) else None
            if fault is not None:
                self.failed[method, path] += 1
                self.injected[f"{method} {fault.status or 'drop'}"] += 1
            return fault


def _methods(methods: Methods) -> frozenset[str] | None:
    return None if methods is None else frozenset(m.upper() for m in methods)


def _handler_for(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
        timeout = proxy.timeout

        def log_message(self, format, *args) -> None:  # noqa: A002 - quiet: tests read the counters instead
            pass

        def _body(self) -> bytes | None:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks, size = [], 0
                while True:
                    length = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if length == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                            pass
                        return b"".join(chunks)
                    size += length
                    if size > MAX_BODY:
                        return None
                    chunks.append(self.rfile.read(length))
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return None if length > MAX_BODY else self.rfile.read(length)

        def _handle(self) -> None:
            body = self._body()
            if body is None:
                self._reply(413, b"request body too large for the test proxy", {"Content-Type": "text/plain"})
                self.close_connection = True
                return
            fault = proxy._decide(self.command, self.path)
            if fault is not None:
                proxy.log.append((self.command, self.path, f"fault {fault.status or 'drop'}"))
                if fault.status is None:
                    self._drop()
                else:
                    self._error(fault.status)
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            headers["Content-Length"] = str(len(body))  # the body is forwarded whole, de-chunked
            upstream = http.client.HTTPConnection(*proxy.upstream, timeout=proxy.timeout)
            try:
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                reply = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP]
                status = response.status
            except OSError:
                proxy.log.append((self.command, self.path, "upstream unreachable"))
                self._error(502)
                return
            finally:
                upstream.close()
            with proxy.lock:
                proxy.forwarded += 1
                proxy.transfers.append((self.command, self.path, 0 if self.command == "HEAD" else len(data)))
            proxy.log.append((self.command, self.path, str(status)))
            self.send_response(status)
            for k, v in reply:
                if k.lower() != "content-length" or self.command == "HEAD":
                    self.send_header(k, v)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _error(self, status: int) -> None:
            code, message = ERRORS.get(status, ("ServiceUnavailable", "The service is unavailable."))
            resource = escape(self.path)
            xml = (
                f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                f"<Resource>{resource}</Resource><RequestId>faultproxy</RequestId></Error>"
            ).encode()
            self._reply(status, xml, {"Content-Type": "application/xml"})

        def _reply(self, status: int, data: bytes, headers: dict[str, str]) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _drop(self) -> None:
            """Close the connection without a response, as a crashed or overloaded server would."""
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _handle

    return Handler
