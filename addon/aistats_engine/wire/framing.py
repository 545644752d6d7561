"""Incremental framers: turn a byte stream split anywhere into whole events.

mitmproxy hands the stream callable whatever the transport delivered (one HTTP chunk, one
socket read, one DATA frame), so event boundaries must be found here. Each framer keeps at
most one partial event; a partial event larger than ``max_event`` is dropped and counted,
so a broken upstream cannot grow memory without bound.
"""

from __future__ import annotations

import struct
import zlib
from itertools import accumulate, repeat
from operator import add


# One framed event: the SSE ``event:`` name (or None) and its data payload. A plain tuple:
# framing runs once per event on the proxy's hot path.
Event = tuple[str | None, bytes]


class _TextFramer:
    """State shared by the text framers: at most one partial event, bounded by ``max_event``."""

    __slots__ = ("_buf", "_open", "_open_len", "max_event", "oversized", "_skipping")

    def __init__(self, max_event: int = 4 << 20) -> None:
        self._buf = b""
        # Later pieces of the event kept in ``_buf``, not joined to it yet (``_held``); None
        # when there are none (most streams: one list fewer per open stream).
        self._open: list[bytes] | None = None
        self._open_len = 0
        self.max_event = max_event
        self.oversized = 0
        self._skipping = False

    def pending(self) -> bytes:
        """Bytes of an unterminated event (a stream that ended mid-event)."""
        self._join()
        return self._buf

    def _held(self, data: bytes, end: bytes) -> bool:
        """Keep ``data`` as one more piece of the event being kept, without joining it, when it
        cannot end that event: no ``end`` in it nor across the join, no carriage return, and
        the event within ``max_event``. Otherwise (False) the pieces held so far are joined to
        ``_buf``, which then holds all that is kept. Joining each chunk of a large event (a
        streamed image: megabytes of base64) copied and searched the whole event again per
        chunk. Processing the joined pieces later gives what processing each at once would
        have: none of them completes an event, and the framers give the same events however a
        stream is cut."""
        if not self._holds(data, end):
            self._join()
            return False
        if self._open is None:
            self._open = [data]
        else:
            self._open.append(data)
        self._open_len += len(data)
        return True

    def _holds(self, data: bytes, end: bytes) -> bool:
        """Whether ``data`` can be held (``_held``)."""
        buf = self._buf
        if (not buf or self._skipping or end in data or b"\r" in data
                or len(buf) + self._open_len + len(data) > self.max_event):
            return False
        last = self._open[-1] if self._open else buf
        if last[-1:] == b"\r":  # a CR kept back (half a CRLF?): the normal path decides
            return False
        k = len(end) - 1
        return not (k and end in last[-k:] + data[:k])

    def _join(self) -> None:
        """The held pieces joined to ``_buf``: one copy for all of them."""
        if self._open is not None:
            self._buf = b"".join([self._buf, *self._open])
            self._open = None
            self._open_len = 0

    def at_boundary(self) -> bool:
        """Between two events: nothing kept, nothing being skipped."""
        return not self._buf and not self._skipping


