"""Framers and the stream observer: every split point gives the same result."""

from __future__ import annotations

import random
import struct
import zlib

import pytest

from aistats_engine.wire.framing import AWSEventStreamFramer, NDJSONFramer, SSEFramer, framer_for
from aistats_engine.observer import StreamObserver
from fixtures import ANTHROPIC, GEMINI, OLLAMA, OPENAI_CHAT, RESPONSES, gzip_per_event, zstd

STREAMS = {
    "openai_chat": ("chat_completions", "text/event-stream", None, OPENAI_CHAT),
    "anthropic_crlf": ("messages", "text/event-stream", None, ANTHROPIC),
    "responses": ("responses", "text/event-stream", None, RESPONSES),
    "gemini_crlf": ("generate_content", "text/event-stream", None, GEMINI),
    "ollama_ndjson": ("ollama_chat", "application/x-ndjson", None, OLLAMA),
    "openai_gzip": ("chat_completions", "text/event-stream", "gzip", gzip_per_event(OPENAI_CHAT)),
    "anthropic_zstd": ("messages", "text/event-stream", "zstd", zstd(ANTHROPIC)),
}


def observe(api, ctype, enc, chunks, max_body=1 << 20):
    """Read chunk by chunk: every chunk is read (``drain``) before the next arrives, so the
    framer's partial event must survive between feeds — the incremental path of a live stream.
    ``max_body=1`` reads past the body cap (no copy, each chunk parsed as it comes)."""
    obs = StreamObserver(api, framer_for(ctype)(), enc, t_start=0.0, max_body=max_body)
    for i, c in enumerate(chunks):
        obs.feed(c, now=0.001 * (i + 1))
        obs.drain()
    parsed = obs.finish(complete=True)
    parsed.problems = [p for p in parsed.problems if p.kind != "body_too_large"]
    return parsed, obs.timing().content_events


@pytest.mark.parametrize("name", list(STREAMS))
def test_every_split_point_same_result(name):
    api, ctype, enc, body = STREAMS[name]
    want = observe(api, ctype, enc, [body])
    assert want[0].details == []
    assert want[1] > 0
    for i in range(1, len(body)):
        for max_body in (1 << 20, 1):
            assert observe(api, ctype, enc, [body[:i], body[i:]], max_body) == want, \
                f"split at {i}, max_body {max_body}"


@pytest.mark.parametrize("name", list(STREAMS))
def test_random_multi_splits_and_single_bytes(name):
    api, ctype, enc, body = STREAMS[name]
    want = observe(api, ctype, enc, [body])
    rng = random.Random(1234)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(body)), k=min(8, len(body) - 1)))
        chunks = [body[a:b] for a, b in zip([0] + cuts, cuts + [len(body)])]
        assert observe(api, ctype, enc, chunks) == want
    assert observe(api, ctype, enc, [bytes([b]) for b in body]) == want


def test_sse_separators_multiline_comments():
    f = SSEFramer()
    evs = f.feed(b": comment\n\nevent: x\ndata: a\ndata:b\n\ndata: c\r\rdata: d\r\n\r\nid: 1\nretry: 5\n\n")
    assert [tuple(e) for e in evs] == [("x", b"a\nb"), (None, b"c"), (None, b"d")]
    assert f.pending() == b""


def test_sse_crlf_split_between_cr_and_lf():
    f = SSEFramer()
    assert f.feed(b"data: 1\r\n\r") == []
    assert [e[1] for e in f.feed(b"\ndata: 2\r\n\r\n")] == [b"1", b"2"]


def test_sse_final_event_without_blank_line_counts_at_close():
    f = SSEFramer()
    assert f.feed(b"data: [DONE]\n") == []
    assert [e[1] for e in f.close()] == [b"[DONE]"]


def test_oversized_event_dropped_whole_whatever_the_chunking():
    body = b"data: " + b"x" * 100 + b"\n\ndata: {\"a\":1}\n\n"
    one = SSEFramer(max_event=50)
    got_one = [e[1] for e in one.feed(body)]
    many = SSEFramer(max_event=50)
    got_many = [e[1] for i in range(0, len(body), 9) for e in many.feed(body[i:i + 9])]
    assert got_one == got_many == [b'{"a":1}']
    assert one.oversized == many.oversized == 1


