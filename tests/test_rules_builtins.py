"""Built-in attributes: every key on every wire shape, streamed and whole, plus Higress's
acceptance examples, tool-call assembly, the memory bound and hostile input."""

from __future__ import annotations

import json
import random
import timeit

import pytest
from conftest import load_cases

from aistats_engine.rules.builtins import (
    BUILTINS,
    CONTENT_BUILTINS,
    BuiltinExtractor,
    default_sources,
)

REQ, STREAM, BODY = "request_body", "response_streaming_body", "response_body"
ALL = frozenset(BUILTINS)
ARGS = '{"city":"Paris"}'


def sse(text: str) -> list[tuple[str | None, dict]]:
    """The events of an SSE body: (event name, parsed data), ``[DONE]`` left out."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        name, data = None, []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip())
        if data and "".join(data) != "[DONE]":
            events.append((name, json.loads("\n".join(data))))
    return events


def run(api, keys=ALL, request=None, events=(), body=None, **kw) -> BuiltinExtractor:
    ex = BuiltinExtractor(api, frozenset(keys), **kw)
    if request is not None:
        ex.request(request)
    for name, obj in events:
        ex.event(name, obj)
    if body is not None:
        ex.body(body)
    return ex


# ---- one exchange in every shape: "Weather in Paris?" → reasoning, text, one tool call ------

def _chunk(delta=None, finish=None, **extra):
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
            "model": "deepseek-reasoner", "choices": choices, **extra}


OPENAI_USAGE = {"prompt_tokens": 20, "completion_tokens": 30, "total_tokens": 50,
                "prompt_tokens_details": {"cached_tokens": 16},
                "completion_tokens_details": {"reasoning_tokens": 12}}
OPENAI_CALL = {"id": "call_1", "type": "function",
               "function": {"name": "get_weather", "arguments": ARGS}}
OPENAI = {
    "api": "chat_completions",
    "request": {"model": "deepseek-reasoner", "stream": True,
                "messages": [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "Weather in Paris?"}],
                "tools": [{"type": "function", "function": {"name": "get_weather"}}]},
    "stream": [(None, e) for e in [
        _chunk({"role": "assistant", "content": None, "reasoning_content": "User wants"}),
        _chunk({"reasoning_content": " weather."}),
        _chunk({"content": "Let me"}),
        _chunk({"content": " check."}),
        _chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                "function": {"name": "get_weather", "arguments": ""}}]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
        _chunk({}, "tool_calls"),
        _chunk(None, usage=OPENAI_USAGE),
    ]],
    "body": {"id": "chatcmpl-1", "object": "chat.completion", "model": "deepseek-reasoner",
             "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                 "role": "assistant", "content": "Let me check.",
                 "reasoning_content": "User wants weather.", "tool_calls": [OPENAI_CALL]}}],
             "usage": OPENAI_USAGE},
    "question": "Weather in Paris?", "system": "Be brief.",
    "calls": [{"index": 0, **OPENAI_CALL}], "body_calls": [OPENAI_CALL],
    "in": {"cached_tokens": 16}, "out": {"reasoning_tokens": 12},
    "reasoning_tokens": 12, "cached_tokens": 16,
}


def _ant(t, **kw):
    return (t, {"type": t, **kw})


ANTHROPIC_USAGE = {"input_tokens": 20, "cache_creation_input_tokens": 0,
                   "cache_read_input_tokens": 16, "output_tokens": 30}
ANTHROPIC = {
    "api": "messages",
    "request": {"model": "claude-sonnet-4-5", "max_tokens": 1024, "stream": True,
                "system": "Be brief.", "thinking": {"type": "enabled", "budget_tokens": 1024},
                "messages": [{"role": "user", "content": "Weather in Paris?"}]},
    "stream": [
        _ant("message_start", message={"id": "msg_1", "type": "message", "role": "assistant",
                                       "model": "claude-sonnet-4-5", "content": [],
                                       "stop_reason": None,
                                       "usage": {**ANTHROPIC_USAGE, "output_tokens": 1}}),
        _ant("content_block_start", index=0,
             content_block={"type": "thinking", "thinking": "", "signature": ""}),
        _ant("content_block_delta", index=0,
             delta={"type": "thinking_delta", "thinking": "User wants"}),
        _ant("content_block_delta", index=0,
             delta={"type": "thinking_delta", "thinking": " weather."}),
        _ant("content_block_delta", index=0,
             delta={"type": "signature_delta", "signature": "EqQBCgIYAhIM"}),
        _ant("content_block_stop", index=0),
        _ant("content_block_start", index=1, content_block={"type": "text", "text": ""}),
        _ant("content_block_delta", index=1, delta={"type": "text_delta", "text": "Let me"}),
        _ant("ping"),
        _ant("content_block_delta", index=1, delta={"type": "text_delta", "text": " check."}),
        _ant("content_block_stop", index=1),
        _ant("content_block_start", index=2, content_block={
            "type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}),
        _ant("content_block_delta", index=2,
             delta={"type": "input_json_delta", "partial_json": ""}),
        _ant("content_block_delta", index=2,
             delta={"type": "input_json_delta", "partial_json": '{"city":'}),
        _ant("content_block_delta", index=2,
             delta={"type": "input_json_delta", "partial_json": '"Paris"}'}),
        _ant("content_block_stop", index=2),
        _ant("message_delta", delta={"stop_reason": "tool_use", "stop_sequence": None},
             usage={"output_tokens": 30}),
        _ant("message_stop"),
    ],
    "body": {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
             "content": [{"type": "thinking", "thinking": "User wants weather.",
                          "signature": "EqQBCgIYAhIM"},
                         {"type": "text", "text": "Let me check."},
                         {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                          "input": {"city": "Paris"}}],
             "stop_reason": "tool_use", "usage": ANTHROPIC_USAGE},
    "question": "Weather in Paris?", "system": "Be brief.",
    "calls": [{"index": 2, "id": "toolu_1", "type": "tool_use",
               "function": {"name": "get_weather", "arguments": ARGS}}],
    "in": {"cache_read_input_tokens": 16, "cache_creation_input_tokens": 0}, "out": None,
    "reasoning_tokens": None, "cached_tokens": None,
}
ANTHROPIC["body_calls"] = ANTHROPIC["calls"]


RESP_USAGE = {"input_tokens": 20, "input_tokens_details": {"cached_tokens": 16},
              "output_tokens": 30, "output_tokens_details": {"reasoning_tokens": 12},
              "total_tokens": 50}
RESP_OUTPUT = [
    {"id": "rs_1", "type": "reasoning",
     "summary": [{"type": "summary_text", "text": "User wants weather."}]},
    {"id": "msg_1", "type": "message", "status": "completed", "role": "assistant",
     "content": [{"type": "output_text", "text": "Let me check.", "annotations": []}]},
    {"id": "fc_1", "type": "function_call", "status": "completed", "arguments": ARGS,
     "call_id": "call_1", "name": "get_weather"},
]
RESP_BODY = {"id": "resp_1", "object": "response", "status": "completed", "model": "o4-mini",
             "output": RESP_OUTPUT, "usage": RESP_USAGE}


def _r(t, **kw):
    return (None, {"type": t, **kw})


RESPONSES = {
    "api": "responses",
    "request": {"model": "o4-mini", "instructions": "Be brief.", "stream": True,
                "reasoning": {"summary": "auto"},
                "input": [{"role": "user",
                           "content": [{"type": "input_text", "text": "Weather in Paris?"}]}]},
    "stream": [
        _r("response.created", sequence_number=0, response={
            "id": "resp_1", "object": "response", "status": "in_progress", "output": [],
            "usage": None}),
        _r("response.output_item.added", output_index=0,
           item={"id": "rs_1", "type": "reasoning", "summary": []}),
        _r("response.reasoning_summary_part.added", item_id="rs_1", output_index=0,
           summary_index=0, part={"type": "summary_text", "text": ""}),
        _r("response.reasoning_summary_text.delta", item_id="rs_1", output_index=0,
           summary_index=0, delta="User wants"),
        _r("response.reasoning_summary_text.delta", item_id="rs_1", output_index=0,
           summary_index=0, delta=" weather."),
        _r("response.reasoning_summary_text.done", item_id="rs_1", output_index=0,
           summary_index=0, text="User wants weather."),
        _r("response.output_item.done", output_index=0, item=RESP_OUTPUT[0]),
        _r("response.output_item.added", output_index=1, item={
            "id": "msg_1", "type": "message", "status": "in_progress", "role": "assistant",
            "content": []}),
        _r("response.content_part.added", item_id="msg_1", output_index=1, content_index=0,
           part={"type": "output_text", "text": "", "annotations": []}),
        _r("response.output_text.delta", item_id="msg_1", output_index=1, content_index=0,
           delta="Let me"),
        _r("response.output_text.delta", item_id="msg_1", output_index=1, content_index=0,
           delta=" check."),
        _r("response.output_text.done", item_id="msg_1", output_index=1, content_index=0,
           text="Let me check."),
        _r("response.output_item.done", output_index=1, item=RESP_OUTPUT[1]),
        _r("response.output_item.added", output_index=2, item={
            "id": "fc_1", "type": "function_call", "status": "in_progress", "arguments": "",
            "call_id": "call_1", "name": "get_weather"}),
        _r("response.function_call_arguments.delta", item_id="fc_1", output_index=2,
           delta='{"city":'),
        _r("response.function_call_arguments.delta", item_id="fc_1", output_index=2,
           delta='"Paris"}'),
        _r("response.function_call_arguments.done", item_id="fc_1", output_index=2,
           arguments=ARGS),
        _r("response.output_item.done", output_index=2, item=RESP_OUTPUT[2]),
        _r("response.completed", response=RESP_BODY),
    ],
    "body": RESP_BODY,
    "question": [{"type": "input_text", "text": "Weather in Paris?"}], "system": "Be brief.",
    "calls": [{"index": 2, "id": "call_1", "type": "function",
               "function": {"name": "get_weather", "arguments": ARGS}}],
    "in": {"cached_tokens": 16}, "out": {"reasoning_tokens": 12},
    "reasoning_tokens": 12, "cached_tokens": 16,
}
RESPONSES["body_calls"] = RESPONSES["calls"]


def _gem(parts, finish=None, usage=None):
    cand = {"content": {"parts": parts, "role": "model"}, "index": 0}
    if finish:
        cand["finishReason"] = finish
    obj = {"candidates": [cand], "modelVersion": "gemini-2.5-flash", "responseId": "r1"}
    if usage:
        obj["usageMetadata"] = usage
    return (None, obj)


GEMINI_USAGE = {"promptTokenCount": 20, "candidatesTokenCount": 18, "totalTokenCount": 50,
                "cachedContentTokenCount": 16, "thoughtsTokenCount": 12,
                "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 20}]}
GEMINI_CALL = {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
               "thoughtSignature": "CiQB"}
GEMINI = {
    "api": "generate_content",
    "request": {"systemInstruction": {"parts": [{"text": "Be brief."}]},
                "contents": [{"role": "user", "parts": [{"text": "Weather in "},
                                                         {"text": "Paris?"}]}],
                "generationConfig": {"thinkingConfig": {"includeThoughts": True}}},
    "stream": [
        _gem([{"text": "User wants", "thought": True}],
             usage={"promptTokenCount": 20, "totalTokenCount": 20}),
        _gem([{"text": " weather.", "thought": True}]),
        _gem([{"text": "Let me"}]),
        _gem([{"text": " check."}]),
        _gem([GEMINI_CALL], "STOP", GEMINI_USAGE),
    ],
    "body": _gem([{"text": "User wants weather.", "thought": True}, {"text": "Let me check."},
                  GEMINI_CALL], "STOP", GEMINI_USAGE)[1],
    "question": "Weather in Paris?", "system": "Be brief.",
    "calls": [{"index": 0, "id": "", "type": "function",
               "function": {"name": "get_weather", "arguments": ARGS}}],
    "in": {"cached_content_token_count": 16}, "out": {"thoughts_token_count": 12},
    "reasoning_tokens": None, "cached_tokens": None,
}
GEMINI["body_calls"] = GEMINI["calls"]

CONVERSE_USAGE = {"inputTokens": 20, "outputTokens": 30, "totalTokens": 50,
                  "cacheReadInputTokens": 16, "cacheWriteInputTokens": 0}
CONVERSE = {
    "api": "converse",
    "request": {"system": [{"text": "Be brief."}],
                "messages": [{"role": "user", "content": [{"text": "Weather in Paris?"}]}],
                "inferenceConfig": {"maxTokens": 512}},
    "stream": [
        ("messageStart", {"role": "assistant"}),
        ("contentBlockDelta", {"contentBlockIndex": 0,
                               "delta": {"reasoningContent": {"text": "User wants"}}}),
        ("contentBlockDelta", {"contentBlockIndex": 0,
                               "delta": {"reasoningContent": {"text": " weather."}}}),
        ("contentBlockDelta", {"contentBlockIndex": 0,
                               "delta": {"reasoningContent": {"signature": "sig"}}}),
        ("contentBlockStop", {"contentBlockIndex": 0}),
        ("contentBlockDelta", {"contentBlockIndex": 1, "delta": {"text": "Let me"}}),
        ("contentBlockDelta", {"contentBlockIndex": 1, "delta": {"text": " check."}}),
        ("contentBlockStop", {"contentBlockIndex": 1}),
        ("contentBlockStart", {"contentBlockIndex": 2, "start": {
            "toolUse": {"toolUseId": "tooluse_1", "name": "get_weather"}}}),
        ("contentBlockDelta", {"contentBlockIndex": 2,
                               "delta": {"toolUse": {"input": '{"city":'}}}),
        ("contentBlockDelta", {"contentBlockIndex": 2,
                               "delta": {"toolUse": {"input": '"Paris"}'}}}),
        ("contentBlockStop", {"contentBlockIndex": 2}),
        ("messageStop", {"stopReason": "tool_use"}),
        ("metadata", {"usage": CONVERSE_USAGE, "metrics": {"latencyMs": 500}}),
    ],
    "body": {"output": {"message": {"role": "assistant", "content": [
        {"reasoningContent": {"reasoningText": {"text": "User wants weather.",
                                                "signature": "sig"}}},
        {"text": "Let me check."},
        {"toolUse": {"toolUseId": "tooluse_1", "name": "get_weather",
                     "input": {"city": "Paris"}}}]}},
        "stopReason": "tool_use", "usage": CONVERSE_USAGE, "metrics": {"latencyMs": 500}},
    "question": [{"text": "Weather in Paris?"}], "system": [{"text": "Be brief."}],
    "calls": [{"index": 2, "id": "tooluse_1", "type": "tool_use",
               "function": {"name": "get_weather", "arguments": ARGS}}],
    "in": {"cache_read_input_tokens": 16, "cache_creation_input_tokens": 0}, "out": None,
    "reasoning_tokens": None, "cached_tokens": None,
}
CONVERSE["body_calls"] = CONVERSE["calls"]


def _oll(message, done=False, **extra):
    return (None, {"model": "qwen3", "created_at": "2025-06-01T10:00:00Z",
                   "message": {"role": "assistant", **message}, "done": done, **extra})


OLLAMA_CALL = {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
OLLAMA = {
    "api": "ollama_chat",
    "request": {"model": "qwen3", "think": True,
                "messages": [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "Weather in Paris?"}]},
    "stream": [
        _oll({"content": "", "thinking": "User wants"}),
        _oll({"content": "", "thinking": " weather."}),
        _oll({"content": "Let me"}),
        _oll({"content": " check."}),
        _oll({"content": "", "tool_calls": [OLLAMA_CALL]}),
        _oll({"content": ""}, True, done_reason="stop", prompt_eval_count=20, eval_count=30),
    ],
    "body": _oll({"content": "Let me check.", "thinking": "User wants weather.",
                  "tool_calls": [OLLAMA_CALL]}, True, prompt_eval_count=20, eval_count=30)[1],
    "question": "Weather in Paris?", "system": "Be brief.",
    "calls": [{"index": 0, "id": "", "type": "function",
               "function": {"name": "get_weather", "arguments": ARGS}}],
    "in": None, "out": None, "reasoning_tokens": None, "cached_tokens": None,
}
OLLAMA["body_calls"] = OLLAMA["calls"]

SHAPES = {"openai": OPENAI, "anthropic": ANTHROPIC, "responses": RESPONSES, "gemini": GEMINI,
          "converse": CONVERSE, "ollama": OLLAMA}


def expected(shape: dict, key: str, kind: str):
    return {
        "question": shape["question"], "system": shape["system"], "answer": "Let me check.",
        "reasoning": "User wants weather.",
        "tool_calls": shape["calls"] if kind == "stream" else shape["body_calls"],
        "input_token_details": shape["in"], "output_token_details": shape["out"],
        "reasoning_tokens": shape["reasoning_tokens"], "cached_tokens": shape["cached_tokens"],
    }[key]


def feed(shape: dict, kind: str, api, keys=ALL) -> BuiltinExtractor:
    if kind == "stream":
        return run(api, keys, shape["request"], events=shape["stream"])
    return run(api, keys, shape["request"], body=shape["body"])


@pytest.mark.parametrize("kind", ["stream", "body"])
@pytest.mark.parametrize("key", sorted(BUILTINS))
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_each_builtin_each_shape(name, key, kind):
    shape = SHAPES[name]
    source = REQ if key in ("question", "system") else (STREAM if kind == "stream" else BODY)
    want = expected(shape, key, kind)
    # all keys configured, and the key alone (only what is asked is extracted)
    assert feed(shape, kind, shape["api"]).value(key, source) == want
    assert feed(shape, kind, shape["api"], {key}).value(key, source) == want


@pytest.mark.parametrize("kind", ["stream", "body"])
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_shape_detected_without_api(name, kind):
    """An unknown wire format (None, or a name we do not map) reads the shape from the objects."""
    shape = SHAPES[name]
    source = STREAM if kind == "stream" else BODY
    for api in (None, "invoke", "something-else"):
        ex = feed(shape, kind, api)
        for key in BUILTINS - {"question", "system"}:
            assert ex.value(key, source) == expected(shape, key, kind), (api, key)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_values_only_for_their_source(name):
    shape = SHAPES[name]
    streamed, whole = feed(shape, "stream", shape["api"]), feed(shape, "body", shape["api"])
    assert streamed.value("answer", STREAM) == "Let me check."
    assert streamed.value("answer", BODY) is None  # Higress never reads a stream as a body
    assert whole.value("answer", BODY) == "Let me check."
    assert whole.value("answer", STREAM) is None
    assert whole.value("question", BODY) is None and whole.value("answer", REQ) is None
    assert whole.value("answer", "fixed_value") is None
    assert whole.value("not_a_builtin", BODY) is None


def test_unconfigured_keys_are_not_extracted():
    ex = feed(OPENAI, "stream", "chat_completions", {"answer"})
    assert ex.value("answer", STREAM) == "Let me check."
    assert ex.value("reasoning", STREAM) is None
    assert ex.value("tool_calls", STREAM) is None
    assert ex.value("question", REQ) is None
    assert ex._reasoning == [] and ex._calls == {}


def test_needs_events_and_its_cost():
    assert not BuiltinExtractor("chat_completions", frozenset({"question", "system"})).needs_events
    assert not BuiltinExtractor(None, frozenset()).needs_events
    for key in BUILTINS - {"question", "system"}:
        assert BuiltinExtractor("messages", frozenset({key})).needs_events, key
    idle = BuiltinExtractor("chat_completions", frozenset({"question"}))
    for name, obj in OPENAI["stream"]:
        idle.event(name, obj)
    idle.body(OPENAI["body"])
    assert idle._mode is None and idle._answer == [] and idle.value("answer", STREAM) is None
    obj = OPENAI["stream"][2][1]
    per_event = min(timeit.repeat(lambda: idle.event(None, obj), number=20000, repeat=3)) / 20000
    assert per_event < 5e-6  # an attribute check and a return


def test_constants_and_default_sources():
    assert CONTENT_BUILTINS == {"question", "system", "answer", "reasoning", "tool_calls"}
    assert CONTENT_BUILTINS < BUILTINS and len(BUILTINS) == 9
    assert default_sources("question") == (REQ,) and default_sources("system") == (REQ,)
    for key in ("answer", "tool_calls", "reasoning", "reasoning_tokens", "cached_tokens",
                "input_token_details", "output_token_details"):
        assert default_sources(key) == (STREAM, BODY)
    assert default_sources("model") == ()


# ---- request side -----------------------------------------------------------------------------

@pytest.mark.parametrize("request_body,question,system", [
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "user", "content": [{"type": "text", "text": "c"}]}]},
     [{"type": "text", "text": "c"}], None),
    ({"messages": [{"role": "developer", "content": "dev"}, {"role": "user", "content": "q"}]},
     "q", "dev"),
    ({"system": [{"type": "text", "text": "s", "cache_control": {"type": "ephemeral"}}],
      "messages": [{"role": "user", "content": "q"}]},
     "q", [{"type": "text", "text": "s", "cache_control": {"type": "ephemeral"}}]),
    ({"messages": [{"role": "user", "content": "q"},
                   {"role": "assistant", "content": None, "tool_calls": []}]}, None, None),
    ({"messages": [{"role": "user", "content": ""}], "system": ""}, None, None),
    ({"messages": []}, None, None),
    ({"input": "plain question", "instructions": "inst"}, "plain question", "inst"),
    ({"input": [{"role": "developer", "content": "dev"}, {"role": "user", "content": "q"},
                {"type": "function_call_output", "call_id": "c", "output": "sunny"}]},
     "sunny", "dev"),
    ({"contents": [{"role": "user", "parts": [{"text": "q1"}]},
                   {"role": "model", "parts": [{"text": "a1"}]},
                   {"role": "user", "parts": [{"text": "q2"}, {"inlineData": {}}]}],
      "system_instruction": {"parts": [{"text": "s1"}, {"text": "s2"}]}}, "q2", "s1s2"),
    ({"contents": [{"role": "user", "parts": [{"functionResponse": {"name": "f"}}]}]},
     None, None),
    ({"contents": [{"role": "user", "parts": [{"text": "q"}]},
                   {"role": "model", "parts": [{"text": "thinking", "thought": True},
                                               {"text": "prefill"}]}]}, "prefill", None),
    ({"prompt": "Once upon", "model": "gpt-3.5-turbo-instruct"}, "Once upon", None),
    ({"model": "x"}, None, None),
])
def test_request_builtins(request_body, question, system):
    ex = run(None, {"question", "system"}, request_body)
    assert ex.value("question", REQ) == question
    assert ex.value("system", REQ) == system


def test_request_not_json_object():
    for body in (None, [], "text", 3, {"messages": "x"}, {"messages": [3]}, {"input": [1]}):
        ex = run("chat_completions", {"question", "system"}, body)
        assert ex.value("question", REQ) is None


# ---- tool-call assembly -----------------------------------------------------------------------

def _tc(*pieces):
    return (None, _chunk({"tool_calls": list(pieces)}))


def test_openai_interleaved_indices():
    events = [
        _tc({"index": 0, "id": "call_a", "type": "function",
             "function": {"name": "get_weather", "arguments": ""}},
            {"index": 1, "id": "call_b", "type": "function",
             "function": {"name": "get_time", "arguments": '{"tz"'}}),
        _tc({"index": 1, "function": {"arguments": ':"CET"}'}}),
        _tc({"index": 0, "function": {"arguments": '{"city":'}}),
        _tc({"index": 2, "id": "call_c", "type": "function",
             "function": {"name": "noop", "arguments": "{}"}}),
        _tc({"index": 0, "function": {"arguments": '"Paris"}'}}),
    ]
    got = run("chat_completions", {"tool_calls"}, events=events).value("tool_calls", STREAM)
    assert got == [
        {"index": 0, "id": "call_a", "type": "function",
         "function": {"name": "get_weather", "arguments": ARGS}},
        {"index": 1, "id": "call_b", "type": "function",
         "function": {"name": "get_time", "arguments": '{"tz":"CET"}'}},
        {"index": 2, "id": "call_c", "type": "function",
         "function": {"name": "noop", "arguments": "{}"}},
    ]


def test_openai_sorted_by_index_and_pieces_without_index():
    events = [_tc({"index": 3, "id": "c3", "function": {"name": "late", "arguments": "{}"}}),
              _tc({"index": 1, "id": "c1", "function": {"name": "early", "arguments": "{}"}})]
    got = run(None, {"tool_calls"}, events=events).value("tool_calls", STREAM)
    assert [(c["index"], c["id"], c["type"]) for c in got] == [(1, "c1", "function"),
                                                               (3, "c3", "function")]
    # some OpenAI-compatible servers send whole calls without an index
    events = [_tc({"id": "x1", "type": "function", "function": {"name": "a", "arguments": "{}"}},
                  {"id": "x2", "type": "function", "function": {"name": "b", "arguments": "{"}}),
              _tc({"function": {"arguments": "}"}})]
    got = run(None, {"tool_calls"}, events=events).value("tool_calls", STREAM)
    assert [(c["index"], c["id"], c["function"]["arguments"]) for c in got] == [
        (0, "x1", "{}"), (1, "x2", "{}")]


def test_openai_only_first_choice():
    events = [(None, {"choices": [{"index": 1, "delta": {"content": "other"}}]}),
              (None, {"choices": [{"index": 0, "delta": {"content": "mine"}}]}),
              (None, {"choices": [{"index": 1, "delta": {"tool_calls": [
                  {"index": 0, "id": "z", "function": {"name": "n", "arguments": "{}"}}]}}]})]
    ex = run("chat_completions", {"answer", "tool_calls"}, events=events)
    assert ex.value("answer", STREAM) == "mine"
    assert ex.value("tool_calls", STREAM) is None


def test_anthropic_multi_block():
    def start(i, **b):
        return _ant("content_block_start", index=i, content_block=b)

    def part(i, s):
        return _ant("content_block_delta", index=i,
                    delta={"type": "input_json_delta", "partial_json": s})

    events = [
        start(0, type="text", text=""),
        _ant("content_block_delta", index=0, delta={"type": "text_delta", "text": "Two calls."}),
        _ant("content_block_stop", index=0),
        start(1, type="tool_use", id="toolu_a", name="get_weather", input={}),
        start(2, type="tool_use", id="toolu_b", name="get_time", input={}),
        part(2, '{"tz":'), part(1, '{"city":'), part(2, '"CET"}'), part(1, '"Paris"}'),
        _ant("content_block_stop", index=1),
        part(1, "ignored after stop"),
        part(7, "no such block"),
        start(3, type="tool_use", id="toolu_c", name="with_input", input={"q": "x y"}),
        _ant("content_block_stop", index=3),
        start(4, type="tool_use", id="toolu_d", name="cut_short"),
        part(4, '{"partial":'),
    ]
    ex = run("messages", {"answer", "tool_calls"}, events=events)
    assert ex.value("answer", STREAM) == "Two calls."
    got = ex.value("tool_calls", STREAM)
    assert got == [
        {"index": 1, "id": "toolu_a", "type": "tool_use",
         "function": {"name": "get_weather", "arguments": ARGS}},
        {"index": 2, "id": "toolu_b", "type": "tool_use",
         "function": {"name": "get_time", "arguments": '{"tz":"CET"}'}},
        {"index": 3, "id": "toolu_c", "type": "tool_use",
         "function": {"name": "with_input", "arguments": '{"q":"x y"}'}},
        {"index": 4, "id": "toolu_d", "type": "tool_use",
         "function": {"name": "cut_short", "arguments": '{"partial":'}},
    ]


def test_anthropic_body_joins_text_blocks():
    """Higress reads content.0.text; we join every text block, as the stream's deltas are."""
    body = {"type": "message", "content": [
        {"type": "text", "text": "First."}, {"type": "tool_use", "id": "t", "name": "f",
                                              "input": {}},
        {"type": "text", "text": " Second."}, {"type": "redacted_thinking", "data": "x"}]}
    ex = run("messages", ALL, body=body)
    assert ex.value("answer", BODY) == "First. Second."
    assert ex.value("reasoning", BODY) is None
    assert ex.value("tool_calls", BODY) == [{"index": 1, "id": "t", "type": "tool_use",
                                             "function": {"name": "f", "arguments": "{}"}}]


