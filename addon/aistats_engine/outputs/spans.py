"""Spans as an output: one OpenTelemetry CLIENT span per finished record, exported over OTLP/HTTP
(protobuf) by the OpenTelemetry SDK's ``BatchSpanProcessor``.

What a span carries (OTel GenAI semantic conventions, open-telemetry/semantic-conventions-genai,
``docs/gen-ai/client-inference.md``; only values that are known, never null):

* name ``"{gen_ai.operation.name} {gen_ai.request.model}"`` (the operation alone when the model is
  unknown, the HTTP method when the operation is), kind CLIENT, start/end = the request's start
  and the record's end (epoch seconds from the ``Finished`` event), status ERROR with the record's
  ``error`` when it failed, else UNSET;
* ``gen_ai.operation.name``, ``gen_ai.provider.name``, ``gen_ai.request.model``,
  ``gen_ai.response.model``, ``gen_ai.response.id`` (record ``chat_id``),
  ``gen_ai.response.finish_reasons`` (one element), ``gen_ai.request.stream`` (only when true),
  ``gen_ai.usage.input_tokens`` / ``output_tokens`` / ``cache_read.input_tokens`` /
  ``cache_write.input_tokens`` / ``reasoning.output_tokens``,
  ``gen_ai.response.time_to_first_chunk`` (seconds), ``server.address``, ``server.port``,
  ``http.response.status_code``, ``error.type`` (failed only), and ``aistats.record_id``,
  ``aistats.session_id``, ``aistats.consumer``;
* then the record's ``span_attributes`` (the user's attributes marked ``apply_to_span``, keyed by
  their ``trace_span_key``), as they are, lists and objects as compact JSON text (OTel attributes
  take only primitives and homogeneous primitive lists).

Message content goes on spans only when the user opts in (``include_content``): the record's
``span_content_attributes`` (question, system, answer, reasoning, tool calls) are left out
otherwise, also when the same keys appear among ``span_attributes``.

Trace context: a request carrying a W3C ``traceparent`` (and ``tracestate``) gets a span that is a
child of the caller's span, in the caller's trace; the caller's sampled flag is honoured (the
SDK's default parent-based sampler, ``OTEL_TRACES_SAMPLER`` applies), so a request whose trace the
caller does not sample gets no span. Without one the span is a root whose trace id is derived from
the flow id and start time, so replaying a flow file exports the same trace ids, names,
attributes and times (span ids stay random).

Endpoint: ``endpoint`` may be a base URL (``http://host:4318``) or the traces URL
(``…/v1/traces``). None means the standard variables: ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``
(as is), else ``OTEL_EXPORTER_OTLP_ENDPOINT`` + ``/v1/traces``, else
``http://localhost:4318/v1/traces``; then an ``OTEL_EXPORTER_OTLP[_TRACES]_TIMEOUT`` variable
(seconds, as the Python exporter reads it), when set, wins over ``export_timeout_s``. The
exporter always reads the headers, compression and certificate variables. The resource is the
SDK's ``Resource.create()`` (``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_SERVICE_NAME``);
``service_name`` applies when those name no service. The tracer provider is private: the global
one is never touched.

Never blocks or breaks traffic:

* ``finished`` builds and ends one span; the processor queues it and exports from its own thread.
* The queue is bounded (``max_queue``). The SDK's processor would drop the *oldest* span silently
  when full, so this output never lets it get full: it counts spans handed to the processor and
  spans handed by it to the exporter (a wrapping exporter), and when the difference — an upper
  bound of what the processor holds — reaches ``max_queue`` it drops the new span itself (before
  building it). Every span is therefore either exported, reported failed by the exporter (a
  failed batch, counted whole), dropped here for a full queue, or still unconfirmed when ``close``
  gives up; all but the first are counted in ``dropped`` and reported through ``on_drop(n)``.
* A dead or slow collector costs at most ``export_timeout_s`` per batch, in the processor's thread.
  The SDK's own export log lines (one per retry and batch) are kept from the log while our
  exporter runs; this module logs one WARNING per outage (at most one a minute) once its cause is
  known (``Connection refused``, ``HTTP 503 …``, ``timed out``, or a queue that overflows while
  export works), and one INFO with the count when export recovers.
* ``close()`` returns at once: the provider is shut down by a daemon thread that gives pending
  spans ``timeout`` (default ``export_timeout_s + 1``) to be exported, then stops the exporter
  (aborting its retries) and counts what was not exported. ``close(wait=True)`` does the same in
  the caller's thread and returns after at most ``timeout`` plus half a second.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
import requests
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ..record.record import Record
from .bus import Finished, HeaderFields, Started

log = logging.getLogger(__name__)

DEFAULT_MAX_QUEUE = 2048
DEFAULT_BATCH = 512  # spans per export request (the SDK's default)
TRACES_PATH = "/v1/traces"
WARN_INTERVAL = 60.0  # seconds: at most one "spans are being lost" warning per interval

# Attribute names (OTel GenAI semconv, client inference span; stable core names for the rest).
OPERATION = "gen_ai.operation.name"
PROVIDER = "gen_ai.provider.name"
REQUEST_MODEL = "gen_ai.request.model"
REQUEST_STREAM = "gen_ai.request.stream"
RESPONSE_MODEL = "gen_ai.response.model"
RESPONSE_ID = "gen_ai.response.id"
FINISH_REASONS = "gen_ai.response.finish_reasons"
TIME_TO_FIRST_CHUNK = "gen_ai.response.time_to_first_chunk"
INPUT_TOKENS = "gen_ai.usage.input_tokens"
OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
CACHE_READ_TOKENS = "gen_ai.usage.cache_read.input_tokens"
CACHE_WRITE_TOKENS = "gen_ai.usage.cache_write.input_tokens"  # was cache_creation.input_tokens
REASONING_TOKENS = "gen_ai.usage.reasoning.output_tokens"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
HTTP_STATUS = "http.response.status_code"
ERROR_TYPE = "error.type"
RECORD_ID = "aistats.record_id"
SESSION_ID = "aistats.session_id"
CONSUMER = "aistats.consumer"

_INT64 = (-(1 << 63), (1 << 63) - 1)
_PROPAGATOR = TraceContextTextMapPropagator()

# The SDK logs every failed attempt of every batch (and each retry) on these loggers. While one of
# our exporters is exporting (same thread), those records are taken as the failure's reason and
# not emitted; records from anyone else's exporter pass unchanged.
_SDK_EXPORT_LOGGERS = ("opentelemetry.exporter.otlp.proto.http.trace_exporter",
                       "opentelemetry.exporter.otlp.common.http")
_exporting = threading.local()
_CREDENTIAL_VARS = ("OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER",
                    "OTEL_PYTHON_EXPORTER_OTLP_HTTP_TRACES_CREDENTIAL_PROVIDER")


class _CaptureExportLogs(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        sink = getattr(_exporting, "sink", None)
        if sink is None:
            return True
        if record.levelno >= logging.WARNING and sink.last_error is None:  # the first says why
            try:
                sink.last_error = record.getMessage()
            except Exception:
                sink.last_error = str(record.msg)
        return False


_filter_lock = threading.Lock()
_filter: _CaptureExportLogs | None = None


def _install_log_filter() -> None:
    global _filter
    with _filter_lock:
        if _filter is None:
            _filter = _CaptureExportLogs()
            for name in _SDK_EXPORT_LOGGERS:
                logging.getLogger(name).addFilter(_filter)


def _why(e: BaseException) -> str:
    """A short cause for a failed request: the OS error deep in requests' chain when there is
    one ("Connection refused"), else the exception's type."""
    if isinstance(e, requests.Timeout):
        return "timed out"
    seen: set[int] = set()
    todo: list[object] = [e]
    while todo:
        x = todo.pop(0)
        if not isinstance(x, BaseException) or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.strerror:
            return x.strerror
        todo.extend((getattr(x, "reason", None), x.__cause__, x.__context__, *x.args))
    return type(e).__name__


