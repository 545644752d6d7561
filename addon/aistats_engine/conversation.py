"""One structured view of an LLM exchange: the request's system prompt, tools and messages, and
what the response said (assembled answer, reasoning, tool calls, finish reason, usage).

Used by the web UI (as JSON) and by the mitmproxy "LLM" contentview (``render_text``). Plain
Python, no mitmproxy import. The response is read with the proxy's own pieces: streams are
framed with ``wire.framing``, events read by ``wire.reader.ResponseState`` (finish reason,
model, id, errors, Bedrock unwrapping) and ``rules.builtins.BuiltinExtractor`` (answer,
reasoning, tool calls), so this view and the records agree.

Shape of :func:`conversation`'s result::

    {"api": str | None, "model": str | None,
     "system": str | [str, ...] | None,
     "tools": [{"name", "description", "parameters"}],
     "messages": [{"role": str, "parts": [part, ...]}],
     "response": None (no response body given) | {
         "text", "reasoning", "tool_calls": [part, ...], "finish_reason",
         "usage": {...the provider's raw usage object...} | None, "model", "id", "error"},
     "notes": [str, ...]}

A part is ``{"type": "text" | "reasoning" | "tool_call" | "tool_result" | "image" | "other"}``
plus, as they apply: ``text`` (text, reasoning, other; an image whose data was left out),
``name`` (tool name; an image's media type; an other part's kind), ``id`` (tool call id),
``arguments`` (a tool call's arguments, a JSON text as sent), ``content`` (a tool result's
text; an image's URL or data URL), and ``error: True`` on a tool result marked as failed.

Decisions:

- Roles are the provider's, except Gemini's ``model`` which reads ``assistant``. Tool results
  stay in the message that carries them (OpenAI/Ollama role ``tool``, Anthropic/Converse
  ``user``, Gemini ``function``/``user``); Responses ``*_output`` items make a ``tool`` message.
- System/developer messages at the start of an OpenAI-style ``messages`` (or Responses
  ``input``) list are moved to ``system``; later ones stay in place. ``system`` is a string when
  there is one text, a list of strings when several.
- Every message is kept (the UI collapses long histories); a single text over
  :data:`MAX_TEXT` characters is cut and noted; image data over it is left out (the part stays,
  with its media type) and noted.
- ``model`` is the model asked for: the request body's, else the path's (the ``model``
  argument), else the one the response names; ``response.model`` is always the response's.
- Never raises: a part, message or body that cannot be read is left out and noted.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from .record import errors
from .rules.builtins import RESPONSE_BODY, STREAMING_BODY, BuiltinExtractor
from .wire import framing
from .wire.format import WireFormat
from .wire.formats import by_api
from .wire.formats.bedrock import _unwrap as bedrock_unwrap
from .wire.formats.generic import GENERIC
from .wire.reader import ResponseState

MAX_TEXT = 1 << 20  # characters in one text part (1 Mi); longer texts are cut
MAX_NOTES = 50
RESPONSE_TEXT_BYTES = 4 << 20  # answer + reasoning + tool arguments read from one response
_KEYS = frozenset({"answer", "reasoning", "tool_calls"})
_METRICS = "amazon-bedrock-invocationMetrics"
_OLLAMA_COUNTS = ("prompt_eval_count", "eval_count", "prompt_eval_duration", "eval_duration",
                  "total_duration", "load_duration")
# Keys of a part that carry nothing to show on their own.
_QUIET_KEYS = frozenset({"thoughtSignature", "thought_signature", "thought", "cache_control",
                         "videoMetadata", "video_metadata", "partMetadata"})
_GEMINI_TOOLS = ("googleSearch", "google_search", "googleSearchRetrieval",
                 "google_search_retrieval", "codeExecution", "code_execution", "urlContext",
                 "url_context", "retrieval", "computerUse", "computer_use", "googleMaps",
                 "google_maps", "fileSearch", "file_search")


# -- notes and bounded text ----------------------------------------------------------------------

class _Ctx:
    __slots__ = ("notes",)

    def __init__(self) -> None:
        self.notes: list[str] = []

    def note(self, msg: str) -> None:
        n = len(self.notes)
        if n < MAX_NOTES:
            self.notes.append(msg)
        elif n == MAX_NOTES:
            self.notes.append("further notes left out")

    def cut(self, s: str, where: str) -> str:
        if len(s) > MAX_TEXT:
            self.note(f"{where}: text of {len(s)} characters cut to {MAX_TEXT}")
            return s[:MAX_TEXT]
        return s


def _compact(v: Any) -> str:
    """Compact JSON of a parsed value (tool arguments, schemas, usage)."""
    try:
        return orjson.dumps(v, option=orjson.OPT_NON_STR_KEYS).decode()
    except Exception:
        pass
    try:
        return json.dumps(v, separators=(",", ":"), ensure_ascii=False, default=str)
    except Exception:
        return "(not serialisable)"


def _str(v: Any) -> str | None:
    return v if isinstance(v, str) else None


# -- parts ---------------------------------------------------------------------------------------

def _text(ctx: _Ctx, s: Any, where: str, kind: str = "text") -> dict | None:
    if not isinstance(s, str) or not s:
        return None
    return {"type": kind, "text": ctx.cut(s, where)}


def _call(ctx: _Ctx, id_: Any, name: Any, args: Any, where: str) -> dict:
    if args is None:
        a = ""
    elif isinstance(args, str):
        a = args
    else:
        a = _compact(args)
    return {"type": "tool_call", "id": _str(id_), "name": _str(name),
            "arguments": ctx.cut(a, where)}


def _result_text(content: Any) -> str:
    """A tool result's content as text: a string, text blocks joined, anything else as JSON."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for b in content:
            if isinstance(b, str):
                out.append(b)
            elif isinstance(b, dict):
                t = b.get("text")
                if isinstance(t, str) and b.get("type", "text") in (
                        "text", "input_text", "output_text"):
                    out.append(t)
                elif isinstance(t, dict) and isinstance(t.get("text"), str):
                    out.append(t["text"])
                elif "json" in b and len(b) == 1:  # Converse {"json": …}
                    out.append(_compact(b["json"]))
                elif b.get("type") in ("image", "input_image", "image_url") or "image" in b:
                    out.append("[image]")
                else:
                    out.append(_compact(b))
            else:
                out.append(_compact(b))
        return "\n".join(out)
    return _compact(content)


