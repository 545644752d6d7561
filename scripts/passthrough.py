"""Floor addon for scripts/bench.py: plain mitmdump that streams event streams through unchanged.

Without it mitmdump buffers SSE whole (the client sees nothing until the end), so plain mitmdump
is no streaming baseline; ``stream = True`` is the cheapest way to forward chunks as they arrive.
"""

from __future__ import annotations

from mitmproxy import http

STREAMED_TYPES = ("text/event-stream", "application/x-ndjson", "application/vnd.amazon.eventstream")


def responseheaders(flow: http.HTTPFlow) -> None:
    """Stream streamed content types; everything else stays buffered as in plain mitmdump."""
    ctype = flow.response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype in STREAMED_TYPES:
        flow.response.stream = True