class SSEFramer(_TextFramer):
    """Server-Sent Events: events end at a blank line (``\\n\\n``, ``\\r\\n\\r\\n``, ``\\r\\r``).

    ``data:`` with or without a space, multi-line ``data:`` joined with ``\\n``, comments and
    ``id:``/``retry:`` fields ignored, as the WHATWG EventSource parser does.
    """

    __slots__ = ()

    def feed(self, data: bytes) -> list[Event]:
        if self._held(data, b"\n\n"):
            return []
        buf = self._buf + data if self._buf else data
        if b"\r" in buf:
            # A trailing CR may be the first half of a CRLF split across chunks: keep it back.
            if buf.endswith(b"\r"):
                buf, tail = buf[:-1], b"\r"
            else:
                tail = b""
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n") + tail
        parts = buf.split(b"\n\n")
        self._buf = _keep_rest(self, parts, len(buf))
        return [ev for block in parts if (ev := _parse_sse_block(block)) is not None]

    def feed_positions(self, data: bytes) -> list[tuple[str | None, bytes, int]] | None:
        """``feed`` with each event's position in ``data``: the offset of the byte that
        completed it (the second newline), i.e. the byte whose arrival made ``feed`` emit it.
        None, with nothing consumed, when positions would not map back to the raw bytes
        (carriage returns are normalised) — then feed the chunks one by one."""
        if self._held(data, b"\n\n"):
            return []
        if self._skipping or b"\r" in data or b"\r" in self._buf:
            return None
        shift = len(self._buf)
        return [(ev[0], ev[1], end - shift)
                for block, end in _blocks(self, self._buf + data, b"\n\n")
                if (ev := _parse_sse_block(block)) is not None]

    def feed_data(self, data: bytes) -> tuple[list[bytes], list[int]] | None:
        """``feed_positions`` for the common stream, where every event is one ``data: `` line
        (OpenAI-compatible chat and completions, unnamed Responses events, Gemini): the events'
        data and positions, found with whole-batch operations instead of a loop per event.
        None, with nothing consumed, for any other batch (names, comments, multi-line data,
        empty events, carriage returns, possibly oversized events)."""
        if self._held(data, b"\n\n"):
            return [], []
        if self._skipping:
            return None
        shift = len(self._buf)
        text = self._buf + data if shift else data
        if len(text) > self.max_event or b"\r" in text:
            return None
        cut = text.rfind(b"\n\n")
        if cut < 0:
            self._buf = text
            return [], []
        rest = text[cut + 2:]  # the unterminated event
        # Whole single-line events split at newlines into [event, b"", event, b"", ...].
        lines = text.split(b"\n")
        if rest:
            del lines[-1 - rest.count(b"\n"):]
        else:
            lines.pop()
        events = lines[::2]
        if (lines[1::2].count(b"") != len(events)
                or not all(map(bytes.startswith, events, repeat(b"data: ")))):
            return None
        self._buf = rest
        # Event i ends at the second newline after it: its length so far, plus two per event.
        positions = list(map(add, accumulate(map(len, events)), range(1 - shift, 2 * len(events), 2)))
        return [e[6:] for e in events], positions

    def close(self) -> list[Event]:
        """Flush at end of stream: a final event without its blank line still counts."""
        self._join()
        rest, self._buf = self._buf, b""
        rest = rest.replace(b"\r", b"")
        if not rest.strip():
            return []
        ev = _parse_sse_block(rest)
        return [ev] if ev is not None else []


def _keep_rest(framer: _TextFramer, parts: list[bytes], size: int) -> bytes:
    """Pop the unterminated tail off ``parts`` and return what to keep of it.

    Events over ``max_event`` bytes are dropped whole, whether they arrive in one piece or in
    many (then the framer skips to the next boundary), so chunking never changes the result.
    """
    rest = parts.pop()
    if framer._skipping and parts:
        parts.pop(0)  # the tail of the oversized event
        framer._skipping = False
    if framer._skipping:
        return b""
    if size <= framer.max_event:  # the common case: nothing here can be oversized
        return rest
    big = [p for p in parts if len(p) > framer.max_event]
    if big:
        framer.oversized += len(big)
        parts[:] = [p for p in parts if len(p) <= framer.max_event]
    if len(rest) > framer.max_event:
        framer.oversized += 1
        framer._skipping = True
        return b""
    return rest


def _blocks(framer: _TextFramer, data: bytes,
            sep: bytes) -> list[tuple[bytes, int]]:
    """Split like ``feed`` + ``_keep_rest`` do, keeping where each block ended."""
    out: list[tuple[bytes, int]] = []
    start = 0
    find = data.find
    step = len(sep)
    limit = framer.max_event
    while (i := find(sep, start)) >= 0:
        if i - start > limit:
            framer.oversized += 1
        else:
            out.append((data[start:i], i + step - 1))
        start = i + step
    rest = data[start:]
    if len(rest) > framer.max_event:
        framer.oversized += 1
        framer._skipping = True
        rest = b""
    framer._buf = rest
    return out


def _parse_sse_block(block: bytes) -> Event | None:
    if block.startswith(b"data: ") and b"\n" not in block:  # the common case, fast
        return (None, block[6:])
    name: str | None = None
    data: list[bytes] = []
    for line in block.split(b"\n"):
        if not line or line[0] == 0x3A:  # empty or ":" comment
            continue
        field, sep, value = line.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        if field == b"data":
            data.append(value)
        elif field == b"event":
            name = value.decode("utf-8", "replace")
    if not data and name is None:
        return None
    return (name, b"\n".join(data))


