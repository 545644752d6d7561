"""Hostile traffic end to end: a real mitmdump running the addon, a raw-socket upstream on
127.0.0.1 that writes exactly the bytes each case scripts (no HTTP library in between to
normalise them), and a raw-socket client, so "the client got what the upstream sent" is a
byte comparison of whole responses.

For every case: the traffic is byte-exact, mitmdump is still alive (and logged no addon
traceback), and the JSONL log has exactly one record for the request, marked as
../shared/spec/record.md says (``parse_error`` for unreadable bodies, ``error``/``error_type``
for failures).

Cases: (1) secrets echoed by the upstream never reach any aistats output; (2) a bad option stops
mitmdump at start with one line; (3) absurd token counts; (4) truncated compressed bodies;
(5) decompression bombs; (6) 100k-deep JSON; (7) 1000 response headers; (8) a malformed AWS
event stream; (9) a non-HTTP upstream and a closed port; (10) a websocket; (11) the log's
directory deleted and re-created while running.

Every process is stopped by PID, every loop and wait is bounded, everything listens on
127.0.0.1 only.
"""

from __future__ import annotations

import base64
import brotli
import gzip
import hashlib
import json
import re
import secrets
import shutil
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest
import zstandard

from scrapekit import scrape
from mitm import Mitmdump, free_port, start_mitmdump_expect_failure
from upstream import encode_chunks, openai_chat_json, openai_chat_stream, openai_usage

WAIT_S = 15.0  # bound on every wait for a record / a metric
OPENMETRICS_ACCEPT = "application/openmetrics-text; version=1.0.0; charset=utf-8"
CASE_HEADER = "x-hostile-case"  # not "x-aistats-…": mitmproxy's own output must not say "aistats"
JSON_CT = ("content-type", "application/json")
SSE_CT = ("content-type", "text/event-stream; charset=utf-8")


# -- a raw-socket upstream ---------------------------------------------------------------------

@dataclass
class RawRequest:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    @property
    def query(self) -> str:
        return urlsplit(self.target).query


Script = bytes | Callable[[RawRequest], bytes]


class RawUpstream:
    """HTTP/1.1 on a plain socket: reads one request per connection, writes the scripted bytes
    exactly (status line, headers and body as given), then closes. A script is picked by the
    ``x-hostile-case`` header, else by the request path. ``serve`` scripts (websocket) get the
    connection itself."""

    def __init__(self) -> None:
        self.scripts: dict[str, Script] = {}
        self.conn_handlers: dict[str, Callable[[socket.socket, RawRequest, RawUpstream], None]] = {}
        self.sent: dict[str, bytes] = {}
        self.requests: dict[str, RawRequest] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._accept_loop, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, key: str, script: Script) -> None:
        self.scripts[key] = script

    def add_conn_handler(self, key: str, fn: Callable[[socket.socket, RawRequest, RawUpstream], None]) -> None:
        self.conn_handlers[key] = fn

    def record_sent(self, key: str, data: bytes) -> None:
        with self._lock:
            self.sent[key] = self.sent.get(key, b"") + data

    def __enter__(self) -> RawUpstream:
        self._accept.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._accept.join(timeout=5)
        for t in self._threads:
            t.join(timeout=5)
        self._sock.close()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
            t.start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                req = _read_request(conn)
            except (OSError, ValueError):
                return
            if req is None:
                return
            key = req.header(CASE_HEADER) or urlsplit(req.target).path
            with self._lock:
                self.requests[key] = req
            handler = self.conn_handlers.get(key)
            if handler is not None:
                try:
                    handler(conn, req, self)
                except OSError:
                    pass
                return
            script = self.scripts.get(key)
            if script is None:
                data = http_response(404, [JSON_CT], b'{"error":{"message":"no script"}}')
            else:
                data = script if isinstance(script, bytes) else script(req)
            with self._lock:
                self.sent[key] = data  # before the client can see it
            try:
                conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)
                # Let the peer read everything before the socket closes (no RST on unread input).
                conn.settimeout(2)
                while conn.recv(65536):
                    pass
            except OSError:
                pass


def _read_until(conn: socket.socket, marker: bytes, buf: bytes, limit: int = 1 << 20) -> tuple[bytes, bytes] | None:
    while marker not in buf:
        if len(buf) > limit:
            raise ValueError("head too large")
        piece = conn.recv(65536)
        if not piece:
            return None
        buf += piece
    head, _, rest = buf.partition(marker)
    return head, rest


def _read_request(conn: socket.socket) -> RawRequest | None:
    got = _read_until(conn, b"\r\n\r\n", b"")
    if got is None:
        return None
    head, rest = got
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = [(k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in lines[1:])]
    n = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
    body = rest
    while len(body) < n:
        piece = conn.recv(min(1 << 20, n - len(body)))
        if not piece:
            break
        body += piece
    return RawRequest(method, target, headers, body[:n])


