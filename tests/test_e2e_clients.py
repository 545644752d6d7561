"""End to end with real clients through a real mitmdump running the addon.

One mitmdump (forward proxy, ``-w``) serves every test in this module; a plain HTTP/1.1
upstream and a TLS upstream offering HTTP/2 speak each provider's wire format. Each test checks
the record the addon logged and that the client got the upstream's bytes; the last test replays
the flow file and requires identical records, timings included.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from casekit import drop_ids
from fixtures import BEDROCK_INVOKE_CLAUDE
from mitm import Mitmdump, replay, ssl_context
from upstream import (
    JSON_HEADERS, NDJSON_HEADERS, SSE_HEADERS, Reply, Upstream, anthropic_messages_json,
    anthropic_messages_stream, gemini_sse, ollama_chat_ndjson, openai_chat_json,
    openai_chat_stream, openai_responses_stream, openai_usage, responses_usage)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clients")
    log, flows = tmp / "live.jsonl", tmp / "clients.flow"
    with Upstream() as up, Upstream(tls=True, h2=True) as tls_up:
        with Mitmdump(tmp, options={"aistats_log": str(log)}, write_flows=flows) as m:
            yield {"up": up, "tls": tls_up, "m": m, "log": log, "flows": flows, "tmp": tmp}


def records(log: Path) -> list[dict]:
    if not log.exists():
        return []
    return [json.loads(x) for x in log.read_text().splitlines() if x.strip()]


def wait_record(log: Path, **match) -> dict:
    """The logged record whose keys equal ``match`` (the log is flushed within a second)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = [r for r in records(log) if all(r.get(k) == v for k, v in match.items())]
        if found:
            assert len(found) == 1, found
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no record with {match}; have {records(log)}")


def proxied(env, **kw) -> httpx.Client:
    return httpx.Client(proxy=env["m"].proxy_url, timeout=30, **kw)


def raw_post(client: httpx.Client, url: str, key: str, body: dict) -> tuple[int, bytes, list[float]]:
    """POST and return status, the undecoded bytes received, and when each piece arrived."""
    arrivals: list[float] = []
    data = b""
    with client.stream("POST", url, json=body, headers={"x-aistats-case": key}) as r:
        for piece in r.iter_raw():
            arrivals.append(time.monotonic())
            data += piece
        return r.status_code, data, arrivals


def test_openai_sdk_chat_stream_with_include_usage(env):
    up, m = env["up"], env["m"]
    up.add("oa-stream", Reply(headers=SSE_HEADERS, chunk_delay_s=0.02, first_delay_s=0.2,
                              chunks=openai_chat_stream(["Hel", "lo", " you"], model="gpt-4o-mini",
                                                        usage=openai_usage(21, 3, cached=16))))
    client = openai.OpenAI(base_url=up.url + "/v1", api_key="sk-secret", max_retries=0,
                           default_headers={"x-aistats-case": "oa-stream", "x-session-id": "sess-1"},
                           http_client=openai.DefaultHttpx2Client(proxy=m.proxy_url))
    text = ""
    for ev in client.chat.completions.create(model="oa-stream-model", stream=True,
                                             stream_options={"include_usage": True},
                                             messages=[{"role": "user", "content": "hi"}]):
        if ev.choices and ev.choices[0].delta.content:
            text += ev.choices[0].delta.content
    assert text == "Hello you"
    rec = wait_record(env["log"], model="oa-stream-model")
    assert rec["stream"] is True and rec["provider"] == "openai" and rec["api"] == "chat_completions"
    assert (rec["input_tokens"], rec["output_tokens"], rec["cached_tokens"], rec["total_tokens"]) == (21, 3, 16, 24)
    assert rec["client"] == "openai-python" and rec["session_id"] == "sess-1"
    assert rec["response_model"] == "gpt-4o-mini" and rec["finish_reason"] == "stop"
    assert rec["chunks"] == 3 and rec["ttft_ms"] >= 200 > rec["ttfb_ms"]
    assert rec["decode_ms"] >= 30 and rec["observed_tokens_per_second"] > 0
    assert rec["error"] is None and rec["parse_error"] is None
    assert "sk-secret" not in json.dumps(rec)


def test_openai_sdk_chat_non_stream(env):
    up, m = env["up"], env["m"]
    up.add("oa-json", Reply(headers=JSON_HEADERS, chunks=[openai_chat_json("hey", usage=openai_usage(9, 2))]))
    client = openai.OpenAI(base_url=up.url + "/v1", api_key="k", max_retries=0,
                           default_headers={"x-aistats-case": "oa-json"},
                           http_client=openai.DefaultHttpx2Client(proxy=m.proxy_url))
    out = client.chat.completions.create(model="oa-json-model", messages=[{"role": "user", "content": "x"}])
    assert out.choices[0].message.content == "hey"
    rec = wait_record(env["log"], model="oa-json-model")
    assert (rec["stream"], rec["input_tokens"], rec["output_tokens"]) == (False, 9, 2)
    assert (rec["ttft_ms"], rec["chunks"], rec["chat_round"]) == (None, None, 1)
    assert rec["chat_id"] == "chatcmpl-1"


