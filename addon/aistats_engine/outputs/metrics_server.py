"""A small HTTP endpoint for Prometheus scrapes, served from its own thread.

Scrapes must not run on mitmproxy's event loop: rendering a few thousand series takes
milliseconds, and a streamed chunk waiting behind it would show up as latency we caused. So the
server runs a ``ThreadingHTTPServer`` on a daemon thread, and the registry is read there.

* ``start()`` binds synchronously: a busy port raises ``OSError`` to the caller (mitmproxy then
  fails fast at startup). Port 0 picks a free port; read it from ``.port``.
* ``stop()`` returns in milliseconds and releases the port before returning, so a hot reload can
  bind the same port again at once. (``socketserver.serve_forever`` would block up to its poll
  interval, 0.5 s by default; here a self-pipe wakes the accept loop.)
* ``GET /metrics``: OpenMetrics 1.0 (with exemplars) when the ``Accept`` header asks for
  ``application/openmetrics-text``, else the Prometheus text format 0.0.4. In 0.0.4 the
  ``*_created`` helper gauges are left out (Prometheus ignores them there and they double the
  series count), and a family with ``prometheus_text_type = "counter"`` is declared ``counter``
  under its own name — how Envoy exposes the Higress counters, which have no ``_total``.
* ``GET /healthz`` → ``ok``; anything else → 404.
* At most :data:`MAX_CONNECTIONS` connections are served at once, one thread each; a connection
  beyond that gets ``503`` from the accept loop and is closed, no thread started. A connection
  is closed after :data:`MAX_CONNECTION_SECONDS` whatever it does, so a client that trickles
  bytes (each under the 10 s socket timeout) cannot keep a slot either.
"""

from __future__ import annotations

import copy
import logging
import selectors
import socket
import socketserver
import threading
import time
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as openmetrics

log = logging.getLogger(__name__)

OPENMETRICS = "application/openmetrics-text"

MAX_CONNECTIONS = 32
"""Connections served at once. Prometheus uses one per scrape (plus a browser or curl now and
then); the cap keeps a connection flood from starting a thread each."""

MAX_CONNECTION_SECONDS = 30.0
"""Lifetime of a connection, keep-alive included. The 10 s socket timeout bounds one read, not a
client sending a byte every 9 s; a scrape's reply is written in milliseconds."""

_BUSY_BODY = b"too many connections\n"
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\nRetry-After: 1\r\nConnection: close\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)


def wants_openmetrics(accept: str | None) -> bool:
    """True when the Accept header lists OpenMetrics with a non-zero quality."""
    for part in (accept or "").split(","):
        media, *params = (p.strip() for p in part.split(";"))
        if media.lower() != OPENMETRICS:
            continue
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    if float(value) <= 0:
                        break
                except ValueError:
                    break
        else:
            return True
    return False


