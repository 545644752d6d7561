"""Build the request record from plain facts about one flow.

Live traffic and offline replay call the same function with the same inputs (flow fields,
the parsed body, the stored chunk clock), which is what makes replayed records identical.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import errors
from .clients import client_name
from ..observer import Parsed, StreamTiming
from ..wire.providers import ApiMatch, decide_provider
from ..wire.readers import RequestInfo
from .record import Record, rfc3339_ms

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


@dataclass(slots=True)
class ResponseMeta:
    status: int
    content_type: str | None
    t_headers: float | None
    t_end: float | None


@dataclass(slots=True)
class Failure:
    message: str
    timestamp: float | None


@dataclass(slots=True)
class Attribution:
    session_headers: tuple[str, ...] = DEFAULT_SESSION_HEADERS
    consumer_header: str = DEFAULT_CONSUMER_HEADER


def classify_failure(message: str, has_response: bool) -> str:
    """OTel ``error.type`` for a flow mitmproxy ended with an error."""
    low = message.lower()
    if "client disconnected" in low:
        return "client_disconnected"
    if "timeout" in low or "timed out" in low:
        return "timeout"
    return "upstream_aborted" if has_response else "upstream_unreachable"


def _ms(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return round((b - a) * 1000, 3)


def build_record(
    record_id: int,
    req: RequestMeta,
    match: ApiMatch,
    request_info: RequestInfo,
    resp: ResponseMeta | None,
    parsed: Parsed | None,
    stream: bool,
    timing: StreamTiming | None,
    failure: Failure | None,
    attribution: Attribution,
) -> Record:
    p = parsed or Parsed()
    ok = resp is not None and 200 <= resp.status < 300
    # End of the exchange as the proxy saw it: last response byte, else the chunk clock,
    # else the moment mitmproxy reported the failure.
    end = resp.t_end if resp is not None else None
    if end is None and timing is not None and timing.last_byte_ms is not None:
        end = req.t_start + timing.last_byte_ms / 1000
    if end is None and failure is not None:
        end = failure.timestamp
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
        provider=decide_provider(match, req.host, req.port, set(p.hints)),
        api=match.api,
        operation=match.operation,
        model=match.model_from_path or request_info.model or p.response_model,
        response_model=p.response_model,
        duration_ms=_ms(req.t_start, end),
        ttfb_ms=_ms(req.t_start, resp.t_headers) if resp is not None else None,
        finish_reason=p.finish_reason,
        chat_id=p.chat_id,
        chat_round=request_info.chat_round,
        user_agent=req.headers.get("user-agent"),
    )
    rec.client = client_name(rec.user_agent)
    for h in attribution.session_headers:
        if req.headers.get(h):
            rec.session_id = req.headers[h]
            break
    rec.consumer = req.headers.get(attribution.consumer_header) or None

    if ok:
        rec.input_tokens = p.input_tokens
        rec.output_tokens = p.output_tokens
        rec.cached_tokens = p.cached_tokens
        rec.cache_creation_tokens = p.cache_creation_tokens
        rec.reasoning_tokens = p.reasoning_tokens
        if p.input_tokens is not None and p.output_tokens is not None:
            rec.total_tokens = p.input_tokens + p.output_tokens
        rec.usage_source = p.usage_source
        rec.prompt_per_second = p.prompt_per_second
        rec.tokens_per_second = p.tokens_per_second
        rec.server_duration_ms = p.server_duration_ms
        rec.draft_tokens = p.draft_tokens
        rec.draft_accepted_tokens = p.draft_accepted_tokens
        problems = list(p.parse_errors)
    else:
        # Error bodies are expected to be plain text or odd JSON: only decoding failures count.
        problems = [e for e in p.parse_errors if e.startswith("response decompression failed")]

    if failure is not None and ok and p.stream_complete:
        # The stream reached its end event before the connection went (SDKs close after
        # [DONE]): the exchange succeeded.
        failure = None
    if failure is not None:
        rec.error = errors.clip(failure.message) or "flow failed"
        rec.error_type = classify_failure(failure.message, resp is not None)
    elif resp is not None and not ok:
        rec.error = p.stream_error or p.body_error or errors.status_text(resp.status)
        rec.error_type = str(resp.status)
    elif p.stream_error is not None:
        rec.error = p.stream_error
        rec.error_type = p.stream_error_type or "stream_error"

    if request_info.invalid_json:
        problems.append("request body is not valid JSON")

    if stream and timing is not None and timing.content_offsets_ms:
        first = timing.content_offsets_ms[0]
        rec.ttft_ms = first
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
    rec.parse_error = "; ".join(problems) or None
    return rec
