"""Query parameters of the JSON API, checked before anything reaches the store.

Every bad value is refused with one line that names the parameter, the value as given (cut to
80 characters, control characters escaped) and the form expected, e.g.::

    bad parameter limit="0": expected an integer from 1 to 1000

An unknown parameter is refused too (a typo such as ``modle=`` would otherwise silently show
everything). ``token`` (the API token, see server.py) and ``_`` (a cache buster) are accepted
everywhere and never echoed.

Nothing here knows the store: filters come out as the keyword arguments of ``Filters``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

MAX_LIMIT = 1000
DEFAULT_LIMIT = 25
MAX_EXPORT_ROWS = 100_000

STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx", "none")
"""Status classes a filter may name; ``none``: no response arrived."""

ORDERS = ("asc", "desc")

# accepted everywhere, never echoed back, never passed on
ALWAYS_ALLOWED = frozenset({"token", "_"})

FILTER_PARAMS = ("model", "provider", "status", "session", "consumer", "client",
                 "start", "end", "min_id", "max_id")
PAGE_PARAMS = ("limit", "page", "sort", "order")
EXPORT_PARAMS = ("limit", "sort", "order")

_REPEATABLE = frozenset({"model", "provider", "status"})
_MAX_VALUES = 100  # a repeatable parameter given more often than this is refused
_MAX_TEXT = 1000  # characters in one value

_OFFSET_SPACE = re.compile(r"^(.*\d)[ ](\d\d:?\d\d)$")  # a "+" that arrived as a space


class ParamError(ValueError):
    """A bad query parameter: ``str(e)`` is the one-line message for the client."""


@dataclass(slots=True)
class Query:
    """A checked request: ``filters`` are the keyword arguments of the store's ``Filters``."""

    filters: dict[str, Any] = field(default_factory=dict)
    sort: str = "id"
    order: str = "desc"
    page: int = 1
    limit: int = DEFAULT_LIMIT


def show(value: str) -> str:
    """A value as it may appear in a one-line message: quoted, escaped, cut."""
    cut = value if len(value) <= 80 else value[:77] + "..."
    return '"' + cut.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'


def _bad(name: str, value: str, expected: str) -> ParamError:
    return ParamError(f"bad parameter {name}={show(value)}: expected {expected}")


def decode_args(raw: Mapping[str, Sequence[bytes]]) -> dict[str, list[str]]:
    """Tornado's ``query_arguments`` as text (UTF-8, refused otherwise)."""
    out: dict[str, list[str]] = {}
    for name, values in raw.items():
        texts = []
        for v in values:
            try:
                texts.append(v.decode("utf-8"))
            except UnicodeDecodeError:
                raise ParamError(f"bad parameter {show(name)}: the value is not UTF-8") from None
        out[name] = texts
    return out


def check_names(args: Mapping[str, list[str]], allowed: Iterable[str]) -> None:
    known = set(allowed)
    for name in args:
        if name not in known and name not in ALWAYS_ALLOWED:
            listing = ", ".join(sorted(known)) or "none"
            raise ParamError(f"unknown parameter {show(name)}: expected one of {listing}")


def _one(args: Mapping[str, list[str]], name: str) -> str | None:
    values = args.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise ParamError(f"bad parameter {name}: given {len(values)} times, expected once")
    value = values[0]
    if len(value) > _MAX_TEXT:
        raise _bad(name, value, f"at most {_MAX_TEXT} characters")
    return value


def _many(args: Mapping[str, list[str]], name: str) -> tuple[str, ...]:
    values = args.get(name) or []
    if len(values) > _MAX_VALUES:
        raise ParamError(f"bad parameter {name}: given {len(values)} times, at most {_MAX_VALUES}")
    out = []
    for v in values:
        if not v:
            raise _bad(name, v, "a non-empty value")
        if len(v) > _MAX_TEXT:
            raise _bad(name, v, f"at most {_MAX_TEXT} characters")
        out.append(v)
    return tuple(dict.fromkeys(out))


def parse_int(name: str, value: str, lo: int, hi: int | None = None) -> int:
    expected = f"an integer from {lo} to {hi}" if hi is not None else f"an integer >= {lo}"
    text = value.strip()
    if not re.fullmatch(r"[+-]?\d{1,18}", text):
        raise _bad(name, value, expected)
    n = int(text)
    if n < lo or (hi is not None and n > hi):
        raise _bad(name, value, expected)
    return n


