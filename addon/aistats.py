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
import math
import sqlite3
import sys
import time
from collections import OrderedDict, deque
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple
from collections.abc import Callable

from mitmproxy import exceptions, http

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # mitmproxy adds it for -s scripts; tests import this file directly
    sys.path.insert(0, _HERE)

import aistats_contentview  # noqa: E402,F401  (registers the "LLM" content view)
from aistats_engine import settings  # noqa: E402
from aistats_engine.observer import (  # noqa: E402
    DRAIN_LIMIT, Parsed, StreamObserver, StreamTiming, parse_body)
from aistats_engine.outputs.bus import Bus, Finished, Started, first_values  # noqa: E402
from aistats_engine.outputs.metrics import MetricsConfig  # noqa: E402
from aistats_engine.outputs.metrics_output import MetricsOutput  # noqa: E402
from aistats_engine.outputs.higress_log import json_line as higress_line  # noqa: E402
from aistats_engine.outputs.jsonl_output import JsonlOutput  # noqa: E402
from aistats_engine.outputs.captures import CaptureCache  # noqa: E402
from aistats_engine.outputs.store import Store  # noqa: E402
from aistats_engine.outputs.summary import SummaryLine  # noqa: E402
from aistats_engine.record.clients import client_name  # noqa: E402
from aistats_engine.record.cost import Pricer  # noqa: E402
from aistats_engine.record import redact  # noqa: E402
from aistats_engine.record.builder import (  # noqa: E402
    Attribution, Failure, RequestMeta, ResponseMeta, build_record, exchange_end)
from aistats_engine.record.problems import INTERNAL, Problem  # noqa: E402
from aistats_engine.rules import config as rules_config  # noqa: E402
from aistats_engine.rules.engine import FlowRules  # noqa: E402
from aistats_engine.web.events import EventHub  # noqa: E402
from aistats_engine.wire import framing  # noqa: E402
from aistats_engine.wire.format import Match  # noqa: E402
from aistats_engine.wire.formats import match_api, match_configured  # noqa: E402
from aistats_engine.wire.reader import RequestInfo, read_request  # noqa: E402
from aistats_engine.wire.usage import Usage  # noqa: E402

if TYPE_CHECKING:
    from aistats_engine.web.server import WebServer

log = logging.getLogger("aistats")

METADATA_KEY = "aistats"
CONFIG_CHECK_SECONDS = 1.0  # how often the rule file is checked for changes
# Records waiting for a later loop turn, at most: `mitmdump -nr` reads a whole file without
# yielding to the loop, so without a bound every flow of the file would wait (memory, GC).
MAX_PENDING = 32
GATHER_S = 0.2  # a finished record waits at most this long for others, to be made together
SLICE_S = 0.0003  # record work per loop turn at most (one record may take longer)
METADATA_VERSION = 2  # v2: Parsed with structured problems (v1 flows replay from their bodies)


def _log_part(s: settings.Settings) -> tuple:
    return (s.log_path, s.log_max_bytes, s.log_backups)


def _higress_log_part(s: settings.Settings) -> tuple:
    return (s.higress_log_path, s.log_max_bytes, s.log_backups)


def _spans_part(s: settings.Settings) -> tuple:
    return (s.otlp_endpoint, s.span_content)


def _store_part(s: settings.Settings) -> tuple:
    return (s.ui, s.store_path, s.store_rows, s.store_max_age, s.captures_bytes, s.capture_parts,
            s.store_captures, s.max_body)


def _metrics_part(s: settings.Settings) -> tuple:
    return (s.metrics, s.metrics_host, s.metrics_port, s.metrics_server_trio,
            s.metrics_label_limit, s.duration_buckets, s.ttft_buckets)


