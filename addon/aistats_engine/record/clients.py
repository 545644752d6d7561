"""Recognise the client program from its User-Agent (record ``client``)."""

from __future__ import annotations

import re

# First match wins: agents before the SDKs they are built on.
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p, re.IGNORECASE), name)
    for p, name in (
        (r"^claude-cli/|claude-code", "claude-code"),
        (r"^codex_cli_rs|^codex[/ ]", "codex"),
        (r"GeminiCLI|gemini-cli", "gemini-cli"),
        (r"opencode", "opencode"),
        (r"aider", "aider"),
        (r"litellm", "litellm"),
        (r"langchain", "langchain"),
        (r"^OpenAI/Python", "openai-python"),
        (r"^OpenAI/JS", "openai-node"),
        (r"^Anthropic/Python", "anthropic-python"),
        (r"^Anthropic/JS", "anthropic-node"),
        (r"google-genai-sdk|google-api-python-client|genai-py", "google-genai"),
        (r"^ollama-python|^ollama-js", "ollama-client"),
        (r"^python-httpx/", "httpx"),
        (r"^python-requests/", "requests"),
        (r"^aiohttp/", "aiohttp"),
        (r"^curl/", "curl"),
    )
)


def client_name(user_agent: str | None) -> str | None:
    if not user_agent:
        return None
    name = _known.get(user_agent, _UNSEEN)
    if name is _UNSEEN:
        name = next((n for pattern, n in _PATTERNS if pattern.search(user_agent)), None)
        if len(_known) >= _MAX_KNOWN:
            _known.clear()
        _known[user_agent] = name
    return name  # type: ignore[return-value]


# A client sends the same User-Agent on every request: the patterns run once per distinct one.
_UNSEEN = object()
_MAX_KNOWN = 1024
_known: dict[str, str | None] = {}