@pytest.mark.parametrize("kind", ["sse", "ndjson"])
def test_holding_an_open_events_chunks_changes_nothing(kind):
    """Chunks of an event kept open are held unjoined (``_held``: a large event must not be
    copied per chunk). Against the same framer that joins every chunk at once, after each
    chunk: the same events so far (by ``feed``, and by ``feed_data``/``feed_positions``
    falling back to ``feed`` as the observer does), with the same positions, and at the end the
    same pending bytes, close and oversized count. Streams mix CRLF and bare CR, comments,
    named and multi-line events, events over ``max_event``, and long events in many chunks."""
    rng = random.Random(11)
    cls = SSEFramer if kind == "sse" else NDJSONFramer
    joining = type("Joining", (cls,), {"_held": lambda self, data, end: False})
    if kind == "sse":
        pieces = [b"data: {\"a\":1}\n\n", b"data: " + b"x" * 150 + b"\n\n", b"event: e\ndata: y\n\n",
                  b": ping\n\n", b"data: l1\ndata: l2\n\n", b"data: z\r\n\r\n", b"data: w\r\r",
                  b"data: " + b"y" * 70 + b"\n\n", b"\n", b"data: " + b"q" * 60]
    else:
        pieces = [b'{"a":1}\n', b'{"b":"' + b"x" * 150 + b'"}\n', b"\n", b'{"c":2}\r\n',
                  b'{"d":"' + b"y" * 70 + b'"}\n', b'{"e":"' + b"q" * 60]
    held = 0
    for _ in range(400):
        body = b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
        cuts = sorted(set(rng.sample(range(1, len(body)), k=min(len(body) - 1, rng.randint(1, 40)))))
        chunks = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)])]
        for method in ("feed", "feed_data", "feed_positions"):
            if not hasattr(cls, method):
                continue
            f, ref = cls(max_event=100), joining(max_event=100)
            for c in chunks:
                got, want = getattr(f, method)(c), getattr(ref, method)(c)
                if got is None or want is None:  # not taken: the observer falls back to feed
                    got = f.feed(c) if got is None else got
                    want = ref.feed(c) if want is None else want
                    if isinstance(got, tuple):
                        got = [(None, e) for e in got[0]]
                    if isinstance(want, tuple):
                        want = [(None, e) for e in want[0]]
                assert got == want, (method, chunks)
                held += bool(f._open)
            assert (f.pending(), f.oversized) == (ref.pending(), ref.oversized)
            assert f.close() == ref.close()
    assert held > 1000  # the held path was taken


def test_ndjson_framer():
    f = NDJSONFramer()
    assert [e[1] for e in f.feed(b'{"a":1}\n\n{"b"')] == [b'{"a":1}']
    assert [e[1] for e in f.feed(b':2}\r\n')] == [b'{"b":2}']


def _aws_raw(headers: bytes, payload: bytes) -> bytes:
    """A frame with correct lengths and CRCs around whatever header block is given."""
    total = 12 + len(headers) + len(payload) + 4
    prelude = struct.pack(">II", total, len(headers))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    msg = prelude + headers + payload
    return msg + struct.pack(">I", zlib.crc32(msg))


def _aws_string_header(name: bytes, value: bytes) -> bytes:
    return bytes([len(name)]) + name + b"\x07" + struct.pack(">H", len(value)) + value


def _aws_frame(event_type: str, payload: bytes) -> bytes:
    return _aws_raw(_aws_string_header(b":event-type", event_type.encode()), payload)


def test_aws_event_stream_frames_and_converse_usage():
    body = (_aws_frame("messageStart", b'{"role":"assistant"}')
            + _aws_frame("contentBlockDelta", b'{"contentBlockIndex":0,"delta":{"text":"Hi"}}')
            + _aws_frame("messageStop", b'{"stopReason":"end_turn"}')
            + _aws_frame("metadata", b'{"usage":{"inputTokens":5,"outputTokens":2,"cacheReadInputTokens":3},"metrics":{"latencyMs":100}}'))
    for step in (len(body), 7, 1):
        obs = StreamObserver("converse", AWSEventStreamFramer(), None, 0.0)
        for i in range(0, len(body), step):
            obs.feed(body[i:i + step], 0.01)
        p = obs.finish(complete=True)
        assert (p.usage.input, p.usage.output, p.usage.cached, p.finish_reason) == (8, 2, 3, "end_turn")
        assert obs.timing().content_events == 1
        assert p.details == []


