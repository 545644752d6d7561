"""Prometheus metrics derived from finished request records.

One :class:`Metrics` instance owns a private ``CollectorRegistry`` (no "Duplicated timeseries" on
hot reload or in tests) and turns each :class:`~aistats_engine.record.Record` into observations.
``observe()`` runs on mitmproxy's event-loop thread while scrapes collect from the metrics server
thread; prometheus_client metrics and the collector below are thread-safe.

Three families of series:

**OTel GenAI client metrics** (semantic conventions ≥ 1.41, names as the OTel→Prometheus
translation produces them): ``gen_ai_client_token_usage`` (``gen_ai_token_type`` = ``input`` |
``output``, only types whose count is known), ``gen_ai_client_operation_duration_seconds``,
``gen_ai_client_operation_time_to_first_chunk_seconds`` (streams with a first content chunk) and
``gen_ai_client_operation_time_per_output_chunk_seconds`` (one observation per content chunk after
the first: the gap to the previous one). Labels: ``gen_ai_operation_name``, ``gen_ai_provider_name``,
``gen_ai_request_model``, ``gen_ai_response_model``, ``server_address``, ``server_port`` (the
upstream, not the proxy), plus ``error_type`` on the time histograms (``""`` on success, the
record's ``error_type``, or ``_OTHER`` for an error without one). Unknown values are ``""``.
With ``MetricsConfig.server_metrics`` the ``gen_ai_server_*`` trio is added as well, so Envoy AI
Gateway dashboards work; time to first token and time per output token only for successful
streams, the latter ``(duration − ttft) ÷ (output_tokens − 1)`` when ``output_tokens > 1``.
Latency and token observations carry an OpenMetrics exemplar ``{record_id="<id>"}`` (per-chunk:
on the largest gap only, which keeps the per-chunk cost at one plain ``observe``).

**Higress ai-statistics compatible counters**
``route_upstream_model_consumer_metric_<x>{ai_route,ai_cluster,ai_model,ai_consumer}`` with
x ∈ ``input_token, output_token, total_token, llm_first_token_duration, llm_service_duration,
llm_duration_count, llm_stream_duration_count, llm_failure_count``, exposed without ``_total`` so
Higress PromQL runs unchanged. For a proxy there is no Envoy route or cluster, so:
``ai_route`` = upstream host, ``ai_cluster`` = ``"host:port"``, ``ai_model`` = the model the
response reports, else the requested model (Higress: usage model, else request model),
``ai_consumer`` = ``record.consumer`` or ``"none"``. Counting rules follow Higress' ``writeMetric``:
token counters add only known, non-zero counts; durations are integer milliseconds summed;
``llm_stream_duration_count`` / ``llm_first_token_duration`` move only for streams with a first
token; ``llm_failure_count`` counts records with ``error`` or ``error_type`` set (non-2xx,
aborted, unreachable, timeout). One deliberate difference: Higress skips
the duration counters when it found no usage in the body (so streams without
``include_usage`` and error replies vanish from its latency averages); here every record with a
duration counts.

**Own counters** (``aistats_`` prefix) for simple ``rate()``: requests by provider / model /
status class, tokens by type (subsets, do not sum), cost, records, parse errors by kind, in-flight
requests, label overflow, and the addon's own time spent in hooks.

All label values pass through :class:`~aistats_engine.cardinality.LabelGuard`.
"""

from __future__ import annotations

import itertools
import operator
import threading
import time
from bisect import bisect_left, bisect_right
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric, UnknownMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar

from .cardinality import DEFAULT_LIMIT, DEFAULT_LIMITS, DEFAULT_MAX_LENGTH, LabelGuard
from ..record.record import Record

# OTel GenAI recommended ExplicitBucketBoundaries (semantic conventions v1.41).
TOKEN_BUCKETS: tuple[float, ...] = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)
DURATION_BUCKETS: tuple[float, ...] = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)
# gen_ai.server.time_to_first_token, extended like Envoy AI Gateway: reasoning models often
# take more than 10 s before the first token.
SERVER_TTFT_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    15.0, 20.0, 30.0, 45.0, 60.0,
)
SERVER_TPOT_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
)

