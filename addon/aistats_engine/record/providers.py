"""Which provider a request went to: OTel ``gen_ai.provider.name``, from the upstream host,
else what the response body revealed (llama.cpp ``timings``, vLLM ``metrics``), else what the
path implies, else the wire format's fallback (``openai`` for OpenAI's formats).
"""

from __future__ import annotations

from ..wire.format import Match

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


def provider_from_host(host: str) -> str | None:
    host = host.lower().rstrip(".")
    for suffix, provider in _HOSTS:
        if host == suffix or host.endswith(("." + suffix, "-" + suffix)):  # us-central1-aiplatform
            return provider
    return None


def decide_provider(match: Match, host: str, port: int, response_hints: set[str]) -> str | None:
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
    return match.fmt.fallback_provider