def test_responses_stream_without_deltas_reads_completed():
    events = [RESPONSES["stream"][0], RESPONSES["stream"][-1]]
    ex = run("responses", ALL, events=events)
    assert ex.value("answer", STREAM) == "Let me check."
    assert ex.value("reasoning", STREAM) == "User wants weather."
    assert ex.value("tool_calls", STREAM) == RESPONSES["calls"]


def test_responses_reasoning_text_and_parallel_calls():
    body = {"object": "response", "output": [
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "sum"}],
         "content": [{"type": "reasoning_text", "text": "raw thoughts"}]},
        {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "a",
         "arguments": "{}"},
        {"type": "function_call", "id": "fc_2", "call_id": "call_2", "name": "b",
         "arguments": '{"x":1}'}]}
    ex = run("responses", ALL, body=body)
    assert ex.value("reasoning", BODY) == "raw thoughts"
    assert [c["id"] for c in ex.value("tool_calls", BODY)] == ["call_1", "call_2"]
    events = [_r("response.reasoning_text.delta", output_index=0, delta="raw "),
              _r("response.reasoning_text.delta", output_index=0, delta="thoughts")]
    assert run("responses", ALL, events=events).value("reasoning", STREAM) == "raw thoughts"


def test_responses_pieces_found_by_item_id():
    """Argument deltas name their item; output_index is optional for a reader."""
    events = [_r("response.output_item.added", output_index=4, item={
                  "id": "fc_9", "type": "function_call", "arguments": "", "call_id": "call_9",
                  "name": "f"}),
              _r("response.function_call_arguments.delta", item_id="fc_9", delta='{"a":'),
              _r("response.function_call_arguments.delta", item_id="fc_9", delta="1}"),
              _r("response.function_call_arguments.delta", item_id="fc_unknown", delta="x")]
    assert run("responses", ALL, events=events).value("tool_calls", STREAM) == [
        {"index": 4, "id": "call_9", "type": "function",
         "function": {"name": "f", "arguments": '{"a":1}'}}]


