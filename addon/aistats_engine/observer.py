"""Per-response parsing: the live stream observer and the whole-body parser.

Both end in a ``Parsed``: everything the response body told us, in plain types, so it can be
stored in ``flow.metadata`` when the body itself cannot be (a capped stream). The live observer
also keeps the chunk clock (``StreamTiming``), which offline replay cannot recompute and so
reads back from the flow's metadata.
"""

from __future__ import annotations

import dataclasses
from bisect import bisect_right
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

import orjson

from .record import errors
from .wire.decoding import DecodeError, Decoder, decode_body, decoder_for
from .wire.framing import AWSEventStreamFramer, Framer, NDJSONFramer, SSEFramer
from .wire.readers import ResponseReader
from .wire.usage import Resolved, resolve

DEFAULT_MAX_BODY = 16 << 20
DEFAULT_MAX_CHUNK_TIMES = 10_000
DEFAULT_MAX_EVENT = 4 << 20
# Kept bytes that make a batch worth reading before the stream ends, and the most one drain
# call reads (about 60 events, ~0.1 ms) so other connections wait little for us.
DRAIN_BYTES = 4 << 10
DRAIN_LIMIT = 16 << 10
MIN_DECODED_LIMIT = 128 << 20  # a stream may decode to 8 × max_body, and at least this


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
        out = {name: getattr(self, name) for name in _PARSED_FIELDS}
        out["hints"], out["parse_errors"] = list(self.hints), list(self.parse_errors)
        return out

    @classmethod
    def from_plain(cls, d: dict[str, Any]) -> Parsed:
        return cls(**{k: v for k, v in d.items() if k in _PARSED_FIELDS})


_PARSED_FIELDS = tuple(f.name for f in dataclasses.fields(Parsed))


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
        return {"first_byte_ms": self.first_byte_ms, "last_byte_ms": self.last_byte_ms,
                "content_events": self.content_events,
                "content_offsets_ms": list(self.content_offsets_ms)}

    @classmethod
    def from_plain(cls, d: dict[str, Any]) -> StreamTiming:
        return cls(d.get("first_byte_ms"), d.get("last_byte_ms"), int(d.get("content_events") or 0),
                   list(d.get("content_offsets_ms") or []))


