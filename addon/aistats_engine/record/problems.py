"""What the addon could not read: a fixed kind (metric label) with the human detail beside it.

The record's ``parse_error`` is the details joined with ``"; "``; ``parse_error_kinds`` keeps the
kinds, so the metric ``aistats_parse_errors_total{kind}`` never re-parses text and its label has
this small fixed set of values.
"""

from __future__ import annotations

from typing import NamedTuple

# The kinds, each with what it covers.
DECOMPRESSION = "decompression"  # body does not match its Content-Encoding, or is truncated
DECODED_TOO_LARGE = "decoded_too_large"  # decoding would pass the decoded-size bound
BODY_TOO_LARGE = "body_too_large"  # body (or stream copy) over aistats_max_body
EVENT_TOO_LARGE = "event_too_large"  # one stream event over aistats_max_event
INVALID_JSON = "invalid_json"  # a body or stream event that is not JSON
INVALID_FRAME = "invalid_frame"  # AWS event-stream frame with a bad CRC, length or header
TRUNCATED = "truncated"  # the stream ended inside an event
EMPTY_BODY = "empty_body"
INVALID_USAGE = "invalid_usage"  # negative, fractional or absurd token counts
INVALID_REQUEST = "invalid_request"  # request body unreadable (not JSON, bad encoding, too large)
INTERNAL = "internal"  # an exception in aistats itself (logged once with the flow id)

KINDS = frozenset({DECOMPRESSION, DECODED_TOO_LARGE, BODY_TOO_LARGE, EVENT_TOO_LARGE,
                   INVALID_JSON, INVALID_FRAME, TRUNCATED, EMPTY_BODY, INVALID_USAGE,
                   INVALID_REQUEST, INTERNAL})


class Problem(NamedTuple):
    kind: str
    detail: str  # the text shown in ``parse_error``


def detail_text(problems: list[Problem] | tuple[Problem, ...]) -> str | None:
    """``parse_error``: the details joined, or None when there is nothing to say."""
    return "; ".join(p.detail for p in problems) or None


def kinds(problems: list[Problem] | tuple[Problem, ...]) -> tuple[str, ...]:
    """Distinct kinds in first-seen order (``parse_error_kinds``)."""
    return tuple(dict.fromkeys(p.kind for p in problems))
