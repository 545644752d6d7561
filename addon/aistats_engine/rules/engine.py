"""Applying the attribute rules to one flow, each source read at its moment (as Higress does):
request headers and fixed values, the request body when the request is complete, response
headers at ``responseheaders``, stream events as they are read (``first`` / ``replace`` keep the
first / last non-empty value, ``append`` joins every event's), the whole response body at the
end. Built-ins fall back to their own extraction when the configured path finds nothing.

No rules, no cost: the addon makes a ``FlowRules`` only when a configuration is loaded, and the
stream reader calls ``event`` only when some rule reads the stream.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from ..record.record import Record
from . import DEFAULT_MAX_ATTRIBUTE_BYTES
from .builtins import BuiltinExtractor
from .config import (FIXED_VALUE, REQUEST_BODY, REQUEST_HEADER, RESPONSE_BODY, RESPONSE_HEADER,
                     RESPONSE_STREAMING_BODY, Attribute, RulesConfig)

# The order in which sources are read; a later value of the same key wins, as in Higress.
_PHASES = (FIXED_VALUE, REQUEST_HEADER, REQUEST_BODY, RESPONSE_HEADER, RESPONSE_STREAMING_BODY,
           RESPONSE_BODY)
_UNSET = object()


def _empty(v: Any) -> bool:
    return v is None or v == ""


def _text(v: Any) -> str:
    return v if isinstance(v, str) else orjson.dumps(v).decode()


def truncate(value: Any, limit: int) -> Any:
    """Higress's ``value_length_limit``: a value whose text is longer becomes the string
    ``first half + " [truncated] " + last half`` of its text; others keep their JSON type."""
    if value is None or isinstance(value, bool):
        return value
    text = _text(value)
    if len(text) <= limit:
        return value
    half = limit // 2
    return text[:half] + " [truncated] " + text[len(text) - half:]


class FlowRules:
    """The rule state of one flow."""

    __slots__ = ("cfg", "_values", "_stream", "_appended", "_builtins", "_bytes", "_max_bytes",
                 "truncated", "wants_events", "response_skipped")

    def __init__(self, cfg: RulesConfig, api: str | None,
                 max_bytes: int = DEFAULT_MAX_ATTRIBUTE_BYTES) -> None:
        self.cfg = cfg
        self._values: dict[tuple[str, int], Any] = {}  # (source, attribute index) → value
        self._stream: dict[int, Any] = {}  # streaming rules' running values (first, replace)
        # ... and the ``append`` rules' pieces, joined once at the end: adding each piece to the
        # text so far would copy it per event (a long answer: quadratic, on the event loop).
        self._appended: dict[int, list[str]] = {}
        builtins = cfg.builtins
        self._builtins = BuiltinExtractor(api, builtins, max_bytes) if builtins else None
        self._bytes = 0
        self._max_bytes = max_bytes
        self.truncated = False  # appended values passed max_bytes
        self.wants_events = cfg.needs(RESPONSE_STREAMING_BODY) and (
            any(a.path is not None and RESPONSE_STREAMING_BODY in a.sources
                for a in cfg.attributes)
            or (self._builtins is not None and self._builtins.needs_events))
        self.response_skipped = False

    # -- sources, in the order they arrive ---------------------------------------------------
    def request(self, headers: Mapping[str, str], body: Any) -> None:
        """Fixed values, request headers and (when parsed) the request body."""
        if self._builtins is not None and body is not None:
            self._builtins.request(body)
        for a in self.cfg.attributes:
            if FIXED_VALUE in a.sources:
                self._values[(FIXED_VALUE, a.index)] = a.value
            if REQUEST_HEADER in a.sources:
                self._values[(REQUEST_HEADER, a.index)] = headers.get(a.value)
            if REQUEST_BODY in a.sources:
                self._values[(REQUEST_BODY, a.index)] = self._from_body(a, REQUEST_BODY, body)

    def response_headers(self, headers: Mapping[str, str]) -> None:
        for a in self.cfg.attributes:
            if RESPONSE_HEADER in a.sources:
                self._values[(RESPONSE_HEADER, a.index)] = headers.get(a.value)

    def event(self, name: str | None, obj: dict) -> None:
        """One parsed stream event."""
        if self._builtins is not None:
            self._builtins.event(name, obj)
        for a in self.cfg.attributes:
            if a.path is None or RESPONSE_STREAMING_BODY not in a.sources:
                continue
            v = a.path.get(obj)
            if _empty(v):
                continue
            if a.rule == "append":
                piece = _text(v)
                self._bytes += len(piece)
                if self._bytes > self._max_bytes:
                    self.truncated = True
                    continue
                pieces = self._appended.get(a.index)
                if pieces is None:
                    self._appended[a.index] = [piece]
                else:
                    pieces.append(piece)
            elif a.rule == "replace" or a.index not in self._stream:
                self._stream[a.index] = v

    def body(self, obj: Any) -> None:
        """A whole response body (parsed JSON)."""
        if self._builtins is not None:
            self._builtins.body(obj)
        for a in self.cfg.attributes:
            if RESPONSE_BODY in a.sources:
                self._values[(RESPONSE_BODY, a.index)] = self._from_body(a, RESPONSE_BODY, obj)

    def _from_body(self, a: Attribute, source: str, obj: Any) -> Any:
        v = a.path.get(obj) if a.path is not None and obj is not None else None
        if _empty(v) and a.builtin and self._builtins is not None:
            v = self._builtins.value(a.key, source)
        return v

    # -- the end -----------------------------------------------------------------------------
    def finish(self, rec: Record, stream: bool) -> None:
        """Put the values on the record: ``attributes`` (apply_to_log), ``log_fields``
        (as_separate_log_field), span attributes. A response source is read only when the
        response was (not skipped by the content-type filter), and only the kind it was."""
        if not self.response_skipped:
            source = RESPONSE_STREAMING_BODY if stream else RESPONSE_BODY
            for a in self.cfg.attributes:
                if source not in a.sources:
                    continue
                if stream:
                    pieces = self._appended.get(a.index)
                    v = "".join(pieces) if pieces else self._stream.get(a.index)
                    if _empty(v) and a.builtin and self._builtins is not None:
                        v = self._builtins.value(a.key, source)
                elif (source, a.index) in self._values:
                    v = self._values[(source, a.index)]
                else:  # a body that was not JSON
                    v = self._builtins.value(a.key, source) if a.builtin and self._builtins else None
                if _empty(v) and a.key in ("reasoning_tokens", "cached_tokens"):
                    v = rec.reasoning_tokens if a.key == "reasoning_tokens" else rec.cached_tokens
                self._values[(source, a.index)] = v
        limit = self.cfg.value_length_limit
        attrs, fields, span, content = rec.attributes, rec.log_fields, \
            rec.span_attributes, rec.span_content_attributes
        for phase in _PHASES:
            for a in self.cfg.attributes:
                v = self._values.get((phase, a.index), _UNSET)
                if v is _UNSET:
                    continue
                if _empty(v) and a.default is not None:
                    v = a.default
                v = truncate(v, limit)
                if a.to_log:
                    attrs[a.key] = v
                    if a.separate:
                        fields[a.key] = v
                if a.to_span and not _empty(v):
                    (content if a.content else span)[a.span_key] = v
                if a.key in _USAGE_KEYS:
                    _fill_usage(rec, a.key, v)


# Attribute keys Higress uses for its metrics (its Bailian example extracts them from a
# non-OpenAI body): they fill the record's model and counts when the response gave none.
_USAGE_KEYS = frozenset({"model", "input_token", "output_token"})


def _fill_usage(rec: Record, key: str, v: Any) -> None:
    if key == "model":
        if rec.model is None and isinstance(v, str) and v:
            rec.model = v
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        return
    if key == "input_token" and rec.input_tokens is None:
        rec.input_tokens = v
    elif key == "output_token" and rec.output_tokens is None:
        rec.output_tokens = v
    else:
        return
    rec.usage_source = "attributes"
    if rec.input_tokens is not None and rec.output_tokens is not None:
        rec.total_tokens = rec.input_tokens + rec.output_tokens