def http_response(status: int, headers: list[tuple[str, str]], body: bytes, length: int | None = None) -> bytes:
    """Raw HTTP/1.1 response: Content-Length is ``length`` (default: the body's), then close."""
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
    head += [f"{k}: {v}" for k, v in headers]
    head += [f"content-length: {len(body) if length is None else length}", "connection: close"]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


# -- a raw-socket client through the proxy -------------------------------------------------------

@dataclass
class RawResponse:
    raw: bytes  # every byte the client received
    status: int | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""


def proxy_request(m: Mitmdump, url: str, body: bytes = b"", headers: list[tuple[str, str]] = (),
                  method: str = "POST", timeout: float = 30) -> RawResponse:
    """One request in absolute form through the proxy (``Connection: close``); reads to EOF."""
    host = urlsplit(url).netloc
    lines = [f"{method} {url} HTTP/1.1", f"Host: {host}", "Connection: close",
             *(f"{k}: {v}" for k, v in headers)]
    if method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    data = b""
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", m.port), timeout=timeout) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        while time.monotonic() < deadline:
            try:
                piece = s.recv(1 << 20)
            except ConnectionResetError:
                break
            if not piece:
                break
            data += piece
            assert len(data) < 64 << 20, "response too large"
    return parse_response(data)


def parse_response(data: bytes) -> RawResponse:
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return RawResponse(data)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = [(k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in lines[1:])]
    names = {k.lower(): v for k, v in headers}
    body = rest
    if names.get("transfer-encoding", "").lower() == "chunked":
        body, i = b"", 0
        while True:
            j = rest.index(b"\r\n", i)
            size = int(rest[i:j].split(b";")[0], 16)
            if size == 0:
                break
            body += rest[j + 2 : j + 2 + size]
            i = j + 2 + size + 2
    elif "content-length" in names:
        body = rest[: int(names["content-length"])]
    return RawResponse(data, status, headers, body)


def assert_same_traffic(got: RawResponse, sent: bytes) -> None:
    """The client received exactly the upstream's response: status line, headers, body."""
    want = parse_response(sent)
    assert got.status == want.status
    assert got.headers == want.headers, (got.headers[:5], want.headers[:5])
    assert got.body == want.body, (len(got.body), len(want.body))
    assert got.raw == sent


# -- the log, metrics, the process -----------------------------------------------------------------

