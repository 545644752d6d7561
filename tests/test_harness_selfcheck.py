"""Self-checks for the e2e harness (tests/upstream.py, tests/mitm.py), independent of addon/.

They prove the fake upstream's wire bytes are what clients (httpx, the official SDKs) receive and
parse, and that a real mitmdump passes them through unchanged and can record and replay them.
"""

from __future__ import annotations

import json
import ssl
import time
import zlib
from pathlib import Path

import anthropic
import brotli
import httpx
import openai
import pytest
import zstandard


from mitm import Mitmdump, read_flows, replay, ssl_context, start_mitmdump_expect_failure
from upstream import (
    JSON_HEADERS,
    NDJSON_HEADERS,
    SSE_HEADERS,
    Reply,
    Upstream,
    anthropic_messages_json,
    anthropic_messages_stream,
    encode_chunks,
    gemini_sse,
    ollama_chat_ndjson,
    openai_chat_json,
    openai_chat_stream,
    openai_responses_stream,
    openai_usage,
    responses_usage,
)

pytestmark = pytest.mark.timeout(60)

STREAM_ADDON = """
import logging
log = logging.getLogger(__name__)

class Selfcheck:
    def responseheaders(self, flow):
        flow.response.stream = True

    def response(self, flow):
        log.info("selfcheck response %s live=%s", flow.request.path, flow.live)

addons = [Selfcheck()]
"""

FAILING_ADDON = """
class Broken:
    def running(self):
        raise RuntimeError("selfcheck boom")

addons = [Broken()]
"""


@pytest.fixture
def upstream():
    with Upstream() as up:
        yield up


@pytest.fixture(scope="module")
def tls_upstream():
    with Upstream(tls=True, h2=True) as up:
        yield up


def _upstream_ctx(up: Upstream) -> ssl.SSLContext:
    assert up.cert_path is not None
    return ssl.create_default_context(cafile=str(up.cert_path))


def test_sse_chunks_arrive_paced_and_byte_exact(upstream: Upstream) -> None:
    chunks = openai_chat_stream(["Hel", "lo"], usage=openai_usage(5, 2))
    upstream.add("/v1/chat/completions", Reply(headers=SSE_HEADERS, chunks=chunks,
                                               first_delay_s=0.1, chunk_delay_s=0.05))
    got, times = b"", []
    t0 = time.monotonic()
    with httpx.stream("POST", upstream.url + "/v1/chat/completions", json={"stream": True}, timeout=5) as r:
        assert r.headers["transfer-encoding"] == "chunked" and "content-length" not in r.headers
        for piece in r.iter_raw():
            got += piece
            times.append(time.monotonic() - t0)
    assert got == upstream.sent["/v1/chat/completions"] == b"".join(chunks)
    assert len(times) >= 3 and times[0] >= 0.09 and times[-1] >= 0.09 + 0.05 * (len(chunks) - 1) - 0.02
    req = upstream.requests[-1]
    assert (req.method, req.path, req.http_version) == ("POST", "/v1/chat/completions", "1.1")
    assert json.loads(req.body) == {"stream": True}


def test_case_header_routing_and_404(upstream: Upstream) -> None:
    upstream.add("case-a", Reply(headers=JSON_HEADERS, chunks=[b'{"a":1}']))
    r = httpx.get(upstream.url + "/whatever?x=1", headers={"x-aistats-case": "case-a"})
    assert r.content == b'{"a":1}' and r.headers["content-length"] == "7"
    assert upstream.requests[-1].query == "x=1"
    assert httpx.get(upstream.url + "/nope").status_code == 404
    upstream.add("/fixed", Reply(chunks=[b"ab", b"cd"], stream=False, header_delay_s=0.1))
    t0 = time.monotonic()
    r = httpx.get(upstream.url + "/fixed")
    assert time.monotonic() - t0 >= 0.09
    assert r.headers["content-length"] == "4" and "transfer-encoding" not in r.headers and r.content == b"abcd"


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "zlib", "br", "zstd"])
def test_incremental_encodings(upstream: Upstream, encoding: str) -> None:
    events = [b"data: %d\n\n" % i for i in range(4)]
    decompress = {
        "gzip": zlib.decompressobj(16 + zlib.MAX_WBITS).decompress,
        "deflate": zlib.decompressobj(-zlib.MAX_WBITS).decompress,
        "zlib": zlib.decompressobj().decompress,
        "br": brotli.Decompressor().process,
        "zstd": zstandard.ZstdDecompressor().decompressobj(read_across_frames=True).decompress,
    }[encoding]
    # Each piece decodes to exactly its own event as soon as it is available.
    assert [decompress(p) for p in encode_chunks(events, encoding)] == events
    upstream.add("/enc", Reply(headers=SSE_HEADERS, chunks=events, encoding=encoding, chunk_delay_s=0.01))
    r = httpx.get(upstream.url + "/enc", timeout=5)
    assert r.headers["content-encoding"] == encoding.replace("zlib", "deflate") and r.content == b"".join(events)
    assert r.headers.get("transfer-encoding") == "chunked"


