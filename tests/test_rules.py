"""Attribute rules: the configuration's checks (one line each), every value source and rule,
built-in fallbacks, filters, truncation, the Higress access-log form and reloading."""

from __future__ import annotations

import asyncio
import json
import logging

import orjson
import pytest

import aistats
from aistats_engine import settings
from aistats_engine.outputs.higress_log import ai_log, line
from aistats_engine.rules import config
from aistats_engine.rules.engine import FlowRules, truncate
from fixtures import OPENAI_CHAT
from flowkit import make_flow, new_addon, run_live

OPENAI_BODY = {"id": "chatcmpl-9", "model": "qwen-turbo", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 10, "completion_tokens": 69, "total_tokens": 79}}
REQUEST = {"model": "qwen-turbo", "messages": [{"role": "user", "content": "q1"},
                                               {"role": "assistant", "content": "a1"},
                                               {"role": "user", "content": "what is 2+2?"}]}


def cfg(**data) -> config.RulesConfig:
    return config.parse(data, "rules.yaml")


def error_of(**data) -> str:
    with pytest.raises(settings.SettingsError) as e:
        config.parse(data, "rules.yaml")
    text = str(e.value)
    assert "\n" not in text and text.startswith("aistats_config: rules.yaml: ")
    return text


# -- configuration checks --------------------------------------------------------------------

@pytest.mark.parametrize("data,fragment", [
    ({"attributez": []}, "attributez: 'attributez' is invalid; expected one of attributes,"),
    ({"attributes": {"key": "x"}}, "attributes: {'key': 'x'} is invalid; expected a list"),
    ({"attributes": [{"key": "env", "value_source": "fixed_value", "value": "p", "colour": 1}]},
     "attributes[0] key colour: 'colour' is invalid"),
    ({"attributes": [{"key": "team"}]},
     "attributes[0].value_source: None is invalid; expected one of fixed_value"),
    ({"attributes": [{"key": "x", "value_source": "request_cookie", "value": "a"}]},
     "attributes[0].value_source: 'request_cookie' is invalid"),
    ({"attributes": [{"key": "x", "value_source": "request_body", "value": "a", "rule": "last"}]},
     "attributes[0].rule: 'last' is invalid; expected first, replace or append"),
    ({"attributes": [{"key": "x", "value_source": "response_streaming_body", "value": "a"}]},
     "attributes[0].rule: None is invalid; expected first, replace or append"),
    ({"attributes": [{"key": "x", "value_source": "request_body", "value": "$.a[?(@.b ="}]},
     "attributes[0].value: '$.a[?(@.b =' is invalid; expected a gjson path"),
    ({"attributes": [{"key": "x", "value_source": "request_body", "value": "a.@reverse("}]},
     "attributes[0].value: 'a.@reverse(' is invalid"),
    ({"attributes": [{"key": "x", "value_source": "request_header", "value": ""}]},
     "attributes[0].value: '' is invalid; expected an HTTP header name"),
    ({"attributes": [{"key": "x", "value_source": "fixed_value", "value": "v",
                      "apply_to_log": "yes"}]},
     "attributes[0].apply_to_log: 'yes' is invalid; expected true or false"),
    ({"attributes": [{"key": "model", "value_source": "fixed_value", "value": "v",
                      "as_separate_log_field": True}]},
     "attributes[0].key: 'model' is invalid; expected a key that is not a record key"),
    ({"value_length_limit": "10"}, "value_length_limit: '10' is invalid; expected an integer >= 1"),
    ({"enable_path_suffixes": "/v1/chat/completions"}, "enable_path_suffixes: "),
    ({"session_id_header": "x session"}, "session_id_header: 'x session' is invalid"),
    ({"aistats": {"colour": 1}}, "aistats key colour: 'colour' is invalid"),
])
def test_config_errors_are_one_line_naming_the_key(data, fragment):
    assert fragment in error_of(**data)


