"""The "LLM" mitmproxy contentview (addon/aistats_contentview.py): chosen by priority for LLM
bodies only, renders the conversation; and once through a real mitmweb and its HTTP API."""

from __future__ import annotations

import gzip
import http.server
import json
import secrets
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from mitmproxy import contentviews
from mitmproxy.contentviews import Metadata
from mitmproxy.test import taddons, tflow

import aistats_contentview
from fixtures import sse
from mitm import REPO_ROOT, _env, free_port, port_open, stop_process

CHAT_STREAM = sse(
    {"id": "chatcmpl-7", "model": "gpt-4o-mini", "choices": [{"index": 0, "delta": {"role": "assistant", "content": "The answer "}}]},
    {"id": "chatcmpl-7", "model": "gpt-4o-mini", "choices": [{"index": 0, "delta": {"content": "is 42."}}]},
    {"id": "chatcmpl-7", "model": "gpt-4o-mini", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{\"q\":"}}]}}]},
    {"id": "chatcmpl-7", "model": "gpt-4o-mini", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "\"life\"}"}}]}}]},
    {"id": "chatcmpl-7", "model": "gpt-4o-mini", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    {"id": "chatcmpl-7", "model": "gpt-4o-mini", "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 6}},
    "[DONE]",
)
CHAT_REQ = {"model": "gpt-4o-mini", "stream": True, "messages": [
    {"role": "system", "content": "You answer questions."},
    {"role": "user", "content": "What is the meaning of life?"}]}
ANTH_REQ = {"model": "claude-sonnet-4-5", "max_tokens": 64, "system": "Be Claude.",
            "tools": [{"name": "get_weather", "description": "Weather", "input_schema": {"type": "object"}}],
            "messages": [{"role": "user", "content": "Weather?"},
                         {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Rome"}}]},
                         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}]}]}


@pytest.fixture(autouse=True)
def _options():
    with taddons.context():  # make_metadata reads ctx.options
        yield


def flow(path: str, req: dict | bytes, status: int = 200, resp_ctype: str = "text/event-stream",
         resp: bytes = CHAT_STREAM, host: str = "api.openai.com"):
    f = tflow.tflow(resp=True)
    f.request.method = "POST"
    f.request.host = host
    f.request.path = path
    f.request.headers["content-type"] = "application/json"
    f.request.content = req if isinstance(req, bytes) else json.dumps(req).encode()
    f.response.status_code = status
    f.response.headers["content-type"] = resp_ctype
    f.response.content = resp
    return f


def test_registered_under_its_name():
    assert contentviews.registry["llm"] is aistats_contentview.llm
    assert aistats_contentview.llm.name == "LLM"
    assert "llm" in contentviews.registry.available_views()


def test_chosen_for_openai_chat_stream_response():
    f = flow("/v1/chat/completions", CHAT_REQ)
    res = contentviews.prettify_message(f.response, f)
    assert res.view_name == "LLM"
    text = res.text
    assert "Answer:\nThe answer is 42." in text
    assert "[tool call] lookup (id call_1): {\"q\":\"life\"}" in text
    assert "Finish reason: tool_calls" in text and "\"prompt_tokens\":11" in text
    # the request's messages come along, after the response
    assert "What is the meaning of life?" in text and "You answer questions." in text
    assert text.index("=== Response ===") < text.index("What is the meaning of life?")


def test_chosen_for_anthropic_request():
    f = flow("/v1/messages", ANTH_REQ, resp_ctype="application/json", resp=b"{}",
             host="api.anthropic.com")
    res = contentviews.prettify_message(f.request, f)
    assert res.view_name == "LLM"
    for want in ("=== System ===\nBe Claude.", "- get_weather: Weather", "Weather?",
                 "[tool call] get_weather (id toolu_1): {\"city\":\"Rome\"}",
                 "[tool result] (id toolu_1):\nsunny"):
        assert want in res.text, want
    assert "=== Response ===" not in res.text


def test_not_chosen_for_other_traffic():
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    f = flow("/api/users", body, resp_ctype="application/json", resp=b'{"choices": []}')
    assert contentviews.prettify_message(f.request, f).view_name == "JSON"
    assert contentviews.prettify_message(f.response, f).view_name == "JSON"
    f = flow("/v1/chat/completions", CHAT_REQ)
    f.request.method = "GET"  # match_api: POST only
    assert contentviews.prettify_message(f.response, f).view_name != "LLM"
    f = flow("/v1/embeddings", {"input": "x"}, resp_ctype="application/json", resp=b'{"data": []}')
    assert contentviews.prettify_message(f.response, f).view_name == "JSON"  # not a conversation
    f = flow("/v1/chat/completions", CHAT_REQ, status=429, resp_ctype="application/json",
             resp=b'{"error": {"message": "slow down"}}')
    assert contentviews.prettify_message(f.response, f).view_name == "JSON"
    # chosen by hand all the same
    res = contentviews.prettify_message(f.response, f, view_name="llm")
    assert res.view_name == "LLM" and "Error: slow down" in res.text


def test_priority_values():
    view = aistats_contentview.llm
    f = flow("/v1/chat/completions", CHAT_REQ)
    assert view.render_priority(f.response.content, Metadata(flow=f, http_message=f.response, content_type="text/event-stream")) == 2
    assert view.render_priority(f.request.content, Metadata(flow=f, http_message=f.request, content_type="application/json")) == 2
    assert view.render_priority(b"", Metadata(flow=f, http_message=f.request)) == 0
    assert view.render_priority(b"plain text", Metadata(flow=f, http_message=f.request)) == 0
    assert view.render_priority(b"{}", Metadata()) == 0  # no flow: never auto-chosen
    assert view.render_priority(b"{}", Metadata(flow=object(), http_message=object())) == 0  # type: ignore[arg-type]


