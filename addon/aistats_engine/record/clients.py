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
    for pattern, name in _PATTERNS:
        if pattern.search(user_agent):
            return name
    return None