class NDJSONFramer(_TextFramer):
    """Newline-delimited JSON (Ollama): one event per non-empty line."""

    __slots__ = ()

    def feed(self, data: bytes) -> list[Event]:
        if self._held(data, b"\n"):
            return []
        buf = self._buf + data if self._buf else data
        lines = buf.split(b"\n")
        self._buf = _keep_rest(self, lines, len(buf))
        return [(None, s) for line in lines if (s := line.strip())]

    def feed_positions(self, data: bytes) -> list[tuple[str | None, bytes, int]] | None:
        """Like SSEFramer.feed_positions: events of a whole body with the offset of their
        newline."""
        if self._held(data, b"\n"):
            return []
        if self._skipping:
            return None
        shift = len(self._buf)
        return [(None, s, end - shift) for line, end in _blocks(self, self._buf + data, b"\n")
                if (s := line.strip())]

    def close(self) -> list[Event]:
        self._join()
        rest, self._buf = self._buf.strip(), b""
        return [(None, rest)] if rest else []


class AWSEventStreamFramer:
    """AWS event stream (Bedrock ``application/vnd.amazon.eventstream``).

    Binary frames: total length (4), headers length (4), prelude CRC (4), headers, payload,
    message CRC (4). The event name is the ``:event-type`` header (or ``:exception-type``).

    A bad prelude (CRC mismatch, impossible length) leaves no way to find the next frame: the
    buffer is dropped. Past a good prelude the length can be trusted, so a frame with a bad
    message CRC or a malformed header block is skipped alone. Both count in ``bad_frames``.
    At most one partial frame, of at most ``max_event`` bytes, is kept between feeds.
    """

    __slots__ = ("_buf", "max_event", "oversized", "bad_frames")

    def __init__(self, max_event: int = 4 << 20) -> None:
        self._buf = bytearray()
        self.max_event = max_event
        self.oversized = 0
        self.bad_frames = 0

    def feed(self, data: bytes) -> list[Event]:
        buf = self._buf
        buf += data
        out: list[Event] = []
        crc32 = zlib.crc32
        while len(buf) >= 12:
            total, hlen, crc = struct.unpack_from(">III", buf, 0)
            if crc32(buf[:8]) != crc or total < 16 or total > self.max_event:
                # Cannot resynchronise a length-prefixed stream: drop what is buffered.
                self.bad_frames += 1
                buf.clear()
                break
            if len(buf) < total:
                break
            frame = bytes(buf[:total])
            del buf[:total]
            end = total - 4
            headers = None
            if hlen <= end - 12 and crc32(memoryview(frame)[:end]) == int.from_bytes(frame[end:]):
                headers = _aws_headers(frame[12 : 12 + hlen])
            if headers is None:
                self.bad_frames += 1
                continue
            name = headers.get(":event-type") or headers.get(":exception-type")
            out.append((name, frame[12 + hlen : end]))
        return out

    def pending(self) -> bytes:
        return bytes(self._buf)

    def close(self) -> list[Event]:
        return []


# Value sizes of the fixed-size header types: bool true, bool false, byte, short, int, long,
# timestamp, uuid. Types 6 (bytes) and 7 (string) carry a 2-byte length.
_AWS_FIXED = {0: 0, 1: 0, 2: 1, 3: 2, 4: 4, 5: 8, 8: 8, 9: 16}


def _aws_headers(raw: bytes) -> dict[str, str] | None:
    """The string-typed headers (type 7); None when the block is malformed (a length running
    past its end, an unknown type), which would otherwise read garbage or raise."""
    out: dict[str, str] = {}
    i, n = 0, len(raw)
    while i < n:
        j = i + 1 + raw[i]  # the type byte, after the name
        if j >= n:
            return None
        htype = raw[j]
        if htype == 7 or htype == 6:
            if j + 3 > n:
                return None
            k = j + 3 + (raw[j + 1] << 8 | raw[j + 2])  # the end of the value
            if k > n:
                return None
            if htype == 7:
                out[raw[i + 1 : j].decode("utf-8", "replace")] = raw[j + 3 : k].decode(
                    "utf-8", "replace")
            i = k
        elif (size := _AWS_FIXED.get(htype)) is not None:
            i = j + 1 + size
            if i > n:
                return None
        else:
            return None
    return out


Framer = SSEFramer | NDJSONFramer | AWSEventStreamFramer

STREAM_CONTENT_TYPES = {
    "text/event-stream": SSEFramer,
    "application/x-ndjson": NDJSONFramer,
    "application/ndjson": NDJSONFramer,
    "application/jsonl": NDJSONFramer,
    "application/vnd.amazon.eventstream": AWSEventStreamFramer,
}


def framer_for(content_type: str | None) -> type[Framer] | None:
    """The framer class for a streamed content type, or None for a whole-body response."""
    if not content_type:
        return None
    return STREAM_CONTENT_TYPES.get(content_type.split(";", 1)[0].strip().lower())
