"""Per-response reading: the live stream observer and the whole-body parser.

Both end in a ``Parsed``: everything the response body told us, in plain types, so it can be
stored in ``flow.metadata`` when the body itself cannot be (a capped stream). The live observer
also keeps the chunk clock (``StreamTiming``), which offline replay cannot recompute and so
reads back from the flow's metadata. What could not be read becomes a ``Problem`` (a fixed kind
and its text), never an exception: the request still gets its record.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from itertools import accumulate, chain, compress, islice, repeat
from typing import Any

import orjson

from .record import errors
from .record.problems import (BODY_TOO_LARGE, DECODED_TOO_LARGE, DECOMPRESSION, EMPTY_BODY,
                              EVENT_TOO_LARGE, INVALID_FRAME, INVALID_JSON, INVALID_USAGE,
                              TRUNCATED, Problem)
from .wire.decoding import DecodedTooLarge, DecodeError, Decoder, decode_body, decoder_for
from .wire.format import WireFormat
from .wire.formats import by_api
from .wire.framing import AWSEventStreamFramer, Framer, NDJSONFramer, SSEFramer
from .wire.reader import ResponseState
from .wire.usage import Speeds, Usage, resolve

DEFAULT_MAX_BODY = 16 << 20
DEFAULT_MAX_CHUNK_TIMES = 10_000
DEFAULT_MAX_EVENT = 4 << 20
# Kept bytes that make a batch worth reading before the stream ends, and the most one drain
# call reads (about 60 events, ~0.1 ms) so other connections wait little for us.
DRAIN_BYTES = 4 << 10
DRAIN_LIMIT = 16 << 10
MIN_STREAM_DECODED = 128 << 20  # a stream may decode to 8 × max_body, and at least this


def stream_decoded_limit(max_body: int) -> int:
    """The decoded-size bound of a stream (read incrementally, never held whole). Whole bodies,
    request and response, are decoded only up to ``max_body``: they are held and parsed."""
    return max(max_body * 8, MIN_STREAM_DECODED)


def _fmt(fmt: WireFormat | str | None) -> WireFormat:
    if isinstance(fmt, WireFormat):
        return fmt
    return by_api(fmt or "chat_completions")


@dataclass(slots=True)
class Parsed:
    """Body-derived record facts (round-trips through flow metadata as plain types)."""

    usage: Usage = field(default_factory=Usage)
    usage_source: str = "missing"
    speeds: Speeds = field(default_factory=Speeds)
    finish_reason: str | None = None
    response_model: str | None = None
    chat_id: str | None = None
    stream_error: str | None = None
    stream_error_type: str | None = None
    body_error: str | None = None  # provider message in a whole body; used for non-2xx only
    stream_complete: bool = False  # the stream reached its format's end event
    hints: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    # A token-counting endpoint's answer (operation ``count_tokens``): a quote, never usage.
    counted_tokens: int | None = None
    # A Responses object's ``status`` (queued, in_progress, completed, failed, cancelled,
    # incomplete): background responses are polled, so their usage is counted once, at the
    # terminal status of ``chat_id``.
    response_status: str | None = None

    @property
    def details(self) -> list[str]:
        """The problems' texts (what ``parse_error`` joins)."""
        return [p.detail for p in self.problems]

    def to_plain(self) -> dict[str, Any]:
        u, s = self.usage, self.speeds
        return {
            "usage": [u.input, u.output, u.cached, u.cache_creation, u.reasoning, u.invalid],
            "usage_source": self.usage_source,
            "speeds": [s.prompt_per_second, s.tokens_per_second, s.server_duration_ms,
                       s.draft_tokens, s.draft_accepted_tokens],
            "finish_reason": self.finish_reason, "response_model": self.response_model,
            "chat_id": self.chat_id, "stream_error": self.stream_error,
            "stream_error_type": self.stream_error_type, "body_error": self.body_error,
            "stream_complete": self.stream_complete, "hints": list(self.hints),
            "problems": [list(p) for p in self.problems],
            "counted_tokens": self.counted_tokens, "response_status": self.response_status,
        }

    @classmethod
    def from_plain(cls, d: dict[str, Any]) -> Parsed:
        return cls(
            usage=Usage(*d["usage"]), usage_source=d["usage_source"], speeds=Speeds(*d["speeds"]),
            finish_reason=d["finish_reason"], response_model=d["response_model"],
            chat_id=d["chat_id"], stream_error=d["stream_error"],
            stream_error_type=d["stream_error_type"], body_error=d["body_error"],
            stream_complete=d["stream_complete"], hints=list(d["hints"]),
            problems=[Problem(k, t) for k, t in d["problems"]],
            counted_tokens=d.get("counted_tokens"), response_status=d.get("response_status"))