def _result(ctx: _Ctx, id_: Any, name: Any, content: Any, where: str,
            error: bool = False) -> dict:
    part = {"type": "tool_result", "id": _str(id_), "name": _str(name),
            "content": ctx.cut(_result_text(content), where)}
    if error:
        part["error"] = True
    return part


def _image(ctx: _Ctx, mime: Any, url: Any, where: str) -> dict:
    """An image part: ``name`` its media type, ``content`` its URL or data URL (None when the
    data was too large to keep)."""
    mime = _str(mime)
    part: dict[str, Any] = {"type": "image", "name": mime, "content": None}
    if isinstance(url, str):
        if mime is None and url.startswith("data:"):
            mime = part["name"] = url[5:].split(";", 1)[0].split(",", 1)[0] or None
        if len(url) > MAX_TEXT:
            ctx.note(f"{where}: image data of {len(url)} characters left out")
            part["text"] = f"(image data of {len(url)} characters left out)"
        else:
            part["content"] = url
    return part


def _data_url(mime: Any, data: Any) -> str | None:
    if not isinstance(data, str):
        return None
    return f"data:{mime if isinstance(mime, str) else 'application/octet-stream'};base64,{data}"


def _other(ctx: _Ctx, name: Any, text: Any, where: str) -> dict:
    part: dict[str, Any] = {"type": "other", "name": _str(name)}
    if isinstance(text, str) and text:
        part["text"] = ctx.cut(text, where)
    return part


def _blocks(ctx: _Ctx, content: Any, where: str) -> list[dict]:
    """A content list (OpenAI, Anthropic, Responses, Converse blocks or Gemini parts)."""
    if isinstance(content, str):
        p = _text(ctx, content, where)
        return [p] if p else []
    if isinstance(content, dict):
        content = [content]
    if not isinstance(content, list):
        if content is not None:
            ctx.note(f"{where}: content of type {type(content).__name__} left out")
        return []
    out: list[dict] = []
    for i, b in enumerate(content):
        try:
            out.extend(_block(ctx, b, f"{where} part {i + 1}"))
        except Exception as e:
            ctx.note(f"{where} part {i + 1}: not read ({type(e).__name__})")
    return out


def _block(ctx: _Ctx, b: Any, where: str) -> list[dict]:
    if isinstance(b, str):
        p = _text(ctx, b, where)
        return [p] if p else []
    if not isinstance(b, dict):
        ctx.note(f"{where}: a {type(b).__name__} block left out")
        return []
    t = b.get("type")
    if isinstance(t, str):
        return _typed_block(ctx, t, b, where)
    return _keyed_block(ctx, b, where)


