"""Reading one exchange: the request body's facts, and the response state that a wire format's
event and body readers fill (usage, server speeds, finish reason, response model and id,
in-stream errors, end of stream).

The format decides what each event means (``wire/formats/``); this module holds what every
format shares: JSON parsing, the short path, error events, and the fields most shapes carry.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

import orjson

from ..record import errors
from ..record.problems import INVALID_REQUEST, Problem
from .decoding import DecodeError, decode_body
from . import templates
from .format import Match, WireFormat
from .usage import ServerStats, Usage


@dataclass(slots=True)
class RequestInfo:
    """What the request body says. The parsed body itself is not kept: nothing needs it after
    these facts are read, and a request body can be megabytes."""

    model: str | None = None
    stream: bool | None = None
    chat_round: int | None = None
    problem: Problem | None = None  # why the body could not be read


def read_request(raw: bytes | None, content_encoding: str | None = None,
                 max_body: int = 16 << 20,
                 tap: Callable[[Any], None] | None = None, *,
                 content_type: str | None = None,
                 fmt: WireFormat | Match | None = None) -> RequestInfo:
    """The request body's facts; the body is read only up to ``max_body`` bytes, raw and
    decoded. ``tap`` sees the parsed JSON (the attribute rules that read the request body).

    ``content_type`` (the request's Content-Type): a ``multipart/form-data`` or
    ``application/x-www-form-urlencoded`` body (audio transcriptions, image edits) gives its
    ``model`` and ``stream`` fields, scanned in place (no copy of the other parts; an upload
    over ``max_body`` is scanned in its first ``max_body`` bytes). ``fmt`` (the request's
    format or match): only chat-like operations get a ``chat_round``; without it the body
    alone decides, as before."""
    if not raw:
        return RequestInfo()
    form = _form_kind(content_type)
    if form is not None:
        return _read_form(raw, content_encoding, max_body, form, content_type or "")
    if len(raw) > max_body:
        return RequestInfo(problem=Problem(INVALID_REQUEST,
                                           f"request body over {max_body} bytes, not read"))
    try:
        body = decode_body(raw, content_encoding, max_body)
        obj = orjson.loads(body)
    except DecodeError as e:
        return RequestInfo(problem=Problem(INVALID_REQUEST, f"request body not decoded: {e}"))
    except orjson.JSONDecodeError:
        return RequestInfo(problem=Problem(INVALID_REQUEST, "request body is not valid JSON"))
    if tap is not None:
        tap(obj)
    if not isinstance(obj, dict):
        return RequestInfo()
    model = obj.get("model") if isinstance(obj.get("model"), str) else None
    stream = obj.get("stream") if isinstance(obj.get("stream"), bool) else None
    f = fmt.fmt if isinstance(fmt, Match) else fmt
    rounds = _chat_round(obj) if f is None or f.has_rounds else None
    return RequestInfo(model=model or None, stream=stream, chat_round=rounds)


# -- form bodies (multipart/form-data, application/x-www-form-urlencoded) -----------------------

_FIELDS = (b"model", b"stream")
_MAX_FIELD = 4096  # a longer model/stream value is not one
_MAX_PART_HEADERS = 8192
_BOUNDARY = re.compile(r'(?i)boundary=(?:"([^"]{1,200})"|([^";,\s]{1,200}))')
_PART_NAME = re.compile(rb'(?i)content-disposition:[^\r\n]*?;\s*name="?([^";\r\n]*)"?')


def _form_kind(content_type: str | None) -> str | None:
    if not content_type:
        return None
    ct = content_type.lower()
    if ct.startswith("multipart/form-data"):
        return "multipart"
    if ct.startswith("application/x-www-form-urlencoded"):
        return "urlencoded"
    return None


def _read_form(raw: bytes, content_encoding: str | None, max_body: int, kind: str,
               content_type: str) -> RequestInfo:
    body, end = raw, min(len(raw), max_body)
    if content_encoding and content_encoding.strip().lower() != "identity":
        if len(raw) > max_body:
            return RequestInfo(problem=Problem(INVALID_REQUEST,
                                               f"request body over {max_body} bytes, not read"))
        try:
            body = decode_body(raw, content_encoding, max_body)
        except DecodeError as e:
            return RequestInfo(problem=Problem(INVALID_REQUEST, f"request body not decoded: {e}"))
        end = len(body)
    if kind == "multipart":
        m = _BOUNDARY.search(content_type)
        boundary = (m.group(1) or m.group(2)).encode("latin-1") if m else None
        fields = _multipart_fields(body, boundary, end) if boundary else {}
    else:
        fields = _urlencoded_fields(body, end)
    model = _text(fields.get(b"model"))
    stream_text = (_text(fields.get(b"stream")) or "").lower()
    stream = True if stream_text == "true" else False if stream_text == "false" else None
    problem = None
    if model is None and end < len(body):
        problem = Problem(INVALID_REQUEST, f"request body over {max_body} bytes, not read")
    return RequestInfo(model=model, stream=stream, problem=problem)


def _text(v: bytes | None) -> str | None:
    if v is None:
        return None
    s = v.decode("utf-8", "replace").strip()
    return s or None


def _multipart_fields(body: bytes, boundary: bytes, end: int) -> dict[bytes, bytes]:
    """The ``model`` and ``stream`` parts of a multipart body, found in place: only part headers
    (bounded) and those two values are copied, never a file part."""
    delim = b"--" + boundary
    out: dict[bytes, bytes] = {}
    pos = body.find(delim, 0, end)
    while pos != -1 and len(out) < len(_FIELDS):
        start = pos + len(delim)
        if body.startswith(b"--", start):  # the close delimiter
            break
        limit = min(end, start + _MAX_PART_HEADERS)
        head_end, sep = body.find(b"\r\n\r\n", start, limit), 4
        if head_end == -1:
            head_end, sep = body.find(b"\n\n", start, limit), 2
            if head_end == -1:
                break
        m = _PART_NAME.search(body[start:head_end])
        value_start = head_end + sep
        nxt = body.find(delim, value_start, end)
        if nxt == -1:
            break
        name = m.group(1) if m else None
        if name in _FIELDS and name not in out:
            value_end = nxt
            if body.startswith(b"\r\n", value_end - 2):
                value_end -= 2
            elif body.startswith(b"\n", value_end - 1):
                value_end -= 1
            if 0 <= value_end - value_start <= _MAX_FIELD:
                out[name] = body[value_start:value_end]
        pos = nxt
    return out


def _urlencoded_fields(body: bytes, end: int) -> dict[bytes, bytes]:
    """The ``model`` and ``stream`` fields of an urlencoded body, found in place."""
    out: dict[bytes, bytes] = {}
    pos = 0
    while pos < end and len(out) < len(_FIELDS):
        amp = body.find(b"&", pos, end)
        stop = end if amp == -1 else amp
        for name in _FIELDS:
            if name not in out and body.startswith(name + b"=", pos, stop):
                start = pos + len(name) + 1
                if stop - start <= _MAX_FIELD:
                    out[name] = unquote_plus(body[start:stop].decode("latin-1"),
                                             encoding="utf-8").encode("utf-8")
        if amp == -1:
            break
        pos = amp + 1
    return out


def _chat_round(obj: dict) -> int | None:
    """Number of user messages: OpenAI/Anthropic/Ollama ``messages``, Gemini ``contents``,
    Responses ``input``."""
    msgs = obj.get("messages")
    if isinstance(msgs, list):
        return sum(1 for m in msgs if isinstance(m, dict) and m.get("role") == "user")
    contents = obj.get("contents")
    if isinstance(contents, list):
        return sum(1 for c in contents if isinstance(c, dict) and c.get("role", "user") == "user")
    inp = obj.get("input")
    if isinstance(inp, str):
        return 1
    if isinstance(inp, list):
        return sum(1 for m in inp if isinstance(m, dict) and m.get("role") == "user")
    prompt = obj.get("prompt")
    if isinstance(prompt, str):
        return 1
    return None


class ResponseState:
    """What the response said so far, filled event by event (streams) or at once (bodies)."""

    __slots__ = ("fmt", "usage", "stats", "finish_reason", "response_model", "chat_id", "error",
                 "error_type", "hints", "events", "invalid_events", "complete", "primed",
                 "fast", "_short", "tap", "counted_tokens", "counted_invalid", "response_status",
                 "_template", "_learned")

    def __init__(self, fmt: WireFormat) -> None:
        self.fmt = fmt
        self.usage: Usage | None = None
        self.stats = ServerStats()
        self.finish_reason: str | None = None
        self.response_model: str | None = None
        self.chat_id: str | None = None
        self.error: str | None = None
        self.error_type: str | None = None
        self.hints: set[str] = set()
        self.counted_tokens: int | None = None  # a token-counting endpoint's answer
        self.counted_invalid = False  # ... reported, but not a valid token count
        self.response_status: str | None = None  # a Responses object's ``status``
        self.events = 0
        self.invalid_events = 0
        self.complete = False  # saw the format's end-of-stream event
        self.primed = False  # one event went through the full reading (ids, model)
        self.fast = True  # let plain delta events take the format's short path
        self._short = fmt.short
        self._template: templates.ChunkTemplate | None = None  # the plain chunk's bytes
        self._learned = 0
        # Sees every parsed event (the attribute rules that read the stream); None: no cost.
        self.tap: Callable[[str | None, dict], None] | None = None

    # -- streams ---------------------------------------------------------------------------
    def on_event(self, name: str | None, data: bytes) -> bool:
        """Read one framed event; True when it carries generated content."""
        if not data:
            return False
        if data == b"[DONE]":
            self.complete = True
            return False
        self.events += 1
        fmt = self.fmt
        try:
            if fmt.unwrap is not None:
                unwrapped = fmt.unwrap(name, data)
                if unwrapped is None:
                    return False
                name, data = unwrapped
            obj = orjson.loads(data)
        except ValueError:  # orjson.JSONDecodeError, binascii.Error
            self.invalid_events += 1
            return False
        if obj.__class__ is not dict:
            return False
        if self.tap is not None:
            self.tap(name, obj)
        if self.primed and self.fast:
            short = self._short
            if short is not None:
                verdict = short(obj)
                if verdict is not None:
                    return verdict
        return self._read_object(name, obj)

    def on_data(self, datas: list[bytes]) -> list[bool]:
        """``on_event`` for a batch of unnamed events: their content verdicts. The same
        reading with the per-event work cut to parsing, the tap and the short path (formats
        without transport wrapping); any event the short path does not decide, or that does
        not parse, takes ``on_event`` as it is."""
        short = self._short
        if short is None or not self.fast or self.fmt.unwrap is not None:
            on_event = self.on_event
            return [on_event(None, d) for d in datas]
        out: list[bool] = []
        add = out.append
        loads = orjson.loads
        tap = self.tap
        # Chunk templates (wire/templates.py) when nothing needs the parsed events (a tap does).
        key = self.fmt.template_key if tap is None else None
        template = self._template
        plain = 0
        for data in datas:
            if template is not None:
                verdict = template.verdict(data)
                if verdict is not None:
                    plain += 1
                    add(verdict)
                    continue
            if self.primed:
                try:
                    obj = loads(data)
                except ValueError:  # [DONE], empty or invalid: as on_event reads them
                    add(self.on_event(None, data))
                    continue
                if obj.__class__ is dict:
                    if tap is not None:
                        tap(None, obj)
                    verdict = short(obj)
                    if verdict is None:
                        self.events += 1
                        verdict = self._read_object(None, obj)
                    else:
                        plain += 1
                        if key is not None and self._learned < templates.MAX_LEARNED:
                            word = key(obj)
                            if word is not None:
                                self._learned += 1
                                template = self._template = templates.learn(data, obj, word)
                    add(verdict)
                    continue
            add(self.on_event(None, data))
        self.events += plain
        return out

    def content_run(self, text: bytes) -> int:
        """``on_data`` of a whole batch of one-line SSE events when the stream's chunk
        template says they are all content events (``ChunkTemplate.content_run``): their
        number, counted as read; 0, with nothing read, otherwise."""
        template = self._template
        if template is None or self.tap is not None or not self.fast:
            return 0
        n = template.content_run(text)
        self.events += n
        return n

    def _read_object(self, name: str | None, obj: dict) -> bool:
        """The full reading of one parsed event."""
        fmt = self.fmt
        self.primed = True
        if fmt.error_event(name, obj):
            self.stream_error(obj, "stream_error")
            if "choices" in obj:  # OpenRouter: the error chunk also ends its choice
                fmt.event(self, name, obj)
            return False
        return fmt.event(self, name, obj)

    def stream_error(self, obj: dict, default_type: str) -> None:
        msg = errors.message_from(obj)
        if msg is None and isinstance(obj.get("error"), dict):
            msg = errors.message_from(obj["error"])
        self.error = msg or self.error or "error event in stream"
        self.error_type = errors.type_from(obj) or default_type

    # -- whole bodies ----------------------------------------------------------------------
    def on_body(self, obj: object) -> None:
        self.fmt.body(self, obj)

    # -- shared ----------------------------------------------------------------------------
    def add_usage(self, u: Usage | None) -> None:
        if u is not None:
            if self.usage is None:
                self.usage = u
            else:
                self.usage.merge(u)

    def common(self, obj: dict) -> None:
        """The fields most shapes carry: usage, server speeds, model, id, finish reason."""
        self.add_usage(self.fmt.read_usage(obj))
        if "timings" in obj or "metrics" in obj or "eval_duration" in obj:
            self.hints |= self.stats.take(obj)
        markers(obj, self.hints)
        if self.response_model is None:
            self.response_model = _top_or_inner(obj, "model", "modelVersion")
        if self.chat_id is None:
            self.chat_id = _top_or_inner(obj, "id", "responseId")
            if self.chat_id is None:
                g = obj.get("x_groq")
                if isinstance(g, dict) and isinstance(g.get("id"), str) and g["id"]:
                    self.chat_id = g["id"]
        fr = finish_reason(obj)
        if fr:
            self.finish_reason = fr


_LLAMACPP_KEYS = ("generation_settings", "stop_type", "tokens_predicted", "id_slot",
                  "stopped_eos")
_VLLM_KEYS = ("kv_transfer_params", "prompt_logprobs")
_LLAMACPP_BUILD = re.compile(r"b\d+-[0-9a-f]{6,}")


def markers(obj: dict, hints: set[str]) -> None:
    """Provider markers a response body carries, as provider names (record ``provider`` hints):
    llama.cpp's native fields and build fingerprint, vLLM's own response fields and choice
    ``stop_reason``, Ollama's fingerprint and native counts, Groq's ``x_groq``, OpenRouter's
    ``gen-`` ids with the upstream ``provider``, DeepSeek's cache-hit count."""
    if "x_groq" in obj:
        hints.add("groq")
    fp = obj.get("system_fingerprint")
    if fp.__class__ is str:
        if fp == "fp_ollama":
            hints.add("ollama")
        elif _LLAMACPP_BUILD.fullmatch(fp):
            hints.add("llama.cpp")
    for k in _LLAMACPP_KEYS:
        if k in obj:
            hints.add("llama.cpp")
            break
    for k in _VLLM_KEYS:
        if k in obj:
            hints.add("vllm")
            break
    choices = obj.get("choices")
    if choices.__class__ is list:
        for c in choices:
            if c.__class__ is dict and "stop_reason" in c:
                hints.add("vllm")
                break
    if "done_reason" in obj or ("eval_count" in obj and "created_at" in obj):
        hints.add("ollama")
    if obj.get("provider").__class__ is str:
        i = obj.get("id")
        if i.__class__ is str and i.startswith("gen-"):
            hints.add("openrouter")
    u = obj.get("usage")
    if u.__class__ is dict and "prompt_cache_hit_tokens" in u:
        hints.add("deepseek")


def _top_or_inner(obj: dict, key: str, gemini_key: str) -> str | None:
    """A non-empty string at ``key`` (or Gemini's name for it), else inside the Anthropic
    ``message`` or Responses ``response`` object."""
    v = obj.get(key) or obj.get(gemini_key)
    if not isinstance(v, str):
        inner = obj.get("message") or obj.get("response")
        v = inner.get(key) if isinstance(inner, dict) else None
    return v if isinstance(v, str) and v else None


def finish_reason(obj: dict) -> str | None:
    """The finish/stop reason as the provider names it: OpenAI ``choices[].finish_reason``,
    Gemini ``candidates[].finishReason``, Anthropic/Ollama/Bedrock top-level names."""
    choices = obj.get("choices")
    if isinstance(choices, list):
        for c in choices:
            if isinstance(c, dict) and isinstance(c.get("finish_reason"), str):
                return c["finish_reason"]
    cands = obj.get("candidates")
    if isinstance(cands, list):
        for c in cands:
            if isinstance(c, dict) and isinstance(c.get("finishReason"), str):
                return c["finishReason"]
    for key in ("stop_reason", "done_reason", "stopReason"):
        v = obj.get(key)
        if isinstance(v, str) and v:
            return v
    return _llamacpp_stop(obj) if "stop_type" in obj or "stopped_eos" in obj else None


def _llamacpp_stop(obj: dict) -> str | None:
    """llama.cpp's native ``/completion``: ``stop_type`` (``eos``, ``word``, ``limit``; ``none``
    while not stopped), or the ``stopped_*`` booleans of older servers."""
    v = obj.get("stop_type")
    if isinstance(v, str) and v and v != "none":
        return v
    for key, reason in (("stopped_eos", "eos"), ("stopped_word", "word"),
                        ("stopped_limit", "limit")):
        if obj.get(key) is True:
            return reason
    return None
