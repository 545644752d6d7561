"""Gemini ``generateContent`` / ``streamGenerateContent`` (Google AI and Vertex AI),
``countTokens`` and embeddings (``embedContent``, ``batchEmbedContents``, Vertex ``predict`` on a
Google embedding model). The model is in the URL; ``usageMetadata`` is cumulative on stream chunks
and the last one wins whole; a candidate's ``finishReason`` ends the stream."""

from __future__ import annotations

import re
from urllib.parse import unquote

from ..format import CountingFormat, Match, WireFormat
from ..reader import ResponseState, finish_reason
from ..usage import Usage, gemini_embed_usage, vertex_predict_usage

_PATH = re.compile(r"/models/([^/:]+):(generateContent|streamGenerateContent|countTokens)$")
_EMBED = re.compile(r"/models/([^/:]+):(embedContent|batchEmbedContents)$")
_PREDICT = re.compile(r"/publishers/google/models/([^/:]+):predict$")


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


class CountTokens(CountingFormat):
    """``{"totalTokens": N}``: ``counted_tokens``, not usage."""

    fallback_provider = "gcp.gemini"

    def match(self, path: str) -> Match | None:
        m = _PATH.search(path)
        if m is None or m.group(2) != "countTokens":
            return None
        return Match(self, unquote(m.group(1)))


class EmbedContent(WireFormat):
    """``embedContent`` / ``batchEmbedContents``: input tokens from ``usageMetadata`` when the
    service reports it (Vertex), else the embeddings' ``statistics.tokenCount``; no output."""

    api = "embed_content"
    operation = "embeddings"
    fallback_provider = "gcp.gemini"

    def match(self, path: str) -> Match | None:
        m = _EMBED.search(path)
        return Match(self, unquote(m.group(1))) if m is not None else None

    def read_usage(self, obj: dict) -> Usage | None:
        return gemini_embed_usage(obj)


class VertexPredict(WireFormat):
    """Vertex AI ``predict`` on a Google text/multimodal embedding model
    (``text-embedding-005``, ``gemini-embedding-001``, ``multimodalembedding@001``, …):
    input tokens are the sum of ``predictions[].embeddings.statistics.token_count``. A
    ``predict`` on another model (Imagen, …) is not an embedding call and is not matched."""

    api = "predict"
    operation = "embeddings"
    fallback_provider = "gcp.vertex_ai"

    def match(self, path: str) -> Match | None:
        m = _PREDICT.search(path)
        if m is None:
            return None
        model = unquote(m.group(1))
        return Match(self, model) if "embedding" in model.lower() else None

    def read_usage(self, obj: dict) -> Usage | None:
        return vertex_predict_usage(obj)


GENERATE_CONTENT = GenerateContent()
COUNT_TOKENS = CountTokens()
EMBED_CONTENT = EmbedContent()
VERTEX_PREDICT = VertexPredict()