def records(*paths: Path) -> list[dict]:
    out = []
    for p in paths:
        if p.exists():
            out += [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
    return out


def wait_record(log: Path, path: str) -> dict:
    """The one record of the request to ``path`` (paths are unique per request here)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        found = [r for r in records(log) if r["path"] == path]
        if found:
            assert len(found) == 1, found
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no record for {path}; have {[r['path'] for r in records(log)]}")


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)')


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples ``name`` whose labels include ``labels`` (Prometheus text format)."""
    total = 0.0
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or m.group(1) != name:
            continue
        lbl = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(lbl.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def assert_alive(m: Mitmdump) -> None:
    assert m.proc is not None and m.proc.poll() is None, f"mitmdump exited\n{m.output()[-3000:]}"
    out = m.output()
    # An exception escaping the addon is a crash of the addon, even when mitmproxy survives it.
    assert "Addon error" not in out, out[-4000:]
    assert "internal error in aistats" not in out, out[-4000:]


def aistats_lines(m: Mitmdump) -> list[str]:
    return [ln for ln in m.output().splitlines() if "aistats" in ln]


def chat_body(model: str, stream: bool = False) -> bytes:
    return json.dumps({"model": model, "stream": stream,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()


# -- the shared mitmdump ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    log = tmp / "main.jsonl"
    with RawUpstream() as up, Mitmdump(tmp, options={"aistats_log": str(log)}) as m:
        yield {"up": up, "m": m, "log": log, "tmp": tmp, "metrics": m.metrics_url(), "paths": []}


def exchange(env, case: str, response: Script, body: bytes | None = None, path: str | None = None,
             headers: list[tuple[str, str]] = ()) -> tuple[RawResponse, dict]:
    """One request through the shared proxy to a scripted response; returns what the client got
    and the request's record, after checking the traffic and the process."""
    up, m = env["up"], env["m"]
    path = path or f"/{case}/v1/chat/completions"
    up.add(case, response)
    env["paths"].append(path)
    got = proxy_request(m, up.url + path, chat_body(f"model-{case}") if body is None else body,
                        [(CASE_HEADER, case), *headers])
    assert_same_traffic(got, up.sent[case])
    rec = wait_record(env["log"], path)
    assert_alive(m)
    return got, rec


# == (1) secrets ===================================================================================

def _fake_keys() -> dict[str, str]:
    h = lambda n: secrets.token_hex(n)  # noqa: E731
    pw = "pw" + h(16)
    return {
        "authorization": "sk-proj-" + h(18),
        "x-api-key": "sk-ant-api03-" + h(16),
        "x-goog-api-key": "AIza" + base64.urlsafe_b64encode(secrets.token_bytes(27)).decode()[:35],
        "api-key": h(16),  # Azure: 32 hex digits, no recognisable shape
        "proxy-basic": base64.b64encode(f"hostile-user:{pw}".encode()).decode(),
        "proxy-password": pw,
        "cookie": "ck" + h(18),
        "query": "qk" + h(18),
    }


def _route_headers(keys: dict[str, str], route: str) -> tuple[list[tuple[str, str]], str]:
    """Headers and query string carrying the key(s) of ``route`` ("all": every route)."""
    routes = {
        "authorization": [("Authorization", f"Bearer {keys['authorization']}")],
        "x-api-key": [("x-api-key", keys["x-api-key"])],
        "x-goog-api-key": [("x-goog-api-key", keys["x-goog-api-key"])],
        "api-key": [("api-key", keys["api-key"])],
        "proxy-authorization": [("Proxy-Authorization", f"Basic {keys['proxy-basic']}")],
        "cookie": [("Cookie", f"session={keys['cookie']}; theme=dark")],
        "query": [],
    }
    if route == "all":
        return [h for r in routes.values() for h in r], f"key={keys['query']}&alt=json"
    return routes[route], (f"key={keys['query']}&alt=json" if route == "query" else "alt=json")


def _echoed(req: RawRequest) -> list[str]:
    """Every credential the upstream received, as a careless provider would quote it."""
    out = []
    for name in ("authorization", "x-api-key", "x-goog-api-key", "api-key", "proxy-authorization"):
        v = req.header(name)
        if v:
            scheme, _, token = v.partition(" ")
            out.append(token if token else v)
            if scheme.lower() == "basic" and token:
                out.append(base64.b64decode(token).decode().partition(":")[2])
    cookie = req.header("cookie")
    if cookie:
        out += [p.partition("=")[2].strip() for p in cookie.split(";") if "session" in p]
    out += [v for k, v in parse_qsl(req.query) if k == "key"]
    return out


def _error_reply(status: int, openai_style: bool) -> Callable[[RawRequest], bytes]:
    def reply(req: RawRequest) -> bytes:
        keys = _echoed(req) or ["(none)"]
        if openai_style:
            msg = (f"Incorrect API key provided: {', '.join(keys)}. You can find your API key at "
                   "https://platform.openai.com/account/api-keys.")
            obj = {"error": {"message": msg, "type": "invalid_request_error", "param": None,
                             "code": "invalid_api_key"}}
        else:
            msg = f"API key not valid: {', '.join(keys)}. Please pass a valid API key."
            obj = {"error": {"code": status, "message": msg, "status": "INVALID_ARGUMENT"}}
        assert len(msg.encode()) < 480  # under the record's 500-byte clip (see the clip test)
        return http_response(status, [JSON_CT], json.dumps(obj).encode())
    return reply


def _stream_error_reply(req: RawRequest) -> bytes:
    keys = _echoed(req)
    first = {"id": keys[0], "object": "chat.completion.chunk", "created": 1, "model": keys[-1],
             "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"},
                          "finish_reason": None}]}
    err = {"error": {"message": f"Incorrect API key provided: {' '.join(keys)}",
                     "type": "invalid_request_error", "code": "invalid_api_key"}}
    body = (f"data: {json.dumps(first)}\n\n" f"data: {json.dumps(err)}\n\n" "data: [DONE]\n\n").encode()
    return http_response(200, [SSE_CT], body)


ROUTES = ("authorization", "x-api-key", "x-goog-api-key", "api-key", "proxy-authorization",
          "cookie", "query", "all")


def _scan_for_secrets(texts: dict[str, str], keys: dict[str, str]) -> list[str]:
    """Where any key, or any 12-character piece of one, appears."""
    found = []
    for where, text in texts.items():
        for name, key in keys.items():
            pieces = {key[i : i + 12] for i in range(len(key) - 11)}
            if key in text or any(p in text for p in pieces):
                found.append(f"{name} in {where}")
    return found


@pytest.mark.parametrize("verbosity", ["info", "debug"])
def test_01_secrets_echoed_by_the_upstream_reach_no_output(tmp_path, verbosity):
    keys = _fake_keys()
    log = tmp_path / "logs" / "llm.jsonl"
    opts = {"aistats_log": str(log), "aistats_log_max_bytes": "300", "aistats_log_backups": "50",
            "termlog_verbosity": verbosity}
    sent_paths: list[str] = []
    received: dict[str, RawRequest] = {}
    with RawUpstream() as up, Mitmdump(tmp_path, options=opts) as m:
        url = m.metrics_url()
        for i, route in enumerate(ROUTES):
            for status, openai_style in ((401, True), (400, False)):
                case = f"sec-{route}-{status}"
                hdrs, query = _route_headers(keys, route)
                up.add(case, _error_reply(status, openai_style))
                path = (f"/{case}/v1beta/models/gemini-2.5-flash:generateContent" if not openai_style
                        else f"/{case}/v1/chat/completions")
                body = (json.dumps({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}).encode()
                        if not openai_style else chat_body("gpt-4o-mini"))
                got = proxy_request(m, f"{up.url}{path}?{query}", body, [(CASE_HEADER, case), *hdrs])
                assert_same_traffic(got, up.sent[case])
                assert got.status == status
                sent_paths.append(path)
                received[path] = up.requests[case]
        case = "sec-stream"
        hdrs, query = _route_headers(keys, "all")
        up.add(case, _stream_error_reply)
        path = f"/{case}/v1/chat/completions"
        got = proxy_request(m, f"{up.url}{path}?{query}", chat_body("gpt-4o-mini", stream=True),
                            [(CASE_HEADER, case), *hdrs])
        assert_same_traffic(got, up.sent[case])
        sent_paths.append(path)
        received[path] = up.requests[case]

        logs = sorted(log.parent.glob(log.name + "*"))
        deadline = time.monotonic() + WAIT_S
        while len(records(*logs)) < len(sent_paths) and time.monotonic() < deadline:
            time.sleep(0.05)
            logs = sorted(log.parent.glob(log.name + "*"))
        # both formats are scraped while the process runs, and the API the UI reads
        metrics_text, metrics_om = scrape(url), scrape(url, OPENMETRICS_ACCEPT)
        api_texts = _api_texts(url.rsplit("/metrics", 1)[0] + "/api", len(sent_paths))
        assert_alive(m)
        time.sleep(0.3)  # the summary lines of the last records
        lines = aistats_lines(m)
    logs = sorted(log.parent.glob(log.name + "*"))  # again, now that nothing rotates any more
    assert len(logs) > 3, logs  # it did rotate (300-byte files)
    recs = records(*logs)
    by_path = {p: [r for r in recs if r["path"] == p] for p in sent_paths}
    assert all(len(v) == 1 for v in by_path.values()), {p: len(v) for p, v in by_path.items()}
    assert len(recs) == len(sent_paths)
    for path, (rec,) in by_path.items():
        echoed = _echoed(received[path])
        if echoed:  # the upstream quoted something: the record says so, redacted
            assert rec["error"] and "[REDACTED]" in rec["error"], rec
        if path.startswith("/sec-stream"):
            assert rec["status"] == 200 and rec["error_type"] == "invalid_request_error", rec
        else:
            assert rec["error_type"] == str(rec["status"]), rec
    summaries = [ln for ln in lines if re.search(r"aistats: #\d+ ", ln)]
    assert len(summaries) == len(sent_paths), lines
    texts = {"log files": "".join(p.read_text() for p in logs), "metrics text": metrics_text,
             "metrics openmetrics": metrics_om, "aistats output lines": "\n".join(lines),
             **api_texts}
    assert not _scan_for_secrets(texts, keys), _scan_for_secrets(texts, keys)


def _api_texts(api: str, n: int) -> dict[str, str]:
    """Everything the UI can load about these requests: activity, every capture (with its
    rendered conversation), sessions, stats, in-flight and both exports."""
    deadline = time.monotonic() + WAIT_S
    while True:
        activity = json.loads(scrape(api + "/activity?limit=1000"))
        if activity["total"] >= n or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert activity["total"] == n, activity["total"]
    captures = [scrape(f"{api}/captures/{r['id']}") for r in activity["data"] if r["has_capture"]]
    assert captures, "no capture to scan"
    return {"api activity": json.dumps(activity), "api captures": "\n".join(captures),
            "api sessions": scrape(api + "/sessions"), "api stats": scrape(api + "/stats"),
            "api inflight": scrape(api + "/inflight"), "api export jsonl": scrape(api + "/export.jsonl"),
            "api export md": scrape(api + "/export.md")}


def test_01b_a_secret_cut_by_the_error_clip_leaks_no_prefix(env):
    """The record's ``error`` is clipped to 500 bytes: a key quoted across the cut must not
    leave its first half behind (redaction has to happen before, or despite, the cut)."""
    key = secrets.token_hex(20)  # no recognisable shape: only the request says it is a key
    msg = "API key not valid: " + "x" * (500 - len("API key not valid: ") - 20) + key + " (check it)"
    body = json.dumps({"error": {"code": 400, "message": msg, "status": "INVALID_ARGUMENT"}}).encode()
    _, rec = exchange(env, "clip-straddle", http_response(400, [JSON_CT], body),
                      headers=[("api-key", key)])
    texts = {"record": json.dumps(rec), "log": env["log"].read_text(),
             "metrics": scrape(env["metrics"]), "aistats lines": "\n".join(aistats_lines(env["m"]))}
    assert rec["error_type"] == "400"
    assert not _scan_for_secrets(texts, {"api-key": key}), (rec["error"][-60:], _scan_for_secrets(
        texts, {"api-key": key}))


# == (2) bad options ===============================================================================

@pytest.mark.parametrize("option,value", [
    ("aistats_print", "maybe"),
    ("aistats_metrics", "sometimes"),
    ("aistats_metrics_server_trio", "2"),
    ("aistats_max_body", "lots"),
    ("aistats_metrics_duration_buckets", "nan"),
])
def test_02_bad_option_stops_mitmdump_with_one_line(tmp_path, option, value):
    rc, out = start_mitmdump_expect_failure(tmp_path, options={option: value})
    assert rc != 0, out
    assert "Traceback" not in out, out
    naming = [ln for ln in out.splitlines() if option in ln]
    assert len(naming) == 1, out
    assert "expected" in naming[0] and repr(value) in naming[0], naming[0]


# == (3) absurd token counts =======================================================================

@pytest.mark.parametrize("name,usage,want", [
    ("neg", {"prompt_tokens": -5, "completion_tokens": 7, "total_tokens": 2}, (None, 7)),
    ("e30", {"prompt_tokens": 1e30, "completion_tokens": 3, "total_tokens": 3}, (None, 3)),
    ("big", {"prompt_tokens": 4, "completion_tokens": 2**70, "total_tokens": 2**70 + 4}, (4, None)),
    ("frac", {"prompt_tokens": 2.5, "completion_tokens": 2, "total_tokens": 4.5}, (None, 2)),
])
def test_03_invalid_usage_in_a_body(env, name, usage, want):
    body = (b'{"id":"chatcmpl-x","object":"chat.completion","model":"gpt-4o-mini","choices":[{"index":0,'
            b'"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":'
            + json.dumps(usage).encode() + b"}")
    _, rec = exchange(env, f"usage-{name}", http_response(200, [JSON_CT], body))
    assert (rec["input_tokens"], rec["output_tokens"], rec["total_tokens"]) == (*want, None), rec
    assert rec["parse_error"] and "invalid token count" in rec["parse_error"], rec
    assert rec["status"] == 200 and rec["error"] is None


def test_03b_invalid_usage_in_a_stream_and_metrics_stay_sane(env):
    events = openai_chat_stream(["a", "b"], usage=openai_usage(3, 2))
    bad = events[-2].replace(b'"prompt_tokens":3', b'"prompt_tokens":-5').replace(
        b'"completion_tokens":2', b'"completion_tokens":' + str(2**70).encode())
    assert bad != events[-2]
    body = b"".join(events[:-2]) + bad + events[-1]
    _, rec = exchange(env, "usage-stream", http_response(200, [SSE_CT], body),
                      body=chat_body("model-usage-stream", stream=True))
    assert rec["stream"] and (rec["input_tokens"], rec["output_tokens"]) == (None, None), rec
    assert "invalid token count" in (rec["parse_error"] or ""), rec
    text = scrape(env["metrics"])
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and m.group(1).startswith("gen_ai_client_token_usage"):
            v = float(m.group(3))
            assert v == v and 0 <= v < 1e12, line  # no NaN, no negative, no 1e30 / 2**70 added


# == (4) truncated compression =====================================================================

def _compress_whole(data: bytes, encoding: str) -> bytes:
    return b"".join(encode_chunks([data], encoding))


@pytest.mark.parametrize("shape", ["json", "sse"])
@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
def test_04_truncated_compressed_body(env, encoding, shape):
    if shape == "json":
        plain, ct = openai_chat_json("x" * 3000, usage=openai_usage(5, 6)), JSON_CT
    else:
        plain = b"".join(openai_chat_stream([f"tok{i} " * 20 for i in range(40)], usage=openai_usage(5, 6)))
        ct = SSE_CT
    packed = _compress_whole(plain, encoding)
    cut = packed[: len(packed) // 2]
    assert len(cut) > 20
    resp = http_response(200, [ct, ("content-encoding", encoding)], cut)  # Content-Length = the cut
    _, rec = exchange(env, f"trunc-{encoding}-{shape}", resp,
                      body=chat_body(f"trunc-{encoding}-{shape}", stream=shape == "sse"))
    assert (rec["parse_error"] or "").startswith("response decompression failed"), rec
    assert rec["status"] == 200 and rec["stream"] is (shape == "sse")


# == (5) decompression bombs ======================================================================

BOMB_PLAIN = 64 << 20  # 64 MiB of JSON whitespace


def _bomb(encoding: str) -> bytes:
    inner = b"{" + b" " * (BOMB_PLAIN - 2) + b"}"
    if encoding == "gzip":
        return gzip.compress(inner, compresslevel=6)
    if encoding == "br":
        return brotli.compress(inner, quality=4)
    return zstandard.ZstdCompressor(level=3).compress(inner)


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
def test_05_decompression_bomb_whole_body(env, encoding):
    packed = _bomb(encoding)
    assert len(packed) < 200_000
    _, rec = exchange(env, f"bomb-{encoding}",
                      http_response(200, [JSON_CT, ("content-encoding", encoding)], packed))
    assert "over" in (rec["parse_error"] or ""), rec
    status = Path(f"/proc/{env['m'].pid}/status").read_text()
    hwm_kb = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))
    assert hwm_kb < 400 * 1024, f"mitmdump peak RSS {hwm_kb} kB"