GENAI_LABELS = (
    "gen_ai_operation_name",
    "gen_ai_provider_name",
    "gen_ai_request_model",
    "gen_ai_response_model",
    "server_address",
    "server_port",
)
HIGRESS_PREFIX = "route_upstream_model_consumer_metric_"
HIGRESS_LABELS = ("ai_route", "ai_cluster", "ai_model", "ai_consumer")
HIGRESS_COUNTERS: tuple[tuple[str, str], ...] = (
    ("input_token", "Cumulative count of input tokens (Higress ai-statistics)."),
    ("output_token", "Cumulative count of output tokens (Higress ai-statistics)."),
    ("total_token", "Cumulative count of total tokens (Higress ai-statistics)."),
    (
        "llm_first_token_duration",
        "Cumulative first-token latency of streaming requests in milliseconds (Higress ai-statistics).",
    ),
    (
        "llm_service_duration",
        "Cumulative duration of streaming and non-streaming requests in milliseconds (Higress ai-statistics).",
    ),
    ("llm_duration_count", "Cumulative count of streaming and non-streaming requests (Higress ai-statistics)."),
    ("llm_stream_duration_count", "Cumulative count of streaming requests with a first token (Higress ai-statistics)."),
    ("llm_failure_count", "Cumulative count of failed requests (Higress ai-statistics)."),
)
_H = {name: i for i, (name, _) in enumerate(HIGRESS_COUNTERS)}

TOKEN_TYPES = ("input", "output", "cached", "cache_creation", "reasoning")


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """What to expose and how. Bucket lists default to the OTel recommendations."""

    token_buckets: Sequence[float] = TOKEN_BUCKETS
    duration_buckets: Sequence[float] = DURATION_BUCKETS
    time_to_first_chunk_buckets: Sequence[float] = DURATION_BUCKETS
    time_per_output_chunk_buckets: Sequence[float] = DURATION_BUCKETS
    # gen_ai_server_* trio (Envoy AI Gateway names); off by default.
    server_metrics: bool = False
    server_duration_buckets: Sequence[float] = DURATION_BUCKETS
    server_ttft_buckets: Sequence[float] = SERVER_TTFT_BUCKETS
    server_tpot_buckets: Sequence[float] = SERVER_TPOT_BUCKETS
    higress_metrics: bool = True
    # Adds a ``consumer`` label (record.consumer) to the gen_ai_* and aistats_requests/tokens/cost
    # series. Off by default: users are the classic cardinality trap.
    consumer_label: bool = False
    exemplars: bool = True
    label_limits: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_LIMITS))
    default_label_limit: int = DEFAULT_LIMIT
    max_label_length: int = DEFAULT_MAX_LENGTH

    def __post_init__(self) -> None:
        for name in (
            "token_buckets",
            "duration_buckets",
            "time_to_first_chunk_buckets",
            "time_per_output_chunk_buckets",
            "server_duration_buckets",
            "server_ttft_buckets",
            "server_tpot_buckets",
        ):
            buckets = tuple(float(b) for b in getattr(self, name))
            if not buckets or any(b <= a for a, b in itertools.pairwise(buckets)):
                raise ValueError(f"{name} must be a non-empty, strictly increasing list: {buckets}")
            object.__setattr__(self, name, buckets)


class _HigressFamily(UnknownMetricFamily):
    """A cumulative series exposed under its own name, without ``_total``.

    OpenMetrics only allows that for type ``unknown``; in the Prometheus 0.0.4 text format the
    metrics server declares it ``counter``, like Envoy's own exposition of Higress stats
    (see ``prometheus_text_type``).
    """

    prometheus_text_type = "counter"


