"""The registry of wire formats, in matching order (a more specific path first).

``match_api`` is the only entry point the rest of aistats uses to tell LLM traffic from other
traffic; a format missing here is not read at all, so this list is the one place to add one.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

from ..format import Match, WireFormat
from . import (anthropic, audio, bedrock, cohere, gemini, generic, images, ollama, openai,
               responses)

FORMATS: tuple[WireFormat, ...] = (
    openai.CHAT_COMPLETIONS,
    anthropic.COUNT_TOKENS,
    anthropic.MESSAGES,
    responses.INPUT_TOKENS,
    responses.COMPACT,
    responses.CANCEL,
    responses.RETRIEVE,  # GET
    responses.RESPONSES,
    openai.EMBEDDINGS,
    openai.RERANK,
    openai.INFILL,
    ollama.CHAT,
    ollama.GENERATE,
    ollama.EMBED,
    openai.COMPLETIONS,
    openai.LLAMACPP_COMPLETION,
    gemini.GENERATE_CONTENT,
    gemini.COUNT_TOKENS,
    gemini.EMBED_CONTENT,
    gemini.VERTEX_PREDICT,
    bedrock.CONVERSE,
    bedrock.INVOKE,
    bedrock.COUNT_TOKENS,
    cohere.CHAT,
    cohere.EMBED,
    audio.SPEECH,
    audio.TRANSCRIPTIONS,
    audio.TRANSLATIONS,
    images.GENERATIONS,
    images.EDITS,
    images.SD_TXT2IMG,
    images.SD_IMG2IMG,
)
_BY_API = {}
for _f in FORMATS:
    _BY_API.setdefault(_f.api, _f)
# The formats each HTTP method can speak, in matching order (most traffic is GET: few formats).
_METHODS = sorted({m for f in FORMATS for m in f.methods})
_BY_METHOD = {m: tuple(f for f in FORMATS if m in f.methods) for m in _METHODS}

_UPSTREAM = re.compile(r"^/upstream/([^/]+)(/.*)$")  # llama-swap: /upstream/<model>/<path>


def by_api(api: str) -> WireFormat:
    """The (first registered) format with this ``api`` name; KeyError when there is none."""
    return _BY_API[api]


def _match_path(formats: tuple[WireFormat, ...], path: str) -> Match | None:
    p = path.rstrip("/")
    for fmt in formats:
        m = fmt.match(p)
        if m is not None:
            return m
    return None


def match_configured(method: str, path: str, suffixes: tuple[str, ...]) -> Match | None:
    """A path the user's configuration names (Higress ``enable_path_suffixes``; ``()`` = every
    path): the format aistats knows for it, else the generic reading. Paths it does not name
    are not observed, known or not."""
    bare = path.split("?", 1)[0]
    if suffixes and not bare.endswith(suffixes):
        return None
    if method.upper() in ("CONNECT", "OPTIONS", "HEAD"):
        return None
    return match_api(method, path) or Match(generic.GENERIC)


def match_api(method: str, path: str) -> Match | None:
    """The format a request speaks (its method and path), or None when it is not LLM traffic
    we read. Formats are POST unless they say otherwise (``WireFormat.methods``: the Responses
    poll and stream resume are GET)."""
    formats = _BY_METHOD.get(method.upper())
    if formats is None:
        return None
    path = path.split("?", 1)[0]
    m = _UPSTREAM.match(path)
    if m:
        inner = _match_path(formats, m.group(2))
        return inner.with_model(unquote(m.group(1))) if inner is not None else None
    return _match_path(formats, path)
