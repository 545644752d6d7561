"""aistats — LLM API traffic as observability, as a mitmproxy addon.

    mitmdump -s addon/aistats.py --set aistats_log=llm.jsonl

This file is the thin mitmproxy layer: hooks hand plain facts to ``aistats_engine`` (which
imports nothing from mitmproxy) and write what comes back. The traffic is never changed: the
stream callable returns every chunk as it came, and any exception of ours is logged once per
flow and swallowed.
"""

from __future__ import annotations

import itertools
import logging
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

from mitmproxy import exceptions, http

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # mitmproxy adds it for -s scripts; tests import this file directly
    sys.path.insert(0, _HERE)

from aistats_engine import framing  # noqa: E402
from aistats_engine.metrics import DURATION_BUCKETS, Metrics, MetricsConfig  # noqa: E402
from aistats_engine.metrics_server import MetricsServer  # noqa: E402
from aistats_engine.logsink import DEFAULT_BACKUPS, DEFAULT_MAX_BYTES, JsonlSink  # noqa: E402
from aistats_engine.observer import (  # noqa: E402
    DEFAULT_MAX_BODY, DEFAULT_MAX_CHUNK_TIMES, DEFAULT_MAX_EVENT, Parsed, StreamObserver,
    StreamTiming, parse_body)
from aistats_engine.providers import ApiMatch, match_api  # noqa: E402
from aistats_engine.readers import RequestInfo, read_request  # noqa: E402
from aistats_engine.record import Record  # noqa: E402
from aistats_engine.record_builder import (  # noqa: E402
    DEFAULT_CONSUMER_HEADER, DEFAULT_SESSION_HEADERS, Attribution, Failure, RequestMeta,
    ResponseMeta, build_record)

log = logging.getLogger("aistats")

METADATA_KEY = "aistats"
METADATA_VERSION = 1
DEFAULT_MAX_INFLIGHT = 10_000
DEFAULT_METRICS_PORT = 9464
DEFAULT_LABEL_LIMIT = 100


def _buckets(option: str, text: str, default: tuple[float, ...]) -> tuple[float, ...]:
    """Comma-separated increasing seconds, e.g. ``0.1,0.5,1,5,30,60``; empty → the default."""
    if not text.strip():
        return default
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        values = ()
    if not values or any(b <= a for a, b in zip(values, values[1:])) or values[0] <= 0:
        raise exceptions.OptionsError(
            f"{option}: {text!r} is invalid; expected increasing positive numbers separated "
            "by commas, e.g. 0.1,0.5,1,5,30,60")
    return values


class _FlowState:
    """What we keep for one LLM flow between its hooks. (A plain class: mitmproxy executes
    this file without registering it in sys.modules, which dataclasses need.)"""

    __slots__ = ("match", "request_info", "observer", "observer_failed")

    def __init__(self, match: ApiMatch) -> None:
        self.match = match
        self.request_info: RequestInfo | None = None
        self.observer: StreamObserver | None = None
        self.observer_failed = False


