"""Higress parity end to end: the official openai and anthropic SDKs through a real mitmdump with
a configuration using every value source, Higress's access log, and spans exported over
OTLP/HTTP to a loopback receiver that decodes them with the official protobuf classes; then
``mitmdump -nr`` of the flow file exports the same spans and writes the same records."""

from __future__ import annotations

import json
import time

import anthropic
import openai
import pytest

from mitm import Mitmdump, replay
from otlp_receiver import OtlpReceiver
from upstream import (JSON_HEADERS, SSE_HEADERS, Reply, Upstream, anthropic_messages_json,
                      openai_chat_stream, openai_usage)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
CONFIG = {
    "attributes": [
        {"key": "env", "value_source": "fixed_value", "value": "prod", "apply_to_log": True,
         "apply_to_span": True, "trace_span_key": "deployment.environment"},
        {"key": "tier", "value_source": "request_header", "value": "x-user-tier",
         "apply_to_log": True, "as_separate_log_field": True},
        {"key": "question", "value_source": "request_body",
         "value": "messages.@reverse.0.content", "apply_to_log": True, "apply_to_span": True},
        {"key": "upstream_id", "value_source": "response_header", "value": "x-request-id",
         "apply_to_log": True, "apply_to_span": True},
        {"key": "answer", "value_source": "response_streaming_body",
         "value": "choices.0.delta.content", "rule": "append", "apply_to_log": True},
        {"key": "answer", "value_source": "response_body", "value": "$.content[0].text",
         "apply_to_log": True},
        {"key": "cached_tokens", "apply_to_log": True},
    ],
}