class StreamObserver:
    """Reads a streamed body: decoder → framer → reader, with the proxy's chunk clock.

    The live path (``feed``) only keeps the chunk and its arrival time — a few hundred
    nanoseconds, so no chunk waits for us. The kept chunks are read in batches (``drain``),
    which the caller runs after the chunk has been forwarded once ``feed`` says a batch is
    due, and at the end; each event is timed by the chunk that completed it. A body that
    outgrows ``max_body`` is no longer kept and is read chunk by chunk. All give the same
    result (tests/test_framing.py).

    Memory per flow: the raw body copy (kept so ``-w`` flow files are complete) up to
    ``max_body`` bytes plus two numbers per unread chunk, one partial event (bounded by the
    framer), and up to ``max_chunk_times`` content timestamps.
    """

    __slots__ = ("reader", "_framer", "_decoder", "_t0", "_buf", "_read_upto", "_chunk_times",
                 "_chunk_ends", "_drain_due", "_max_body", "_max_times", "body_capped",
                 "_errors", "_decoded_bytes", "_first", "_last", "_times", "_content_events")

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
        self._read_upto = 0  # _buf[:_read_upto] has been read
        self._chunk_times: list[float] = []  # arrival time of each unread chunk
        self._chunk_ends: list[int] = []  # offset in _buf where each unread chunk ends
        self._drain_due = False
        self._max_body = max_body
        self._max_times = max_chunk_times
        self.body_capped = False
        self._decoded_bytes = 0
        # The chunk clock, as raw time.time() values; turned into ms offsets once, in timing().
        self._first: float | None = None
        self._last: float | None = None
        self._times: list[float] = []
        self._content_events = 0

    def feed(self, chunk: bytes, now: float) -> bool:
        """One chunk as it arrived (raw, still encoded). Runs per chunk: keep it minimal.
        True when a batch is due: call ``drain`` soon (once the chunk is on its way)."""
        if not chunk:
            return False
        if self._first is None:
            self._first = now
        self._last = now
        buf = self._buf
        if buf is None:
            self._parse(chunk, now)
            return False
        size = len(buf) + len(chunk)
        if size > self._max_body:  # over the cap: no copy, chunk by chunk
            self.drain()
            self._buf = None
            self.body_capped = True
            self._parse(chunk, now)
            return False
        buf += chunk
        self._chunk_times.append(now)
        self._chunk_ends.append(size)
        if not self._drain_due and size - self._read_upto >= DRAIN_BYTES:
            self._drain_due = True
            return True
        return False

    def feed_all(self, body: bytes) -> None:
        """A whole stored body at once (offline replay): same reading, no clock."""
        self._buf = None
        if body:
            self._parse(body, None)

    def drain(self, limit: int | None = None) -> bool:
        """Read the chunks kept since the last drain, about ``limit`` bytes of them at most
        (whole chunks); True when some are left for another call."""
        self._drain_due = False
        times, ends = self._chunk_times, self._chunk_ends
        if not times or self._buf is None:
            return False
        start = self._read_upto
        n = len(ends)
        if limit is not None and ends[-1] - start > limit:
            n = max(bisect_right(ends, start + limit), 1)
        self._chunk_times, self._chunk_ends = times[n:], ends[n:]
        self._read_upto = ends[n - 1]
        if self._framer is not None:
            self._read_whole(bytes(self._buf[start:ends[n - 1]]), times[:n],
                             [e - start for e in ends[:n]])
        if self._chunk_times:
            self._drain_due = True
            return True
        return False

    def _read_whole(self, body: bytes, times: list[float], ends: list[int]) -> None:
        """Decode chunk by chunk (keeping where each chunk ends in the decoded text), then
        frame the batch in one pass, each event timed by the chunk holding the byte that
        completed it. Where positions are not available (carriage returns, AWS frames), the
        decoded chunks are framed one by one instead: the same result, a little slower."""
        starts = [0, *ends[:-1]]
        parts: list[bytes] | None = None
        text = body
        decode_failed = False
        if self._decoder is not None:
            parts = []
            for start, end in zip(starts, ends):
                part = self._decode(body[start:end])
                if part is None:
                    decode_failed = True
                    break
                parts.append(part)
            ends = list(accumulate(len(p) for p in parts))
            times = times[:len(parts)]
            text = b"".join(parts)
        framer = self._framer
        events = None
        if isinstance(framer, (SSEFramer, NDJSONFramer)):
            events = framer.feed_positions(text)
        if events is None:
            if parts is None:
                parts = [body[start:end] for start, end in zip(starts, ends)]
            for part, now in zip(parts, times):
                self._frame(part, now)
        else:
            on_event = self.reader.on_event
            last = len(ends) - 1
            kept = self._times
            room = self._max_times - len(kept)
            found = 0
            for name, data, pos in events:
                if on_event(name, data):
                    found += 1
                    if found <= room:
                        kept.append(times[min(bisect_right(ends, pos), last)])
            self._content_events += found
        if decode_failed:
            self._framer = None  # nothing after the failure can be read

    def _decode(self, chunk: bytes) -> bytes | None:
        """Decoded bytes, or None after a failure (recorded; reading stops there)."""
        assert self._decoder is not None
        try:
            out = self._decoder.feed(chunk)
        except DecodeError as e:
            self._errors.append(f"response decompression failed: {e}")
            self._decoder = None
            return None
        self._decoded_bytes += len(out)
        limit = max(self._max_body * 8, MIN_DECODED_LIMIT)  # decompression bomb guard
        if self._decoded_bytes > limit:
            self._errors.append(f"decoded stream over {limit} bytes, rest not read")
            self._decoder = None
            return None
        return out

    def _parse(self, chunk: bytes, now: float | None) -> None:
        """Decode and frame one chunk."""
        if self._framer is None:
            return
        if self._decoder is not None:
            decoded = self._decode(chunk)
            if decoded is None:
                self._framer = None
                return
            chunk = decoded
        self._frame(chunk, now)

    def _frame(self, text: bytes, now: float | None) -> None:
        framer = self._framer
        if framer is None:
            return
        on_event = self.reader.on_event
        for name, data in framer.feed(text):
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
        self.drain()
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