def test_abort_after_gives_incomplete_body_h1(upstream: Upstream) -> None:
    upstream.add("/ab", Reply(headers=SSE_HEADERS, chunks=[b"data: 1\n\n"] * 4, abort_after=2))
    got = b""
    with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):
        with httpx.stream("GET", upstream.url + "/ab", timeout=5) as r:
            for piece in r.iter_raw():
                got += piece
    assert got == upstream.sent["/ab"] == b"data: 1\n\n" * 2


def test_h2_over_tls_and_abort(tls_upstream: Upstream) -> None:
    tls_upstream.add("h2ok", Reply(headers=SSE_HEADERS, chunks=[b"data: a\n\n", b"data: b\n\n"]))
    tls_upstream.add("h2ab", Reply(headers=SSE_HEADERS, chunks=[b"data: a\n\n"] * 3, abort_after=1))
    with httpx.Client(http2=True, verify=_upstream_ctx(tls_upstream), timeout=5) as c:
        r = c.get(tls_upstream.url + "/x", headers={"x-aistats-case": "h2ok"})
        assert r.http_version == "HTTP/2" and r.content == tls_upstream.sent["h2ok"]
        assert tls_upstream.requests[-1].http_version == "2"
        got = b""
        with pytest.raises(httpx.RemoteProtocolError):
            with c.stream("GET", tls_upstream.url + "/x", headers={"x-aistats-case": "h2ab"}) as r:
                for piece in r.iter_raw():
                    got += piece
        assert got == tls_upstream.sent["h2ab"] == b"data: a\n\n"