class _HigressCollector(Collector):
    """Accumulates the Higress counters; read by scrapes on another thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[tuple[str, str, str, str], list[float]] = {}

    def add(self, labels: tuple[str, str, str, str], increments: Mapping[str, float]) -> None:
        with self._lock:
            row = self._values.get(labels)
            if row is None:
                row = self._values[labels] = [0.0] * len(HIGRESS_COUNTERS)
            for name, inc in increments.items():
                row[_H[name]] += inc

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            rows = [(labels, list(row)) for labels, row in self._values.items()]
        for i, (name, doc) in enumerate(HIGRESS_COUNTERS):
            family = _HigressFamily(HIGRESS_PREFIX + name, doc, labels=HIGRESS_LABELS)
            for labels, row in rows:
                family.add_metric(labels, row[i])
            yield family


def _internals(child: Any) -> tuple[Any, Any, Any] | None:
    """A histogram child's bucket bounds, bucket values and sum, or None on a
    prometheus_client whose internals differ (callers then use the public ``observe``)."""
    bounds = getattr(child, "_upper_bounds", None)
    buckets = getattr(child, "_buckets", None)
    total = getattr(child, "_sum", None)
    if bounds is None or buckets is None or total is None:
        return None
    return bounds, buckets, total


def _observe(child: Any, value: float, exemplar: dict[str, str] | None) -> None:
    """``Histogram.observe`` without its per-call costs: a Python loop over the bounds and a
    validation of the (fixed, known-valid) exemplar labels. Same effect."""
    parts = _internals(child)
    if parts is None:
        child.observe(value, exemplar)
        return
    bounds, buckets, total = parts
    total.inc(value)
    bucket = buckets[bisect_left(bounds, value)]  # the first bound >= value, as observe()
    bucket.inc(1)
    if exemplar:
        bucket.set_exemplar(Exemplar(exemplar, value, time.time()))


def _status_class(status: int | None) -> str:
    return "none" if status is None else f"{status // 100}xx"


def _parse_error_kind(parse_error: str) -> str:
    """``"response decompression failed: zlib ..."`` → ``"response decompression failed"``."""
    return parse_error.split(":", 1)[0].strip()[:64] or "unknown"


class Metrics:
    """All series of one addon instance, in a private registry."""

    def __init__(self, config: MetricsConfig | None = None) -> None:
        self.config = cfg = config or MetricsConfig()
        self.registry = reg = CollectorRegistry()
        self.guard = LabelGuard(
            cfg.label_limits, cfg.default_label_limit, cfg.max_label_length, registry=reg
        )
        extra = ("consumer",) if cfg.consumer_label else ()
        timing = GENAI_LABELS + ("error_type",) + extra

        self._token_usage = Histogram(
            "gen_ai_client_token_usage",
            "Number of input and output tokens used (OTel gen_ai.client.token.usage).",
            GENAI_LABELS + ("gen_ai_token_type",) + extra,
            buckets=cfg.token_buckets,
            registry=reg,
        )
        self._duration = Histogram(
            "gen_ai_client_operation_duration_seconds",
            "GenAI operation duration as the proxy saw it: request start to last response byte "
            "(OTel gen_ai.client.operation.duration).",
            timing,
            buckets=cfg.duration_buckets,
            registry=reg,
        )
        self._ttfc = Histogram(
            "gen_ai_client_operation_time_to_first_chunk_seconds",
            "Time from the request to the first content chunk of a stream "
            "(OTel gen_ai.client.operation.time_to_first_chunk).",
            timing,
            buckets=cfg.time_to_first_chunk_buckets,
            registry=reg,
        )
        self._tpoc = Histogram(
            "gen_ai_client_operation_time_per_output_chunk_seconds",
            "Time between consecutive content chunks of a stream, one observation per chunk "
            "after the first (OTel gen_ai.client.operation.time_per_output_chunk).",
            timing,
            buckets=cfg.time_per_output_chunk_buckets,
            registry=reg,
        )
        self._server: tuple[Histogram, Histogram, Histogram] | None = None
        if cfg.server_metrics:
            self._server = (
                Histogram(
                    "gen_ai_server_request_duration_seconds",
                    "Request duration, time to last byte (OTel gen_ai.server.request.duration; "
                    "measured at the proxy).",
                    timing,
                    buckets=cfg.server_duration_buckets,
                    registry=reg,
                ),
                Histogram(
                    "gen_ai_server_time_to_first_token_seconds",
                    "Time to first token of successful streams (OTel "
                    "gen_ai.server.time_to_first_token; measured at the proxy).",
                    timing,
                    buckets=cfg.server_ttft_buckets,
                    registry=reg,
                ),
                Histogram(
                    "gen_ai_server_time_per_output_token_seconds",
                    "(duration - time to first token) / (output tokens - 1) of successful streams "
                    "(OTel gen_ai.server.time_per_output_token; measured at the proxy).",
                    timing,
                    buckets=cfg.server_tpot_buckets,
                    registry=reg,
                ),
            )

        self._higress = _HigressCollector() if cfg.higress_metrics else None
        if self._higress is not None:
            reg.register(self._higress)

        own = ("provider", "model") + extra
        self._requests = Counter(
            "aistats_requests",
            "Observed LLM requests by provider, requested model and upstream status class "
            "(2xx, 4xx, 5xx, ..., none = no response).",
            own + ("status_class",),
            registry=reg,
        )
        self._tokens = Counter(
            "aistats_tokens",
            "Tokens by type. input includes cached and cache_creation; output includes reasoning. "
            "The types are overlapping subsets: do not sum them.",
            own + ("type",),
            registry=reg,
        )
        self._cost = Counter(
            "aistats_cost_usd",
            "Priced cost in US dollars; requests without a known price add nothing.",
            own,
            registry=reg,
        )
        self._records = Counter(
            "aistats_records",
            "Request records written, by usage source (reported, server_timings, missing).",
            ["usage_source"],
            registry=reg,
        )
        self._parse_errors = Counter(
            "aistats_parse_errors",
            "Records with something the addon could not read, by kind (text before ':').",
            ["kind"],
            registry=reg,
        )
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._in_flight = Gauge(
            "aistats_requests_in_flight",
            "LLM requests started and not yet finished.",
            registry=reg,
        )
        self._overhead = Counter(
            "aistats_overhead_seconds",
            "Time the addon itself spent in mitmproxy hooks.",
            registry=reg,
        )

    # -- simple state -----------------------------------------------------------------------

    def request_started(self) -> None:
        self._in_flight.inc()

    def request_finished(self) -> None:
        self._in_flight.dec()

    def add_overhead(self, seconds: float) -> None:
        if seconds > 0:
            self._overhead.inc(seconds)

    def parse_error(self, kind: str) -> None:
        self._parse_errors.labels(self.guard("parse_error_kind", kind) or "unknown").inc()

    # -- one record ---------------------------------------------------------------------------

    def _child(self, metric: Any, labels: tuple[str, ...]) -> Any:
        """``metric.labels(*labels)``, cached: label values are already bounded by the guard,
        and ``labels()`` validates on every call."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe(self, record: Record) -> None:
        """Map one finished record to every observation it implies."""
        g = self.guard
        cfg = self.config
        exemplar = {"record_id": str(record.id)} if cfg.exemplars else None
        failed = record.error_type is not None or record.error is not None
        error_type = g("error_type", record.error_type or ("_OTHER" if failed else ""))
        server = g("server", f"{record.host}:{record.port}")
        address, port = (record.host, str(record.port)) if server != "other" else ("other", "other")
        request_model = g("model", record.model)
        response_model = g("model", record.response_model)
        provider = g("provider", record.provider)
        consumer = (g("consumer", record.consumer),) if cfg.consumer_label else ()
        base = (g("operation", record.operation), provider, request_model, response_model, address, port)
        timing = base + (error_type,) + consumer

        # OTel client metrics
        for token_type, count in (("input", record.input_tokens), ("output", record.output_tokens)):
            if count is not None:
                _observe(self._child(self._token_usage, (*base, token_type, *consumer)),
                         count, exemplar)
        duration_s = record.duration_ms / 1000.0 if record.duration_ms is not None else None
        ttft_s = record.ttft_ms / 1000.0 if record.stream and record.ttft_ms is not None else None
        if duration_s is not None:
            _observe(self._child(self._duration, timing), duration_s, exemplar)
        if ttft_s is not None:
            _observe(self._child(self._ttfc, timing), ttft_s, exemplar)
        offsets = record.content_offsets_ms
        if record.stream and len(offsets) > 1:
            self._observe_chunks(self._child(self._tpoc, timing), offsets, exemplar)

        if self._server is not None:
            server_duration, server_ttft, server_tpot = self._server
            if duration_s is not None:
                _observe(self._child(server_duration, timing), duration_s, exemplar)
            if ttft_s is not None and not failed:
                _observe(self._child(server_ttft, timing), ttft_s, exemplar)
                out = record.output_tokens
                if duration_s is not None and out is not None and out > 1:
                    tpot = max(duration_s - ttft_s, 0.0) / (out - 1)
                    _observe(self._child(server_tpot, timing), tpot, exemplar)

        if self._higress is not None:
            self._observe_higress(record, failed, server, address)

        # own counters
        own = (provider, request_model) + consumer
        self._child(self._requests, (*own, _status_class(record.status))).inc(1, exemplar)
        for token_type, count in zip(
            TOKEN_TYPES,
            (
                record.input_tokens,
                record.output_tokens,
                record.cached_tokens,
                record.cache_creation_tokens,
                record.reasoning_tokens,
            ),
        ):
            if count is not None:
                self._child(self._tokens, (*own, token_type)).inc(count)
        if record.cost_usd is not None and record.cost_usd >= 0:
            self._child(self._cost, own).inc(record.cost_usd)
        self._child(self._records, (record.usage_source or "missing",)).inc()
        if record.parse_error:
            self.parse_error(_parse_error_kind(record.parse_error))

    @staticmethod
    def _observe_chunks(child: Any, offsets: Sequence[float], exemplar: dict[str, str] | None) -> None:
        """One observation per chunk after the first; the exemplar goes on the largest gap,
        the one worth clicking through to. The gaps are counted into buckets here and added
        per bucket (a long stream has thousands of chunks: one locked ``observe`` each would
        cost more than reading them)."""
        gaps = sorted(map(operator.sub, offsets[1:], offsets[:-1]))  # ms, smallest first
        if gaps[0] < 0:  # the wall clock stepped back
            gaps = [max(g, 0.0) for g in gaps]
        _observe(child, gaps.pop() / 1000.0, exemplar)
        parts = _internals(child)
        if parts is None:
            for gap in gaps:
                child.observe(gap / 1000.0)
            return
        bounds, buckets, total = parts
        below = 0
        for bucket, bound in zip(buckets, bounds):
            upto = bisect_right(gaps, bound * 1000.0)  # gaps <= bound land here, as observe()
            if upto > below:
                bucket.inc(upto - below)
                below = upto
        total.inc(sum(gaps) / 1000.0)

    def _observe_higress(self, record: Record, failed: bool, server: str, host: str) -> None:
        g = self.guard
        model = g("model", record.response_model or record.model) or "unknown"
        labels = (host, server, model, g("consumer", record.consumer) or "none")
        inc: dict[str, float] = {}
        for name, count in (
            ("input_token", record.input_tokens),
            ("output_token", record.output_tokens),
            ("total_token", record.total_tokens),
        ):
            if count:  # Higress adds nothing for a zero or missing count
                inc[name] = count
        if record.duration_ms is not None:
            inc["llm_service_duration"] = round(record.duration_ms)
            inc["llm_duration_count"] = 1
        if record.stream and record.ttft_ms is not None:
            inc["llm_first_token_duration"] = round(record.ttft_ms)
            inc["llm_stream_duration_count"] = 1
        if failed:
            inc["llm_failure_count"] = 1
        assert self._higress is not None
        self._higress.add(labels, inc)