class _ObservedSession(requests.Session):
    """The exporter's HTTP session: notes why a request failed (the SDK's own messages often only
    say that retries ran out) for the exporter that is exporting in this thread."""

    def send(self, request: requests.PreparedRequest, **kw: Any) -> requests.Response:
        try:
            response = super().send(request, **kw)
        except Exception as e:
            _note_cause(_why(e))
            raise
        if response.status_code >= 400:
            _note_cause(f"HTTP {response.status_code} {response.reason or ''}".rstrip())
        return response


def _note_cause(cause: str) -> None:
    sink = getattr(_exporting, "sink", None)
    if sink is not None:
        sink.cause = cause


# -- configuration ------------------------------------------------------------------------------

def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL for a base URL or a traces URL. ValueError for anything that is
    not an http(s) URL with a host."""
    parts = urlsplit(endpoint.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {endpoint!r}")
    path = parts.path.rstrip("/")
    if not path.endswith(TRACES_PATH):
        path += TRACES_PATH
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def env_traces_url() -> str:
    """The traces URL the standard OTel variables name (the signal-specific one as is)."""
    if url := os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip():
        return url
    base = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip() or "http://localhost:4318"
    return base.rstrip("/") + TRACES_PATH


def _resource(service_name: str) -> Resource:
    resource = Resource.create()  # OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME
    name = resource.attributes.get("service.name")
    if not isinstance(name, str) or name.startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": service_name}))
    return resource


# -- attribute values ---------------------------------------------------------------------------

def _text(s: str) -> str:
    """A string protobuf can encode (lone surrogates, which JSON allows, would fail the whole
    batch)."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "replace").decode("utf-8")