def test_gemini_several_calls_and_candidates():
    events = [_gem([{"functionCall": {"name": "a", "args": {}}},
                    {"functionCall": {"id": "fc-2", "name": "b", "args": {"k": [1, 2]}}}]),
              (None, {"candidates": [{"index": 1, "content": {"parts": [{"text": "other"}]}}]}),
              _gem([{"text": "ok"}])]
    ex = run("generate_content", ALL, events=events)
    assert ex.value("answer", STREAM) == "ok"
    assert ex.value("tool_calls", STREAM) == [
        {"index": 0, "id": "", "type": "function", "function": {"name": "a", "arguments": "{}"}},
        {"index": 1, "id": "fc-2", "type": "function",
         "function": {"name": "b", "arguments": '{"k":[1,2]}'}}]


def test_gemini_array_body():
    """streamGenerateContent without alt=sse answers one JSON array of chunks."""
    ex = run("generate_content", ALL, body=[obj for _, obj in GEMINI["stream"]])
    assert ex.value("answer", BODY) == "Let me check."
    assert ex.value("reasoning", BODY) == "User wants weather."
    assert ex.value("output_token_details", BODY) == {"thoughts_token_count": 12}


def test_converse_wrapped_events():
    """Converse frames also arrive as ``{"contentBlockDelta": {...}}`` without a name."""
    events = [(None, {name: obj}) for name, obj in CONVERSE["stream"]]
    ex = run("converse", ALL, events=events)
    for key in ("answer", "reasoning", "tool_calls", "input_token_details"):
        assert ex.value(key, STREAM) == expected(CONVERSE, key, "stream"), key


