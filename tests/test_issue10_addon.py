"""Issue 10 through the addon: one backend keeps one provider, a background response's usage
counts once, counting endpoints quote without usage, prices from the library and the user's
own; and end to end, the record's cost and the cost counter agree."""

from __future__ import annotations

import json
import time

import httpx
import orjson

from flowkit import make_flow, new_addon, run_live
from mitm import Mitmdump
from scrapekit import samples, scrape, total
from upstream import JSON_HEADERS, Reply, Upstream, openai_chat_json, openai_usage

CHAT = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'


def _json(addon, path, body, status=200, headers=None, method="POST", req=CHAT):
    f = make_flow(method, path, {"content-type": "application/json"}, req)
    raw = orjson.dumps(body)
    run_live(addon, f, status, {"content-type": "application/json", **(headers or {})}, [raw], raw)


def test_one_llama_cpp_server_keeps_one_provider_name():
    addon, ctx, cap = new_addon()
    try:
        server = {"server": "llama.cpp"}
        _json(addon, "/v1/chat/completions", {"id": "c", "choices": [], "usage": {
            "prompt_tokens": 3, "completion_tokens": 1}}, headers=server)
        _json(addon, "/v1/embeddings", {"data": [], "usage": {"prompt_tokens": 2}}, headers=server)
        _json(addon, "/v1/messages", {"error": {"message": "bad"}}, status=400, headers=server)
        _json(addon, "/v1/responses", {"id": "r", "status": "completed", "output": [],
                                       "usage": {"input_tokens": 1, "output_tokens": 1}})
        assert [(r["api"], r["provider"]) for r in cap.records] == [
            ("chat_completions", "llama.cpp"), ("embeddings", "llama.cpp"),
            ("messages", "llama.cpp"), ("responses", "llama.cpp")]  # the last one learned
    finally:
        ctx.__exit__(None, None, None)


def test_background_response_usage_counts_once():
    addon, ctx, cap = new_addon()
    try:
        usage = {"input_tokens": 10, "output_tokens": 5}
        _json(addon, "/v1/responses", {"id": "resp_1", "status": "queued", "output": []},
              req=b'{"model":"gpt-5","background":true,"input":"hi"}')
        for _ in range(2):  # two polls see it completed
            _json(addon, "/v1/responses/resp_1", {"id": "resp_1", "status": "completed",
                                                  "model": "gpt-5", "output": [], "usage": usage},
                  method="GET", req=b"")
        rows = [(r["api"], r["response_status"], r["input_tokens"], r["usage_source"])
                for r in cap.records]
        assert rows == [("responses", "queued", None, "missing"),
                        ("responses_retrieve", "completed", 10, "reported"),
                        ("responses_retrieve", "completed", None, "counted_before")]
    finally:
        ctx.__exit__(None, None, None)


def test_counting_endpoint_quotes_without_usage():
    addon, ctx, cap = new_addon()
    try:
        _json(addon, "/v1/messages/count_tokens", {"input_tokens": 30})
        rec = cap.records[0]
        assert (rec["operation"], rec["counted_tokens"], rec["input_tokens"],
                rec["usage_source"]) == ("count_tokens", 30, None, "missing")
    finally:
        ctx.__exit__(None, None, None)


def test_library_and_user_prices(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"aistats": {
        "providers": {"127.0.0.1:8000": "vllm"},
        "prices": [{"provider": "vllm", "model": "qwen*", "input_per_mtok": 1.0,
                    "output_per_mtok": 2.0}]}}))
    addon, ctx, cap = new_addon()
    try:
        _json(addon, "/v1/chat/completions", {"id": "c", "model": "gpt-4o-mini", "choices": [],
                                              "usage": {"prompt_tokens": 1000,
                                                        "completion_tokens": 100}})
        _json(addon, "/v1/chat/completions", {"id": "c", "model": "no-such-model", "choices": [],
                                              "usage": {"prompt_tokens": 1, "completion_tokens": 1}},
              req=b'{"model":"no-such-model"}')
        a, b = cap.records
        assert a["cost_usd"] > 0 and a["cost_source"].startswith("genai-prices ")
        assert (b["cost_usd"], b["cost_source"]) == (None, "unknown")
    finally:
        ctx.__exit__(None, None, None)
    addon, ctx, cap = new_addon(aistats_config=str(cfg))
    try:
        _json(addon, "/v1/chat/completions", {"id": "c", "model": "qwen3-8b", "choices": [],
                                              "usage": {"prompt_tokens": 1_000_000,
                                                        "completion_tokens": 500_000}},
              req=b'{"model":"qwen3-8b"}')
        rec = cap.records[0]
        assert (rec["provider"], rec["cost_usd"], rec["cost_source"]) == ("vllm", 2.0, "config")
    finally:
        ctx.__exit__(None, None, None)


def test_record_cost_and_counter_agree_end_to_end(tmp_path):
    log = tmp_path / "r.jsonl"
    with Upstream() as up, Mitmdump(tmp_path, options={"aistats_log": str(log)}) as m:
        up.add("/v1/chat/completions", Reply(headers=JSON_HEADERS, chunks=[
            openai_chat_json("hi", model="gpt-4o-mini", usage=openai_usage(12_000, 3_000))]))
        for _ in range(2):
            r = httpx.post(up.url + "/v1/chat/completions", proxy=m.proxy_url, timeout=30,
                           json={"model": "gpt-4o-mini", "messages": [{"role": "user",
                                                                       "content": "hi"}]})
            assert r.status_code == 200
        deadline = time.monotonic() + 15
        while len(log.read_text().splitlines() if log.exists() else []) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        recs = [json.loads(x) for x in log.read_text().splitlines()]
        counter = total(samples(scrape(m.metrics_url())), "aistats_cost_usd_total",
                        model="gpt-4o-mini")
    assert all(r["cost_usd"] and r["cost_source"].startswith("genai-prices") for r in recs)
    assert abs(counter - sum(r["cost_usd"] for r in recs)) < 1e-9
