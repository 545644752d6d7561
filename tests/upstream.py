"""A programmable fake LLM upstream for end-to-end tests.

Hypercorn serves a plain ASGI app from a background thread with its own event loop, so a test
can drive blocking clients (httpx, the official SDKs, a proxy) from the main thread. HTTP/1.1,
TLS and HTTP/2 (ALPN "h2") come from hypercorn; replies are scripted per test with `Reply`.

Usage::

    with Upstream(tls=True, h2=True) as up:
        up.add("/v1/chat/completions", Reply(headers=SSE_HEADERS, chunks=openai_chat_stream(["Hi"])))
        httpx.post(up.url + "/v1/chat/completions", verify=ssl.create_default_context(cafile=up.cert_path))
        assert up.sent["/v1/chat/completions"] == b"".join(...)

The module-level builders return byte-exact provider wire formats (checked against the openai
and anthropic SDKs in tests/test_harness_selfcheck.py).
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import logging
import shutil
import socket
import tempfile
import threading
import time
import weakref
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import brotli
import zstandard
from hypercorn.asyncio.run import worker_serve
from hypercorn.config import Config, Sockets
from hypercorn.utils import wrap_app

log = logging.getLogger("tests.upstream")

SSE_HEADERS = [("content-type", "text/event-stream; charset=utf-8"), ("cache-control", "no-cache")]
JSON_HEADERS = [("content-type", "application/json")]
NDJSON_HEADERS = [("content-type", "application/x-ndjson")]
CREATED = 1_700_000_000  # fixed "created" timestamp so builder output is deterministic


@dataclass
class Reply:
    """One scripted response; reused for every request matching its key.

    Each chunk is one ASGI body message (one HTTP/1.1 chunk or h2 DATA frame on the wire, though
    receivers may coalesce them). Content-Length is added unless streaming; Content-Encoding is
    added for `encoding` unless `headers` already has one.
    """

    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)  # plaintext body pieces
    chunk_delay_s: float = 0  # sleep before each chunk after the first
    first_delay_s: float = 0  # sleep between headers and the first chunk (TTFT)
    header_delay_s: float = 0  # sleep before the headers (TTFB)
    encoding: str | None = None  # None, "gzip", "deflate" (raw), "zlib" (sent as deflate), "br", "zstd"
    abort_after: int | None = None  # cut the TCP connection after this many chunks (0: after headers)
    stream: bool | None = None  # no Content-Length (chunked on h1); None: True when >1 chunk


@dataclass
class RequestRecord:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    http_version: str


def encode_chunks(chunks: list[bytes], encoding: str | None) -> list[bytes]:
    """Compress incrementally, flushing after each chunk so every piece decodes on arrival."""
    if encoding is None:
        return list(chunks)
    flush: Callable[[], bytes]
    finish: Callable[[], bytes]
    if encoding in ("gzip", "deflate", "zlib"):
        wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": -zlib.MAX_WBITS, "zlib": zlib.MAX_WBITS}[encoding]
        z = zlib.compressobj(6, zlib.DEFLATED, wbits)
        compress, flush, finish = z.compress, lambda: z.flush(zlib.Z_SYNC_FLUSH), z.flush
    elif encoding == "br":
        b = brotli.Compressor()
        compress, flush, finish = b.process, b.flush, b.finish
    elif encoding == "zstd":
        zs = zstandard.ZstdCompressor().compressobj()
        compress, flush = zs.compress, lambda: zs.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        finish = lambda: zs.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH)  # noqa: E731
    else:
        raise ValueError(f"unknown encoding {encoding!r}")
    pieces = [compress(c) + flush() for c in chunks[:-1]]
    pieces.append((compress(chunks[-1]) if chunks else b"") + finish())
    return pieces


def _make_cert(directory: Path) -> tuple[Path, Path]:
    """Self-signed EC cert for 127.0.0.1/localhost; usable directly as a client's trust anchor."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "aistats test upstream")])
    now = datetime.datetime.now(datetime.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "upstream-cert.pem", directory / "upstream-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


class _TrackingSocket(socket.socket):
    """Listening socket that remembers accepted connections by peer address.

    ASGI gives an app no handle on its connection; `abort_after` needs one to cut the TCP
    connection mid-body (hypercorn leaves an h2 stream hanging when the app just raises).
    """

    def __init__(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM,
                 proto: int = socket.IPPROTO_TCP, fileno: int | None = None) -> None:
        super().__init__(family, type, proto, fileno)
        self.conns: weakref.WeakValueDictionary[tuple[str, int], socket.socket] = (
            weakref.WeakValueDictionary()
        )

    def accept(self) -> tuple[socket.socket, Any]:
        conn, addr = super().accept()
        # Without TCP_NODELAY, Nagle + delayed ACK hold the first small write after the headers
        # for ~40 ms, which would distort every TTFT measurement.
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conns[(addr[0], addr[1])] = conn
        return conn, addr


class Upstream:
    """Fake provider server; see the module docstring."""

    def __init__(self, tls: bool = False, h2: bool = False) -> None:
        self.tls, self.h2 = tls, h2
        self.replies: dict[str, Reply] = {}
        self.sent: dict[str, bytes] = {}
        self.requests: list[RequestRecord] = []
        self.port = 0
        self.cert_path: Path | None = None
        self._tmpdir: Path | None = None
        self._sock: _TrackingSocket | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def add(self, key: str, reply: Reply) -> None:
        """Serve `reply` for requests with header `x-aistats-case: key`, or with path == key."""
        self.replies[key] = reply

    # --- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> Upstream:
        config = Config()
        config.accesslog = None
        config.errorlog = log
        config.graceful_timeout = 0.2  # open keep-alive connections would otherwise delay stop()
        config.include_server_header = False
        config.alpn_protocols = ["h2", "http/1.1"] if self.h2 else ["http/1.1"]
        if self.tls:
            self._tmpdir = Path(tempfile.mkdtemp(prefix="aistats-upstream-"))
            self.cert_path, key_path = _make_cert(self._tmpdir)
            config.certfile, config.keyfile = str(self.cert_path), str(key_path)
        sock = _TrackingSocket()
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        self._sock, self.port = sock, sock.getsockname()[1]
        sockets = Sockets([sock], [], []) if self.tls else Sockets([], [sock], [])
        self._thread = threading.Thread(target=self._run, args=(config, sockets), daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        # asyncio calls listen() when it starts serving; SO_ACCEPTCONN shows that without a probe.
        while not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"upstream did not start: {self._error!r}")
            time.sleep(0.01)
        return self

    def _run(self, config: Config, sockets: Sockets) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop

        async def main() -> None:
            self._stop_event = asyncio.Event()
            app = wrap_app(self._app, config.wsgi_max_body_size, "asgi")
            await worker_serve(app, config, sockets=sockets, shutdown_trigger=self._stop_event.wait)

        try:
            loop.run_until_complete(main())
        except BaseException as e:  # surfaced by start()
            self._error = e
        finally:
            loop.close()

    def stop(self) -> None:
        if self._thread is not None:
            if self._loop is not None and self._stop_event is not None and not self._loop.is_closed():
                try:
                    self._loop.call_soon_threadsafe(self._stop_event.set)
                except RuntimeError:
                    pass  # loop already closed
            self._thread.join(timeout=10)
            if self._thread.is_alive():
                log.warning("upstream thread did not stop within 10 s")
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> Upstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- ASGI app --------------------------------------------------------------------------

    async def _app(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            while (msg := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        body = bytearray()
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return  # client went away
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        headers: dict[str, str] = {}
        for k, v in scope["headers"]:
            name = k.decode("latin-1").lower()
            value = v.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        path = scope["path"]
        self.requests.append(
            RequestRecord(
                scope["method"], path, scope["query_string"].decode("latin-1"), headers,
                bytes(body), scope["http_version"],
            )
        )
        key = headers.get("x-aistats-case", path)
        reply = self.replies.get(key)
        if reply is None:
            err = json.dumps({"error": {"message": f"no reply for {key!r}", "type": "not_found"}}).encode()
            await send({"type": "http.response.start", "status": 404,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(err)).encode())]})
            await send({"type": "http.response.body", "body": err})
            return
        await self._serve(key, reply, scope, send)

    async def _serve(self, key: str, reply: Reply, scope: dict, send: Callable) -> None:
        pieces = encode_chunks(reply.chunks, reply.encoding)
        headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers]
        names = {k for k, _ in headers}
        if reply.encoding and b"content-encoding" not in names:
            # HTTP's "deflate" covers both raw (RFC 1951) and zlib-wrapped (RFC 1950) bodies.
            token = "deflate" if reply.encoding == "zlib" else reply.encoding
            headers.append((b"content-encoding", token.encode()))
        stream = reply.stream if reply.stream is not None else len(pieces) > 1
        if not stream and b"content-length" not in names and b"transfer-encoding" not in names:
            headers.append((b"content-length", str(sum(map(len, pieces))).encode()))
        self.sent[key] = b""
        if reply.header_delay_s:
            await asyncio.sleep(reply.header_delay_s)
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        written = b""
        for i, piece in enumerate(pieces):
            if reply.abort_after is not None and i >= reply.abort_after:
                await self._abort(scope)
                return
            await asyncio.sleep(reply.first_delay_s if i == 0 else reply.chunk_delay_s)
            written += piece
            self.sent[key] = written  # record before the client can see it
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        if reply.abort_after is not None and reply.abort_after >= len(pieces):
            await self._abort(scope)
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _abort(self, scope: dict) -> None:
        """Cut the TCP connection under the response: the client sees an incomplete body."""
        # hypercorn's h2 writer flushes from its own task after send() returns; let it catch up so
        # the chunks recorded in `sent` really reach the wire first.
        await asyncio.sleep(0.05)
        client = scope.get("client")
        conn = self._sock.conns.get(tuple(client)) if (self._sock and client) else None
        if conn is None:
            raise RuntimeError(f"abort: no connection for {client}")  # hypercorn closes on h1
        try:
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


