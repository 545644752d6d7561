"""The live stream reading's shortcuts give what the full reading gives (issue 11).

The full reading: every chunk framed on its own (``framer.feed``) and every event parsed and read
in full (``ResponseState.fast = False``). The live path: chunks kept and read in batches, whole
batches of one-line ``data:`` events framed at once (``SSEFramer.feed_data``), parsed in one loop
with each format's short path (``ResponseState.on_data``), content events timed by the chunk that
completed them. Compared over every stream we have: the acceptance cases (llama-swap and both
Higress files), the recorded sample flows, the unit fixtures and the benchmark's own stream, each
cut into chunks several ways, with the same chunk clock.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from aistats_engine import observer
from aistats_engine.observer import StreamObserver
from aistats_engine.wire import framing, reader, templates
from aistats_engine.wire.formats import match_api
from aistats_engine.wire.framing import framer_for
from aistats_engine.wire.reader import ResponseState
from conftest import load_cases
from fixtures import ANTHROPIC, GEMINI, OLLAMA, OPENAI_CHAT, RESPONSES, gzip_per_event, zstd

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_FLOWS = ROOT / "flows" / "sample.flow"


def _bench_stream(n: int = 40) -> bytes:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import bench
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return b"".join([bench.sse_event(i) for i in range(n)] + bench.sse_tail(n))


def _case_streams() -> list[tuple[str, str, str, str | None, bytes]]:
    """(name, api, content type, encoding, body) of every streamed acceptance case."""
    out = []
    for file in ("llama_swap_cases.json", "higress_cases.json", "higress_test_cases.json"):
        for case in load_cases(file):
            headers = {k.lower(): v for k, v in case["response"]["headers"].items()}
            ctype = headers.get("content-type", "")
            if framer_for(ctype) is None:
                continue
            path = case["request"]["path"].split("?", 1)[0]
            match = match_api(case["request"].get("method", "POST"), path)
            assert match is not None, case["name"]
            out.append((f"{file}:{case['name']}", match.api, ctype,
                        headers.get("content-encoding"), case["response"]["body"].encode()))
    return out


def _flow_streams() -> list[tuple[str, str, str, str | None, bytes]]:
    """The streamed responses of the recorded sample flows."""
    from mitmproxy import io

    out = []
    with open(SAMPLE_FLOWS, "rb") as f:
        for flow in io.FlowReader(f).stream():
            resp = getattr(flow, "response", None)
            if resp is None or not resp.raw_content:
                continue
            ctype = resp.headers.get("content-type", "")
            match = match_api(flow.request.method, flow.request.path.split("?", 1)[0])
            if framer_for(ctype) is None or match is None:
                continue
            out.append((f"sample.flow:{flow.id[:8]}", match.api, ctype,
                        resp.headers.get("content-encoding"), resp.raw_content))
    return out


HOSTILE_CHAT = (  # one-line data events, but not all of them what they seem
    b'data: {"id":"c","model":"m","choices":[{"delta":{"role":"assistant","content":""}}]}\n\n'
    b'data: {"id":"c","choices":[{"delta":{"content":"a"}}]}\n\n'
    b'data: {"id":"c","choices":[{"delta":{"content":"b"}}\n\n'  # cut short: invalid JSON
    b'data: [1, 2]\n\n'  # JSON, not an object
    b'data: \n\n'  # empty data
    b'data: {"id":"c","choices":[{"delta":{"content":"x"}}],"usage":null}\n\n'
    b'data: {"id":"d","model":"m2","choices":[{"delta":{"content":"c"},"finish_reason":"stop"}]}\n\n'
    b'data: {"error":{"message":"overloaded","type":"server_error"}}\n\n'
    b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}\n\n'
    b'data: [DONE]\n\n'
)

UNIT_STREAMS = [
    ("openai_chat", "chat_completions", "text/event-stream", None, OPENAI_CHAT),
    ("openai_gzip", "chat_completions", "text/event-stream", "gzip", gzip_per_event(OPENAI_CHAT)),
    ("anthropic", "messages", "text/event-stream", None, ANTHROPIC),
    ("anthropic_zstd", "messages", "text/event-stream", "zstd", zstd(ANTHROPIC)),
    ("responses", "responses", "text/event-stream", None, RESPONSES),
    ("gemini", "generate_content", "text/event-stream", None, GEMINI),
    ("ollama", "ollama_chat", "application/x-ndjson", None, OLLAMA),
    ("hostile_chat", "chat_completions", "text/event-stream", None, HOSTILE_CHAT),
    ("bench", "chat_completions", "text/event-stream", None, _bench_stream()),
]

ALL_STREAMS = UNIT_STREAMS + _case_streams() + _flow_streams()


def _chunkings(body: bytes, seed: int) -> list[list[bytes]]:
    """Whole; one chunk per event (a paced stream); random cuts (any byte boundary)."""
    rng = random.Random(seed)
    out = [[body]]
    per_event = [p + b"\n\n" for p in body.split(b"\n\n")[:-1]]
    if per_event and b"".join(per_event) == body:
        out.append(per_event)
        # Batches of whole events that are not one chunk each (blank lines counted per
        # chunk): two events a chunk; an event's blank line split between two chunks, the
        # second holding the next event too (both completed by it); and batches cut mid-event.
        out.append([b"".join(per_event[i:i + 2]) for i in range(0, len(per_event), 2)])
        out.append([c for i in range(0, len(per_event), 2)
                    for c in (per_event[i][:-1], per_event[i][-1:] + b"".join(per_event[i + 1:i + 2]))])
        out.append([half for ev in per_event
                    for half in (ev[:len(ev) // 2], ev[len(ev) // 2:]) if half])
    for _ in range(4):
        k = min(len(body) - 1, rng.randint(2, 40))
        cuts = sorted(rng.sample(range(1, len(body)), k=k))
        out.append([body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)])])
    return out


def _full(api: str, ctype: str, enc: str | None, chunks: list[bytes]):
    """The full reading: chunk by chunk past the body cap, every event read in full."""
    obs = StreamObserver(api, framer_for(ctype)(), enc, t_start=0.0, max_body=1)
    obs.reader.fast = False
    tapped = _tap(obs)
    for i, chunk in enumerate(chunks):
        obs.feed(chunk, 0.001 * (i + 1))
    return _result(obs, tapped)


def _live(api: str, ctype: str, enc: str | None, chunks: list[bytes], limit: int,
          tap: bool = True):
    """The live path: chunks kept, read in batches of about ``limit`` bytes, as the addon
    drains them (one drain per loop turn, again while some are left). Without a tap (no
    attribute rules read the stream) plain chunks are also matched by their bytes
    (wire/templates.py)."""
    obs = StreamObserver(api, framer_for(ctype)(), enc, t_start=0.0)
    tapped = _tap(obs) if tap else []
    due = False
    for i, chunk in enumerate(chunks):
        due |= obs.feed(chunk, 0.001 * (i + 1))
        if due:
            due = obs.drain(limit)
    return _result(obs, tapped)


def _tap(obs: StreamObserver) -> list:
    """What the attribute rules' tap sees: every parsed event, in order."""
    seen: list = []
    obs.reader.tap = lambda name, obj: seen.append((name, obj))
    return seen