class _Families:
    """Adapter: a list of metric families as a collector for ``generate_latest``."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def render(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """The exposition of ``registry`` for a scrape with this Accept header: (body, content type)."""
    if wants_openmetrics(accept):
        body: bytes = openmetrics.generate_latest(registry)  # type: ignore[no-untyped-call]
        return body, openmetrics.CONTENT_TYPE_LATEST
    return prometheus_text(registry), CONTENT_TYPE_PLAIN_0_0_4


def prometheus_text(registry: CollectorRegistry) -> bytes:
    """Prometheus text 0.0.4 (no exemplars), see the module docstring for the two adjustments."""
    out: list[bytes] = []
    for family in registry.collect():
        created = family.name + "_created"
        if any(s.name == created for s in family.samples):
            family = copy.copy(family)
            family.samples = [s for s in family.samples if s.name != created]
        text = generate_latest(_Families([family]))
        declared = getattr(family, "prometheus_text_type", None)
        if declared:
            text = text.replace(
                f"# TYPE {family.name} untyped\n".encode(),
                f"# TYPE {family.name} {declared}\n".encode(),
                1,
            )
        out.append(text)
    return b"".join(out)


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"
    timeout = 10  # a stalled client must not hold a thread forever

    def do_GET(self) -> None:  # http.server dispatches on the method name
        path = urlsplit(self.path).path
        if path == "/metrics":
            try:
                body, ctype = render(self.server.registry, self.headers.get("Accept"))
            except Exception:
                log.exception("metrics collection failed")
                self._reply(500, b"metrics collection failed\n", "text/plain; charset=utf-8")
                return
            self._reply(200, body, ctype)
        elif path == "/healthz":
            self._reply(200, b"ok\n", "text/plain; charset=utf-8")
        else:
            self._reply(404, b"not found\n", "text/plain; charset=utf-8")

    def _reply(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("metrics %s - %s", self.address_string(), format % args)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # server_close() must not wait for handler threads (a stalled client holds one up to its
    # timeout); it shuts their connections down instead, so they end on their own at once.
    block_on_close = False
    request_queue_size = 64  # listen backlog: a burst past the cap is answered 503, not refused

    def __init__(
        self, address: tuple[str, int], registry: CollectorRegistry,
        max_connections: int = MAX_CONNECTIONS, max_connection_seconds: float = MAX_CONNECTION_SECONDS,
    ) -> None:
        self.registry = registry
        self.max_connections = max_connections
        self.max_connection_seconds = max_connection_seconds
        # Open connections with their deadlines. A socket leaves before it is closed, under the
        # lock, so reap() never shuts down a closed (or reused) descriptor.
        self._conns: dict[socket.socket, float] = {}
        self._conns_lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start a thread for the connection, or answer 503 from here when all slots are taken."""
        with self._conns_lock:
            full = len(self._conns) >= self.max_connections
            if not full:
                self._conns[request] = time.monotonic() + self.max_connection_seconds
        if full:
            self._reject(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread: free the slot here
            self._release(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self._release(request)
            self.shutdown_request(request)

    def _release(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.pop(request, None)

    def _reject(self, request: socket.socket) -> None:
        """503 without blocking the accept loop. Whatever the client already sent is read first:
        closing a socket with unread data sends a reset, which can destroy the reply."""
        try:
            request.setblocking(False)
            request.send(_BUSY)  # a fresh connection's send buffer is empty
            request.recv(65536)
        except OSError:
            pass
        self.shutdown_request(request)

    def reap(self) -> float | None:
        """Shut down connections past their deadline (their thread then sees EOF and ends);
        the seconds until the next deadline, or None when no connection is open."""
        now = time.monotonic()
        with self._conns_lock:
            for conn, deadline in self._conns.items():
                if deadline <= now:
                    try:
                        conn.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
            pending = [d - now for d in self._conns.values() if d > now]
            if not self._conns:
                return None
        return min(pending, default=1.0)

    def server_close(self) -> None:
        super().server_close()
        with self._conns_lock:
            for conn in self._conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    @property
    def open_connections(self) -> int:
        with self._conns_lock:
            return len(self._conns)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The default prints a traceback to stderr; a client hanging up mid-reply is routine.
        log.debug("metrics connection from %s failed", client_address, exc_info=True)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup that can stall
        # start() for seconds; the name is only used in CGI environments.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


class MetricsServer:
    """Serve ``registry`` on ``http://host:port/metrics`` from a daemon thread."""

    def __init__(
        self, registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 9464, *,
        max_connections: int = MAX_CONNECTIONS, max_connection_seconds: float = MAX_CONNECTION_SECONDS,
    ) -> None:
        if max_connections < 1 or not max_connection_seconds > 0:
            raise ValueError("max_connections and max_connection_seconds must be positive")
        self.registry = registry
        self.host = host
        self._requested_port = port
        self._max_connections = max_connections
        self._max_connection_seconds = max_connection_seconds
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._stopping = threading.Event()

    @property
    def port(self) -> int:
        """The bound port (the ephemeral one when started with port 0)."""
        return self._httpd.server_port if self._httpd is not None else self._requested_port

    @property
    def open_connections(self) -> int:
        """Connections being served now (each holds a thread)."""
        return self._httpd.open_connections if self._httpd is not None else 0

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Bind (``OSError`` if the address is in use) and start serving."""
        if self._httpd is not None:
            raise RuntimeError("MetricsServer already started")
        self._httpd = _HTTPServer(
            (self.host, self._requested_port), self.registry,
            self._max_connections, self._max_connection_seconds,
        )
        self._wake = socket.socketpair()
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._serve, name=f"aistats-metrics:{self.port}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting, release the port, and return without waiting on a poll interval."""
        httpd, thread, wake = self._httpd, self._thread, self._wake
        if httpd is None:
            return
        self._stopping.set()
        if wake is not None:
            try:
                wake[1].send(b"x")
            except OSError:
                pass
        if thread is not None:
            thread.join(timeout=1.0)
        httpd.server_close()
        if wake is not None:
            wake[0].close()
            wake[1].close()
        self._httpd = self._thread = self._wake = None

    def _serve(self) -> None:
        httpd, wake = self._httpd, self._wake
        assert httpd is not None and wake is not None
        httpd.timeout = 0  # handle_request(): the selector below already saw the socket ready
        with selectors.DefaultSelector() as sel:
            sel.register(httpd.socket, selectors.EVENT_READ)
            sel.register(wake[0], selectors.EVENT_READ)
            timeout: float | None = None
            while not self._stopping.is_set():
                for key, _ in sel.select(timeout):
                    if key.fileobj is httpd.socket and not self._stopping.is_set():
                        try:
                            httpd.handle_request()
                        except Exception:  # keep serving; one bad connection is not fatal
                            log.exception("metrics server request failed")
                timeout = httpd.reap()