def test_gzip_response_and_bedrock_path():
    f = flow("/v1/chat/completions", CHAT_REQ)
    f.response.headers["content-encoding"] = "gzip"
    f.response.raw_content = gzip.compress(CHAT_STREAM)
    res = contentviews.prettify_message(f.response, f)
    assert res.view_name == "LLM" and "The answer is 42." in res.text
    req = {"anthropic_version": "bedrock-2023-05-31", "messages": [{"role": "user", "content": "Hey"}]}
    body = json.dumps({"type": "message", "id": "msg_1", "role": "assistant", "content": [{"type": "text", "text": "Hello from Bedrock"}],
                       "stop_reason": "end_turn", "usage": {"input_tokens": 3, "output_tokens": 4}}).encode()
    f = flow("/model/anthropic.claude-3-haiku/invoke", req, resp_ctype="application/json", resp=body,
             host="bedrock-runtime.us-east-1.amazonaws.com")
    res = contentviews.prettify_message(f.response, f)
    assert res.view_name == "LLM" and "Answer:\nHello from Bedrock" in res.text
    assert "Hey" in res.text


def test_unreadable_bodies_never_raise():
    view = aistats_contentview.llm
    f = flow("/v1/chat/completions", b"{not json", resp_ctype="text/event-stream", resp=b"data: {broken\n\n")
    text = contentviews.prettify_message(f.response, f, view_name="llm").text
    assert "request body is not valid JSON" in text and "not valid JSON, left out" in text
    f.response.headers["content-encoding"] = "br"
    f.response.raw_content = b"\x00garbage"  # mitmproxy cannot decode: raw bytes reach the view
    assert isinstance(contentviews.prettify_message(f.response, f, view_name="llm").text, str)
    assert isinstance(view.prettify(b"\xff\x00", Metadata()), str)
    assert isinstance(view.prettify(b'{"messages": [{"role": "user", "content": "x"}]}', Metadata()), str)
    assert "x" in view.prettify(b'{"messages": [{"role": "user", "content": "x"}]}', Metadata())
    assert isinstance(view.prettify(b"{}", Metadata(flow=object(), http_message=object())), str)  # type: ignore[arg-type]


# -- a real mitmweb ------------------------------------------------------------------------------

class _Upstream(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("content-length", str(len(CHAT_STREAM)))
        self.end_headers()
        self.wfile.write(CHAT_STREAM)

    def log_message(self, *args) -> None:
        pass


def _wait(cond, timeout: float, what: str, output=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout} s\n{output()}")
        time.sleep(0.1)


def test_mitmweb_serves_the_llm_view(tmp_path: Path):
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    up_thread = threading.Thread(target=upstream.serve_forever, daemon=True)
    up_thread.start()
    web_port, proxy_port = free_port(), free_port()
    token = secrets.token_hex(16)
    out_path = tmp_path / "mitmweb.out"
    args = [str(REPO_ROOT / ".venv" / "bin" / "mitmweb"),
            "--set", f"confdir={tmp_path / 'confdir'}",
            "--listen-host", "127.0.0.1", "--listen-port", str(proxy_port),
            "--web-host", "127.0.0.1", "--web-port", str(web_port),
            "--set", "web_open_browser=false", "--set", f"web_password={token}",
            "-s", str(REPO_ROOT / "addon" / "aistats_contentview.py")]
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=_env(), cwd=tmp_path, process_group=0)
    output = lambda: out_path.read_text(errors="replace")  # noqa: E731
    try:
        _wait(lambda: port_open(proxy_port) and port_open(web_port) or proc.poll() is not None,
              30, "mitmweb listening", output)
        assert proc.poll() is None, output()
        url = f"http://127.0.0.1:{upstream.server_address[1]}/v1/chat/completions"
        with httpx.Client(proxy=f"http://127.0.0.1:{proxy_port}", trust_env=False, timeout=20) as c:
            r = c.post(url, json=CHAT_REQ)
        assert r.status_code == 200 and r.content == CHAT_STREAM
        api = httpx.Client(base_url=f"http://127.0.0.1:{web_port}", trust_env=False, timeout=20,
                           headers={"Authorization": f"Bearer {token}"})
        with api:
            flows: list = []

            def have_flow() -> bool:
                flows[:] = [f for f in api.get("/flows").json()
                            if f.get("response") and f["request"]["path"] == "/v1/chat/completions"]
                return bool(flows)

            _wait(have_flow, 15, "the flow in mitmweb", output)
            fid = flows[0]["id"]
            auto = api.get(f"/flows/{fid}/response/content/auto.json")
            assert auto.status_code == 200, auto.text
            got = auto.json()
            assert got["view_name"] == "LLM", got
            assert "The answer is 42." in got["text"]
            assert "[tool call] lookup (id call_1)" in got["text"]
            named = api.get(f"/flows/{fid}/response/content/llm.json").json()
            assert named["view_name"] == "LLM" and "The answer is 42." in named["text"]
            req = api.get(f"/flows/{fid}/request/content/auto.json").json()
            assert req["view_name"] == "LLM" and "What is the meaning of life?" in req["text"]
            assert "llm" in api.get("/state").json()["contentViews"]
        # the password is really required (a fresh client: no auth cookie)
        with httpx.Client(trust_env=False, timeout=20) as anon:
            wrong = anon.get(f"http://127.0.0.1:{web_port}/flows",
                             headers={"Authorization": "Bearer wrong"})
            assert wrong.status_code == 403
    finally:
        stop_process(proc)
        upstream.shutdown()
        upstream.server_close()
        up_thread.join(timeout=10)