def test_openai_sdk_responses_stream(env):
    up, m = env["up"], env["m"]
    up.add("oa-resp", Reply(headers=SSE_HEADERS, chunks=openai_responses_stream(
        ["A", "B"], model="gpt-5", usage=responses_usage(30, 12, cached=10, reasoning=8))))
    client = openai.OpenAI(base_url=up.url + "/v1", api_key="k", max_retries=0,
                           default_headers={"x-aistats-case": "oa-resp"},
                           http_client=openai.DefaultHttpx2Client(proxy=m.proxy_url))
    with client.responses.stream(model="oa-resp-model", input="hi") as s:
        final = s.get_final_response()
    assert final.usage.output_tokens == 12
    rec = wait_record(env["log"], model="oa-resp-model")
    assert rec["api"] == "responses" and rec["operation"] == "chat"
    assert (rec["input_tokens"], rec["output_tokens"], rec["cached_tokens"], rec["reasoning_tokens"]) == (30, 12, 10, 8)
    assert rec["chunks"] == 2 and rec["finish_reason"] == "completed" and rec["chat_id"] == "resp_1"


def test_anthropic_sdk_messages_stream_and_non_stream(env):
    up, m = env["up"], env["m"]
    up.add("an-stream", Reply(headers=SSE_HEADERS, chunk_delay_s=0.01, chunks=anthropic_messages_stream(
        ["Bon", "jour"], input_tokens=12, output_tokens=6, cache_read=100, cache_creation=20)))
    up.add("an-json", Reply(headers=JSON_HEADERS, chunks=[anthropic_messages_json(
        "Salut", input_tokens=5, output_tokens=3, cache_read=7)]))
    for key, model in (("an-stream", "claude-test-stream"), ("an-json", "claude-test-json")):
        client = anthropic.Anthropic(base_url=up.url, api_key="sk-ant-secret", max_retries=0,
                                     default_headers={"x-aistats-case": key},
                                     http_client=anthropic.DefaultHttpxClient(proxy=m.proxy_url))
        if key == "an-stream":
            with client.messages.stream(model=model, max_tokens=64,
                                        messages=[{"role": "user", "content": "hi"}]) as s:
                assert s.get_final_text() == "Bonjour"
        else:
            msg = client.messages.create(model=model, max_tokens=64,
                                         messages=[{"role": "user", "content": "hi"}])
            assert msg.content[0].text == "Salut"
    rec = wait_record(env["log"], model="claude-test-stream")
    assert rec["provider"] == "anthropic" and rec["client"] == "anthropic-python" and rec["stream"]
    assert (rec["input_tokens"], rec["output_tokens"], rec["cached_tokens"], rec["cache_creation_tokens"]) == (132, 6, 100, 20)
    assert rec["finish_reason"] == "end_turn" and rec["chunks"] == 2
    rec = wait_record(env["log"], model="claude-test-json")
    assert (rec["stream"], rec["input_tokens"], rec["output_tokens"], rec["cached_tokens"]) == (False, 12, 3, 7)
    assert "sk-ant-secret" not in json.dumps(records(env["log"]))


def test_httpx_gemini_sse_crlf(env):
    up = env["up"]
    chunks = gemini_sse(["Hi", " there"], prompt_tokens=8, candidates_tokens=2, thoughts_tokens=5)
    up.add("gem", Reply(headers=SSE_HEADERS, chunks=chunks))
    with proxied(env) as c:
        status, got, _ = raw_post(c, up.url + "/v1beta/models/gemini-e2e:streamGenerateContent?alt=sse&key=AIzaSECRET",
                                  "gem", {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]})
    assert status == 200 and got == up.sent["gem"]
    rec = wait_record(env["log"], model="gemini-e2e")
    assert rec["provider"] == "gcp.gemini" and rec["operation"] == "generate_content"
    assert (rec["input_tokens"], rec["output_tokens"], rec["reasoning_tokens"]) == (8, 7, 5)
    assert rec["chunks"] == 2 and rec["finish_reason"] == "STOP"
    assert "AIzaSECRET" not in json.dumps(rec) and "?" not in rec["path"]


