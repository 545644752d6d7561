"""Secrets stay secret: credential headers, ``key=`` query parameters, and any value they carried
wherever it reappears (an upstream echoing the key in its error message), plus well-known key
shapes in free text.

Every output reads the record, so redacting the record's text fields once (``Redactor.record``)
covers the log, metrics labels, the summary line and later spans and UI; headers that outputs
show are redacted as they are decoded (``outputs/bus.first_values``), URLs with ``query``.
"""

from __future__ import annotations

import base64
import binascii
import operator
import re
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import parse_qsl

import orjson

from .record import Record

REDACTED = "[REDACTED]"
SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "x-api-key",
                            "x-goog-api-key", "api-key", "cookie", "set-cookie"})
SECRET_PARAMS = frozenset({"key", "api_key", "api-key", "apikey", "access_token"})
SECRET_HEADER_BYTES = frozenset(n.encode() for n in SECRET_HEADERS)  # as mitmproxy holds names
MIN_SECRET = 8  # shorter values are not searched for in text (they would match by chance)

# Key shapes worth catching even when the request did not carry them (a key in a prompt
# echoed back, another tenant's key in an error): OpenAI/Anthropic ``sk-…``, Google ``AIza…``,
# AWS access key ids, Groq, xAI, Hugging Face, GitHub tokens, and bearer tokens.
# (The lookahead names every alternative's first letter: most positions fail there, fast.)
_SHAPES = re.compile(
    r"(?=[sAgxhBb])(?:\bsk-[A-Za-z0-9_\-]{16,}|\bAIza[0-9A-Za-z_\-]{30,}"
    r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b|\bgsk_[A-Za-z0-9]{20,}|\bxai-[A-Za-z0-9]{20,}"
    r"|\bhf_[A-Za-z0-9]{20,}"
    r"|\bgh[pousr]_[A-Za-z0-9]{30,}|\b[Bb]earer\s+[A-Za-z0-9._~+/\-]{12,}=*)")

# Record fields that carry text from the traffic.
_TEXT_FIELDS = ("path", "error", "parse_error", "user_agent", "session_id", "consumer", "model",
                "response_model", "chat_id", "finish_reason", "error_type")
_text_values = operator.attrgetter(*_TEXT_FIELDS)


def shapes(text: str) -> str:
    """``text`` with well-known key shapes replaced."""
    return _SHAPES.sub(REDACTED, text)


def secrets_of(headers: Iterable[tuple[str, str]], query: str) -> tuple[str, ...]:
    """Every secret value a request carried: credential header values (whole, and the token
    after the scheme; Basic credentials decoded too), cookie values, ``key=``-style parameters."""
    found: set[str] = set()
    for name, value in headers:
        name = name.lower()
        if name not in SECRET_HEADERS or not value:
            continue
        found.add(value)
        if name in ("cookie", "set-cookie"):
            for part in value.split(";"):
                found.add(part.partition("=")[2].strip())
            continue
        scheme, _, token = value.partition(" ")
        if token:
            found.add(token.strip())
            if scheme.lower() == "basic":
                try:
                    user_pass = base64.b64decode(token.strip(), validate=True).decode()
                except (binascii.Error, UnicodeDecodeError):
                    continue
                found.update((user_pass, user_pass.partition(":")[2]))
    if query:
        for k, v in parse_qsl(query, keep_blank_values=False):
            if k.lower() in SECRET_PARAMS:
                found.add(v)
    return tuple(sorted((s for s in found if len(s) >= MIN_SECRET), key=len, reverse=True))


def credential_pairs(fields: Iterable[tuple[bytes, bytes]],
                     names: frozenset[bytes] = SECRET_HEADER_BYTES) -> list[tuple[str, str]]:
    """The raw header fields of credential headers (``names``, lower-case), decoded for
    ``secrets_of``: the other headers carry no secret, and decoding them would be wasted."""
    return [(k.decode("latin-1"), v.decode("utf-8", "replace")) for k, v in fields
            if k.lower() in names]


def query(text: str) -> str:
    """A query string with ``key=``-style parameter values replaced (order kept)."""
    if not text:
        return text
    out = []
    for part in text.split("&"):
        k, eq, _ = part.partition("=")
        out.append(f"{k}={REDACTED}" if eq and k.lower() in SECRET_PARAMS else part)
    return "&".join(out)


class Redactor:
    """Replaces the secrets of one request, and key shapes, in any text."""

    __slots__ = ("_secrets",)

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets = tuple(secrets)

    def __call__(self, text: str) -> str:
        text = self.exact(text)
        return _SHAPES.sub(REDACTED, text) if text else text

    def exact(self, text: str) -> str:
        """Only the request's own secrets (captured bodies get the same, on their bytes:
        ``captures._scrub``; scanning them for key shapes would cost more than the rest)."""
        for s in self._secrets:
            if s in text:
                text = text.replace(s, REDACTED)
        return text

    def many(self, values: Sequence[str | None]) -> Sequence[str | None]:
        """Each value redacted (None and "" kept); ``values`` itself when none holds a secret.
        They are searched together first: most hold none, and one pass over their joined text
        costs less than one each (a match in a value is a match in the joined text, as the
        separator is no word, space or key character)."""
        if not self._found("\x00".join([v for v in values if v])):
            return values
        return [self(v) if v else v for v in values]

    def _found(self, text: str) -> bool:
        return any(s in text for s in self._secrets) or _SHAPES.search(text) is not None

    def value(self, v: Any) -> Any:
        """A JSON value with secrets redacted in every string inside it."""
        if isinstance(v, str):
            return self(v)
        if v is None or isinstance(v, (bool, int, float)):
            return v
        text = orjson.dumps(v).decode()
        clean = self(text)
        if clean == text:
            return v
        try:
            return orjson.loads(clean)
        except orjson.JSONDecodeError:
            return clean

    def record(self, rec: Record) -> None:
        """Redact the record's text fields and attribute values in place."""
        values = _text_values(rec)
        clean = self.many(values)
        if clean is not values:
            for name, v in zip(_TEXT_FIELDS, clean):
                setattr(rec, name, v)
        for d in (rec.attributes, rec.log_fields, rec.span_attributes,
                  rec.span_content_attributes):
            for k, v in d.items():
                d[k] = self.value(v)
