"""aistats_engine.conversation: one structured view of an exchange, for every wire shape, and its
plain-text rendering. Never raises, whatever the bodies."""

from __future__ import annotations

import base64
import json
import random

import pytest

from aistats_engine.conversation import MAX_TEXT, conversation, render_text
from fixtures import (ANTHROPIC, BEDROCK_INVOKE_LLAMA, GEMINI, OLLAMA, OPENAI_CHAT, RESPONSES,
                      aws_frame, bedrock_invoke_stream, sse)

SSE = "text/event-stream"
JSON = "application/json"
AWS = "application/vnd.amazon.eventstream"
NDJSON = "application/x-ndjson"


def parts_of(conv: dict, i: int) -> list[dict]:
    return conv["messages"][i]["parts"]


def types(conv: dict) -> list[tuple[str, list[str]]]:
    return [(m["role"], [p["type"] for p in m["parts"]]) for m in conv["messages"]]


# -- OpenAI chat completions -----------------------------------------------------------------------

CHAT_REQ = {
    "model": "gpt-4o",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
        {"role": "user", "content": [
            {"type": "text", "text": "Weather in Paris?"},
            {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/AAAA"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        ]},
        {"role": "assistant", "content": None, "reasoning_content": "Need the tool.",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"},
        {"role": "system", "content": "late system note"},
        {"role": "user", "content": "Thanks"},
    ],
    "tools": [{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
}


def test_openai_chat_request():
    c = conversation("chat_completions", CHAT_REQ, None, None)
    assert c["api"] == "chat_completions" and c["model"] == "gpt-4o"
    assert c["system"] == ["Be brief.", "Use tools."]  # leading system + developer moved
    assert c["tools"] == [{"name": "get_weather", "description": "Current weather",
                           "parameters": CHAT_REQ["tools"][0]["function"]["parameters"]}]
    assert types(c) == [("user", ["text", "image", "image"]),
                        ("assistant", ["reasoning", "tool_call"]),
                        ("tool", ["tool_result"]),
                        ("system", ["text"]),  # not leading: stays in place
                        ("user", ["text"])]
    img, url = parts_of(c, 0)[1:]
    assert img == {"type": "image", "name": "image/jpeg", "content": "data:image/jpeg;base64,/9j/AAAA"}
    assert url["content"] == "https://example.com/cat.png"
    assert parts_of(c, 1)[1] == {"type": "tool_call", "id": "call_1", "name": "get_weather",
                                 "arguments": "{\"city\":\"Paris\"}"}
    assert parts_of(c, 2)[0]["id"] == "call_1" and parts_of(c, 2)[0]["content"] == "18C, sunny"
    assert c["response"] is None and c["notes"] == []


def test_openai_chat_stream_with_reasoning_and_tool_calls():
    body = sse(
        {"id": "c1", "model": "gpt-4o-2024", "choices": [{"index": 0, "delta": {"role": "assistant", "reasoning_content": "Think"}}]},
        {"id": "c1", "choices": [{"index": 0, "delta": {"reasoning_content": "ing."}}]},
        {"id": "c1", "choices": [{"index": 0, "delta": {"content": "Let me "}}]},
        {"id": "c1", "choices": [{"index": 0, "delta": {"content": "check."}}]},
        {"id": "c1", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_9", "type": "function", "function": {"name": "get_weather", "arguments": "{\"ci"}}]}}]},
        {"id": "c1", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "ty\":\"Oslo\"}"}}]}}]},
        {"id": "c1", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 1, "id": "call_10", "function": {"name": "get_time", "arguments": "{}"}}]}}]},
        {"id": "c1", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        {"id": "c1", "choices": [], "usage": {"prompt_tokens": 50, "completion_tokens": 9}},
        "[DONE]")
    c = conversation("chat_completions", CHAT_REQ, body, SSE + "; charset=utf-8")
    r = c["response"]
    assert r["text"] == "Let me check." and r["reasoning"] == "Thinking."
    assert r["tool_calls"] == [
        {"type": "tool_call", "id": "call_9", "name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"},
        {"type": "tool_call", "id": "call_10", "name": "get_time", "arguments": "{}"}]
    assert r["finish_reason"] == "tool_calls"
    assert r["usage"] == {"prompt_tokens": 50, "completion_tokens": 9}
    assert r["model"] == "gpt-4o-2024" and r["id"] == "c1" and r["error"] is None
    assert c["model"] == "gpt-4o"  # the request's
    assert c["notes"] == []


