"""OpenAI Responses API: typed SSE events; usage and final status on ``response.completed``
(or ``response.incomplete`` / ``response.failed``), which also ends the stream.

Background mode (``background: true``): the POST answers ``status: queued`` (or
``in_progress``) without usage; the client then polls ``GET /v1/responses/{id}`` (a whole
Responses body), resumes the stream with ``GET /v1/responses/{id}?stream=true&starting_after=N``
(the same typed events) or cancels with ``POST /v1/responses/{id}/cancel``. Every one of them
reports the response's ``status`` (``response_status``) and its id (``chat_id``): usage belongs
to the response, not to the call, and is counted once per id, at its terminal status, by the
caller. Also ``/v1/responses/compact`` (a billed call with Responses usage) and
``/v1/responses/input_tokens`` (a count: ``counted_tokens``, not usage).
"""

from __future__ import annotations

import re
from typing import Any

from ..format import CountingFormat, Match, WireFormat
from ..reader import ResponseState

_CONTENT = frozenset({
    "response.output_text.delta", "response.refusal.delta", "response.reasoning_text.delta",
    "response.reasoning_summary_text.delta", "response.function_call_arguments.delta",
    "response.custom_tool_call_input.delta", "response.audio.delta",
    "response.audio.transcript.delta",
})
_END = frozenset({"response.completed", "response.incomplete", "response.failed"})
_RETRIEVE = re.compile(r"/responses/(resp_[^/]+)$")
_CANCEL = re.compile(r"/responses/([^/]+)/cancel$")


def _short(obj: dict) -> bool | None:
    return bool(obj.get("delta")) if obj.get("type") in _CONTENT else None


def _status(state: ResponseState, r: dict) -> None:
    """The ``status`` of a Responses object (not of a compaction or an output item)."""
    status = r.get("status")
    if isinstance(status, str) and status and r.get("object", "response") == "response":
        state.response_status = status


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
        r = obj.get("response")
        if isinstance(r, dict):  # response.created / queued / in_progress / completed / ...
            _status(state, r)
        if t in _END:
            state.complete = True
            if isinstance(r, dict):
                _final(state, r)
                if t == "response.failed":
                    state.stream_error(r, "response_failed")
        return False

    def body(self, state: ResponseState, obj: Any) -> None:
        super().body(state, obj)
        if isinstance(obj, dict):
            _final(state, obj)
            _status(state, obj)
            if state.response_status == "failed" and isinstance(obj.get("error"), dict):
                state.stream_error(obj, "response_failed")  # a polled background failure


class Retrieve(Responses):
    """``GET /v1/responses/{id}``: a poll (whole body) or a stream resume (``?stream=true``)."""

    api = "responses_retrieve"
    methods = ("GET",)
    suffixes = ()

    def match(self, path: str) -> Match | None:
        return Match(self) if _RETRIEVE.search(path) else None


class Cancel(Responses):
    """``POST /v1/responses/{id}/cancel``: the response object, ``status: cancelled``."""

    api = "responses_cancel"
    suffixes = ()

    def match(self, path: str) -> Match | None:
        return Match(self) if _CANCEL.search(path) else None


class Compact(Responses):
    """``POST /v1/responses/compact``: a ``response.compaction`` object with Responses usage."""

    api = "responses_compact"
    suffixes = ("/responses/compact",)


class InputTokens(CountingFormat):
    """``POST /v1/responses/input_tokens``: ``{"object": "response.input_tokens",
    "input_tokens": N}`` is ``counted_tokens``, not usage."""

    fallback_provider = "openai"
    suffixes = ("/responses/input_tokens",)


RESPONSES = Responses()
RETRIEVE = Retrieve()
CANCEL = Cancel()
COMPACT = Compact()
INPUT_TOKENS = InputTokens()
