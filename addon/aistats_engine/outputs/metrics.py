"""Prometheus metrics derived from finished request records.

One :class:`Metrics` instance owns a private ``CollectorRegistry`` (no "Duplicated timeseries" on
hot reload or in tests) and turns each :class:`~aistats_engine.record.Record` into observations.
``observe()`` runs on mitmproxy's event-loop thread while scrapes collect from the metrics server
thread. Every series lives in one custom collector: plain lists per label tuple under one lock,
taken once per record (the per-record cost is what the event loop pays), rendered as
``HistogramMetricFamily`` / ``CounterMetricFamily`` on scrape. Histograms have no ``_created``
samples; bucket ``i`` counts values ``<= bound i`` (cumulative in the exposition, ``+Inf`` last),
with ``_count`` and ``_sum``.

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
Latency and token observations carry an OpenMetrics exemplar ``{record_id="<id>"}`` on the bucket
the value fell into (per-chunk: on the largest gap only; the other gaps are bucketed in bulk).

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
status class, tokens by type (subsets, do not sum), cost, records by usage source, parse errors
by kind (``record.parse_error_kinds``, once per kind and record), records an output dropped
(``aistats_output_dropped_records_total{output}``), in-flight requests (read from the
``inflight`` callable at scrape time), label overflow, and the addon's own time spent in hooks.

Cardinality: all label values pass through :class:`~aistats_engine.cardinality.LabelGuard`
(distinct values per label kind). On top of that each family holds at most
``MetricsConfig.max_series`` label tuples: a new tuple beyond that is folded into one with
``"other"`` for every label except the fixed-vocabulary ones (:data:`FIXED_VOCABULARY_LABELS`),
counted in ``aistats_label_overflow_total{label="series"}``; series already there stay.
"""

from __future__ import annotations

import itertools
import math
import operator
import threading
import time
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    UnknownMetricFamily,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

from .cardinality import DEFAULT_LIMIT, DEFAULT_LIMITS, DEFAULT_MAX_LENGTH, OTHER, LabelGuard
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


# Labels whose values come from a small fixed set in this module: kept when a family is full and a
# new label tuple is folded into "other" (so input/output tokens or status classes never mix).
FIXED_VOCABULARY_LABELS = frozenset({"gen_ai_token_type", "status_class", "type", "usage_source"})
DEFAULT_MAX_SERIES = 10_000

_BUCKET_FIELDS = (
    "token_buckets",
    "duration_buckets",
    "time_to_first_chunk_buckets",
    "time_per_output_chunk_buckets",
    "server_duration_buckets",
    "server_ttft_buckets",
    "server_tpot_buckets",
)


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
    # Label tuples per metric family; the per-label limits alone still allow their product.
    max_series: int = DEFAULT_MAX_SERIES

    def __post_init__(self) -> None:
        for name in _BUCKET_FIELDS:
            buckets = tuple(float(b) for b in getattr(self, name))
            # nan would pass the ordering check (every comparison with it is False); +Inf is the
            # implicit last bucket and must not be listed.
            if not all(math.isfinite(b) for b in buckets):
                raise ValueError(f"{name} must contain finite numbers only: {buckets}")
            if not buckets or any(b <= a for a, b in itertools.pairwise(buckets)):
                raise ValueError(f"{name} must be a non-empty, strictly increasing list: {buckets}")
            object.__setattr__(self, name, buckets)
        if self.max_series < 1:
            raise ValueError(f"max_series must be >= 1, got {self.max_series}")


# -- series storage ------------------------------------------------------------------------------
# Every _Family method below expects the caller to hold the owning Metrics' lock.

_ExemplarTuple = tuple[dict[str, str], float, float]  # Exemplar's fields; a tuple is cheaper to build


class _Family:
    """The series of one metric family, keyed by label-value tuple, at most ``max_series`` of them
    (plus the folded "other" tuples)."""

    __slots__ = ("name", "doc", "labelnames", "series", "_max_series", "_keep", "_on_overflow")

    def __init__(
        self, name: str, doc: str, labelnames: Sequence[str], max_series: int,
        on_overflow: Callable[[], None],
    ) -> None:
        self.name = name
        self.doc = doc
        self.labelnames = tuple(labelnames)
        self.series: dict[tuple[str, ...], list[Any]] = {}
        self._max_series = max_series
        self._keep = tuple(n in FIXED_VOCABULARY_LABELS for n in self.labelnames)
        self._on_overflow = on_overflow

    def _new_row(self) -> list[Any]:
        raise NotImplementedError

    def _row(self, key: tuple[str, ...]) -> list[Any]:
        """The row of ``key``, created on first use; a new key of a full family is folded."""
        row = self.series.get(key)
        if row is not None:
            return row
        if len(self.series) >= self._max_series:
            self._on_overflow()
            key = tuple(v if keep else OTHER for v, keep in zip(key, self._keep))
            row = self.series.get(key)
            if row is not None:
                return row
        row = self.series[key] = self._new_row()
        return row