# --- wire-format builders -------------------------------------------------------------------


def _compact(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def openai_usage(prompt: int, completion: int, cached: int = 0, reasoning: int = 0) -> dict:
    """Chat Completions usage object as the API sends it."""
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": reasoning, "audio_tokens": 0,
            "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0,
        },
    }


def responses_usage(input_tokens: int, output_tokens: int, cached: int = 0, reasoning: int = 0) -> dict:
    """Responses API usage object."""
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": input_tokens + output_tokens,
    }


def openai_chat_stream(
    texts: list[str], model: str = "gpt-4o-mini", usage: dict | None = None, id: str = "chatcmpl-1"
) -> list[bytes]:
    """Chat Completions SSE; with `usage`, the include_usage shape (usage:null, then choices:[])."""

    def chunk(choices: list, extra: dict | None = None) -> bytes:
        obj: dict[str, Any] = {
            "id": id, "object": "chat.completion.chunk", "created": CREATED, "model": model,
            "service_tier": "default", "system_fingerprint": "fp_aistats", "choices": choices,
        }
        if usage is not None:
            obj["usage"] = None
        obj.update(extra or {})
        return f"data: {_compact(obj)}\n\n".encode()

    out = []
    for i, text in enumerate(texts):
        delta = {"role": "assistant", "content": text, "refusal": None} if i == 0 else {"content": text}
        out.append(chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]))
    out.append(chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]))
    if usage is not None:
        out.append(chunk([], {"usage": usage}))
    out.append(b"data: [DONE]\n\n")
    return out


