"""OpenAI-compatible chat completions, completions, embeddings and rerank (also what llama.cpp,
vLLM, Groq, DeepSeek, OpenRouter and most gateways speak), and llama.cpp's own ``/completion``
and ``/infill``.

Streams are SSE chunks ending with ``data: [DONE]``; usage is on the final chunk when the client
asked ``stream_options.include_usage`` (Groq: inside ``x_groq`` when not at the top level);
llama.cpp adds ``timings``, vLLM ``metrics``. llama.cpp's native ``/completion`` names its stop
``stop_type`` (read as the finish reason).
"""

from __future__ import annotations

from ..format import WireFormat
from ..reader import ResponseState

# Keys that send a chat event down the full reading (usage, speeds, errors, other formats).
_RARE_KEYS = frozenset({
    "timings", "metrics", "error", "type", "response", "message", "usageMetadata",
    "prompt_eval_count", "eval_count", "eval_duration", "prompt_eval_duration",
    "total_duration", "stop_reason", "done_reason", "stopReason", "content", "stop",
    "x_groq", "stop_type",
})


def choice_has_content(c: dict) -> bool:
    """A chat/completions choice with generated text, reasoning or a tool-call delta."""
    d = c.get("delta")
    if isinstance(d, dict) and (d.get("content") or d.get("reasoning_content") or d.get("reasoning")
                                or d.get("tool_calls") or d.get("function_call")
                                or d.get("refusal")):
        return True
    return bool(c.get("text"))


def _short(obj: dict) -> bool | None:
    if obj.get("usage") or not _RARE_KEYS.isdisjoint(obj):
        return None
    choices = obj.get("choices")
    if choices.__class__ is not list:
        return None
    content = False
    for c in choices:
        if c.__class__ is not dict or c.get("finish_reason") is not None:
            return None
        if choice_has_content(c):
            content = True
    return content


_OTHER_CONTENT = ("reasoning_content", "reasoning", "tool_calls", "function_call", "refusal")


def _template_key(obj: dict) -> bytes | None:
    """One choice whose content verdict is its delta's ``content`` (or a completion's
    ``text``) alone: the key a chunk template may vary (wire/templates.py)."""
    choices = obj.get("choices")
    if choices.__class__ is not list or len(choices) != 1:
        return None
    c = choices[0]
    d = c.get("delta")
    if d.__class__ is dict:
        if c.get("text") or any(d.get(k) for k in _OTHER_CONTENT):
            return None
        return b"content" if d.get("content").__class__ is str else None
    return b"text" if d is None and c.get("text").__class__ is str else None


class ChatCompletions(WireFormat):
    api = "chat_completions"
    operation = "chat"
    fallback_provider = "openai"
    suffixes = ("/chat/completions",)
    short = staticmethod(_short)
    template_key = staticmethod(_template_key)

    def event(self, state: ResponseState, name: str | None, obj: dict) -> bool:
        state.common(obj)
        choices = obj.get("choices")
        if isinstance(choices, list):
            return any(isinstance(c, dict) and choice_has_content(c) for c in choices)
        if obj.get("stop") is True:  # llama.cpp native streams end with "stop": true
            state.complete = True
        content = obj.get("content")  # llama.cpp /completion and /infill
        return isinstance(content, str) and bool(content)


class Completions(ChatCompletions):
    api = "completions"
    operation = "text_completion"
    suffixes = ("/completions",)


class LlamaCppCompletion(Completions):
    """llama.cpp's native ``/completion``."""

    provider = "llama.cpp"
    fallback_provider = None
    suffixes = ()
    exact = ("/completion",)


class Infill(ChatCompletions):
    api = "infill"
    operation = "text_completion"
    provider = "llama.cpp"
    fallback_provider = None
    suffixes = ("/infill",)


class Embeddings(WireFormat):
    api = "embeddings"
    operation = "embeddings"
    fallback_provider = "openai"
    suffixes = ("/embeddings",)
    exact = ("/embedding",)  # llama.cpp


class Rerank(WireFormat):
    api = "rerank"
    operation = "rerank"
    suffixes = ("/rerank", "/reranking")


CHAT_COMPLETIONS = ChatCompletions()
COMPLETIONS = Completions()
LLAMACPP_COMPLETION = LlamaCppCompletion()
INFILL = Infill()
EMBEDDINGS = Embeddings()
RERANK = Rerank()