def _typed_block(ctx: _Ctx, t: str, b: dict, where: str) -> list[dict]:
    """OpenAI chat / Responses / Anthropic blocks, told apart by ``type``."""
    if t in ("text", "input_text", "output_text"):
        p = _text(ctx, b.get("text"), where)
        return [p] if p else []
    if t in ("thinking", "reasoning", "reasoning_text", "summary_text"):
        p = _text(ctx, b.get("thinking") if t == "thinking" else b.get("text"), where,
                  "reasoning")
        return [p] if p else []
    if t == "redacted_thinking":
        return [_other(ctx, t, "(redacted thinking)", where)]
    if t == "refusal":
        return [_other(ctx, t, b.get("refusal"), where)]
    if t == "image_url":
        iu = b.get("image_url")
        return [_image(ctx, None, iu.get("url") if isinstance(iu, dict) else iu, where)]
    if t == "input_image":
        return [_image(ctx, None, b.get("image_url") or b.get("file_id"), where)]
    if t == "image":
        src = b.get("source")
        if isinstance(src, dict):
            st = src.get("type")
            if st == "base64":
                return [_image(ctx, src.get("media_type"),
                               _data_url(src.get("media_type"), src.get("data")), where)]
            return [_image(ctx, src.get("media_type"), src.get("url") or src.get("file_id"),
                           where)]
        return [_image(ctx, b.get("mime_type"), b.get("url") or b.get("image_url"), where)]
    if t in ("tool_use", "server_tool_use", "mcp_tool_use"):
        return [_call(ctx, b.get("id"), b.get("name"), b.get("input"), where)]
    if t == "tool_result" or t.endswith("_tool_result"):
        return [_result(ctx, b.get("tool_use_id"), b.get("name"), b.get("content"), where,
                        b.get("is_error") is True)]
    if t == "function_call":  # Responses item used as a block
        return [_call(ctx, b.get("call_id") or b.get("id"), b.get("name"), b.get("arguments"),
                      where)]
    if t == "function_call_output":
        return [_result(ctx, b.get("call_id"), None, b.get("output"), where)]
    if t in ("file", "input_file", "document"):
        f = b.get("file") if isinstance(b.get("file"), dict) else b
        label = f.get("filename") or f.get("title") or f.get("file_id") or f.get("file_url")
        return [_other(ctx, t, label if isinstance(label, str) else None, where)]
    text = b.get("text")
    return [_other(ctx, t, text if isinstance(text, str) else None, where)]


def _keyed_block(ctx: _Ctx, b: dict, where: str) -> list[dict]:
    """Gemini parts and Converse content blocks, told apart by their one key."""
    fc = b.get("functionCall", b.get("function_call"))
    if isinstance(fc, dict):
        return [_call(ctx, fc.get("id"), fc.get("name"), fc.get("args"), where)]
    fr = b.get("functionResponse", b.get("function_response"))
    if isinstance(fr, dict):
        return [_result(ctx, fr.get("id"), fr.get("name"), fr.get("response"), where)]
    inline = b.get("inlineData", b.get("inline_data"))
    if isinstance(inline, dict):
        mime = inline.get("mimeType", inline.get("mime_type"))
        data = inline.get("data")
        if isinstance(mime, str) and mime.startswith("image/"):
            return [_image(ctx, mime, _data_url(mime, data), where)]
        size = len(data) if isinstance(data, str) else 0
        return [_other(ctx, mime if isinstance(mime, str) else "inlineData",
                       f"({size} characters of base64 data)", where)]
    fd = b.get("fileData", b.get("file_data"))
    if isinstance(fd, dict):
        mime = fd.get("mimeType", fd.get("mime_type"))
        uri = fd.get("fileUri", fd.get("file_uri"))
        if isinstance(mime, str) and mime.startswith("image/"):
            return [_image(ctx, mime, uri, where)]
        return [_other(ctx, mime if isinstance(mime, str) else "fileData", _str(uri), where)]
    for key, field in (("executableCode", "code"), ("executable_code", "code"),
                       ("codeExecutionResult", "output"), ("code_execution_result", "output")):
        v = b.get(key)
        if isinstance(v, dict):
            return [_other(ctx, key, _str(v.get(field)), where)]
    if "text" in b:
        text = b["text"]
        if isinstance(text, dict):  # Converse guardContent-like nesting
            text = text.get("text")
        p = _text(ctx, text, where, "reasoning" if b.get("thought") is True else "text")
        return [p] if p else []
    tu = b.get("toolUse")
    if isinstance(tu, dict):
        return [_call(ctx, tu.get("toolUseId"), tu.get("name"), tu.get("input"), where)]
    tr = b.get("toolResult")
    if isinstance(tr, dict):
        return [_result(ctx, tr.get("toolUseId"), None, tr.get("content"), where,
                        tr.get("status") == "error")]
    rc = b.get("reasoningContent")
    if isinstance(rc, dict):
        rt = rc.get("reasoningText")
        if isinstance(rt, dict):
            p = _text(ctx, rt.get("text"), where, "reasoning")
            return [p] if p else []
        return [_other(ctx, "redactedContent", "(redacted reasoning)", where)]
    img = b.get("image")
    if isinstance(img, dict):  # Converse {"image": {"format", "source": {"bytes"}}}
        fmt = img.get("format")
        mime = f"image/{fmt}" if isinstance(fmt, str) else None
        src = img.get("source")
        data = src.get("bytes") if isinstance(src, dict) else None
        s3 = src.get("s3Location") if isinstance(src, dict) else None
        url = _data_url(mime, data) if isinstance(data, str) else (
            s3.get("uri") if isinstance(s3, dict) else None)
        return [_image(ctx, mime, url, where)]
    if "cachePoint" in b or "cache_control" in b and len(b) == 1:
        return []
    gc = b.get("guardContent")
    if isinstance(gc, dict):
        return _keyed_block(ctx, gc, where)
    for key in ("document", "video", "audio"):
        v = b.get(key)
        if isinstance(v, dict):
            return [_other(ctx, key, _str(v.get("name")), where)]
    keys = [k for k in b if k not in _QUIET_KEYS]
    if not keys:  # a bare signature or metadata part: nothing to show
        return []
    return [_other(ctx, keys[0], None, where)]