def _json(value: Any) -> str:
    try:
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode("utf-8")
    except Exception:
        return _text(json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str))


def attribute_value(value: Any) -> str | bool | int | float | None:
    """An OTel attribute value for a record value: primitives as they are, lists and objects as
    JSON text, integers beyond int64 as text; None stays None (left out)."""
    if value is None:
        return None
    if isinstance(value, bool | float):
        return value
    if isinstance(value, int):
        return value if _INT64[0] <= value <= _INT64[1] else str(value)
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, dict | list | tuple):
        return _json(value)
    return _text(str(value))


def span_name(record: Record) -> str:
    op = record.operation or record.method or "request"
    return f"{op} {record.model}" if record.model else op


def span_attributes(record: Record, include_content: bool = False) -> dict[str, Any]:
    """Everything the span carries for ``record``, in a fixed order."""
    attrs: dict[str, Any] = {}

    def put(key: str, value: Any) -> None:
        v = attribute_value(value)
        if v is not None:
            attrs[key] = v

    failed = record.error is not None or record.error_type is not None
    put(OPERATION, record.operation)
    put(PROVIDER, record.provider)
    put(REQUEST_MODEL, record.model)
    if record.stream:
        attrs[REQUEST_STREAM] = True
    put(RESPONSE_MODEL, record.response_model)
    put(RESPONSE_ID, record.chat_id)
    if record.finish_reason is not None:
        attrs[FINISH_REASONS] = [_text(str(record.finish_reason))]
    put(INPUT_TOKENS, record.input_tokens)
    put(OUTPUT_TOKENS, record.output_tokens)
    put(CACHE_READ_TOKENS, record.cached_tokens)
    put(CACHE_WRITE_TOKENS, record.cache_creation_tokens)
    put(REASONING_TOKENS, record.reasoning_tokens)
    if record.ttft_ms is not None and math.isfinite(record.ttft_ms):
        attrs[TIME_TO_FIRST_CHUNK] = record.ttft_ms / 1000.0
    put(SERVER_ADDRESS, record.host or None)
    put(SERVER_PORT, record.port)
    put(HTTP_STATUS, record.status)
    if failed:
        attrs[ERROR_TYPE] = _text(record.error_type or "_OTHER")
    put(RECORD_ID, record.id)
    put(SESSION_ID, record.session_id)
    put(CONSUMER, record.consumer)

    content = record.span_content_attributes
    for key, value in record.span_attributes.items():
        if include_content or key not in content:
            put(str(key), value)
    if include_content:
        for key, value in content.items():
            put(str(key), value)
    return attrs