def test_openai_chat_fixture_stream():
    r = conversation("chat_completions", None, OPENAI_CHAT, SSE)["response"]
    assert r["text"] == "Hello" and r["finish_reason"] == "stop"
    assert r["usage"]["prompt_tokens_details"] == {"cached_tokens": 4}


def test_openai_chat_whole_body():
    body = json.dumps({"id": "c2", "model": "gpt-4o", "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": "Sure.", "reasoning_content": "hm",
        "tool_calls": [{"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4}}).encode()
    c = conversation("chat_completions", {"messages": [{"role": "user", "content": "x"}]}, body, JSON)
    r = c["response"]
    assert (r["text"], r["reasoning"], r["finish_reason"]) == ("Sure.", "hm", "tool_calls")
    assert r["tool_calls"] == [{"type": "tool_call", "id": "t1", "name": "f", "arguments": "{\"a\":1}"}]
    assert r["usage"] == {"prompt_tokens": 3, "completion_tokens": 4}
    assert c["model"] == "gpt-4o"  # none in the request: the response's


def test_content_type_missing_stream_is_sniffed():
    r = conversation("chat_completions", None, OPENAI_CHAT, None)["response"]
    assert r["text"] == "Hello"


def test_error_body_and_error_event():
    c = conversation("chat_completions", None, b'{"error": {"message": "bad key", "type": "auth"}}', JSON)
    assert c["response"]["error"] == "bad key" and c["response"]["text"] is None
    body = sse({"choices": [{"index": 0, "delta": {"content": "par"}}]},
               {"error": {"message": "overloaded"}})
    r = conversation("chat_completions", None, body, SSE)["response"]
    assert r["text"] == "par" and r["error"] == "overloaded"


def test_invalid_stream_events_are_noted():
    body = b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"ok\"}}]}\n\ndata: {nope\n\n"
    c = conversation("chat_completions", None, body, SSE)
    assert c["response"]["text"] == "ok"
    assert any("not valid JSON" in n for n in c["notes"])


# -- OpenAI Responses ------------------------------------------------------------------------------

RESP_REQ = {
    "model": "gpt-5", "instructions": "You are terse.",
    "input": [
        {"role": "developer", "content": "dev note"},
        {"role": "user", "content": [{"type": "input_text", "text": "What is this?"},
                                     {"type": "input_image", "image_url": "https://x/y.png"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "Look."}]},
        {"type": "function_call", "id": "fc_1", "call_id": "call_a", "name": "lookup", "arguments": "{\"q\":1}"},
        {"type": "function_call_output", "call_id": "call_a", "output": "a cat"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "A cat."}]},
        {"role": "user", "content": "And now?"},
    ],
    "tools": [{"type": "function", "name": "lookup", "description": "Look up", "parameters": {"type": "object"}},
              {"type": "web_search_preview"}],
}


def test_responses_request():
    c = conversation("responses", RESP_REQ, None, None)
    assert c["system"] == ["You are terse.", "dev note"]
    assert [t["name"] for t in c["tools"]] == ["lookup", "web_search_preview"]
    assert types(c) == [("user", ["text", "image"]),
                        ("assistant", ["reasoning", "tool_call"]),
                        ("tool", ["tool_result"]),
                        ("assistant", ["text"]),
                        ("user", ["text"])]
    assert parts_of(c, 1)[1]["id"] == "call_a" and parts_of(c, 2)[0]["content"] == "a cat"
    assert not any("_items" in m for m in c["messages"])
    c = conversation("responses", {"input": "hello"}, None, None)
    assert c["messages"] == [{"role": "user", "parts": [{"type": "text", "text": "hello"}]}]


def test_responses_stream():
    body = sse(
        {"type": "response.created", "response": {"id": "resp_1", "model": "gpt-5", "status": "in_progress"}},
        {"type": "response.reasoning_summary_text.delta", "delta": "Plan."},
        {"type": "response.output_text.delta", "delta": "Hi"},
        {"type": "response.output_item.added", "output_index": 2, "item": {"type": "function_call", "id": "fc_1", "call_id": "call_z", "name": "lookup", "arguments": ""}},
        {"type": "response.function_call_arguments.delta", "output_index": 2, "delta": "{\"q\":"},
        {"type": "response.function_call_arguments.delta", "output_index": 2, "delta": "2}"},
        {"type": "response.completed", "response": {"id": "resp_1", "model": "gpt-5", "status": "completed", "usage": {"input_tokens": 20, "output_tokens": 30}}},
        name_key="type")
    r = conversation("responses", RESP_REQ, body, SSE)["response"]
    assert (r["text"], r["reasoning"]) == ("Hi", "Plan.")
    assert r["tool_calls"] == [{"type": "tool_call", "id": "call_z", "name": "lookup", "arguments": "{\"q\":2}"}]
    assert r["finish_reason"] == "completed" and r["id"] == "resp_1"
    assert r["usage"] == {"input_tokens": 20, "output_tokens": 30}
    assert conversation("responses", None, RESPONSES, SSE)["response"]["text"] == "Hi!"


def test_responses_whole_body():
    body = json.dumps({"id": "resp_2", "object": "response", "model": "gpt-5", "status": "completed", "output": [
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "r"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Done"}]},
        {"type": "function_call", "call_id": "c", "name": "n", "arguments": "{}"}],
        "usage": {"input_tokens": 1, "output_tokens": 2}}).encode()
    r = conversation("responses", None, body, JSON)["response"]
    assert (r["text"], r["reasoning"], r["finish_reason"]) == ("Done", "r", "completed")
    assert r["tool_calls"][0]["name"] == "n"


# -- Anthropic messages ----------------------------------------------------------------------------

PNG = base64.b64encode(b"\x89PNG fake").decode()
ANTH_REQ = {
    "model": "claude-sonnet-4-5", "max_tokens": 100,
    "system": [{"type": "text", "text": "You are Claude.", "cache_control": {"type": "ephemeral"}}],
    "tools": [{"name": "get_weather", "description": "Weather", "input_schema": {"type": "object"}},
              {"type": "web_search_20250305", "name": "web_search"}],
    "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Look"},
                                     {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "I should call.", "signature": "s"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Rome"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "22C"}]},
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": "boom", "is_error": True}]},
    ],
}


def test_anthropic_request():
    c = conversation("messages", ANTH_REQ, None, None)
    assert c["system"] == "You are Claude."
    assert c["tools"][0] == {"name": "get_weather", "description": "Weather", "parameters": {"type": "object"}}
    assert c["tools"][1]["name"] == "web_search"
    assert types(c) == [("user", ["text", "image"]),
                        ("assistant", ["reasoning", "text", "tool_call"]),
                        ("user", ["tool_result", "tool_result"])]
    assert parts_of(c, 0)[1] == {"type": "image", "name": "image/png", "content": f"data:image/png;base64,{PNG}"}
    assert parts_of(c, 1)[2] == {"type": "tool_call", "id": "toolu_1", "name": "get_weather",
                                 "arguments": "{\"city\":\"Rome\"}"}
    ok, err = parts_of(c, 2)
    assert ok["content"] == "22C" and ok["id"] == "toolu_1" and "error" not in ok
    assert err["error"] is True and err["content"] == "boom"


def test_anthropic_stream_thinking_and_tool_use():
    body = sse(
        {"type": "message_start", "message": {"id": "msg_1", "model": "claude-sonnet-4-5", "usage": {"input_tokens": 10, "output_tokens": 1}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "Hmm."}},
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Sure"}},
        {"type": "content_block_stop", "index": 1},
        {"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "toolu_9", "name": "get_weather", "input": {}}},
        {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": "{\"city\":"}},
        {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": "\"Rome\"}"}},
        {"type": "content_block_stop", "index": 2},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 40}},
        {"type": "message_stop"},
        name_key="type")
    c = conversation("messages", ANTH_REQ, body, SSE)
    r = c["response"]
    assert (r["text"], r["reasoning"], r["finish_reason"]) == ("Sure", "Hmm.", "tool_use")
    assert r["tool_calls"] == [{"type": "tool_call", "id": "toolu_9", "name": "get_weather",
                                "arguments": "{\"city\":\"Rome\"}"}]
    assert r["usage"] == {"input_tokens": 10, "output_tokens": 40}  # message_start, then delta
    assert (r["model"], r["id"]) == ("claude-sonnet-4-5", "msg_1")
    r = conversation("messages", None, ANTHROPIC, SSE)["response"]  # CRLF-separated events
    assert r["text"] == "Hi there" and r["usage"]["cache_read_input_tokens"] == 100


