"""Higress's built-in attributes (``question``, ``answer``, ``tool_calls``, token details, …),
read from every wire shape we know, not only OpenAI's as Higress does.

One :class:`BuiltinExtractor` per flow: ``request`` gets the parsed request body, ``event`` each
parsed stream event in order, ``body`` a whole response body; ``value`` answers per source.
Only the configured keys are extracted, because ``event`` runs for every stream event on the
proxy's hot path; with no key that needs events, ``needs_events`` is False and ``event`` returns
at once.

Decisions (Higress, ai-statistics ``getBuiltinAttributeFallback`` and wasm-go ``tokenusage``):

- ``question`` is the last message's ``content`` as its JSON value (Higress
  ``messages.@reverse.0.content``); Responses: ``input`` when a string, else the last input
  item's ``content`` (``output`` for a function_call_output item); Gemini: the last ``contents``
  entry's part texts joined; legacy completions / Ollama generate: ``prompt``.
- ``system``: top-level ``system`` as is (Anthropic, Converse, Ollama generate); Responses
  ``instructions``; Gemini ``systemInstruction`` part texts joined; else the first message (or
  Responses input item) with role system or developer → its ``content``.
- Texts are joined without separators, in a stream and in a whole body alike (a whole body's
  several text blocks give what their streamed deltas would). OpenAI reads the choice with
  ``index`` 0 (Higress reads ``choices.0``, which with ``n`` > 1 mixes choices).
- ``tool_calls`` items are ``{"index", "id", "type", "function": {"name", "arguments"}}`` with
  every key present (Higress's Go struct omits empty ones, index 0 included; the acceptance cases
  expect them). ``index``: OpenAI's, Anthropic's / Converse's content-block index, Responses'
  ``output_index``, Gemini's and Ollama's order of appearance; sorted by it. ``type``: the
  piece's (OpenAI, default ``function``), ``tool_use`` for Anthropic and Converse (as Higress),
  ``function`` otherwise. A tool_use block's ``arguments`` are its ``input_json_delta`` pieces
  joined when there are any, else the compact JSON of the block's initial ``input`` (Higress
  starts from that JSON and appends the deltas, which gives ``{}{"city"…`` for the usual empty
  ``input``); they are kept when the stream ends before ``content_block_stop``. A whole OpenAI
  body's ``message.tool_calls`` is returned as is (Higress).
- Token details, the last reported wins: OpenAI ``usage.prompt_tokens_details`` /
  ``completion_tokens_details`` and Responses ``input_tokens_details`` / ``output_tokens_details``
  as is (DeepSeek's top-level ``prompt_cache_hit_tokens`` is added to the input details, as
  wasm-go does); Anthropic ``{"cache_read_input_tokens", "cache_creation_input_tokens"}`` from
  usage; Converse the same keys from ``cacheReadInputTokens`` / ``cacheWriteInputTokens``;
  Gemini wasm-go's keys ``cached_content_token_count``, ``tool_use_prompt_token_count`` (input)
  and ``thoughts_token_count`` (output) — its ``promptTokensDetails`` are per-modality lists,
  which wasm-go skips too. ``reasoning_tokens`` / ``cached_tokens`` are Higress's look-ups
  (``output_token_details.reasoning_tokens``, ``input_token_details.cached_tokens``), None
  otherwise: the caller fills them from the record's counts.
- Per source: ``request_body`` answers question/system; ``response_streaming_body`` only what
  stream events gave, ``response_body`` only what a whole body gave (Higress never reads a
  streamed reply as ``response_body``). Empty strings and lists are None (Higress: nil or "").
- Memory: appended text (answer, reasoning, tool arguments) is bounded by ``max_bytes`` UTF-8
  bytes in all; the piece that crosses it is cut, later ones dropped, ``truncated`` set.
- A malformed object is skipped, never raised on.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

BUILTINS = frozenset({"question", "system", "answer", "reasoning", "tool_calls",
                      "reasoning_tokens", "cached_tokens", "input_token_details",
                      "output_token_details"})
CONTENT_BUILTINS = frozenset({"question", "system", "answer", "reasoning", "tool_calls"})

REQUEST_BODY = "request_body"
STREAMING_BODY = "response_streaming_body"
RESPONSE_BODY = "response_body"

_REQUEST_KEYS = frozenset({"question", "system"})
_USAGE_KEYS = frozenset({"reasoning_tokens", "cached_tokens", "input_token_details",
                         "output_token_details"})

# Our wire-format names → the response shape read; others are detected from the objects
# (Bedrock InvokeModel carries Anthropic events for Claude, other families' own shapes).
_SHAPES = {"chat_completions": "openai", "completions": "openai", "responses": "responses",
           "messages": "anthropic", "generate_content": "gemini", "converse": "converse",
           "ollama_chat": "ollama"}
_ANTHROPIC_TYPES = frozenset({"message_start", "message_delta", "message_stop", "message",
                              "content_block_start", "content_block_delta", "content_block_stop"})
# wasm-go tokenusage's names for Gemini's input detail counts.
_GEMINI_INPUT = (("cachedContentTokenCount", "cached_content_token_count"),
                 ("toolUsePromptTokenCount", "tool_use_prompt_token_count"))
_CONVERSE_EVENTS = ("contentBlockDelta", "contentBlockStart", "contentBlockStop", "metadata",
                    "messageStart", "messageStop")


def default_sources(key: str) -> tuple[str, ...]:
    """Higress ``getBuiltinAttributeDefaultSources``: where a built-in is read without
    ``value_source``; () for a key that is not a built-in."""
    if key in _REQUEST_KEYS:
        return (REQUEST_BODY,)
    if key in BUILTINS:
        return (STREAMING_BODY, RESPONSE_BODY)
    return ()


class _Call:
    """One tool call being assembled."""

    __slots__ = ("index", "id", "type", "name", "args", "initial", "open")

    def __init__(self, index: int, id_: Any, type_: str, name: Any) -> None:
        self.index = index
        self.id = id_ if id_.__class__ is str else ""
        self.type = type_
        self.name = name if name.__class__ is str else ""
        self.args: list[str] = []
        self.initial: str | None = None  # arguments when no piece arrives (a block's input)
        self.open = True  # Anthropic: deltas count until content_block_stop

    def as_dict(self) -> dict[str, Any]:
        args = "".join(self.args) if self.args else (self.initial or "")
        return {"index": self.index, "id": self.id, "type": self.type or "function",
                "function": {"name": self.name, "arguments": args}}


def _compact(v: Any) -> str:
    return json.dumps(v, separators=(",", ":"), ensure_ascii=False)


def _int(v: Any) -> int | None:
    return v if v.__class__ is int else None


def _first_choice(items: Any) -> dict | None:
    """The choice (candidate) with index 0 or none."""
    if items.__class__ is not list:
        return None
    for c in items:
        if c.__class__ is dict and c.get("index", 0) in (0, None):
            return c
    return None


def _text_of(content: Any) -> str | None:
    """A message content as text: a string, or a parts list's text parts joined."""
    if content.__class__ is str:
        return content
    if content.__class__ is list:
        texts = [p["text"] for p in content if p.__class__ is dict
                 and p.get("type", "text") in ("text", "output_text")
                 and p.get("text").__class__ is str]
        return "".join(texts) if texts else None
    return None


