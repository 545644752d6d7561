"""Cohere v2: ``/v2/chat`` (whole body, or typed SSE events when the request asks ``stream``) and
``/v2/embed``.

Chat streams: ``message-start`` (the id), ``content-start`` / ``content-delta`` /
``content-end`` (text or thinking in ``delta.message.content``), ``tool-plan-delta``,
``tool-call-start`` / ``-delta`` / ``-end``, ``citation-start`` / ``-end``, then
``message-end``, which ends the stream and carries ``delta.finish_reason``, ``delta.usage``
(``tokens`` and ``billed_units``) and, when the generation failed, ``delta.error``. Whole chat
bodies carry ``finish_reason`` and ``usage`` at the top level; embed bodies ``meta.billed_units``.
Usage: ``tokens.<field>``, else ``billed_units.<field>`` (wire/usage.py ``cohere_usage``).
"""

from __future__ import annotations

from typing import Any

from ..format import WireFormat
from ..reader import ResponseState
from ..usage import Usage, cohere_usage

_QUIET = frozenset({"content-start", "content-end", "tool-call-end", "citation-start",
                    "citation-end"})
_DELTAS = frozenset({"content-delta", "tool-plan-delta", "tool-call-start", "tool-call-delta"})


def _delta_message(obj: dict) -> dict:
    d = obj.get("delta")
    m = d.get("message") if isinstance(d, dict) else None
    return m if isinstance(m, dict) else {}


def _has_content(obj: dict) -> bool:
    """Generated text, thinking, a tool plan or a tool-call delta in one event."""
    m = _delta_message(obj)
    c = m.get("content")
    if isinstance(c, dict) and (c.get("text") or c.get("thinking")):
        return True
    if m.get("tool_plan"):
        return True
    calls = m.get("tool_calls")
    if isinstance(calls, dict):
        f = calls.get("function")
        return isinstance(f, dict) and bool(f.get("arguments") or f.get("name"))
    return False


def _short(obj: dict) -> bool | None:
    t = obj.get("type")
    if t in _DELTAS:
        return _has_content(obj)
    return False if t in _QUIET else None


def _finish(state: ResponseState, holder: Any) -> None:
    if isinstance(holder, dict):
        fr = holder.get("finish_reason")
        if isinstance(fr, str) and fr:
            state.finish_reason = fr


class Chat(WireFormat):
    api = "cohere_chat"
    operation = "chat"
    provider = "cohere"
    suffixes = ("/v2/chat",)
    short = staticmethod(_short)

    def event(self, state: ResponseState, name: str | None, obj: dict) -> bool:
        state.common(obj)
        t = obj.get("type")
        if t == "message-end":
            state.complete = True
            d = obj.get("delta")
            if isinstance(d, dict):
                _finish(state, d)
                u = d.get("usage")
                if isinstance(u, dict):
                    state.add_usage(cohere_usage(u))
                err = d.get("error")
                if isinstance(err, str) and err.strip():
                    state.stream_error({"message": err}, "stream_error")
            return False
        return t in _DELTAS and _has_content(obj)

    def body(self, state: ResponseState, obj: Any) -> None:
        super().body(state, obj)
        _finish(state, obj)


class Embed(WireFormat):
    api = "cohere_embed"
    operation = "embeddings"
    provider = "cohere"
    suffixes = ("/v2/embed",)

    def read_usage(self, obj: dict) -> Usage | None:
        meta = obj.get("meta")
        if isinstance(meta, dict) and ("billed_units" in meta or "tokens" in meta):
            return cohere_usage(meta)
        return super().read_usage(obj)


CHAT = Chat()
EMBED = Embed()