def test_anthropic_whole_body():
    body = json.dumps({"id": "msg_2", "type": "message", "role": "assistant", "model": "claude-x",
                       "content": [{"type": "thinking", "thinking": "t"}, {"type": "text", "text": "A"},
                                   {"type": "tool_use", "id": "tu", "name": "f", "input": {"x": [1]}}],
                       "stop_reason": "tool_use", "usage": {"input_tokens": 5, "output_tokens": 6}}).encode()
    r = conversation("messages", None, body, JSON)["response"]
    assert (r["text"], r["reasoning"], r["finish_reason"]) == ("A", "t", "tool_use")
    assert r["tool_calls"] == [{"type": "tool_call", "id": "tu", "name": "f", "arguments": "{\"x\":[1]}"}]


# -- Gemini ----------------------------------------------------------------------------------------

GEM_REQ = {
    "systemInstruction": {"parts": [{"text": "Be a poet."}]},
    "contents": [
        {"role": "user", "parts": [{"text": "Describe"}, {"inlineData": {"mimeType": "image/webp", "data": "UklGR"}},
                                   {"inline_data": {"mime_type": "application/pdf", "data": "JVBER"}}]},
        {"role": "model", "parts": [{"text": "pondering", "thought": True},
                                    {"functionCall": {"name": "lookup", "args": {"q": "x"}}}]},
        {"role": "function", "parts": [{"functionResponse": {"name": "lookup", "response": {"result": 42}}}]},
        {"parts": [{"text": "Go on"}]},
    ],
    "tools": [{"functionDeclarations": [{"name": "lookup", "description": "Look", "parameters": {"type": "OBJECT"}}]},
              {"googleSearch": {}}],
}