class AIStats:
    """Hooks → engine. One record per LLM request, written to the configured sinks."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._flows: OrderedDict[str, _FlowState] = OrderedDict()
        self._sink: JsonlSink | None = None
        self._sink_path = ""
        self._attribution = Attribution()
        self._max_body = DEFAULT_MAX_BODY
        self._max_event = DEFAULT_MAX_EVENT
        self._max_times = DEFAULT_MAX_CHUNK_TIMES
        self._max_inflight = DEFAULT_MAX_INFLIGHT
        self._print = True
        self._reported: set[str] = set()
        self.records_written = 0
        self.metrics: Metrics | None = Metrics()
        self._metrics_server: MetricsServer | None = None
        self._metrics_addr: tuple[str, int] | None = None
        self._overhead = 0.0  # seconds spent in our hooks, flushed to the metric per record

    # -- options ---------------------------------------------------------------------------
    def load(self, loader: Any) -> None:
        loader.add_option("aistats_log", str, "",
                          "Write one JSON record per LLM request to this JSON Lines file.")
        loader.add_option("aistats_log_max_bytes", int, DEFAULT_MAX_BYTES,
                          "Rotate the log when it would exceed this many bytes (0: never).")
        loader.add_option("aistats_log_backups", int, DEFAULT_BACKUPS,
                          "Rotated log files to keep (log.1 … log.N).")
        loader.add_option("aistats_max_body", int, DEFAULT_MAX_BODY,
                          "Per-flow cap in bytes on the body copy aistats keeps and parses.")
        loader.add_option("aistats_max_event", int, DEFAULT_MAX_EVENT,
                          "Per-flow cap in bytes on one stream event (bigger ones are skipped).")
        loader.add_option("aistats_max_chunk_times", int, DEFAULT_MAX_CHUNK_TIMES,
                          "Per-flow cap on stored content-chunk timestamps.")
        loader.add_option("aistats_max_inflight", int, DEFAULT_MAX_INFLIGHT,
                          "Cap on concurrently tracked LLM requests (oldest dropped beyond).")
        loader.add_option("aistats_session_headers", str, ",".join(DEFAULT_SESSION_HEADERS),
                          "Comma-separated request headers, first present one is the session id.")
        loader.add_option("aistats_consumer_header", str, DEFAULT_CONSUMER_HEADER,
                          "Request header naming the consumer.")
        loader.add_option("aistats_print", bool, True,
                          "Print a one-line summary per LLM request.")
        loader.add_option("aistats_metrics", bool, True,
                          "Serve Prometheus metrics on aistats_metrics_host:aistats_metrics_port.")
        loader.add_option("aistats_metrics_host", str, "127.0.0.1",
                          "Address the metrics endpoint binds to.")
        loader.add_option("aistats_metrics_port", int, DEFAULT_METRICS_PORT,
                          "Port of the metrics endpoint (0: any free port, logged at start).")
        loader.add_option("aistats_metrics_server_trio", bool, False,
                          "Also export gen_ai_server_* histograms (Envoy AI Gateway dashboards).")
        loader.add_option("aistats_metrics_label_limit", int, DEFAULT_LABEL_LIMIT,
                          "Distinct values kept per metric label (models, consumers); "
                          "more go to 'other'.")
        loader.add_option("aistats_metrics_duration_buckets", str, "",
                          "Seconds, comma-separated: buckets of the duration histograms "
                          "(default: the OTel GenAI list, 0.01 … 81.92).")
        loader.add_option("aistats_metrics_ttft_buckets", str, "",
                          "Seconds, comma-separated: buckets of the time-to-first-chunk "
                          "histogram (default: 0.01 … 81.92).")

    def configure(self, updated: set[str]) -> None:
        from mitmproxy import ctx

        o = ctx.options
        for name in ("aistats_log_max_bytes", "aistats_log_backups", "aistats_max_body",
                     "aistats_max_event", "aistats_max_chunk_times", "aistats_max_inflight"):
            if name in updated:
                value = getattr(o, name)
                minimum = 0 if name in ("aistats_log_max_bytes", "aistats_log_backups",
                                        "aistats_max_chunk_times") else 1
                if value < minimum:
                    raise exceptions.OptionsError(
                        f"{name}: {value} is invalid; expected an integer >= {minimum}")
        headers = [h.strip().lower() for h in o.aistats_session_headers.split(",") if h.strip()]
        for h in headers + [o.aistats_consumer_header.strip().lower()]:
            if not h or not all(c.isalnum() or c in "-_" for c in h):
                raise exceptions.OptionsError(
                    f"aistats_session_headers/aistats_consumer_header: {h!r} is invalid; "
                    "expected HTTP header names such as x-session-id")
        self._attribution = Attribution(tuple(headers), o.aistats_consumer_header.strip().lower())
        self._max_body = o.aistats_max_body
        self._max_event = o.aistats_max_event
        self._max_times = o.aistats_max_chunk_times
        self._max_inflight = o.aistats_max_inflight
        self._print = o.aistats_print
        if updated & {"aistats_log", "aistats_log_max_bytes", "aistats_log_backups"}:
            self._open_sink(o.aistats_log, o.aistats_log_max_bytes, o.aistats_log_backups)
        if any(name.startswith("aistats_metrics") for name in updated):
            self._configure_metrics(o)

    def _configure_metrics(self, o: Any) -> None:
        if not 0 <= o.aistats_metrics_port <= 65535:
            raise exceptions.OptionsError(
                f"aistats_metrics_port: {o.aistats_metrics_port} is invalid; "
                "expected a port number 0-65535")
        if o.aistats_metrics_label_limit < 1:
            raise exceptions.OptionsError(
                f"aistats_metrics_label_limit: {o.aistats_metrics_label_limit} is invalid; "
                "expected an integer >= 1")
        duration = _buckets("aistats_metrics_duration_buckets",
                            o.aistats_metrics_duration_buckets, DURATION_BUCKETS)
        ttft = _buckets("aistats_metrics_ttft_buckets", o.aistats_metrics_ttft_buckets,
                        DURATION_BUCKETS)
        self.metrics = Metrics(MetricsConfig(
            duration_buckets=duration, time_to_first_chunk_buckets=ttft,
            time_per_output_chunk_buckets=duration, server_metrics=o.aistats_metrics_server_trio,
            default_label_limit=o.aistats_metrics_label_limit,
            label_limits={"model": o.aistats_metrics_label_limit,
                          "consumer": o.aistats_metrics_label_limit},
        )) if o.aistats_metrics else None
        addr = (o.aistats_metrics_host, o.aistats_metrics_port) if o.aistats_metrics else None
        if self._metrics_server is not None:  # reconfigured while running: serve the new one
            self._stop_metrics_server()
            self._start_metrics_server(addr)

    def _start_metrics_server(self, addr: tuple[str, int] | None) -> None:
        self._metrics_addr = addr
        if addr is None or self.metrics is None:
            return
        server = MetricsServer(self.metrics.registry, host=addr[0], port=addr[1])
        try:
            server.start()
        except OSError as e:
            # ERROR during start-up makes mitmdump exit non-zero, with this one line.
            log.error("aistats: cannot serve metrics on %s:%d: %s; set aistats_metrics_port "
                      "to a free port or aistats_metrics=false", addr[0], addr[1],
                      e.strerror or e)
            return
        self._metrics_server = server
        log.info("aistats: metrics on http://%s:%d/metrics", addr[0], server.port)

    def _stop_metrics_server(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.stop()
            self._metrics_server = None

    def _open_sink(self, path: str, max_bytes: int, backups: int) -> None:
        old = self._sink
        self._sink = None
        if old is not None:
            old.close()
        self._sink_path = path
        if not path:
            return
        try:
            self._sink = JsonlSink(Path(path).expanduser(), max_bytes=max_bytes, backups=backups)
        except OSError as e:
            raise exceptions.OptionsError(
                f"aistats_log: cannot open {path!r} ({e.strerror or e}); "
                "expected a writable file path") from None

    def running(self) -> None:
        from mitmproxy import ctx

        o = ctx.options
        log.info(
            "aistats: log=%s (rotate at %d bytes, %d backups) max_body=%d max_event=%d "
            "max_chunk_times=%d max_inflight=%d session_headers=%s consumer_header=%s",
            o.aistats_log or "off", o.aistats_log_max_bytes, o.aistats_log_backups,
            o.aistats_max_body, o.aistats_max_event, o.aistats_max_chunk_times, o.aistats_max_inflight,
            ",".join(self._attribution.session_headers), self._attribution.consumer_header)
        if o.aistats_metrics:
            self._start_metrics_server((o.aistats_metrics_host, o.aistats_metrics_port))

    def done(self) -> None:
        self._stop_metrics_server()
        if self._sink is not None:
            self._sink.close()
            self._sink = None

    # -- hooks -----------------------------------------------------------------------------
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        with self._guard(flow, "requestheaders"):
            match = match_api(flow.request.method, flow.request.path)
            if match is None:
                return
            self._flows[flow.id] = _FlowState(match)
            if self.metrics is not None:
                self.metrics.request_started()
            while len(self._flows) > self._max_inflight:
                dropped, _ = self._flows.popitem(last=False)
                if self.metrics is not None:
                    self.metrics.request_finished()
                log.warning("aistats: more than %d LLM requests in flight; no record for flow %s",
                            self._max_inflight, dropped)

    def request(self, flow: http.HTTPFlow) -> None:
        with self._guard(flow, "request"):
            st = self._flows.get(flow.id)
            if st is not None:
                st.request_info = _read_request(flow)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        with self._guard(flow, "responseheaders"):
            st = self._flows.get(flow.id)
            resp = flow.response
            if st is None or resp is None or not flow.live:
                return
            framer_cls = framing.framer_for(resp.headers.get("content-type"))
            if framer_cls is None or callable(resp.stream):
                return  # not a stream, or another addon already owns it
            st.observer = StreamObserver(
                st.match.api, framer_cls(max_event=self._max_event),
                resp.headers.get("content-encoding"), flow.request.timestamp_start,
                max_body=self._max_body, max_chunk_times=self._max_times)
            resp.stream = self._stream_fn(flow.id, st)

    def _stream_fn(self, flow_id: str, st: _FlowState) -> Callable[[bytes], bytes]:
        observer = st.observer
        assert observer is not None
        now = time.time
        clock = time.perf_counter

        def observe(chunk: bytes) -> bytes:
            if chunk and not st.observer_failed:
                t0 = clock()
                try:
                    observer.feed(chunk, now())
                except Exception as e:  # never drop or delay a chunk for our failure
                    st.observer_failed = True
                    self._report(flow_id, "stream", e)
                self._overhead += clock() - t0
            return chunk

        return observe

    def response(self, flow: http.HTTPFlow) -> None:
        if not flow.live and flow.error is not None:
            return  # replay of a failed flow: the error hook follows and finalises it
        with self._guard(flow, "response"):
            self._finish(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        with self._guard(flow, "error"):
            self._finish(flow)

    # -- finalisation ----------------------------------------------------------------------
    def _finish(self, flow: http.HTTPFlow) -> None:
        st = self._flows.pop(flow.id, None)
        if st is None:
            return
        if self.metrics is not None:
            self.metrics.request_finished()
        if st.request_info is None:
            st.request_info = _read_request(flow)
        resp = flow.response
        stream = resp is not None and framing.framer_for(resp.headers.get("content-type")) is not None
        timing: StreamTiming | None = None
        parsed: Parsed | None = None
        if st.observer is not None:  # live stream: parsed as it went
            parsed = st.observer.finish(complete=flow.error is None)
            if st.observer_failed:
                parsed.parse_errors.append("internal error while reading the stream")
            timing = st.observer.timing
            body = st.observer.body()
            if resp is not None and body is not None and resp.raw_content is None:
                resp.raw_content = body  # so -w saves the streamed body; the client has it already
            flow.metadata[METADATA_KEY] = {
                "v": METADATA_VERSION,
                "timing": timing.to_plain(),
                "parsed": parsed.to_plain() if body is None else None,
            }
        elif resp is not None:
            md = flow.metadata.get(METADATA_KEY) if not flow.live else None
            if isinstance(md, dict) and md.get("v") == METADATA_VERSION:
                timing = StreamTiming.from_plain(md.get("timing") or {})
                if md.get("parsed"):
                    parsed = Parsed.from_plain(md["parsed"])
            if parsed is None:
                parsed = self._parse_stored(st, flow, stream)
        rec = build_record(
            next(self._ids), _request_meta(flow), st.match, st.request_info,
            _response_meta(resp) if resp is not None else None, parsed, stream, timing,
            Failure(flow.error.msg, flow.error.timestamp) if flow.error else None,
            self._attribution)
        self._emit(rec)

    def _parse_stored(self, st: _FlowState, flow: http.HTTPFlow, stream: bool) -> Parsed:
        resp = flow.response
        assert resp is not None
        encoding = resp.headers.get("content-encoding")
        if stream:
            framer_cls = framing.framer_for(resp.headers.get("content-type"))
            assert framer_cls is not None
            obs = StreamObserver(st.match.api, framer_cls(max_event=self._max_event), encoding,
                                 flow.request.timestamp_start, max_body=self._max_body,
                                 max_chunk_times=self._max_times)
            obs.feed_all(resp.raw_content or b"")
            return obs.finish(complete=flow.error is None)
        return parse_body(st.match.api, resp.raw_content, encoding, max_body=self._max_body)

    def _emit(self, rec: Record) -> None:
        self.records_written += 1
        if self._sink is not None:
            self._sink.write(rec.to_dict())
        if self.metrics is not None:
            self.metrics.observe(rec)
            self.metrics.add_overhead(self._overhead)
            self._overhead = 0.0
        if self._print:
            log.info("aistats: %s", _summary(rec))

    # -- failure containment ---------------------------------------------------------------
    def _guard(self, flow: http.HTTPFlow, hook: str) -> "_Guard":
        return _Guard(self, flow.id, hook)

    def _report(self, flow_id: str, where: str, exc: BaseException) -> None:
        if flow_id in self._reported:
            return
        if len(self._reported) > 10_000:
            self._reported.clear()
        self._reported.add(flow_id)
        log.warning("aistats: internal error in %s for flow %s: %s: %s (flow continues)",
                    where, flow_id, type(exc).__name__, exc)
        log.debug("aistats: traceback", exc_info=exc)


class _Guard:
    """Context manager: an exception of ours is logged once with the flow id, never raised."""

    __slots__ = ("_addon", "_flow_id", "_hook", "_t0")

    def __init__(self, addon: AIStats, flow_id: str, hook: str) -> None:
        self._addon, self._flow_id, self._hook = addon, flow_id, hook

    def __enter__(self) -> None:
        self._t0 = time.perf_counter()

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        self._addon._overhead += time.perf_counter() - self._t0
        if exc is not None and isinstance(exc, Exception):
            self._addon._report(self._flow_id, self._hook, exc)
            return True
        return False


def _read_request(flow: http.HTTPFlow) -> RequestInfo:
    try:
        body = flow.request.get_content(strict=False)
    except ValueError:
        body = flow.request.raw_content
    return read_request(body)


def _request_meta(flow: http.HTTPFlow) -> RequestMeta:
    req = flow.request
    headers: dict[str, str] = {}
    for k, v in req.headers.fields:
        headers.setdefault(k.decode("latin-1").lower(), v.decode("utf-8", "replace"))
    return RequestMeta(
        flow_id=flow.id, method=req.method, scheme=req.scheme, host=req.host, port=req.port,
        path=req.path.split("?", 1)[0], t_start=req.timestamp_start, headers=headers)


def _response_meta(resp: http.Response) -> ResponseMeta:
    return ResponseMeta(resp.status_code, resp.headers.get("content-type"),
                        resp.timestamp_start, resp.timestamp_end)


def _summary(rec: Record) -> str:
    parts = [f"#{rec.id}", rec.provider or "?", rec.operation or "?", rec.model or "?",
             str(rec.status) if rec.status is not None else "-"]
    if rec.input_tokens is not None or rec.output_tokens is not None:
        parts.append(f"in={rec.input_tokens} out={rec.output_tokens}")
    if rec.ttft_ms is not None:
        parts.append(f"ttft={rec.ttft_ms:.0f}ms")
    if rec.duration_ms is not None:
        parts.append(f"{rec.duration_ms:.0f}ms")
    if rec.error:
        parts.append(f"error={rec.error_type}: {rec.error[:80]}")
    if rec.parse_error:
        parts.append(f"parse_error={rec.parse_error[:80]}")
    return " ".join(parts)


addons = [AIStats()]