# == (6) deep JSON ================================================================================

DEPTH = 100_000
DEEP = {"array": b"[" * DEPTH + b"]" * DEPTH,
        "object": b'{"a":' * DEPTH + b"1" + b"}" * DEPTH}


@pytest.mark.parametrize("kind", ["array", "object"])
def test_06_deep_json_response_body(env, kind):
    _, rec = exchange(env, f"deep-resp-{kind}", http_response(200, [JSON_CT], DEEP[kind]))
    assert rec["parse_error"] == "invalid JSON", rec
    assert (rec["input_tokens"], rec["output_tokens"]) == (None, None)


@pytest.mark.parametrize("kind", ["array", "object"])
def test_06b_deep_json_request_body(env, kind):
    ok = openai_chat_json("fine", usage=openai_usage(2, 1))
    _, rec = exchange(env, f"deep-req-{kind}", http_response(200, [JSON_CT], ok), body=DEEP[kind])
    assert "request body is not valid JSON" in (rec["parse_error"] or ""), rec
    assert (rec["input_tokens"], rec["output_tokens"]) == (2, 1)  # the response is still read


def test_06c_deep_json_stream_event(env):
    events = openai_chat_stream(["a"], usage=openai_usage(3, 1))
    body = events[0] + b"data: " + DEEP["object"] + b"\n\n" + b"".join(events[1:])
    _, rec = exchange(env, "deep-sse", http_response(200, [SSE_CT], body),
                      body=chat_body("deep-sse", stream=True))
    assert "invalid JSON" in (rec["parse_error"] or ""), rec
    assert (rec["input_tokens"], rec["output_tokens"]) == (3, 1)