def test_gemini_request():
    c = conversation("generate_content", GEM_REQ, None, None, model="gemini-2.5-pro")
    assert c["system"] == "Be a poet." and c["model"] == "gemini-2.5-pro"
    assert c["tools"] == [{"name": "lookup", "description": "Look", "parameters": {"type": "OBJECT"}},
                          {"name": "googleSearch", "description": None, "parameters": None}]
    assert types(c) == [("user", ["text", "image", "other"]),
                        ("assistant", ["reasoning", "tool_call"]),
                        ("function", ["tool_result"]),
                        ("user", ["text"])]
    assert parts_of(c, 0)[1]["content"] == "data:image/webp;base64,UklGR"
    assert parts_of(c, 0)[2]["name"] == "application/pdf"
    assert parts_of(c, 1)[1]["arguments"] == "{\"q\":\"x\"}"
    assert parts_of(c, 2)[0] == {"type": "tool_result", "id": None, "name": "lookup", "content": "{\"result\":42}"}


def test_gemini_stream_and_array_body():
    body = sse(
        {"candidates": [{"content": {"role": "model", "parts": [{"text": "mull", "thought": True}]}}], "modelVersion": "gemini-2.5-flash", "responseId": "g1"},
        {"candidates": [{"content": {"role": "model", "parts": [{"text": "Roses"}]}}]},
        {"candidates": [{"content": {"role": "model", "parts": [{"functionCall": {"name": "lookup", "args": {"q": 1}}}]}, "finishReason": "STOP"}],
         "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 2, "thoughtsTokenCount": 3}})
    r = conversation("generate_content", GEM_REQ, body, SSE)["response"]
    assert (r["text"], r["reasoning"], r["finish_reason"]) == ("Roses", "mull", "STOP")
    assert r["tool_calls"] == [{"type": "tool_call", "id": None, "name": "lookup", "arguments": "{\"q\":1}"}]
    assert r["usage"] == {"promptTokenCount": 5, "candidatesTokenCount": 2, "thoughtsTokenCount": 3}
    assert (r["model"], r["id"]) == ("gemini-2.5-flash", "g1")
    # streamGenerateContent without alt=sse: one JSON array
    arr = json.dumps([{"candidates": [{"content": {"parts": [{"text": "A"}]}}]},
                      {"candidates": [{"content": {"parts": [{"text": "B"}]}, "finishReason": "STOP"}],
                       "usageMetadata": {"promptTokenCount": 1}}]).encode()
    r = conversation("generate_content", None, arr, JSON)["response"]
    assert (r["text"], r["finish_reason"], r["usage"]) == ("AB", "STOP", {"promptTokenCount": 1})
    assert conversation("generate_content", None, GEMINI, SSE)["response"]["text"] == "AB"


# -- Bedrock ---------------------------------------------------------------------------------------

CONVERSE_REQ = {
    "system": [{"text": "Sys A"}, {"cachePoint": {"type": "default"}}, {"text": "Sys B"}],
    "messages": [
        {"role": "user", "content": [{"text": "Hi"}, {"image": {"format": "png", "source": {"bytes": "iVBOR"}}}]},
        {"role": "assistant", "content": [{"reasoningContent": {"reasoningText": {"text": "why"}}},
                                          {"toolUse": {"toolUseId": "tu1", "name": "calc", "input": {"x": 1}}}]},
        {"role": "user", "content": [{"toolResult": {"toolUseId": "tu1", "content": [{"json": {"y": 2}}, {"text": "ok"}], "status": "error"}}]},
    ],
    "toolConfig": {"tools": [{"toolSpec": {"name": "calc", "description": "Calc", "inputSchema": {"json": {"type": "object"}}}}]},
}


def test_converse_request():
    c = conversation("converse", CONVERSE_REQ, None, None, model="anthropic.claude-3")
    assert c["system"] == ["Sys A", "Sys B"] and c["model"] == "anthropic.claude-3"
    assert c["tools"] == [{"name": "calc", "description": "Calc", "parameters": {"type": "object"}}]
    assert types(c) == [("user", ["text", "image"]), ("assistant", ["reasoning", "tool_call"]),
                        ("user", ["tool_result"])]
    assert parts_of(c, 0)[1]["content"] == "data:image/png;base64,iVBOR"
    res = parts_of(c, 2)[0]
    assert res["content"] == "{\"y\":2}\nok" and res["error"] is True and res["id"] == "tu1"


def test_converse_stream_in_event_stream_frames():
    frames = [
        aws_frame("messageStart", b'{"role":"assistant"}'),
        aws_frame("contentBlockDelta", b'{"contentBlockIndex":0,"delta":{"reasoningContent":{"text":"hm"}}}'),
        aws_frame("contentBlockDelta", b'{"contentBlockIndex":1,"delta":{"text":"Hel"}}'),
        aws_frame("contentBlockDelta", b'{"contentBlockIndex":1,"delta":{"text":"lo"}}'),
        aws_frame("contentBlockStart", b'{"contentBlockIndex":2,"start":{"toolUse":{"toolUseId":"t9","name":"calc"}}}'),
        aws_frame("contentBlockDelta", b'{"contentBlockIndex":2,"delta":{"toolUse":{"input":"{\\"x\\":"}}}'),
        aws_frame("contentBlockDelta", b'{"contentBlockIndex":2,"delta":{"toolUse":{"input":"3}"}}}'),
        aws_frame("messageStop", b'{"stopReason":"tool_use"}'),
        aws_frame("metadata", b'{"usage":{"inputTokens":7,"outputTokens":5},"metrics":{"latencyMs":10}}'),
    ]
    r = conversation("converse", CONVERSE_REQ, b"".join(frames), AWS)["response"]
    assert (r["text"], r["reasoning"], r["finish_reason"]) == ("Hello", "hm", "tool_use")
    assert r["tool_calls"] == [{"type": "tool_call", "id": "t9", "name": "calc", "arguments": "{\"x\":3}"}]
    assert r["usage"] == {"inputTokens": 7, "outputTokens": 5}


def test_converse_whole_body():
    body = json.dumps({"output": {"message": {"role": "assistant", "content": [
        {"reasoningContent": {"reasoningText": {"text": "r"}}}, {"text": "T"},
        {"toolUse": {"toolUseId": "u", "name": "calc", "input": {"a": 1}}}]}},
        "stopReason": "tool_use", "usage": {"inputTokens": 1, "outputTokens": 2}}).encode()
    r = conversation("converse", None, body, JSON)["response"]
    assert (r["text"], r["reasoning"], r["finish_reason"]) == ("T", "r", "tool_use")
    assert r["tool_calls"][0]["arguments"] == "{\"a\":1}"


INVOKE_REQ = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 50, "system": "Claude on Bedrock",
              "messages": [{"role": "user", "content": "Hi"}]}


def test_bedrock_invoke_claude_stream_is_unwrapped():
    body = bedrock_invoke_stream([
        {"type": "message_start", "message": {"id": "msg_b", "model": "claude-3-5", "usage": {"input_tokens": 9, "output_tokens": 1}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "!"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "tb", "name": "f", "input": {}}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{}"}},
        {"type": "content_block_stop", "index": 1},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 4}},
        {"type": "message_stop"},
    ], metrics={"inputTokenCount": 9, "outputTokenCount": 4})
    c = conversation("invoke", INVOKE_REQ, body, AWS, model="anthropic.claude-3-5-sonnet")
    r = c["response"]
    assert (r["text"], r["finish_reason"], r["id"]) == ("Hi!", "end_turn", "msg_b")
    assert r["tool_calls"] == [{"type": "tool_call", "id": "tb", "name": "f", "arguments": "{}"}]
    assert r["usage"]["input_tokens"] == 9 and r["usage"]["output_tokens"] == 4
    assert r["usage"]["amazon-bedrock-invocationMetrics"] == {"inputTokenCount": 9, "outputTokenCount": 4}
    assert c["system"] == "Claude on Bedrock" and types(c) == [("user", ["text"])]
    assert c["model"] == "anthropic.claude-3-5-sonnet"  # the request names none: the path's
    assert conversation("invoke", INVOKE_REQ, body, AWS)["model"] == "claude-3-5"  # else served
    # On a path we could not name (api None), chunk frames are unwrapped all the same.
    assert conversation(None, None, body, AWS)["response"]["text"] == "Hi!"