class _Histogram(_Family):
    """Row layout: per-bucket counts (not cumulative, ``+Inf`` last), the sum, then one exemplar
    slot per bucket. One list per series keeps an observation at one dict lookup."""

    __slots__ = ("bounds", "bounds_ms", "les", "_n", "_empty")

    def __init__(
        self, name: str, doc: str, labelnames: Sequence[str], buckets: Sequence[float],
        max_series: int, on_overflow: Callable[[], None],
    ) -> None:
        super().__init__(name, doc, labelnames, max_series, on_overflow)
        self.bounds = tuple(buckets)
        self.bounds_ms = tuple(b * 1000.0 for b in self.bounds)
        self.les = tuple(floatToGoString(b) for b in self.bounds) + ("+Inf",)
        self._n = n = len(self.les)
        self._empty: list[Any] = [0] * n + [0.0] + [None] * n

    def _new_row(self) -> list[Any]:
        return self._empty.copy()

    def observe(self, key: tuple[str, ...], value: float, ex: dict[str, str] | None, ts: float) -> None:
        row = self._row(key)
        i = bisect_left(self.bounds, value)  # the first bound >= value; len(bounds) is +Inf
        row[i] += 1
        n = self._n
        row[n] += value
        if ex is not None:
            row[n + 1 + i] = (ex, value, ts)

    def chunk_counts(self, gaps_ms: list[float]) -> list[tuple[int, int]]:
        """(bucket, count) pairs for sorted millisecond gaps, by bisecting each bound once
        instead of placing each gap (a long stream has thousands)."""
        out = []
        below = 0
        for i, bound in enumerate(self.bounds_ms):
            upto = bisect_right(gaps_ms, bound)  # gaps <= bound land in bucket i
            if upto > below:
                out.append((i, upto - below))
                below = upto
        if len(gaps_ms) > below:
            out.append((len(self.bounds_ms), len(gaps_ms) - below))
        return out

    def add_counts(self, key: tuple[str, ...], counts: Iterable[tuple[int, int]], total: float) -> None:
        row = self._row(key)
        for i, c in counts:
            row[i] += c
        row[self._n] += total

    def family(self, rows: Iterable[tuple[tuple[str, ...], list[Any]]]) -> HistogramMetricFamily:
        fam = HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
        n = self._n
        les = self.les
        for key, row in rows:
            acc = 0.0
            buckets: list[Any] = []
            for i in range(n):
                acc += row[i]
                ex = row[n + 1 + i]
                buckets.append((les[i], acc) if ex is None else (les[i], acc, Exemplar(*ex)))
            fam.add_metric(key, buckets, row[n])
        return fam

    def describe(self) -> Metric:
        return HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)


class _Counter(_Family):
    """Row: ``[value, exemplar]``."""

    __slots__ = ()

    def _new_row(self) -> list[Any]:
        return [0.0, None]

    def inc(self, key: tuple[str, ...], amount: float, ex: _ExemplarTuple | None = None) -> None:
        row = self._row(key)
        row[0] += amount
        if ex is not None:
            row[1] = ex

    def family(self, rows: Iterable[tuple[tuple[str, ...], list[Any]]]) -> CounterMetricFamily:
        fam = CounterMetricFamily(self.name, self.doc, labels=self.labelnames)
        for key, (val, ex) in rows:
            fam.add_metric(key, val, exemplar=None if ex is None else Exemplar(*ex))
        return fam

    def describe(self) -> Metric:
        return CounterMetricFamily(self.name, self.doc, labels=self.labelnames)


class _HigressFamily(UnknownMetricFamily):
    """A cumulative series exposed under its own name, without ``_total``.

    OpenMetrics only allows that for type ``unknown``; in the Prometheus 0.0.4 text format the
    metrics server declares it ``counter``, like Envoy's own exposition of Higress stats
    (see ``prometheus_text_type``).
    """

    prometheus_text_type = "counter"


