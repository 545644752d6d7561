"""Gemini ``generateContent`` / ``streamGenerateContent`` (Google AI and Vertex AI) and
``countTokens``. The model is in the URL; ``usageMetadata`` is cumulative on stream chunks; a
candidate's ``finishReason`` ends the stream."""

from __future__ import annotations

import re
from urllib.parse import unquote

from ..format import Match, WireFormat
from ..reader import ResponseState, finish_reason

_PATH = re.compile(r"/models/([^/:]+):(generateContent|streamGenerateContent|countTokens)$")


def _content(obj: dict) -> bool:
    cands = obj.get("candidates")
    if not isinstance(cands, list):
        return False
    for c in cands:
        content = c.get("content") if isinstance(c, dict) else None
        parts = content.get("parts") if isinstance(content, dict) else None
        if isinstance(parts, list):
            for p in parts:
                if isinstance(p, dict) and (p.get("text") or p.get("functionCall")):
                    return True
    return False


class GenerateContent(WireFormat):
    api = "generate_content"
    operation = "generate_content"
    fallback_provider = "gcp.gemini"

    def match(self, path: str) -> Match | None:
        m = _PATH.search(path)
        if m is None or m.group(2) == "countTokens":
            return None
        return Match(self, unquote(m.group(1)), m.group(2) == "streamGenerateContent")

    def event(self, state: ResponseState, name: str | None, obj: dict) -> bool:
        state.common(obj)
        if finish_reason(obj):
            state.complete = True
        return _content(obj)


class CountTokens(WireFormat):
    api = "count_tokens"
    operation = "count_tokens"

    def match(self, path: str) -> Match | None:
        m = _PATH.search(path)
        if m is None or m.group(2) != "countTokens":
            return None
        return Match(self, unquote(m.group(1)))


GENERATE_CONTENT = GenerateContent()
COUNT_TOKENS = CountTokens()