class _FlowState:
    """What we keep for one LLM flow between its hooks. (A plain class: mitmproxy executes
    this file without registering it in sys.modules, which dataclasses need.)"""

    __slots__ = ("addon", "match", "started", "request_info", "framer", "observer", "failed",
                 "rules", "response_seen", "req_headers", "resp_headers")

    def __init__(self, addon: AIStats, match: Match, started: Started, rules: FlowRules | None,
                 req_headers: dict[str, str]) -> None:
        self.addon = addon
        self.match = match
        # Header text by lower-cased name, first value, made once: mitmproxy's Headers.get
        # costs microseconds a call, and a record needs a dozen lookups.
        self.req_headers = req_headers
        self.resp_headers: dict[str, str] = {}
        self.started = started  # what in-flight views show
        self.request_info: RequestInfo | None = None
        self.framer: type[framing.Framer] | None = None  # the response is a stream of this
        self.observer: StreamObserver | None = None
        self.failed: list[Problem] = []  # our own exceptions while reading this flow
        self.rules = rules  # the attribute rules' state, when a configuration is loaded
        self.response_seen = False  # the response-header moment has been handled

    # The stream: methods of the flow's state rather than closures, which would hold a dozen
    # cells and two function objects per open stream.
    def observe(self, chunk: bytes) -> bytes:
        """The ``flow.response.stream`` callable: returns every chunk as it came. Reading
        happens in ``drain``, scheduled to run after the chunk has been forwarded. Not timed
        into the overhead: keeping a chunk costs less than timing it would."""
        observer = self.observer  # (None once the flow is finished)
        if chunk and observer is not None and not self.failed:
            try:
                if observer.feed(chunk, time.time()):
                    _soon(self.drain)
            except Exception as e:  # never drop or delay a chunk for our failure
                self.addon._failed(self.started.flow_id, self, "stream", e)
        return chunk

    def drain(self) -> None:
        t0 = time.perf_counter()
        try:
            observer = self.observer
            if observer is not None and not self.failed and observer.drain(DRAIN_LIMIT):
                _soon(self.drain)  # more kept: let other connections go first
        except Exception as e:
            self.addon._failed(self.started.flow_id, self, "stream", e)
        self.addon.overhead += time.perf_counter() - t0


