"""Build the request record from plain facts about one flow.

Live traffic and offline replay call the same function with the same inputs (flow fields,
the parsed body, the stored chunk clock), which is what makes replayed records identical.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..observer import Parsed, StreamTiming
from ..wire.format import Match
from ..wire.reader import RequestInfo
from . import errors, problems
from .clients import client_name
from .problems import BODY_TOO_LARGE, DECOMPRESSION, Problem
from .cost import Pricer
from .providers import ProviderHost, UpstreamProviders, decide_provider
from .record import Record, rfc3339_ms
from .redact import Redactor

if TYPE_CHECKING:
    from ..rules.engine import FlowRules

DEFAULT_SESSION_HEADERS = ("x-session-id", "x-litellm-session-id", "x-agent-session",
                           "x-openclaw-session-key", "x-clawdbot-session-key",
                           "x-moltbot-session-key")
DEFAULT_CONSUMER_HEADER = "x-mse-consumer"


@dataclass(slots=True)
class RequestMeta:
    flow_id: str
    method: str
    scheme: str
    host: str
    port: int
    path: str  # without the query string
    t_start: float
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names, first value
    secrets: tuple[str, ...] = ()  # credential values the request carried (record/redact.py)


@dataclass(slots=True)
class ResponseMeta:
    status: int
    content_type: str | None
    t_headers: float | None
    t_end: float | None
    server: str | None = None  # the ``Server`` header (llama.cpp names itself there)


@dataclass(slots=True)
class Failure:
    message: str
    timestamp: float | None


@dataclass(slots=True)
class Attribution:
    """What a record is attributed to beyond the flow itself: session and consumer headers, the
    provider names the user gave hosts and those learned per upstream, and prices."""

    session_headers: tuple[str, ...] = DEFAULT_SESSION_HEADERS
    consumer_header: str = DEFAULT_CONSUMER_HEADER
    pricer: Pricer | None = None
    upstreams: UpstreamProviders = field(default_factory=UpstreamProviders)
    user_hosts: tuple[ProviderHost, ...] = ()
    responses: ResponsesCounted = field(default_factory=lambda: ResponsesCounted())
    # The request headers a record reads (and the body's encoding): made once, kept per flow.
    header_names: frozenset[str] = field(init=False)
    # What is decoded of a request's headers when no rules read them (the request reader also
    # needs the content type): raw names, as mitmproxy holds them.
    request_header_bytes: frozenset[bytes] = field(init=False)

    def __post_init__(self) -> None:
        self.header_names = frozenset((*self.session_headers, self.consumer_header,
                                       "user-agent", "content-encoding"))
        self.request_header_bytes = frozenset(
            n.encode("latin-1") for n in (*self.header_names, "content-type"))

    def session_of(self, headers: Mapping[str, str]) -> str | None:
        """The first configured session header present (``headers``: case-insensitive)."""
        for h in self.session_headers:
            v = headers.get(h)
            if v:
                return v
        return None


def classify_failure(message: str, has_response: bool) -> str:
    """OTel ``error.type`` for a flow mitmproxy ended with an error."""
    low = message.lower()
    if "client disconnected" in low:
        return "client_disconnected"
    if "timeout" in low or "timed out" in low:
        return "timeout"
    if has_response:
        return "upstream_aborted"
    # It answered, but not with HTTP (mitmproxy: "Cannot parse HTTP response", "unexpected
    # server response", "HTTP/2 protocol error", "Invalid HTTP/2 response headers").
    if ("cannot parse http response" in low or "unexpected server response" in low
            or "protocol error" in low or "invalid http" in low):
        return "upstream_protocol_error"
    return "upstream_unreachable"


def _outcome(resp: ResponseMeta | None, p: Parsed, failure: Failure | None
             ) -> tuple[str | None, str | None]:
    """``(error, error_type)``, decided once: a flow failure (unless the stream had already
    reached its end event: SDKs close right after ``[DONE]``), a non-2xx status, an error
    event inside a 2xx stream, or success."""
    ok = resp is not None and 200 <= resp.status < 300
    if failure is not None and not (ok and p.stream_complete):
        return (failure.message or "flow failed",
                classify_failure(failure.message, resp is not None))
    if resp is not None and not ok:
        return p.stream_error or p.body_error or errors.status_text(resp.status), str(resp.status)
    if p.stream_error is not None:
        return p.stream_error, p.stream_error_type or "stream_error"
    return None, None


TERMINAL_RESPONSE_STATUSES = frozenset({"completed", "failed", "cancelled", "incomplete"})


class ResponsesCounted:
    """OpenAI Responses in background mode: the usage of one response arrives on the POST, a
    poll (``GET /v1/responses/{id}``), a resumed stream or a cancel — whichever the client used
    to learn the terminal status, possibly several of them. It counts once: the first record
    that carries it; later ones for the same id keep their status but not the usage. Bounded
    (the oldest ids are forgotten first)."""

    def __init__(self, max_ids: int = 10_000) -> None:
        self._ids: dict[str, str] = {}  # response id → the flow whose record counted it
        self._max = max_ids

    def seen_before(self, rec: Record) -> bool:
        """True when another flow's record already carried this response's usage (the same
        flow read again, as a replay in the same process does, is not another)."""
        if (rec.response_status not in TERMINAL_RESPONSE_STATUSES or not rec.chat_id
                or rec.api not in ("responses", "responses_retrieve", "responses_cancel")):
            return False
        counted_by = self._ids.get(rec.chat_id)
        if counted_by is not None:
            return counted_by != rec.flow_id
        self._ids[rec.chat_id] = rec.flow_id
        if len(self._ids) > self._max:
            del self._ids[next(iter(self._ids))]
        return False


def _counted_elsewhere(rec: Record) -> None:
    rec.input_tokens = rec.output_tokens = rec.cached_tokens = None
    rec.cache_creation_tokens = rec.reasoning_tokens = rec.total_tokens = None
    rec.usage_source = "counted_before"


def _provider(match: Match, req: RequestMeta, resp: ResponseMeta | None, p: Parsed,
              attribution: Attribution) -> str | None:
    """One backend, one provider: what this response says (``Server`` header, body hints) is
    learned per upstream and applies to its later requests too (errors, aborted streams)."""
    server = resp.server if resp is not None else None
    learned = attribution.upstreams.observe(req.host, req.port, server, p.hints)
    return decide_provider(match, req.host, req.port, p.hints, server_header=server,
                           user_hosts=attribution.user_hosts, learned=learned)


def exchange_end(req: RequestMeta, resp: ResponseMeta | None, timing: StreamTiming | None,
                 failure: Failure | None) -> float | None:
    """End of the exchange as the proxy saw it (epoch seconds): last response byte, else the
    chunk clock, else the moment mitmproxy reported the failure; None when none is known."""
    if resp is not None and resp.t_end is not None:
        return resp.t_end
    if timing is not None and timing.last_byte_ms is not None:
        return req.t_start + timing.last_byte_ms / 1000
    if failure is not None and failure.timestamp is not None:
        return failure.timestamp
    return None


def _ms(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return round((b - a) * 1000, 3)


def build_record(
    record_id: int,
    req: RequestMeta,
    match: Match,
    request_info: RequestInfo,
    resp: ResponseMeta | None,
    parsed: Parsed | None,
    stream: bool,
    timing: StreamTiming | None,
    failure: Failure | None,
    attribution: Attribution,
    extra_problems: tuple[Problem, ...] = (),
    rules: FlowRules | None = None,
) -> Record:
    p = parsed or Parsed()
    ok = resp is not None and 200 <= resp.status < 300
    end = exchange_end(req, resp, timing, failure)
    error, error_type = _outcome(resp, p, failure)
    rec = Record(
        id=record_id,
        flow_id=req.flow_id,
        start_time=rfc3339_ms(req.t_start),
        end_time=rfc3339_ms(end if end is not None else req.t_start),
        method=req.method,
        scheme=req.scheme,
        host=req.host,
        port=req.port,
        path=req.path,
        status=resp.status if resp is not None else None,
        response_content_type=resp.content_type if resp is not None else None,
        stream=stream,
        provider=_provider(match, req, resp, p, attribution),
        api=match.api,
        operation=match.operation or None,
        model=match.model_from_path or request_info.model or p.response_model,
        response_model=p.response_model,
        duration_ms=_ms(req.t_start, end),
        ttfb_ms=_ms(req.t_start, resp.t_headers) if resp is not None else None,
        error=error,
        error_type=error_type,
        finish_reason=p.finish_reason,
        chat_id=p.chat_id,
        chat_round=request_info.chat_round,
        user_agent=req.headers.get("user-agent"),
    )
    rec.client = client_name(rec.user_agent)
    rec.session_id = attribution.session_of(req.headers)
    rec.consumer = req.headers.get(attribution.consumer_header) or None

    if ok:
        u, s = p.usage, p.speeds
        rec.input_tokens, rec.output_tokens = u.input, u.output
        rec.cached_tokens, rec.cache_creation_tokens = u.cached, u.cache_creation
        rec.reasoning_tokens = u.reasoning
        if u.input is not None and u.output is not None:
            rec.total_tokens = u.input + u.output
        rec.usage_source = p.usage_source
        rec.prompt_per_second, rec.tokens_per_second = s.prompt_per_second, s.tokens_per_second
        rec.server_duration_ms = s.server_duration_ms
        rec.draft_tokens, rec.draft_accepted_tokens = s.draft_tokens, s.draft_accepted_tokens
        rec.counted_tokens = p.counted_tokens
        rec.response_status = p.response_status
        if attribution.responses.seen_before(rec):
            _counted_elsewhere(rec)
        found = list(p.problems)
    else:
        # Error bodies are expected to be plain text or odd JSON: only decoding failures count.
        found = [e for e in p.problems if e.kind == DECOMPRESSION]
    if request_info.problem is not None:
        found.append(request_info.problem)
    found.extend(extra_problems)

    if stream and timing is not None and timing.content_offsets_ms:
        first = timing.content_offsets_ms[0]
        rec.ttft_ms = round(first, 3)
        rec.chunks = timing.content_events
        if timing.last_byte_ms is not None:
            rec.decode_ms = round(timing.last_byte_ms - first, 3)
        rec.content_offsets_ms = timing.content_offsets_ms
        if (rec.chunks >= 2 and rec.output_tokens is not None and rec.output_tokens >= 1
                and rec.decode_ms):
            rec.observed_tokens_per_second = round(
                (rec.output_tokens - 1) / (rec.decode_ms / 1000), 3)
    elif stream and timing is not None:
        rec.chunks = 0
    if attribution.pricer is not None and ok:
        rec.cost_usd, rec.cost_source = attribution.pricer.price(
            rec.provider, rec.response_model or rec.model, rec.input_tokens, rec.output_tokens,
            rec.cached_tokens, rec.cache_creation_tokens, rec.reasoning_tokens, req.t_start,
            fallback_model=rec.model, operation=rec.operation)
    elif attribution.pricer is not None:
        rec.cost_source = "unknown"
    if rules is not None:
        rules.finish(rec, stream)
        if rules.truncated:
            found.append(Problem(BODY_TOO_LARGE, "attribute values appended from the stream over "
                                                 "aistats_max_attribute_bytes: cut"))
        if rules.response_skipped or rules.cfg.disable_openai_usage:
            rec.higress_counted = False
    rec.parse_error = problems.detail_text(found)
    rec.parse_error_kinds = problems.kinds(found)
    Redactor(req.secrets).record(rec)
    if rec.error is not None:
        rec.error = errors.clip(rec.error)  # after redaction: a secret across the cut would leak
    return rec