def _parts_text(content: Any) -> str | None:
    """Gemini Content (or a bare string): its non-thought part texts joined."""
    if content.__class__ is str:
        return content
    parts = content.get("parts") if content.__class__ is dict else None
    if parts.__class__ is not list:
        return None
    texts = [p["text"] for p in parts if p.__class__ is dict and p.get("text").__class__ is str
             and p.get("thought") is not True]
    return "".join(texts) if texts else None


def _nonempty(v: Any) -> Any:
    return None if v is None or v == "" or v == [] else v


def _question(body: dict) -> Any:
    msgs = body.get("messages")
    if msgs.__class__ is list:
        last = msgs[-1] if msgs else None
        return last.get("content") if last.__class__ is dict else None
    inp = body.get("input")
    if inp.__class__ is str:
        return inp
    if inp.__class__ is list and inp:
        last = inp[-1]
        if last.__class__ is dict:
            return last["content"] if "content" in last else last.get("output")
        return None
    contents = body.get("contents")
    if contents.__class__ is list and contents:
        return _parts_text(contents[-1])
    return body.get("prompt")


def _system(body: dict) -> Any:
    if "system" in body:
        return body["system"]
    if "instructions" in body:
        return body["instructions"]
    si = body.get("systemInstruction", body.get("system_instruction"))
    if si is not None:
        return _parts_text(si)
    for items in (body.get("messages"), body.get("input")):
        if items.__class__ is list:
            for m in items:
                if m.__class__ is dict and m.get("role") in ("system", "developer"):
                    return m.get("content")
    return None