class AIStats:
    """Hooks → engine → one record per LLM request, handed to the outputs on one bus."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._flows: OrderedDict[str, _FlowState] = OrderedDict()
        self.settings: settings.Settings | None = None
        self._running = False
        self.bus = Bus(self._report_output)
        self.bus.on_dropped(self._dropped)
        self._attribution = Attribution()
        self.rules: rules_config.RulesConfig | None = None  # the loaded attribute rules
        self.hub = EventHub(self._inflight)  # live events for the UI (an output, always on)
        self.bus.replace("events", self.hub)
        self.web: WebServer | None = None  # the endpoint: /metrics, the API and the UI
        self._watcher: asyncio.Task | None = None
        self._reported: set[str] = set()
        self.overhead = 0.0  # seconds spent in our hooks, in total
        self.records_written = 0
        self._replay = _ReplayProgress(self)  # `mitmdump -nr`: progress on the terminal
        self._unbuilt: deque[Callable[[], Finished]] = deque()  # read, record not made yet
        self._gathering = False  # a _finish_some is scheduled
        self._timer: asyncio.TimerHandle | None = None  # ... as the end of a gathering
        self._offline = False  # reading a flow file, and exiting when it is read (_offline_run)
        # A flow file (-w) or a flow view (mitmweb, console) keeps flows: a stream's reading is
        # then made in its response hook, to go with the flow (flow.metadata).
        self._keep_reading = False

    # -- options ---------------------------------------------------------------------------
    def load(self, loader: Any) -> None:
        for spec in settings.OPTIONS:
            loader.add_option(spec.name, spec.type, spec.default, spec.help)

    def configure(self, updated: set[str]) -> None:
        from mitmproxy import ctx

        if "save_stream_file" in updated or self.settings is None:
            self._keep_reading = _flows_kept()
        if self.settings is not None and not any(
                n.startswith("aistats_") or n == "termlog_verbosity" for n in updated):
            return

        if not self._running:
            self._offline = _offline_run(ctx.options)
        try:
            new = settings.parse({spec.name: getattr(ctx.options, spec.name)
                                  for spec in settings.OPTIONS})
            self._apply(new, getattr(ctx.options, "termlog_verbosity", "info"))
        except settings.SettingsError as e:
            if self._running:  # a change at run time (mitmweb, console): roll it back
                raise exceptions.OptionsError(str(e)) from None
            # At start-up one ERROR line makes mitmdump exit non-zero, without a traceback.
            log.error("aistats: %s", e)

    def _apply(self, new: settings.Settings, verbosity: str) -> None:
        """Build every output whose options changed before replacing (and closing) the old
        one, so a refused change leaves the running outputs as they were."""
        old = self.settings
        built: dict[str, Any] = {}

        def changed(part: Callable[[settings.Settings], tuple]) -> bool:
            return old is None or part(old) != part(new)

        try:
            if changed(_log_part):
                built["log"] = self._build_jsonl("log", "aistats_log", new.log_path, new,
                                                 Finished.record_json)
            if changed(_higress_log_part):
                built["higress_log"] = self._build_jsonl(
                    "higress_log", "aistats_higress_log", new.higress_log_path, new, higress_line)
            if changed(_spans_part):
                built["spans"] = self._build_spans(new)
            if changed(_store_part):
                built["store"] = self._build_store(new)
            if changed(_metrics_part):
                built["metrics"] = (self._build_metrics(new) if new.metrics and not self._offline
                                    else None)
            if self._running and (old is None or self._web_part(old) != self._web_part(new)):
                self._serve(new)
        except settings.SettingsError:
            for out in built.values():
                if out is not None:
                    out.close()
            raise
        for name, out in built.items():
            self.bus.replace(name, out)
        # Every log line costs a hook dispatch over all addons in mitmproxy (legacy add_log
        # events), so the summary is only made when the terminal shows INFO lines.
        show = new.print_summary and verbosity in ("info", "debug")
        if show != ("summary" in self.bus):
            self.bus.replace("summary", SummaryLine() if show else None)
        self.settings = new
        self._use_rules(new.rules)

    def _use_rules(self, rules: rules_config.RulesConfig | None) -> None:
        """The rules' session and consumer headers come before the options' ones; the file's
        prices and host names apply from the next record on (what was learned per upstream
        stays)."""
        cfg = self.settings
        assert cfg is not None
        sessions = (*(rules.session_headers if rules else ()), *cfg.session_headers)
        consumer = (rules.consumer_header if rules else None) or cfg.consumer_header
        old = self._attribution
        if old.pricer is not None:
            old.pricer.close()
        self._attribution = Attribution(
            tuple(dict.fromkeys(sessions)), consumer,
            Pricer(rules.prices if rules else (), allow_fetch=cfg.price_fetch),
            old.upstreams, rules.provider_hosts if rules else (), old.responses)
        self.rules = rules

    def _build_jsonl(self, name: str, option: str, path: str, new: settings.Settings,
                     to_line: Callable[[Finished], bytes]) -> JsonlOutput | None:
        if not path:
            return None
        try:
            return JsonlOutput(path, new.log_max_bytes, new.log_backups, to_line,
                               on_drop=lambda n: self.bus.dropped(name, n))
        except OSError as e:
            raise settings.SettingsError(option, path,
                                         f"a writable file path ({e.strerror or e})") from None

    def _build_spans(self, new: settings.Settings) -> Any:
        if not new.otlp_endpoint:
            return None
        from aistats_engine.outputs.spans import SpanOutput  # the OTel SDK only when asked
        return SpanOutput(None if new.otlp_endpoint == "env" else new.otlp_endpoint,
                          include_content=new.span_content,
                          on_drop=lambda n: self.bus.dropped("spans", n))

    def _build_metrics(self, new: settings.Settings) -> MetricsOutput:
        return MetricsOutput(MetricsConfig(
            duration_buckets=new.duration_buckets,
            time_to_first_chunk_buckets=new.ttft_buckets,
            time_per_output_chunk_buckets=new.duration_buckets,
            server_metrics=new.metrics_server_trio,
            default_label_limit=new.metrics_label_limit,
            label_limits={"model": new.metrics_label_limit,
                          "consumer": new.metrics_label_limit},
        ), inflight=self._flows.__len__, overhead=lambda: self.overhead)

    def _build_store(self, new: settings.Settings) -> Store | None:
        if not new.ui or (self._offline and not new.store_path):
            return None  # (an in-memory store of an offline run would be gone unread)
        path = str(Path(new.store_path).expanduser()) if new.store_path else None
        try:
            store = Store(path, max_rows=new.store_rows, max_age_s=new.store_max_age,
                          captures=CaptureCache(new.captures_bytes) if new.captures_bytes else None,
                          capture_parts=new.capture_parts, persist_captures=new.store_captures,
                          max_body=new.max_body, on_drop=lambda n: self.bus.dropped("store", n),
                          report=lambda msg: log.warning("aistats: %s", redact.shapes(msg)))
        except (OSError, sqlite3.Error) as e:
            raise settings.SettingsError("aistats_store", new.store_path,
                                         f"a writable SQLite file ({e})") from None
        # A kept store must never see an id twice: go on after the largest it holds.
        self._ids = itertools.count(max(next(self._ids), store.next_id()))
        return store

    def _web_part(self, s: settings.Settings) -> tuple:
        return (s.metrics or s.ui, s.metrics_host, s.metrics_port, s.api_token, s.ui)

    def _serve(self, cfg: settings.Settings) -> None:
        """(Re)start the endpoint: /metrics, and with aistats_ui the API and UI. A new address
        is bound before the old server stops; at run time a failure is refused and rolled
        back, at start it is one ERROR line (mitmdump exits non-zero)."""
        old = self.web
        if not (cfg.metrics or cfg.ui):
            self.web = None
            if old is not None:
                old.stop()
            return
        from aistats_engine.web.server import WebServer  # tornado only when something is served

        port = cfg.metrics_port or (old.port if old is not None else 0)  # 0: keep the one we have
        if old is not None and (old.host, old.port) == (cfg.metrics_host, port):
            old.stop()  # the same address: it must be free before the new one binds
            old = None
        server = WebServer(
            cfg.metrics_host, port,
            metrics=lambda: self._registry() if self.settings and self.settings.metrics else None,
            store=lambda: self.bus.get("store") if self.settings and self.settings.ui else None,
            hub=self.hub, inflight=self._inflight, token=cfg.api_token or None)
        try:
            server.start()
        except OSError as e:
            if self._running:
                raise settings.SettingsError(
                    "aistats_metrics_port", cfg.metrics_port,
                    f"a free port on {cfg.metrics_host} ({e.strerror or e})") from None
            log.error("aistats: cannot serve metrics on %s:%d: %s; set aistats_metrics_port "
                      "to a free port or aistats_metrics=false", cfg.metrics_host,
                      cfg.metrics_port, e.strerror or e)
            return
        self.web = server
        if old is not None:
            old.stop()
        url = f"http://{cfg.metrics_host}:{server.port}"
        if cfg.metrics:
            log.info("aistats: metrics on %s/metrics", url)
        if cfg.ui:
            log.info("aistats: activity UI on %s/", url)

    def _registry(self) -> Any:
        out = self.bus.get("metrics")
        return out.metrics.registry if isinstance(out, MetricsOutput) else None

    def _inflight(self) -> list[dict]:
        """The requests not finished yet, for the API and UI (called from the web thread: a
        snapshot of the dict first)."""
        now = time.time()
        out = []
        for flow_id, st in list(self._flows.items()):
            s = st.started
            info = st.request_info
            out.append({"id": flow_id, "method": s.method, "host": s.host, "path": s.path,
                        "model": s.model or (info.model if info is not None else None),
                        "client": s.client, "session_id": s.session_id,
                        "started": s.t_start, "elapsed_ms": round((now - s.t_start) * 1000, 1),
                        "bytes": st.observer.bytes_seen if st.observer is not None else 0})
        return out

    def running(self) -> None:
        self._keep_reading = _flows_kept()  # (every addon is loaded by now)
        if self.settings is not None:
            log.info("aistats: %s", self.settings.describe())
            if self._offline:
                log.info("aistats: offline replay: no UI, API, /metrics or in-memory store (the "
                         "process exits when the file is read; keepserving=true keeps them)")
            else:
                self._serve(self.settings)
            self._watcher = asyncio.get_running_loop().create_task(self._watch_config())
        self._running = True

    async def _watch_config(self) -> None:
        """Reload the rule file when it changes (checked every second). A bad edit keeps the
        previous rules and says why, once per edit."""
        refused: tuple[float, int] | None = None
        while True:
            await asyncio.sleep(CONFIG_CHECK_SECONDS)
            cfg = self.settings
            if cfg is None or not cfg.config_path:
                continue
            path = Path(cfg.config_path).expanduser()
            try:
                stamp = rules_config.stamp_of(str(path))
            except OSError:
                continue  # gone for now (an editor replacing it): keep the rules we have
            current = self.rules.stamp if self.rules is not None else None
            if stamp in (current, refused):
                continue
            try:
                rules = rules_config.load(str(path))
            except settings.SettingsError as e:
                refused = stamp
                log.warning("aistats: %s; keeping the previous configuration", e)
                continue
            self._use_rules(rules)
            log.info("aistats: reloaded %s (%d attributes)", path, len(rules.attributes))

    def done(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        self._finish_pending()
        self._replay.summary()
        if self.web is not None:
            self.web.stop()
            self.web = None
        self.bus.close(wait=True)
        if self._attribution.pricer is not None:
            self._attribution.pricer.close()

    # -- hooks -----------------------------------------------------------------------------
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if not flow.live:
            self._replay.flow_read()
        with self._guard(flow, "requestheaders"):
            cfg = self.settings
            req = flow.request
            rules = self.rules
            if rules is None or rules.path_suffixes is None:
                match = match_api(req.method, req.path)
            else:
                match = match_configured(req.method, req.path, rules.path_suffixes)
            if match is None or cfg is None:
                return
            headers = dict(first_values(  # all of them only when rules may read any
                req.headers.fields,
                only=None if rules is not None else self._attribution.request_header_bytes))
            started = Started(flow.id, req.method, req.host, req.port, req.path.split("?", 1)[0],
                              req.timestamp_start, match.api, match.model_from_path,
                              client_name(headers.get("user-agent")),
                              self._attribution.session_of(headers))
            self._flows[flow.id] = _FlowState(
                self, match, started,
                FlowRules(rules, match.api, cfg.max_attribute_bytes) if rules else None, headers)
            while len(self._flows) > cfg.max_inflight:
                dropped, _ = self._flows.popitem(last=False)
                log.warning("aistats: more than %d LLM requests in flight; no record for flow %s",
                            cfg.max_inflight, dropped)
            self.bus.started(started)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        with self._guard(flow, "responseheaders"):
            st = self._flows.get(flow.id)
            resp = flow.response
            if st is None or resp is None:
                return
            if st.rules is not None:
                self._read_request(st, flow.request.raw_content)  # the rules' request phase first
            self._response_headers(st, resp)
            if st.framer is None or not flow.live or callable(resp.stream) or (
                    st.rules is not None and st.rules.response_skipped):
                return  # a whole body, a replay, a response the rules skip, or another
                # addon already owns the stream
            if st.request_info is None:
                # A stream's request is read on the next loop turn, once the response headers
                # are on their way to the client (in-flight views show its model meanwhile); a
                # whole body's is read with its record. Not in a ``request`` hook of its own:
                # that would delay the request, and every hook an addon has is dispatched for
                # every flow, LLM or not.
                _soon(partial(self._late_request, st, flow))
            st.observer = self._stream_observer(st, flow.request.timestamp_start)
            resp.stream = st.observe

    def _late_request(self, st: _FlowState, flow: http.HTTPFlow) -> None:
        if st.request_info is None:  # (a whole response may have finished the flow already)
            with self._guard(flow, "request"):
                self._read_request(st, flow.request.raw_content)

    def _response_headers(self, st: _FlowState, resp: http.Response) -> None:
        """Stream or not (once per flow), and the rules' response-header moment; a content type
        the rules do not enable leaves the response unread, as Higress does."""
        st.response_seen = True
        rules = st.rules
        st.resp_headers = headers = dict(first_values(
            resp.headers.fields, only=None if rules is not None else _RESPONSE_HEADER_BYTES))
        ctype = headers.get("content-type")
        st.framer = framing.framer_for(ctype)
        if rules is not None:
            types = rules.cfg.content_types
            if types and not any(t in (ctype or "").lower() for t in types):
                rules.response_skipped = True
            else:
                rules.response_headers(headers)

    def _stream_observer(self, st: _FlowState, t_start: float) -> StreamObserver:
        cfg = self.settings
        assert cfg is not None and st.framer is not None
        observer = StreamObserver(st.match.fmt, st.framer(max_event=cfg.max_event),
                                  st.resp_headers.get("content-encoding"),
                                  t_start, max_body=cfg.max_body,
                                  max_chunk_times=cfg.max_chunk_times)
        if st.rules is not None and st.rules.wants_events:
            observer.reader.tap = st.rules.event
        return observer

    def response(self, flow: http.HTTPFlow) -> None:
        if not flow.live and flow.error is not None:
            return  # replay of a failed flow: the error hook follows and finalises it
        with self._guard(flow, "response"):
            self._finish(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        with self._guard(flow, "error"):
            self._finish(flow)

    # -- finalisation ----------------------------------------------------------------------
    def _read_request(self, st: _FlowState, raw: bytes | None) -> None:
        cfg = self.settings
        rules = st.rules
        body: list[Any] = []
        st.request_info = read_request(
            raw, st.req_headers.get("content-encoding"),
            cfg.max_body if cfg is not None else settings.DEFAULT_MAX_BODY,
            body.append if rules is not None else None,
            content_type=st.req_headers.get("content-type"), fmt=st.match)
        if rules is not None:
            rules.request(st.req_headers, body[0] if body else None)
        # Keep only the header text the record still reads: a stream can stay open long.
        keep = self._attribution.header_names
        st.req_headers = {k: v for k, v in st.req_headers.items() if k in keep}

    def _finish(self, flow: http.HTTPFlow) -> None:
        """The flow's last hook: what the record needs of the flow is taken now; the reading
        itself (request, body, the stream's rest) waits with it for the record (``_build``),
        where it runs among other records' on warm caches, unless the flow carries the
        reading on (a ``-w`` file, a flow view)."""
        st = self._flows.pop(flow.id, None)
        if st is None:
            return
        resp = flow.response
        if st.request_info is None and st.rules is not None:
            self._read_request(st, flow.request.raw_content)  # before the response phases
        if resp is not None and not st.response_seen:
            self._response_headers(st, resp)  # the responseheaders hook did not run
        observer, st.observer = st.observer, None  # (a late chunk or drain is ignored)
        reading: _Unread | tuple[StreamTiming | None, Parsed | None] = (None, None)
        if (resp is not None or observer is not None) and (
                st.rules is None or not st.rules.response_skipped):
            reading = _Unread(observer, flow.metadata.get(METADATA_KEY) if not flow.live else None,
                              flow.error is None)
            if observer is not None:
                body = observer.take_body()
                if resp is not None and body is not None and resp.raw_content is None:
                    resp.raw_content = body  # so -w saves the streamed body; the client has it
                if self._keep_reading:
                    reading = self._read_now(st, flow, reading)
        metas = (_request_meta(flow, st.req_headers),
                 _response_meta(resp, st.resp_headers) if resp is not None else None)
        failure = Failure(flow.error.msg, flow.error.timestamp) if flow.error else None
        req = flow.request
        raw = (req.headers.fields, resp.headers.fields if resp is not None else (),
               req.path.partition("?")[2], req.raw_content, st.req_headers.get("content-encoding"),
               resp.raw_content if resp is not None else None,
               st.resp_headers.get("content-encoding"))
        self._emit(partial(self._build, st, flow.id, metas, reading, failure,
                           req.timestamp_start, raw), flow.live)

    def _read_now(self, st: _FlowState, flow: http.HTTPFlow, unread: _Unread
                  ) -> tuple[StreamTiming | None, Parsed | None]:
        """A live stream's reading, kept with the flow: a replay without rules then takes it
        instead of reading the body again (rules need the events)."""
        try:
            timing, parsed = self._read_response(st, unread, None, flow.request.timestamp_start)
        except Exception as e:  # a reader failure still gives a record, marked
            self._failed(flow.id, st, "finish", e)
            return None, None
        if timing is not None and parsed is not None:  # (always, for a stream)
            flow.metadata[METADATA_KEY] = {
                "v": METADATA_VERSION, "timing": timing.to_plain(), "parsed": parsed.to_plain()}
        return timing, parsed

    def _build(self, st: _FlowState, flow_id: str,
               metas: tuple[RequestMeta, ResponseMeta | None],
               reading: _Unread | tuple[StreamTiming | None, Parsed | None],
               failure: Failure | None, t_start: float, raw: tuple) -> Finished:
        """The record, made on a later loop turn than the flow's last hook (a stretch of its
        own: other connections' chunks wait for each stretch, not for their sum). What waits
        for it holds no reference to the flow, which mitmproxy frees after its hooks as it
        would without aistats: a waiting flow's objects would be traversed by every garbage
        collection meanwhile, and promoted to the older generations."""
        if st.request_info is None:
            try:
                self._read_request(st, raw[3])
            except Exception as e:
                self._failed(flow_id, st, "request", e)
        if isinstance(reading, _Unread):
            try:
                reading = self._read_response(st, reading, raw[5], t_start)
            except Exception as e:  # a reader failure still gives a record, marked
                self._failed(flow_id, st, "finish", e)
                reading = (None, None)
        timing, parsed = reading
        if parsed is not None and st.rules is not None and st.rules.cfg.disable_openai_usage:
            parsed.usage, parsed.usage_source = Usage(), "missing"
        req_meta, resp_meta = metas
        args = (req_meta, st.match, st.request_info or RequestInfo(), resp_meta)
        stream = st.framer is not None
        try:
            rec = build_record(next(self._ids), *args, parsed, stream, timing, failure,
                               self._attribution, tuple(st.failed), st.rules)
        except Exception as e:
            self._failed(flow_id, st, "record", e)
            rec = build_record(next(self._ids), *args, None, stream, None, failure,
                               self._attribution, tuple(st.failed))
        t_end = exchange_end(req_meta, resp_meta, timing, failure)
        return Finished(rec, t_start, t_end if t_end is not None else req_meta.t_start, *raw)

    def _read_response(self, st: _FlowState, unread: _Unread, body: bytes | None,
                       t_start: float) -> tuple[StreamTiming | None, Parsed | None]:
        """A stream's rest (read in batches as it went), or a stored reading (a replay of a
        live run), or the whole body."""
        if unread.observer is not None:
            parsed = unread.observer.finish(complete=unread.complete)
            timing: StreamTiming | None = unread.observer.timing()
        else:
            timing, parsed = None, None
            md = unread.metadata
            if isinstance(md, dict) and md.get("v") in (1, METADATA_VERSION):
                timing = StreamTiming.from_plain(md.get("timing") or {})
                if (md.get("parsed") and md.get("v") == METADATA_VERSION
                        and (st.rules is None or body is None)):
                    parsed = Parsed.from_plain(md["parsed"])
            if parsed is None:
                parsed = self._parse_stored(st, body, t_start, unread.complete)
        return timing, parsed

    def _parse_stored(self, st: _FlowState, body: bytes | None, t_start: float,
                      complete: bool) -> Parsed:
        assert self.settings is not None
        if st.framer is not None:
            obs = self._stream_observer(st, t_start)
            obs.feed_all(body or b"")
            return obs.finish(complete=complete)
        return parse_body(st.match.fmt, body, st.resp_headers.get("content-encoding"),
                          max_body=self.settings.max_body,
                          tap=st.rules.body if st.rules is not None else None)

    def _emit(self, build: Callable[[], Finished], live: bool) -> None:
        """Make the record and hand it to the outputs a little later, together with the
        records that finish meanwhile, in stretches of at most ``SLICE_S``: one record alone
        runs mostly on cold caches (about 5x the time of the next one in the live process),
        and a stretch bounded in time is what other connections' chunks wait for. Once
        ``MAX_PENDING`` wait they go at the next loop turn; in a replay (the loop does not
        turn), or past twice that, at once."""
        self.records_written += 1
        self._unbuilt.append(build)
        waiting = len(self._unbuilt)
        if waiting >= MAX_PENDING and (not live or waiting >= 2 * MAX_PENDING):
            self._finish_pending()
        elif waiting >= MAX_PENDING and self._timer is not None:
            self._timer.cancel()  # enough gathered: the next loop turn, in stretches
            self._timer = None
            _soon(self._finish_some)
        elif not self._gathering:
            self._gathering = True
            self._timer = _later(GATHER_S, self._finish_some)

    def _finish_some(self) -> None:
        """Records made for up to SLICE_S, then given to the outputs; the rest next turn."""
        self._timer = None
        self._make_records(time.perf_counter() + SLICE_S)
        if self._unbuilt:
            _soon(self._finish_some)
        else:
            self._gathering = False

    def _finish_pending(self) -> None:
        """Every record read and not made yet, now (replay without loop turns, exit)."""
        self._make_records(math.inf)

    def _make_records(self, until: float) -> None:
        """Records made until ``until`` (``perf_counter`` time; one at least), then given to
        the outputs together."""
        t0 = time.perf_counter()
        made = []
        while self._unbuilt:
            made.append(self._unbuilt.popleft()())
            if time.perf_counter() >= until:
                break
        self.bus.finished_all(made)
        self.overhead += time.perf_counter() - t0

    # -- failure containment ---------------------------------------------------------------
    def _guard(self, flow: http.HTTPFlow, hook: str) -> _Guard:
        return _Guard(self, flow.id, hook)

    def _failed(self, flow_id: str, st: _FlowState, where: str, exc: Exception) -> None:
        """Our exception while reading a flow: reported once, and marked on its record."""
        if not st.failed:
            st.failed.append(Problem(INTERNAL, f"internal error in aistats ({where}): "
                                               f"{type(exc).__name__}"))
        self._report(flow_id, where, exc)

    def _report(self, flow_id: str, where: str, exc: BaseException) -> None:
        if flow_id in self._reported:
            return
        if len(self._reported) > 10_000:
            self._reported.clear()
        self._reported.add(flow_id)
        log.warning("aistats: internal error in %s for flow %s: %s: %s (flow continues)",
                    where, flow_id, type(exc).__name__, redact.shapes(str(exc)))
        log.debug("aistats: traceback", exc_info=exc)

    def _report_output(self, output: str, where: str, exc: Exception) -> None:
        self._report(f"{output}:{where}", f"output {output}", exc)

    def _dropped(self, output: str, n: int) -> None:
        out = self.bus.get("metrics")
        if isinstance(out, MetricsOutput):
            out.dropped(output, n)


class _Unread(NamedTuple):
    """What reading a finished flow's response takes, without the flow."""

    observer: StreamObserver | None  # a live stream's, with the chunks not read yet
    metadata: Any  # a replayed flow's stored reading (flow.metadata), if any
    complete: bool  # no error ended the flow


