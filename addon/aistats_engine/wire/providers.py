"""Which LLM API a request speaks: provider (OTel ``gen_ai.provider.name``), wire format
(``api``) and operation (OTel ``gen_ai.operation.name``), from host, path and body.

A request whose path matches no known API gets no record: the proxy carries other traffic too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote


@dataclass(frozen=True, slots=True)
class ApiMatch:
    api: str
    operation: str
    provider: str | None  # from the path alone; None → decide by host/body
    model_from_path: str | None = None
    stream_from_path: bool = False


# Host suffix → provider. Checked before path/body hints.
_HOSTS: tuple[tuple[str, str], ...] = (
    ("api.openai.com", "openai"),
    ("openai.azure.com", "azure.ai.openai"),
    ("services.ai.azure.com", "azure.ai.inference"),
    ("api.anthropic.com", "anthropic"),
    ("generativelanguage.googleapis.com", "gcp.gemini"),
    ("aiplatform.googleapis.com", "gcp.vertex_ai"),
    ("amazonaws.com", "aws.bedrock"),
    ("api.deepseek.com", "deepseek"),
    ("api.groq.com", "groq"),
    ("api.mistral.ai", "mistral_ai"),
    ("api.x.ai", "x_ai"),
    ("api.perplexity.ai", "perplexity"),
    ("api.cohere.com", "cohere"),
    ("api.cohere.ai", "cohere"),
    ("api.moonshot.ai", "moonshot_ai"),
    ("openrouter.ai", "openrouter"),
    ("dashscope.aliyuncs.com", "dashscope"),
)

_GEMINI = re.compile(r"/models/([^/:]+):(generateContent|streamGenerateContent|countTokens)$")
_BEDROCK = re.compile(r"/model/([^/]+)/(converse|converse-stream|invoke|invoke-with-response-stream)$")
_UPSTREAM = re.compile(r"^/upstream/([^/]+)(/.*)$")  # llama-swap style /upstream/<model>/<path>


def _suffix_match(path: str) -> ApiMatch | None:
    p = path.rstrip("/")
    if p.endswith("/chat/completions"):
        return ApiMatch("chat_completions", "chat", None)
    if p.endswith("/messages/count_tokens"):
        return ApiMatch("count_tokens", "count_tokens", "anthropic")
    if p.endswith("/v1/messages") or p == "/messages":
        return ApiMatch("messages", "chat", "anthropic")
    if p.endswith("/responses"):
        return ApiMatch("responses", "chat", None)
    if p.endswith("/embeddings") or p == "/embedding":
        return ApiMatch("embeddings", "embeddings", None)
    if p.endswith(("/rerank", "/reranking")):
        return ApiMatch("rerank", "rerank", None)
    if p.endswith("/infill"):
        return ApiMatch("infill", "text_completion", "llama.cpp")
    if p.endswith("/api/chat"):
        return ApiMatch("ollama_chat", "chat", "ollama")
    if p.endswith("/api/generate"):
        return ApiMatch("ollama_generate", "text_completion", "ollama")
    if p.endswith(("/api/embed", "/api/embeddings")):
        return ApiMatch("ollama_embed", "embeddings", "ollama")
    if p.endswith("/completions"):
        return ApiMatch("completions", "text_completion", None)
    if p == "/completion":
        return ApiMatch("completions", "text_completion", "llama.cpp")
    m = _GEMINI.search(p)
    if m:
        kind = m.group(2)
        if kind == "countTokens":
            return ApiMatch("count_tokens", "count_tokens", None, unquote(m.group(1)))
        return ApiMatch("generate_content", "generate_content", None, unquote(m.group(1)),
                        stream_from_path=kind == "streamGenerateContent")
    m = _BEDROCK.search(p)
    if m:
        kind = m.group(2)
        api = "converse" if kind.startswith("converse") else "invoke"
        return ApiMatch(api, "chat", "aws.bedrock", unquote(m.group(1)),
                        stream_from_path=kind in ("converse-stream", "invoke-with-response-stream"))
    return None


def match_api(method: str, path: str) -> ApiMatch | None:
    """The API a request path speaks, or None when it is not LLM traffic we read."""
    if method.upper() != "POST":
        return None
    path = path.split("?", 1)[0]
    m = _UPSTREAM.match(path)
    if m:
        inner = _suffix_match(m.group(2))
        if inner is None:
            return None
        return ApiMatch(inner.api, inner.operation, inner.provider,
                        inner.model_from_path or unquote(m.group(1)), inner.stream_from_path)
    return _suffix_match(path)


def provider_from_host(host: str) -> str | None:
    host = host.lower().rstrip(".")
    for suffix, provider in _HOSTS:
        if host == suffix or host.endswith(("." + suffix, "-" + suffix)):  # us-central1-aiplatform
            return provider
    return None


def decide_provider(match: ApiMatch, host: str, port: int, response_hints: set[str]) -> str | None:
    """Host first, then the path, then what the response body showed (llama.cpp ``timings``,
    vLLM ``metrics``); OpenAI-compatible wire formats on an unknown host count as ``openai``."""
    by_host = provider_from_host(host)
    if by_host:
        return by_host
    if "llama.cpp" in response_hints:
        return "llama.cpp"
    if "vllm" in response_hints:
        return "vllm"
    if match.provider:
        return match.provider
    if port == 11434:
        return "ollama"
    if match.api == "generate_content":
        return "gcp.gemini"
    if match.api in ("chat_completions", "completions", "responses", "embeddings"):
        return "openai"
    return None
