"""The registry of wire formats, in matching order (a more specific path first).

``match_api`` is the only entry point the rest of aistats uses to tell LLM traffic from other
traffic; a format missing here is not read at all, so this list is the one place to add one.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

from ..format import Match, WireFormat
from . import anthropic, bedrock, gemini, generic, ollama, openai, responses

FORMATS: tuple[WireFormat, ...] = (
    openai.CHAT_COMPLETIONS,
    anthropic.COUNT_TOKENS,
    anthropic.MESSAGES,
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
    bedrock.CONVERSE,
    bedrock.INVOKE,
)
_BY_API = {}
for _f in FORMATS:
    _BY_API.setdefault(_f.api, _f)

_UPSTREAM = re.compile(r"^/upstream/([^/]+)(/.*)$")  # llama-swap: /upstream/<model>/<path>


def by_api(api: str) -> WireFormat:
    """The (first registered) format with this ``api`` name; KeyError when there is none."""
    return _BY_API[api]


def _match_path(path: str) -> Match | None:
    p = path.rstrip("/")
    for fmt in FORMATS:
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
    """The format a request speaks, or None when it is not LLM traffic we read."""
    if method.upper() != "POST":
        return None
    path = path.split("?", 1)[0]
    m = _UPSTREAM.match(path)
    if m:
        inner = _match_path(m.group(2))
        return inner.with_model(unquote(m.group(1))) if inner is not None else None
    return _match_path(path)