class _ReplayProgress:
    """Offline replay of a long flow file: flows read, records written and the rate on the
    terminal at most once a second, and a summary at the end (INFO lines: quiet under -q)."""

    __slots__ = ("_addon", "flows", "_t0", "_next")

    def __init__(self, addon: AIStats) -> None:
        self._addon = addon
        self.flows = 0
        self._t0 = self._next = 0.0

    def flow_read(self) -> None:
        now = time.monotonic()
        if not self.flows:
            self._t0, self._next = now, now + 1.0
        self.flows += 1
        if now >= self._next:
            self._next = now + 1.0
            log.info("aistats: replay: %s", self._line(now))

    def summary(self) -> None:
        if self.flows:
            log.info("aistats: replay done: %s", self._line(time.monotonic()))

    def _line(self, now: float) -> str:
        took = max(now - self._t0, 1e-6)
        return (f"{self.flows} flows read, {self._addon.records_written} records written in "
                f"{took:.1f} s ({self.flows / took:.0f} flows/s)")


class _Guard:
    """Context manager: an exception of ours is logged once with the flow id, never raised."""

    __slots__ = ("_addon", "_flow_id", "_hook", "_t0")

    def __init__(self, addon: AIStats, flow_id: str, hook: str) -> None:
        self._addon, self._flow_id, self._hook = addon, flow_id, hook

    def __enter__(self) -> None:
        self._t0 = time.perf_counter()

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        self._addon.overhead += time.perf_counter() - self._t0
        if exc is not None and isinstance(exc, Exception):
            self._addon._report(self._flow_id, self._hook, exc)
            return True
        return False