# == (7) 1000 response headers ====================================================================

def test_07_a_thousand_response_headers(env):
    many = [(f"x-h{i:04d}", f"v{i}") for i in range(1000)]
    got, rec = exchange(env, "headers-1000", http_response(
        200, [JSON_CT, *many], openai_chat_json("ok", usage=openai_usage(8, 2))))
    assert len(got.headers) == 1003
    assert (rec["status"], rec["input_tokens"], rec["output_tokens"], rec["parse_error"]) == (200, 8, 2, None)


# == (8) malformed AWS event stream ================================================================

def aws_frame(headers: dict[str, str], payload: bytes, raw_headers: bytes | None = None,
              bad_crc: bool = False) -> bytes:
    hb = raw_headers if raw_headers is not None else b"".join(
        bytes([len(k)]) + k.encode() + b"\x07" + struct.pack(">H", len(v)) + v.encode()
        for k, v in headers.items())
    total = 12 + len(hb) + len(payload) + 4
    prelude = struct.pack(">II", total, len(hb))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    msg = prelude + hb + payload
    crc = zlib.crc32(msg) ^ (0xDEADBEEF if bad_crc else 0)
    return msg + struct.pack(">I", crc)


def _converse_event(name: str, obj: dict, **kw) -> bytes:
    return aws_frame({":event-type": name, ":content-type": "application/json",
                      ":message-type": "event"}, json.dumps(obj).encode(), **kw)