# -- messages ------------------------------------------------------------------------------------

def _message(ctx: _Ctx, m: Any, where: str) -> dict | None:
    """One message of any messages-style API (OpenAI chat, Anthropic, Converse, Ollama, Gemini
    ``contents`` entries, Responses message items)."""
    if isinstance(m, str):
        p = _text(ctx, m, where)
        return {"role": "user", "parts": [p] if p else []}
    if not isinstance(m, dict):
        ctx.note(f"{where}: a {type(m).__name__} left out")
        return None
    role = m.get("role")
    role = role if isinstance(role, str) and role else ("user" if "parts" in m else "unknown")
    if role == "model":
        role = "assistant"
    parts: list[dict] = []
    for key in ("reasoning_content", "reasoning", "thinking"):  # OpenAI-compatible, Ollama
        p = _text(ctx, m.get(key), where, "reasoning")
        if p:
            parts.append(p)
            break
    content = m["content"] if "content" in m else m.get("parts")
    tool_id = m.get("tool_call_id")
    if role == "tool" or (role == "function" and "parts" not in m) or isinstance(tool_id, str):
        name = m.get("name") or m.get("tool_name")
        if isinstance(content, list) and any(
                isinstance(b, dict) and b.get("type") == "tool_result" for b in content):
            parts.extend(_blocks(ctx, content, where))
        else:
            parts.append(_result(ctx, tool_id, name, content, where))
    else:
        parts.extend(_blocks(ctx, content, where))
    images = m.get("images")  # Ollama: base64 strings
    if isinstance(images, list):
        for img in images:
            parts.append(_image(ctx, None, _data_url("image/*", img) if isinstance(img, str)
                                else None, where))
    tcs = m.get("tool_calls")
    if isinstance(tcs, list):
        for tc in tcs:
            if not isinstance(tc, dict):
                continue
            f = tc.get("function")
            f = f if isinstance(f, dict) else tc
            parts.append(_call(ctx, tc.get("id"), f.get("name"), f.get("arguments"), where))
    fc = m.get("function_call")  # legacy OpenAI
    if isinstance(fc, dict):
        parts.append(_call(ctx, None, fc.get("name"), fc.get("arguments"), where))
    refusal = m.get("refusal")
    if isinstance(refusal, str) and refusal:
        parts.append(_other(ctx, "refusal", refusal, where))
    return {"role": role, "parts": parts}


def _system_texts(v: Any) -> list[str]:
    """Texts of a system prompt: a string, a list of blocks, or a Gemini Content."""
    if isinstance(v, str):
        return [v] if v else []
    if isinstance(v, dict):
        v = v.get("parts") if "parts" in v else [v]
    out: list[str] = []
    if isinstance(v, list):
        for b in v:
            if isinstance(b, str):
                out.append(b)
            elif isinstance(b, dict):
                t = b.get("text")
                if isinstance(t, str):
                    out.append(t)
    return out


def _set_system(ctx: _Ctx, conv: dict, texts: list[str]) -> None:
    texts = [ctx.cut(t, "system") for t in texts if t]
    if not texts:
        return
    prev = conv["system"]
    have = [] if prev is None else ([prev] if isinstance(prev, str) else list(prev))
    texts = have + texts
    conv["system"] = texts[0] if len(texts) == 1 else texts


def _messages(ctx: _Ctx, conv: dict, items: list, where: str = "message") -> None:
    leading = True
    for i, m in enumerate(items):
        w = f"{where} {i + 1}"
        try:
            if leading and isinstance(m, dict) and m.get("role") in ("system", "developer"):
                _set_system(ctx, conv, _system_texts(m.get("content")))
                continue
            leading = False
            msg = _message(ctx, m, w)
            if msg is not None:
                conv["messages"].append(msg)
        except Exception as e:
            ctx.note(f"{w}: not read ({type(e).__name__})")


