"""Chunk templates: the plain chunks of a stream, recognised by their bytes.

Most events of an OpenAI-compatible stream are the same chunk again: the same keys in the same
order, a few characters of new text in one string (``choices[0].delta.content``), and perhaps
a new ``created``, ``id`` or padding (OpenAI's ``obfuscation``) at the top level. Once one such
chunk has been parsed and read by the short path (``ResponseState.on_data``), its bytes become
a template: the same bytes, with a hole for the text and one for each top-level string or
number. A later event that fills the holes with plain JSON scalars parses to an object the short
path reads the same way, so its verdict (content when the text is not empty) is taken without
parsing it. Anything else (the finish or usage chunk, a ``\\n`` in the text, another key) is
parsed and read as before, and may become the next template.

Why that is sound: the learned event has no ``\\u`` escape, so every key in it is spelled out,
and a hole is only made where its key occurs exactly once in the event, so that occurrence is
the key itself. The short path reads only ``usage``, the presence of rare keys and the choices;
the holes are top-level scalars other than ``usage`` and the text, whose verdict is its
non-emptiness. A hole accepts only what JSON allows there (a string without quote, backslash or
control character, or a number of at most 17 digits and no exponent), and an event outside
ASCII must be valid UTF-8, so a matching event is valid JSON. Tested equal to the full reading
in tests/test_shortcuts.py.
"""

from __future__ import annotations

import functools
import re

MAX_LEARNED = 8  # templates learned per stream at most: some chunks are all different
_CACHE_SIZE = 64  # compiled templates kept, by their bytes outside the holes

_STRING_BODY = rb'[^"\\\x00-\x1f]*'
_STRING = re.compile(rb'"' + _STRING_BODY + rb'"')
_NUMBER = rb'-?(?:0|[1-9][0-9]{0,16})(?:\.[0-9]{1,17})?'
_NUMBER_RE = re.compile(_NUMBER + rb'(?![0-9.eE])')
_COLON = re.compile(rb'[ \t\r\n]*:[ \t\r\n]*')


class ChunkTemplate:
    """A compiled template; ``verdict`` is the short path's answer for a matching event,
    ``content_run`` the same for a whole batch of SSE events that are all content."""

    __slots__ = ("_match", "_run")

    def __init__(self, skeleton: tuple[bytes, ...]) -> None:
        self._match = _compile(skeleton).fullmatch
        run = _compile_run(skeleton)
        self._run = run.fullmatch if run is not None else None

    def verdict(self, data: bytes) -> bool | None:
        """Content or not when ``data`` fits the template; None when it must be parsed."""
        m = self._match(data)
        if m is None:
            return None
        if not data.isascii():
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                return None  # not JSON: the full reading says so
        return m.end(1) > m.start(1)

    def content_run(self, text: bytes) -> int:
        """The number of events in ``text`` when it is nothing but whole one-line SSE events
        (``data: <event>\\n\\n``) that all fit the template with some text, each a content
        event; 0 otherwise. One match over the batch instead of framing and matching each
        event; no event can hide in another, as a hole holds no newline."""
        run = self._run
        if run is None or run(text) is None:
            return 0
        if not text.isascii():
            try:
                text.decode("utf-8")  # whole events: valid as a batch iff each is
            except UnicodeDecodeError:
                return 0
        return text.count(b"\n\n")


def learn(data: bytes, obj: dict, key: bytes) -> ChunkTemplate | None:
    """The template of ``data`` (parsed: ``obj``, a plain chunk whose verdict is the string
    value of ``key``, the format's word: ``content`` or ``text``), or None when its bytes do
    not allow one."""
    if b"\\u" in data:
        return None
    text = _value_at(data, key, string=True)
    if text is None:
        return None
    holes = [(text[0], text[1], True)]  # (start, end, is the text)
    for name, value in obj.items():
        if name == "usage" or value.__class__ not in (str, int, float):
            continue
        at = _value_at(data, name.encode(), string=value.__class__ is str)
        if at is not None:
            holes.append((at[0], at[1], False))
    holes.sort()
    parts: list[bytes] = []
    pos = 0
    for start, end, is_text in holes:
        if start < pos:
            return None  # overlapping: not what it seemed
        parts.append(data[pos:start])
        parts.append(b"T" if is_text else (b"S" if data[start] == 0x22 else b"N"))
        pos = end
    parts.append(data[pos:])
    return ChunkTemplate(tuple(parts))


def _value_at(data: bytes, key: bytes, string: bool) -> tuple[int, int] | None:
    """Where the scalar value of ``key`` lies in ``data`` (the quotes of a string included),
    when ``"key"`` occurs exactly once and its value is what ``string`` says, plain."""
    quoted = b'"' + key + b'"'
    at = data.find(quoted)
    if at < 0 or data.find(quoted, at + 1) >= 0:
        return None
    colon = _COLON.match(data, at + len(quoted))
    if colon is None:
        return None
    m = (_STRING if string else _NUMBER_RE).match(data, colon.end())
    return (m.start(), m.end()) if m is not None else None


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _compile(skeleton: tuple[bytes, ...]) -> re.Pattern[bytes]:
    """The pattern of a template, by its bytes outside the holes (the same for every stream of
    a server): compiled once. The text is group 1."""
    return re.compile(_pattern(skeleton, b'"(' + _STRING_BODY + b')"'))


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _compile_run(skeleton: tuple[bytes, ...]) -> re.Pattern[bytes] | None:
    """One or more SSE events of the template with non-empty text, each on one ``data: ``
    line; None when the template's own bytes hold a line break (its event was multi-line)."""
    if any(b"\n" in part or b"\r" in part for part in skeleton[::2]):
        return None
    return re.compile(b"(?:data: " + _pattern(skeleton, b'"' + _STRING_BODY[:-1] + b'+"')
                      + b"\n\n)+")


def _pattern(skeleton: tuple[bytes, ...], text: bytes) -> bytes:
    out = []
    for i, part in enumerate(skeleton):
        if i % 2 == 0:
            out.append(re.escape(part))
        elif part == b"T":
            out.append(text)
        elif part == b"S":
            out.append(b'"' + _STRING_BODY + b'"')
        else:
            out.append(_NUMBER)
    return b"".join(out)