class _Higress(_Family):
    """The eight Higress counters share their label tuples: one row of eight values per tuple."""

    __slots__ = ()

    def _new_row(self) -> list[Any]:
        return [0.0] * len(HIGRESS_COUNTERS)

    def add(self, key: tuple[str, ...], increments: Iterable[tuple[int, float]]) -> None:
        row = self._row(key)
        for i, inc in increments:
            row[i] += inc

    def families(self, rows: list[tuple[tuple[str, ...], list[Any]]]) -> Iterator[Metric]:
        for i, (name, doc) in enumerate(HIGRESS_COUNTERS):
            fam = _HigressFamily(HIGRESS_PREFIX + name, doc, labels=HIGRESS_LABELS)
            for key, row in rows:
                fam.add_metric(key, row[i])
            yield fam

    def describe_all(self) -> Iterator[Metric]:
        for name, doc in HIGRESS_COUNTERS:
            yield _HigressFamily(HIGRESS_PREFIX + name, doc, labels=HIGRESS_LABELS)


# A scrape copies rows in batches and lets go of the lock in between, so an observation on the
# event loop waits for one batch at most, not for the whole registry.
_SNAPSHOT_BATCH = 256


def _snapshot(lock: threading.Lock, family: _Family) -> list[tuple[tuple[str, ...], list[Any]]]:
    with lock:
        items = list(family.series.items())
    out: list[tuple[tuple[str, ...], list[Any]]] = []
    for start in range(0, len(items), _SNAPSHOT_BATCH):
        with lock:  # rows change in place under the lock: copy each one whole
            out.extend([(key, row.copy()) for key, row in items[start:start + _SNAPSHOT_BATCH]])
    return out


