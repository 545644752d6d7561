"""Ollama's native API: ``/api/chat``, ``/api/generate`` (NDJSON streams; the ``done: true``
line carries counts and durations) and ``/api/embed``."""

from __future__ import annotations

from ..format import WireFormat
from ..reader import ResponseState


class Chat(WireFormat):
    api = "ollama_chat"
    operation = "chat"
    provider = "ollama"
    suffixes = ("/api/chat",)

    def event(self, state: ResponseState, name: str | None, obj: dict) -> bool:
        state.common(obj)
        if obj.get("done") is True:
            state.complete = True
        m = obj.get("message")
        if isinstance(m, dict) and (m.get("content") or m.get("thinking") or m.get("tool_calls")):
            return True
        return bool(obj.get("response") or obj.get("thinking"))


class Generate(Chat):
    api = "ollama_generate"
    operation = "text_completion"
    suffixes = ("/api/generate",)


class Embed(WireFormat):
    api = "ollama_embed"
    operation = "embeddings"
    provider = "ollama"
    suffixes = ("/api/embed", "/api/embeddings")


CHAT = Chat()
GENERATE = Generate()
EMBED = Embed()