def _parsed_from(state: ResponseState, problems: list[Problem]) -> Parsed:
    usage, source, speeds = resolve(state.usage, state.stats)
    if usage.invalid:
        problems.append(Problem(INVALID_USAGE, "invalid token count in usage (negative, "
                                               "fractional or too large): left out"))
    if state.counted_invalid:
        problems.append(Problem(INVALID_USAGE, "invalid counted token count (negative, "
                                               "fractional or too large): left out"))
    return Parsed(
        usage=usage, usage_source=source, speeds=speeds, finish_reason=state.finish_reason,
        response_model=state.response_model, chat_id=state.chat_id,
        stream_error=state.error, stream_error_type=state.error_type,
        hints=sorted(state.hints), problems=problems, stream_complete=state.complete,
        counted_tokens=state.counted_tokens, response_status=state.response_status,
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
                 "_capped_bytes",
                 "_problems", "_first", "_last", "_times", "_content_events")

    def __init__(self, fmt: WireFormat | str | None, framer: Framer,
                 content_encoding: str | None, t_start: float, max_body: int = DEFAULT_MAX_BODY,
                 max_chunk_times: int = DEFAULT_MAX_CHUNK_TIMES) -> None:
        self.reader = ResponseState(_fmt(fmt))
        self._framer: Framer | None = framer
        self._problems: list[Problem] = []
        self._decoder: Decoder | None = None
        try:
            self._decoder = decoder_for(content_encoding, stream_decoded_limit(max_body))
        except DecodeError as e:
            self._problems.append(_decode_problem(e))
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
        self._capped_bytes = 0  # bytes seen once past the cap (no copy to measure)
        # The chunk clock, as raw time.time() values; turned into ms offsets once, in timing().
        self._first: float | None = None
        self._last: float | None = None
        # Raw doubles side by side, not float objects scattered over the heap as the chunks
        # came: reading them at the end of a long stream then costs no cache miss per entry.
        self._times = array("d")
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
            self._capped_bytes += len(chunk)
            self._parse(chunk, now)
            return False
        size = len(buf) + len(chunk)
        if size > self._max_body:  # over the cap: no copy, chunk by chunk
            self.drain()
            self._buf = None
            self.body_capped = True
            self._capped_bytes = size
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
            with memoryview(self._buf) as view:  # one copy of the batch, not two
                batch = bytes(view[start:ends[n - 1]])
            self._read_whole(batch, times[:n], [e - start for e in ends[:n]])
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
        sse = framer.__class__ is SSEFramer
        if (sse and framer.at_boundary() and text.endswith(b"\n\n")
                and len(text) <= framer.max_event and (n := self.reader.content_run(text))):
            self._time_run(n, text, times, ends)  # all content: no event framed on its own
        elif sse and (found := framer.feed_data(text)) is not None:
            datas, positions = found
            self._time_content(self.reader.on_data(datas), positions, times, ends)
        elif isinstance(framer, (SSEFramer, NDJSONFramer)) and (
                events := framer.feed_positions(text)) is not None:
            on_event = self.reader.on_event
            self._time_content([on_event(name, data) for name, data, _ in events],
                               [pos for _, _, pos in events], times, ends)
        else:
            if parts is None:
                parts = [body[start:end] for start, end in zip(starts, ends)]
            for part, now in zip(parts, times):
                self._frame(part, now)
        if decode_failed:
            self._framer = None  # nothing after the failure can be read

    def _time_content(self, verdicts: list[bool], positions: list[int], times: list[float],
                      ends: list[int]) -> None:
        """Count the content events of a batch and time each by the chunk holding the byte
        that completed it (``ends``: where each chunk ends, ``times``: when it came)."""
        found = verdicts.count(True)
        if not found:
            return
        self._content_events += found
        room = self._max_times - len(self._times)
        if room > 0:
            last = ends[-1] - 1  # an event completes inside the batch; clamp all the same
            at = compress(positions if positions[-1] <= last else
                          [min(p, last) for p in positions], verdicts)
            self._times.extend(islice(map(times.__getitem__, map(partial(bisect_right, ends), at)),
                                      room))

    def _time_run(self, n: int, text: bytes, times: list[float], ends: list[int]) -> None:
        """``_time_content`` for a batch of ``n`` one-line events that are all content: each
        timed by the chunk holding its second newline, found by counting blank lines (one per
        event) per chunk; when every chunk ends one event, the chunks' times as they are."""
        self._content_events += n
        room = self._max_times - len(self._times)
        if room <= 0:
            return
        if n == len(ends) and all(map(partial(text.endswith, b"\n\n", 0), ends)):
            self._times.extend(times[:room])
            return
        starts = [0, *(max(e - 1, 0) for e in ends[:-1])]  # a pair split over two chunks
        counts = map(text.count, repeat(b"\n\n"), starts, ends)  # counts in the second
        self._times.extend(islice(chain.from_iterable(map(repeat, times, counts)), room))

    def _decode(self, chunk: bytes) -> bytes | None:
        """Decoded bytes, or None after a failure (recorded; reading stops there)."""
        assert self._decoder is not None
        try:
            return self._decoder.feed(chunk)
        except DecodeError as e:
            self._problems.append(_decode_problem(e))
            self._decoder = None
            return None

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
            # As measured: rounding each (round() with digits) cost more than reading the event.
            content_offsets_ms=[(t - t0) * 1000 for t in self._times],
        )

    @property
    def bytes_seen(self) -> int:
        """Response body bytes received so far (as on the wire), for in-flight views."""
        return len(self._buf) if self._buf is not None else self._capped_bytes

    def take_body(self) -> bytes | None:
        """The raw body seen so far, or None when it went over the cap. What is kept for
        reading shrinks to the chunks not read yet: a stream read after its flow has gone then
        holds one copy of its body, not two."""
        buf = self._buf
        if buf is None:
            return None
        body = bytes(buf)
        start = self._read_upto
        if start:
            with memoryview(body) as view:
                self._buf = bytearray(view[start:])
            self._read_upto = 0
            self._chunk_ends = [e - start for e in self._chunk_ends]
        return body

    def finish(self, complete: bool) -> Parsed:
        """End of stream. ``complete`` is False when the stream was cut (abort, disconnect)."""
        self.drain()
        problems = self._problems
        framer = self._framer
        reader = self.reader
        if complete and self._decoder is not None and framer is not None:
            try:
                self._decoder.finish()
            except DecodeError as e:
                problems.append(_decode_problem(e))
        if framer is not None:
            if complete:
                for name, data in framer.close():
                    if reader.on_event(name, data):
                        self._content_events += 1
            elif framer.pending().strip():
                problems.append(Problem(TRUNCATED, "stream truncated"))
            if framer.oversized:
                problems.append(Problem(EVENT_TOO_LARGE, f"{framer.oversized} stream event(s) "
                                                         f"over {framer.max_event} bytes skipped"))
            if isinstance(framer, AWSEventStreamFramer) and framer.bad_frames:
                problems.append(Problem(INVALID_FRAME, f"{framer.bad_frames} invalid AWS event "
                                                       "stream frame(s) skipped"))
        if reader.invalid_events:
            problems.append(Problem(INVALID_JSON, f"invalid JSON in {reader.invalid_events} of "
                                                  f"{reader.events} stream events"))
        if self.body_capped:
            problems.append(Problem(BODY_TOO_LARGE, f"stream body over {self._max_body} bytes: "
                                                    "not saved to the flow"))
        return _parsed_from(reader, problems)