def test_openai_reasoning_field_and_content_parts():
    events = [(None, _chunk({"reasoning": "r1"})), (None, _chunk({"reasoning": "r2"})),
              (None, _chunk({"content": [{"type": "text", "text": "a"},
                                         {"type": "thinking", "thinking": []}]}))]
    ex = run("chat_completions", ALL, events=events)
    assert ex.value("reasoning", STREAM) == "r1r2"
    assert ex.value("answer", STREAM) == "a"
    # both fields on one delta (some servers duplicate): reasoning_content wins, no doubling
    ex = run("chat_completions", ALL, events=[(None, _chunk(
        {"reasoning_content": "x", "reasoning": "x"}))])
    assert ex.value("reasoning", STREAM) == "x"


def test_legacy_completions_and_deepseek_cache():
    events = [(None, {"object": "text_completion", "choices": [{"index": 0, "text": "Once"}]}),
              (None, {"object": "text_completion", "choices": [{"index": 0, "text": " upon"}]}),
              (None, {"choices": [], "usage": {"prompt_tokens": 5, "prompt_cache_hit_tokens": 3,
                                               "prompt_cache_miss_tokens": 2}})]
    ex = run("completions", ALL, events=events)
    assert ex.value("answer", STREAM) == "Once upon"
    assert ex.value("input_token_details", STREAM) == {"prompt_cache_hit_tokens": 3}
    assert ex.value("cached_tokens", STREAM) is None