def _offline_run(options: Any) -> bool:
    """``mitmdump -nr FILE``: no proxy server, and mitmdump exits once the file is read (its
    keepserving addon; mitmweb, which has none, keeps serving). Nothing can look at the UI, the
    API or /metrics of such a run, or at an in-memory store after it: they are not made."""
    return (bool(getattr(options, "rfile", None)) and not getattr(options, "server", True)
            and not getattr(options, "keepserving", True))


def _flows_kept() -> bool:
    """A flow file (``-w``) is written, or a flow view (mitmweb, console) keeps the flows."""
    from mitmproxy import ctx

    return (bool(getattr(ctx.options, "save_stream_file", None))
            or ctx.master.addons.get("view") is not None)


def _later(delay: float, fn: Callable[[], None]) -> asyncio.TimerHandle | None:
    """After ``delay`` seconds; at once when driven without a loop (unit tests: None)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        fn()
        return None
    return loop.call_later(delay, fn)


def _soon(fn: Callable[[], None]) -> None:
    """On the next loop turn; at once when driven without a loop (unit tests)."""
    try:
        asyncio.get_running_loop().call_soon(fn)
    except RuntimeError:
        fn()


# The response headers a record reads (when no rules read them all).
_RESPONSE_HEADER_BYTES = frozenset({b"content-type", b"content-encoding", b"server"})


def _request_meta(flow: http.HTTPFlow, headers: dict[str, str]) -> RequestMeta:
    req = flow.request
    path, _, query = req.path.partition("?")
    return RequestMeta(
        flow_id=flow.id, method=req.method, scheme=req.scheme, host=req.host, port=req.port,
        path=path, t_start=req.timestamp_start, headers=headers,
        secrets=redact.secrets_of(redact.credential_pairs(req.headers.fields), query))


def _response_meta(resp: http.Response, headers: dict[str, str]) -> ResponseMeta:
    return ResponseMeta(resp.status_code, headers.get("content-type"), resp.timestamp_start,
                        resp.timestamp_end, headers.get("server"))


addons = [AIStats()]