def _decode_problem(e: DecodeError) -> Problem:
    if isinstance(e, DecodedTooLarge):
        return Problem(DECODED_TOO_LARGE, f"response {e}, rest not read")
    return Problem(DECOMPRESSION, f"response decompression failed: {e}")


def parse_body(fmt: WireFormat | str | None, body: bytes | None, content_encoding: str | None,
               max_body: int = DEFAULT_MAX_BODY,
               tap: Callable[[Any], None] | None = None) -> Parsed:
    """A whole (non-streamed) response body, decoded up to ``max_body`` bytes; ``tap`` sees the
    parsed JSON (the attribute rules that read the response body)."""
    state = ResponseState(_fmt(fmt))
    if not body:
        return _parsed_from(state, [Problem(EMPTY_BODY, "empty response body")])
    # Audio bytes, plain-text transcripts: a body of such a format that is not JSON is no problem.
    opaque = state.fmt.opaque_body and not content_encoding and not _looks_json(body)
    if len(body) > max_body:
        return _parsed_from(state, [] if opaque else [
            Problem(BODY_TOO_LARGE, f"response body over {max_body} bytes, not read")])
    try:
        data = decode_body(body, content_encoding, max_body)
    except DecodeError as e:
        return _parsed_from(state, [_decode_problem(e)])
    if not data.strip():
        return _parsed_from(state, [Problem(EMPTY_BODY, "empty response body")])
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        if state.fmt.opaque_body and not _looks_json(data):
            return _parsed_from(state, [])
        return _parsed_from(state, [Problem(INVALID_JSON, "invalid JSON")])
    if tap is not None:
        tap(obj)
    state.on_body(obj)
    parsed = _parsed_from(state, [])
    parsed.body_error = errors.message_from(obj)
    return parsed


def _looks_json(data: bytes) -> bool:
    return data[:64].lstrip()[:1] in (b"{", b"[")