def test_token_details_last_seen_wins():
    events = [(None, _chunk(None, usage={"prompt_tokens_details": {"cached_tokens": 1}})),
              (None, _chunk({"content": "x"}, usage=None)),
              (None, _chunk(None, usage={"prompt_tokens_details": {"cached_tokens": 9},
                                         "completion_tokens_details": {"reasoning_tokens": 4}}))]
    ex = run("chat_completions", {"cached_tokens", "reasoning_tokens"}, events=events)
    assert ex.value("cached_tokens", STREAM) == 9
    assert ex.value("reasoning_tokens", STREAM) == 4
    # Anthropic: a message_delta without cache counts keeps message_start's
    ex = run("messages", ALL, events=ANTHROPIC["stream"])
    assert ex.value("input_token_details", STREAM) == ANTHROPIC["in"]
    events = ANTHROPIC["stream"] + [_ant("message_delta", delta={}, usage={
        "output_tokens": 31, "cache_read_input_tokens": 20, "cache_creation_input_tokens": 4})]
    ex = run("messages", ALL, events=events)
    assert ex.value("input_token_details", STREAM) == {"cache_read_input_tokens": 20,
                                                       "cache_creation_input_tokens": 4}


# ---- Higress acceptance examples ---------------------------------------------------------------

def _acceptance():
    for file in ("higress_cases.json", "higress_test_cases.json"):
        for case in load_cases(file):
            attrs = (case.get("config") or {}).get("attributes") or []
            builtin = [a for a in attrs if a["key"] in BUILTINS and not a.get("value")]
            want = (case["expect"].get("record") or {}).get("attributes") or {}
            if builtin and any(a["key"] in want for a in builtin):
                yield pytest.param(case, builtin, want, id=case["name"])


