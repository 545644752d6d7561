"""JSON Lines log of records, written off the event loop with size-bounded rotation.

Bounds and behaviour:

* ``write`` only serialises (orjson) and enqueues; it never touches the disk. The queue holds at
  most ``max_queue`` records: when the disk cannot keep up, records are dropped and counted (a
  WARNING on the first such drop and every 1000th) rather than held in memory.
* A daemon thread appends the lines (``O_APPEND``) in batches: ``COALESCE`` seconds (or
  ``flush_interval``, if shorter) after the first line of a batch, in writes of about 64 KiB. It
  wakes for the first line of a batch and when the batch is due, not for every line: a wake or
  a write per record would cost a GIL hand-off, a syscall and the file check below per record
  on a busy proxy (the writer thread shares the proxy's core); a batch costs them once.
* Rotation: ``path`` → ``path.1`` … ``path.N`` (N = ``backups``; 0 deletes instead) when the next
  line would take the file past ``max_bytes`` (0 = never rotate).
* Before every flush and rotation (so at least about once a second while records arrive) the
  thread checks that ``path`` still names the open file (device and inode); if it was deleted,
  moved or replaced, the file is reopened. If it cannot be reopened (its directory is gone),
  records are dropped and counted with one WARNING per outage, reopening is retried about once
  a second, and one INFO line says when logging resumes and how many records were dropped
  meanwhile. The directory is created only by the constructor, never during an outage.
* A failing write never stops the thread: its records count as dropped (same once-per-outage
  report).
* Every drop (queue full, write failure, outage, write after close) adds to ``dropped`` and calls
  ``on_drop(n)``, so the caller can export a metric.
* ``close()`` never blocks: the thread writes what is queued, then closes the file and exits.
  ``close(wait=True, timeout=…)`` (process exit) waits at most ``timeout`` for that. A new sink may
  append to the same path while an old one is still finishing.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

import orjson

from .drops import Drops
from .writer import WAKE as _WAKE, stop_writer

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 100 << 20
DEFAULT_BACKUPS = 3
DEFAULT_QUEUE = 10_000
CHECK_INTERVAL = 1.0  # seconds: longest wait before a moved/deleted file or a retry is noticed
COALESCE = 0.2  # seconds a batch may wait for more lines before it is written

_BUFFER = 64 << 10  # bytes the writer thread collects before writing them out regardless
_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0)


def _why(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return f"{type(e).__name__}: {e}"


class JsonlSink:
    """Appends one JSON object per line to ``path`` from a daemon thread; see the module doc."""

    def __init__(self, path: str | os.PathLike[str], max_bytes: int = DEFAULT_MAX_BYTES,
                 backups: int = DEFAULT_BACKUPS, flush_interval: float = 1.0,
                 max_queue: int = DEFAULT_QUEUE,
                 on_drop: Callable[[int], None] | None = None) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self.flush_interval = flush_interval
        self._drops = Drops(on_drop, "log")
        self.written = 0  # records written to the file
        # Queue(0) would be unbounded: keep at least one slot.
        self._q: queue.Queue[object] = queue.Queue(max(1, max_queue))
        self._stop = threading.Event()
        self._drop_lock = threading.Lock()  # the queue-full count, kept from the callers
        self._queue_full = 0
        self._check_interval = CHECK_INTERVAL
        # Writer-thread state from here on.
        self._fd: int | None = None
        self._ident: tuple[int, int] | None = None  # (st_dev, st_ino) of the open file
        self._size = 0
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._flush_due = 0.0
        self._torn: tuple[int, int] | None = None  # file whose last line a failed write cut short
        self._outage = False
        self._dropped_at_outage = 0
        self._next_open = 0.0
        self._next_rotate = 0.0
        self._rotate_reported = False
        # Open now so a bad path fails at start-up (the caller reports the option), not later.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._open()
        self._thread = threading.Thread(target=self._run, name="aistats-log", daemon=True)
        self._thread.start()

    # -- caller side (event loop) -----------------------------------------------------------
    def write(self, obj: dict) -> None:
        """Serialise and enqueue; never blocks and never touches the disk."""
        self.write_line(orjson.dumps(obj))

    def write_line(self, line: bytes) -> None:
        """Enqueue one serialised JSON object (without its newline); never blocks."""
        if self._stop.is_set():
            self._drop(1)
            return
        try:
            self._q.put_nowait(line + b"\n")
        except queue.Full:
            with self._drop_lock:
                self._queue_full += 1
                n = self._queue_full
            self._drop(1)
            if n == 1 or n % 1000 == 0:
                log.warning("aistats: log queue full, %d record(s) dropped so far", n)

    def close(self, wait: bool = False, timeout: float = 5.0) -> bool:
        """Stop accepting records; the thread writes what is queued, then closes the file.

        Returns at once unless ``wait`` (process exit), then waits at most ``timeout`` seconds.
        True when the thread has finished.
        """
        return stop_writer(self._stop, self._q, self._thread, wait, timeout, f"log {self.path}")

    # -- writer thread ----------------------------------------------------------------------
    def _run(self) -> None:
        failures = 0
        while True:
            try:
                self._loop()
                return
            except Exception:  # a bug: I/O errors are handled where they happen
                failures += 1
                if failures == 1:
                    log.exception("aistats: log writer for %s failed; restarting it", self.path)
                if self._stop.is_set():
                    break
                time.sleep(self._check_interval)  # don't spin on a repeating failure
        # Stopping after a failure: count what can no longer be written, then let go of the file.
        lost = len(self._pending)
        self._pending.clear()
        while True:
            try:
                lost += self._q.get_nowait() is not _WAKE
            except queue.Empty:
                break
        self._drop(lost)
        self._close_fd()

    def _loop(self) -> None:
        while not (self._stop.is_set() and self._q.empty()):
            if not self._pending:  # (lines can be left over from a failed pass)
                try:
                    item = self._q.get(timeout=self._check_interval)
                except queue.Empty:
                    continue
                self._take(item)
                if not self._pending:
                    continue
            # A batch is open: sleep until it is due (close() wakes it), then take every line
            # queued meanwhile at once. Waking for each record would cost more than writing
            # it: on a busy proxy each wake is a GIL hand-off with the event loop.
            self._stop.wait(max(0.0, self._flush_due - time.monotonic()))
            while True:
                try:
                    item = self._q.get_nowait()
                except queue.Empty:
                    break
                self._take(item)
                if self._pending_bytes >= _BUFFER:
                    self._flush(time.monotonic())
            self._flush(time.monotonic())
        self._flush(time.monotonic(), force=True)
        self._close_fd()

    def _take(self, item: object) -> None:
        if isinstance(item, bytes):
            try:
                self._add(item, time.monotonic())
            except Exception as e:  # e.g. rotation: lose this record, keep the thread
                self._trouble(e)
                self._drop(1)

    def _add(self, line: bytes, now: float) -> None:
        if self.max_bytes and now >= self._next_rotate:
            size = self._size + self._pending_bytes
            if size and size + len(line) > self.max_bytes:
                self._flush(now)  # what is pending belongs in the current file
                if self._ready(now) and self._size and self._size + len(line) > self.max_bytes:
                    self._rotate(now)
        if not self._pending:
            self._flush_due = now + min(self.flush_interval, self._check_interval, COALESCE)
        self._pending.append(line)
        self._pending_bytes += len(line)

    def _flush(self, now: float, force: bool = False) -> None:
        """Write the pending lines to the file ``path`` names now. Never raises."""
        if not self._pending:
            return
        lines, self._pending, self._pending_bytes = self._pending, [], 0
        if not self._ready(now, force):
            self._drop(len(lines))
            return
        prefix = b"\n" if self._torn is not None and self._torn == self._ident else b""
        data = memoryview(prefix + b"".join(lines))
        done = 0
        try:
            while done < len(data):
                n = self._raw_write(data[done:])
                if n <= 0:
                    raise OSError("write made no progress")
                done += n
        except Exception as e:
            self._size += done
            ok, end = 0, len(prefix)
            for line in lines:
                if end + len(line) > done:
                    break
                end += len(line)
                ok += 1
            self.written += ok
            if done >= len(prefix):  # start the next write on a fresh line if this one cut one
                self._torn = self._ident if done > end else None
            self._trouble(e)
            self._drop(len(lines) - ok)
            return
        self._size += done
        self._torn = None
        self.written += len(lines)
        if self._outage:
            self._outage = False
            log.info("aistats: logging to %s resumed; %d record(s) dropped while it was not "
                     "writable", self.path, self.dropped - self._dropped_at_outage)

    def _raw_write(self, data: memoryview) -> int:
        return os.write(self._fd, data)  # type: ignore[arg-type]

    def _ready(self, now: float, force: bool = False) -> bool:
        """Make sure the open file is the one ``path`` names, reopening it if not.

        Records written to a deleted or moved file would be lost without a trace. When it
        cannot be opened, retries at most every ``CHECK_INTERVAL`` unless ``force``.
        """
        replaced = False
        if self._fd is not None:
            try:
                st, fst = os.stat(self.path), os.fstat(self._fd)
                if (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino):
                    self._size = fst.st_size  # another writer may append too
                    return True
            except OSError:
                pass
            self._close_fd()
            replaced = True
        elif not force and now < self._next_open:
            return False
        try:
            self._open()
        except OSError as e:
            self._next_open = now + self._check_interval
            self._trouble(e)
            return False
        if replaced and not self._outage:
            log.info("aistats: %s was moved or deleted; writing to a new file there", self.path)
        return True

    def _open(self) -> None:
        fd = os.open(self.path, _OPEN_FLAGS, 0o666)
        st = os.fstat(fd)
        self._fd, self._ident, self._size = fd, (st.st_dev, st.st_ino), st.st_size

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def _rotate(self, now: float) -> None:
        self._close_fd()  # Windows cannot rename an open file
        try:
            if self.backups > 0:
                for i in range(self.backups - 1, 0, -1):
                    try:
                        os.replace(self._backup(i), self._backup(i + 1))
                    except FileNotFoundError:
                        pass
                try:
                    os.replace(self.path, self._backup(1))
                except FileNotFoundError:
                    pass
            else:
                self.path.unlink(missing_ok=True)
        except OSError as e:
            # Keep appending (nothing is lost); retry later, report once until a rotation works.
            self._next_rotate = now + self._check_interval
            if not self._rotate_reported:
                self._rotate_reported = True
                log.warning("aistats: cannot rotate log %s (%s); it grows past %d bytes",
                            self.path, _why(e), self.max_bytes)
        else:
            self._rotate_reported = False
        self._ready(now, force=True)

    def _backup(self, i: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{i}")

    # -- drops and reports (_drop runs on both threads) -------------------------------------
    def _trouble(self, e: BaseException) -> None:
        """Report the start of an outage once; records are dropped until a write succeeds."""
        if self._outage:
            return
        self._outage = True
        self._dropped_at_outage = self.dropped
        log.warning("aistats: cannot write log %s (%s); dropping records until it is writable "
                    "again", self.path, _why(e))

    def _drop(self, n: int) -> None:
        self._drops(n)

    @property
    def dropped(self) -> int:
        """Records lost for any reason (see ``on_drop``)."""
        return self._drops.count
