"""JSON Lines log of records, written off the event loop with size-bounded rotation.

``write`` only enqueues (cheap, never blocks on disk). A daemon thread writes, flushes at
least every ``flush_interval`` seconds, and rotates ``path`` → ``path.1`` … ``path.N`` when the
file would exceed ``max_bytes``. The queue is bounded: when the disk cannot keep up, records
are dropped and counted rather than held in memory.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from pathlib import Path

import orjson

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 100 << 20
DEFAULT_BACKUPS = 3
DEFAULT_QUEUE = 10_000

_STOP = object()


class JsonlSink:
    def __init__(self, path: str | os.PathLike[str], max_bytes: int = DEFAULT_MAX_BYTES,
                 backups: int = DEFAULT_BACKUPS, flush_interval: float = 1.0,
                 max_queue: int = DEFAULT_QUEUE) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self.flush_interval = flush_interval
        self.dropped = 0
        self.written = 0
        self._q: queue.Queue[object] = queue.Queue(max_queue)
        # Open now so a bad path fails at start-up, not on the first record.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "ab")
        self._size = self._f.tell()
        self._thread = threading.Thread(target=self._run, name="aistats-log", daemon=True)
        self._thread.start()

    def write(self, obj: dict) -> None:
        try:
            self._q.put_nowait(orjson.dumps(obj) + b"\n")
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("aistats: log queue full, %d record(s) dropped so far", self.dropped)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, then close. Bounded by ``timeout``."""
        try:
            self._q.put(_STOP, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)

    def _run(self) -> None:
        dirty = False
        while True:
            try:
                item = self._q.get(timeout=self.flush_interval)
            except queue.Empty:
                if dirty:
                    self._flush()
                    dirty = False
                continue
            if item is _STOP:
                break
            try:
                self._write(item)  # type: ignore[arg-type]
                dirty = True
                if self._q.empty():
                    self._flush()
                    dirty = False
            except OSError as e:
                self.dropped += 1
                log.warning("aistats: cannot write %s: %s", self.path, e)
        self._flush()
        self._f.close()

    def _write(self, line: bytes) -> None:
        if self.max_bytes and self._size and self._size + len(line) > self.max_bytes:
            self._rotate()
        self._f.write(line)
        self._size += len(line)
        self.written += 1

    def _flush(self) -> None:
        try:
            self._f.flush()
        except OSError as e:
            log.warning("aistats: cannot flush %s: %s", self.path, e)

    def _rotate(self) -> None:
        self._f.close()
        if self.backups > 0:
            for i in range(self.backups - 1, 0, -1):
                src = self.path.with_name(f"{self.path.name}.{i}")
                if src.exists():
                    os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink(missing_ok=True)
        self._f = open(self.path, "ab")
        self._size = 0