def test_bedrock_invoke_other_family_and_damaged_frames():
    r = conversation("invoke", {"prompt": "Say hello"}, BEDROCK_INVOKE_LLAMA, AWS)["response"]
    assert r["text"] == "Hello"
    good = aws_frame("chunk", json.dumps({"bytes": base64.b64encode(b'{"outputText":"ok"}').decode()}).encode())
    bad = bytearray(good)
    bad[-1] ^= 0xFF  # message CRC broken: that frame skipped
    notbase64 = aws_frame("chunk", b'{"bytes": "!!!"}')
    c = conversation("invoke", None, bytes(bad) + notbase64 + good + good[:20], AWS)
    assert c["response"]["text"] == "ok"
    notes = " ".join(c["notes"])
    assert "damaged" in notes and "not valid JSON" in notes and "ends inside" in notes


# -- Ollama ----------------------------------------------------------------------------------------

def test_ollama_chat_request_and_stream():
    req = {"model": "llama3.2", "messages": [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "what is in this?", "images": ["iVBORw0KGgo"]},
        {"role": "assistant", "content": "", "thinking": "hmm",
         "tool_calls": [{"function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]},
        {"role": "tool", "tool_name": "add", "content": "3"}],
        "tools": [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]}
    body = (json.dumps({"model": "llama3.2", "message": {"role": "assistant", "content": "", "thinking": "so"}, "done": False}) + "\n"
            + json.dumps({"model": "llama3.2", "message": {"role": "assistant", "content": "It is "}, "done": False}) + "\n"
            + json.dumps({"model": "llama3.2", "message": {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "add", "arguments": {"a": 3}}}]}, "done": False}) + "\n"
            + json.dumps({"model": "llama3.2", "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop", "prompt_eval_count": 26, "eval_count": 2}) + "\n").encode()
    c = conversation("ollama_chat", req, body, NDJSON)
    assert c["system"] == "sys"
    assert types(c) == [("user", ["text", "image"]), ("assistant", ["reasoning", "tool_call"]),
                        ("tool", ["tool_result"])]
    assert parts_of(c, 1)[1]["arguments"] == "{\"a\":1,\"b\":2}"
    assert parts_of(c, 2)[0]["name"] == "add" and parts_of(c, 2)[0]["content"] == "3"
    r = c["response"]
    assert (r["text"], r["reasoning"], r["finish_reason"]) == ("It is ", "so", "stop")
    assert r["tool_calls"] == [{"type": "tool_call", "id": None, "name": "add", "arguments": "{\"a\":3}"}]
    assert r["usage"] == {"prompt_eval_count": 26, "eval_count": 2}
    # the fixture stream, its content type missing (NDJSON sniffed), and a whole body
    assert conversation("ollama_chat", None, OLLAMA, None)["response"]["text"] == "Hi!"
    whole = json.dumps({"model": "m", "message": {"role": "assistant", "content": "W"}, "done": True}).encode()
    assert conversation("ollama_chat", None, whole, JSON)["response"]["text"] == "W"


