"""The request record (contract: shared/spec/record.md, schema ``aistats.record/1``).

One record per observed LLM request. Every output (log line, metrics, span, UI) reads it.
Unknown values are ``None``, never 0 or -1.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass, field
from datetime import datetime, UTC
from typing import Any

SCHEMA = "aistats.record/1"


@dataclass(slots=True)
class Record:
    # identity and transport
    id: int
    flow_id: str
    start_time: str
    end_time: str
    method: str
    scheme: str
    host: str
    port: int
    path: str
    status: int | None = None
    response_content_type: str | None = None
    stream: bool = False
    # what was asked
    provider: str | None = None
    api: str | None = None
    operation: str | None = None
    model: str | None = None
    response_model: str | None = None
    # usage
    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_tokens: int | None = None
    cache_creation_tokens: int | None = None
    reasoning_tokens: int | None = None
    total_tokens: int | None = None
    usage_source: str = "missing"
    counted_tokens: int | None = None  # a token-counting endpoint's answer: a quote, not usage
    # time
    duration_ms: float | None = None
    ttfb_ms: float | None = None
    ttft_ms: float | None = None
    decode_ms: float | None = None
    chunks: int | None = None
    prompt_per_second: float | None = None
    tokens_per_second: float | None = None
    observed_tokens_per_second: float | None = None
    server_duration_ms: float | None = None
    draft_tokens: int | None = None
    draft_accepted_tokens: int | None = None
    # outcome
    error: str | None = None
    error_type: str | None = None
    finish_reason: str | None = None
    parse_error: str | None = None
    # attribution, money, content
    session_id: str | None = None
    consumer: str | None = None
    user_agent: str | None = None
    client: str | None = None
    cost_usd: float | None = None
    cost_source: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    chat_id: str | None = None
    chat_round: int | None = None
    response_status: str | None = None  # OpenAI Responses: queued, in_progress, completed, …
    has_capture: bool = False
    # Not logged: offsets (ms from request start) of content-bearing stream events, for the
    # per-chunk latency histogram. Bounded by the observer's chunk-time cap.
    content_offsets_ms: list[float] = field(default_factory=list, repr=False)
    # Not logged: the fixed kinds (record/problems.py) behind ``parse_error``, for metrics.
    parse_error_kinds: tuple[str, ...] = field(default=(), repr=False)
    # From the attribute rules (rules/engine.py): ``as_separate_log_field`` attributes, written
    # at the top level of the logged object; ``apply_to_span`` attributes by their span key, the
    # message-content ones apart (spans carry those only on opt-in).
    log_fields: dict[str, Any] = field(default_factory=dict, repr=False)
    span_attributes: dict[str, Any] = field(default_factory=dict, repr=False)
    span_content_attributes: dict[str, Any] = field(default_factory=dict, repr=False)
    # False when the rules' content-type filter skipped the response or usage was disabled:
    # Higress's counters do not move for such a request (its writeMetric is not reached).
    higress_counted: bool = field(default=True, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of record.md (``schema`` first, internal fields left out)."""
        out: dict[str, Any] = {"schema": SCHEMA}
        out.update(zip(LOGGED_FIELDS, _logged_values(self)))
        if self.log_fields:
            out.update(self.log_fields)
        return out


_INTERNAL_FIELDS = frozenset({"content_offsets_ms", "parse_error_kinds", "log_fields",
                              "span_attributes", "span_content_attributes", "higress_counted"})
LOGGED_FIELDS = tuple(f.name for f in dataclasses.fields(Record) if f.name not in _INTERNAL_FIELDS)
_logged_values = operator.attrgetter(*LOGGED_FIELDS)  # one C call for all of them


def rfc3339_ms(ts: float) -> str:
    """RFC 3339 UTC with milliseconds, e.g. ``2026-11-24T00:37:59.123Z``: the milliseconds of
    the timestamp rounded to microseconds half-even (as ``datetime.fromtimestamp`` does), the
    rest formatted once per second (two records a request; formatting is the costly part)."""
    frac, whole = math.modf(ts)
    micros = round(frac * 1e6)
    if micros >= 1_000_000:
        whole += 1.0
        micros -= 1_000_000
    elif micros < 0:  # before 1970
        whole -= 1.0
        micros += 1_000_000
    second = int(whole)
    text = _seconds.get(second)
    if text is None:
        if len(_seconds) >= 16:
            _seconds.clear()
        text = _seconds[second] = datetime.fromtimestamp(second, tz=UTC).strftime(
            "%Y-%m-%dT%H:%M:%S.")
    return f"{text}{micros // 1000:03d}Z"


# The seconds formatted last (a record's start and end are often in two): any thread may use
# it, as a dict's get and set are atomic.
_seconds: dict[int, str] = {}
