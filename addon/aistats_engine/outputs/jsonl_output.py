"""A JSON Lines file as an output: one line per record, made by ``to_line`` (the record's JSON,
``Finished.record_json``, for the record log; ``higress_log.json_line`` for Higress's access-log
form).
``JsonlSink`` does the writing, rotation and recovery off the event loop."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .bus import Finished, Started
from .logsink import JsonlSink


class JsonlOutput:
    def __init__(self, path: str, max_bytes: int, backups: int,
                 to_line: Callable[[Finished], bytes] = Finished.record_json,
                 on_drop: Callable[[int], None] | None = None) -> None:
        """Opens the file now (OSError for a path that cannot be written)."""
        self.to_line = to_line
        self.sink = JsonlSink(Path(path).expanduser(), max_bytes=max_bytes, backups=backups,
                              on_drop=on_drop)

    def started(self, event: Started) -> None:
        pass

    def finished(self, event: Finished) -> None:
        self.sink.write_line(self.to_line(event))

    def close(self, wait: bool = False) -> None:
        self.sink.close(wait=wait)
