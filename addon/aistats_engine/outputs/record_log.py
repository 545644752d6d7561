"""The JSONL record log as an output: one ``record.md`` object per line (``JsonlSink`` does the
writing, rotation and recovery off the event loop)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .bus import Finished, Started
from .logsink import JsonlSink


class RecordLog:
    def __init__(self, path: str, max_bytes: int, backups: int,
                 on_drop: Callable[[int], None] | None = None) -> None:
        """Opens the file now (OSError for a path that cannot be written)."""
        self.sink = JsonlSink(Path(path).expanduser(), max_bytes=max_bytes, backups=backups,
                              on_drop=on_drop)

    def started(self, event: Started) -> None:
        pass

    def finished(self, event: Finished) -> None:
        self.sink.write(event.record.to_dict())

    def close(self, wait: bool = False) -> None:
        self.sink.close(wait=wait)