_API_BY_PATH = {"/v1/chat/completions": "chat_completions", "/v1/messages": "messages"}


@pytest.mark.parametrize("case,attrs,want", list(_acceptance()))
def test_acceptance_builtins(case, attrs, want):
    req, resp = case["request"], case["response"]
    api = _API_BY_PATH.get(req["path"].split("?")[0])
    keys = frozenset(a["key"] for a in attrs)
    streamed = "event-stream" in resp["headers"].get("Content-Type", "")
    ex = BuiltinExtractor(api, keys)
    ex.request(json.loads(req["body"]))
    if streamed:
        for name, obj in sse(resp["body"]):
            ex.event(name, obj)
    else:
        ex.body(json.loads(resp["body"]))
    for a in attrs:
        key = a["key"]
        if key not in want:
            continue
        sources = (a["value_source"],) if a.get("value_source") else default_sources(key)
        got = next((v for s in sources if (v := ex.value(key, s)) is not None), None)
        assert got == want[key], key


def test_acceptance_cases_found():
    names = {p.id for p in _acceptance()}
    assert {"anthropic_stream_builtins", "builtin_tool_calls_streaming_openai",
            "higress_test__claude_tool_use_assembly",
            "higress_test__builtin_keys_streaming_default_sources"} <= names


# ---- memory bound -------------------------------------------------------------------------------