def openai_chat_json(
    text: str, model: str = "gpt-4o-mini", usage: dict | None = None, id: str = "chatcmpl-1"
) -> bytes:
    """chat.completion object, pretty-printed with 2 spaces like the API."""
    obj = {
        "id": id, "object": "chat.completion", "created": CREATED, "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None, "annotations": []},
            "logprobs": None, "finish_reason": "stop",
        }],
        "usage": usage if usage is not None else openai_usage(10, 5),
        "service_tier": "default", "system_fingerprint": "fp_aistats",
    }
    return json.dumps(obj, indent=2, ensure_ascii=False).encode()


def _response_obj(id: str, model: str, status: str, output: list, usage: dict | None) -> dict:
    return {
        "id": id, "object": "response", "created_at": CREATED, "status": status, "background": False,
        "error": None, "incomplete_details": None, "instructions": None, "max_output_tokens": None,
        "model": model, "output": output, "parallel_tool_calls": True, "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None}, "store": True, "temperature": 1.0,
        "text": {"format": {"type": "text"}, "verbosity": "medium"}, "tool_choice": "auto", "tools": [],
        "top_p": 1.0, "truncation": "disabled", "usage": usage, "user": None, "metadata": {},
    }


def openai_responses_stream(
    texts: list[str], model: str = "gpt-4o-mini", usage: dict | None = None, id: str = "resp_1"
) -> list[bytes]:
    """Responses API SSE (`event:` + `data:` with sequence_number), ending in response.completed."""
    usage = usage if usage is not None else responses_usage(10, len(texts))
    item_id, full = "msg_1", "".join(texts)
    part_empty = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
    part_full = {**part_empty, "text": full}
    item_done = {"id": item_id, "type": "message", "status": "completed", "content": [part_full],
                 "role": "assistant"}
    loc = {"item_id": item_id, "output_index": 0, "content_index": 0}
    events: list[tuple[str, dict]] = [
        ("response.created", {"response": _response_obj(id, model, "in_progress", [], None)}),
        ("response.in_progress", {"response": _response_obj(id, model, "in_progress", [], None)}),
        ("response.output_item.added", {"output_index": 0, "item": {
            "id": item_id, "type": "message", "status": "in_progress", "content": [], "role": "assistant"}}),
        ("response.content_part.added", {**loc, "part": part_empty}),
        *[("response.output_text.delta", {**loc, "delta": t, "logprobs": []}) for t in texts],
        ("response.output_text.done", {**loc, "text": full, "logprobs": []}),
        ("response.content_part.done", {**loc, "part": part_full}),
        ("response.output_item.done", {"output_index": 0, "item": item_done}),
        ("response.completed", {"response": _response_obj(id, model, "completed", [item_done], usage)}),
    ]
    return [
        f"event: {name}\ndata: {_compact({'type': name, 'sequence_number': n, **data})}\n\n".encode()
        for n, (name, data) in enumerate(events)
    ]