def test_openai_sdk_parses_builders(upstream: Upstream) -> None:
    upstream.add("chat-stream", Reply(headers=SSE_HEADERS, chunks=openai_chat_stream(
        ["Hel", "lo"], usage=openai_usage(7, 2, cached=3))))
    upstream.add("chat-json", Reply(headers=JSON_HEADERS, chunks=[openai_chat_json("Hi", usage=openai_usage(4, 1))]))
    upstream.add("/v1/responses", Reply(headers=SSE_HEADERS, chunks=openai_responses_stream(
        ["Hel", "lo"], usage=responses_usage(9, 2, cached=1, reasoning=1))))
    client = openai.OpenAI(base_url=upstream.url + "/v1", api_key="k", max_retries=0)
    msgs = [{"role": "user", "content": "hi"}]
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=msgs, stream=True, stream_options={"include_usage": True},
        extra_headers={"x-aistats-case": "chat-stream"},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello"
    assert chunks[-1].usage.prompt_tokens == 7 and chunks[-1].usage.prompt_tokens_details.cached_tokens == 3
    done = client.chat.completions.create(model="gpt-4o-mini", messages=msgs,
                                          extra_headers={"x-aistats-case": "chat-json"})
    assert done.choices[0].message.content == "Hi" and done.usage.total_tokens == 5
    events = list(client.responses.create(model="gpt-4o-mini", input="hi", stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Hello"
    final = events[-1]
    assert final.type == "response.completed" and final.response.output_text == "Hello"
    assert final.response.usage.input_tokens_details.cached_tokens == 1
    assert final.response.usage.output_tokens_details.reasoning_tokens == 1


def test_anthropic_sdk_parses_builders(upstream: Upstream) -> None:
    upstream.add("/v1/messages", Reply(headers=SSE_HEADERS, chunks=anthropic_messages_stream(
        ["Hel", "lo"], input_tokens=11, output_tokens=3, cache_read=5, cache_creation=2)))
    upstream.add("msg-json", Reply(headers=JSON_HEADERS, chunks=[anthropic_messages_json("Hi", input_tokens=4)]))
    client = anthropic.Anthropic(base_url=upstream.url, api_key="k", max_retries=0)
    msgs = [{"role": "user", "content": "hi"}]
    with client.messages.stream(model="claude-test", max_tokens=10, messages=msgs) as s:
        assert "".join(s.text_stream) == "Hello"
        final = s.get_final_message()
    assert final.usage.input_tokens == 11 and final.usage.output_tokens == 3
    assert final.usage.cache_read_input_tokens == 5 and final.usage.cache_creation_input_tokens == 2
    msg = client.messages.create(model="claude-test", max_tokens=10, messages=msgs,
                                 extra_headers={"x-aistats-case": "msg-json"})
    assert msg.content[0].text == "Hi" and msg.usage.input_tokens == 4


def test_gemini_and_ollama_builders_frame_correctly() -> None:
    events = gemini_sse(["a", "b"], prompt_tokens=3, candidates_tokens=4, thoughts_tokens=2)
    assert all(e.startswith(b"data: ") and e.endswith(b"\r\n\r\n") for e in events)
    last = json.loads(events[-1][6:])
    assert last["candidates"][0]["finishReason"] == "STOP"
    assert last["usageMetadata"]["totalTokenCount"] == 9 and last["usageMetadata"]["thoughtsTokenCount"] == 2
    lines = ollama_chat_ndjson(["a", "b"], prompt_eval_count=3, eval_count=2)
    assert all(line.endswith(b"\n") and line.count(b"\n") == 1 for line in lines)
    assert json.loads(lines[-1])["done"] is True and json.loads(lines[-1])["eval_count"] == 2
    assert NDJSON_HEADERS[0] == ("content-type", "application/x-ndjson")


def test_proxy_streams_unchanged_then_replays(tmp_path: Path, upstream: Upstream, tls_upstream: Upstream) -> None:
    script = tmp_path / "selfcheck_addon.py"
    script.write_text(STREAM_ADDON)
    flows = tmp_path / "out.flow"
    upstream.add("/v1/chat/completions", Reply(headers=SSE_HEADERS, chunk_delay_s=0.02, encoding="gzip",
                                               chunks=openai_chat_stream(["a", "b"], usage=openai_usage(3, 2))))
    tls_upstream.add("/v1/messages", Reply(headers=SSE_HEADERS, chunk_delay_s=0.02,
                                           chunks=anthropic_messages_stream(["x", "y"])))
    with Mitmdump(tmp_path, script=script, write_flows=flows) as m:
        ctx = ssl_context(m.ca_path)
        with httpx.Client(proxy=m.proxy_url, verify=ctx, http2=True, timeout=10) as c:
            with c.stream("POST", upstream.url + "/v1/chat/completions", json={}) as r:
                raw = b"".join(r.iter_raw())
            assert raw == upstream.sent["/v1/chat/completions"]
            r = c.post(tls_upstream.url + "/v1/messages", json={})
            assert r.http_version == "HTTP/2" and r.content == tls_upstream.sent["/v1/messages"]
            assert tls_upstream.requests[-1].http_version == "2"  # mitmproxy mirrors h2 upstream
        # The documented SDK setup (proxy + mitm CA) works end to end.
        oa = openai.OpenAI(base_url=upstream.url + "/v1", api_key="k", max_retries=0,
                           http_client=openai.DefaultHttpx2Client(proxy=m.proxy_url, verify=ctx))
        out = oa.chat.completions.create(model="m", messages=[{"role": "user", "content": "q"}], stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in out if c.choices) == "ab"
        an = anthropic.Anthropic(base_url=tls_upstream.url, api_key="k", max_retries=0,
                                 http_client=anthropic.DefaultHttpxClient(proxy=m.proxy_url, verify=ctx))
        with an.messages.stream(model="m", max_tokens=5, messages=[{"role": "user", "content": "q"}]) as s:
            assert "".join(s.text_stream) == "xy"
        assert "selfcheck response /v1/messages live=True" in m.output()
    assert m.returncode == 0
    assert len(read_flows(flows)) == 4
    res = replay(tmp_path, flows, script=script)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (res.stdout + res.stderr).count("live=False") == 4


def test_reverse_mode_and_expected_failure(tmp_path: Path, upstream: Upstream) -> None:
    upstream.add("/v1/chat/completions", Reply(headers=SSE_HEADERS, chunks=openai_chat_stream(["r"])))
    with Mitmdump(tmp_path, script=None, mode="reverse:" + upstream.url) as m:
        oa = openai.OpenAI(base_url=f"http://127.0.0.1:{m.port}/v1", api_key="k", max_retries=0)
        out = oa.chat.completions.create(model="m", messages=[{"role": "user", "content": "q"}], stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in out if c.choices) == "r"
    bad = tmp_path / "broken_addon.py"
    bad.write_text(FAILING_ADDON)
    rc, output = start_mitmdump_expect_failure(tmp_path, script=bad)
    assert rc == 1 and "selfcheck boom" in output