def _responses_input(ctx: _Ctx, conv: dict, items: list) -> None:
    """Responses ``input`` items: messages, and function calls, their outputs and reasoning as
    parts of an assistant / tool message (consecutive ones of one role share a message)."""
    msgs = conv["messages"]
    leading = True
    for i, it in enumerate(items):
        w = f"input item {i + 1}"
        try:
            if not isinstance(it, dict) or (it.get("type") in (None, "message") and "role" in it):
                if leading and isinstance(it, dict) and it.get("role") in ("system", "developer"):
                    _set_system(ctx, conv, _system_texts(it.get("content")))
                    continue
                leading = False
                msg = _message(ctx, it, w)
                if msg is not None:
                    msgs.append(msg)
                continue
            leading = False
            t = it.get("type")
            t = t if isinstance(t, str) else ""
            role = "assistant"
            if t in ("function_call", "custom_tool_call"):
                part = _call(ctx, it.get("call_id") or it.get("id"), it.get("name"),
                             it.get("arguments") if t == "function_call" else it.get("input"), w)
            elif t.endswith("_output"):
                role = "tool"
                part = _result(ctx, it.get("call_id") or it.get("id"), None, it.get("output"), w)
            elif t == "reasoning":
                texts = [p["text"] for key in ("content", "summary")
                         for p in (it.get(key) or ()) if isinstance(p, dict)
                         and isinstance(p.get("text"), str)]
                part = (_text(ctx, "\n\n".join(texts), w, "reasoning") if texts
                        else _other(ctx, "reasoning", "(encrypted reasoning)", w))
            elif t.endswith("_call"):  # web_search_call, computer_call, mcp_call, …
                args = it.get("arguments") or it.get("action")
                part = _call(ctx, it.get("call_id") or it.get("id"), it.get("name") or t, args, w)
            else:
                part = _other(ctx, t or None, _str(it.get("id")), w)
            if part is None:
                continue
            if msgs and msgs[-1]["role"] == role and msgs[-1].get("_items"):
                msgs[-1]["parts"].append(part)
            else:
                msgs.append({"role": role, "parts": [part], "_items": True})
        except Exception as e:
            ctx.note(f"{w}: not read ({type(e).__name__})")
    for m in msgs:
        m.pop("_items", None)


# -- tools ---------------------------------------------------------------------------------------

def _tool(ctx: _Ctx, name: Any, desc: Any, params: Any) -> dict:
    d = _str(desc)
    return {"name": _str(name), "description": ctx.cut(d, "tool description") if d else d,
            "parameters": params}


def _tools(ctx: _Ctx, req: dict) -> list[dict]:
    out: list[dict] = []
    lists = []
    for key in ("tools", "functions"):
        if isinstance(req.get(key), list):
            lists.append(req[key])
    tc = req.get("toolConfig")
    if isinstance(tc, dict) and isinstance(tc.get("tools"), list):
        lists.append(tc["tools"])
    for tools in lists:
        for t in tools:
            if not isinstance(t, dict):
                continue
            f = t.get("function")
            if isinstance(f, dict):  # OpenAI chat, Ollama
                out.append(_tool(ctx, f.get("name"), f.get("description"), f.get("parameters")))
                continue
            spec = t.get("toolSpec")
            if isinstance(spec, dict):  # Converse
                schema = spec.get("inputSchema")
                schema = schema.get("json", schema) if isinstance(schema, dict) else schema
                out.append(_tool(ctx, spec.get("name"), spec.get("description"), schema))
                continue
            decls = t.get("functionDeclarations", t.get("function_declarations"))
            if isinstance(decls, list):  # Gemini
                for fd in decls:
                    if isinstance(fd, dict):
                        out.append(_tool(ctx, fd.get("name"), fd.get("description"),
                                         fd.get("parameters", fd.get(
                                             "parametersJsonSchema",
                                             fd.get("parameters_json_schema")))))
                continue
            gk = next((k for k in _GEMINI_TOOLS if k in t), None)
            if gk is not None:
                out.append(_tool(ctx, gk, None, t[gk] or None))
                continue
            name = t.get("name") or t.get("type")  # Responses, Anthropic, server tools
            params = t.get("parameters", t.get("input_schema"))
            out.append(_tool(ctx, name, t.get("description"), params))
    return out


# -- request -------------------------------------------------------------------------------------

