"""OpenAI Responses API: typed SSE events; usage and final status on ``response.completed``
(or ``response.incomplete`` / ``response.failed``), which also ends the stream."""

from __future__ import annotations

from typing import Any

from ..format import WireFormat
from ..reader import ResponseState

_CONTENT = frozenset({
    "response.output_text.delta", "response.refusal.delta", "response.reasoning_text.delta",
    "response.reasoning_summary_text.delta", "response.function_call_arguments.delta",
    "response.custom_tool_call_input.delta", "response.audio.delta",
    "response.audio.transcript.delta",
})
_END = frozenset({"response.completed", "response.incomplete", "response.failed"})


def _short(obj: dict) -> bool | None:
    return bool(obj.get("delta")) if obj.get("type") in _CONTENT else None


def _final(state: ResponseState, r: dict) -> None:
    """The finish reason of a final response object: why it is incomplete, else its status."""
    details = r.get("incomplete_details")
    reason = details.get("reason") if isinstance(details, dict) else None
    status = r.get("status")
    if isinstance(reason, str) and reason:
        state.finish_reason = reason
    elif isinstance(status, str) and status:
        state.finish_reason = status


class Responses(WireFormat):
    api = "responses"
    operation = "chat"
    fallback_provider = "openai"
    suffixes = ("/responses",)
    short = staticmethod(_short)

    def event(self, state: ResponseState, name: str | None, obj: dict) -> bool:
        state.common(obj)
        t = obj.get("type")
        if t in _CONTENT:
            return bool(obj.get("delta"))
        if t in _END:
            state.complete = True
            r = obj.get("response")
            if isinstance(r, dict):
                _final(state, r)
                if t == "response.failed":
                    state.stream_error(r, "response_failed")
        return False

    def body(self, state: ResponseState, obj: Any) -> None:
        super().body(state, obj)
        if isinstance(obj, dict):
            _final(state, obj)


RESPONSES = Responses()