def test_bound_cuts_then_drops():
    events = [(None, _chunk({"content": s})) for s in ("Hello", " world", "!!!")]
    ex = run("chat_completions", {"answer"}, events=events, max_bytes=10)
    assert ex.value("answer", STREAM) == "Hello worl"
    assert ex.truncated
    ex = run("chat_completions", {"answer"}, events=events, max_bytes=13)
    assert ex.value("answer", STREAM) == "Hello world!!"
    ex = run("chat_completions", {"answer"}, events=events, max_bytes=14)
    assert ex.value("answer", STREAM) == "Hello world!!!" and not ex.truncated


def test_bound_is_shared_and_counts_utf8_bytes():
    events = [(None, _chunk({"reasoning_content": "ééé"})),  # 6 bytes
              (None, _chunk({"content": "中文字"})),  # 9 bytes
              _tc({"index": 0, "id": "c", "function": {"name": "f", "arguments": '{"a":1}'}})]
    ex = run("chat_completions", ALL, events=events, max_bytes=10)
    assert ex.value("reasoning", STREAM) == "ééé"
    assert ex.value("answer", STREAM) == "中"  # 4 bytes left: one 3-byte character fits
    assert ex.value("tool_calls", STREAM)[0]["function"]["arguments"] == ""
    assert ex.truncated
    big = "x" * 5000
    ex = run("messages", ALL, body={"type": "message", "content": [
        {"type": "text", "text": big}, {"type": "tool_use", "id": "t", "name": "f",
                                        "input": {"k": big}}]}, max_bytes=4096)
    assert ex.value("answer", BODY) == big[:4096] and ex.truncated
    assert ex.value("tool_calls", BODY)[0]["function"]["arguments"] == ""


