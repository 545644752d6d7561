"""Framers and the stream observer: every split point gives the same result."""

from __future__ import annotations

import random

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


def observe(api, ctype, enc, chunks):
    obs = StreamObserver(api, framer_for(ctype)(), enc, t_start=0.0)
    for i, c in enumerate(chunks):
        obs.feed(c, now=0.001 * (i + 1))
    parsed = obs.finish(complete=True)
    return parsed, obs.timing().content_events


@pytest.mark.parametrize("name", list(STREAMS))
def test_every_split_point_same_result(name):
    api, ctype, enc, body = STREAMS[name]
    want = observe(api, ctype, enc, [body])
    assert want[0].parse_errors == []
    assert want[1] > 0
    for i in range(1, len(body)):
        assert observe(api, ctype, enc, [body[:i], body[i:]]) == want, f"split at {i}"


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


def test_ndjson_framer():
    f = NDJSONFramer()
    assert [e[1] for e in f.feed(b'{"a":1}\n\n{"b"')] == [b'{"a":1}']
    assert [e[1] for e in f.feed(b':2}\r\n')] == [b'{"b":2}']


def _aws_frame(event_type: str, payload: bytes) -> bytes:
    import struct
    import zlib
    name = b":event-type"
    value = event_type.encode()
    headers = bytes([len(name)]) + name + b"\x07" + struct.pack(">H", len(value)) + value
    total = 12 + len(headers) + len(payload) + 4
    prelude = struct.pack(">II", total, len(headers))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    msg = prelude + headers + payload
    return msg + struct.pack(">I", zlib.crc32(msg))


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
        assert (p.input_tokens, p.output_tokens, p.cached_tokens, p.finish_reason) == (8, 2, 3, "end_turn")
        assert obs.timing().content_events == 1
        assert p.parse_errors == []


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
    past the cap it reads chunk by chunk. All must time every event alike."""
    from aistats_engine import observer
    monkeypatch.setattr(observer, "DRAIN_BYTES", drain_bytes)
    api, ctype, enc, body = STREAMS[name]
    rng = random.Random(7)
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(body)), k=min(12, len(body) - 1)))
        chunks = [body[a:b] for a, b in zip([0] + cuts, cuts + [len(body)])]
        results = []
        # buffered whole reading / chunk by chunk from the start / switching part way
        for max_body in (1 << 20, 1, len(body) // 3):
            obs = StreamObserver(api, framer_for(ctype)(), enc, t_start=0.0, max_body=max_body)
            scheduled = False  # as the addon does: one drain per loop turn, rescheduled if more
            for i, c in enumerate(chunks):
                scheduled |= obs.feed(c, now=0.001 * (i + 1))
                if scheduled:
                    scheduled = obs.drain(limit=drain_bytes * 2)
            parsed = obs.finish(complete=True)
            parsed.parse_errors = [e for e in parsed.parse_errors if "not saved" not in e]
            results.append((parsed, obs.timing()))
        for other in results[1:]:
            assert other == results[0]
