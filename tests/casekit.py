"""Turning acceptance cases into bytes and comparing records with their ``expect`` part."""

from __future__ import annotations

import math
import zlib
from typing import Any


def case_body(case: dict) -> bytes:
    """The response body bytes as the upstream must send them (compressed when asked)."""
    body = case["response"]["body"].encode()
    enc = case["response"].get("encoding")
    if enc == "gzip":
        c = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        return c.compress(body) + c.flush()
    if enc == "deflate":  # raw RFC 1951, as the case README says
        c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        return c.compress(body) + c.flush()
    assert enc is None, enc
    return body


def case_chunks(case: dict) -> list[bytes]:
    """The body as the upstream writes it: SSE event by event (as a server streams), other
    bodies in one piece."""
    body = case_body(case)
    if "event-stream" in case["response"]["headers"].get("Content-Type", ""):
        parts = body.split(b"\n\n")
        return [p + b"\n\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
    return [body]


CONTROL_KEYS = {"float_tolerance", "duration_ms_min", "parse_error_prefix"}


def check_expect(record: dict, expect: dict) -> list[str]:
    """Differences between a record and a case's ``expect`` (empty list: it passes)."""
    problems = []
    tol = expect.get("float_tolerance", 1e-6)
    for key, want in expect.items():
        if key in CONTROL_KEYS:
            continue
        got = record.get(key, "<missing>")
        if isinstance(want, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
            if not math.isclose(got, want, abs_tol=tol):
                problems.append(f"{key}: got {got!r}, want {want!r}")
        elif got != want or type(got) is not type(want):
            problems.append(f"{key}: got {got!r}, want {want!r}")
    if "duration_ms_min" in expect:
        d = record.get("duration_ms")
        if d is None or d < expect["duration_ms_min"]:
            problems.append(f"duration_ms: got {d!r}, want >= {expect['duration_ms_min']}")
    if "parse_error_prefix" in expect:
        pe = record.get("parse_error") or ""
        if not pe.startswith(expect["parse_error_prefix"]):
            problems.append(f"parse_error: got {pe!r}, want prefix {expect['parse_error_prefix']!r}")
    return problems


def drop_ids(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "id"}


def check_record(record: dict | None, want: dict) -> list[str]:
    """``check_expect`` for a Higress case's ``expect.record``: ``attributes`` are compared key by
    key (a wanted null also accepts an absent key: the source was not read)."""
    if record is None:
        return ["no record"]
    problems = check_expect(record, {k: v for k, v in want.items() if k != "attributes"})
    attrs = record.get("attributes") or {}
    for key, value in (want.get("attributes") or {}).items():
        got = attrs.get(key)
        if got != value or type(got) is not type(value):
            problems.append(f"attributes.{key}: got {got!r}, want {value!r}")
    return problems


def check_capture(store, record_id: int, want: dict) -> list[str]:
    """A case's ``expect_capture`` against what the store answers now (``has_capture`` is
    decided at read time; ``*_include`` are subsets of the captured headers, ``null`` a part
    the mask leaves out)."""
    problems = []
    row = store.activity(sort="id", order="desc", limit=1)["data"][0]
    expected = want.get("has_capture", want.get("has_capture_if_enabled"))
    if row["has_capture"] != expected:
        problems.append(f"has_capture: got {row['has_capture']}, want {expected}")
    capture = store.capture(record_id)
    for part, value in (want.get("capture") or {}).items():
        if part.endswith("_include"):
            got = (capture or {}).get(part[: -len("_include")]) or {}
            for k, v in value.items():
                if got.get(k) != v:
                    problems.append(f"{part}.{k}: got {got.get(k)!r}, want {v!r}")
        elif (capture or {}).get(part) != value:
            problems.append(f"{part}: got {(capture or {}).get(part)!r}, want {value!r}")
    return problems