def _anthropic_usage(input_tokens: int, output_tokens: int, cache_read: int, cache_creation: int) -> dict:
    return {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": cache_creation,
        "cache_read_input_tokens": cache_read,
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }


def anthropic_messages_stream(
    texts: list[str], model: str = "claude-sonnet-4-5", input_tokens: int = 10, output_tokens: int = 5,
    cache_read: int = 0, cache_creation: int = 0, id: str = "msg_1",
) -> list[bytes]:
    """Messages API SSE; the ping's `{"type": "ping"}` spacing is the API's own."""

    def ev(name: str, data: dict) -> bytes:
        return f"event: {name}\ndata: {_compact({'type': name, **data})}\n\n".encode()

    message = {
        "id": id, "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None,
        "usage": _anthropic_usage(input_tokens, 1, cache_read, cache_creation),
    }
    return [
        ev("message_start", {"message": message}),
        ev("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        b'event: ping\ndata: {"type": "ping"}\n\n',
        *[ev("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": t}}) for t in texts],
        ev("content_block_stop", {"index": 0}),
        ev("message_delta", {"delta": {"stop_reason": "end_turn", "stop_sequence": None},
                             "usage": {"output_tokens": output_tokens}}),
        ev("message_stop", {}),
    ]


def anthropic_messages_json(
    text: str, model: str = "claude-sonnet-4-5", input_tokens: int = 10, output_tokens: int = 5,
    cache_read: int = 0, cache_creation: int = 0, id: str = "msg_1",
) -> bytes:
    """Non-streaming Messages API response."""
    return _compact({
        "id": id, "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
        "usage": _anthropic_usage(input_tokens, output_tokens, cache_read, cache_creation),
    }).encode()


def gemini_sse(
    texts: list[str], model: str = "gemini-2.5-flash", prompt_tokens: int = 10,
    candidates_tokens: int = 5, thoughts_tokens: int = 0, response_id: str = "resp-gemini-1",
) -> list[bytes]:
    """streamGenerateContent?alt=sse: CRLF-framed events, cumulative usageMetadata."""
    out = []
    n = len(texts)
    for i, text in enumerate(texts, 1):
        cand_tokens = candidates_tokens * i // n
        usage: dict[str, Any] = {
            "promptTokenCount": prompt_tokens,
            "candidatesTokenCount": cand_tokens,
            "totalTokenCount": prompt_tokens + cand_tokens + thoughts_tokens,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt_tokens}],
        }
        if thoughts_tokens:
            usage["thoughtsTokenCount"] = thoughts_tokens
        candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}
        if i == n:
            candidate["finishReason"] = "STOP"
        obj = {"candidates": [candidate], "usageMetadata": usage, "modelVersion": model,
               "responseId": response_id}
        out.append(f"data: {json.dumps(obj, separators=(',', ': '), ensure_ascii=False)}\r\n\r\n".encode())
    return out


def ollama_chat_ndjson(
    texts: list[str], model: str = "llama3.2", prompt_eval_count: int = 10, eval_count: int = 5
) -> list[bytes]:
    """/api/chat stream: one JSON line per delta, then a done line with counts and ns durations."""
    ts = "2025-01-01T00:00:00.000000000Z"
    out = [
        (_compact({"model": model, "created_at": ts, "message": {"role": "assistant", "content": t},
                   "done": False}) + "\n").encode()
        for t in texts
    ]
    out.append((_compact({
        "model": model, "created_at": ts, "message": {"role": "assistant", "content": ""},
        "done_reason": "stop", "done": True, "total_duration": 1_500_000_000, "load_duration": 20_000_000,
        "prompt_eval_count": prompt_eval_count, "prompt_eval_duration": 80_000_000,
        "eval_count": eval_count, "eval_duration": 1_200_000_000,
    }) + "\n").encode())
    return out
