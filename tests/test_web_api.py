"""The web endpoint's API (web/server.py, web/events.py, web/params.py) against a real Store.

The server runs on 127.0.0.1:0 in the test process; records reach the Store and the EventHub
as the bus hands them over (``Finished`` events built by hand, an API key in their headers).
Every API parameter is tried with good and bad values; bad ones must give 400 with a one-line
message naming the parameter and the value. Live events are read over a raw socket so a test
decides how fast the "browser" reads.
"""

from __future__ import annotations

import gc
import os
import json
import logging
import socket
import time
import tracemalloc
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter

from aistats_engine.outputs.bus import Finished, Started
from aistats_engine.outputs.captures import CaptureCache
from aistats_engine.outputs.store import SESSION_SORT_KEYS, SORT_KEYS, Store
from aistats_engine.record.record import Record, rfc3339_ms
from aistats_engine.web.events import EventHub
from aistats_engine.web.server import WebServer
from aistats_engine.web import params

SECRET = "sk-test-webapi-SECRET-0123456789abcdef"
TOKEN = "tok-web-API-7f3a9c1e5b2d4f60"
SSE_CTYPE = "text/event-stream; charset=utf-8"
T0 = 1_780_000_000.0  # 2026-05-28T20:26:40Z: a fixed clock for the records


# -- records and events built by hand ----------------------------------------------------------

def chat_request(messages: list[dict], tools: list[dict] | None = None,
                 model: str = "gpt-4o-mini", stream: bool = True) -> bytes:
    body: dict[str, Any] = {"model": model, "messages": messages, "stream": stream}
    if tools:
        body["tools"] = tools
    return json.dumps(body).encode()