# -- other shapes ----------------------------------------------------------------------------------

def test_best_effort_shapes():
    c = conversation(None, {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": [{"type": "weird", "text": "w"}]}]}, None, None)
    assert types(c) == [("user", ["text"]), ("bot", ["other"])]
    c = conversation("completions", {"model": "m", "prompt": ["a", "b"], "suffix": "z"}, None, None)
    assert types(c) == [("user", ["text"]), ("user", ["text"]), ("user", ["other"])]
    c = conversation("ollama_generate", {"model": "m", "system": "s", "prompt": "p", "images": ["AAA"]}, None, None)
    assert c["system"] == "s" and types(c) == [("user", ["text", "image"])]
    body = b'{"content": "llama.cpp says", "stop": true}'
    assert conversation("completions", None, body, JSON)["response"]["text"] == "llama.cpp says"
    c = conversation("chat_completions", None, b"<html>nope</html>", "text/html")
    assert c["response"]["text"] is None and any("not JSON" in n for n in c["notes"])
    c = conversation("chat_completions", b"not json", b"", JSON)
    assert any("request body is not valid JSON" in n for n in c["notes"])
    assert any("empty" in n for n in c["notes"])
    c = conversation("chat_completions", b'{"messages":[{"role":"user","content":"raw"}]}', None, None)
    assert parts_of(c, 0)[0]["text"] == "raw"  # raw JSON bytes are parsed


def test_long_texts_are_cut_and_noted():
    big = "x" * (MAX_TEXT + 10)
    req = {"messages": [{"role": "user", "content": big},
                        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + big}}]}]}
    body = sse({"choices": [{"index": 0, "delta": {"content": big}}]})
    c = conversation("chat_completions", req, body, SSE)
    assert len(parts_of(c, 0)[0]["text"]) == MAX_TEXT
    img = parts_of(c, 1)[0]
    assert img["content"] is None and img["name"] == "image/png" and "left out" in img["text"]
    assert len(c["response"]["text"]) == MAX_TEXT
    assert sum("cut" in n for n in c["notes"]) >= 2 and any("left out" in n for n in c["notes"])
    many = {"messages": [{"role": "user", "content": f"m{i}"} for i in range(3000)]}
    assert len(conversation("chat_completions", many, None, None)["messages"]) == 3000  # all kept


