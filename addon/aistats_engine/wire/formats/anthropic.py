"""Anthropic messages and count_tokens (its count is ``counted_tokens``, not usage). Streams
are typed SSE events: usage on ``message_start.message.usage`` then cumulative on
``message_delta.usage`` (the input total summed again from the merged parts); content in
``content_block_delta``; ``message_stop`` ends the stream."""

from __future__ import annotations

from ..format import CountingFormat, WireFormat
from ..reader import ResponseState

_QUIET = frozenset({"ping", "content_block_start", "content_block_stop"})


def _short(obj: dict) -> bool | None:
    t = obj.get("type")
    if t == "content_block_delta":
        return True
    return False if t in _QUIET else None


def read_event(state: ResponseState, obj: dict) -> bool:
    """One Anthropic stream event (also inside Bedrock InvokeModel streams)."""
    state.common(obj)
    t = obj.get("type")
    if t == "message_stop":
        state.complete = True
    elif t == "message_delta":
        d = obj.get("delta")
        if isinstance(d, dict) and d.get("stop_reason"):
            state.finish_reason = d["stop_reason"]
    return t == "content_block_delta"


class Messages(WireFormat):
    api = "messages"
    operation = "chat"
    provider = "anthropic"
    anthropic_usage = True
    suffixes = ("/v1/messages",)
    exact = ("/messages",)
    short = staticmethod(_short)

    def event(self, state: ResponseState, name: str | None, obj: dict) -> bool:
        return read_event(state, obj)


class CountTokens(CountingFormat):
    """``{"input_tokens": N}``: ``counted_tokens``, not usage."""

    provider = "anthropic"
    suffixes = ("/messages/count_tokens",)


MESSAGES = Messages()
COUNT_TOKENS = CountTokens()
