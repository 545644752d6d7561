"""The ``error`` text of a record: the provider's own message, else the HTTP status line."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

MAX_ERROR_BYTES = 500
# What is kept of a provider's message before redaction: far more than the record's cut, so a
# secret straddling this first cut is cut away again by the second.
MAX_MESSAGE_BYTES = 64 << 10


def clip(text: str, limit: int = MAX_ERROR_BYTES) -> str:
    """Cut to ``limit`` UTF-8 bytes plus ``...`` (never splitting a character)."""
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return text
    return raw[:limit].decode("utf-8", "ignore") + "..."


def message_from(obj: Any) -> str | None:
    """First non-empty string among ``error.message``, ``error``, ``message``, ``detail``; cut
    only loosely here: the record redacts secrets first, then cuts to ``MAX_ERROR_BYTES`` (a
    key across that cut would otherwise leak its first half)."""
    if not isinstance(obj, dict):
        return None
    err = obj.get("error")
    candidates = (err.get("message") if isinstance(err, dict) else None, err,
                  obj.get("message"), obj.get("detail"))
    for c in candidates:
        if isinstance(c, str) and c.strip():
            return clip(c.strip(), MAX_MESSAGE_BYTES)
    return None


def type_from(obj: Any) -> str | None:
    """The provider's error type/code inside an error object (for stream error events)."""
    if not isinstance(obj, dict):
        return None
    err = obj.get("error")
    if isinstance(err, dict):
        for key in ("type", "code", "status"):
            v = err.get(key)
            if isinstance(v, (str, int)) and not isinstance(v, bool) and str(v):
                return str(v)
    return None


def status_text(code: int) -> str:
    """``"<code> <reason phrase>"``, or ``"HTTP <code>"`` for a code without a standard phrase."""
    try:
        return f"{code} {HTTPStatus(code).phrase}"
    except ValueError:
        return f"HTTP {code}"