# -- render_text -----------------------------------------------------------------------------------

def test_render_text_sections():
    body = sse(
        {"id": "c1", "model": "gpt-4o", "choices": [{"index": 0, "delta": {"reasoning_content": "Because."}}]},
        {"id": "c1", "choices": [{"index": 0, "delta": {"content": "Final answer."}}]},
        {"id": "c1", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_q", "function": {"name": "get_weather", "arguments": "{\"city\":\"Nice\"}"}}]}}]},
        {"id": "c1", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 7, "completion_tokens": 2}},
        "[DONE]")
    c = conversation("chat_completions", CHAT_REQ, body, SSE)
    text = render_text(c)
    for want in ("=== System ===", "Be brief.", "=== Tools (1) ===", "- get_weather: Current weather",
                 "=== Messages (5) ===", "--- [1] user ---", "Weather in Paris?", "[image image/jpeg]",
                 "[tool call] get_weather (id call_1): {\"city\":\"Paris\"}",
                 "[tool result] (id call_1):\n18C, sunny", "[reasoning]\nNeed the tool.",
                 "=== Response ===", "Reasoning:\nBecause.", "Answer:\nFinal answer.",
                 "[tool call] get_weather (id call_q): {\"city\":\"Nice\"}",
                 "Finish reason: stop", "Usage: {\"prompt_tokens\":7,\"completion_tokens\":2}"):
        assert want in text, want
    assert "/9j/AAAA" not in text  # image data is not printed
    assert text.index("=== System ===") < text.index("=== Response ===")
    first = render_text(c, response_first=True)
    assert first.index("=== Response ===") < first.index("=== Request ===") < first.index("=== System ===")
    short = render_text(c, max_chars=100)
    assert len(short) < 140 and short.endswith("(cut at 100 characters)")
    assert "Answer:" not in render_text(conversation("chat_completions", CHAT_REQ, None, None))
    assert "(no answer)" in render_text(conversation("chat_completions", None, b"{}", JSON))