def test_08_malformed_aws_event_stream(env):
    delta = {"contentBlockIndex": 0, "delta": {"text": "lost"}, "p": "abcd"}
    good_hdr = (b"\x0b:event-type\x07" + struct.pack(">H", 17) + b"contentBlockDelta")
    malformed = good_hdr + b"\x05:junk\x63"  # header type 0x63 does not exist
    frames = [
        aws_frame({}, json.dumps(delta).encode(), raw_headers=malformed),
        _converse_event("contentBlockDelta", delta, bad_crc=True),
        _converse_event("messageStart", {"role": "assistant", "p": "ab"}),
        _converse_event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "Hel"}, "p": "a"}),
        _converse_event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "lo"}, "p": "ab"}),
        _converse_event("contentBlockStop", {"contentBlockIndex": 0, "p": "abc"}),
        _converse_event("messageStop", {"stopReason": "end_turn", "p": "ab"}),
        _converse_event("metadata", {"usage": {"inputTokens": 11, "outputTokens": 4, "totalTokens": 15},
                                     "metrics": {"latencyMs": 120}, "p": "abcdef"}),
    ]
    resp = http_response(200, [("content-type", "application/vnd.amazon.eventstream")], b"".join(frames))
    _, rec = exchange(env, "aws-bad", resp, path="/model/x/converse-stream",
                      body=json.dumps({"messages": [{"role": "user", "content": [{"text": "hi"}]}]}).encode())
    assert rec["provider"] == "aws.bedrock" and rec["model"] == "x" and rec["stream"], rec
    assert "2 invalid AWS event stream frame(s)" in (rec["parse_error"] or ""), rec
    assert (rec["input_tokens"], rec["output_tokens"], rec["total_tokens"]) == (11, 4, 15), rec
    assert rec["chunks"] == 2 and rec["finish_reason"] == "end_turn", rec