def _read_request(ctx: _Ctx, conv: dict, req: Any) -> None:
    if isinstance(req, (bytes, bytearray, memoryview)):
        if not req:
            return
        try:
            req = orjson.loads(req)
        except Exception:
            ctx.note("request body is not valid JSON")
            return
    if req is None:
        return
    if not isinstance(req, dict):
        if isinstance(req, list):  # llama.cpp prompt lists and the like: best effort
            ctx.note("request body is a JSON array: read as a list of prompts")
            for i, p in enumerate(req):
                msg = _message(ctx, p, f"prompt {i + 1}")
                if msg is not None:
                    conv["messages"].append(msg)
        else:
            ctx.note(f"request body is a JSON {type(req).__name__}, not an object")
        return
    model = req.get("model", req.get("modelId"))
    if isinstance(model, str) and model:
        conv["model"] = model
    try:
        conv["tools"] = _tools(ctx, req)
    except Exception as e:
        ctx.note(f"tools not read ({type(e).__name__})")
    try:
        sysv = req.get("system", req.get("instructions",
                                         req.get("systemInstruction",
                                                 req.get("system_instruction"))))
        if sysv is not None:
            _set_system(ctx, conv, _system_texts(sysv))
    except Exception as e:
        ctx.note(f"system prompt not read ({type(e).__name__})")
    contents = req.get("contents")
    msgs = req.get("messages")
    inp = req.get("input")
    if isinstance(msgs, list):
        _messages(ctx, conv, msgs)
    elif isinstance(contents, list):  # Gemini
        _messages(ctx, conv, contents, "content")
    elif isinstance(inp, list):  # Responses (embeddings: a list of strings)
        _responses_input(ctx, conv, inp)
    elif isinstance(inp, str):
        conv["messages"].append({"role": "user", "parts": [_text(ctx, inp, "input")
                                                           or {"type": "text", "text": ""}]})
    else:
        prompt = req.get("prompt", req.get("inputText"))  # completions, Ollama generate, Titan
        prompts = prompt if isinstance(prompt, list) else [prompt]
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                parts = [{"type": "text", "text": ctx.cut(p, f"prompt {i + 1}")}]
                if i == 0 and isinstance(req.get("images"), list):  # Ollama generate
                    parts += [_image(ctx, None, _data_url("image/*", img), "prompt")
                              for img in req["images"] if isinstance(img, str)]
                conv["messages"].append({"role": "user", "parts": parts})
        suffix = req.get("suffix")
        if isinstance(suffix, str) and suffix:
            conv["messages"].append({"role": "user", "parts": [
                {"type": "other", "name": "suffix", "text": ctx.cut(suffix, "suffix")}]})


# -- response ------------------------------------------------------------------------------------

def _fmt(api: str | None) -> WireFormat:
    if api:
        try:
            return by_api(api)
        except KeyError:
            pass
    return GENERIC


class _Usage:
    """The provider's raw usage object, merged over the stream (later keys win)."""

    __slots__ = ("usage",)

    def __init__(self) -> None:
        self.usage: dict | None = None

    def _merge(self, u: dict) -> None:
        if self.usage is None:
            self.usage = {}
        self.usage.update(u)

    def see(self, obj: dict) -> None:
        for holder in (obj, obj.get("message"), obj.get("response")):
            if isinstance(holder, dict):
                u = holder.get("usage")
                if isinstance(u, dict):
                    self._merge(u)
        um = obj.get("usageMetadata")
        if isinstance(um, dict):
            self._merge(um)
        if obj.get("done") is True:  # Ollama: counts on the final line
            counts = {k: obj[k] for k in _OLLAMA_COUNTS if k in obj}
            if counts:
                self._merge(counts)
        metrics = obj.get(_METRICS)
        if isinstance(metrics, dict):
            if self.usage is None:
                self._merge(metrics)
            else:
                self.usage[_METRICS] = metrics


class _Fallback:
    """Text of shapes the extractor does not read (Bedrock Titan / Llama / Mistral / Cohere,
    llama.cpp ``/completion``)."""

    __slots__ = ("parts",)

    def __init__(self) -> None:
        self.parts: list[str] = []

    def see(self, obj: dict) -> None:
        for key in ("generation", "outputText", "completion", "content"):
            v = obj.get(key)
            if isinstance(v, str):
                self.parts.append(v)
                return
        for key in ("outputs", "results", "generations"):
            items = obj.get(key)
            if isinstance(items, list):
                for it in items:
                    if isinstance(it, dict):
                        v = it.get("text", it.get("outputText"))
                        if isinstance(v, str):
                            self.parts.append(v)
                return


def _sniff(body: bytes) -> type[framing.Framer] | None:
    head = body[:64].lstrip()
    if head.startswith((b"data:", b"event:", b":")):
        return framing.SSEFramer
    return None


def _empty_response() -> dict:
    return {"text": None, "reasoning": None, "tool_calls": [], "finish_reason": None,
            "usage": None, "model": None, "id": None, "error": None}