def tool_call_stream(text: list[str], tool: tuple[str, str] | None, model: str = "gpt-4o-mini",
                     usage: dict | None = None, id: str = "chatcmpl-w1") -> bytes:
    """An OpenAI Chat Completions SSE body: text deltas, then one tool call in two pieces."""
    def chunk(delta: dict, finish: str | None = None) -> bytes:
        obj = {"id": id, "object": "chat.completion.chunk", "created": 1, "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"

    out = [chunk({"role": "assistant", "content": ""})]
    out += [chunk({"content": t}) for t in text]
    finish = "stop"
    if tool is not None:
        name, args = tool
        half = len(args) // 2
        out.append(chunk({"tool_calls": [{"index": 0, "id": "call_w1", "type": "function",
                                          "function": {"name": name, "arguments": args[:half]}}]}))
        out.append(chunk({"tool_calls": [{"index": 0, "function": {"arguments": args[half:]}}]}))
        finish = "tool_calls"
    out.append(chunk({}, finish))
    if usage is not None:
        obj = {"id": id, "object": "chat.completion.chunk", "created": 1, "model": model,
               "choices": [], "usage": usage}
        out.append(b"data: " + json.dumps(obj).encode() + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return b"".join(out)


def make_record(id: int, **kw: Any) -> Record:
    t = kw.pop("t_start", T0 + id * 60)
    fields: dict[str, Any] = {
        "status": 200, "provider": "openai", "api": "chat_completions", "operation": "chat",
        "model": "gpt-4o-mini", "response_content_type": SSE_CTYPE, "stream": True,
        "input_tokens": 100, "output_tokens": 20, "usage_source": "reported",
        "duration_ms": 1000.0,
    }
    fields.update(kw)
    dur = fields["duration_ms"] or 0.0
    return Record(id, f"flow-{id}", rfc3339_ms(t), rfc3339_ms(t + dur / 1000), "POST", "https",
                  "api.openai.com", 443, "/v1/chat/completions", **fields)


def make_event(rec: Record, request: bytes | None = None, response: bytes | None = None,
               secret: str = SECRET) -> Finished:
    """The event the bus would carry: an API key in the request headers, raw bodies."""
    t_start = datetime.fromisoformat(rec.start_time.replace("Z", "+00:00")).timestamp()
    req_fields = ((b"Content-Type", b"application/json"),
                  (b"Authorization", f"Bearer {secret}".encode()),
                  (b"User-Agent", b"OpenAI/Python 2.0"))
    resp_fields = ((b"content-type", (rec.response_content_type or "").encode()),)
    return Finished(rec, t_start, t_start + (rec.duration_ms or 0) / 1000, req_fields,
                    resp_fields if rec.status is not None else (), "", request, None,
                    response, None)


def started(flow_id: str, model: str = "gpt-4o-mini", session: str | None = None) -> Started:
    return Started(flow_id, "POST", "api.openai.com", 443, "/v1/chat/completions", time.time(),
                   "chat_completions", model, "openai-python", session)


# -- a raw SSE reader ------------------------------------------------------------------------------

class RawSSE:
    """``GET /api/events`` over a plain socket: read when (and as much as) the test says."""

    def __init__(self, port: int, headers: dict[str, str] | None = None,
                 rcvbuf: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(("127.0.0.1", port))
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.sock.sendall(f"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                          f"Accept: text/event-stream\r\n{extra}\r\n".encode())
        self.buf = b""
        self.head = b""

    def read_some(self, timeout: float = 0.2) -> bytes:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 20)
        except TimeoutError:
            return b""
        self.buf += data
        return data

    def headers(self, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.buf:
            assert time.monotonic() < deadline, f"no response head: {self.buf[:300]!r}"
            self.read_some(0.1)
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        self.head = head.decode("latin-1")
        return self.head

    def events(self) -> list[tuple[str, Any]]:
        """Complete (event, data) pairs read so far. Chunk-size lines of the chunked framing
        are skipped: they never start with ``event:`` or ``data:``."""
        out = []
        text = self.buf.decode("utf-8", "replace").replace("\r\n", "\n")
        for block in text.split("\n\n"):
            name, data = None, None
            for line in block.split("\n"):
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    data = line[6:]
            if name and data is not None:
                try:
                    out.append((name, json.loads(data)))
                except ValueError:
                    pass  # not read completely yet
        return out

    def wait_for(self, pred: Any, timeout: float = 5.0) -> list[tuple[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            evs = self.events()
            if pred(evs):
                return evs
            self.read_some(0.1)
        raise AssertionError(f"not within {timeout}s; events: {[e for e, _ in self.events()]}")

    def close(self) -> None:
        self.sock.close()


# -- the server ----------------------------------------------------------------------------------

class Env:
    def __init__(self, store: Store | None, token: str | None = None, **kw: Any) -> None:
        self.store = store
        self.inflight: list[dict] = []
        self.registry: Any = None
        self.hub = EventHub(lambda: list(self.inflight), **kw.pop("hub", {}))
        self.server = WebServer("127.0.0.1", 0, metrics=lambda: self.registry,
                                store=lambda: self.store, hub=self.hub,
                                inflight=lambda: list(self.inflight), token=token, **kw)
        self.server.start()
        self.url = f"http://127.0.0.1:{self.server.port}"
        self.http = httpx.Client(base_url=self.url, timeout=10)
        self.records: list[Record] = []

    def publish(self, *events: Finished) -> None:
        """As the bus does: the store and the hub get each event; then the store is flushed."""
        for ev in events:
            assert self.store is not None
            self.store.finished(ev)
            self.hub.finished(ev)
            self.records.append(ev.record)
        if self.store is not None:
            assert self.store.flush(10)

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.http.get(path, **kw)

    def close(self) -> None:
        self.http.close()
        self.server.stop()


@pytest.fixture
def store():
    s = Store(None, max_rows=10_000, captures=CaptureCache(32 << 20))
    yield s
    s.close(wait=True)


@pytest.fixture
def env(store):
    e = Env(store)
    yield e
    e.close()


MODELS = ("gpt-4o-mini", "gpt-4o", "claude-sonnet-4-5")
SESSION_A, SESSION_B = "sess-A", "sess/B with space"


def dataset_record(i: int) -> Record:
    model = MODELS[i % 3]
    status: int | None = 200
    error = error_type = None
    if i % 10 == 0:
        status, error, error_type = 500, "upstream broke", "500"
    elif i % 7 == 0:
        status, error, error_type = 429, "rate limited", "429"
    elif i == 13:
        status, error, error_type = None, "connection refused", "upstream_unreachable"
    return make_record(
        i, model=model, provider="anthropic" if model.startswith("claude") else "openai",
        api="messages" if model.startswith("claude") else "chat_completions",
        status=status, error=error, error_type=error_type,
        session_id=SESSION_A if i <= 12 else SESSION_B if i <= 20 else None,
        client="openai-python" if i % 2 else "claude-code",
        consumer="alice" if i % 3 == 0 else None,
        input_tokens=100 * i, output_tokens=i, cached_tokens=10 * i if i % 2 == 0 else None,
        ttft_ms=10.0 * i if i % 5 else None, duration_ms=100.0 * i,
        prompt_per_second=1000.0 + i if i % 4 == 0 else None,
        tokens_per_second=50.0 + i if i % 4 == 0 else None,
        observed_tokens_per_second=40.0 + i if i % 3 else None,
        cost_usd=0.001 * i if i % 2 else None,
        finish_reason="stop" if status == 200 else None,
    )


@pytest.fixture
def data(env):
    """40 records of several models, providers, statuses, sessions, clients and consumers."""
    events = []
    for i in range(1, 41):
        rec = dataset_record(i)
        req = chat_request([{"role": "user", "content": f"question {i}"}], model=rec.model or "")
        resp = tool_call_stream([f"answer {i}"], None) if rec.status == 200 else None
        events.append(make_event(rec, req, resp))
    env.publish(*events)
    return env


def ids(resp: httpx.Response) -> list[int]:
    assert resp.status_code == 200, resp.text
    return [r["id"] for r in resp.json()["data"]]


def expect(env: Env, pred: Any) -> list[int]:
    return sorted((r.id for r in env.records if pred(r)), reverse=True)


def assert_400(resp: httpx.Response, *fragments: str) -> str:
    assert resp.status_code == 400, (resp.status_code, resp.text)
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"}
    msg = body["error"]
    assert "\n" not in msg and len(msg) < 600, msg
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


# -- activity: paging, sorting, filters -----------------------------------------------------------

def test_activity_pages_newest_first(data):
    r = data.get("/api/activity")
    body = r.json()
    assert (body["page"], body["limit"], body["total"], body["total_pages"]) == (1, 25, 40, 2)
    assert [x["id"] for x in body["data"]] == list(range(40, 15, -1))
    assert all("has_capture" in x and x["schema"] == "aistats.record/1" for x in body["data"])
    assert ids(data.get("/api/activity", params={"page": 2})) == list(range(15, 0, -1))
    assert ids(data.get("/api/activity", params={"page": 3})) == []
    assert ids(data.get("/api/activity", params={"limit": 1000})) == list(range(40, 0, -1))
    assert ids(data.get("/api/activity", params={"limit": 1})) == [40]
    assert ids(data.get("/api/activity", params={"limit": 7, "page": 2})) == list(range(33, 26, -1))
    assert ids(data.get("/api/activity", params={"order": "asc", "limit": 3})) == [1, 2, 3]
    # the capture flag is the store's (a failed request keeps its request part)
    by_id = {x["id"]: x for x in data.get("/api/activity", params={"limit": 100}).json()["data"]}
    assert by_id[1]["has_capture"] is True and by_id[13]["has_capture"] is True


@pytest.mark.parametrize("key", SORT_KEYS)
def test_activity_every_sort_key_both_orders(data, key):
    for order in ("asc", "desc"):
        got = ids(data.get("/api/activity", params={"sort": key, "order": order, "limit": 1000}))
        assert sorted(got) == list(range(1, 41)), (key, order)


def test_activity_sort_order_and_unknown_values_last(data):
    for order in ("desc", "asc"):
        got = data.get("/api/activity", params={"sort": "ttft_ms", "order": order,
                                                 "limit": 1000}).json()["data"]
        values = [r["ttft_ms"] for r in got]
        known = [v for v in values if v is not None]
        assert known == sorted(known, reverse=order == "desc")
        assert values[len(known):] == [None] * (len(values) - len(known))  # nulls last
    got = ids(data.get("/api/activity", params={"sort": "input_tokens", "order": "asc",
                                                "limit": 3}))
    assert got == [1, 2, 3]


def test_activity_filters(data):
    def check(params: dict | list, pred: Any) -> None:
        got = ids(data.get("/api/activity", params=params, ))
        assert got == expect(data, pred)[:25], params

    check({"model": "gpt-4o"}, lambda r: r.model == "gpt-4o")
    check([("model", "gpt-4o"), ("model", "claude-sonnet-4-5")],
          lambda r: r.model in ("gpt-4o", "claude-sonnet-4-5"))
    check({"provider": "anthropic"}, lambda r: r.provider == "anthropic")
    check([("provider", "anthropic"), ("provider", "openai")], lambda r: True)
    check({"status": "5xx"}, lambda r: r.status is not None and r.status >= 500)
    check([("status", "4xx"), ("status", "none")],
          lambda r: r.status is None or 400 <= r.status < 500)
    check({"status": "2xx,5xx"}, lambda r: r.status is not None and r.status // 100 in (2, 5))
    check({"session": SESSION_B}, lambda r: r.session_id == SESSION_B)
    check({"consumer": "alice"}, lambda r: r.consumer == "alice")
    check({"client": "claude-code"}, lambda r: r.client == "claude-code")
    check({"min_id": 10, "max_id": 14}, lambda r: 10 <= r.id <= 14)
    # start/end: RFC 3339 (Z, offset) or epoch seconds, inclusive, on the start time
    check({"start": rfc3339_ms(T0 + 30 * 60), "end": rfc3339_ms(T0 + 33 * 60)},
          lambda r: 30 <= r.id <= 33)
    check({"start": str(T0 + 38 * 60)}, lambda r: r.id >= 38)
    offset = datetime.fromtimestamp(T0 + 5 * 60, UTC).astimezone().isoformat()
    check({"end": offset}, lambda r: r.id <= 5)
    # "+" sent unencoded in a query string arrives as a space: still understood
    plus = datetime.fromtimestamp(T0 + 5 * 60, UTC).strftime("%Y-%m-%dT%H:%M:%S") + "+00:00"
    got = data.get(f"/api/activity?end={plus}")
    assert ids(got) == expect(data, lambda r: r.id <= 5)
    # combined
    check({"model": "gpt-4o-mini", "status": "2xx", "client": "openai-python"},
          lambda r: r.model == "gpt-4o-mini" and r.status == 200 and r.client == "openai-python")
    # paging over a filter counts the filter's rows
    body = data.get("/api/activity", params={"provider": "openai", "limit": 5}).json()
    n = len(expect(data, lambda r: r.provider == "openai"))
    assert (body["total"], body["total_pages"]) == (n, -(-n // 5))


BAD_ACTIVITY = [
    ({"limit": "0"}, ["limit", '"0"', "1 to 1000"]),
    ({"limit": "1001"}, ["limit", '"1001"', "1 to 1000"]),
    ({"limit": "ten"}, ["limit", '"ten"', "integer"]),
    ({"limit": "2.5"}, ["limit", '"2.5"']),
    ({"page": "0"}, ["page", '"0"']),
    ({"page": "-1"}, ["page", '"-1"']),
    ({"page": "x"}, ["page", '"x"']),
    ({"sort": "nope"}, ["sort", '"nope"', "one of", "input_tokens"]),
    ({"order": "up"}, ["order", '"up"', "asc or desc"]),
    ({"status": "6xx"}, ["status", '"6xx"', "2xx"]),
    ({"status": ""}, ["status"]),
    ({"start": "yesterday"}, ["start", '"yesterday"', "RFC 3339"]),
    ({"start": "2026-05-28T20:00:00"}, ["start", "offset"]),  # no offset
    ({"end": "2026-05-28"}, ["end", '"2026-05-28"']),
    ({"end": "nan"}, ["end", '"nan"']),
    ({"start": rfc3339_ms(T0 + 100), "end": rfc3339_ms(T0)}, ["start", "end", "start <= end"]),
    ({"min_id": "0"}, ["min_id", '"0"']),
    ({"max_id": "abc"}, ["max_id", '"abc"']),
    ({"min_id": "9", "max_id": "3"}, ["min_id", "max_id", "min_id <= max_id"]),
    ({"session": ""}, ["session", "non-empty"]),
    ({"modle": "gpt-4o"}, ["unknown parameter", '"modle"', "model"]),
    ([("limit", "1"), ("limit", "2")], ["limit", "2 times"]),
    ([("client", "a"), ("client", "b")], ["client", "2 times"]),
    ({"model": "x" * 2000}, ["model", "..."]),
    ({"session": "a\nb"}, []),  # fine: a value, not a problem (below)
]


@pytest.mark.parametrize("query,fragments", BAD_ACTIVITY)
def test_activity_bad_parameters(env, query, fragments):
    r = env.get("/api/activity", params=query)
    if query == {"session": "a\nb"}:
        assert r.status_code == 200 and r.json()["total"] == 0
        return
    msg = assert_400(r, *fragments)
    assert len(msg) < 400


def test_bad_parameters_on_every_filtered_endpoint(data):
    for path in ("/api/stats", "/api/sessions", "/api/export.jsonl", "/api/export.md"):
        assert_400(data.get(path, params={"status": "7xx"}), "status", '"7xx"')
        assert_400(data.get(path, params={"start": "soon"}), "start", '"soon"')
        assert_400(data.get(path, params={"foo": "1"}), "unknown parameter", '"foo"')
    assert_400(data.get("/api/stats", params={"limit": "5"}), "unknown parameter", '"limit"')
    assert_400(data.get("/api/sessions", params={"sort": "id"}), "sort", '"id"', "last_seen")
    assert_400(data.get("/api/sessions", params={"limit": "0"}), "limit")
    assert_400(data.get("/api/export.jsonl", params={"page": "2"}), "unknown parameter", "page")
    assert_400(data.get("/api/export.jsonl", params={"limit": "0"}), "limit")
    assert_400(data.get("/api/export.md", params={"sort": "bogus"}), "sort", '"bogus"')
    assert_400(data.get("/api/inflight", params={"x": "1"}), "unknown parameter")
    # the token parameter is accepted everywhere (and never echoed)
    assert data.get("/api/stats", params={"token": "whatever"}).status_code == 200


def test_param_messages_escape_control_characters():
    with pytest.raises(params.ParamError) as e:
        params.activity_query({"limit": ["1\n2\x00"]}, SORT_KEYS)
    assert "\n" not in str(e.value) and "\\n" in str(e.value)


# -- stats and sessions ---------------------------------------------------------------------------

def test_stats_follow_the_filter(data):
    s = data.get("/api/stats").json()
    assert s["requests"] == 40
    assert s["errors"] == len(expect(data, lambda r: r.error is not None))
    assert s["input_tokens"] == sum(r.input_tokens for r in data.records)
    d = s["distributions"]["ttft_ms"]
    assert d["count"] == len([r for r in data.records if r.ttft_ms])
    assert d["p50"] <= d["p95"] <= d["p99"] and sum(d["histogram"]["bins"]) == d["count"]
    assert s["avg_speeds"]["prompt_per_second"] is not None
    f = data.get("/api/stats", params={"model": "gpt-4o", "status": "2xx"}).json()
    assert f["requests"] == len(expect(data, lambda r: r.model == "gpt-4o" and r.status == 200))
    assert data.get("/api/stats", params={"min_id": 999}).json()["requests"] == 0


def test_sessions_list_sort_and_detail(data):
    body = data.get("/api/sessions").json()
    assert body["total"] == 2 and {s["session_id"] for s in body["data"]} == {SESSION_A, SESSION_B}
    a = next(s for s in body["data"] if s["session_id"] == SESSION_A)
    assert a["requests"] == 12
    assert a["errors"] == len(expect(data, lambda r: r.session_id == SESSION_A and r.error))
    for key in SESSION_SORT_KEYS:
        for order in ("asc", "desc"):
            r = data.get("/api/sessions", params={"sort": key, "order": order})
            assert r.status_code == 200 and r.json()["total"] == 2, (key, r.text)
    first = data.get("/api/sessions", params={"sort": "requests", "order": "asc"}).json()
    assert first["data"][0]["session_id"] == SESSION_B
    assert data.get("/api/sessions", params={"client": "claude-code", "limit": 1}).json()[
        "total_pages"] == 2
    # detail, the id URL-encoded (a slash and a space in it)
    from urllib.parse import quote
    d = data.get("/api/sessions/" + quote(SESSION_B, safe=""))
    assert d.status_code == 200, d.text
    assert [r["id"] for r in d.json()["requests"]] == list(range(13, 21))
    r = data.get("/api/sessions/" + quote("no such session", safe=""))
    assert r.status_code == 404 and "not found" in r.json()["error"]
    assert_400(data.get("/api/sessions/" + SESSION_A, params={"x": "1"}), "unknown parameter")


# -- captures -------------------------------------------------------------------------------------

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def test_capture_conversation_redaction_and_previous_turn(env):
    first_msgs = [{"role": "system", "content": "You are terse."},
                  {"role": "user", "content": "Weather in Paris?"}]
    args = '{"city": "Paris"}'
    resp1 = tool_call_stream(["Let me ", "check."], ("get_weather", args),
                             usage={"prompt_tokens": 50, "completion_tokens": 9,
                                    "total_tokens": 59})
    second_msgs = first_msgs + [
        {"role": "assistant", "content": "Let me check.",
         "tool_calls": [{"id": "call_w1", "type": "function",
                         "function": {"name": "get_weather", "arguments": args}}]},
        {"role": "tool", "tool_call_id": "call_w1", "content": "18°C, sunny"}]
    resp2 = tool_call_stream(["It is 18°C and sunny."], None)
    env.publish(
        make_event(make_record(1, session_id="s-cap"), chat_request(first_msgs, [WEATHER_TOOL]),
                   resp1),
        make_event(make_record(2, session_id="s-cap"), chat_request(second_msgs, [WEATHER_TOOL]),
                   resp2),
        make_event(make_record(3, status=500, error="boom", error_type="500",
                               response_content_type="application/json"),
                   chat_request(first_msgs), b'{"error": {"message": "boom"}}'))
    r = env.get("/api/captures/1")
    assert r.status_code == 200, r.text
    assert SECRET not in r.text and "[REDACTED]" in r.text
    cap = r.json()
    assert cap["id"] == 1 and cap["record"]["id"] == 1
    conv = cap["conversation"]
    assert conv["system"] == "You are terse." and conv["tools"][0]["name"] == "get_weather"
    assert conv["response"]["text"] == "Let me check."
    call = conv["response"]["tool_calls"][0]
    assert call["name"] == "get_weather" and json.loads(call["arguments"]) == {"city": "Paris"}
    assert conv["response"]["finish_reason"] == "tool_calls"
    assert cap["previous_turn"] is None or cap["previous_turn"]["previous_id"] is None

    cap2 = env.get("/api/captures/2").json()
    assert cap2["conversation"]["response"]["text"] == "It is 18°C and sunny."
    roles = [m["role"] for m in cap2["conversation"]["messages"]]
    assert roles == ["user", "assistant", "tool"]
    turn = cap2["previous_turn"]
    assert turn["previous_id"] == 1 and turn["previous_has_capture"] is True
    assert (turn["common_prefix"], turn["new_messages"], turn["rewritten"]) == (1, 2, False)
    assert turn["previous_answer_at"] == 1
    assert turn["system_changed"] is False and turn["tools_changed"] is False

    # a failed request keeps the request only
    cap3 = env.get("/api/captures/3").json()
    assert cap3["resp_body"] is None and cap3["conversation"]["messages"]
    # gzip for a large body when asked
    big = env.http.get("/api/captures/1", headers={"Accept-Encoding": "gzip"})
    assert big.status_code == 200 and big.json()["id"] == 1


def test_capture_ids(env):
    env.publish(make_event(make_record(1), chat_request([{"role": "user", "content": "x"}]),
                           tool_call_stream(["y"], None)))
    for bad in ("abc", "0", "-3", "1.5", "9" * 30):
        assert_400(env.get(f"/api/captures/{bad}"), "capture id")
    r = env.get("/api/captures/999")
    assert r.status_code == 404 and "not found" in r.json()["error"]
    assert env.get("/api/captures/1").status_code == 200
    assert env.get("/api/records/1").json()["id"] == 1
    assert env.get("/api/records/77").status_code == 404
    assert_400(env.get("/api/records/x"), "record id")


def test_evicted_capture_is_404(tmp_path):
    st = Store(None, max_rows=100, captures=CaptureCache(3000))  # room for about one capture
    e = Env(st)
    try:
        def big() -> str:  # does not compress
            return os.urandom(1000).hex()
        e.publish(*[make_event(make_record(i), chat_request([{"role": "user", "content": big()}]),
                               tool_call_stream([big()], None)) for i in range(1, 6)])
        assert e.get("/api/captures/1").status_code == 404
        assert e.get("/api/activity", params={"max_id": 1}).json()["data"][0]["has_capture"] \
            is False
    finally:
        e.close()
        st.close(wait=True)


# -- in flight, events ----------------------------------------------------------------------------

def test_inflight_endpoint(env):
    assert env.get("/api/inflight").json()["data"] == []
    row = {"id": "f1", "method": "POST", "host": "h", "path": "/v1/chat/completions",
           "model": "m", "client": "c", "session_id": "s", "started": time.time(),
           "elapsed_ms": 12.5, "bytes": 42}
    env.inflight.append(row)
    assert env.get("/api/inflight").json()["data"] == [row]


def test_sse_delivers_records_and_inflight_changes(env):
    sse = RawSSE(env.server.port)
    try:
        head = sse.headers()
        assert head.startswith("HTTP/1.1 200")
        low = head.lower()
        assert "content-type: text/event-stream" in low
        assert "cache-control: no-cache" in low and "x-accel-buffering: no" in low
        sse.wait_for(lambda evs: [e for e, _ in evs][:2] == ["hello", "inflight"])
        assert sse.events()[1][1] == {"op": "snapshot", "requests": []}

        env.hub.started(started("flow-77", session="s-live"))
        evs = sse.wait_for(lambda evs: any(e == "inflight" and d["op"] == "upsert"
                                           for e, d in evs))
        up = next(d for e, d in evs if e == "inflight" and d["op"] == "upsert")["request"]
        assert (up["id"], up["model"], up["session_id"], up["client"]) == \
            ("flow-77", "gpt-4o-mini", "s-live", "openai-python")
        assert up["elapsed_ms"] >= 0 and up["bytes"] == 0

        rec = make_record(77, model="live-model", session_id="s-live")
        env.publish(make_event(rec, chat_request([{"role": "user", "content": "hi"}]),
                               tool_call_stream(["yo"], None)))
        evs = sse.wait_for(lambda evs: any(e == "record" for e, _ in evs))
        removed = [d for e, d in evs if e == "inflight" and d["op"] == "remove"]
        assert removed == [{"op": "remove", "id": "flow-77", "record_id": 77}]
        row = next(d for e, d in evs if e == "record")
        assert row["id"] == 77 and row["model"] == "live-model" and "has_capture" in row
        assert row["schema"] == "aistats.record/1"
        assert SECRET not in sse.buf.decode("utf-8", "replace")
    finally:
        sse.close()


def test_sse_periodic_snapshot_moves(env):
    sse = RawSSE(env.server.port)
    try:
        sse.headers()
        env.inflight.append({"id": "slow-1", "elapsed_ms": 1.0, "bytes": 10})
        evs = sse.wait_for(lambda evs: any(e == "inflight" and d["op"] == "snapshot"
                                           and d["requests"] for e, d in evs), timeout=4)
        snap = [d for e, d in evs if e == "inflight" and d["op"] == "snapshot" and d["requests"]]
        assert snap[0]["requests"][0]["id"] == "slow-1"
    finally:
        sse.close()
    # no client: no snapshot work, and the hub hands nothing over
    deadline = time.monotonic() + 3
    while env.hub.clients and time.monotonic() < deadline:
        time.sleep(0.05)
    assert env.hub.clients == 0


def test_sse_heartbeat_and_client_cap(store, monkeypatch):
    from aistats_engine.web import server as web_server
    monkeypatch.setattr(web_server, "HEARTBEAT_SECONDS", 0.3)
    e = Env(store, hub={"max_clients": 1})
    first = RawSSE(e.server.port)
    try:
        first.headers()
        deadline = time.monotonic() + 5
        while b": keep-alive" not in first.buf and time.monotonic() < deadline:
            first.read_some(0.2)
        assert b": keep-alive" in first.buf  # a comment line, ignored by EventSource
        second = RawSSE(e.server.port)
        try:
            assert second.headers().startswith("HTTP/1.1 503")
        finally:
            second.close()
    finally:
        first.close()
        e.close()


def test_slow_sse_client_is_bounded_and_resynced(store):
    """A browser that stops reading: its queue stays bounded, memory does not grow with the
    records published meanwhile, and it gets one resync when it reads again."""
    e = Env(store, hub={"max_queue": 50})
    sse = RawSSE(e.server.port, rcvbuf=4096)
    try:
        sse.headers()
        sse.wait_for(lambda evs: any(x == "hello" for x, _ in evs))
        pad = "p" * 4000
        events = [make_event(make_record(i, attributes={"pad": pad})) for i in range(1, 3001)]
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        for n, ev in enumerate(events):  # the hub alone (the store is not the point here)
            e.hub.finished(ev)
            if n % 200 == 0:
                time.sleep(0.01)  # let the web loop take them
        time.sleep(0.5)
        grown = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        # ~13 MB of messages went past; what stayed is one bounded queue and one batch
        assert grown < 3 << 20, grown
        stats = e.hub.client_stats()
        assert len(stats) == 1 and stats[0]["queued"] <= 50 and stats[0]["resyncs"] >= 1
        assert stats[0]["queued_bytes"] <= e.hub.max_queue_bytes
        # the reader catches up: a resync, then live records again
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(x == "resync" for x, _ in sse.events()):
            sse.read_some(0.2)
        assert any(x == "resync" for x, _ in sse.events())
        sse.buf = b""
        while sse.read_some(0.3):
            pass
        sse.buf = b""
        e.hub.finished(make_event(make_record(5000, model="after-resync")))
        sse.wait_for(lambda evs: any(x == "record" and d["id"] == 5000 for x, d in evs))
    finally:
        sse.close()
        e.close()


# -- exports --------------------------------------------------------------------------------------

def test_export_jsonl_follows_filter_and_sort(data):
    r = data.get("/api/export.jsonl")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/x-ndjson")
    assert "attachment" in r.headers["content-disposition"]
    rows = [json.loads(x) for x in r.text.splitlines()]
    assert [x["id"] for x in rows] == list(range(40, 0, -1))
    assert SECRET not in r.text
    r = data.get("/api/export.jsonl", params={"model": "gpt-4o", "sort": "input_tokens",
                                               "order": "asc", "limit": 5})
    got = [json.loads(x) for x in r.text.splitlines()]
    want = sorted((x for x in data.records if x.model == "gpt-4o"), key=lambda x: x.input_tokens)
    assert [x["id"] for x in got] == [x.id for x in want][:5]


def test_export_markdown_summary_and_rows(data):
    r = data.get("/api/export.md", params={"provider": "openai"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/markdown")
    text = r.text
    want = [x for x in data.records if x.provider == "openai"]
    assert f"| Requests | {len(want)} |" in text
    assert f"| Prompt tokens (all) | {sum(x.input_tokens for x in want):,} |" in text
    assert "Time range (UTC)" in text and "token-weighted" in text
    assert "Filter: provider=openai" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and
            line.split("|")[1].strip().isdigit()]
    assert [int(x.split("|")[1]) for x in rows] == sorted((x.id for x in want), reverse=True)
    assert SECRET not in text


def test_exports_are_bounded(store):
    e = Env(store, max_export_rows=10)
    try:
        e.publish(*[make_event(make_record(i)) for i in range(1, 31)])
        assert len(e.get("/api/export.jsonl").text.splitlines()) == 10
        assert_400(e.get("/api/export.jsonl", params={"limit": 11}), "limit", "1 to 10")
        md = e.get("/api/export.md").text
        assert "| Requests | 10 |" in md and "at most 10 rows" in md
    finally:
        e.close()


# -- metrics, health, the store off -----------------------------------------------------------------

def test_metrics_endpoint_renders_current_registry(env):
    assert env.get("/metrics").status_code == 404  # metrics off
    reg = CollectorRegistry()
    Counter("aistats_webtest", "a test counter", registry=reg).inc(3)
    env.registry = reg
    r = env.get("/metrics")
    assert r.status_code == 200 and "aistats_webtest_total 3.0" in r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    om = env.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    assert om.text.rstrip().endswith("# EOF")
    reg2 = CollectorRegistry()
    Counter("aistats_other", "another", registry=reg2).inc()
    env.registry = reg2  # swapped at run time: served at once
    assert "aistats_other_total 1.0" in env.get("/metrics").text
    h = env.get("/healthz")
    assert (h.status_code, h.text) == (200, "ok\n")


def test_store_off_is_404_and_meta_says_so(env):
    env.store = None
    for path in ("/api/activity", "/api/stats", "/api/sessions", "/api/captures/1",
                 "/api/export.jsonl", "/api/sessions/x"):
        r = env.get(path)
        assert r.status_code == 404 and "store is off" in r.json()["error"], path
    assert env.get("/api/meta").json()["store"] is False
    assert env.get("/nothing/here").status_code == 404


def test_meta(env):
    m = env.get("/api/meta").json()
    assert m["store"] is True and m["sort_keys"] == list(SORT_KEYS)
    assert m["session_sort_keys"] == list(SESSION_SORT_KEYS) and m["max_limit"] == 1000


# -- the token ------------------------------------------------------------------------------------

def test_token_required_and_accepted_by_header_query_and_cookie(store, caplog):
    e = Env(store, token=TOKEN)
    caplog.set_level(logging.DEBUG)
    try:
        e.publish(make_event(make_record(1), chat_request([{"role": "user", "content": "x"}]),
                             tool_call_stream(["y"], None)))
        fresh = httpx.Client(base_url=e.url, timeout=10)
        for path in ("/api/activity", "/api/stats", "/api/sessions", "/api/captures/1",
                     "/api/inflight", "/api/events", "/api/export.jsonl", "/api/meta", "/",
                     "/static/app.js"):
            r = fresh.get(path)
            assert r.status_code == 401, path
            assert TOKEN not in r.text and "token" in r.json()["error"]
            assert r.headers["www-authenticate"].startswith("Bearer")
        assert fresh.get("/api/activity", headers={"Authorization": "Bearer nope"}).status_code \
            == 401
        assert fresh.get("/api/activity", params={"token": TOKEN[:-1]}).status_code == 401
        assert fresh.get("/api/activity", headers={"Authorization": "Basic " + TOKEN}
                         ).status_code == 401
        # open without a token
        assert fresh.get("/metrics").status_code in (200, 404)
        assert fresh.get("/healthz").status_code == 200
        # a bearer token
        r = fresh.get("/api/activity", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200 and r.json()["total"] == 1
        assert "set-cookie" not in r.headers
        # ?token= sets an HttpOnly cookie that is not the token
        r = fresh.get("/api/stats", params={"token": TOKEN})
        assert r.status_code == 200
        cookie = r.headers["set-cookie"]
        assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
        assert TOKEN not in cookie
        assert fresh.cookies  # kept by the client
        assert fresh.get("/api/activity").status_code == 200  # the cookie alone
        assert fresh.get("/static/app.js").status_code == 200
        other = httpx.Client(base_url=e.url, timeout=10,
                             cookies={f"aistats_auth_{e.server.port}": "forged"})
        assert other.get("/api/activity").status_code == 401
        # the UI: /?token= sets the cookie and takes the token out of the address bar
        ui = httpx.Client(base_url=e.url, timeout=10)
        r = ui.get("/", params={"token": TOKEN})
        assert r.status_code == 303 and r.headers["location"] == "/"
        page = ui.get("/")
        assert page.status_code == 200 and "<title>aistats</title>" in page.text
        # events with the cookie
        sse = RawSSE(e.server.port, headers={"Cookie": cookie.split(";")[0]})
        try:
            assert sse.headers().startswith("HTTP/1.1 200")
        finally:
            sse.close()
        for c in (fresh, other, ui):
            c.close()
        logged = "\n".join(rec.getMessage() for rec in caplog.records
                            if rec.name.startswith(("aistats", "tornado")))
        assert TOKEN not in logged
    finally:
        e.close()


def test_loopback_binding_refuses_foreign_host_names(env):
    r = env.get("/api/activity", headers={"Host": "evil.example:80"})
    assert r.status_code == 403 and "loopback" in r.json()["error"]
    assert env.get("/", headers={"Host": "rebound.example"}).status_code == 403
    assert env.get("/healthz", headers={"Host": "evil.example"}).status_code == 200
    assert env.get("/api/activity", headers={"Host": f"localhost:{env.server.port}"}
                   ).status_code == 200


# -- the UI files ---------------------------------------------------------------------------------

def test_ui_is_served_with_a_strict_policy_and_nothing_external(env):
    r = env.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    import re
    for path in ("/", "/static/app.js", "/static/app.css", "/static/favicon.svg"):
        body = env.get(path)
        assert body.status_code == 200, path
        # no CDN or other host: the only absolute URL is the SVG namespace
        urls = set(re.findall(r"https?://[^\s'\"`)]+", body.text)) - {"http://www.w3.org/2000/svg"}
        assert not urls, (path, urls)
    for path in ("/static/../server.py", "/static/%2e%2e/server.py", "/static/nope.js"):
        r = env.get(path)
        assert r.status_code in (403, 404) and "class WebServer" not in r.text, path


# -- lifecycle ------------------------------------------------------------------------------------

def test_start_binds_synchronously_and_stop_releases_the_port(store):
    e = Env(store)
    port = e.server.port
    sse = RawSSE(port)
    try:
        sse.headers()
        busy = WebServer("127.0.0.1", port, metrics=lambda: None, store=lambda: None,
                         hub=EventHub(), inflight=list)
        with pytest.raises(OSError):
            busy.start()
        t0 = time.monotonic()
        e.close()
        assert time.monotonic() - t0 < 1.5
        again = WebServer("127.0.0.1", port, metrics=lambda: None, store=lambda: None,
                          hub=EventHub(), inflight=list)
        again.start()  # the same port at once
        try:
            assert again.port == port
            assert httpx.get(f"http://127.0.0.1:{port}/healthz").text == "ok\n"
        finally:
            again.stop()
        assert e.hub.clients == 0
    finally:
        sse.close()


def test_hub_hands_over_to_a_new_server(store):
    """At run time the addon binds the new server before stopping the old one; events go to
    the new one's clients."""
    hub = EventHub(list)
    a = WebServer("127.0.0.1", 0, metrics=lambda: None, store=lambda: store, hub=hub,
                  inflight=list)
    a.start()
    b = WebServer("127.0.0.1", 0, metrics=lambda: None, store=lambda: store, hub=hub,
                  inflight=list)
    b.start()
    sse = RawSSE(b.port)
    try:
        sse.headers()
        a.stop()
        hub.finished(make_event(make_record(9, model="handed-over")))
        sse.wait_for(lambda evs: any(x == "record" and d["id"] == 9 for x, d in evs))
    finally:
        sse.close()
        b.stop()