def test_config_files_yaml_json_and_unreadable(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("attributes:\n  - key: env\n    value_source: fixed_value\n    value: prod\n"
                 "    apply_to_log: true\nenable_path_suffixes: ['*']\n")
    c = config.load(str(y))
    assert (c.attributes[0].key, c.path_suffixes, c.value_length_limit) == ("env", (), 32000)
    j = tmp_path / "c.json"
    j.write_text('{"value_length_limit": 10, "enable_content_types": ["application/json"]}')
    assert (config.load(str(j)).value_length_limit, config.load(str(j)).content_types) == (
        10, ("application/json",))
    bad = tmp_path / "bad.yaml"
    bad.write_text("attributes: [\n")
    with pytest.raises(settings.SettingsError, match=r"bad.yaml: file: 'bad.yaml' is invalid; "
                                                     r"expected valid YAML or JSON"):
        config.load(str(bad))
    with pytest.raises(settings.SettingsError, match="expected a readable file"):
        config.load(str(tmp_path / "missing.yaml"))


def test_higress_defaults_and_default_attribute_sets():
    assert cfg().path_suffixes is None and cfg().content_types == ()
    assert cfg(enable_path_suffixes=[]).path_suffixes == ()  # empty means all, as the code says
    d = cfg(use_default_attributes=True)
    assert d.value_length_limit == 10 << 20 and d.path_suffixes == ("/completions", "/messages")
    assert {a.key for a in d.attributes} >= {"question", "answer", "tool_calls", "messages"}
    r = cfg(use_default_response_attributes=True)
    assert r.value_length_limit == 4000 and "answer" not in {a.key for a in r.attributes}
    assert cfg(session_id_header="X-Sess").session_headers[0] == "x-sess"


# -- the engine --------------------------------------------------------------------------------

def run_rules(c: config.RulesConfig, *, request=None, req_headers=None, resp_headers=None,
              events=None, body=None, record=None):
    from aistats_engine.record.record import Record
    rules = FlowRules(c, "chat_completions", max_bytes=64)
    rules.request(req_headers or {}, request)
    rules.response_headers(resp_headers or {})
    for ev in events or []:
        rules.event(None, ev)
    if body is not None:
        rules.body(body)
    rec = record or Record(id=1, flow_id="f", start_time="", end_time="", method="POST",
                           scheme="http", host="h", port=1, path="/p", status=200)
    rules.finish(rec, stream=events is not None)
    return rec, rules


def test_every_value_source_at_its_moment():
    c = cfg(attributes=[
        {"key": "env", "value_source": "fixed_value", "value": "prod", "apply_to_log": True},
        {"key": "team", "value_source": "request_header", "value": "X-Team", "apply_to_log": True},
        {"key": "q", "value_source": "request_body", "value": "messages.@reverse.0.content",
         "apply_to_log": True},
        {"key": "rid", "value_source": "response_header", "value": "x-request-id",
         "apply_to_log": True},
        {"key": "fin", "value_source": "response_body", "value": "$.choices[0].finish_reason",
         "apply_to_log": True},
        {"key": "ids", "value_source": "response_body", "value": "choices.#.index",
         "apply_to_log": True}])
    rec, _ = run_rules(c, request=REQUEST, req_headers={"x-team": "blue"},
                       resp_headers={"x-request-id": "req-42"}, body=OPENAI_BODY)
    assert rec.attributes == {"env": "prod", "team": "blue", "q": "what is 2+2?",
                              "rid": "req-42", "fin": "stop", "ids": [0]}


def test_stream_rules_first_replace_append_skip_empty_values():
    c = cfg(attributes=[
        {"key": k, "value_source": "response_streaming_body", "value": "choices.0.delta.content",
         "rule": k, "apply_to_log": True} for k in ("first", "replace", "append")])
    events = [{"choices": [{"delta": {"content": ""}}]}, {"choices": [{"delta": {"content": "A"}}]},
              {"choices": [{"delta": {}}]}, {"choices": [{"delta": {"content": "B"}}]},
              {"choices": [], "usage": {"prompt_tokens": 1}}]
    rec, _ = run_rules(c, events=events)
    assert rec.attributes == {"first": "A", "replace": "B", "append": "AB"}


def test_append_keeps_every_piece_in_order_per_attribute():
    """Appended pieces are kept apart per attribute and joined once, at the end."""
    c = cfg(attributes=[{"key": k, "value_source": "response_streaming_body", "value": path,
                         "rule": "append", "apply_to_log": True} for k, path in (("a", "t"), ("b", "u"))])
    events = [{"t": str(i), "u": chr(65 + i)} for i in range(20)]
    rec, rules = run_rules(c, events=events)
    assert rec.attributes == {"a": "".join(str(i) for i in range(20)),
                              "b": "".join(chr(65 + i) for i in range(20))}
    assert not rules.truncated


def test_append_is_bounded_and_marked():
    c = cfg(attributes=[{"key": "a", "value_source": "response_streaming_body",
                         "value": "t", "rule": "append", "apply_to_log": True}])
    rec, rules = run_rules(c, events=[{"t": "x" * 40}, {"t": "y" * 40}])
    assert rec.attributes == {"a": "x" * 40} and rules.truncated


def test_default_value_later_key_wins_and_only_the_response_kind_read():
    c = cfg(attributes=[
        {"key": "team", "value_source": "request_header", "value": "x-team",
         "default_value": "unassigned", "apply_to_log": True},
        {"key": "answer", "value_source": "response_streaming_body",
         "value": "choices.0.delta.content", "rule": "append", "apply_to_log": True},
        {"key": "answer", "value_source": "response_body", "value": "choices.0.message.content",
         "apply_to_log": True}])
    rec, _ = run_rules(c, body=OPENAI_BODY)
    assert rec.attributes == {"team": "unassigned", "answer": "hello"}
    rec, _ = run_rules(c, events=[{"choices": [{"delta": {"content": "Hi"}}]}])
    assert rec.attributes == {"team": "unassigned", "answer": "Hi"}


def test_builtin_fallbacks_token_builtins_and_span_attributes():
    c = cfg(attributes=[
        {"key": "question", "apply_to_log": True, "apply_to_span": True},
        {"key": "cached_tokens", "apply_to_log": True},
        {"key": "reasoning_tokens", "apply_to_log": True},
        {"key": "env", "value_source": "fixed_value", "value": "p", "apply_to_span": True,
         "trace_span_key": "deployment.environment"},
        {"key": "user", "value_source": "request_header", "value": "x-user", "apply_to_log": True,
         "as_separate_log_field": True}])
    from aistats_engine.record.record import Record
    base = Record(id=1, flow_id="f", start_time="", end_time="", method="POST", scheme="http",
                  host="h", port=1, path="/p", status=200, cached_tokens=5, reasoning_tokens=None)
    rec, _ = run_rules(c, request=REQUEST, req_headers={"x-user": "alice"}, body=OPENAI_BODY,
                       record=base)
    assert rec.attributes == {"question": "what is 2+2?", "user": "alice", "cached_tokens": 5,
                              "reasoning_tokens": None}
    assert rec.log_fields == {"user": "alice"}
    assert rec.span_attributes == {"deployment.environment": "p"}
    assert rec.span_content_attributes == {"question": "what is 2+2?"}
    assert rec.to_dict()["user"] == "alice"


def test_truncation_keeps_types_below_the_limit():
    assert truncate("abcdefghij", 4) == "ab [truncated] ij"
    assert truncate({"a": "bcdefgh"}, 6) == '{"a [truncated] h"}'
    assert truncate([1, 2], 100) == [1, 2] and truncate(7, 1) == 7 and truncate(None, 1) is None


def test_attribute_counts_fill_missing_usage_like_higress_bailian():
    c = cfg(attributes=[
        {"key": "model", "value_source": "response_body", "value": "usage.models.0.model_id",
         "apply_to_log": True},
        {"key": "input_token", "value_source": "response_body",
         "value": "usage.models.0.input_tokens", "apply_to_log": True},
        {"key": "output_token", "value_source": "response_body",
         "value": "usage.models.0.output_tokens", "apply_to_log": True}])
    body = {"output": {"text": "x"}, "usage": {"models": [
        {"model_id": "qwen-max", "input_tokens": 343, "output_tokens": 153}]}}
    rec, _ = run_rules(c, body=body)
    assert (rec.model, rec.input_tokens, rec.output_tokens, rec.total_tokens,
            rec.usage_source) == ("qwen-max", 343, 153, 496, "attributes")


# -- through the addon -------------------------------------------------------------------------

def _addon_with(tmp_path, data: dict, **options):
    path = tmp_path / "rules.yaml"
    path.write_text(json.dumps(data))
    return new_addon(aistats_config=str(path), **options) + (path,)


def _chat(addon, path="/v1/chat/completions", ctype="application/json", headers=None):
    f = make_flow("POST", path, {"content-type": "application/json", **(headers or {})},
                  orjson.dumps(REQUEST))
    body = orjson.dumps(OPENAI_BODY)
    run_live(addon, f, 200, {"content-type": ctype}, [body], body)
    return f


def test_path_filter_restricts_known_paths_and_observes_named_unknown_ones(tmp_path):
    addon, ctx, cap, _ = _addon_with(tmp_path, {"enable_path_suffixes": ["/gateway/llm"]})
    try:
        _chat(addon)  # known to aistats, not named: not observed
        _chat(addon, "/gateway/llm?x=1")
        assert [(r["path"], r["api"], r["input_tokens"]) for r in cap.records] == [
            ("/gateway/llm", "unknown", 10)]
    finally:
        ctx.__exit__(None, None, None)


def test_disabled_content_type_keeps_request_attributes_only(tmp_path):
    addon, ctx, cap, _ = _addon_with(tmp_path, {
        "enable_content_types": ["text/event-stream"],
        "attributes": [{"key": "env", "value_source": "fixed_value", "value": "p",
                        "apply_to_log": True},
                       {"key": "fin", "value_source": "response_body",
                        "value": "choices.0.finish_reason", "apply_to_log": True}]})
    try:
        _chat(addon)
        rec = cap.records[0]
        assert rec["attributes"] == {"env": "p"} and rec["input_tokens"] is None
        assert cap.events[0].record.higress_counted is False
    finally:
        ctx.__exit__(None, None, None)


def test_secret_header_attribute_is_redacted(tmp_path):
    addon, ctx, cap, _ = _addon_with(tmp_path, {"attributes": [
        {"key": "auth", "value_source": "request_header", "value": "authorization",
         "apply_to_log": True, "as_separate_log_field": True}]})
    try:
        _chat(addon, headers={"authorization": "Bearer sk-live-abcdefghijklmnop1234"})
        assert cap.records[0]["attributes"]["auth"] == "[REDACTED]"
        assert cap.records[0]["auth"] == "[REDACTED]"
    finally:
        ctx.__exit__(None, None, None)


def test_config_session_header_comes_first(tmp_path):
    addon, ctx, cap, _ = _addon_with(tmp_path, {"session_id_header": "x-conv"})
    try:
        _chat(addon, headers={"x-conv": "c1", "x-session-id": "s1"})
        assert cap.records[0]["session_id"] == "c1"
    finally:
        ctx.__exit__(None, None, None)


def test_bad_config_file_at_start_is_one_error_line(tmp_path, caplog):
    path = tmp_path / "rules.yaml"
    path.write_text("attributes:\n  - key: team\n")
    addon = aistats.AIStats()
    from mitmproxy.test import taddons
    with caplog.at_level(logging.ERROR), taddons.context(addon) as tctx:
        tctx.configure(addon, aistats_config=str(path))
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "attributes[0].value_source" in errors[0]


def test_reload_on_change_and_a_bad_edit_keeps_the_old_rules(tmp_path, caplog):
    addon, ctx, cap, path = _addon_with(tmp_path, {"attributes": [
        {"key": "env", "value_source": "fixed_value", "value": "one", "apply_to_log": True}]})

    async def scenario():
        addon.running()
        try:
            path.write_text(json.dumps({"attributes": [
                {"key": "env", "value_source": "fixed_value", "value": "two",
                 "apply_to_log": True}]}))
            import os
            os.utime(path, (1, 1))  # a new stamp, whatever the clock's resolution
            for _ in range(40):
                await asyncio.sleep(0.1)
                if addon.rules.attributes[0].value == "two":
                    break
            assert addon.rules.attributes[0].value == "two"
            path.write_text("attributes: [{key: env}]\n")
            os.utime(path, (2, 2))
            for _ in range(40):
                await asyncio.sleep(0.1)
                if "keeping the previous configuration" in caplog.text:
                    break
        finally:
            addon.done()

    aistats.CONFIG_CHECK_SECONDS = 0.05
    try:
        with caplog.at_level(logging.INFO):
            asyncio.run(scenario())
    finally:
        aistats.CONFIG_CHECK_SECONDS = 1.0
        ctx.__exit__(None, None, None)
    assert addon.rules.attributes[0].value == "two"
    assert caplog.text.count("keeping the previous configuration") == 1
    assert "attributes[0].value_source" in caplog.text


def test_higress_access_log_line():
    from aistats_engine.record.record import Record
    rec = Record(id=1, flow_id="f", start_time="", end_time="", method="POST", scheme="http",
                 host="h", port=1, path="/p", status=200, stream=True, model="qwen-turbo",
                 input_tokens=10, output_tokens=69, total_tokens=79, ttft_ms=309.4,
                 duration_ms=1955.2, chat_id="c1", chat_round=1, session_id="s1",
                 attributes={"question": "hi", "consumer": "alice"},
                 log_fields={"consumer": "alice"})
    assert ai_log(rec) == {"session_id": "s1", "model": "qwen-turbo", "input_token": 10,
                           "output_token": 69, "total_token": 79, "llm_first_token_duration": 309,
                           "llm_service_duration": 1955, "response_type": "stream",
                           "chat_id": "c1", "chat_round": 1, "question": "hi"}
    out = line(rec)
    assert json.loads(out["ai_log"])["model"] == "qwen-turbo" and out["consumer"] == "alice"


def test_stream_rules_through_the_addon_live_and_replayed(tmp_path):
    from flowkit import roundtrip, run_replay
    addon, ctx, cap, _ = _addon_with(tmp_path, {"attributes": [
        {"key": "answer", "apply_to_log": True},
        {"key": "first_id", "value_source": "response_streaming_body", "value": "id",
         "rule": "first", "apply_to_log": True}]})
    try:
        f = make_flow("POST", "/v1/chat/completions", {}, b'{"model":"m","stream":true}')
        run_live(addon, f, 200, {"content-type": "text/event-stream"},
                 [OPENAI_CHAT[i:i + 9] for i in range(0, len(OPENAI_CHAT), 9)], OPENAI_CHAT)
        run_replay(addon, roundtrip(f))
        assert [r["attributes"] for r in cap.records] == [
            {"answer": "Hello", "first_id": "chatcmpl-1"}] * 2
    finally:
        ctx.__exit__(None, None, None)