def _detect(name: str | None, obj: dict) -> str | None:
    """The response shape of an object when the wire format did not say."""
    if "choices" in obj:
        return "openai"
    t = obj.get("type")
    if t.__class__ is str:
        if t.startswith("response."):
            return "responses"
        if t in _ANTHROPIC_TYPES:
            return "anthropic"
    if "candidates" in obj or "usageMetadata" in obj:
        return "gemini"
    out = obj.get("output")
    if out.__class__ is list or obj.get("object") == "response":
        return "responses"
    if out.__class__ is dict or name in _CONVERSE_EVENTS or "contentBlockIndex" in obj:
        return "converse"
    if any(k in obj for k in _CONVERSE_EVENTS):
        return "converse"
    if "done" in obj and ("message" in obj or "response" in obj):
        return "ollama"
    return None


class BuiltinExtractor:
    """The built-in attributes of one flow (see the module docstring for what each means)."""

    __slots__ = ("keys", "needs_events", "truncated", "_left", "_w_answer", "_w_reasoning",
                 "_w_tools", "_w_usage", "_shape", "_on_event", "_on_body", "_mode",
                 "_question", "_system", "_answer", "_reasoning", "_calls", "_raw_calls",
                 "_items", "_in", "_out")

    def __init__(self, api: str | None, keys: frozenset[str], max_bytes: int = 1 << 20) -> None:
        self.keys = keys
        self._w_answer = "answer" in keys
        self._w_reasoning = "reasoning" in keys
        self._w_tools = "tool_calls" in keys
        self._w_usage = not _USAGE_KEYS.isdisjoint(keys)
        self.needs_events = self._w_answer or self._w_reasoning or self._w_tools or self._w_usage
        self.truncated = False
        self._left = max_bytes
        self._mode: str | None = None
        self._question: Any = None
        self._system: Any = None
        self._answer: list[str] = []
        self._reasoning: list[str] = []
        self._calls: dict[int, _Call] = {}
        self._raw_calls: Any = None
        self._items: dict[str, int] = {}  # Responses item id → output_index
        self._in: dict | None = None
        self._out: dict | None = None
        self._on_event: Callable[[str | None, dict], None] | None = None
        self._on_body: Callable[[dict], None] | None = None
        self._shape: str | None = None
        shape = _SHAPES.get(api or "")
        if shape is not None:
            self._set_shape(shape)

    def _set_shape(self, shape: str) -> None:
        self._shape = shape
        self._on_event = getattr(self, f"_{shape}_event")
        self._on_body = getattr(self, f"_{shape}_body")

    # -- feeding --------------------------------------------------------------------------------

    def request(self, body: Any) -> None:
        if body.__class__ is not dict:
            return
        try:
            if "question" in self.keys:
                self._question = _nonempty(_question(body))
            if "system" in self.keys:
                self._system = _nonempty(_system(body))
        except Exception:
            pass

    def event(self, name: str | None, obj: dict) -> None:
        if not self.needs_events or obj.__class__ is not dict:
            return
        self._mode = STREAMING_BODY
        handler = self._on_event
        if handler is None:
            shape = _detect(name, obj)
            if shape is None:
                return
            self._set_shape(shape)
            handler = self._on_event
        try:
            handler(name, obj)  # type: ignore[misc]
        except Exception:
            pass

    def body(self, obj: Any) -> None:
        if not self.needs_events:
            return
        self._mode = RESPONSE_BODY
        for item in (obj if obj.__class__ is list else (obj,)):
            if item.__class__ is not dict:
                continue
            if self._on_body is None:
                shape = _detect(None, item)
                if shape is None:
                    continue
                self._set_shape(shape)
            try:
                self._on_body(item)  # type: ignore[misc]
            except Exception:
                pass

    # -- reading --------------------------------------------------------------------------------

    def value(self, key: str, source: str) -> Any:
        if key not in self.keys:
            return None
        if source == REQUEST_BODY:
            return self._question if key == "question" else (
                self._system if key == "system" else None)
        if source != self._mode or source not in (STREAMING_BODY, RESPONSE_BODY):
            return None
        if key == "answer":
            return "".join(self._answer) or None
        if key == "reasoning":
            return "".join(self._reasoning) or None
        if key == "tool_calls":
            if self._raw_calls is not None:
                return self._raw_calls
            if not self._calls:
                return None
            return [self._calls[i].as_dict() for i in sorted(self._calls)]
        if key == "input_token_details":
            return self._in
        if key == "output_token_details":
            return self._out
        if key == "reasoning_tokens":
            return _int(self._out.get("reasoning_tokens")) if self._out else None
        if key == "cached_tokens":
            return _int(self._in.get("cached_tokens")) if self._in else None
        return None

    # -- bounded text ---------------------------------------------------------------------------

    def _take(self, s: Any) -> str | None:
        """The part of ``s`` that fits in what is left of ``max_bytes``."""
        if s.__class__ is not str or not s or self.truncated:
            return None
        n = len(s) if s.isascii() else len(s.encode("utf-8", "surrogatepass"))
        if n <= self._left:
            self._left -= n
            return s
        self.truncated = True
        cut = s.encode("utf-8", "surrogatepass")[:self._left].decode("utf-8", "ignore")
        self._left = 0
        return cut or None

    def _add(self, parts: list[str], s: Any) -> None:
        t = self._take(s)
        if t:
            parts.append(t)

    def _call(self, index: int, id_: Any, type_: str, name: Any, initial: Any = None) -> _Call:
        call = self._calls[index] = _Call(index, id_, type_, name)
        if initial.__class__ is dict:
            call.initial = self._take(_compact(initial))
        elif initial.__class__ is str:
            call.initial = self._take(initial)
        return call

    # -- OpenAI chat completions / completions --------------------------------------------------

    def _openai_usage(self, u: Any) -> None:
        if u.__class__ is not dict:
            return
        inp = u.get("prompt_tokens_details")
        hit = u.get("prompt_cache_hit_tokens")
        if hit.__class__ is int and hit:
            inp = {**(inp if inp.__class__ is dict else {}), "prompt_cache_hit_tokens": hit}
        if inp.__class__ is dict:
            self._in = inp
        out = u.get("completion_tokens_details")
        if out.__class__ is dict:
            self._out = out

    def _openai_event(self, name: str | None, obj: dict) -> None:
        if self._w_usage and "usage" in obj:
            self._openai_usage(obj["usage"])
        c = _first_choice(obj.get("choices"))
        if c is None:
            return
        d = c.get("delta")
        if d.__class__ is not dict:  # legacy completions
            if self._w_answer:
                self._add(self._answer, c.get("text"))
            return
        if self._w_answer:
            self._add(self._answer, _text_of(d.get("content")))
        if self._w_reasoning:
            r = d.get("reasoning_content")
            self._add(self._reasoning, d.get("reasoning") if r is None else r)
        if self._w_tools:
            pieces = d.get("tool_calls")
            if pieces.__class__ is list:
                for p in pieces:
                    if p.__class__ is dict:
                        self._openai_piece(p)

    def _openai_piece(self, p: dict) -> None:
        """Higress ``extractStreamingToolCalls``: pieces joined per index. A piece without an
        index (some OpenAI-compatible servers) continues the call with its id, else starts one
        when it has an id, else continues the last."""
        calls = self._calls
        idx = p.get("index")
        pid = p.get("id")
        if idx.__class__ is not int:
            idx = next((i for i, c in calls.items() if pid and c.id == pid), None)
            if idx is None:
                idx = (max(calls) + 1 if calls else 0) if pid or not calls else max(calls)
        call = calls.get(idx)
        if call is None:
            call = calls[idx] = _Call(idx, "", "", "")
        if pid.__class__ is str and pid:
            call.id = pid
        t = p.get("type")
        if t.__class__ is str and t:
            call.type = t
        f = p.get("function")
        if f.__class__ is dict:
            n = f.get("name")
            if n.__class__ is str and n:
                call.name = n
            a = f.get("arguments")
            self._add(call.args, _compact(a) if a.__class__ is dict else a)

    def _openai_body(self, obj: dict) -> None:
        if self._w_usage:
            self._openai_usage(obj.get("usage"))
        c = _first_choice(obj.get("choices"))
        if c is None:
            return
        m = c.get("message")
        if m.__class__ is not dict:
            if self._w_answer:
                self._add(self._answer, c.get("text"))
            return
        if self._w_answer:
            self._add(self._answer, _text_of(m.get("content")))
        if self._w_reasoning:
            r = m.get("reasoning_content")
            self._add(self._reasoning, m.get("reasoning") if r is None else r)
        if self._w_tools:
            tc = m.get("tool_calls")
            if tc.__class__ is list and tc:
                self._raw_calls = tc

    # -- Anthropic messages (also Bedrock InvokeModel for Claude) -------------------------------

    def _anthropic_usage(self, u: Any) -> None:
        if u.__class__ is not dict:
            return
        det = {k: u[k] for k in ("cache_read_input_tokens", "cache_creation_input_tokens")
               if u.get(k) is not None}
        if det:
            self._in = det

    def _anthropic_event(self, name: str | None, obj: dict) -> None:
        t = obj.get("type") or name
        if t == "content_block_delta":
            d = obj.get("delta")
            if d.__class__ is not dict:
                return
            dt = d.get("type")
            if dt == "text_delta":
                if self._w_answer:
                    self._add(self._answer, d.get("text"))
            elif dt == "thinking_delta":
                if self._w_reasoning:
                    self._add(self._reasoning, d.get("thinking"))
            elif dt == "input_json_delta" and self._w_tools:
                call = self._calls.get(_int(obj.get("index")) or 0)
                if call is not None and call.open:
                    self._add(call.args, d.get("partial_json"))
        elif t == "content_block_start":
            b = obj.get("content_block")
            if b.__class__ is not dict:
                return
            bt = b.get("type")
            if bt == "tool_use":
                if self._w_tools:
                    self._call(_int(obj.get("index")) or 0, b.get("id"), "tool_use",
                               b.get("name"), b.get("input"))
            elif bt == "text":
                if self._w_answer:
                    self._add(self._answer, b.get("text"))
            elif bt == "thinking" and self._w_reasoning:
                self._add(self._reasoning, b.get("thinking"))
        elif t == "content_block_stop":
            call = self._calls.get(_int(obj.get("index")) or 0)
            if call is not None:
                call.open = False
        elif self._w_usage:
            if t == "message_start":
                m = obj.get("message")
                if m.__class__ is dict:
                    self._anthropic_usage(m.get("usage"))
            elif t == "message_delta":
                self._anthropic_usage(obj.get("usage"))

    def _anthropic_body(self, obj: dict) -> None:
        if self._w_usage:
            self._anthropic_usage(obj.get("usage"))
        content = obj.get("content")
        if content.__class__ is not list:
            return
        for i, b in enumerate(content):
            if b.__class__ is not dict:
                continue
            bt = b.get("type")
            if bt == "text":
                if self._w_answer:
                    self._add(self._answer, b.get("text"))
            elif bt == "thinking":
                if self._w_reasoning:
                    self._add(self._reasoning, b.get("thinking"))
            elif bt == "tool_use" and self._w_tools:
                self._call(i, b.get("id"), "tool_use", b.get("name"), b.get("input")).open = False

    # -- OpenAI Responses -----------------------------------------------------------------------

    def _responses_usage(self, u: Any) -> None:
        if u.__class__ is not dict:
            return
        if u.get("input_tokens_details").__class__ is dict:
            self._in = u["input_tokens_details"]
        if u.get("output_tokens_details").__class__ is dict:
            self._out = u["output_tokens_details"]

    def _responses_item(self, index: int, item: dict) -> _Call | None:
        if item.get("type") != "function_call":
            return None
        item_id = item.get("id")
        if item_id.__class__ is str:
            self._items[item_id] = index
        return self._call(index, item.get("call_id") or item_id, "function", item.get("name"),
                          item.get("arguments"))

    def _responses_event(self, name: str | None, obj: dict) -> None:
        t = obj.get("type") or name
        if t == "response.output_text.delta":
            if self._w_answer:
                self._add(self._answer, obj.get("delta"))
        elif t in ("response.reasoning_text.delta", "response.reasoning_summary_text.delta"):
            if self._w_reasoning:
                self._add(self._reasoning, obj.get("delta"))
        elif t == "response.function_call_arguments.delta":
            if self._w_tools:
                call = self._responses_call(obj)
                if call is not None:
                    self._add(call.args, obj.get("delta"))
        elif t in ("response.output_item.added", "response.output_item.done"):
            item = obj.get("item")
            if self._w_tools and item.__class__ is dict:
                call = self._responses_call(obj)
                if call is None:
                    self._responses_item(_int(obj.get("output_index")) or 0, item)
                elif not call.args and not call.initial:
                    call.initial = self._take(item.get("arguments"))
        elif t in ("response.completed", "response.incomplete", "response.failed"):
            resp = obj.get("response")
            if resp.__class__ is dict:
                if self._w_usage:
                    self._responses_usage(resp.get("usage"))
                # A stream without deltas (or a proxy that folded them): read the final output.
                self._responses_output(resp.get("output"), not self._answer,
                                       not self._reasoning, not self._calls)

    def _responses_call(self, obj: dict) -> _Call | None:
        idx = _int(obj.get("output_index"))
        if idx is None:
            idx = self._items.get(obj.get("item_id") or (obj.get("item") or {}).get("id"))
        return self._calls.get(idx) if idx is not None else None

    def _responses_output(self, output: Any, answer: bool, reasoning: bool, tools: bool) -> None:
        if output.__class__ is not list:
            return
        for i, item in enumerate(output):
            if item.__class__ is not dict:
                continue
            t = item.get("type")
            if t == "message" and answer and self._w_answer:
                for p in item.get("content") or ():
                    if p.__class__ is dict and p.get("type") == "output_text":
                        self._add(self._answer, p.get("text"))
            elif t == "reasoning" and reasoning and self._w_reasoning:
                parts = item.get("content") or item.get("summary") or ()
                for p in parts:
                    if p.__class__ is dict:
                        self._add(self._reasoning, p.get("text"))
            elif t == "function_call" and tools and self._w_tools:
                self._responses_item(i, item)

    def _responses_body(self, obj: dict) -> None:
        if self._w_usage:
            self._responses_usage(obj.get("usage"))
        self._responses_output(obj.get("output"), True, True, True)

    # -- Gemini generateContent (stream chunks and whole bodies share one shape) ---------------

    def _gemini_event(self, name: str | None, obj: dict) -> None:
        self._gemini_body(obj)

    def _gemini_body(self, obj: dict) -> None:
        if self._w_usage:
            u = obj.get("usageMetadata")
            if u.__class__ is dict:
                inp = {ours: u[theirs] for theirs, ours in _GEMINI_INPUT if theirs in u}
                if inp:
                    self._in = inp
                if "thoughtsTokenCount" in u:
                    self._out = {"thoughts_token_count": u["thoughtsTokenCount"]}
        c = _first_choice(obj.get("candidates"))
        content = c.get("content") if c is not None else None
        parts = content.get("parts") if content.__class__ is dict else None
        if parts.__class__ is not list:
            return
        for p in parts:
            if p.__class__ is not dict:
                continue
            fc = p.get("functionCall")
            if fc.__class__ is dict:
                if self._w_tools:
                    self._call(len(self._calls), fc.get("id"), "function", fc.get("name"),
                               fc.get("args")).open = False
                continue
            if p.get("thought") is True:
                if self._w_reasoning:
                    self._add(self._reasoning, p.get("text"))
            elif self._w_answer:
                self._add(self._answer, p.get("text"))

    # -- Ollama /api/chat (and /api/generate): stream lines and bodies share one shape ---------

    def _ollama_event(self, name: str | None, obj: dict) -> None:
        self._ollama_body(obj)

    def _ollama_body(self, obj: dict) -> None:
        m = obj.get("message")
        if m.__class__ is not dict:  # /api/generate: response and thinking at the top level
            if self._w_answer:
                self._add(self._answer, obj.get("response"))
            if self._w_reasoning:
                self._add(self._reasoning, obj.get("thinking"))
            return
        if self._w_answer:
            self._add(self._answer, m.get("content"))
        if self._w_reasoning:
            self._add(self._reasoning, m.get("thinking"))
        if self._w_tools and m.get("tool_calls").__class__ is list:
            for tc in m["tool_calls"]:
                f = tc.get("function") if tc.__class__ is dict else None
                if f.__class__ is dict:
                    idx = _int(f.get("index"))
                    self._call(len(self._calls) if idx is None else idx, tc.get("id"),
                               "function", f.get("name"), f.get("arguments")).open = False

    # -- Bedrock Converse -----------------------------------------------------------------------

    def _converse_usage(self, u: Any) -> None:
        if u.__class__ is not dict:
            return
        det = {ours: u[theirs] for theirs, ours in (
            ("cacheReadInputTokens", "cache_read_input_tokens"),
            ("cacheWriteInputTokens", "cache_creation_input_tokens")) if u.get(theirs) is not None}
        if det:
            self._in = det

    def _converse_event(self, name: str | None, obj: dict) -> None:
        if name not in _CONVERSE_EVENTS:  # unnamed: wrapped ({"contentBlockDelta": {…}}) or bare
            for k in _CONVERSE_EVENTS:
                if obj.get(k).__class__ is dict:
                    name, obj = k, obj[k]
                    break
            else:
                name = ("contentBlockDelta" if "delta" in obj else "contentBlockStart"
                        if "start" in obj else "metadata" if "usage" in obj else None)
        idx = _int(obj.get("contentBlockIndex")) or 0
        if name == "contentBlockDelta":
            d = obj.get("delta")
            if d.__class__ is not dict:
                return
            if "text" in d:
                if self._w_answer:
                    self._add(self._answer, d["text"])
            elif "reasoningContent" in d:
                rc = d["reasoningContent"]
                if self._w_reasoning and rc.__class__ is dict:
                    self._add(self._reasoning, rc.get("text"))
            elif "toolUse" in d and self._w_tools:
                tu = d["toolUse"]
                call = self._calls.get(idx) or self._call(idx, "", "tool_use", "")
                if tu.__class__ is dict:
                    self._add(call.args, tu.get("input"))
        elif name == "contentBlockStart":
            start = obj.get("start")
            tu = start.get("toolUse") if start.__class__ is dict else None
            if self._w_tools and tu.__class__ is dict:
                self._call(idx, tu.get("toolUseId"), "tool_use", tu.get("name"))
        elif name == "metadata" and self._w_usage:
            self._converse_usage(obj.get("usage"))

    def _converse_body(self, obj: dict) -> None:
        if self._w_usage:
            self._converse_usage(obj.get("usage"))
        out = obj.get("output")
        m = out.get("message") if out.__class__ is dict else None
        content = m.get("content") if m.__class__ is dict else None
        if content.__class__ is not list:
            return
        for i, b in enumerate(content):
            if b.__class__ is not dict:
                continue
            if "text" in b:
                if self._w_answer:
                    self._add(self._answer, b["text"])
            elif "reasoningContent" in b:
                rt = b["reasoningContent"]
                rt = rt.get("reasoningText") if rt.__class__ is dict else None
                if self._w_reasoning and rt.__class__ is dict:
                    self._add(self._reasoning, rt.get("text"))
            elif "toolUse" in b and self._w_tools:
                tu = b["toolUse"]
                if tu.__class__ is dict:
                    self._call(i, tu.get("toolUseId"), "tool_use", tu.get("name"),
                               tu.get("input")).open = False
