"""Traffic on a path no format claims, observed because the user's configuration names the path
(Higress ``enable_path_suffixes``, or ``*``): usage is read by the body's shape, content by the
fields any known format uses for it."""

from __future__ import annotations

from ..format import WireFormat
from ..reader import ResponseState
from .openai import choice_has_content


class Generic(WireFormat):
    api = "unknown"
    operation = ""

    def event(self, state: ResponseState, name: str | None, obj: dict) -> bool:
        state.common(obj)
        if obj.get("type") in ("message_stop", "response.completed") or obj.get("done") is True:
            state.complete = True
        choices = obj.get("choices")
        if isinstance(choices, list):
            return any(isinstance(c, dict) and choice_has_content(c) for c in choices)
        if obj.get("type") == "content_block_delta":
            return True
        delta = obj.get("delta")
        if isinstance(delta, str) and delta:  # Responses-style typed deltas
            return True
        m = obj.get("message")
        if isinstance(m, dict) and m.get("content"):
            return True
        cands = obj.get("candidates")
        return isinstance(cands, list) and bool(cands)


GENERIC = Generic()
