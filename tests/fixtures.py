"""Small provider streams used by the unit tests (byte-exact wire shapes)."""

from __future__ import annotations

import json
import zlib

import brotli
import zstandard


def sse(*events: dict | str, name_key: str | None = None, sep: str = "\n\n") -> bytes:
    out = []
    for e in events:
        data = e if isinstance(e, str) else json.dumps(e)
        head = f"event: {e['type']}\n" if name_key and isinstance(e, dict) else ""
        out.append(f"{head}data: {data}{sep}")
    return "".join(out).encode()


OPENAI_CHAT = sse(
    {"id": "chatcmpl-1", "model": "gpt-4o-mini", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
    {"id": "chatcmpl-1", "model": "gpt-4o-mini", "choices": [{"index": 0, "delta": {"content": "Hel"}}]},
    {"id": "chatcmpl-1", "model": "gpt-4o-mini", "choices": [{"index": 0, "delta": {"content": "lo"}}]},
    {"id": "chatcmpl-1", "model": "gpt-4o-mini", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    {"id": "chatcmpl-1", "model": "gpt-4o-mini", "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15, "prompt_tokens_details": {"cached_tokens": 4}, "completion_tokens_details": {"reasoning_tokens": 1}}},
    "[DONE]",
)

ANTHROPIC = sse(
    {"type": "message_start", "message": {"id": "msg_1", "model": "claude-sonnet-4-5", "usage": {"input_tokens": 10, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 2, "output_tokens": 1}}},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "ping"},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " there"}},
    {"type": "content_block_stop", "index": 0},
    {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 7}},
    {"type": "message_stop"},
    name_key="type", sep="\r\n\r\n",
)

RESPONSES = sse(
    {"type": "response.created", "response": {"id": "resp_1", "model": "gpt-5", "status": "in_progress", "usage": None}},
    {"type": "response.output_text.delta", "delta": "Hi"},
    {"type": "response.output_text.delta", "delta": "!"},
    {"type": "response.completed", "response": {"id": "resp_1", "model": "gpt-5", "status": "completed", "usage": {"input_tokens": 20, "input_tokens_details": {"cached_tokens": 8}, "output_tokens": 30, "output_tokens_details": {"reasoning_tokens": 25}, "total_tokens": 50}}},
    name_key="type",
)

GEMINI = sse(
    {"candidates": [{"content": {"parts": [{"text": "A"}], "role": "model"}}], "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 1}, "modelVersion": "gemini-2.5-flash", "responseId": "r1"},
    {"candidates": [{"content": {"parts": [{"text": "B"}], "role": "model"}, "finishReason": "STOP"}], "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 2, "thoughtsTokenCount": 4, "cachedContentTokenCount": 3}, "modelVersion": "gemini-2.5-flash", "responseId": "r1"},
    sep="\r\n\r\n",
)

OLLAMA = (
    json.dumps({"model": "llama3.2", "message": {"role": "assistant", "content": "Hi"}, "done": False}) + "\n"
    + json.dumps({"model": "llama3.2", "message": {"role": "assistant", "content": "!"}, "done": False}) + "\n"
    + json.dumps({"model": "llama3.2", "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop", "total_duration": 2_000_000_000, "prompt_eval_count": 26, "prompt_eval_duration": 130_000_000, "eval_count": 2, "eval_duration": 100_000_000}) + "\n"
).encode()


def gzip_per_event(body: bytes, sep: bytes = b"\n\n") -> bytes:
    """gzip with a sync flush after every event, as a streaming server sends it."""
    c = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    out = b""
    for part in body.split(sep):
        if part:
            out += c.compress(part + sep) + c.flush(zlib.Z_SYNC_FLUSH)
    return out + c.flush()


def br(body: bytes) -> bytes:
    return brotli.compress(body)


def zstd(body: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(body)


def aws_frame(event_type: str, payload: bytes, header_name: str = ":event-type") -> bytes:
    """One AWS event-stream message (Bedrock): prelude with CRC, one string header, payload,
    message CRC."""
    import struct
    name = header_name.encode()
    value = event_type.encode()
    headers = bytes([len(name)]) + name + b"\x07" + struct.pack(">H", len(value)) + value
    total = 12 + len(headers) + len(payload) + 4
    prelude = struct.pack(">II", total, len(headers))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    msg = prelude + headers + payload
    return msg + struct.pack(">I", zlib.crc32(msg))


def bedrock_invoke_stream(events: list[dict], metrics: dict | None = None) -> bytes:
    """InvokeModelWithResponseStream: each model event base64-wrapped in a ``chunk`` frame; the
    last one carries ``amazon-bedrock-invocationMetrics``."""
    import base64
    out = []
    for i, ev in enumerate(events):
        if metrics is not None and i == len(events) - 1:
            ev = {**ev, "amazon-bedrock-invocationMetrics": metrics}
        inner = base64.b64encode(json.dumps(ev).encode()).decode()
        out.append(aws_frame("chunk", json.dumps({"bytes": inner}).encode()))
    return b"".join(out)


BEDROCK_INVOKE_CLAUDE = bedrock_invoke_stream([
    {"type": "message_start", "message": {"id": "msg_b1", "model": "claude-3-5-sonnet", "usage": {"input_tokens": 9, "output_tokens": 1}}},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "!"}},
    {"type": "content_block_stop", "index": 0},
    {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 4}},
    {"type": "message_stop"},
], metrics={"inputTokenCount": 9, "outputTokenCount": 4, "invocationLatency": 300, "firstByteLatency": 100})

BEDROCK_INVOKE_LLAMA = bedrock_invoke_stream([
    {"generation": "Hel", "prompt_token_count": 7, "generation_token_count": 1, "stop_reason": None},
    {"generation": "lo", "prompt_token_count": None, "generation_token_count": 2, "stop_reason": "stop"},
], metrics={"inputTokenCount": 7, "outputTokenCount": 2, "invocationLatency": 200, "firstByteLatency": 50})