def test_default_bound_is_one_mebibyte():
    piece = "y" * 4096
    events = [(None, _chunk({"content": piece}))] * 300
    ex = run("chat_completions", {"answer"}, events=events)
    assert len(ex.value("answer", STREAM)) == 1 << 20 and ex.truncated


# ---- hostile and unknown input ------------------------------------------------------------------

def test_unknown_shapes_give_none():
    junk = [(None, {"foo": 1}), ("weird", {"type": "error", "error": {"message": "x"}}),
            (None, {"choices": "nope"}), (None, {"type": "content_block_delta", "delta": 3})]
    for api in (None, "chat_completions", "messages", "responses", "generate_content",
                "converse", "ollama_chat", "embeddings"):
        ex = run(api, ALL, {"foo": "bar"}, events=junk)
        for key in BUILTINS:
            for source in (REQ, STREAM, BODY):
                assert ex.value(key, source) is None, (api, key, source)
        ex = run(api, ALL, body={"object": "list", "data": [{"embedding": [0.1]}]})
        assert all(ex.value(k, BODY) is None for k in BUILTINS)
    # a shape the wire format does not speak is not read
    ex = run("chat_completions", ALL, events=ANTHROPIC["stream"])
    assert ex.value("answer", STREAM) is None


def _random_value(rng: random.Random, depth: int = 0):
    choice = rng.random()
    if depth > 3 or choice < 0.35:
        return rng.choice([None, 0, 1, -1, 2.5, True, "", "x", "text_delta", "tool_use",
                           "content_block_delta", "response.output_text.delta", [], {}])
    keys = ["choices", "delta", "message", "content", "tool_calls", "index", "id", "function",
            "arguments", "name", "type", "text", "partial_json", "content_block", "usage",
            "candidates", "parts", "thought", "functionCall", "args", "output", "item",
            "output_index", "response", "reasoning_content", "thinking", "contentBlockIndex",
            "start", "toolUse", "input", "done", "messages", "contents", "system", "prompt",
            "usageMetadata", "prompt_tokens_details", "cache_read_input_tokens"]
    if choice < 0.55:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(keys): _random_value(rng, depth + 1) for _ in range(rng.randint(1, 6))}


def test_fuzz_never_raises():
    rng = random.Random(7)
    apis = [None, "chat_completions", "completions", "responses", "messages",
            "generate_content", "invoke", "converse", "ollama_chat", "other"]
    names = [None, "message_start", "contentBlockDelta", "metadata", "chunk"]
    for _ in range(300):
        ex = BuiltinExtractor(rng.choice(apis), ALL, max_bytes=rng.choice([0, 8, 1 << 20]))
        ex.request(_random_value(rng))
        for _ in range(rng.randint(0, 12)):
            v = _random_value(rng)
            ex.event(rng.choice(names), v if isinstance(v, dict) else {"v": v})
        ex.body(_random_value(rng))
        for key in BUILTINS:
            for source in (REQ, STREAM, BODY):
                ex.value(key, source)
    # and mutated real streams
    for _ in range(200):
        shape = SHAPES[rng.choice(sorted(SHAPES))]
        ex = BuiltinExtractor(shape["api"], ALL)
        for name, obj in shape["stream"]:
            obj = json.loads(json.dumps(obj))
            if rng.random() < 0.5:
                k = rng.choice(list(obj))
                obj[k] = _random_value(rng)
            ex.event(name, obj)
        for key in BUILTINS:
            ex.value(key, STREAM)
