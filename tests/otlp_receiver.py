"""A tiny loopback OTLP/HTTP trace receiver for tests.

``POST /v1/traces`` with a protobuf ``ExportTraceServiceRequest`` (plain, gzip or deflate) is
decoded and its spans kept as ``ReceivedSpan`` values. ``mode`` selects the answer:

* ``"ok"`` — 200 with an empty ``ExportTraceServiceResponse``;
* ``"fail"`` — ``fail_status`` (503 by default) without keeping the spans;
* ``"hang"`` — read the request, then answer nothing until the receiver stops (or ``hang_s``).

The mode may be changed while running. Usage::

    with OtlpReceiver() as rx:
        out = SpanOutput(rx.url, ...)
        ...
        spans = rx.wait_spans(1, timeout=10)

Leaving the ``with`` block releases hanging requests, stops the server and joins its threads.
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

TRACES_PATH = "/v1/traces"


@dataclass
class ReceivedSpan:
    name: str
    kind: str  # "CLIENT", "SERVER", "INTERNAL", …
    trace_id: str  # hex
    span_id: str  # hex
    parent_span_id: str  # hex, "" for a root span
    trace_state: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    status_code: str  # "UNSET", "OK", "ERROR"
    status_message: str
    resource: dict[str, Any] = field(default_factory=dict)
    scope: str = ""


def any_value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind)


def _attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in kvs}


def decode(body: bytes, encoding: str = "") -> list[ReceivedSpan]:
    encoding = encoding.strip().lower()
    if encoding == "gzip":
        body = gzip.decompress(body)
    elif encoding == "deflate":
        body = zlib.decompress(body)
    req = ExportTraceServiceRequest()
    req.ParseFromString(body)
    out: list[ReceivedSpan] = []
    for rs in req.resource_spans:
        resource = _attrs(rs.resource.attributes)
        for ss in rs.scope_spans:
            for sp in ss.spans:
                out.append(ReceivedSpan(
                    name=sp.name,
                    kind=Span.SpanKind.Name(sp.kind).removeprefix("SPAN_KIND_"),
                    trace_id=sp.trace_id.hex(),
                    span_id=sp.span_id.hex(),
                    parent_span_id=sp.parent_span_id.hex(),
                    trace_state=sp.trace_state,
                    start_ns=sp.start_time_unix_nano,
                    end_ns=sp.end_time_unix_nano,
                    attributes=_attrs(sp.attributes),
                    status_code=Status.StatusCode.Name(sp.status.code).removeprefix(
                        "STATUS_CODE_"),
                    status_message=sp.status.message,
                    resource=resource,
                    scope=ss.scope.name,
                ))
    return out


class OtlpReceiver:
    def __init__(self, mode: str = "ok", fail_status: int = 503, hang_s: float = 30.0) -> None:
        self.mode = mode
        self.fail_status = fail_status
        self.hang_s = hang_s
        self.spans: list[ReceivedSpan] = []
        self.requests = 0  # POSTs to /v1/traces seen, whatever the mode
        self.encodings: list[str] = []  # Content-Encoding of each request ("" when none)
        self.headers: list[dict[str, str]] = []  # request headers (lower-cased names)
        self.errors: list[str] = []  # requests that could not be decoded
        self._cond = threading.Condition()
        self._release = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --
    def start(self) -> OtlpReceiver:
        rx = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one request per connection: handlers end promptly
            timeout = 10  # seconds a socket read may wait: bounds every handler thread

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                if self.path.split("?")[0] != TRACES_PATH:
                    self._answer(404, b"")
                    return
                with rx._cond:
                    rx.requests += 1
                    rx.encodings.append(self.headers.get("Content-Encoding", ""))
                    rx.headers.append({k.lower(): v for k, v in self.headers.items()})
                    rx._cond.notify_all()
                mode = rx.mode
                if mode == "hang":
                    rx._release.wait(rx.hang_s)
                    self.close_connection = True
                    return
                if mode == "fail":
                    self._answer(rx.fail_status, b"")
                    return
                try:
                    spans = decode(body, self.headers.get("Content-Encoding", ""))
                except Exception as e:
                    with rx._cond:
                        rx.errors.append(f"{type(e).__name__}: {e}")
                    self._answer(400, b"")
                    return
                with rx._cond:
                    rx.spans.extend(spans)
                    rx._cond.notify_all()
                self._answer(200, ExportTraceServiceResponse().SerializeToString())

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = False  # server_close() joins the handler threads
        server.block_on_close = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="otlp-receiver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what tests read --
    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return self.base_url + TRACES_PATH

    def wait_spans(self, n: int, timeout: float = 10.0) -> list[ReceivedSpan]:
        """The spans received, once there are at least ``n`` (or ``timeout`` passed)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.spans) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return list(self.spans)

    def wait_requests(self, n: int, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.requests < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return self.requests