def _ns(t: float) -> int:
    return int(round(t * 1e9))


def _carrier(fields: HeaderFields) -> dict[str, str]:
    """``traceparent`` (first) and ``tracestate`` (all, joined) from raw request headers."""
    parent: str | None = None
    states: list[str] = []
    for k, v in fields:
        name = k.lower()
        if name == b"traceparent":
            if parent is None:
                parent = v.decode("latin-1").strip()
        elif name == b"tracestate":
            states.append(v.decode("latin-1").strip())
    out: dict[str, str] = {}
    if parent:
        out["traceparent"] = parent
        if states:
            out["tracestate"] = ",".join(s for s in states if s)
    return out


def derived_trace_id(record: Record) -> int:
    """The trace id of a span without a caller's trace: the same for the same flow on replay."""
    key = f"aistats/{record.flow_id}/{record.start_time}".encode("utf-8", "replace")
    tid = int.from_bytes(hashlib.sha256(key).digest()[:16], "big")
    return tid or 1


class _IdGenerator(RandomIdGenerator):
    """Random span ids; the trace id of a root span is the one ``finished`` prepared."""

    def __init__(self) -> None:
        self._next = threading.local()

    def generate_trace_id(self) -> int:
        tid = getattr(self._next, "trace_id", None)
        if tid:
            self._next.trace_id = None
            return tid
        return super().generate_trace_id()


# -- export accounting --------------------------------------------------------------------------

