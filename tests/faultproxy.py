"""A fault-injecting HTTP reverse proxy on 127.0.0.1, in front of a (moto) S3 endpoint.

Modes, switchable while a test runs (:meth:`FaultProxy.set`):

- ``"pass"``: forward the request upstream and stream the answer back;
- ``"throttle"``: answer ``503 SlowDown`` with S3's XML error body (the request body is read
  and dropped first, so the connection stays usable);
- ``"error"``: answer ``500 InternalError`` the same way (a HEAD gets the status alone, as S3
  sends it, so the client sees no error code or message);
- ``"drop"``: read the request, then close the connection without answering;
- ``"outage"``: close the connection at once, without reading the request body (for all
  requests, new connections are closed before anything is read);
- ``"norange"``: forward the request without its ``Range`` header (a server that ignores it,
  answering 200 with the whole object);
- ``"cut"``: forward the request, send the answer's headers and the first half of its body
  (its full ``Content-Length`` announced), then close the connection: a GET that breaks
  midway.

A fault applies to every request, or to those a predicate ``match(method, path)`` selects
(``path`` includes the query string), optionally to the next ``count`` of them only; then the
proxy passes again.  Requests are counted by method (``counts``) and by method for those
faulted (``faulted``).  Use it as a context manager: it stops, and closes every client
connection it holds, when the block ends.
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

__all__ = ["FaultProxy", "matching", "SLOWDOWN_XML"]

MODES = ("pass", "throttle", "error", "drop", "outage", "cut", "norange")
SLOWDOWN_XML = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
    b"<RequestId>faultproxy</RequestId></Error>"
)
INTERNAL_XML = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>InternalError</Code><Message>We encountered an internal error.</Message>"
    b"<RequestId>faultproxy</RequestId></Error>"
)
_ANSWERS = {
    "throttle": (503, "Slow Down", SLOWDOWN_XML),
    "error": (500, "Internal Server Error", INTERNAL_XML),
}
_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "expect",
}
_CHUNK = 1 << 20

Predicate = Callable[[str, str], bool]


def matching(method: str | None = None, path: str | None = None) -> Predicate:
    """A predicate: the method equals ``method`` (any if None) and the regex ``path`` is found
    in the request path with its query (any if None)."""
    rx = re.compile(path) if path is not None else None
    want = method.upper() if method is not None else None

    def pred(m: str, p: str) -> bool:
        return (want is None or m == want) and (rx is None or rx.search(p) is not None)

    return pred


class _Rule:
    def __init__(self, mode: str, match: Predicate | None, count: int | None) -> None:
        self.mode, self.match, self.left = mode, match, count


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    proxy: FaultProxy

    def verify_request(self, request: Any, client_address: Any) -> bool:
        # an outage for every request: new connections are closed before anything is read
        return not self.proxy._refuse_all()

    def process_request(self, request: Any, client_address: Any) -> None:
        self.proxy._track(request, True)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self.proxy._track(request, False)
        super().shutdown_request(request)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
    timeout = 30  # an idle client connection is closed after this
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    # -- request bodies
    def _body(self) -> Iterator[bytes]:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    raise ConnectionError("client closed mid-body")
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                left = size
                while left:
                    data = self.rfile.read(min(left, _CHUNK))
                    if not data:
                        raise ConnectionError("client closed mid-body")
                    left -= len(data)
                    yield data
                self.rfile.readline(65537)  # the CRLF after the chunk
        else:
            left = int(self.headers.get("Content-Length") or 0)
            while left:
                data = self.rfile.read(min(left, _CHUNK))
                if not data:
                    raise ConnectionError("client closed mid-body")
                left -= len(data)
                yield data

    def _drain(self) -> None:
        for _ in self._body():
            pass

    # -- dispatch
    def _serve(self) -> None:
        proxy = self.server.proxy
        action = proxy._decide(self.command, self.path)
        try:
            if action == "outage":
                self.close_connection = True
                return
            if action == "drop":
                self._drain()
                self.close_connection = True
                return
            if action in _ANSWERS:
                status, reason, body = _ANSWERS[action]
                self._drain()
                self.send_response(status, reason)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Retry-After", "1")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
                return
            self._forward(cut=action == "cut", drop=("range",) if action == "norange" else ())
        except (OSError, http.client.HTTPException, ValueError):
            self.close_connection = True  # a broken client or upstream: end this connection

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = do_PATCH = do_OPTIONS = _serve

    def _forward(self, cut: bool = False, drop: tuple[str, ...] = ()) -> None:
        proxy = self.server.proxy
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        up = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
        try:
            up.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for k, v in self.headers.items():
                if k.lower() not in _HOP and k.lower() not in drop:
                    up.putheader(k, v)
            if chunked:
                up.putheader("Transfer-Encoding", "chunked")
            up.endheaders()
            for data in self._body():
                up.send(b"%x\r\n%b\r\n" % (len(data), data) if chunked else data)
            if chunked:
                up.send(b"0\r\n\r\n")
            resp = up.getresponse()
            self.send_response_only(resp.status, resp.reason)
            length = resp.getheader("Content-Length")
            bodiless = self.command == "HEAD" or resp.status in (204, 304) or resp.status < 200
            for k, v in resp.getheaders():
                if k.lower() not in _HOP:
                    self.send_header(k, v)
            if not bodiless and length is None:
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if bodiless:
                return
            left = int(length) // 2 if cut and length is not None else None
            while data := resp.read(_CHUNK if left is None else min(_CHUNK, left)):
                self.wfile.write(b"%x\r\n%b\r\n" % (len(data), data) if length is None else data)
                if left is not None:
                    left -= len(data)
                    if left <= 0:
                        break
            if left is not None:
                self.close_connection = True  # half the announced body, then the connection ends
                return
            if length is None:
                self.wfile.write(b"0\r\n\r\n")
        finally:
            up.close()


class FaultProxy:
    """The proxy; ``endpoint`` is its URL (``http://127.0.0.1:PORT``)."""

    def __init__(self, upstream: str) -> None:
        u = urlsplit(upstream)
        if u.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"upstream must be local, got {upstream}")
        self.upstream_host, self.upstream_port = u.hostname, u.port or 80
        self.counts: Counter[str] = Counter()
        self.faulted: Counter[str] = Counter()
        self.log: list[tuple[str, str, str]] = []  # (method, path, action), the last 10,000
        self._lock = threading.Lock()
        self._rule = _Rule("pass", None, None)
        self._conns: set[socket.socket] = set()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self._thread: threading.Thread | None = None
        host, port = self._server.server_address[:2]
        self.endpoint = f"http://{host}:{port}"

    # -- control
    def set(self, mode: str, match: Predicate | None = None, count: int | None = None) -> None:
        """Apply ``mode`` to the requests ``match`` selects (all if None), for the next
        ``count`` of them (all if None); other requests pass."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        with self._lock:
            self._rule = _Rule(mode, match, count)
        if mode == "outage" and match is None and count is None:
            self._close_clients()  # kept-alive connections fail too

    def passthrough(self) -> None:
        self.set("pass")

    @property
    def mode(self) -> str:
        with self._lock:
            return self._rule.mode

    def _refuse_all(self) -> bool:
        with self._lock:
            r = self._rule
            if r.mode != "outage" or r.match is not None or r.left == 0:
                return False
            if r.left is not None:
                r.left -= 1
            self.faulted["CONNECT"] += 1
            return True

    def _decide(self, method: str, path: str) -> str:
        with self._lock:
            self.counts[method] += 1
            r = self._rule
            action = "pass"
            if (
                r.mode != "pass"
                and (r.left is None or r.left > 0)
                and (r.match is None or r.match(method, path))
            ):
                action = r.mode
                if r.left is not None:
                    r.left -= 1
                self.faulted[method] += 1
            self.log.append((method, path, action))
            del self.log[:-10000]
            return action

    def requests(self, method: str | None = None, path: str | None = None) -> list[tuple[str, str, str]]:
        """Logged (method, path, action) that ``matching(method, path)`` selects."""
        pred = matching(method, path)
        with self._lock:
            return [e for e in self.log if pred(e[0], e[1])]

    # -- connections
    def _track(self, sock: socket.socket, add: bool) -> None:
        with self._lock:
            (self._conns.add if add else self._conns.discard)(sock)

    def _close_clients(self) -> None:
        with self._lock:
            conns = list(self._conns)
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # -- lifetime
    def start(self) -> FaultProxy:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="faultproxy", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(10)
            self._thread = None
        self._close_clients()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
