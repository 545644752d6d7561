"""The one seam between the record engine and its outputs.

Every output (the JSONL log, the metrics, the summary line; later spans, the store, the UI)
subscribes to the same two events and nothing else: ``started`` when an LLM request is seen
(for in-flight views) and ``finished`` once per record. An output that needs more than the
record (epoch times for spans; headers and bodies for captures) finds it on the event, never by
reaching into a mitmproxy flow. An exception in one output is reported once and never reaches
the others or the traffic.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import orjson

from ..record import redact
from ..record.record import Record
from ..wire.decoding import DecodedTooLarge, decode_body

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Started:
    """An LLM request the proxy has begun to carry."""

    flow_id: str
    method: str
    host: str
    port: int
    path: str  # without the query string
    t_start: float  # epoch seconds
    api: str
    model: str | None = None  # from the path; the body is not read yet
    client: str | None = None  # recognised from the User-Agent
    session_id: str | None = None


HeaderFields = tuple[tuple[bytes, bytes], ...]  # raw (name, value) pairs as on the wire


@dataclass(slots=True)
class Finished:
    """A finished request: its record, and what outputs beyond the log need. Headers and bodies
    are kept raw (references, no copies) and redacted or decoded on request, so outputs that do
    not show them cost nothing."""

    record: Record
    t_start: float  # epoch seconds: request start
    t_end: float  # epoch seconds: the end the record's ``end_time`` says
    request_fields: HeaderFields = ()
    response_fields: HeaderFields = ()
    query: str = ""  # the request's raw query string (``query()`` redacts it)
    request_raw: bytes | None = None  # bodies as on the wire (still Content-Encoded)
    request_encoding: str | None = None
    response_raw: bytes | None = None  # None: no response, or a stream over aistats_max_body
    response_encoding: str | None = None
    _json: bytes | None = field(default=None, repr=False, compare=False)

    def record_json(self) -> bytes:
        """The record as JSON (record.md), made once for every output that writes it (the
        log on the event loop, the store on its thread: either may come first)."""
        text = self._json
        if text is None:
            text = self._json = orjson.dumps(self.record.to_dict(), default=str)
        return text

    @property
    def body_bytes(self) -> int:
        """The raw bodies' size: what holding on to the event holds beyond the record."""
        return len(self.request_raw or b"") + len(self.response_raw or b"")

    def without_bodies(self) -> Finished:
        """The same event without headers and bodies (and the record's JSON, if made, kept):
        what an output holds on to when it will not need them."""
        return Finished(self.record, self.t_start, self.t_end, _json=self._json)

    def request_headers(self, lower: bool = True) -> list[tuple[str, str]]:
        """Redacted pairs, first value per name (lower-cased, or as first spelled)."""
        return first_values(self.request_fields, lower, redacted=True)

    def response_headers(self, lower: bool = True) -> list[tuple[str, str]]:
        return first_values(self.response_fields, lower, redacted=True)

    def redacted_query(self) -> str:
        return redact.query(self.query)

    def request_body(self, max_bytes: int) -> bytes | None:
        """The request body decoded (at most ``max_bytes``); DecodeError when it cannot be."""
        return _decoded(self.request_raw, self.request_encoding, max_bytes)

    def response_body(self, max_bytes: int) -> bytes | None:
        """The response body decoded (at most ``max_bytes``); DecodeError when it cannot be."""
        return _decoded(self.response_raw, self.response_encoding, max_bytes)


def _decoded(raw: bytes | None, encoding: str | None, max_bytes: int) -> bytes | None:
    if raw is None:
        return None
    if len(raw) > max_bytes:
        raise DecodedTooLarge(f"body over {max_bytes} bytes")
    return decode_body(raw, encoding, max_bytes)


def first_values(fields: HeaderFields, lower: bool = True, redacted: bool = False,
                 only: frozenset[bytes] | None = None) -> list[tuple[str, str]]:
    """Header pairs as text, the first value per name (compared without case); the name
    lower-cased, or as the first occurrence spells it; with ``redacted``, the credential
    headers' values replaced (and not decoded); with ``only`` (lower-case raw names), the other
    headers skipped before anything of them is decoded."""
    out: dict[str, tuple[str, str]] = {}
    secret = redact.SECRET_HEADERS if redacted else ()
    for k, v in fields:
        if only is not None and k.lower() not in only:
            continue
        name = k.decode("latin-1")
        key = name.lower()
        if key not in out:
            out[key] = (key if lower else name,
                        redact.REDACTED if key in secret else v.decode("utf-8", "replace"))
    return list(out.values())


class Output(Protocol):
    """What an output implements. ``close`` must not block unless ``wait`` is True (exit)."""

    def started(self, event: Started) -> None: ...

    def finished(self, event: Finished) -> None: ...

    def close(self, wait: bool = False) -> None: ...


class Bus:
    """The outputs, by name; replacing one builds the new before closing the old."""

    def __init__(self, report: Callable[[str, str, Exception], None] | None = None) -> None:
        self._outputs: dict[str, Output] = {}
        self._report = report or _log_report
        self._dropped_listeners: list[Callable[[str, int], None]] = []

    def __contains__(self, name: str) -> bool:
        return name in self._outputs

    def get(self, name: str) -> Output | None:
        return self._outputs.get(name)

    def names(self) -> list[str]:
        return list(self._outputs)

    def replace(self, name: str, output: Output | None) -> None:
        """Install ``output`` under ``name`` (None removes it); the old one is closed without
        waiting, after the new one is in place."""
        old = self._outputs.pop(name, None)
        if output is not None:
            self._outputs[name] = output
        if old is not None and old is not output:
            try:
                old.close()
            except Exception as e:
                self._report(name, "close", e)

    def started(self, event: Started) -> None:
        for name, out in self._outputs.items():
            try:
                out.started(event)
            except Exception as e:
                self._report(name, event.flow_id, e)

    def finished(self, event: Finished) -> None:
        self.finished_all((event,))

    def finished_all(self, events: Sequence[Finished]) -> None:
        """Records made together go to one output after the other, each output taking all of
        them in a row: its code and data stay in the caches from one record to the next."""
        for name, out in self._outputs.items():
            for event in events:
                try:
                    out.finished(event)
                except Exception as e:
                    self._report(name, event.record.flow_id, e)

    def close(self, wait: bool = False) -> None:
        for name, out in list(self._outputs.items()):
            try:
                out.close(wait)
            except Exception as e:
                self._report(name, "close", e)
        self._outputs.clear()

    # -- records an output could not keep (counted by whoever listens, e.g. the metrics) --
    def on_dropped(self, listener: Callable[[str, int], None]) -> None:
        self._dropped_listeners.append(listener)

    def dropped(self, output: str, n: int) -> None:
        """May be called from an output's own thread."""
        for listener in list(self._dropped_listeners):
            listener(output, n)


def _log_report(output: str, where: str, exc: Exception) -> None:
    log.warning("aistats: output %s failed (%s): %s: %s", output, where, type(exc).__name__, exc)
