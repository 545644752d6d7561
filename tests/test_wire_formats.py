"""The wire-format registry: every format is one registered unit, reachable by its paths, and
read by its own event reader (Bedrock InvokeModel streams included)."""

from __future__ import annotations

import base64
import json

import pytest

from aistats_engine.observer import StreamObserver, parse_body

from aistats_engine.wire.formats import by_api, match_api
from aistats_engine.wire.framing import AWSEventStreamFramer
from fixtures import BEDROCK_INVOKE_CLAUDE, BEDROCK_INVOKE_LLAMA, aws_frame

def test_upstream_prefix_and_path_models():
    m = match_api("POST", "/upstream/qwen%2F3/v1/chat/completions")
    assert (m.api, m.model_from_path) == ("chat_completions", "qwen/3")
    m = match_api("POST", "/model/meta.llama3-8b/invoke")
    assert (m.api, m.model_from_path, m.stream_from_path, m.provider) == (
        "invoke", "meta.llama3-8b", False, "aws.bedrock")


def _aws_stream(body: bytes, step: int):
    obs = StreamObserver(by_api("invoke"), AWSEventStreamFramer(), None, 0.0)
    for i in range(0, len(body), step):
        obs.feed(body[i:i + step], 0.01 * (i + 1))
    return obs.finish(complete=True), obs.timing()


@pytest.mark.parametrize("step", [10_000, 13, 1])
def test_bedrock_invoke_stream_claude_unwrapped(step):
    p, t = _aws_stream(BEDROCK_INVOKE_CLAUDE, step)
    u = p.usage
    assert (u.input, u.output, p.finish_reason, p.chat_id, p.response_model) == (
        9, 4, "end_turn", "msg_b1", "claude-3-5-sonnet")
    assert p.stream_complete and t.content_events == 2 and p.problems == []


def test_bedrock_invoke_stream_other_family_and_metrics_fallback():
    p, t = _aws_stream(BEDROCK_INVOKE_LLAMA, 7)
    assert (p.usage.input, p.usage.output, p.finish_reason, t.content_events) == (7, 2, "stop", 2)
    assert p.stream_complete
    # A family whose chunks carry no usage of their own: the invocation metrics give it.
    inner = base64.b64encode(json.dumps({"outputText": "x", "amazon-bedrock-invocationMetrics": {
        "inputTokenCount": 3, "outputTokenCount": 1}}).encode()).decode()
    body = aws_frame("chunk", json.dumps({"bytes": inner}).encode())
    p, t = _aws_stream(body, 5)
    assert (p.usage.input, p.usage.output, t.content_events, p.stream_complete) == (3, 1, 1, True)


def test_bedrock_exception_frame_is_an_error_and_bad_base64_is_marked():
    body = (aws_frame("chunk", b'{"bytes":"!!!not base64!!!"}')
            + aws_frame("throttlingException", b'{"message":"Too many requests"}',
                        header_name=":exception-type"))
    p, _ = _aws_stream(body, 9)
    assert p.stream_error == "Too many requests"
    assert [pr.kind for pr in p.problems] == ["invalid_json"]


def test_bedrock_invoke_whole_bodies():
    claude = {"id": "msg_1", "model": "claude", "type": "message", "stop_reason": "end_turn",
              "usage": {"input_tokens": 5, "output_tokens": 2, "cache_read_input_tokens": 10}}
    p = parse_body(by_api("invoke"), json.dumps(claude).encode(), None)
    assert (p.usage.input, p.usage.cached, p.usage.output) == (15, 10, 2)
    llama = {"generation": "hi", "prompt_token_count": 4, "generation_token_count": 1,
             "stop_reason": "stop"}
    p = parse_body(by_api("invoke"), json.dumps(llama).encode(), None)
    assert (p.usage.input, p.usage.output, p.finish_reason) == (4, 1, "stop")