def _read_response(ctx: _Ctx, api: str | None, body: bytes,
                   content_type: str | None) -> dict:
    resp = _empty_response()
    if not body:
        ctx.note("response body is empty")
        return resp
    fmt = _fmt(api)
    state = ResponseState(fmt)
    state.fast = False  # read every event in full: finish reason, ids
    ex = BuiltinExtractor(api, _KEYS, max_bytes=RESPONSE_TEXT_BYTES)
    usage = _Usage()
    fallback = _Fallback()

    def tap(name: str | None, obj: dict) -> None:
        ex.event(name, obj)
        usage.see(obj)
        fallback.see(obj)

    state.tap = tap
    framer_cls = framing.framer_for(content_type) or _sniff(body)
    streamed = framer_cls is not None
    if framer_cls is None:
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            lines = [ln for ln in body.split(b"\n") if ln.strip()]
            if len(lines) > 1 and lines[0].lstrip()[:1] == b"{":
                framer_cls, streamed = framing.NDJSONFramer, True  # NDJSON without its type
            else:
                ctx.note("response body is not JSON" + (
                    f" ({content_type})" if content_type else ""))
                return resp
        else:
            state.on_body(obj)
            ex.body(obj)
            for item in (obj if isinstance(obj, list) else [obj]):
                if isinstance(item, dict):
                    usage.see(item)
                    fallback.see(item)
            if isinstance(obj, dict) and "error" in obj and not (
                    "choices" in obj or "candidates" in obj or "output" in obj):
                resp["error"] = errors.message_from(obj) or _compact(obj["error"])
    if framer_cls is not None:
        _read_stream(ctx, state, fmt, framer_cls(), body)
        resp["error"] = state.error
    mode = STREAMING_BODY if streamed else RESPONSE_BODY
    if ex.truncated:
        ctx.note(f"response texts over {RESPONSE_TEXT_BYTES} bytes in all: cut")
    text = ex.value("answer", mode)
    if text is None and fallback.parts:
        text = "".join(fallback.parts) or None
    resp["text"] = ctx.cut(text, "response text") if isinstance(text, str) else None
    reasoning = ex.value("reasoning", mode)
    resp["reasoning"] = ctx.cut(reasoning, "response reasoning") if isinstance(
        reasoning, str) else None
    calls = ex.value("tool_calls", mode)
    if isinstance(calls, list):
        for i, tc in enumerate(calls):
            if isinstance(tc, dict):
                f = tc.get("function")
                f = f if isinstance(f, dict) else tc
                resp["tool_calls"].append(_call(ctx, tc.get("id") or None, f.get("name"),
                                                f.get("arguments"), f"response tool call {i}"))
    resp["finish_reason"] = state.finish_reason
    resp["usage"] = usage.usage
    resp["model"] = state.response_model
    resp["id"] = state.chat_id
    return resp


def _read_stream(ctx: _Ctx, state: ResponseState, fmt: WireFormat,
                 framer: framing.Framer, body: bytes) -> None:
    events = framer.feed(body)
    events += framer.close()
    aws = isinstance(framer, framing.AWSEventStreamFramer)
    unwrap = aws and fmt.unwrap is None  # Bedrock chunks on a path we could not name
    bad = 0
    for name, data in events:
        if unwrap and name == "chunk":
            try:
                u = bedrock_unwrap(name, data)
            except ValueError:
                bad += 1
                continue
            if u is None:
                continue
            name, data = u
        try:
            state.on_event(name, data)
        except Exception as e:
            bad += 1
            ctx.note(f"a stream event not read ({type(e).__name__})")
    bad += state.invalid_events
    if bad:
        ctx.note(f"{bad} stream event(s) not valid JSON, left out")
    if framer.oversized:
        ctx.note(f"{framer.oversized} oversized stream event(s) left out")
    if aws:
        if framer.bad_frames:  # type: ignore[union-attr]
            ctx.note(f"{framer.bad_frames} damaged event-stream frame(s) left out")  # type: ignore[union-attr]
        if framer.pending():
            ctx.note("the stream ends inside an event-stream frame")
    if not events:
        ctx.note("no events in the stream")


# -- entry points ---------------------------------------------------------------------------------

def conversation(api: str | None, request_json: Any, response_body: bytes | None,
                 response_content_type: str | None, *, model: str | None = None) -> dict:
    """The exchange as one structured dict (see the module docstring). ``request_json`` is the
    parsed request body (raw JSON bytes are parsed too); ``response_body`` the decoded response
    body, None when there is none (then ``response`` is None). ``model``: the model named by the
    path (Gemini, Bedrock), used when the request body names none (then the response's). Never raises."""
    ctx = _Ctx()
    conv: dict[str, Any] = {"api": api, "model": None, "system": None, "tools": [],
                            "messages": [], "response": None, "notes": ctx.notes}
    try:
        _read_request(ctx, conv, request_json)
    except Exception as e:
        ctx.note(f"request not fully read ({type(e).__name__})")
    if response_body is not None:
        try:
            conv["response"] = _read_response(ctx, api, bytes(response_body),
                                              response_content_type)
        except Exception as e:
            ctx.note(f"response not read ({type(e).__name__})")
            conv["response"] = _empty_response()
    if conv["model"] is None:  # the model asked for: the request's, the path's, else served
        resp = conv["response"]
        conv["model"] = _str(model) or (resp.get("model") if resp else None)
    return conv


# -- text ----------------------------------------------------------------------------------------

class _Out:
    __slots__ = ("parts", "size", "limit", "full")

    def __init__(self, limit: int) -> None:
        self.parts: list[str] = []
        self.size = 0
        self.limit = max(0, limit)
        self.full = False

    def add(self, s: str) -> None:
        if self.full:
            return
        self.parts.append(s)
        self.size += len(s) + 1
        if self.size > self.limit:
            self.full = True

    def text(self) -> str:
        out = "\n".join(self.parts)
        if len(out) > self.limit:
            out = out[:self.limit] + f"\n… (cut at {self.limit} characters)"
        return out