def test_framer_for_content_types():
    assert framer_for("text/event-stream; charset=utf-8") is SSEFramer
    assert framer_for("application/x-ndjson") is NDJSONFramer
    assert framer_for("application/vnd.amazon.eventstream") is AWSEventStreamFramer
    assert framer_for("application/json") is None
    assert framer_for(None) is None


@pytest.mark.parametrize("drain_bytes", [8 << 10, 64, 1])
@pytest.mark.parametrize("name", list(STREAMS))
def test_batched_reading_times_events_like_chunk_by_chunk(name, drain_bytes, monkeypatch):
    """The live path keeps chunks and reads them in batches (event positions → chunk times);
    past the cap it reads chunk by chunk. All must time every event alike, also when the body is
    taken for the flow (``take_body``, which shrinks the kept copy to the unread chunks) before
    the rest is read."""
    from aistats_engine import observer
    monkeypatch.setattr(observer, "DRAIN_BYTES", drain_bytes)
    api, ctype, enc, body = STREAMS[name]
    rng = random.Random(7)
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(body)), k=min(12, len(body) - 1)))
        chunks = [body[a:b] for a, b in zip([0] + cuts, cuts + [len(body)])]
        results = []
        # buffered whole reading / chunk by chunk from the start / switching part way
        for max_body, take in ((1 << 20, False), (1 << 20, True), (1, True),
                               (len(body) // 3, False), (len(body) // 3, True)):
            obs = StreamObserver(api, framer_for(ctype)(), enc, t_start=0.0, max_body=max_body)
            scheduled = False  # as the addon does: one drain per loop turn, rescheduled if more
            for i, c in enumerate(chunks):
                scheduled |= obs.feed(c, now=0.001 * (i + 1))
                if scheduled:
                    scheduled = obs.drain(limit=drain_bytes * 2)
            if take:
                kept = obs.take_body()
                assert kept == (body if max_body > len(body) else None)
                if kept is not None:
                    assert obs.bytes_seen <= len(body)  # the unread chunks only
            parsed = obs.finish(complete=True)
            parsed.problems = [p for p in parsed.problems if "not saved" not in p.detail]
            results.append((parsed, obs.timing()))
        for other in results[1:]:
            assert other == results[0]


AWS_OK = _aws_frame("contentBlockDelta", b'{"delta":{"text":"ok"}}')


def _aws_events(framer: AWSEventStreamFramer, body: bytes, step: int) -> list:
    return [e for i in range(0, len(body), step) for e in framer.feed(body[i:i + step])]


@pytest.mark.parametrize("headers", [
    b"\x40:event-type",  # name length points past the end
    b"\x0b:event-type",  # no type byte after the name
    _aws_string_header(b":event-type", b"xy")[:-1],  # string value runs past the end
    b"\x0b:event-type\x07\x00",  # half a value length
    b"\x0b:event-type\x0c\x00\x00",  # unknown header type
    b"\x02:a\x09" + bytes(15),  # uuid one byte short
])
def test_aws_malformed_header_block_skips_that_frame_only(headers):
    body = _aws_raw(headers, b'{"x":1}') + AWS_OK
    for step in (len(body), 5, 1):
        f = AWSEventStreamFramer()
        assert _aws_events(f, body, step) == [("contentBlockDelta", b'{"delta":{"text":"ok"}}')]
        assert f.bad_frames == 1 and f.pending() == b""


def test_aws_all_header_types_are_skipped_by_size():
    headers = (b"\x01a\x00" + b"\x01b\x01" + b"\x01c\x02x" + b"\x01d\x03xx" + b"\x01e\x04" + bytes(4)
               + b"\x01f\x05" + bytes(8) + b"\x01g\x06\x00\x02hi" + b"\x01h\x08" + bytes(8)
               + b"\x01i\x09" + bytes(16) + _aws_string_header(b":exception-type", b"throttlingException"))
    f = AWSEventStreamFramer()
    assert f.feed(_aws_raw(headers, b"{}")) == [("throttlingException", b"{}")]
    assert f.bad_frames == 0


def test_aws_headers_longer_than_the_frame_skip_that_frame_only():
    frame = bytearray(_aws_frame("messageStart", b"{}"))
    frame[4:8] = struct.pack(">I", len(frame))  # header length past the message CRC
    frame[8:12] = struct.pack(">I", zlib.crc32(frame[:8]))
    frame[-4:] = struct.pack(">I", zlib.crc32(frame[:-4]))
    f = AWSEventStreamFramer()
    assert [e[0] for e in f.feed(bytes(frame) + AWS_OK)] == ["contentBlockDelta"]
    assert f.bad_frames == 1


def test_aws_bad_message_crc_skips_that_frame_and_reads_the_next():
    bad = bytearray(_aws_frame("messageStart", b'{"role":"assistant"}'))
    bad[-6] ^= 0x01  # a payload byte: prelude still fine, message CRC not
    body = bytes(bad) + AWS_OK + AWS_OK
    for step in (len(body), 3, 1):
        f = AWSEventStreamFramer()
        assert [e[0] for e in _aws_events(f, body, step)] == ["contentBlockDelta"] * 2
        assert f.bad_frames == 1


def test_aws_bad_prelude_drops_the_buffer():
    bad = bytearray(AWS_OK)
    bad[1] ^= 0x01  # total length, so the prelude CRC fails: no way to find the next frame
    f = AWSEventStreamFramer()
    assert f.feed(bytes(bad) + AWS_OK) == []
    assert f.bad_frames == 1 and f.pending() == b""


def test_aws_absurd_length_is_dropped_not_buffered():
    f = AWSEventStreamFramer(max_event=1000)
    big = _aws_frame("x", b"a" * 2000)
    assert f.feed(big[:500]) == [] and f.pending() == b""
    assert f.bad_frames == 1


def test_aws_truncated_prelude_waits_then_reads():
    f = AWSEventStreamFramer()
    assert f.feed(AWS_OK[:11]) == [] and f.pending() == AWS_OK[:11]
    assert f.feed(AWS_OK[11:20]) == [] and f.pending() == AWS_OK[:20]
    assert [e[0] for e in f.feed(AWS_OK[20:])] == ["contentBlockDelta"]
    f = AWSEventStreamFramer()
    f.feed(AWS_OK[:7])
    assert f.close() == [] and f.pending() == AWS_OK[:7]  # a stream that ended mid-prelude
    assert f.bad_frames == 0


def _aws_fuzz_body(rng: random.Random) -> bytes:
    frames = [_aws_frame(rng.choice(["messageStart", "contentBlockDelta", "metadata"]),
                         rng.randbytes(rng.randrange(0, 40))) for _ in range(rng.randrange(1, 5))]
    return b"".join(frames)


def _aws_feed_fuzzed(body: bytes, rng: random.Random, max_event: int) -> None:
    f = AWSEventStreamFramer(max_event=max_event)
    i = 0
    while i < len(body):
        n = rng.randrange(1, 64)
        for name, payload in f.feed(body[i:i + n]):
            assert name is None or isinstance(name, str)
            assert isinstance(payload, bytes)
        assert len(f.pending()) <= max(max_event, 11)
        i += n
    f.close()


def test_aws_fuzz_random_bytes_and_mutations_never_raise():
    rng = random.Random(2024)
    for _ in range(2000):
        max_event = rng.choice([64, 4 << 20])
        _aws_feed_fuzzed(rng.randbytes(rng.randrange(0, 300)), rng, max_event)
        body = bytearray(_aws_fuzz_body(rng))
        for _ in range(rng.randrange(1, 4)):
            op = rng.randrange(3)
            pos = rng.randrange(len(body))
            if op == 0:
                body[pos] = rng.randrange(256)
            elif op == 1:
                del body[pos:pos + rng.randrange(1, 8)]
            else:
                body[pos:pos] = rng.randbytes(rng.randrange(1, 8))
        _aws_feed_fuzzed(bytes(body), rng, max_event)


def test_aws_fuzz_header_blocks_with_valid_crcs_never_raise():
    """Random header blocks behind correct CRCs: only the header parser stands between them
    and an exception."""
    rng = random.Random(77)
    good = _aws_string_header(b":event-type", b"metadata")
    for _ in range(3000):
        headers = bytearray(good + rng.choice([b"", good]))
        for _ in range(rng.randrange(1, 4)):
            if not headers:
                break
            pos = rng.randrange(len(headers))
            if rng.random() < 0.7:
                headers[pos] = rng.randrange(256)
            else:
                del headers[pos:]
        if rng.random() < 0.3:
            headers = bytearray(rng.randbytes(rng.randrange(0, 40)))
        f = AWSEventStreamFramer()
        evs = f.feed(_aws_raw(bytes(headers), b"{}") + AWS_OK)
        assert evs[-1][0] == "contentBlockDelta"  # the next frame is always read
        assert len(evs) + f.bad_frames == 2