class _Collector(Collector):
    """Renders a :class:`Metrics`' series on scrape (metrics server thread)."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._m
        lock = m._lock
        for hist in m._histograms:
            yield hist.family(_snapshot(lock, hist))
        if m._higress is not None:
            yield from m._higress.families(_snapshot(lock, m._higress))
        for counter in m._counters:
            yield counter.family(_snapshot(lock, counter))
        inflight = m._inflight
        yield GaugeMetricFamily(
            "aistats_requests_in_flight",
            "LLM requests started and not yet finished.",
            value=float(inflight()) if inflight is not None else 0.0,
        )

    def describe(self) -> Iterator[Metric]:
        """Names only, so the registry rejects a clash at registration."""
        m = self._m
        for hist in m._histograms:
            yield hist.describe()
        if m._higress is not None:
            yield from m._higress.describe_all()
        for counter in m._counters:
            yield counter.describe()
        yield GaugeMetricFamily("aistats_requests_in_flight", "")


def _status_class(status: int | None) -> str:
    return "none" if status is None else f"{status // 100}xx"


class Metrics:
    """All series of one addon instance, in a private registry.

    ``inflight`` returns the number of LLM requests in flight; it is read at scrape time (metrics
    server thread), so the count stays with its owner and a Metrics rebuilt on reconfiguration
    cannot drift from it.
    """

    def __init__(self, config: MetricsConfig | None = None, inflight: Callable[[], int] | None = None) -> None:
        self.config = cfg = config or MetricsConfig()
        self.registry = reg = CollectorRegistry()
        self.guard = LabelGuard(
            cfg.label_limits, cfg.default_label_limit, cfg.max_label_length, registry=reg
        )
        self._inflight = inflight
        self._lock = threading.Lock()
        extra = ("consumer",) if cfg.consumer_label else ()
        timing = GENAI_LABELS + ("error_type",) + extra
        cap = cfg.max_series

        def overflow() -> None:
            self.guard.count_overflow("series")

        def hist(name: str, doc: str, labels: Sequence[str], buckets: Sequence[float]) -> _Histogram:
            return _Histogram(name, doc, labels, buckets, cap, overflow)

        def counter(name: str, doc: str, labels: Sequence[str]) -> _Counter:
            return _Counter(name, doc, labels, cap, overflow)

        self._token_usage = hist(
            "gen_ai_client_token_usage",
            "Number of input and output tokens used (OTel gen_ai.client.token.usage).",
            GENAI_LABELS + ("gen_ai_token_type",) + extra,
            cfg.token_buckets,
        )
        self._duration = hist(
            "gen_ai_client_operation_duration_seconds",
            "GenAI operation duration as the proxy saw it: request start to last response byte "
            "(OTel gen_ai.client.operation.duration).",
            timing,
            cfg.duration_buckets,
        )
        self._ttfc = hist(
            "gen_ai_client_operation_time_to_first_chunk_seconds",
            "Time from the request to the first content chunk of a stream "
            "(OTel gen_ai.client.operation.time_to_first_chunk).",
            timing,
            cfg.time_to_first_chunk_buckets,
        )
        self._tpoc = hist(
            "gen_ai_client_operation_time_per_output_chunk_seconds",
            "Time between consecutive content chunks of a stream, one observation per chunk "
            "after the first (OTel gen_ai.client.operation.time_per_output_chunk).",
            timing,
            cfg.time_per_output_chunk_buckets,
        )
        self._histograms = [self._token_usage, self._duration, self._ttfc, self._tpoc]
        self._server: tuple[_Histogram, _Histogram, _Histogram] | None = None
        if cfg.server_metrics:
            self._server = (
                hist(
                    "gen_ai_server_request_duration_seconds",
                    "Request duration, time to last byte (OTel gen_ai.server.request.duration; "
                    "measured at the proxy).",
                    timing,
                    cfg.server_duration_buckets,
                ),
                hist(
                    "gen_ai_server_time_to_first_token_seconds",
                    "Time to first token of successful streams (OTel "
                    "gen_ai.server.time_to_first_token; measured at the proxy).",
                    timing,
                    cfg.server_ttft_buckets,
                ),
                hist(
                    "gen_ai_server_time_per_output_token_seconds",
                    "(duration - time to first token) / (output tokens - 1) of successful streams "
                    "(OTel gen_ai.server.time_per_output_token; measured at the proxy).",
                    timing,
                    cfg.server_tpot_buckets,
                ),
            )
            self._histograms.extend(self._server)

        self._higress = (
            _Higress(HIGRESS_PREFIX, "", HIGRESS_LABELS, cap, overflow) if cfg.higress_metrics else None
        )

        own = ("provider", "model") + extra
        self._requests = counter(
            "aistats_requests",
            "Observed LLM requests by provider, requested model and upstream status class "
            "(2xx, 4xx, 5xx, ..., none = no response).",
            own + ("status_class",),
        )
        self._tokens = counter(
            "aistats_tokens",
            "Tokens by type. input includes cached and cache_creation; output includes reasoning. "
            "The types are overlapping subsets: do not sum them.",
            own + ("type",),
        )
        self._cost = counter(
            "aistats_cost_usd",
            "Priced cost in US dollars; requests without a known price add nothing.",
            own,
        )
        self._records = counter(
            "aistats_records",
            "Request records written, by usage source (reported, server_timings, missing).",
            ("usage_source",),
        )
        self._parse_errors = counter(
            "aistats_parse_errors",
            "Records with something the addon could not read, by kind (once per kind and record).",
            ("kind",),
        )
        self._dropped = counter(
            "aistats_output_dropped_records",
            "Records an output could not keep: log queue full, log file unwritable, ...",
            ("output",),
        )
        self._overhead = counter(
            "aistats_overhead_seconds",
            "Time the addon itself spent in mitmproxy hooks.",
            (),
        )
        self._overhead.series[()] = self._overhead._new_row()  # an unlabelled counter starts at 0
        self._counters = [
            self._requests, self._tokens, self._cost, self._records, self._parse_errors,
            self._dropped, self._overhead,
        ]
        reg.register(_Collector(self))

    # -- simple state -----------------------------------------------------------------------

    def add_overhead(self, seconds: float) -> None:
        if seconds > 0:
            with self._lock:
                self._overhead.inc((), seconds)

    def parse_error(self, kind: str) -> None:
        """Count one parse error of ``kind`` outside a record."""
        key = (self.guard("parse_error_kind", kind) or "unknown",)
        with self._lock:
            self._parse_errors.inc(key, 1)

    def output_dropped(self, output: str, n: int = 1) -> None:
        """Count ``n`` records that ``output`` (e.g. ``"log"``) lost; callable from any thread."""
        if n > 0:
            key = (self.guard("output", output) or "unknown",)
            with self._lock:
                self._dropped.inc(key, n)

    # -- one record ---------------------------------------------------------------------------

    def observe(self, record: Record) -> None:
        """Map one finished record to every observation it implies.

        Labels and derived values are worked out first; the lock is then taken once for all
        updates, so a scrape running meanwhile sees each record whole or not at all (per batch).
        """
        g = self.guard
        cfg = self.config
        ex = {"record_id": str(record.id)} if cfg.exemplars else None
        ts = time.time()
        failed = record.error_type is not None or record.error is not None
        error_type = g("error_type", record.error_type or ("_OTHER" if failed else ""))
        server = g("server", f"{record.host}:{record.port}")
        address, port = (record.host, str(record.port)) if server != OTHER else (OTHER, OTHER)
        request_model = g("model", record.model)
        response_model = g("model", record.response_model)
        provider = g("provider", record.provider)
        consumer = (g("consumer", record.consumer),) if cfg.consumer_label else ()
        base = (g("operation", record.operation), provider, request_model, response_model, address, port)
        timing = base + (error_type,) + consumer

        duration_s = record.duration_ms / 1000.0 if record.duration_ms is not None else None
        ttft_s = record.ttft_ms / 1000.0 if record.stream and record.ttft_ms is not None else None
        chunks = None
        offsets = record.content_offsets_ms
        if record.stream and len(offsets) > 1:
            chunks = self._chunk_plan(self._tpoc, offsets)
        tpot = None
        if ttft_s is not None and not failed and duration_s is not None:
            out = record.output_tokens
            if out is not None and out > 1:
                tpot = max(duration_s - ttft_s, 0.0) / (out - 1)
        higress = (
            self._higress_labels(record, failed, server, address)
            if self._higress is not None and record.higress_counted else None
        )
        own = (provider, request_model) + consumer
        tokens = (
            record.input_tokens,
            record.output_tokens,
            record.cached_tokens,
            record.cache_creation_tokens,
            record.reasoning_tokens,
        )
        kinds = (
            [(g("parse_error_kind", k) or "unknown",) for k in dict.fromkeys(record.parse_error_kinds)]
            if record.parse_error_kinds else ()
        )

        with self._lock:
            # OTel client metrics
            if record.input_tokens is not None:
                self._token_usage.observe((*base, "input", *consumer), record.input_tokens, ex, ts)
            if record.output_tokens is not None:
                self._token_usage.observe((*base, "output", *consumer), record.output_tokens, ex, ts)
            if duration_s is not None:
                self._duration.observe(timing, duration_s, ex, ts)
            if ttft_s is not None:
                self._ttfc.observe(timing, ttft_s, ex, ts)
            if chunks is not None:
                counts, total, largest = chunks
                self._tpoc.observe(timing, largest, ex, ts)
                self._tpoc.add_counts(timing, counts, total)
            if self._server is not None:
                server_duration, server_ttft, server_tpot = self._server
                if duration_s is not None:
                    server_duration.observe(timing, duration_s, ex, ts)
                if ttft_s is not None and not failed:
                    server_ttft.observe(timing, ttft_s, ex, ts)
                if tpot is not None:
                    server_tpot.observe(timing, tpot, ex, ts)
            if higress is not None:
                assert self._higress is not None
                self._higress.add(*higress)
            # own counters
            request_ex = None if ex is None else (ex, 1.0, ts)
            self._requests.inc((*own, _status_class(record.status)), 1, request_ex)
            for token_type, count in zip(TOKEN_TYPES, tokens):
                if count is not None:
                    self._tokens.inc((*own, token_type), count)
            if record.cost_usd is not None and record.cost_usd >= 0:
                self._cost.inc(own, record.cost_usd)
            self._records.inc((record.usage_source or "missing",), 1)
            for key in kinds:
                self._parse_errors.inc(key, 1)

    @staticmethod
    def _chunk_plan(
        hist: _Histogram, offsets: Sequence[float]
    ) -> tuple[list[tuple[int, int]], float, float]:
        """The per-chunk gaps as (bucket counts, their sum in seconds, the largest gap in seconds).
        The largest gap is left out of the counts: it is observed on its own, with the exemplar,
        the one worth clicking through to."""
        gaps = sorted(map(operator.sub, offsets[1:], offsets[:-1]))  # ms, smallest first
        if gaps[0] < 0:  # the wall clock stepped back
            gaps = [max(gap, 0.0) for gap in gaps]
        largest = gaps.pop() / 1000.0
        return hist.chunk_counts(gaps), sum(gaps) / 1000.0, largest

    def _higress_labels(
        self, record: Record, failed: bool, server: str, host: str
    ) -> tuple[tuple[str, ...], list[tuple[int, float]]]:
        g = self.guard
        model = g("model", record.response_model or record.model) or "unknown"
        labels = (host, server, model, g("consumer", record.consumer) or "none")
        inc: list[tuple[int, float]] = []
        for name, count in (
            ("input_token", record.input_tokens),
            ("output_token", record.output_tokens),
            ("total_token", record.total_tokens),
        ):
            if count:  # Higress adds nothing for a zero or missing count
                inc.append((_H[name], count))
        if record.duration_ms is not None:
            inc.append((_H["llm_service_duration"], round(record.duration_ms)))
            inc.append((_H["llm_duration_count"], 1))
        if record.stream and record.ttft_ms is not None:
            inc.append((_H["llm_first_token_duration"], round(record.ttft_ms)))
            inc.append((_H["llm_stream_duration_count"], 1))
        if failed:
            inc.append((_H["llm_failure_count"], 1))
        return labels, inc
