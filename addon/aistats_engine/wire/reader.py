"""Reading one exchange: the request body's facts, and the response state that a wire format's
event and body readers fill (usage, server speeds, finish reason, response model and id,
in-stream errors, end of stream).

The format decides what each event means (``wire/formats/``); this module holds what every
format shares: JSON parsing, the short path, error events, and the fields most shapes carry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from ..record import errors
from ..record.problems import INVALID_REQUEST, Problem
from .decoding import DecodeError, decode_body
from .format import WireFormat
from .usage import ServerStats, Usage


@dataclass(slots=True)
class RequestInfo:
    """What the request body says. The parsed body itself is not kept: nothing needs it after
    these facts are read, and a request body can be megabytes."""

    model: str | None = None
    stream: bool | None = None
    chat_round: int | None = None
    problem: Problem | None = None  # why the body could not be read


def read_request(raw: bytes | None, content_encoding: str | None = None,
                 max_body: int = 16 << 20,
                 tap: Callable[[Any], None] | None = None) -> RequestInfo:
    """The request body's facts; the body is read only up to ``max_body`` bytes, raw and
    decoded. ``tap`` sees the parsed JSON (the attribute rules that read the request body)."""
    if not raw:
        return RequestInfo()
    if len(raw) > max_body:
        return RequestInfo(problem=Problem(INVALID_REQUEST,
                                           f"request body over {max_body} bytes, not read"))
    try:
        body = decode_body(raw, content_encoding, max_body)
        obj = orjson.loads(body)
    except DecodeError as e:
        return RequestInfo(problem=Problem(INVALID_REQUEST, f"request body not decoded: {e}"))
    except orjson.JSONDecodeError:
        return RequestInfo(problem=Problem(INVALID_REQUEST, "request body is not valid JSON"))
    if tap is not None:
        tap(obj)
    if not isinstance(obj, dict):
        return RequestInfo()
    model = obj.get("model") if isinstance(obj.get("model"), str) else None
    stream = obj.get("stream") if isinstance(obj.get("stream"), bool) else None
    return RequestInfo(model=model or None, stream=stream, chat_round=_chat_round(obj))


def _chat_round(obj: dict) -> int | None:
    """Number of user messages: OpenAI/Anthropic/Ollama ``messages``, Gemini ``contents``,
    Responses ``input``."""
    msgs = obj.get("messages")
    if isinstance(msgs, list):
        return sum(1 for m in msgs if isinstance(m, dict) and m.get("role") == "user")
    contents = obj.get("contents")
    if isinstance(contents, list):
        return sum(1 for c in contents if isinstance(c, dict) and c.get("role", "user") == "user")
    inp = obj.get("input")
    if isinstance(inp, str):
        return 1
    if isinstance(inp, list):
        return sum(1 for m in inp if isinstance(m, dict) and m.get("role") == "user")
    prompt = obj.get("prompt")
    if isinstance(prompt, str):
        return 1
    return None


class ResponseState:
    """What the response said so far, filled event by event (streams) or at once (bodies)."""

    __slots__ = ("fmt", "usage", "stats", "finish_reason", "response_model", "chat_id", "error",
                 "error_type", "hints", "events", "invalid_events", "complete", "primed",
                 "fast", "_short", "tap")

    def __init__(self, fmt: WireFormat) -> None:
        self.fmt = fmt
        self.usage: Usage | None = None
        self.stats = ServerStats()
        self.finish_reason: str | None = None
        self.response_model: str | None = None
        self.chat_id: str | None = None
        self.error: str | None = None
        self.error_type: str | None = None
        self.hints: set[str] = set()
        self.events = 0
        self.invalid_events = 0
        self.complete = False  # saw the format's end-of-stream event
        self.primed = False  # one event went through the full reading (ids, model)
        self.fast = True  # let plain delta events take the format's short path
        self._short = fmt.short
        # Sees every parsed event (the attribute rules that read the stream); None: no cost.
        self.tap: Callable[[str | None, dict], None] | None = None

    # -- streams ---------------------------------------------------------------------------
    def on_event(self, name: str | None, data: bytes) -> bool:
        """Read one framed event; True when it carries generated content."""
        if not data:
            return False
        if data == b"[DONE]":
            self.complete = True
            return False
        self.events += 1
        fmt = self.fmt
        try:
            if fmt.unwrap is not None:
                unwrapped = fmt.unwrap(name, data)
                if unwrapped is None:
                    return False
                name, data = unwrapped
            obj = orjson.loads(data)
        except ValueError:  # orjson.JSONDecodeError, binascii.Error
            self.invalid_events += 1
            return False
        if obj.__class__ is not dict:
            return False
        if self.tap is not None:
            self.tap(name, obj)
        if self.primed and self.fast:
            short = self._short
            if short is not None:
                verdict = short(obj)
                if verdict is not None:
                    return verdict
        self.primed = True
        if fmt.error_event(name, obj):
            self.stream_error(obj, "stream_error")
            return False
        return fmt.event(self, name, obj)

    def stream_error(self, obj: dict, default_type: str) -> None:
        msg = errors.message_from(obj)
        if msg is None and isinstance(obj.get("error"), dict):
            msg = errors.message_from(obj["error"])
        self.error = msg or self.error or "error event in stream"
        self.error_type = errors.type_from(obj) or default_type

    # -- whole bodies ----------------------------------------------------------------------
    def on_body(self, obj: object) -> None:
        self.fmt.body(self, obj)

    # -- shared ----------------------------------------------------------------------------
    def add_usage(self, u: Usage | None) -> None:
        if u is not None:
            if self.usage is None:
                self.usage = u
            else:
                self.usage.merge(u)

    def common(self, obj: dict) -> None:
        """The fields most shapes carry: usage, server speeds, model, id, finish reason."""
        self.add_usage(self.fmt.read_usage(obj))
        if "timings" in obj or "metrics" in obj or "eval_duration" in obj:
            self.hints |= self.stats.take(obj)
        if self.response_model is None:
            self.response_model = _top_or_inner(obj, "model", "modelVersion")
        if self.chat_id is None:
            self.chat_id = _top_or_inner(obj, "id", "responseId")
        fr = finish_reason(obj)
        if fr:
            self.finish_reason = fr


def _top_or_inner(obj: dict, key: str, gemini_key: str) -> str | None:
    """A non-empty string at ``key`` (or Gemini's name for it), else inside the Anthropic
    ``message`` or Responses ``response`` object."""
    v = obj.get(key) or obj.get(gemini_key)
    if not isinstance(v, str):
        inner = obj.get("message") or obj.get("response")
        v = inner.get(key) if isinstance(inner, dict) else None
    return v if isinstance(v, str) and v else None


def finish_reason(obj: dict) -> str | None:
    """The finish/stop reason as the provider names it: OpenAI ``choices[].finish_reason``,
    Gemini ``candidates[].finishReason``, Anthropic/Ollama/Bedrock top-level names."""
    choices = obj.get("choices")
    if isinstance(choices, list):
        for c in choices:
            if isinstance(c, dict) and isinstance(c.get("finish_reason"), str):
                return c["finish_reason"]
    cands = obj.get("candidates")
    if isinstance(cands, list):
        for c in cands:
            if isinstance(c, dict) and isinstance(c.get("finishReason"), str):
                return c["finishReason"]
    for key in ("stop_reason", "done_reason", "stopReason"):
        v = obj.get(key)
        if isinstance(v, str) and v:
            return v
    return None
