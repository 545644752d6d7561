"""The "LLM" contentview for mitmproxy 12: LLM request and response bodies as a readable
conversation (system prompt, tools, messages; the assembled answer, reasoning, tool calls,
finish reason and usage of a response, streamed or not).

    mitmweb -s addon/aistats_contentview.py          # alone
    (or imported by addon/aistats.py, which registers it too)

The view is chosen automatically (``render_priority`` 2, above JSON's 1) only for bodies of
requests ``match_api`` recognises as conversational LLM calls, with a 2xx (or no) response;
everything else gets 0, so it never takes over other traffic (it can still be picked by hand).
Nothing here raises into mitmproxy: a failure gives priority 0 or a short text saying what
could not be read. The reading itself is ``aistats_engine.conversation`` (no mitmproxy there).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import orjson
from mitmproxy import contentviews, http
from mitmproxy.contentviews import Contentview, Metadata

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # mitmproxy adds it for -s scripts; tests import this file directly
    sys.path.insert(0, _HERE)

from aistats_engine.conversation import conversation, render_text  # noqa: E402
from aistats_engine.wire import framing  # noqa: E402
from aistats_engine.wire.decoding import decode_body  # noqa: E402
from aistats_engine.wire.format import Match  # noqa: E402
from aistats_engine.wire.formats import match_api  # noqa: E402

PRIORITY = 2.0
MAX_DECODED = 64 << 20  # a body this view decodes itself (mitmproxy could not) is read up to this
MAX_CHARS = 200_000  # of rendered text
# The APIs whose bodies are conversations (embeddings, rerank, token counts are not).
CONVERSATIONAL = frozenset({"chat_completions", "completions", "infill", "responses", "messages",
                            "generate_content", "converse", "invoke", "ollama_chat",
                            "ollama_generate"})


def _match(flow: Any) -> Match | None:
    if not isinstance(flow, http.HTTPFlow):
        return None
    return match_api(flow.request.method, flow.request.path)


def _looks_json(data: bytes) -> bool:
    return data[:64].lstrip()[:1] in (b"{", b"[")


def _looks_stream(data: bytes) -> bool:
    return data[:64].lstrip().startswith((b"data:", b"event:"))


def _decoded(data: bytes, message: http.Message | None) -> bytes:
    """``data`` as mitmproxy passed it: decoded, unless decoding failed there (then it is the
    raw body, which we try once more with our decoders: zstd, concatenated gzip, …)."""
    if message is None:
        return data
    ce = message.headers.get("content-encoding")
    if not ce or data != message.raw_content:
        return data
    try:
        return decode_body(data, ce, MAX_DECODED)
    except Exception:
        return data


def _request_body(req: http.Request) -> bytes | None:
    """The request body, decoded (the conversation parses it and notes what it cannot read);
    None when there is none."""
    try:
        if not req.raw_content:
            return None
        return _decoded(req.get_content(strict=False) or b"", req)
    except Exception:
        return None


def _content_type(metadata: Metadata, message: http.Message | None) -> str | None:
    if metadata.content_type:
        return metadata.content_type
    if message is not None:
        return message.headers.get("content-type")
    return None


class LLMContentview(Contentview):
    name = "LLM"
    syntax_highlight = "none"

    def render_priority(self, data: bytes, metadata: Metadata) -> float:
        try:
            if not data:
                return 0
            msg = metadata.http_message
            flow = metadata.flow
            m = _match(flow)
            if msg is None or m is None or m.api not in CONVERSATIONAL:
                return 0
            if msg is flow.request:
                return PRIORITY if _looks_json(data) else 0
            if msg is flow.response:
                if flow.response.status_code >= 400:
                    return 0  # an error body reads best as itself (JSON)
                if (framing.framer_for(_content_type(metadata, msg)) is not None
                        or _looks_json(data) or _looks_stream(data)):
                    return PRIORITY
            return 0
        except Exception:
            return 0

    def prettify(self, data: bytes, metadata: Metadata) -> str:
        try:
            return self._prettify(data, metadata)
        except Exception as e:
            return f"LLM view: this body could not be read ({type(e).__name__}: {e})"

    def _prettify(self, data: bytes, metadata: Metadata) -> str:
        msg = metadata.http_message
        flow = metadata.flow
        m = _match(flow)
        api = m.api if m is not None else None
        path_model = m.model_from_path if m is not None else None
        body = _decoded(data, msg)
        if isinstance(flow, http.HTTPFlow) and msg is not None and msg is flow.response:
            conv = conversation(api, _request_body(flow.request), body,
                                _content_type(metadata, msg), model=path_model)
            return render_text(conv, MAX_CHARS, response_first=True)
        if isinstance(flow, http.HTTPFlow) and msg is not None and msg is flow.request:
            return render_text(conversation(api, body, None, None, model=path_model), MAX_CHARS)
        # No flow (another caller): a body with a prompt is a request, else a response.
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            obj = None
        if isinstance(obj, dict) and any(k in obj for k in ("messages", "contents", "input",
                                                             "prompt")):
            return render_text(conversation(None, obj, None, None), MAX_CHARS)
        return render_text(conversation(None, None, body, _content_type(metadata, msg)),
                           MAX_CHARS)


llm = LLMContentview()
contentviews.add(llm)