def test_httpx_bedrock_invoke_stream(env):
    """InvokeModelWithResponseStream: base64-wrapped Claude events in AWS event-stream frames,
    split across chunks at odd places."""
    up = env["up"]
    body = BEDROCK_INVOKE_CLAUDE
    cuts = [0, 5, 77, 200, len(body) - 3, len(body)]
    up.add("bedrock", Reply(headers=[("content-type", "application/vnd.amazon.eventstream")],
                            chunks=[body[a:b] for a, b in zip(cuts, cuts[1:])], chunk_delay_s=0.01))
    with proxied(env) as c:
        status, got, _ = raw_post(c, up.url + "/model/anthropic.claude-e2e/invoke-with-response-stream",
                                  "bedrock", {"anthropic_version": "bedrock-2023-05-31",
                                              "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200 and got == body
    rec = wait_record(env["log"], model="anthropic.claude-e2e")
    assert (rec["provider"], rec["api"], rec["stream"]) == ("aws.bedrock", "invoke", True)
    assert (rec["input_tokens"], rec["output_tokens"], rec["finish_reason"]) == (9, 4, "end_turn")
    assert rec["chunks"] == 2 and rec["ttft_ms"] is not None and rec["parse_error"] is None


def test_httpx_ollama_ndjson(env):
    up = env["up"]
    up.add("oll", Reply(headers=NDJSON_HEADERS, chunks=ollama_chat_ndjson(["a", "b", "c"], model="llama3.2",
                                                                         prompt_eval_count=14, eval_count=3)))
    with proxied(env) as c:
        status, got, _ = raw_post(c, up.url + "/api/chat", "oll", {"model": "ollama-e2e", "messages": [{"role": "user", "content": "x"}]})
    assert status == 200 and got == up.sent["oll"]
    rec = wait_record(env["log"], model="ollama-e2e")
    assert rec["provider"] == "ollama" and rec["api"] == "ollama_chat"
    assert (rec["input_tokens"], rec["output_tokens"], rec["chunks"]) == (14, 3, 3)
    assert rec["tokens_per_second"] is not None and rec["prompt_per_second"] is not None


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd", "deflate"])
def test_compressed_streams_pass_unchanged(env, encoding):
    up = env["up"]
    key = f"enc-{encoding}"
    up.add(key, Reply(headers=SSE_HEADERS, encoding=encoding, chunk_delay_s=0.01,
                      chunks=openai_chat_stream(["x", "y"], usage=openai_usage(4, 2))))
    with proxied(env) as c:
        status, got, _ = raw_post(c, up.url + "/v1/chat/completions", key,
                                  {"model": f"enc-{encoding}-model", "stream": True})
    assert status == 200 and got == up.sent[key]  # compressed bytes, untouched
    rec = wait_record(env["log"], model=f"enc-{encoding}-model")
    assert (rec["input_tokens"], rec["output_tokens"], rec["chunks"], rec["parse_error"]) == (4, 2, 2, None)


def test_https_via_mitm_ca_and_http2_upstream(env):
    tls_up, m = env["tls"], env["m"]
    tls_up.add("h2", Reply(headers=SSE_HEADERS, chunk_delay_s=0.01,
                           chunks=openai_chat_stream(["a", "b", "c"], usage=openai_usage(5, 3))))
    ctx = ssl_context(m.ca_path)
    for http2, model in ((True, "h2-model"), (False, "h1-tls-model")):
        with httpx.Client(proxy=m.proxy_url, verify=ctx, http2=http2, timeout=30) as c:
            with c.stream("POST", tls_up.url + "/v1/chat/completions", json={"model": model, "stream": True},
                          headers={"x-aistats-case": "h2"}) as r:
                got = b"".join(r.iter_raw())
                assert r.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
        assert got == tls_up.sent["h2"]
        rec = wait_record(env["log"], model=model)
        assert rec["scheme"] == "https" and rec["port"] == tls_up.port
        assert (rec["output_tokens"], rec["chunks"]) == (3, 3)
    assert tls_up.requests[-2].http_version == "2"


def test_first_event_reaches_client_before_upstream_finishes(env):
    up = env["up"]
    up.add("paced", Reply(headers=SSE_HEADERS, chunk_delay_s=0.25,
                          chunks=openai_chat_stream(["1", "2", "3", "4"], usage=openai_usage(1, 4))))
    with proxied(env) as c:
        t0 = time.monotonic()
        status, got, arrivals = raw_post(c, up.url + "/v1/chat/completions", "paced", {"model": "paced-model", "stream": True})
    assert status == 200 and got == up.sent["paced"]
    # The upstream takes >= 1.5 s (6 gaps of 0.25 s); buffering would deliver everything at once.
    assert arrivals[0] - t0 < 0.5 < arrivals[-1] - t0
    rec = wait_record(env["log"], model="paced-model")
    assert rec["decode_ms"] >= 500


def test_upstream_abort_mid_stream(env):
    up = env["up"]
    up.add("abort", Reply(headers=SSE_HEADERS, abort_after=3, chunk_delay_s=0.02,
                          chunks=anthropic_messages_stream(["a", "b", "c", "d"], input_tokens=9)))
    with proxied(env) as c:
        with pytest.raises(httpx.HTTPError):
            raw_post(c, up.url + "/v1/messages", "abort", {"model": "abort-model", "stream": True})
    rec = wait_record(env["log"], model="abort-model")
    assert rec["error_type"] == "upstream_aborted" and rec["status"] == 200
    assert rec["input_tokens"] == 9  # usage seen before the abort is kept
    assert rec["error"]


def test_upstream_unreachable_and_client_disconnect(env):
    up = env["up"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    with proxied(env) as c:
        r = c.post(f"http://127.0.0.1:{dead}/v1/chat/completions", json={"model": "dead-model"})
        assert r.status_code == 502
    rec = wait_record(env["log"], model="dead-model")
    assert (rec["status"], rec["error_type"]) == (None, "upstream_unreachable") and rec["error"]

    up.add("slow", Reply(headers=SSE_HEADERS, chunk_delay_s=0.2,
                         chunks=openai_chat_stream([str(i) for i in range(20)])))
    with proxied(env) as c:
        with c.stream("POST", up.url + "/v1/chat/completions", json={"model": "gone-model", "stream": True},
                      headers={"x-aistats-case": "slow"}) as r:
            next(r.iter_raw())
    rec = wait_record(env["log"], model="gone-model")
    assert rec["error_type"] == "client_disconnected"


def test_non_2xx_error_message(env):
    up = env["up"]
    up.add("e429", Reply(status=429, headers=JSON_HEADERS,
                         chunks=[b'{"error":{"message":"Rate limit reached","type":"requests"}}']))
    with proxied(env) as c:
        r = c.post(up.url + "/v1/chat/completions", json={"model": "limited-model"}, headers={"x-aistats-case": "e429"})
    assert r.status_code == 429
    rec = wait_record(env["log"], model="limited-model")
    assert (rec["error"], rec["error_type"], rec["input_tokens"]) == ("Rate limit reached", "429", None)


def test_reverse_mode(env, tmp_path):
    up = env["up"]
    up.add("/v1/chat/completions", Reply(headers=JSON_HEADERS, chunks=[openai_chat_json("r", usage=openai_usage(3, 1))]))
    log = tmp_path / "rev.jsonl"
    with Mitmdump(tmp_path, mode=f"reverse:{up.url}", options={"aistats_log": str(log)}) as rm:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{rm.port}/v1", api_key="k", max_retries=0)
        client.chat.completions.create(model="reverse-model", messages=[{"role": "user", "content": "x"}])
        rec = wait_record(log, model="reverse-model")
    assert (rec["host"], rec["port"], rec["output_tokens"]) == ("127.0.0.1", up.port, 1)


def test_zz_replay_of_the_flow_file_gives_identical_records(env):
    """Runs last in this module: every flow above, replayed with ``mitmdump -nr``."""
    m, log = env["m"], env["log"]
    live = records(log)
    assert m.stop() == 0
    replay_log = env["tmp"] / "replay.jsonl"
    done = replay(env["tmp"], env["flows"], options={"aistats_log": str(replay_log)})
    assert done.returncode == 0, done.stdout + done.stderr
    replayed = records(replay_log)
    by_flow = {r["flow_id"]: drop_ids(r) for r in replayed}
    assert len(replayed) == len(live) >= 15
    for r in live:
        assert by_flow[r["flow_id"]] == drop_ids(r), r["model"]
    # The flow file holds, for every complete exchange (SDK ones included), exactly the bytes
    # the upstream sent: streamed bodies were restored, and nothing was changed on the way.
    from mitm import read_flows
    ups = {**env["up"].sent, **env["tls"].sent}
    checked = 0
    for f in read_flows(env["flows"]):
        key = f.request.headers.get("x-aistats-case")
        if key in ups and f.error is None and f.response is not None:
            assert f.response.raw_content == ups[key], key
            checked += 1
    assert checked >= 10


def test_bad_config_stops_mitmdump_with_one_line(tmp_path):
    from mitm import start_mitmdump_expect_failure
    rc, out = start_mitmdump_expect_failure(tmp_path, options={"aistats_max_body": "lots"})
    assert rc != 0
    assert "aistats_max_body: 'lots' is invalid; expected a size in bytes" in out
    assert "Traceback" not in out