def _s(v: Any) -> str:
    return v if isinstance(v, str) else _compact(v)


def _render_part(out: _Out, p: Any) -> None:
    if not isinstance(p, dict):
        out.add(_s(p))
        return
    t = p.get("type")
    if t == "text":
        out.add(_s(p.get("text", "")))
    elif t == "reasoning":
        out.add("[reasoning]")
        out.add(_s(p.get("text", "")))
        out.add("[/reasoning]")
    elif t == "tool_call":
        ident = f" (id {p['id']})" if p.get("id") else ""
        out.add(f"[tool call] {p.get('name') or '?'}{ident}: {_s(p.get('arguments') or '')}")
    elif t == "tool_result":
        bits = [b for b in (p.get("name"), f"id {p['id']}" if p.get("id") else None) if b]
        label = f" ({', '.join(bits)})" if bits else ""
        err = " [error]" if p.get("error") is True else ""
        out.add(f"[tool result]{label}{err}:")
        out.add(_s(p.get("content") or ""))
    elif t == "image":
        c = p.get("content")
        if isinstance(c, str) and c.startswith("data:"):
            where = f"inline data, {len(c)} characters"
        elif isinstance(c, str):
            where = c
        else:
            where = _s(p.get("text") or "no data")
        out.add(f"[image {p.get('name') or ''}] {where}".replace("[image ]", "[image]"))
    else:
        text = p.get("text")
        out.add(f"[{p.get('name') or t or 'other'}]" + (f" {_s(text)}" if text else ""))


def _render_request(out: _Out, conv: dict) -> None:
    system = conv.get("system")
    if system:
        out.add("")
        out.add("=== System ===")
        for i, s in enumerate(system if isinstance(system, list) else [system]):
            if i:
                out.add("---")
            out.add(_s(s))
    tools = conv.get("tools") or []
    if tools:
        out.add("")
        out.add(f"=== Tools ({len(tools)}) ===")
        for t in tools:
            if not isinstance(t, dict):
                continue
            desc = t.get("description")
            out.add(f"- {t.get('name') or '?'}" + (f": {_s(desc)}" if desc else ""))
            if t.get("parameters") is not None:
                params = _compact(t["parameters"])
                if len(params) > 4000:
                    params = params[:4000] + " …"
                out.add(f"    parameters: {params}")
    msgs = conv.get("messages") or []
    if msgs:
        out.add("")
        out.add(f"=== Messages ({len(msgs)}) ===")
        for i, m in enumerate(msgs):
            if out.full:
                break
            if not isinstance(m, dict):
                continue
            out.add(f"--- [{i + 1}] {m.get('role') or '?'} ---")
            for p in m.get("parts") or ():
                _render_part(out, p)


def _render_response(out: _Out, resp: dict) -> None:
    out.add("")
    out.add("=== Response ===")
    if resp.get("error"):
        out.add(f"Error: {_s(resp['error'])}")
    if resp.get("reasoning"):
        out.add("Reasoning:")
        out.add(_s(resp["reasoning"]))
    if resp.get("text") is not None:
        out.add("Answer:")
        out.add(_s(resp["text"]))
    calls = resp.get("tool_calls") or []
    if calls:
        out.add(f"Tool calls ({len(calls)}):")
        for c in calls:
            _render_part(out, c)
    if not (resp.get("text") or resp.get("reasoning") or calls or resp.get("error")):
        out.add("(no answer)")
    if resp.get("finish_reason"):
        out.add(f"Finish reason: {_s(resp['finish_reason'])}")
    if resp.get("usage"):
        out.add(f"Usage: {_compact(resp['usage'])}")
    ids = [f"{k}: {resp[k]}" for k in ("model", "id") if resp.get(k)]
    if ids:
        out.add("Response " + ", ".join(ids))


def render_text(conv: dict, max_chars: int = 200_000, *, response_first: bool = False) -> str:
    """A readable plain-text rendering of :func:`conversation`'s result, at most ``max_chars``
    characters (plus a line saying it was cut). ``response_first``: the response section before
    the request's (what a response body's view shows first). Never raises."""
    out = _Out(max_chars)
    try:
        head = [f"{k}: {conv[k]}" for k in ("api", "model") if conv.get(k)]
        out.add("LLM exchange" + (" — " + ", ".join(head) if head else ""))
        resp = conv.get("response")
        if response_first and isinstance(resp, dict):
            _render_response(out, resp)
            out.add("")
            out.add("=== Request ===")
            _render_request(out, conv)
        else:
            _render_request(out, conv)
            if isinstance(resp, dict):
                _render_response(out, resp)
        notes = conv.get("notes") or []
        if notes:
            out.add("")
            out.add("=== Notes ===")
            for n in notes:
                out.add(f"- {_s(n)}")
    except Exception as e:
        out.full = False
        out.add(f"(rendering stopped: {type(e).__name__})")
    return out.text()


__all__ = ["MAX_TEXT", "conversation", "render_text"]
