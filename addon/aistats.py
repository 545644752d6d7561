"""aistats — LLM API traffic as observability, as a mitmproxy addon.

    mitmdump -s addon/aistats.py --set aistats_log=llm.jsonl

This file is the thin mitmproxy layer: hooks hand plain facts to ``aistats_engine`` (which
imports nothing from mitmproxy) and write what comes back. The traffic is never changed: the
stream callable returns every chunk as it came, and any exception of ours is logged once per
flow and swallowed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any
from collections.abc import Callable

from mitmproxy import exceptions, http

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # mitmproxy adds it for -s scripts; tests import this file directly
    sys.path.insert(0, _HERE)

from aistats_engine import settings
from aistats_engine.wire import framing  # noqa: E402
from aistats_engine.outputs.logsink import JsonlSink  # noqa: E402
from aistats_engine.outputs.metrics import Metrics, MetricsConfig  # noqa: E402
from aistats_engine.outputs.metrics_server import MetricsServer  # noqa: E402
from aistats_engine.observer import (  # noqa: E402
    DRAIN_LIMIT, Parsed, StreamObserver, StreamTiming, parse_body)
from aistats_engine.wire.providers import ApiMatch, match_api  # noqa: E402
from aistats_engine.wire.readers import RequestInfo, read_request  # noqa: E402
from aistats_engine.record.record import Record  # noqa: E402
from aistats_engine.record.builder import (  # noqa: E402
    Attribution, Failure, RequestMeta, ResponseMeta, build_record)

log = logging.getLogger("aistats")

METADATA_KEY = "aistats"
METADATA_VERSION = 1


def _metrics_part(s: settings.Settings) -> tuple:
    return (s.metrics, s.metrics_host, s.metrics_port, s.metrics_server_trio,
            s.metrics_label_limit, s.duration_buckets, s.ttft_buckets)


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
        self.settings: settings.Settings | None = None
        self._running = False
        self._sink: JsonlSink | None = None
        self._attribution = Attribution()
        self.metrics: Metrics | None = None
        self._metrics_server: MetricsServer | None = None
        self._reported: set[str] = set()
        self._overhead = 0.0  # seconds spent in our hooks, flushed to the metric per record
        self.records_written = 0
        self._print = False
        self._unpublished: list[Record] = []  # emitted, not yet given to sinks and metrics

    # -- options ---------------------------------------------------------------------------
    def load(self, loader: Any) -> None:
        for spec in settings.OPTIONS:
            loader.add_option(spec.name, spec.type, spec.default, spec.help)

    def configure(self, updated: set[str]) -> None:
        if self.settings is not None and not any(
                n.startswith("aistats_") or n == "termlog_verbosity" for n in updated):
            return
        from mitmproxy import ctx

        # Every log line costs a hook dispatch over all addons in mitmproxy (legacy add_log
        # events), so the summary is only made when the terminal shows INFO lines.
        self._print = (ctx.options.aistats_print
                       and getattr(ctx.options, "termlog_verbosity", "info") in ("info", "debug"))
        try:
            new = settings.parse({spec.name: getattr(ctx.options, spec.name)
                                  for spec in settings.OPTIONS})
            self._apply(new)
        except settings.SettingsError as e:
            if self._running:  # a change at run time (mitmweb, console): roll it back
                raise exceptions.OptionsError(str(e)) from None
            # At start-up one ERROR line makes mitmdump exit non-zero, without a traceback.
            log.error("aistats: %s", e)

    def _apply(self, new: settings.Settings) -> None:
        old = self.settings
        if (old is None or (old.log_path, old.log_max_bytes, old.log_backups)
                != (new.log_path, new.log_max_bytes, new.log_backups)):
            self._open_sink(new)
        self._attribution = Attribution(new.session_headers, new.consumer_header)
        if old is None or _metrics_part(old) != _metrics_part(new):
            self.metrics = Metrics(MetricsConfig(
                duration_buckets=new.duration_buckets,
                time_to_first_chunk_buckets=new.ttft_buckets,
                time_per_output_chunk_buckets=new.duration_buckets,
                server_metrics=new.metrics_server_trio,
                default_label_limit=new.metrics_label_limit,
                label_limits={"model": new.metrics_label_limit,
                              "consumer": new.metrics_label_limit},
            )) if new.metrics else None
            if self._running:  # reconfigured at run time: serve the new registry
                self._stop_metrics_server()
                self._start_metrics_server(new)
        self.settings = new

    def _open_sink(self, new: settings.Settings) -> None:
        if self._sink is not None:
            self._sink.close()
            self._sink = None
        if not new.log_path:
            return
        try:
            self._sink = JsonlSink(Path(new.log_path).expanduser(), max_bytes=new.log_max_bytes,
                                   backups=new.log_backups)
        except OSError as e:
            raise settings.SettingsError("aistats_log", new.log_path,
                                         f"a writable file path ({e.strerror or e})") from None

    def running(self) -> None:
        self._running = True
        if self.settings is None:
            return  # configuration failed; mitmdump is exiting
        log.info("aistats: %s", self.settings.describe())
        self._start_metrics_server(self.settings)

    def _start_metrics_server(self, cfg: settings.Settings) -> None:
        if not cfg.metrics or self.metrics is None:
            return
        server = MetricsServer(self.metrics.registry, host=cfg.metrics_host, port=cfg.metrics_port)
        try:
            server.start()
        except OSError as e:
            # At start-up this ERROR line makes mitmdump exit non-zero.
            log.error("aistats: cannot serve metrics on %s:%d: %s; set aistats_metrics_port "
                      "to a free port or aistats_metrics=false", cfg.metrics_host,
                      cfg.metrics_port, e.strerror or e)
            return
        self._metrics_server = server
        log.info("aistats: metrics on http://%s:%d/metrics", cfg.metrics_host, server.port)

    def _stop_metrics_server(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.stop()
            self._metrics_server = None

    def done(self) -> None:
        self._publish()
        self._stop_metrics_server()
        if self._sink is not None:
            self._sink.close()
            self._sink = None

    # -- hooks -----------------------------------------------------------------------------
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        with self._guard(flow, "requestheaders"):
            cfg = self.settings
            match = match_api(flow.request.method, flow.request.path)
            if match is None or cfg is None:
                return
            self._flows[flow.id] = _FlowState(match)
            if self.metrics is not None:
                self.metrics.request_started()
            while len(self._flows) > cfg.max_inflight:
                dropped, _ = self._flows.popitem(last=False)
                if self.metrics is not None:
                    self.metrics.request_finished()
                log.warning("aistats: more than %d LLM requests in flight; no record for flow %s",
                            cfg.max_inflight, dropped)

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
            if callable(resp.stream):
                return  # another addon already owns the stream
            st.observer = self._stream_observer(st, flow)
            if st.observer is not None:
                resp.stream = self._stream_fn(flow.id, st)

    def _stream_observer(self, st: _FlowState, flow: http.HTTPFlow) -> StreamObserver | None:
        """An observer for a streamed content type (SSE, NDJSON, AWS event stream), else None."""
        resp = flow.response
        cfg = self.settings
        assert resp is not None and cfg is not None
        framer_cls = framing.framer_for(resp.headers.get("content-type"))
        if framer_cls is None:
            return None
        return StreamObserver(st.match.api, framer_cls(max_event=cfg.max_event),
                              resp.headers.get("content-encoding"), flow.request.timestamp_start,
                              max_body=cfg.max_body, max_chunk_times=cfg.max_chunk_times)

    def _stream_fn(self, flow_id: str, st: _FlowState) -> Callable[[bytes], bytes]:
        """The ``flow.response.stream`` callable: returns every chunk as it came. Reading
        happens in ``drain``, scheduled to run after the chunk has been forwarded."""
        observer = st.observer
        assert observer is not None
        now = time.time
        clock = time.perf_counter
        try:
            call_soon: Callable[[Callable[[], None]], object] = asyncio.get_running_loop().call_soon
        except RuntimeError:  # no event loop (driven directly, as in unit tests): drain at once
            call_soon = _call_now

        def drain() -> None:
            t0 = clock()
            try:
                if not st.observer_failed and observer.drain(DRAIN_LIMIT):
                    call_soon(drain)  # more kept: let other connections go first
            except Exception as e:
                st.observer_failed = True
                self._report(flow_id, "stream", e)
            self._overhead += clock() - t0

        def observe(chunk: bytes) -> bytes:
            if chunk and not st.observer_failed:
                t0 = clock()
                try:
                    if observer.feed(chunk, now()):
                        call_soon(drain)
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
        if st.observer is not None:  # live stream: read in batches as it went, finished here
            parsed = st.observer.finish(complete=flow.error is None)
            if st.observer_failed:
                parsed.parse_errors.append("internal error while reading the stream")
            timing = st.observer.timing()
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
        assert resp is not None and self.settings is not None
        obs = self._stream_observer(st, flow) if stream else None
        if obs is not None:
            obs.feed_all(resp.raw_content or b"")
            return obs.finish(complete=flow.error is None)
        return parse_body(st.match.api, resp.raw_content, resp.headers.get("content-encoding"),
                          max_body=self.settings.max_body)

    def _emit(self, rec: Record) -> None:
        """Hand the record to the outputs, on the next loop turn when there is a loop: the
        end of a stream is then two short stretches of work instead of one long one, which
        is what other connections' chunks wait for."""
        self.records_written += 1
        self._unpublished.append(rec)
        if len(self._unpublished) == 1:
            try:
                asyncio.get_running_loop().call_soon(self._publish)
            except RuntimeError:  # driven without a loop (unit tests): publish at once
                self._publish()

    def _publish(self) -> None:
        t0 = time.perf_counter()
        records, self._unpublished = self._unpublished, []
        for rec in records:
            try:
                if self._sink is not None:
                    self._sink.write(rec.to_dict())
                if self.metrics is not None:
                    self.metrics.observe(rec)
                if self._print:
                    log.info("aistats: %s", _summary(rec))
            except Exception as e:
                self._report(rec.flow_id, "publish", e)
        self._overhead += time.perf_counter() - t0
        if self.metrics is not None:
            self.metrics.add_overhead(self._overhead)
            self._overhead = 0.0

    # -- failure containment ---------------------------------------------------------------
    def _guard(self, flow: http.HTTPFlow, hook: str) -> _Guard:
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


def _call_now(fn: Callable[[], None]) -> None:
    fn()


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
