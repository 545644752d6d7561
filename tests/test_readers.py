"""Protocol readers and usage rules (shared/spec/usage.md), whole bodies and streams."""

from __future__ import annotations

import json

import pytest

from aistats_engine.wire.decoding import DecodeError, decode_body, decoder_for
from aistats_engine.wire.framing import framer_for
from aistats_engine.observer import StreamObserver, parse_body
from aistats_engine.record.providers import decide_provider
from aistats_engine.wire.formats import match_api
from aistats_engine.wire.reader import read_request
from aistats_engine.wire.usage import Usage
from fixtures import ANTHROPIC, GEMINI, OLLAMA, OPENAI_CHAT, RESPONSES, br, gzip_per_event, zstd


def stream(api, body, ctype="text/event-stream", enc=None, complete=True):
    obs = StreamObserver(api, framer_for(ctype)(), enc, 0.0)
    obs.feed(body, 0.1)
    return obs.finish(complete), obs.timing()


def body(api, obj, enc=None):
    return parse_body(api, json.dumps(obj).encode() if not isinstance(obj, bytes) else obj, enc)


def usage_of(p):
    u = p.usage
    return (u.input, u.output, u.cached, u.cache_creation, u.reasoning)


def test_openai_chat_stream():
    p, t = stream("chat_completions", OPENAI_CHAT)
    assert usage_of(p) == (12, 3, 4, None, 1)
    assert (p.finish_reason, p.response_model, p.chat_id, p.usage_source) == ("stop", "gpt-4o-mini", "chatcmpl-1", "reported")
    assert t.content_events == 2  # the empty role delta is not content


def test_anthropic_stream_adds_cache_to_input_and_takes_latest_output():
    p, t = stream("messages", ANTHROPIC)
    assert usage_of(p) == (112, 7, 100, 2, None)
    assert (p.finish_reason, p.chat_id, p.response_model) == ("end_turn", "msg_1", "claude-sonnet-4-5")
    assert t.content_events == 2


def test_responses_stream():
    p, t = stream("responses", RESPONSES)
    assert usage_of(p) == (20, 30, 8, None, 25)
    assert (p.finish_reason, p.chat_id) == ("completed", "resp_1")
    assert t.content_events == 2


def test_gemini_stream_cumulative_usage_with_thoughts():
    p, t = stream("generate_content", GEMINI)
    assert usage_of(p) == (5, 6, 3, None, 4)
    assert (p.finish_reason, p.response_model, p.chat_id) == ("STOP", "gemini-2.5-flash", "r1")
    assert t.content_events == 2


def test_ollama_ndjson_counts_and_speeds():
    p, t = stream("ollama_chat", OLLAMA, "application/x-ndjson")
    assert usage_of(p)[:2] == (26, 2)
    assert p.speeds.prompt_per_second == pytest.approx(200.0)
    assert p.speeds.tokens_per_second == pytest.approx(20.0)
    assert p.speeds.server_duration_ms == pytest.approx(2000.0)
    assert (p.finish_reason, t.content_events) == ("stop", 2)


def test_compressed_streams_gzip_br_zstd():
    for enc, data in (("gzip", gzip_per_event(OPENAI_CHAT)), ("br", br(OPENAI_CHAT)), ("zstd", zstd(OPENAI_CHAT))):
        p, t = stream("chat_completions", data, enc=enc)
        assert usage_of(p) == (12, 3, 4, None, 1), enc
        assert p.details == []


def test_chat_stream_without_include_usage_is_missing_not_zero():
    body_ = b'data: {"choices":[{"delta":{"content":"x"}}]}\n\ndata: [DONE]\n\n'
    p, _ = stream("chat_completions", body_)
    assert usage_of(p) == (None, None, None, None, None)
    assert p.usage_source == "missing"