def _read(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _wait_lines(path, n: int) -> list[dict]:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        got = _read(path)
        if len(got) >= n:
            return got
        time.sleep(0.05)
    raise AssertionError(f"{path}: {len(_read(path))} lines, want {n}")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("higress-e2e")
    config = tmp / "rules.json"
    config.write_text(json.dumps(CONFIG))
    log, ai, flows = tmp / "r.jsonl", tmp / "ai.log", tmp / "x.flow"
    with Upstream() as up, OtlpReceiver() as rx:
        up.add("oa", Reply(headers=SSE_HEADERS + [("x-request-id", "req-oa")], chunk_delay_s=0.01,
                           chunks=openai_chat_stream(["Fo", "ur"], model="qwen-turbo",
                                                     usage=openai_usage(16, 2, cached=8))))
        up.add("an", Reply(headers=JSON_HEADERS + [("x-request-id", "req-an")], chunks=[
            anthropic_messages_json("Bonjour", input_tokens=5, output_tokens=3, cache_read=7)]))
        opts = {"aistats_config": str(config), "aistats_log": str(log),
                "aistats_higress_log": str(ai), "aistats_otlp_endpoint": rx.base_url}
        with Mitmdump(tmp, options=opts, write_flows=flows) as m:
            oa = openai.OpenAI(base_url=up.url + "/v1", api_key="sk-oa-secret-0123456789",
                               max_retries=0, http_client=openai.DefaultHttpx2Client(proxy=m.proxy_url),
                               default_headers={"x-aistats-case": "oa", "x-user-tier": "gold",
                                                "traceparent": f"00-{TRACE_ID}-{PARENT}-01"})
            text = "".join(ev.choices[0].delta.content or "" for ev in oa.chat.completions.create(
                model="qwen-turbo", stream=True, stream_options={"include_usage": True},
                messages=[{"role": "user", "content": "What is 2+2?"}]) if ev.choices)
            assert text == "Four"
            an = anthropic.Anthropic(base_url=up.url, api_key="sk-ant-secret-0123456789",
                                     max_retries=0, default_headers={"x-aistats-case": "an"},
                                     http_client=anthropic.DefaultHttpxClient(proxy=m.proxy_url))
            msg = an.messages.create(model="claude-e2e", max_tokens=32,
                                     messages=[{"role": "user", "content": "Salut?"}])
            assert msg.content[0].text == "Bonjour"
            live = _wait_lines(log, 2)
            ai_lines = _wait_lines(ai, 2)
            spans = rx.wait_spans(2, timeout=15)
        rx.spans.clear()
        done = replay(tmp, flows, options={**opts, "aistats_log": str(tmp / "replay.jsonl"),
                                           "aistats_higress_log": str(tmp / "replay-ai.log")})
        assert done.returncode == 0, done.stdout + done.stderr
        replayed_spans = rx.wait_spans(2, timeout=15)
    return {"live": live, "ai": ai_lines, "spans": spans, "replayed": _read(tmp / "replay.jsonl"),
            "replayed_spans": replayed_spans}


def test_records_carry_every_source(run):
    oa, an = sorted(run["live"], key=lambda r: r["api"])
    assert oa["api"] == "chat_completions" and an["api"] == "messages"
    assert oa["attributes"] == {"env": "prod", "tier": "gold", "question": "What is 2+2?",
                                "upstream_id": "req-oa", "answer": "Four", "cached_tokens": 8}
    assert oa["tier"] == "gold"
    assert an["attributes"] == {"env": "prod", "tier": None, "question": "Salut?",
                                "upstream_id": "req-an", "answer": "Bonjour", "cached_tokens": 7}
    assert "secret" not in json.dumps(run["live"])


def test_higress_access_log(run):
    by_model = {json.loads(x["ai_log"])["model"]: x for x in run["ai"]}
    oa = json.loads(by_model["qwen-turbo"]["ai_log"])
    assert (oa["input_token"], oa["output_token"], oa["total_token"], oa["response_type"]) == (
        16, 2, 18, "stream")
    assert oa["answer"] == "Four" and oa["llm_first_token_duration"] >= 0
    assert "tier" not in oa and by_model["qwen-turbo"]["tier"] == "gold"
    assert json.loads(by_model["claude-sonnet-4-5"]["ai_log"])["response_type"] == "normal"


def test_spans_names_attributes_and_parent(run):
    spans = {s.name: s for s in run["spans"]}
    assert set(spans) == {"chat qwen-turbo", "chat claude-e2e"}
    oa = spans["chat qwen-turbo"]
    assert oa.kind == "CLIENT" and oa.trace_id == TRACE_ID and oa.parent_span_id == PARENT
    a = oa.attributes
    assert (a["gen_ai.operation.name"], a["gen_ai.provider.name"], a["gen_ai.request.model"]) == (
        "chat", "openai", "qwen-turbo")
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"],
            a["gen_ai.usage.cache_read.input_tokens"]) == (16, 2, 8)
    assert a["deployment.environment"] == "prod" and a["upstream_id"] == "req-oa"
    assert "question" not in a  # message content only on opt-in
    assert a["server.address"] == "127.0.0.1" and a["gen_ai.response.finish_reasons"] == ["stop"]
    assert "secret" not in json.dumps([s.attributes for s in run["spans"]])
    an = spans["chat claude-e2e"]
    assert an.parent_span_id == "" and an.trace_id != TRACE_ID
    assert an.attributes["gen_ai.provider.name"] == "anthropic"


def test_replay_gives_the_same_records_and_spans(run):
    strip = lambda r: {k: v for k, v in r.items() if k != "id"}  # noqa: E731
    assert [strip(r) for r in run["replayed"]] == [strip(r) for r in run["live"]]
    key = lambda s: s.name  # noqa: E731
    for live, rep in zip(sorted(run["spans"], key=key), sorted(run["replayed_spans"], key=key)):
        assert (rep.name, rep.trace_id, rep.parent_span_id, rep.start_ns, rep.end_ns,
                rep.attributes) == (live.name, live.trace_id, live.parent_span_id, live.start_ns,
                                    live.end_ns, live.attributes)