def parse_time(name: str, value: str) -> float:
    """RFC 3339 (with an offset or ``Z``) or epoch seconds → epoch seconds."""
    expected = "an RFC 3339 time with an offset (e.g. 2026-01-02T03:04:05Z) or epoch seconds"
    text = value.strip()
    try:
        t = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(t) or t < 0 or t > 253402300799:  # up to year 9999
            raise _bad(name, value, expected)
        return t
    m = _OFFSET_SPACE.match(text)
    if m and ("T" in text or "t" in text or text.count(" ") == 2):
        text = m.group(1) + "+" + m.group(2)
    if text[-1:] in ("Z", "z"):
        text = text[:-1] + "+00:00"
    if len(text) < 20:  # a date alone, or a time without seconds or offset
        raise _bad(name, value, expected)
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise _bad(name, value, expected) from None
    if dt.tzinfo is None:
        raise _bad(name, value, expected)
    return dt.timestamp()


def parse_filters(args: Mapping[str, list[str]], statuses: Iterable[str] = STATUS_CLASSES
                  ) -> dict[str, Any]:
    """The filter parameters as ``Filters`` keyword arguments."""
    allowed_status = tuple(statuses)
    status: list[str] = []
    for v in _many(args, "status"):
        for part in v.split(","):
            s = part.strip().lower()
            if s not in allowed_status:
                raise _bad("status", v, "one of " + ", ".join(allowed_status)
                           + " (repeat the parameter for several)")
            status.append(s)
    out: dict[str, Any] = {
        "model": _many(args, "model"),
        "provider": _many(args, "provider"),
        "status_class": tuple(dict.fromkeys(status)),
    }
    for name in ("session", "consumer", "client"):
        v = _one(args, name)
        if v is not None and v == "":
            raise _bad(name, v, "a non-empty value")
        out[name] = v
    for name in ("start", "end"):
        v = _one(args, name)
        out[name] = parse_time(name, v) if v is not None else None
    for name in ("min_id", "max_id"):
        v = _one(args, name)
        out[name] = parse_int(name, v, 1) if v is not None else None
    if out["start"] is not None and out["end"] is not None and out["start"] > out["end"]:
        raise ParamError(f"bad parameters start={show(_one(args, 'start') or '')} and "
                         f"end={show(_one(args, 'end') or '')}: expected start <= end")
    if out["min_id"] is not None and out["max_id"] is not None and out["min_id"] > out["max_id"]:
        raise ParamError(f"bad parameters min_id={out['min_id']} and max_id={out['max_id']}: "
                         "expected min_id <= max_id")
    return out


def parse_sort(args: Mapping[str, list[str]], sort_keys: Iterable[str], default_sort: str
               ) -> tuple[str, str]:
    keys = list(sort_keys)
    sort = _one(args, "sort")
    if sort is None or sort == "":
        sort = default_sort
    elif sort not in keys:
        raise _bad("sort", sort, "one of " + ", ".join(keys))
    order = _one(args, "order")
    if order is None or order == "":
        order = "desc"
    elif order.lower() not in ORDERS:
        raise _bad("order", order, "asc or desc")
    return sort, order.lower()


def parse_page(args: Mapping[str, list[str]], max_limit: int = MAX_LIMIT) -> tuple[int, int]:
    limit = _one(args, "limit")
    page = _one(args, "page")
    return (parse_int("page", page, 1, 10_000_000) if page is not None else 1,
            parse_int("limit", limit, 1, max_limit) if limit is not None else DEFAULT_LIMIT)


def activity_query(args: Mapping[str, list[str]], sort_keys: Iterable[str],
                   default_sort: str = "id", statuses: Iterable[str] = STATUS_CLASSES) -> Query:
    """``/api/activity`` and ``/api/sessions``: filters, paging and sorting."""
    check_names(args, FILTER_PARAMS + PAGE_PARAMS)
    filters = parse_filters(args, statuses)
    sort, order = parse_sort(args, sort_keys, default_sort)
    page, limit = parse_page(args)
    return Query(filters, sort, order, page, limit)


def filters_only(args: Mapping[str, list[str]], statuses: Iterable[str] = STATUS_CLASSES
                 ) -> dict[str, Any]:
    """``/api/stats``: filters and nothing else."""
    check_names(args, FILTER_PARAMS)
    return parse_filters(args, statuses)


def export_query(args: Mapping[str, list[str]], sort_keys: Iterable[str],
                 max_rows: int = MAX_EXPORT_ROWS, default_sort: str = "id",
                 statuses: Iterable[str] = STATUS_CLASSES) -> Query:
    """``/api/export.*``: filters, sorting and ``limit`` (rows, default and at most max_rows)."""
    check_names(args, FILTER_PARAMS + EXPORT_PARAMS)
    filters = parse_filters(args, statuses)
    sort, order = parse_sort(args, sort_keys, default_sort)
    limit = _one(args, "limit")
    rows = parse_int("limit", limit, 1, max_rows) if limit is not None else max_rows
    return Query(filters, sort, order, 1, rows)


def parse_id(name: str, value: str) -> int:
    """A path id (``/api/captures/{id}``); ParamError for anything but a positive integer."""
    if not re.fullmatch(r"\d{1,18}", value) or int(value) < 1:
        raise ParamError(f"bad {name} {show(value)}: expected a positive integer")
    return int(value)