def _result(obs: StreamObserver, tapped: list):
    parsed = obs.finish(complete=True)
    parsed.problems = [p for p in parsed.problems if p.kind != "body_too_large"]
    timing = obs.timing()
    timing.first_byte_ms = timing.last_byte_ms = None  # the clock of chunks, not of events
    return parsed, timing, tapped


@pytest.mark.parametrize("name,api,ctype,enc,body", ALL_STREAMS, ids=[s[0] for s in ALL_STREAMS])
def test_live_reading_equals_the_full_reading(name, api, ctype, enc, body, monkeypatch):
    """Record facts, the chunk clock of content events, and what the rules' tap sees."""
    monkeypatch.setattr(observer, "DRAIN_BYTES", 256)  # many batches even for short streams
    for seed, chunks in enumerate(_chunkings(body, len(body))):
        want = _full(api, ctype, enc, chunks)
        for limit in (1 << 20, 512, 1):
            assert _live(api, ctype, enc, chunks, limit) == want, (name, seed, limit)
            parsed, timing, _ = _live(api, ctype, enc, chunks, limit, tap=False)
            assert (parsed, timing) == want[:2], (name, seed, limit, "no tap")


def test_the_sources_are_all_there():
    """Every acceptance file with streams, and the sample flows, feed the comparison."""
    names = {s[0].split(":", 1)[0] for s in ALL_STREAMS}
    assert {"llama_swap_cases.json", "higress_cases.json", "higress_test_cases.json",
            "sample.flow"} <= names


