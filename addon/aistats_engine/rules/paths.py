"""Attribute value paths, compiled once at configuration load and evaluated per request.

Higress reads ``value`` with tidwall/gjson; we take that syntax verbatim through gjson-py
(``choices.0.delta.content``, ``messages.@reverse.0.content``, ``#(...)`` / ``#(...)#`` queries,
``#`` counts, ``items.#.name``, escapes, wildcards, multipaths, literals). One tidwall leniency
gjson-py lacks is added: an unquoted query value is a string (``#(role==user)``). A path starting
with ``$`` is a JSONPath instead (jsonpath-ng's extended grammar, so filters work).

gjson-py re-parses its query on every ``get``; on a proxy's hot path that parse is most of the
cost, so :class:`CompiledPath` parses once and later only applies the parsed parts. That uses
gjson-py internals (``GJSONObj._parse`` gives the parts, ``GJSONObj._parse_part`` applies one;
evaluation state is ``_obj``, ``_query``, ``_custom_modifiers``, ``_dump_params``,
``_after_hash``, ``_after_query_all``). Works with gjson-py ``>=1.0,<2`` (1.0.0, 1.1.0 and
1.2.0 checked); ``tests/test_rules_paths.py`` compares the compiled evaluation with
``gjson.get`` over many queries and objects, so a change in those internals fails there.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from gjson import GJSONError, GJSONObj
from gjson._gjson import (
    ArrayQueryQueryPart,
    BaseQueryPart,
    ModifierQueryPart,
    MultipathsArrayQueryPart,
    MultipathsObjectQueryPart,
    NoResult,
)
from jsonpath_ng.ext import parse as _jsonpath_parse

_BUILTIN_MODIFIERS = frozenset(GJSONObj.builtin_modifiers())
_TRUTHINESS_TOKENS = frozenset({"true", "false", "null", "*"})


class PathError(ValueError):
    """A path that cannot be compiled. The message is one line saying what is wrong (``gjson:
    unknown modifier @x``), for the configuration error that names the path."""


class _Evaluator(GJSONObj):
    """One evaluation of pre-parsed gjson parts. A fresh instance per call (cheap: no
    ``__init__``), because gjson-py keeps per-evaluation state on the object: compiled paths
    stay safe to share between threads and flows."""

    def run(self, parts: list[BaseQueryPart], obj: Any) -> Any:
        for part in parts:
            obj = self._parse_part(part, obj)
        return obj


def _new_evaluator(query: str, obj: Any) -> _Evaluator:
    ev = _Evaluator.__new__(_Evaluator)
    ev._obj = obj
    ev._query = query
    ev._custom_modifiers = {}
    ev._dump_params = {"ensure_ascii": False}
    ev._after_hash = False
    ev._after_query_all = False
    return ev


class CompiledPath:
    """A parsed path: ``get(obj)`` gives the value, or None when it is absent or cannot be
    evaluated on that input (never raises)."""

    __slots__ = ("text", "_get")

    def __init__(self, text: str, get: Callable[[Any], Any]) -> None:
        self.text = text
        self._get = get

    def get(self, obj: Any) -> Any:
        try:
            return self._get(obj)
        except Exception:  # gjson-py's GJSONError, or anything odd input makes it raise
            return None

    def __repr__(self) -> str:
        return f"CompiledPath({self.text!r})"


def compile_path(text: str) -> CompiledPath:
    """Compile a gjson path or (starting with ``$``) a JSONPath; PathError when empty or
    unparsable, so a bad configuration fails at load, not per request."""
    if not isinstance(text, str) or not text:
        raise PathError("the path is empty")
    if text.startswith("$"):
        return _compile_jsonpath(text)
    return _compile_gjson(text)


# Plain dotted paths (keys and array indexes only: ``choices.0.delta.content``) are most of what
# configurations hold and run per stream event: walk them directly, as gjson would.
_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]+)*")


def _plain_walker(keys: tuple[str, ...]) -> Callable[[Any], Any]:
    steps = tuple((k, int(k) if k.isdigit() else None) for k in keys)

    def get(obj: Any) -> Any:
        for key, index in steps:
            cls = obj.__class__
            if cls is dict:
                obj = obj.get(key)
            elif cls is list and index is not None and index < len(obj):
                obj = obj[index]
            else:
                return None
        return obj

    return get


def _compile_gjson(text: str) -> CompiledPath:
    if _PLAIN.fullmatch(text):
        return CompiledPath(text, _plain_walker(tuple(text.split("."))))
    parser = _new_evaluator(text, None)
    try:
        parts = parser._parse(start=0, end=len(text) - 1)
    except GJSONError as e:
        raise PathError(f"gjson: {_gjson_reason(e)}") from None
    except Exception as e:  # a gjson-py parser bug must still be a configuration error
        raise PathError(f"gjson: {type(e).__name__} while parsing") from None
    if not parts:
        raise PathError("gjson: nothing to read")
    problem = _check_parts(parts)
    if problem:
        raise PathError(f"gjson: {problem}")

    def get(obj: Any) -> Any:
        value = _new_evaluator(text, obj).run(parts, obj)
        return None if isinstance(value, NoResult) else value

    return CompiledPath(text, get)


def _gjson_reason(e: GJSONError) -> str:
    """gjson-py's message is multi-line (query and caret); keep its first line and the position."""
    first = (e.args[0] if e.args else str(e)).splitlines()[0].rstrip(".")
    pos = getattr(e, "position", None)
    reason = first[:1].lower() + first[1:]
    return f"{reason} (at {pos})" if pos is not None else reason


def _check_parts(parts: list[Any]) -> str | None:
    """What gjson-py only notices while evaluating, but a configuration can be told at load:
    unknown modifiers and bad truthiness tokens. Also adapts unquoted query values."""
    for part in parts:
        if isinstance(part, ModifierQueryPart):
            if part.name not in _BUILTIN_MODIFIERS:
                return f"unknown modifier @{part.name}"
        elif isinstance(part, ArrayQueryQueryPart):
            problem = _check_query(part)
            if problem:
                return problem
        elif isinstance(part, MultipathsObjectQueryPart):
            for item in part.parts:
                problem = _check_parts(item.values)
                if problem:
                    return problem
        elif isinstance(part, MultipathsArrayQueryPart):
            for values in part.parts:
                problem = _check_parts(values)
                if problem:
                    return problem
    return None


def _check_query(part: ArrayQueryQueryPart) -> str | None:
    value = part.value
    if isinstance(value, ArrayQueryQueryPart):
        return _check_query(value)
    if not part.operator:
        return None
    if part.operator in ("==~", "!=~"):
        if value not in _TRUTHINESS_TOKENS:
            return f"query value {value!r} after {part.operator} (one of true, false, null, *)"
        return None
    try:
        json.loads(value, strict=False)
    except ValueError:
        # tidwall/gjson compares an unquoted value as a string (``#(role==user)``); gjson-py
        # wants JSON there, so it gets the JSON string.
        part.value = json.dumps(value)
    return None


def _compile_jsonpath(text: str) -> CompiledPath:
    try:
        expr = _jsonpath_parse(text)
    except Exception as e:  # jsonpath-ng raises its lexer/parser errors and plain Exception
        reason = " ".join(str(e).split()).rstrip(".!") or type(e).__name__
        reason = reason[:1].lower() + reason[1:]
        raise PathError(f"JSONPath: {reason}") from None
    find = expr.find

    def get(obj: Any) -> Any:
        matches = find(obj)
        if not matches:
            return None
        if len(matches) == 1:
            return matches[0].value
        return [m.value for m in matches]

    return CompiledPath(text, get)
