"""Per-response parsing: the live stream observer and the whole-body parser.

Both end in a ``Parsed``: everything the response body told us, in plain types, so it can be
stored in ``flow.metadata`` when the body itself cannot be (a capped stream). The live observer
also keeps the chunk clock (``StreamTiming``), which offline replay cannot recompute and so
reads back from the flow's metadata.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import orjson

from . import errors
from .decoding import DecodeError, Decoder, decode_body, decoder_for
from .framing import AWSEventStreamFramer, Framer
from .readers import ResponseReader
from .usage import Resolved, resolve

DEFAULT_MAX_BODY = 16 << 20
DEFAULT_MAX_CHUNK_TIMES = 10_000
DEFAULT_MAX_EVENT = 4 << 20


@dataclass(slots=True)
class Parsed:
    """Body-derived record fields (plain types; round-trips through flow metadata)."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_tokens: int | None = None
    cache_creation_tokens: int | None = None
    reasoning_tokens: int | None = None
    usage_source: str = "missing"
    prompt_per_second: float | None = None
    tokens_per_second: float | None = None
    server_duration_ms: float | None = None
    draft_tokens: int | None = None
    draft_accepted_tokens: int | None = None
    finish_reason: str | None = None
    response_model: str | None = None
    chat_id: str | None = None
    stream_error: str | None = None
    stream_error_type: str | None = None
    body_error: str | None = None  # provider message in a whole body; used for non-2xx only
    stream_complete: bool = False  # the stream reached its format's end event
    hints: list[str] = field(default_factory=list)
    parse_errors: list[str] = field(default_factory=list)

    def to_plain(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_plain(cls, d: dict[str, Any]) -> Parsed:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _parsed_from(reader: ResponseReader, parse_errors: list[str]) -> Parsed:
    r: Resolved = resolve(reader.usage, reader.stats)
    return Parsed(
        input_tokens=r.usage.input, output_tokens=r.usage.output, cached_tokens=r.usage.cached,
        cache_creation_tokens=r.usage.cache_creation, reasoning_tokens=r.usage.reasoning,
        usage_source=r.source, prompt_per_second=r.prompt_per_second,
        tokens_per_second=r.tokens_per_second, server_duration_ms=r.server_duration_ms,
        draft_tokens=r.draft_tokens, draft_accepted_tokens=r.draft_accepted_tokens,
        finish_reason=reader.finish_reason, response_model=reader.response_model,
        chat_id=reader.chat_id, stream_error=reader.error, stream_error_type=reader.error_type,
        hints=sorted(reader.hints), parse_errors=parse_errors, stream_complete=reader.complete,
    )


@dataclass(slots=True)
class StreamTiming:
    """The proxy's chunk clock, in ms from request start (plain types, stored in metadata)."""

    first_byte_ms: float | None = None
    last_byte_ms: float | None = None
    content_events: int = 0
    content_offsets_ms: list[float] = field(default_factory=list)

    def to_plain(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_plain(cls, d: dict[str, Any]) -> StreamTiming:
        return cls(d.get("first_byte_ms"), d.get("last_byte_ms"), int(d.get("content_events") or 0),
                   list(d.get("content_offsets_ms") or []))


class StreamObserver:
    """Feeds a streamed body through decoder → framer → reader as chunks arrive.

    Memory per flow: the raw body copy (kept so ``-w`` flow files are complete) up to
    ``max_body`` bytes, one partial event (bounded by the framer), and up to
    ``max_chunk_times`` content offsets.
    """

    __slots__ = ("reader", "_framer", "_decoder", "_t0", "_buf", "_max_body", "_max_times",
                 "body_capped", "_errors", "_decoded_bytes", "_first", "_last", "_times",
                 "_content_events")

    def __init__(self, api: str | None, framer: Framer, content_encoding: str | None,
                 t_start: float, max_body: int = DEFAULT_MAX_BODY,
                 max_chunk_times: int = DEFAULT_MAX_CHUNK_TIMES) -> None:
        self.reader = ResponseReader(api)
        self._framer: Framer | None = framer
        self._errors: list[str] = []
        self._decoder: Decoder | None = None
        try:
            self._decoder = decoder_for(content_encoding)
        except DecodeError as e:
            self._errors.append(f"response decompression failed: {e}")
            self._framer = None
        self._t0 = t_start
        self._buf: bytearray | None = bytearray()
        self._max_body = max_body
        self._max_times = max_chunk_times
        self.body_capped = False
        self._decoded_bytes = 0
        # The chunk clock, as raw time.time() values; turned into ms offsets once, in timing().
        self._first: float | None = None
        self._last: float | None = None
        self._times: list[float] = []
        self._content_events = 0

    def feed(self, chunk: bytes, now: float) -> None:
        """One chunk as it arrived (raw, still encoded). Must be cheap: it runs per chunk."""
        if not chunk:
            return
        if self._first is None:
            self._first = now
        self._last = now
        buf = self._buf
        if buf is not None:
            if len(buf) + len(chunk) > self._max_body:
                self._buf = None
                self.body_capped = True
            else:
                buf += chunk
        self._parse(chunk, now)

    def feed_all(self, body: bytes) -> None:
        """A whole stored body at once (offline replay): same parse, no clock."""
        self._buf = None
        if body:
            self._parse(body, None)

    def _parse(self, chunk: bytes, now: float | None) -> None:
        framer = self._framer
        if framer is None:
            return
        if self._decoder is not None:
            try:
                chunk = self._decoder.feed(chunk)
            except DecodeError as e:
                self._errors.append(f"response decompression failed: {e}")
                self._framer = None
                return
            self._decoded_bytes += len(chunk)
            if self._decoded_bytes > self._max_body * 8:  # decompression bomb guard
                self._errors.append(f"decoded stream over {self._max_body * 8} bytes, "
                                    "rest not read")
                self._framer = None
                return
        on_event = self.reader.on_event
        for name, data in framer.feed(chunk):
            if on_event(name, data):
                self._content_events += 1
                if now is not None and len(self._times) < self._max_times:
                    self._times.append(now)

    def timing(self) -> StreamTiming:
        """The chunk clock in ms from request start."""
        t0 = self._t0
        return StreamTiming(
            first_byte_ms=round((self._first - t0) * 1000, 3) if self._first is not None else None,
            last_byte_ms=round((self._last - t0) * 1000, 3) if self._last is not None else None,
            content_events=self._content_events,
            content_offsets_ms=[round((t - t0) * 1000, 3) for t in self._times],
        )

    def body(self) -> bytes | None:
        """The raw body seen so far, or None when it went over the cap."""
        return bytes(self._buf) if self._buf is not None else None

    def finish(self, complete: bool) -> Parsed:
        """End of stream. ``complete`` is False when the stream was cut (abort, disconnect)."""
        problems = list(self._errors)
        framer = self._framer
        if framer is not None:
            if complete:
                for name, data in framer.close():
                    if self.reader.on_event(name, data):
                        self._content_events += 1
            elif framer.pending().strip():
                problems.append("stream truncated")
            if framer.oversized:
                problems.append(f"{framer.oversized} stream event(s) over {framer.max_event} bytes skipped")
            if isinstance(framer, AWSEventStreamFramer) and framer.bad_frames:
                problems.append("invalid AWS event stream frame")
        if self.reader.invalid_events:
            problems.append(f"invalid JSON in {self.reader.invalid_events} of "
                          f"{self.reader.events} stream events")
        if self.body_capped:
            problems.append(f"stream body over {self._max_body} bytes: not saved to the flow")
        return _parsed_from(self.reader, problems)


def parse_body(api: str | None, body: bytes | None, content_encoding: str | None,
               max_body: int = DEFAULT_MAX_BODY) -> Parsed:
    """A whole (non-streamed) response body."""
    reader = ResponseReader(api)
    if not body:
        return _parsed_from(reader, ["empty response body"])
    if len(body) > max_body:
        return _parsed_from(reader, [f"response body over {max_body} bytes, not read"])
    try:
        data = decode_body(body, content_encoding)
    except DecodeError as e:
        return _parsed_from(reader, [f"response decompression failed: {e}"])
    if not data.strip():
        return _parsed_from(reader, ["empty response body"])
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return _parsed_from(reader, ["invalid JSON"])
    reader.on_body(obj)
    parsed = _parsed_from(reader, [])
    parsed.body_error = errors.message_from(obj)
    return parsed