def test_the_shortcuts_are_taken(monkeypatch):
    """The comparison above means something only if the live path does take the shortcuts:
    the bench's stream is framed by ``feed_data`` and all but its first and last events are
    read by the short path alone."""
    batches = []
    full = []
    real_feed_data = framing.SSEFramer.feed_data
    real_read = ResponseState._read_object

    def feed_data(self, data):
        got = real_feed_data(self, data)
        batches.append(got is not None)
        return got

    def read_object(self, name, obj):
        full.append(obj)
        return real_read(self, name, obj)

    monkeypatch.setattr(framing.SSEFramer, "feed_data", feed_data)
    monkeypatch.setattr(ResponseState, "_read_object", read_object)
    parsed, timing, tapped = _live("chat_completions", "text/event-stream", None,
                                   [p + b"\n\n" for p in _bench_stream(100).split(b"\n\n")[:-1]],
                                   4096)
    assert batches and all(batches)
    assert timing.content_events == 99 and parsed.usage.output == 100
    assert len(full) == 3  # the first event (ids, model), the finish and the usage chunk
    assert len(tapped) == 102  # ... and the tap (attribute rules) saw every event
    # Without a tap, the plain chunks after the first one read by the short path are matched
    # by their bytes (chunk templates), not parsed.
    parsed_json = []
    real_loads = reader.orjson.loads

    def loads(data):
        parsed_json.append(data)
        return real_loads(data)

    monkeypatch.setattr(reader.orjson, "loads", loads)
    parsed2, timing2, _ = _live("chat_completions", "text/event-stream", None,
                                [p + b"\n\n" for p in _bench_stream(100).split(b"\n\n")[:-1]],
                                4096, tap=False)
    assert (parsed2, timing2) == (parsed, timing)
    assert len(parsed_json) == 5  # role chunk, the template's own chunk, finish, usage, [DONE]
    # ... and whole batches of them by one match over the batch (no event framed alone).
    runs = []
    real_run = ResponseState.content_run

    def content_run(self, text):
        runs.append(real_run(self, text))
        return runs[-1]

    monkeypatch.setattr(ResponseState, "content_run", content_run)
    parsed3, timing3, _ = _live("chat_completions", "text/event-stream", None,
                                [p + b"\n\n" for p in _bench_stream(100).split(b"\n\n")[:-1]],
                                4096, tap=False)
    assert (parsed3, timing3) == (parsed, timing)
    assert sum(runs) > 80, runs  # all but the events of the first batch and the last


def test_timestamps_formatted_per_second_equal_datetime():
    """``rfc3339_ms`` formats the second once and adds the milliseconds: the same text as
    ``datetime.fromtimestamp`` (microseconds rounded half-even) for any timestamp."""
    from datetime import UTC, datetime

    from aistats_engine.record.record import rfc3339_ms

    def reference(ts: float) -> str:
        dt = datetime.fromtimestamp(ts, tz=UTC)
        return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"

    rng = random.Random(11)
    edges = [1764000000.9999996, 1764000000.9995, 1764000000.0005, 0.0, 1.5, -0.5,
             -1.0000004, 86399.99999951]
    for ts in edges + [rng.uniform(0, 4e9) for _ in range(20000)] + [
            1764000000 + rng.random() * 3 for _ in range(20000)]:
        assert rfc3339_ms(ts) == reference(ts), ts


def test_client_names_cached_per_user_agent_equal_the_patterns():
    from aistats_engine.record import clients

    for ua in ("OpenAI/Python 1.54.0", "Anthropic/Python 0.40.0", "curl/8.5.0", "nothing known",
               "OpenAI/Python 1.54.0", ""):
        want = next((n for p, n in clients._PATTERNS if ua and p.search(ua)), None)
        assert clients.client_name(ua) == want


TEMPLATE_CHUNK = (b'{"id":"chatcmpl-9","object":"chat.completion.chunk","created":1732406400,'
                  b'"model":"gpt-4o","obfuscation":"xYz","choices":[{"index":0,"delta":'
                  b'{"content":" hello"},"logprobs":null,"finish_reason":null}],"ts":12.5}')


def test_chunk_template_never_claims_what_the_parser_and_short_path_would_not():
    """Soundness of wire/templates.py: any event the template matches parses (orjson) to an
    object the short path gives the same verdict for; thousands of mutations of the template's
    own chunk, with the characters that matter to JSON, try to make it lie."""
    import orjson

    from aistats_engine.wire.formats.openai import _short, _template_key

    obj = orjson.loads(TEMPLATE_CHUNK)
    tpl = templates.learn(TEMPLATE_CHUNK, obj, _template_key(obj))
    assert tpl is not None and tpl.verdict(TEMPLATE_CHUNK) is True
    same = TEMPLATE_CHUNK.replace(b'" hello"', b'""').replace(b'"xYz"', b'"q"').replace(
        b"1732406400", b"1732406401").replace(b"12.5", b"-3")
    assert tpl.verdict(same) is False  # empty text: no content, other holes filled anew
    rng = random.Random(5)
    alphabet = [bytes([c]) for c in b'"\\{}[],:0123456789.eE-+ uabn\x00\x1f\x7f'] + [
        b"\xc3\xa9", b"\xff", b"\xc3", b"null", b"true", b'"usage":{"x":1},', b"\\u0022"]
    checked = matched = 0
    for _ in range(20000):
        data = bytearray(TEMPLATE_CHUNK)
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(data) + 1)
            op = rng.random()
            if op < 0.4:
                data[at:at] = rng.choice(alphabet)
            elif op < 0.7:
                del data[at:at + rng.randint(1, 3)]
            else:
                data[at:at + 1] = rng.choice(alphabet)
        data = bytes(data)
        got = tpl.verdict(data)
        checked += 1
        if got is None:
            continue
        matched += 1
        parsed = orjson.loads(data)  # must not raise: a matching event is valid JSON
        assert parsed.__class__ is dict and _short(parsed) is got, data
    assert matched > 1000, (checked, matched)  # the mutations did reach the holes