# == (9) a non-HTTP upstream, a closed port =========================================================

def test_09_garbage_status_line(env):
    up, m = env["up"], env["m"]
    up.add("garbage", b"garbage\r\n\r\n")
    path = "/garbage/v1/chat/completions"
    env["paths"].append(path)
    got = proxy_request(m, up.url + path, chat_body("garbage"), [(CASE_HEADER, "garbage")])
    assert got.status == 502, got.raw[:300]  # mitmproxy's own answer: nothing of the upstream's
    rec = wait_record(env["log"], path)
    assert (rec["status"], rec["error_type"]) == (None, "upstream_protocol_error"), rec
    assert rec["error"]
    assert_alive(m)


def test_09b_closed_port(env):
    m = env["m"]
    dead = free_port()
    path = "/closed-port/v1/chat/completions"
    env["paths"].append(path)
    got = proxy_request(m, f"http://127.0.0.1:{dead}{path}", chat_body("closed"))
    assert got.status == 502
    rec = wait_record(env["log"], path)
    assert (rec["status"], rec["error_type"]) == (None, "upstream_unreachable"), rec
    assert_alive(m)


# == (10) websocket ===============================================================================

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def ws_frame(opcode: int, payload: bytes, mask: bool) -> bytes:
    head = bytes([0x80 | opcode])
    n = len(payload)
    mbit = 0x80 if mask else 0
    if n < 126:
        head += bytes([mbit | n])
    elif n < 1 << 16:
        head += bytes([mbit | 126]) + struct.pack(">H", n)
    else:
        head += bytes([mbit | 127]) + struct.pack(">Q", n)
    if not mask:
        return head + payload
    key = secrets.token_bytes(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def ws_read_frame(sock: socket.socket, buf: bytearray) -> tuple[int, bytes, bytes]:
    """(opcode, payload, the frame's raw bytes); ``buf`` holds bytes read ahead."""
    def need(n: int) -> None:
        while len(buf) < n:
            piece = sock.recv(65536)
            if not piece:
                raise ConnectionError("closed mid-frame")
            buf.extend(piece)
    need(2)
    opcode, masked, n = buf[0] & 0x0F, buf[1] & 0x80, buf[1] & 0x7F
    i = 2
    if n == 126:
        need(4)
        n, i = struct.unpack(">H", buf[2:4])[0], 4
    elif n == 127:
        need(10)
        n, i = struct.unpack(">Q", buf[2:10])[0], 10
    key = b""
    if masked:
        need(i + 4)
        key, i = bytes(buf[i : i + 4]), i + 4
    need(i + n)
    raw = bytes(buf[: i + n])
    payload = bytes(buf[i : i + n])
    del buf[: i + n]
    if masked:
        payload = bytes(b ^ key[j % 4] for j, b in enumerate(payload))
    return opcode, payload, raw


def _ws_server(conn: socket.socket, req: RawRequest, up: RawUpstream) -> None:
    """Handshake, one frame of its own, then echo each client frame (unmasked) until close."""
    accept = base64.b64encode(hashlib.sha1((req.header("sec-websocket-key") + WS_GUID).encode()).digest()).decode()
    head = (b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
            b"sec-websocket-accept: " + accept.encode() + b"\r\n\r\n")
    up.record_sent("ws", head)
    conn.sendall(head)
    hello = ws_frame(0x1, b"welcome from upstream", mask=False)
    up.record_sent("ws", hello)
    conn.sendall(hello)
    buf = bytearray()
    for _ in range(16):  # bounded: the test sends three frames and a close
        opcode, payload, _ = ws_read_frame(conn, buf)
        out = ws_frame(opcode, payload, mask=False)
        # mitmproxy answers a close itself (the closing handshake is per connection): the
        # upstream's close is recorded apart from the data it sent.
        up.record_sent("ws-close" if opcode == 0x8 else "ws", out)
        conn.sendall(out)
        if opcode == 0x8:
            return


def test_10_websocket_passes_untouched(env):
    up, m = env["up"], env["m"]
    up.add_conn_handler("ws", _ws_server)
    key = base64.b64encode(secrets.token_bytes(16)).decode()
    req = (f"GET {up.url}/v1/realtime?model=gpt-4o-realtime HTTP/1.1\r\nHost: 127.0.0.1:{up.port}\r\n"
           f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
           f"Sec-WebSocket-Version: 13\r\n{CASE_HEADER}: ws\r\n\r\n").encode()
    payloads = [(0x1, b'{"type":"response.create","response":{"modalities":["text"]}}'),
                (0x2, secrets.token_bytes(70_000)),
                (0x1, "Grüße ✓".encode())]
    received = b""
    echoed = []
    with socket.create_connection(("127.0.0.1", m.port), timeout=10) as s:
        s.sendall(req)
        got = _read_until(s, b"\r\n\r\n", b"")
        assert got is not None
        head, rest = got
        received += head + b"\r\n\r\n"
        buf = bytearray(rest)
        _, hello, raw = ws_read_frame(s, buf)
        received += raw
        assert hello == b"welcome from upstream"
        for opcode, payload in payloads:
            s.sendall(ws_frame(opcode, payload, mask=True))
            op, data, raw = ws_read_frame(s, buf)
            received += raw
            echoed.append((op, data))
        s.sendall(ws_frame(0x8, struct.pack(">H", 1000), mask=True))
        op, data, _ = ws_read_frame(s, buf)
        assert (op, data[:2]) == (0x8, struct.pack(">H", 1000))
    assert echoed == payloads
    assert received == up.sent["ws"]  # handshake and every data frame, byte for byte
    # No record for it: a marker request after the websocket gets one, the websocket none.
    exchange(env, "after-ws", http_response(200, [JSON_CT], openai_chat_json("m")))
    assert not [r for r in records(env["log"]) if "realtime" in r["path"]]
    assert_alive(m)


# == (11) the log's directory deleted and re-created ================================================

def test_11_log_directory_deleted_and_recreated(tmp_path):
    logdir = tmp_path / "logs"
    log = logdir / "llm.jsonl"
    ok = http_response(200, [JSON_CT], openai_chat_json("ok", usage=openai_usage(1, 1)))
    with RawUpstream() as up, Mitmdump(tmp_path, options={"aistats_log": str(log)}) as m:
        url = m.metrics_url()

        def send(i: int) -> str:
            case = f"outage-{i}"
            up.add(case, ok)
            path = f"/{case}/v1/chat/completions"
            got = proxy_request(m, up.url + path, chat_body(case), [(CASE_HEADER, case)])
            assert_same_traffic(got, up.sent[case])
            return path

        first = send(0)
        wait_record(log, first)
        shutil.rmtree(logdir)
        during = [send(1), send(2), send(3)]
        deadline = time.monotonic() + WAIT_S
        while metric(scrape(url), "aistats_output_dropped_records_total", output="log") < len(during):
            assert time.monotonic() < deadline, scrape(url)
            time.sleep(0.05)
        logdir.mkdir()
        after: list[str] = []
        deadline = time.monotonic() + WAIT_S
        while not (log.exists() and records(log)):  # the sink retries about once a second
            assert time.monotonic() < deadline, m.output()[-3000:]
            after.append(send(10 + len(after)))
            time.sleep(0.3)
        after.append(send(99))  # once writing works again, every record arrives
        wait_record(log, after[-1])
        time.sleep(1.2)  # let the log flush everything it will
        new = {r["path"] for r in records(log)}
        dropped = metric(scrape(url), "aistats_output_dropped_records_total", output="log")
        assert_alive(m)
        out = m.output()
    assert first not in new and not (set(during) & new), new
    assert after[-1] in new
    lost = [p for p in during + after if p not in new]
    assert dropped == len(lost), (dropped, lost)
    warnings = [ln for ln in out.splitlines() if "aistats" in ln and "cannot write log" in ln]
    assert len(warnings) == 1, out
    resumed = re.findall(r"aistats: logging to .* resumed; (\d+) record\(s\) dropped", out)
    assert resumed == [str(len(lost))], out


# == the shared log, at the end =====================================================================

def test_zz_one_record_per_request_in_the_shared_log(env):
    time.sleep(1.2)  # a late duplicate would have been flushed by now
    recs = records(env["log"])
    counts = {p: sum(1 for r in recs if r["path"] == p) for p in env["paths"]}
    assert all(n == 1 for n in counts.values()), counts
    assert_alive(env["m"])
