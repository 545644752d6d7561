"""Protocol readers: what each wire format's request and response say.

``read_request`` reads the request body. ``ResponseReader`` reads one stream event at a time
(``on_event``) or a whole JSON body (``on_body``) and accumulates usage, server speeds, finish
reason, response model, response id and in-stream errors. It also says which events carry
generated content, which drives TTFT and the chunk count.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..record import errors
from .usage import ServerStats, Usage, read_usage


@dataclass(slots=True)
class RequestInfo:
    model: str | None = None
    stream: bool | None = None
    chat_round: int | None = None
    invalid_json: bool = False
    body: Any = None  # the parsed request JSON (for attribute rules), None if not JSON


def read_request(body: bytes | None) -> RequestInfo:
    if not body:
        return RequestInfo()
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return RequestInfo(invalid_json=True)
    if not isinstance(obj, dict):
        return RequestInfo(body=obj)
    model = obj.get("model") if isinstance(obj.get("model"), str) else None
    stream = obj.get("stream") if isinstance(obj.get("stream"), bool) else None
    return RequestInfo(model=model or None, stream=stream, chat_round=_chat_round(obj), body=obj)


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


_RESPONSES_CONTENT = frozenset({
    "response.output_text.delta", "response.refusal.delta", "response.reasoning_text.delta",
    "response.reasoning_summary_text.delta", "response.function_call_arguments.delta",
    "response.custom_tool_call_input.delta", "response.audio.delta",
    "response.audio.transcript.delta",
})
_CHAT_APIS = frozenset({"chat_completions", "completions", "infill"})
# Keys that send a chat event down the full reading (usage, speeds, errors, other formats).
_CHAT_RARE_KEYS = frozenset({
    "timings", "metrics", "error", "type", "response", "message", "usageMetadata",
    "prompt_eval_count", "eval_count", "eval_duration", "prompt_eval_duration",
    "total_duration", "stop_reason", "done_reason", "stopReason", "content",
})
_ANTHROPIC_QUIET = frozenset({"ping", "content_block_start", "content_block_stop"})
_RESPONSES_END = frozenset({"response.completed", "response.incomplete", "response.failed"})


@dataclass(slots=True)
class ResponseReader:
    api: str | None
    usage: Usage | None = None
    stats: ServerStats = field(default_factory=ServerStats)
    finish_reason: str | None = None
    response_model: str | None = None
    chat_id: str | None = None
    error: str | None = None
    error_type: str | None = None
    hints: set[str] = field(default_factory=set)
    events: int = 0
    invalid_events: int = 0
    complete: bool = False  # saw the format's end-of-stream event
    primed: bool = False  # one event went through the full reading (ids, model)
    fast: bool = True  # let plain delta events take the short path (_SHORT_PATHS)

    # -- streams ---------------------------------------------------------------------------
    def on_event(self, name: str | None, data: bytes) -> bool:
        """Read one framed event; True when it carries generated content."""
        if not data:
            return False
        if data == b"[DONE]":
            self.complete = True
            return False
        self.events += 1
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.invalid_events += 1
            return False
        if obj.__class__ is not dict:
            return False
        if self.primed and self.fast:
            short = _SHORT_PATHS.get(self.api)
            if short is not None:
                verdict = short(obj)
                if verdict is not None:
                    return verdict
        self.primed = True
        if name == "error" or obj.get("type") == "error" or (
                isinstance(obj.get("error"), dict) and "choices" not in obj):
            self._stream_error(obj, "stream_error")
            return False
        self._common(obj)
        return self._content(name, obj)

    def _content(self, name: str | None, obj: dict) -> bool:
        api = self.api
        if api == "messages":
            t = obj.get("type")
            if t == "message_stop":
                self.complete = True
            elif t == "message_delta":
                d = obj.get("delta")
                if isinstance(d, dict) and d.get("stop_reason"):
                    self.finish_reason = d["stop_reason"]
            return t == "content_block_delta"
        if api == "responses":
            t = obj.get("type")
            if t in _RESPONSES_CONTENT:
                return bool(obj.get("delta"))
            if t in _RESPONSES_END:
                self.complete = True
                r = obj.get("response")
                if isinstance(r, dict):
                    self._responses_final(r)
                    if t == "response.failed":
                        self._stream_error(r, "response_failed")
            return False
        if api == "generate_content":
            if _finish_reason(obj):
                self.complete = True
            return _gemini_content(obj)
        if api in ("ollama_chat", "ollama_generate"):
            if obj.get("done") is True:
                self.complete = True
            m = obj.get("message")
            if isinstance(m, dict) and (m.get("content") or m.get("thinking") or m.get("tool_calls")):
                return True
            return bool(obj.get("response") or obj.get("thinking"))
        if api == "converse":
            if name == "metadata" or "metrics" in obj and "usage" in obj:
                self.complete = True
            return name == "contentBlockDelta" or "contentBlockDelta" in obj or (
                isinstance(obj.get("delta"), dict) and "contentBlockIndex" in obj)
        # OpenAI-compatible chat / completions (also llama.cpp, vLLM, infill)
        content = False
        choices = obj.get("choices")
        if isinstance(choices, list):
            for c in choices:
                if isinstance(c, dict) and _choice_has_content(c):
                    content = True
        elif isinstance(obj.get("content"), str) and obj["content"]:  # llama.cpp /completion
            content = True
        return content

    def _stream_error(self, obj: dict, default_type: str) -> None:
        msg = errors.message_from(obj)
        if msg is None and isinstance(obj.get("error"), dict):
            msg = errors.message_from(obj["error"])
        self.error = msg or self.error or "error event in stream"
        self.error_type = errors.type_from(obj) or default_type

    # -- whole bodies ----------------------------------------------------------------------
    def on_body(self, obj: Any) -> None:
        """Read a whole (non-streamed) JSON body."""
        if isinstance(obj, list):  # llama.cpp /infill: the last element's timings
            if obj and isinstance(obj[-1], dict):
                self._common(obj[-1])
            return
        if not isinstance(obj, dict):
            return
        self._common(obj)
        if self.api == "responses":
            self._responses_final(obj)

    # -- shared ----------------------------------------------------------------------------
    def _common(self, obj: dict) -> None:
        u = read_usage(obj, self.api)
        if u is not None:
            if self.usage is None:
                self.usage = u
            else:
                self.usage.merge(u)
        if "timings" in obj or "metrics" in obj or "eval_duration" in obj:
            self.hints |= self.stats.take(obj)
        if self.response_model is None:
            self.response_model = _top_or_inner(obj, "model", "modelVersion")
        if self.chat_id is None:
            self.chat_id = _top_or_inner(obj, "id", "responseId")
        fr = _finish_reason(obj)
        if fr:
            self.finish_reason = fr

    def _responses_final(self, r: dict) -> None:
        details = r.get("incomplete_details")
        reason = details.get("reason") if isinstance(details, dict) else None
        status = r.get("status")
        if isinstance(reason, str) and reason:
            self.finish_reason = reason
        elif isinstance(status, str) and status:
            self.finish_reason = status


# The short path for the bulk of a stream: plain delta events that change nothing but the
# content count. Each returns True/False (content or not) or None when the event may carry
# anything else (then it is read in full). tests/test_readers.py checks that it never changes
# a result.

def _chat_short(obj: dict) -> bool | None:
    if obj.get("usage") or not _CHAT_RARE_KEYS.isdisjoint(obj):
        return None
    choices = obj.get("choices")
    if choices.__class__ is not list:
        return None
    content = False
    for c in choices:
        if c.__class__ is not dict or c.get("finish_reason") is not None:
            return None
        if _choice_has_content(c):
            content = True
    return content


def _anthropic_short(obj: dict) -> bool | None:
    t = obj.get("type")
    if t == "content_block_delta":
        return True
    return False if t in _ANTHROPIC_QUIET else None


def _responses_short(obj: dict) -> bool | None:
    return bool(obj.get("delta")) if obj.get("type") in _RESPONSES_CONTENT else None


_SHORT_PATHS: dict[str | None, Callable[[dict], bool | None]] = {
    **{api: _chat_short for api in _CHAT_APIS},
    "messages": _anthropic_short,
    "responses": _responses_short,
}


def _choice_has_content(c: dict) -> bool:
    """A chat/completions choice with generated text, reasoning or a tool-call delta."""
    d = c.get("delta")
    if isinstance(d, dict) and (d.get("content") or d.get("reasoning_content") or d.get("reasoning")
                                or d.get("tool_calls") or d.get("function_call")
                                or d.get("refusal")):
        return True
    return bool(c.get("text"))


def _top_or_inner(obj: dict, key: str, gemini_key: str) -> str | None:
    """A non-empty string at ``key`` (or Gemini's name for it), else inside the Anthropic
    ``message`` or Responses ``response`` object."""
    v = obj.get(key) or obj.get(gemini_key)
    if not isinstance(v, str):
        inner = obj.get("message") or obj.get("response")
        v = inner.get(key) if isinstance(inner, dict) else None
    return v if isinstance(v, str) and v else None


def _finish_reason(obj: dict) -> str | None:
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


def _gemini_content(obj: dict) -> bool:
    cands = obj.get("candidates")
    if not isinstance(cands, list):
        return False
    for c in cands:
        content = c.get("content") if isinstance(c, dict) else None
        parts = content.get("parts") if isinstance(content, dict) else None
        if isinstance(parts, list):
            for p in parts:
                if isinstance(p, dict) and (p.get("text") or p.get("functionCall")):
                    return True
    return False