def test_a_content_run_is_exactly_its_events_each_content():
    """Soundness of ``ChunkTemplate.content_run``: a batch it takes is whole ``data: `` events,
    as many as it says, each one the template matches as content (which the test above proves
    sound); mutations of the events and of what separates them try to make it lie."""
    import orjson

    from aistats_engine.wire.formats.openai import _short, _template_key

    obj = orjson.loads(TEMPLATE_CHUNK)
    tpl = templates.learn(TEMPLATE_CHUNK, obj, _template_key(obj))
    ev = b"data: " + TEMPLATE_CHUNK + b"\n\n"
    assert tpl.content_run(ev * 3) == 3 and tpl.content_run(ev) == 1
    empty = ev.replace(b'" hello"', b'""')
    for bad in (b"", ev + empty, ev[:-1], ev + b"\n", b"\n" + ev, ev.replace(b"data: ", b"data:"),
                b"event: x\n" + ev, ev + b": comment\n\n", ev.replace(b"\n\n", b"\r\n\r\n"),
                ev[:60] + b"\n\ndata: " + ev[60:], ev.replace(b" hello", b" h\xffi")):
        assert tpl.content_run(bad) == 0, bad
    multi = b'{"id":"x",\n"choices":[{"index":0,"delta":{"content":"a"}}]}'
    assert templates.learn(multi, orjson.loads(multi), b"content").content_run(
        b"data: " + multi + b"\n\n") == 0  # its own event spanned lines: no runs at all
    rng = random.Random(9)
    alphabet = [bytes([c]) for c in b'"\\{}[],:0123456789.eE-+ uabn\n\r\x00\x1f'] + [
        b"\xc3\xa9", b"\xff", b"data: ", b"\n\n", b"event: e\n", b'"usage":{"x":1},']
    taken = 0
    for _ in range(5000):
        events = [bytearray(ev) for _ in range(rng.randint(1, 4))]
        for _ in range(rng.randint(0, 2)):
            e = rng.choice(events)
            at = rng.randrange(len(e) + 1)
            e[at:at + rng.randint(0, 2)] = rng.choice(alphabet)
        batch = b"".join(events)
        n = tpl.content_run(batch)
        if not n:
            continue
        taken += 1
        parts = batch.split(b"\n\n")
        assert parts[-1] == b"" and len(parts) - 1 == n, batch
        for part in parts[:-1]:
            assert part.startswith(b"data: ") and b"\n" not in part and b"\r" not in part
            data = part[6:]
            assert tpl.verdict(data) is True and _short(orjson.loads(data)) is True, batch
    assert taken > 1000


def test_chunk_templates_are_not_learned_where_the_bytes_could_mislead():
    import orjson

    from aistats_engine.wire.formats.openai import _template_key

    def learned(data: bytes):
        obj = orjson.loads(data)
        key = _template_key(obj)
        return None if key is None else templates.learn(data, obj, key)

    assert learned(TEMPLATE_CHUNK) is not None
    escaped = TEMPLATE_CHUNK.replace(b'"model"', b'"mod\\u0065l"')
    assert learned(escaped) is None  # a key behind an escape
    twice = TEMPLATE_CHUNK.replace(b'"ts":12.5', b'"ts":12.5,"x":{"content":"y"}')
    assert learned(twice) is None  # the text's key is not unique
    quoted = TEMPLATE_CHUNK.replace(b'" hello"', b'"say \\"hi\\""')
    assert learned(quoted) is None  # the text holds an escape
    tools = TEMPLATE_CHUNK.replace(b'{"content":" hello"}', b'{"content":"","tool_calls":[{}]}')
    assert learned(tools) is None  # the verdict would not be the text's alone