class _CountingExporter(SpanExporter):
    """Wraps the OTLP exporter: counts what it is given and how each batch ends."""

    def __init__(self, inner: SpanExporter, owner: SpanOutput) -> None:
        self.inner = inner
        self.owner = owner
        self.last_error: str | None = None  # the SDK's first warning during this export
        self.cause: str | None = None  # what the HTTP session saw last during this export
        self._aborted = False
        self._shut = False
        self._shut_lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        n = len(spans)
        self.owner._submitted(n)
        if self._aborted:
            self.owner._export_failed(n, "exporter stopped at close")
            return SpanExportResult.FAILURE
        self.last_error = self.cause = None
        _exporting.sink = self
        try:
            result = self.inner.export(spans)
        except Exception as e:  # the SDK's exporter catches its own; be sure anyway
            result = SpanExportResult.FAILURE
            self.last_error = f"{type(e).__name__}: {e}"
        finally:
            _exporting.sink = None
        if result is SpanExportResult.SUCCESS:
            self.owner._exported(n)
        else:
            self.owner._export_failed(n, self.cause or self.last_error or "export failed")
        return result

    def abort(self) -> None:
        """Make pending and further batches fail at once, and stop the exporter's retries."""
        self._aborted = True
        self.shutdown()

    def shutdown(self) -> None:
        with self._shut_lock:
            if self._shut:
                return
            self._shut = True
        try:
            self.inner.shutdown()
        except Exception as e:
            log.debug("aistats: span exporter shutdown: %s", e)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class _Processor(BatchSpanProcessor):
    def __init__(self, owner: SpanOutput, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.owner = owner

    def on_end(self, span: ReadableSpan) -> None:
        if not (span.context and span.context.trace_flags.sampled):
            return
        self.owner._accepted()
        super().on_end(span)


# -- the output ---------------------------------------------------------------------------------

class SpanOutput:
    """One OTel span per finished record, exported over OTLP/HTTP; see the module doc."""

    def __init__(self, endpoint: str | None, include_content: bool = False,
                 max_queue: int = DEFAULT_MAX_QUEUE, export_timeout_s: float = 5.0,
                 on_drop: Callable[[int], None] | None = None, service_name: str = "aistats",
                 schedule_delay_ms: float = 1000.0) -> None:
        """ValueError for an endpoint that is not an http(s) URL."""
        if endpoint is not None:
            self.endpoint = traces_url(endpoint)
            timeout: float | None = export_timeout_s
        else:
            self.endpoint = env_traces_url()
            env_timeout = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")
                           or os.environ.get("OTEL_EXPORTER_OTLP_TIMEOUT"))
            timeout = None if env_timeout else export_timeout_s
        self.include_content = include_content
        self.max_queue = max(1, int(max_queue))
        self.export_timeout_s = export_timeout_s
        self.on_drop = on_drop
        self.dropped = 0  # spans lost for any reason (see on_drop)
        self.exported = 0  # spans the collector accepted

        self._lock = threading.Lock()
        self._accepted_n = 0  # spans handed to the processor
        self._submitted_n = 0  # spans the processor handed to the exporter
        self._failed_n = 0  # of those, in batches that failed
        self._finalized = False  # close gave up: later outcomes are not counted
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._done = threading.Event()
        # "spans are being lost" reporting: one warning per outage, one info on recovery
        self._trouble = False  # spans are being lost
        self._trouble_dropped = 0
        self._trouble_warned = False
        self._warn_owed = False  # the outage is not reported yet (its cause is not known yet)
        self._warned_at: float | None = None

        _install_log_filter()
        # Our session tells why requests fail; a credential-provider session (an OTel variable)
        # takes its place when one is configured.
        session = None if any(os.environ.get(v) for v in _CREDENTIAL_VARS) else _ObservedSession()
        self._exporter = _CountingExporter(
            OTLPSpanExporter(endpoint=self.endpoint, timeout=timeout, session=session), self)
        self._ids = _IdGenerator()
        self._provider = TracerProvider(resource=_resource(service_name), id_generator=self._ids,
                                        shutdown_on_exit=False)
        self._provider.add_span_processor(_Processor(
            self, self._exporter, max_queue_size=self.max_queue,
            schedule_delay_millis=max(1.0, float(schedule_delay_ms)),
            max_export_batch_size=min(DEFAULT_BATCH, self.max_queue),
            export_timeout_millis=export_timeout_s * 1000))
        self._tracer = self._provider.get_tracer("aistats")

    # -- the Output protocol --
    def started(self, event: Started) -> None:
        pass

    def finished(self, event: Finished) -> None:
        if self._closed:
            self._drop(1, "closed", _CLOSED)
            return
        with self._lock:
            full = self._accepted_n - self._submitted_n >= self.max_queue
        if full:
            self._drop(1, "queue full", _QUEUE)
            return
        record = event.record
        context = None
        carrier = _carrier(event.request_fields)
        if carrier:
            context = _PROPAGATOR.extract(carrier)
        start = _ns(event.t_start)
        end = max(start, _ns(event.t_end))
        self._ids._next.trace_id = derived_trace_id(record)  # used only for a root span
        try:
            span = self._tracer.start_span(
                _text(span_name(record)), context=context, kind=SpanKind.CLIENT,
                attributes=span_attributes(record, self.include_content), start_time=start)
        finally:
            self._ids._next.trace_id = None
        if record.error is not None or record.error_type is not None:
            span.set_status(Status(StatusCode.ERROR,
                                   _text(record.error or record.error_type or "error")))
        span.end(end_time=end)

    def close(self, wait: bool = False, timeout: float | None = None) -> None:
        """Shut down: pending spans get ``timeout`` seconds (default ``export_timeout_s + 1``) to
        be exported, then the exporter is stopped and what was not exported counts as dropped.
        Without ``wait`` this happens in a daemon thread and close returns at once; with it, close
        returns within ``timeout`` + 0.5 s."""
        with self._lock:
            already, self._closed = self._closed, True
        if already:
            if wait:
                self.wait_closed(timeout if timeout is not None else self.export_timeout_s + 1.5)
            return
        budget = self.export_timeout_s + 1.0 if timeout is None else max(0.0, timeout)
        if wait:
            self._shutdown(budget, grace=0.5)
        else:
            t = threading.Thread(target=self._shutdown, args=(budget, self.export_timeout_s + 1.0),
                                 name="aistats-spans-close", daemon=True)
            self._threads.append(t)
            t.start()

    def wait_closed(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` s) until the threads ``close`` left running have ended."""
        deadline = time.monotonic() + timeout
        if not self._done.wait(max(0.0, deadline - time.monotonic())):
            return False
        for t in list(self._threads):
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    # -- shutdown --
    def _shutdown(self, budget: float, grace: float) -> None:
        t = threading.Thread(target=self._provider_shutdown, name="aistats-spans-shutdown",
                             daemon=True)
        self._threads.append(t)
        t.start()
        t.join(budget)
        if t.is_alive():
            self._exporter.abort()  # fail what is queued at once; the request in flight ends
            t.join(grace)           # by its own timeout (export_timeout_s)
        self._finalize()

    def _provider_shutdown(self) -> None:
        try:
            self._provider.shutdown()
        except Exception as e:
            log.debug("aistats: span provider shutdown: %s", e)
        finally:
            self._done.set()

    def _finalize(self) -> None:
        """Count what was handed to the processor and neither exported nor reported failed."""
        with self._lock:
            if self._finalized:
                return
            self._finalized = True
            lost = self._accepted_n - self.exported - self._failed_n
        if lost > 0:
            self._drop(lost, "not exported before close", _FINAL)

    # -- accounting (the exporter's thread, the event loop, the closing thread) --
    def _accepted(self) -> None:
        with self._lock:
            self._accepted_n += 1

    def _submitted(self, n: int) -> None:
        with self._lock:
            self._submitted_n += n

    def _exported(self, n: int) -> None:
        line = None
        with self._lock:
            if self._finalized:
                return
            self.exported += n
            if self._trouble:
                self._trouble = False
                if self._warn_owed:  # only the queue overflowed: export works, too slowly
                    self._warn_owed = False
                    if self._may_warn():
                        line = (logging.WARNING, "aistats: %d spans dropped: the span queue (%d) "
                                "was full, export to %s is slower than the traffic",
                                (self._trouble_dropped, self.max_queue, self.endpoint))
                elif self._trouble_warned:
                    line = (logging.INFO, "aistats: span export to %s recovered; %d spans were "
                            "dropped meanwhile", (self.endpoint, self._trouble_dropped))
        if line is not None:
            log.log(line[0], line[1], *line[2])

    def _export_failed(self, n: int, reason: str) -> None:
        with self._lock:
            if self._finalized:
                return
            self._failed_n += n
        self._drop(n, reason, _EXPORT)

    def _may_warn(self) -> bool:
        """Under the lock: whether the rate limit allows a warning now (and take it)."""
        now = time.monotonic()
        if self._warned_at is not None and now - self._warned_at < WARN_INTERVAL:
            return False
        self._warned_at = now
        self._trouble_warned = True
        return True

    def _drop(self, n: int, reason: str, kind: int) -> None:
        """Count ``n`` lost spans and say so: one WARNING per outage, once its cause is known (a
        full queue alone says nothing: the export in progress, or close, tells why)."""
        line = None
        with self._lock:
            self.dropped += n
            if kind != _CLOSED:
                if not self._trouble:
                    self._trouble = True
                    self._trouble_dropped = 0
                    self._trouble_warned = False
                    self._warn_owed = True
                self._trouble_dropped += n
                if self._warn_owed and kind != _QUEUE:
                    self._warn_owed = False
                    if self._may_warn():
                        if kind == _FINAL:
                            line = ("aistats: %d spans could not be exported to %s before close",
                                    (self._trouble_dropped, self.endpoint))
                        else:
                            line = ("aistats: span export to %s failed (%s); spans are dropped "
                                    "until it recovers", (self.endpoint, reason))
        if line is not None:
            log.warning(line[0], *line[1])
        if n and self.on_drop is not None:
            try:
                self.on_drop(n)
            except Exception as e:
                log.debug("aistats: span on_drop callback failed: %s", e)


# kinds of drop
_QUEUE, _EXPORT, _FINAL, _CLOSED = range(4)
