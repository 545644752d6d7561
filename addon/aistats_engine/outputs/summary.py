"""One summary line per LLM request on mitmproxy's log (the terminal of mitmdump)."""

from __future__ import annotations

import logging

from ..record.record import Record
from .bus import Finished, Started

log = logging.getLogger("aistats")


def summary(rec: Record) -> str:
    parts = [f"#{rec.id}", rec.provider or "?", rec.operation or "?", rec.model or "?",
             str(rec.status) if rec.status is not None else "-"]
    if rec.input_tokens is not None or rec.output_tokens is not None:
        parts.append(f"in={rec.input_tokens} out={rec.output_tokens}")
    if rec.ttft_ms is not None:
        parts.append(f"ttft={rec.ttft_ms:.0f}ms")
    if rec.duration_ms is not None:
        parts.append(f"{rec.duration_ms:.0f}ms")
    if rec.error:
        parts.append(f"error={rec.error_type}: {rec.error[:80]}")
    if rec.parse_error:
        parts.append(f"parse_error={rec.parse_error[:80]}")
    return " ".join(parts)


class SummaryLine:
    """Record fields only (already redacted), so nothing secret reaches the terminal."""

    def started(self, event: Started) -> None:
        pass

    def finished(self, event: Finished) -> None:
        log.info("aistats: %s", summary(event.record))

    def close(self, wait: bool = False) -> None:
        pass