def test_stream_error_event_and_truncation():
    p, _ = stream("messages", b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n')
    assert (p.stream_error, p.stream_error_type) == ("Overloaded", "overloaded_error")
    p, _ = stream("chat_completions", b'data: {"choices":[{"delta":{"content":"x"}}]}\n\ndata: {"choi', complete=False)
    assert p.details == ["stream truncated"]
    p, _ = stream("responses", b'data: {"type":"response.failed","response":{"id":"r","status":"failed","error":{"code":"server_error","message":"boom"}}}\n\n')
    assert (p.stream_error, p.stream_error_type) == ("boom", "server_error")


def test_merge_rule():
    u = Usage(input=10, output=1, cached=5)
    u.merge(Usage(input=0, output=0, cached=0))
    assert (u.input, u.output, u.cached) == (10, 1, 0)  # zero never replaces counts; cached does
    u.merge(Usage(output=9))
    assert (u.input, u.output, u.cached) == (10, 9, 0)


def test_bodies_each_format():
    assert usage_of(body("chat_completions", {"usage": {"prompt_tokens": 3, "completion_tokens": 4}})) == (3, 4, None, None, None)
    assert usage_of(body("embeddings", {"usage": {"prompt_tokens": 8, "total_tokens": 8}})) == (8, None, None, None, None)
    assert usage_of(body("messages", {"id": "m", "stop_reason": "tool_use", "usage": {"input_tokens": 3, "cache_creation_input_tokens": 7, "output_tokens": 2}})) == (10, 2, None, 7, None)
    assert usage_of(body("generate_content", {"usageMetadata": {"promptTokenCount": 4, "toolUsePromptTokenCount": 1, "candidatesTokenCount": 2}})) == (5, 2, None, None, None)
    p = body("ollama_generate", {"response": "x", "done": True, "prompt_eval_count": 3, "eval_count": 4})
    assert usage_of(p)[:2] == (3, 4)
    p = body("infill", [{"timings": {"prompt_n": 1}}, {"timings": {"prompt_n": 5, "predicted_n": 6, "cache_n": 2}}])
    assert usage_of(p)[:3] == (7, 6, 2) and p.usage_source == "server_timings"
    p = body("converse", {"output": {}, "stopReason": "end_turn", "usage": {"inputTokens": 3, "outputTokens": 4, "cacheWriteInputTokens": 2}})
    assert usage_of(p) == (5, 4, None, 2, None) and p.finish_reason == "end_turn"


def test_body_errors_are_marked():
    assert parse_body("chat_completions", b"", None).details == ["empty response body"]
    assert parse_body("chat_completions", b"nope", None).details == ["invalid JSON"]
    assert parse_body("chat_completions", b"xx", "gzip").details[0].startswith("response decompression failed: ")
    assert parse_body("chat_completions", b"{}", "compress").details[0].startswith("response decompression failed: ")
    assert parse_body("chat_completions", b"x" * 100, None, max_body=10).details == ["response body over 10 bytes, not read"]


def test_decoders_deflate_both_forms_and_chains():
    import zlib
    raw = b'{"a": 1}' * 50
    zl = zlib.compress(raw)
    c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    rd = c.compress(raw) + c.flush()
    assert decode_body(zl, "deflate") == raw
    assert decode_body(rd, "deflate") == raw
    assert decode_body(br(zstd(raw)), "zstd, br") == raw
    g = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    member = g.compress(raw) + g.flush()
    assert decode_body(member + member, "gzip") == raw + raw  # concatenated members
    d = decoder_for("deflate")
    assert b"".join(d.feed(zl[i:i + 1]) for i in range(len(zl))) == raw
    with pytest.raises(DecodeError):
        decoder_for("lzma")


def test_request_reading():
    r = read_request(b'{"model":"m","stream":true,"messages":[{"role":"system","content":"s"},{"role":"user","content":"a"},{"role":"assistant","content":"b"},{"role":"user","content":"c"}]}')
    assert (r.model, r.stream, r.chat_round) == ("m", True, 2)
    assert read_request(b'{"contents":[{"parts":[{"text":"x"}]}]}').chat_round == 1
    assert read_request(b'{"model":"m","input":"hi"}').chat_round == 1
    assert read_request(b"not json").problem.kind == "invalid_request"


@pytest.mark.parametrize("path,api,model,stream", [
    ("/v1/chat/completions", "chat_completions", None, False),
    ("/v1/messages", "messages", None, False),
    ("/v1/messages/count_tokens", "count_tokens", None, False),
    ("/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", "generate_content", "gemini-2.5-flash", True),
    ("/model/anthropic.claude-3-haiku/converse-stream", "converse", "anthropic.claude-3-haiku", True),
    ("/upstream/qwen3/v1/chat/completions", "chat_completions", "qwen3", False),
    ("/api/chat", "ollama_chat", None, False),
    ("/infill", "infill", None, False),
])
def test_api_matching(path, api, model, stream):
    m = match_api("POST", path)
    assert (m.api, m.model_from_path, m.stream_from_path) == (api, model, stream)


def test_non_llm_paths_and_methods_are_ignored():
    assert match_api("GET", "/v1/chat/completions") is None
    assert match_api("POST", "/upload") is None
    assert match_api("POST", "/upstream/m/props") is None


def test_provider_decision():
    chat = match_api("POST", "/v1/chat/completions")
    assert decide_provider(chat, "api.openai.com", 443, set()) == "openai"
    assert decide_provider(chat, "x.openai.azure.com", 443, set()) == "azure.ai.openai"
    assert decide_provider(chat, "127.0.0.1", 8080, {"llama.cpp"}) == "llama.cpp"
    assert decide_provider(chat, "127.0.0.1", 8000, {"vllm"}) == "vllm"
    assert decide_provider(chat, "127.0.0.1", 8000, set()) == "openai"
    assert decide_provider(match_api("POST", "/v1/messages"), "127.0.0.1", 1, set()) == "anthropic"
    assert decide_provider(match_api("POST", "/api/chat"), "127.0.0.1", 11434, set()) == "ollama"
    gem = match_api("POST", "/v1/models/g:generateContent")
    assert decide_provider(gem, "us-central1-aiplatform.googleapis.com", 443, set()) == "gcp.vertex_ai"
    assert decide_provider(gem, "127.0.0.1", 1, set()) == "gcp.gemini"


def _all_streams():
    """Every stream fixture we have: unit fixtures, the e2e builders, acceptance SSE cases."""
    import upstream as u
    from conftest import load_cases
    yield "chat_completions", OPENAI_CHAT
    yield "messages", ANTHROPIC
    yield "responses", RESPONSES
    yield "generate_content", GEMINI
    yield "ollama_chat", OLLAMA
    yield "chat_completions", b"".join(u.openai_chat_stream(["a", "", "b"], usage=u.openai_usage(3, 2)))
    yield "responses", b"".join(u.openai_responses_stream(["x", "y"]))
    yield "messages", b"".join(u.anthropic_messages_stream(["p", "q"]))
    yield "generate_content", b"".join(u.gemini_sse(["m", "n"]))
    yield "ollama_chat", b"".join(u.ollama_chat_ndjson(["k", "l"]))
    # Reasoning, tool calls, a mid-stream usage chunk, vLLM metrics, a finish mid-stream.
    yield "chat_completions", (
        b'data: {"id":"c","model":"m","choices":[{"delta":{"role":"assistant"}}]}\n\n'
        b'data: {"id":"c","choices":[{"delta":{"reasoning_content":"think"}}]}\n\n'
        b'data: {"id":"c","choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{"}}]}}]}\n\n'
        b'data: {"id":"c","choices":[{"delta":{"content":"x"},"finish_reason":"length"}],"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\n'
        b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":6},"metrics":{"mean_itl_ms":10}}\n\n')
    for case in load_cases("llama_swap_cases.json"):
        if "event-stream" in case["response"]["headers"].get("Content-Type", ""):
            from aistats_engine.wire.formats import match_api
            yield match_api("POST", case["request"]["path"]).api, case["response"]["body"].encode()


def test_short_path_never_changes_a_result():
    for api, body in _all_streams():
        ctype = "application/x-ndjson" if api.startswith("ollama") else "text/event-stream"
        results = []
        for fast in (True, False):
            obs = StreamObserver(api, framer_for(ctype)(), None, 0.0)
            obs.reader.fast = fast
            obs.feed(body, 0.1)
            results.append((obs.finish(True), obs.timing().content_events))
        assert results[0] == results[1], (api, body[:80])