def test_render_text_never_raises_on_odd_input():
    for conv in ({}, {"messages": [None, {"parts": [1, None, {"type": "image"}]}]},
                 {"system": 5, "tools": [None, {"parameters": object()}], "response": {"tool_calls": [3]},
                  "notes": [None]}):
        assert isinstance(render_text(conv), str)
    assert isinstance(render_text(None), str)  # type: ignore[arg-type]


# -- garbage never raises --------------------------------------------------------------------------

APIS = [None, "chat_completions", "completions", "responses", "messages", "generate_content",
        "converse", "invoke", "ollama_chat", "ollama_generate", "embeddings", "nonsense"]
CTYPES = [None, SSE, JSON, AWS, NDJSON, "text/plain", ";;;"]
VALID_BODIES = [OPENAI_CHAT, ANTHROPIC, RESPONSES, GEMINI, OLLAMA, BEDROCK_INVOKE_LLAMA]
VALID_REQS = [CHAT_REQ, RESP_REQ, ANTH_REQ, GEM_REQ, CONVERSE_REQ, INVOKE_REQ]


def _random_json(rng: random.Random, depth: int = 0):
    kinds = ["str", "int", "none", "bool", "float"] + (["list", "dict"] * 2 if depth < 5 else [])
    k = rng.choice(kinds)
    if k == "str":
        return rng.choice(["", "text", "type", "image", "data:", "tool_use", "\x00", "é" * 3])
    if k == "int":
        return rng.randint(-5, 5)
    if k == "none":
        return None
    if k == "bool":
        return rng.random() < 0.5
    if k == "float":
        return rng.choice([0.5, float("inf"), -1e300])
    if k == "list":
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = ["role", "content", "parts", "type", "text", "messages", "contents", "input", "tools",
            "tool_calls", "function", "functionCall", "toolUse", "toolResult", "image", "source",
            "system", "inlineData", "images", "choices", "delta", "usage", "candidates",
            "message", "response", "output", "done", "thinking", "arguments", "name", "id"]
    return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randint(0, 5))}


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        if not b:
            break
        op = rng.random()
        i = rng.randrange(len(b))
        if op < 0.4:
            b[i] = rng.randrange(256)
        elif op < 0.7:
            del b[i:i + rng.randint(1, 20)]
        else:
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 10)))
    return bytes(b)


def _deep(n: int):
    v: object = "leaf"
    for _ in range(n):
        v = {"content": [v], "parts": [v]} if n < 50 else [v]
    return v


def test_fuzz_never_raises():
    rng = random.Random(20240611)
    for i in range(600):
        api = rng.choice(APIS)
        req = rng.choice([_random_json(rng), rng.choice(VALID_REQS), None, b"\xff\xfe", "str", 5])
        if rng.random() < 0.5:
            body = _mutate(rng, rng.choice(VALID_BODIES))
        elif rng.random() < 0.5:
            body = json.dumps(_random_json(rng)).encode()
        else:
            body = bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))
        c = conversation(api, req, rng.choice([body, None]), rng.choice(CTYPES))
        assert set(c) == {"api", "model", "system", "tools", "messages", "response", "notes"}
        json.dumps(c, default=str)  # plain data
        assert isinstance(render_text(c, max_chars=rng.choice([0, 50, 5000])), str)
    for req in (_deep(40), _deep(900), {"messages": [_deep(900)]}, {"tools": [_deep(900)]}):
        c = conversation("chat_completions", req, b"[" * 5000, JSON)
        assert isinstance(render_text(c), str)


@pytest.mark.parametrize("body", VALID_BODIES)
def test_every_truncation_of_a_stream_is_safe(body):
    for cut in range(0, len(body), max(1, len(body) // 40)):
        c = conversation(None, None, body[:cut], rng_ct(cut))
        assert isinstance(render_text(c), str)


def rng_ct(i: int) -> str | None:
    return CTYPES[i % len(CTYPES)]
