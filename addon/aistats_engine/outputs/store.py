"""The record store: every finished record in SQLite, for the activity, stats and sessions views.

An output like the others (``started``/``finished``/``close``). ``finished`` only enqueues; a
daemon writer thread inserts the records in batches (one transaction each, gathered for up to
0.25 s), keeps their captures (CaptureCache), and prunes. Reads (``activity``, ``stats``,
``sessions``, ``session``, ``record``, ``capture``, ``export``) may be called from any thread
(the web API's); each first has the writer write what is queued, so it sees every record
finished before it.

Where:

* ``path=None``: an in-memory database (one connection, shared by the writer and the readers
  under one lock), pruned after every batch to the newest ``max_rows`` records.
* ``path``: a file in WAL mode (a writer connection on the writer thread, a read-only one for
  readers), kept across restarts, pruned after every batch (and about once a minute while idle)
  to the newest ``max_rows`` (0: no row bound) and to records that ended less than
  ``max_age_s`` ago (None: no age bound). A ``meta`` row keeps the largest id ever stored, so
  ``next_id()`` never hands out an id twice, even after every record aged out.

Bounds (memory):

* the queue: at most ``max_queue`` records; when full a record is dropped and counted
  (``on_drop(1)``). With captures on, queued records also hold their raw bodies: at most
  ``max_queue_bytes`` of them (default 64 MiB, or one request's if larger); past that a record is
  still queued but without its bodies, so it gets no capture (counted in ``captures_skipped``);
* the in-memory database: ``max_rows`` records (a file store's rows live on disk);
* captures: ``CaptureCache.max_bytes``, a capture counting its compressed size, or while its
  building waits (until read or until the cache must shrink) the raw bodies it holds; as many
  in the ``captures`` table when ``persist_captures`` (file store only: built at once); building
  one holds at most two bodies of ``max_body`` decoded bytes;
* reads: a page (``limit`` ≤ 1000 rows), ``export`` in chunks of ``EXPORT_CHUNK`` rows, stats and
  sessions aggregated in SQL (a session's detail: its newest ``max_requests`` records).

Failures: a batch the database refuses (disk full, I/O error, file or directory gone) is dropped
and counted through ``on_drop``; ``report(msg)`` is called once per outage with a one-line
message naming the file, and one INFO line says when writing resumed. A file that was deleted or
replaced under the store is reopened (recreated) before the next batch. ``finished`` never raises
and never blocks.

Schema (``records``): the record id as INTEGER PRIMARY KEY (SQLite's rowid: it is the (id desc)
index, walked in both directions, so no separate one), the start/end epoch seconds, the columns
the views filter, sort and sum on, and the full record JSON (``Record.to_dict()``). Indexes on
(model, id), (response_model, id), (session_id, id), (start_epoch) and (end_epoch).
"""

from __future__ import annotations

import logging
import math
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from .drops import Drops
from .writer import WAKE as _WAKE, stop_writer

from ..record.record import Record, rfc3339_ms
from .bus import Finished, Started
from .captures import CAPTURE_PARTS, CaptureCache, capture_blob, capture_exists, mask_for

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DEFAULT_MAX_ROWS = 1000
DEFAULT_QUEUE = 10_000
DEFAULT_QUEUE_BYTES = 64 << 20
# A batch waits this long at most for more records: in a busy proxy each transaction (insert,
# prune, commit) with its GIL hand-offs cost about 350 us, twice a streamed record's own work.
# A read (API, UI) or flush() does not wait for it: it has the writer write what is queued now.
COALESCE_S = 0.25
CATCH_UP_S = 2.0  # a read waits at most this long for the records queued before it
BATCH = 64  # records per transaction at most (short stretches holding the GIL: streamed
# chunks of other connections wait behind them)
EXPORT_CHUNK = 500
MAX_LIMIT = 1000
IDLE_TICK = 1.0  # seconds the writer waits for records before doing idle work
AGE_PRUNE_INTERVAL = 60.0  # seconds between age prunes while no records arrive
STATUS_CLASSES = frozenset({"1xx", "2xx", "3xx", "4xx", "5xx", "none"})
PERCENTILES = (50, 95, 99)
DISTRIBUTIONS = ("ttft_ms", "prompt_per_second", "tokens_per_second",
                 "observed_tokens_per_second")

# (column, SQL type); the row is built by Store._row in this order.
_COLUMNS: tuple[tuple[str, str], ...] = (
    ("id", "INTEGER PRIMARY KEY"),
    ("start_epoch", "REAL"), ("end_epoch", "REAL"),
    ("model", "TEXT"), ("response_model", "TEXT"), ("provider", "TEXT"), ("api", "TEXT"),
    ("operation", "TEXT"), ("status", "INTEGER"), ("status_class", "TEXT NOT NULL"),
    ("session_id", "TEXT"), ("consumer", "TEXT"), ("client", "TEXT"),
    ("input_tokens", "INTEGER"), ("output_tokens", "INTEGER"), ("cached_tokens", "INTEGER"),
    ("cache_creation_tokens", "INTEGER"), ("reasoning_tokens", "INTEGER"),
    ("total_tokens", "INTEGER"),
    ("ttft_ms", "REAL"), ("duration_ms", "REAL"), ("prompt_per_second", "REAL"),
    ("tokens_per_second", "REAL"), ("observed_tokens_per_second", "REAL"),
    ("cost_usd", "REAL"), ("error_type", "TEXT"), ("failed", "INTEGER NOT NULL"),
    ("record", "TEXT NOT NULL"),
)
_COLUMN_NAMES = tuple(c for c, _ in _COLUMNS)
_FROM_RECORD = ("model", "response_model", "provider", "api", "operation", "status")
_FROM_RECORD_2 = ("session_id", "consumer", "client", "input_tokens", "output_tokens",
                  "cached_tokens", "cache_creation_tokens", "reasoning_tokens", "total_tokens",
                  "ttft_ms", "duration_ms", "prompt_per_second", "tokens_per_second",
                  "observed_tokens_per_second", "cost_usd", "error_type")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS records (" + ", ".join(f"{c} {t}" for c, t in _COLUMNS) + ")",
    "CREATE INDEX IF NOT EXISTS records_model ON records (model, id)",
    "CREATE INDEX IF NOT EXISTS records_response_model ON records (response_model, id)",
    "CREATE INDEX IF NOT EXISTS records_session ON records (session_id, id)",
    "CREATE INDEX IF NOT EXISTS records_start ON records (start_epoch)",
    "CREATE INDEX IF NOT EXISTS records_end ON records (end_epoch)",
    "CREATE TABLE IF NOT EXISTS captures (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
    "id INTEGER NOT NULL UNIQUE, blob BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value)",
)
_INSERT = (f"INSERT OR REPLACE INTO records ({', '.join(_COLUMN_NAMES)}) "
           f"VALUES ({', '.join('?' for _ in _COLUMN_NAMES)})")

# Sort key (API name) → column.
_SORT_COLUMNS: dict[str, str] = {
    "id": "id", "time": "start_epoch", "end_time": "end_epoch",
    "model": "model", "response_model": "response_model", "provider": "provider", "api": "api",
    "operation": "operation", "status": "status", "status_class": "status_class",
    "input_tokens": "input_tokens", "output_tokens": "output_tokens",
    "cached_tokens": "cached_tokens", "cache_creation_tokens": "cache_creation_tokens",
    "reasoning_tokens": "reasoning_tokens", "total_tokens": "total_tokens",
    "ttft_ms": "ttft_ms", "duration_ms": "duration_ms",
    "prompt_per_second": "prompt_per_second", "tokens_per_second": "tokens_per_second",
    "observed_tokens_per_second": "observed_tokens_per_second", "cost_usd": "cost_usd",
    "session_id": "session_id", "consumer": "consumer", "client": "client",
    "error_type": "error_type",
}
SORT_KEYS: tuple[str, ...] = tuple(_SORT_COLUMNS)

# Session row key → its aggregate over the session's records. ORDER BY uses the expressions,
# not the names: inside an expression (``x IS NULL``) SQLite reads a name that is also a column
# as the column (of an arbitrary row of the group), not as the result alias.
_SESSION_AGGREGATES: dict[str, str] = {
    "session_id": "session_id",
    "requests": "count(*)",
    "input_tokens": "sum(input_tokens)",
    "cached_tokens": "sum(cached_tokens)",
    "cache_creation_tokens": "sum(cache_creation_tokens)",
    "output_tokens": "sum(output_tokens)",
    "reasoning_tokens": "sum(reasoning_tokens)",
    "cache_hit_ratio": "CAST(sum(cached_tokens) AS REAL) / nullif(sum(input_tokens), 0)",
    "errors": "sum(failed)",
    "first_seen": "min(start_epoch)",
    "last_seen": "max(end_epoch)",
    "cost_usd": "sum(cost_usd)",
}
_SESSION_COLUMNS = tuple(f"{expr} AS {name}" for name, expr in _SESSION_AGGREGATES.items()) + (
    "json_group_array(DISTINCT model) AS models", "json_group_array(DISTINCT client) AS clients")
SESSION_SORT_KEYS: tuple[str, ...] = tuple(_SESSION_AGGREGATES)


@dataclass(frozen=True)
class Filters:
    """What the views select. Empty tuples and None select everything; ``model`` matches the
    requested or the response model; ``start``/``end`` (epoch seconds, inclusive) bound the
    start time; ``status_class`` values are ``"1xx"`` … ``"5xx"`` or ``"none"`` (no response)."""

    model: tuple[str, ...] = ()
    provider: tuple[str, ...] = ()
    status_class: tuple[str, ...] = ()  # "2xx", "4xx", "5xx", "none"
    session: str | None = None
    consumer: str | None = None
    client: str | None = None
    start: float | None = None  # epoch s, inclusive, on start time
    end: float | None = None
    min_id: int | None = None
    max_id: int | None = None


ALL = Filters()


def _values(name: str, v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        return (v,)
    try:
        out = tuple(v)
    except TypeError:
        raise ValueError(f"{name} must be a list of strings") from None
    if not all(isinstance(x, str) for x in out):
        raise ValueError(f"{name} must be a list of strings")
    return out


def _where(f: Filters, extra: tuple[str, ...] = ()) -> tuple[str, list[Any]]:
    """``WHERE …`` (or "") and its parameters; ValueError for a bad filter."""
    clauses: list[str] = list(extra)
    args: list[Any] = []
    models = _values("model", f.model)
    if models:
        ph = ", ".join("?" for _ in models)
        clauses.append(f"(model IN ({ph}) OR response_model IN ({ph}))")
        args += models + models
    providers = _values("provider", f.provider)
    if providers:
        clauses.append(f"provider IN ({', '.join('?' for _ in providers)})")
        args += providers
    classes = _values("status_class", f.status_class)
    if classes:
        bad = [c for c in classes if c not in STATUS_CLASSES]
        if bad:
            raise ValueError(f"status_class must be one of 1xx, 2xx, 3xx, 4xx, 5xx, none, "
                             f"not {bad[0]!r}")
        clauses.append(f"status_class IN ({', '.join('?' for _ in classes)})")
        args += classes
    for name, column in (("session", "session_id"), ("consumer", "consumer"),
                         ("client", "client")):
        v = getattr(f, name)
        if v is not None:
            if not isinstance(v, str):
                raise ValueError(f"{name} must be a string")
            clauses.append(f"{column} = ?")
            args.append(v)
    for name, op in (("start", ">="), ("end", "<=")):
        v = getattr(f, name)
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
                raise ValueError(f"{name} must be a number (epoch seconds)")
            clauses.append(f"start_epoch {op} ?")
            args.append(float(v))
    for name, op in (("min_id", ">="), ("max_id", "<=")):
        v = getattr(f, name)
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name} must be an integer")
            clauses.append(f"id {op} ?")
            args.append(v)
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), args


def _int(name: str, v: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(v, bool):
        raise ValueError(f"{name} must be an integer")
    if isinstance(v, str):
        try:
            v = int(v.strip())
        except ValueError:
            raise ValueError(f"{name} must be an integer, not {v!r}") from None
    if not isinstance(v, int):
        raise ValueError(f"{name} must be an integer")
    if v < lo or (hi is not None and v > hi):
        raise ValueError(f"{name} must be between {lo} and {hi}" if hi is not None
                         else f"{name} must be at least {lo}")
    return v


def _order(order: Any) -> str:
    if not isinstance(order, str) or order.lower() not in ("asc", "desc"):
        raise ValueError(f"order must be asc or desc, not {order!r}")
    return order.upper()


def _sort_column(sort: Any) -> str:
    if not isinstance(sort, str) or sort not in _SORT_COLUMNS:
        raise ValueError(f"sort must be one of {', '.join(SORT_KEYS)}, not {sort!r}")
    return _SORT_COLUMNS[sort]


def _order_by(column: str, direction: str, tie: str = "id") -> str:
    """Unknown (NULL) values last in both orders; ties broken by ``tie`` for stable pages."""
    if column == tie:
        return f"{tie} {direction}"
    return f"{column} IS NULL, {column} {direction}, {tie} {direction}"


def _why(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return f"{type(e).__name__}: {e}" if not isinstance(e, sqlite3.Error) else str(e)


def percentile(sorted_at: Callable[[int], float], n: int, p: float) -> float:
    """Linear interpolation between closest ranks; ``sorted_at(i)`` the i-th smallest value."""
    rank = p / 100 * (n - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, n - 1)
    a = sorted_at(lo)
    if hi == lo or rank == lo:
        return a
    return a + (sorted_at(hi) - a) * (rank - lo)


def sturges_bins(n: int) -> int:
    """Sturges' rule, ⌈log2 n⌉ + 1, clamped to 5–20."""
    k = math.ceil(math.log2(n)) + 1 if n > 0 else 1
    return max(5, min(20, k))


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, rolled back (quietly, the connection may be gone) on
    any exception, which goes on to the caller."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        raise


class Store:
    """Records in SQLite; see the module doc for where, bounds and failures."""

    def __init__(self, path: str | os.PathLike[str] | None = None,
                 max_rows: int = DEFAULT_MAX_ROWS,
                 max_age_s: float | None = None,
                 captures: CaptureCache | None = None,
                 capture_parts: frozenset[str] = frozenset(CAPTURE_PARTS),
                 persist_captures: bool = False,
                 max_body: int = 16 << 20,
                 max_queue: int = DEFAULT_QUEUE,
                 on_drop: Callable[[int], None] | None = None,
                 report: Callable[[str], None] | None = None,
                 max_queue_bytes: int = DEFAULT_QUEUE_BYTES) -> None:
        """Opens (and creates) the database now: a bad path raises OSError here."""
        self.path = Path(path).expanduser() if path is not None else None
        if self.path is None and max_rows < 1:
            raise ValueError("an in-memory store needs max_rows >= 1")
        if max_rows < 0:
            raise ValueError("max_rows must be >= 0 (0: no row bound)")
        if max_age_s is not None and not max_age_s > 0:
            raise ValueError("max_age_s must be > 0 (None: no age bound)")
        self.max_rows = max_rows
        self.max_age_s = max_age_s
        self.captures = captures
        self.capture_parts = frozenset(capture_parts)
        self.persist_captures = bool(persist_captures and self.path is not None)
        self.max_body = max_body
        self.max_queue_bytes = max_queue_bytes
        self._report = report if report is not None else log.warning
        self._drops = Drops(on_drop, "store")
        self.written = 0  # records committed
        self.captures_skipped = 0  # records queued without their bodies (max_queue_bytes)
        self._where_name = str(self.path) if self.path is not None else "(in memory)"

        self._q: queue.Queue[object] = queue.Queue(max(1, max_queue))
        self._stop = threading.Event()
        self._hurry = threading.Event()  # a reader, flush() or close() waits: write now
        self._cond = threading.Condition()  # counters below, shared by both threads
        self._enqueued = 0
        self._done = 0
        self._queued_bytes = 0
        self._max_seen = 0  # largest record id handed to finished()
        self._queue_full = 0
        self._capture_bug_reported = False

        # Writer state.
        self._outage = False
        self._dropped_at_outage = 0
        self._broken = False  # reopen the file before the next batch
        self._next_age_prune = 0.0
        self._wident: tuple[int, int] | None = None
        self._rident: tuple[int, int] | None = None

        self._rlock = threading.RLock()  # the reader connection (in memory: the only one)
        try:
            if self.path is None:
                conn = sqlite3.connect(":memory:", check_same_thread=False,
                                       isolation_level=None)
                self._create(conn)
                self._wconn = self._rconn = conn
                self._wlock: threading.RLock = self._rlock
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._wlock = threading.RLock()
                self._wconn = self._open_writer()
                self._rconn = self._open_reader()
            with self._wlock:
                self._max_id = self._stored_max_id(self._wconn)
                self._startup(self._wconn)
        except sqlite3.Error as e:
            raise OSError(f"cannot open store {self._where_name}: {e}") from e
        self._thread = threading.Thread(target=self._run, name="aistats-store", daemon=True)
        self._thread.start()

    # -- connections --------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        assert self.path is not None
        return sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                               timeout=5.0)

    def _ident(self) -> tuple[int, int] | None:
        assert self.path is not None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def _has_content(self) -> bool:
        assert self.path is not None
        try:
            return os.path.getsize(self.path) > 0
        except OSError:
            return False

    def _open_writer(self) -> sqlite3.Connection:
        conn = self._connect()
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._create(conn)
        except BaseException:
            conn.close()
            raise
        self._wident = self._ident()
        return conn

    def _open_reader(self) -> sqlite3.Connection:
        conn = self._connect()
        conn.execute("PRAGMA query_only=1")
        self._rident = self._ident()
        return conn

    @staticmethod
    def _create(conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"store schema version {version} is newer than this "
                                        f"aistats ({SCHEMA_VERSION})")
        for stmt in _SCHEMA:
            conn.execute(stmt)
        if version != SCHEMA_VERSION:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @staticmethod
    def _stored_max_id(conn: sqlite3.Connection) -> int:
        row = conn.execute("SELECT max(id) FROM records").fetchone()
        meta = conn.execute("SELECT value FROM meta WHERE key = 'max_id'").fetchone()
        return max(row[0] or 0, int(meta[0]) if meta and meta[0] is not None else 0)

    def _startup(self, conn: sqlite3.Connection) -> None:
        """Prune by age; load persisted captures (or forget them when persistence is off)."""
        with _transaction(conn):
            if self.max_age_s is not None:
                conn.execute("DELETE FROM records WHERE end_epoch < ?",
                             (time.time() - self.max_age_s,))
                self._next_age_prune = time.monotonic() + AGE_PRUNE_INTERVAL
            if self.path is not None and not self.persist_captures:
                conn.execute("DELETE FROM captures")
            elif self.persist_captures:
                self._load_captures(conn)

    def _load_captures(self, conn: sqlite3.Connection) -> None:
        cache = self.captures
        if cache is None or not cache.enabled:
            conn.execute("DELETE FROM captures")
            return
        low = conn.execute("SELECT min(id) FROM records").fetchone()[0]
        conn.execute("DELETE FROM captures WHERE id < ?", (low if low is not None
                                                          else self._max_id + 1,))
        gone: list[int] = []
        for cid, blob in conn.execute("SELECT id, blob FROM captures ORDER BY seq").fetchall():
            stored, removed = cache.put_blob(cid, bytes(blob))
            gone += removed
            if not stored:
                gone.append(cid)
        if gone:
            conn.executemany("DELETE FROM captures WHERE id = ?", [(i,) for i in gone])

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        self._catch_up(CATCH_UP_S)
        with self._rlock:
            if self.path is not None:
                ident = self._ident()
                if ident is not None and ident != self._rident and self._has_content():
                    try:  # the file was replaced: read the new one if it opens
                        conn = self._open_reader()
                    except sqlite3.Error:
                        pass
                    else:
                        old, self._rconn = self._rconn, conn
                        try:
                            old.close()
                        except sqlite3.Error:
                            pass
            yield self._rconn

    # -- output side (event loop) ---------------------------------------------------------------
    def started(self, event: Started) -> None:
        pass

    def finished(self, event: Finished) -> None:
        """Enqueue the record (and, with captures on, its event); never blocks or raises."""
        rec = event.record
        if self._stop.is_set():
            self._drop(1)
            return
        capture = False
        size = 0
        cache = self.captures
        skipped = False
        if cache is not None and cache.enabled:
            size = event.body_bytes
            capture = True
        with self._cond:
            if rec.id > self._max_seen:
                self._max_seen = rec.id
            if capture and self._queued_bytes and (
                    self._queued_bytes + size > self.max_queue_bytes):
                capture, size, skipped = False, 0, True
            if not capture:  # queue the record without the bodies, which can be large
                event = event.without_bodies()
            try:
                self._q.put_nowait((event, capture, size))
            except queue.Full:
                self._queue_full += 1
                n = self._queue_full
            else:
                self._enqueued += 1
                self._queued_bytes += size
                if skipped:
                    self.captures_skipped += 1
                    if self.captures_skipped == 1 or self.captures_skipped % 1000 == 0:
                        log.warning("aistats: store queue holds over %d bytes of bodies; %d "
                                    "record(s) stored without a capture so far",
                                    self.max_queue_bytes, self.captures_skipped)
                return
        self._drop(1)
        if n == 1 or n % 1000 == 0:
            log.warning("aistats: store queue full, %d record(s) dropped so far", n)

    def close(self, wait: bool = False, timeout: float = 5.0) -> bool:
        """Stop accepting records; the writer stores what is queued, then exits. Returns at
        once unless ``wait`` (then at most ``timeout`` s); True when the writer has finished.
        Reads keep working after close."""
        self._hurry.set()
        return stop_writer(self._stop, self._q, self._thread, wait, timeout,
                           f"store {self._where_name}")

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every record queued so far is written (or dropped); False on timeout."""
        return self._catch_up(timeout)

    def _catch_up(self, timeout: float) -> bool:
        """Have the writer write what is queued now (not after gathering a batch) and wait for
        it, so a read sees every record finished before it. At once from the writer thread
        or when nothing is queued."""
        with self._cond:
            target = self._enqueued
            if self._done >= target or threading.current_thread() is self._thread:
                return True
        self._hurry.set()
        with self._cond:
            return self._cond.wait_for(lambda: self._done >= target, timeout)

    # -- writer thread -------------------------------------------------------------------------
    def _run(self) -> None:
        failures = 0
        while True:
            try:
                self._loop()
                break
            except Exception:  # a bug: database errors are handled where they happen
                failures += 1
                if failures == 1:
                    log.exception("aistats: store writer for %s failed; restarting it",
                                  self._where_name)
                if self._stop.is_set():
                    break
                time.sleep(IDLE_TICK)
        if self.path is not None:
            with self._wlock:
                try:
                    self._wconn.close()
                except sqlite3.Error:
                    pass

    def _loop(self) -> None:
        while not (self._stop.is_set() and self._q.empty()):
            try:
                item = self._q.get(timeout=IDLE_TICK)
            except queue.Empty:
                item = _WAKE
            if item is _WAKE:
                if self.max_age_s is not None and time.monotonic() >= self._next_age_prune:
                    self._maintain()
                continue
            # A batch opens: sleep while it gathers (a reader, flush() or close() cuts that
            # short), then take every record queued meanwhile at once. Waking for each record
            # would cost a GIL hand-off with the event loop each on a busy proxy.
            if not self._stop.is_set():
                self._hurry.wait(COALESCE_S)
            self._hurry.clear()
            batch = [item]
            while True:
                try:
                    item = self._q.get_nowait()
                except queue.Empty:
                    break
                if item is not _WAKE:
                    batch.append(item)
            for i in range(0, len(batch), BATCH):
                self._write(batch[i:i + BATCH])

    def _write(self, batch: list[tuple]) -> None:
        """One transaction; the records count as done (written or dropped) either way."""
        try:
            self._process(batch)
        finally:
            with self._cond:
                self._done += len(batch)
                self._queued_bytes -= sum(b[2] for b in batch)
                self._cond.notify_all()

    def _build_captures(self, batch: list[tuple]
                        ) -> list[tuple[int, bytes | tuple[Finished, frozenset[str]]]]:
        """Each capture of the batch, in record order: compressed now, or (event, mask) when
        its building can wait (CaptureCache.put_later): not for a kept (file) capture, nor
        when only decoding the body tells whether there is one."""
        out: list[tuple[int, bytes | tuple[Finished, frozenset[str]]]] = []
        cache = self.captures
        if cache is None or not cache.enabled:
            return out
        for event, capture, _ in batch:
            if not capture:
                continue
            rec = event.record
            mask = mask_for(rec.path, self.capture_parts)
            try:
                exists = None if self.persist_captures else capture_exists(event, mask,
                                                                           self.max_body)
                if exists:
                    out.append((rec.id, (event, mask)))
                elif exists is None and (blob := capture_blob(event, mask, self.max_body)):
                    out.append((rec.id, blob))
            except Exception:
                if not self._capture_bug_reported:
                    self._capture_bug_reported = True
                    log.exception("aistats: building the capture of record %s failed", rec.id)
        return out

    @staticmethod
    def _row(rec: Record, t_start: float, t_end: float, text: bytes) -> tuple:
        status = rec.status
        return (rec.id, t_start, t_end,
                *(getattr(rec, f) for f in _FROM_RECORD),
                f"{status // 100}xx" if status is not None else "none",
                *(getattr(rec, f) for f in _FROM_RECORD_2),
                1 if rec.error or rec.error_type else 0,
                text.decode())

    def _process(self, batch: list[tuple]) -> None:
        captures = self._build_captures(batch)
        rows = []
        for event, _, _ in batch:
            rec = event.record
            try:
                rows.append(self._row(rec, event.t_start, event.t_end, event.record_json()))
            except Exception:
                log.exception("aistats: record %s cannot be stored", rec.id)
                self._drop(1)
        if not rows:
            return
        cache = self.captures
        put: list[int] = []
        try:
            with self._wlock:
                conn = self._writer()
                with _transaction(conn):
                    conn.executemany(_INSERT, rows)
                    top = max(r[0] for r in rows)
                    conn.execute("INSERT INTO meta (key, value) VALUES ('max_id', ?) ON CONFLICT"
                                 "(key) DO UPDATE SET value = max(value, excluded.value)",
                                 (top,))
                    if cache is not None:
                        for cid, item in captures:
                            if isinstance(item, bytes):
                                stored, removed = cache.put_blob(cid, item)
                            else:
                                stored, removed = cache.put_later(cid, *item, self.max_body)
                            if stored:
                                put.append(cid)
                            if self.persist_captures:  # (always a blob)
                                self._mirror(conn, cid, item if stored else None,  # type: ignore[arg-type]
                                             removed)
                    self._prune(conn, time.time())
            self._max_id = max(self._max_id, top)
        except (sqlite3.Error, OSError) as e:
            if cache is not None and put:
                cache.discard(put)  # their records were not stored
            self._broken = True
            self._trouble(e)
            self._drop(len(rows))
            return
        self.written += len(rows)
        if self._outage:
            self._outage = False
            log.info("aistats: store %s writable again; %d record(s) dropped meanwhile",
                     self._where_name, self.dropped - self._dropped_at_outage)

    def _writer(self) -> sqlite3.Connection:
        """The writer connection, reopened after a failure or when the file was replaced."""
        if self.path is None:
            return self._wconn
        if self._broken or self._ident() != self._wident:
            try:
                self._wconn.close()
            except sqlite3.Error:
                pass
            self._wconn = self._open_writer()
            self._broken = False
        return self._wconn

    @staticmethod
    def _mirror(conn: sqlite3.Connection, cid: int, blob: bytes | None,
                removed: list[int]) -> None:
        if removed:
            conn.executemany("DELETE FROM captures WHERE id = ?", [(i,) for i in removed])
        if blob is not None:
            conn.execute("INSERT OR REPLACE INTO captures (id, blob) VALUES (?, ?)", (cid, blob))

    def _prune(self, conn: sqlite3.Connection, now: float) -> None:
        if self.max_rows:
            conn.execute("DELETE FROM records WHERE id <= (SELECT id FROM records ORDER BY id "
                         "DESC LIMIT 1 OFFSET ?)", (self.max_rows,))
        if self.max_age_s is not None:
            conn.execute("DELETE FROM records WHERE end_epoch < ?", (now - self.max_age_s,))
            self._next_age_prune = time.monotonic() + AGE_PRUNE_INTERVAL
        if self.captures is not None:
            low = conn.execute("SELECT min(id) FROM records").fetchone()[0]
            threshold = low if low is not None else max(self._max_id, self._max_seen) + 1
            self.captures.discard_below(threshold)
            if self.persist_captures:
                conn.execute("DELETE FROM captures WHERE id < ?", (threshold,))

    def _maintain(self) -> None:
        """Idle work: the age prune."""
        try:
            with self._wlock:
                conn = self._writer()
                with _transaction(conn):
                    self._prune(conn, time.time())
        except (sqlite3.Error, OSError) as e:
            self._broken = True
            self._next_age_prune = time.monotonic() + AGE_PRUNE_INTERVAL
            self._trouble(e)

    def _trouble(self, e: BaseException) -> None:
        """Report the start of an outage once; records are dropped until a batch is written."""
        if self._outage:
            return
        self._outage = True
        self._dropped_at_outage = self.dropped
        msg = (f"aistats: cannot write store {self._where_name} ({_why(e)}); dropping records "
               f"until it is writable again")
        try:
            self._report(" ".join(msg.split()))
        except Exception:
            log.warning("%s", msg)

    def _drop(self, n: int) -> None:
        self._drops(n)

    @property
    def dropped(self) -> int:
        """Records lost for any reason (see ``on_drop``)."""
        return self._drops.count

    # -- reads (any thread) -------------------------------------------------------------------
    def next_id(self) -> int:
        """1 + the largest id ever stored (1 for a new store), or queued since."""
        with self._reading() as conn:
            stored = self._stored_max_id(conn)
        return max(stored, self._max_id, self._max_seen) + 1

    def _overlay(self, text: str) -> dict[str, Any]:
        d = orjson.loads(text)
        cache = self.captures
        d["has_capture"] = cache.has(d["id"]) if cache is not None else False
        return d

    def record(self, id: int) -> dict[str, Any] | None:
        with self._reading() as conn:
            row = conn.execute("SELECT record FROM records WHERE id = ?", (id,)).fetchone()
        return self._overlay(row[0]) if row else None

    def capture(self, id: int) -> dict[str, Any] | None:
        cache = self.captures
        if cache is None:
            return None
        self._catch_up(CATCH_UP_S)
        return cache.get(id)

    def activity(self, filters: Filters = ALL, sort: str = "id", order: str = "desc",
                 page: int = 1, limit: int = 25) -> dict[str, Any]:
        """A page of records: ``{data, page, limit, total, total_pages}``."""
        column = _sort_column(sort)
        direction = _order(order)
        page = _int("page", page, 1)
        limit = _int("limit", limit, 1, MAX_LIMIT)
        where, args = _where(filters)
        with self._reading() as conn:
            total = conn.execute(f"SELECT count(*) FROM records {where}", args).fetchone()[0]
            rows = conn.execute(
                f"SELECT record FROM records {where} ORDER BY {_order_by(column, direction)} "
                f"LIMIT ? OFFSET ?", [*args, limit, (page - 1) * limit]).fetchall()
        return {"data": [self._overlay(r[0]) for r in rows], "page": page, "limit": limit,
                "total": total, "total_pages": -(-total // limit)}

    def export(self, filters: Filters = ALL, sort: str = "id", order: str = "desc",
               max_rows: int = 100_000) -> Iterator[dict[str, Any]]:
        """Records for an export, read in chunks of ``EXPORT_CHUNK`` (records stored after the
        call are left out). Parameters are checked now (ValueError)."""
        column = _sort_column(sort)
        direction = _order(order)
        max_rows = _int("max_rows", max_rows, 0)
        _where(filters)  # ValueError now, not at the first next()
        with self._reading() as conn:
            top = conn.execute("SELECT max(id) FROM records").fetchone()[0] or 0
        where, args = _where(filters, (f"id <= {int(top)}",))
        return self._export(where, args, _order_by(column, direction), max_rows)

    def _export(self, where: str, args: list[Any], order_by: str, max_rows: int
                ) -> Iterator[dict[str, Any]]:
        offset = 0
        while offset < max_rows:
            n = min(EXPORT_CHUNK, max_rows - offset)
            with self._reading() as conn:
                rows = conn.execute(f"SELECT record FROM records {where} ORDER BY {order_by} "
                                    f"LIMIT ? OFFSET ?", [*args, n, offset]).fetchall()
            for r in rows:
                yield self._overlay(r[0])
            if len(rows) < n:
                return
            offset += n

    def stats(self, filters: Filters = ALL) -> dict[str, Any]:
        """Totals, token-weighted average speeds and distributions (see the keys below).

        * totals: ``requests``, ``errors`` (records with an error or error type), the token
          sums (None when no record reports that count) and ``cost_usd`` (None when no record
          has a cost);
        * ``avg_speeds``: Σ tokens ÷ Σ (tokens ÷ speed) over the records that have the speed,
          i.e. tokens per second of the time those records took: prefill from the server's
          ``prompt_per_second`` over the prompt tokens it processed (input − cached); decode
          from the server's ``tokens_per_second`` over the output tokens, and from the proxy's
          ``observed_tokens_per_second`` over output − 1 tokens (its own definition);
        * ``distributions``: for ``ttft_ms`` and the three speeds (values > 0), None when there
          are none, else ``{count, p50, p95, p99, histogram: {bins, min, max, bin_size}}`` —
          percentiles by linear interpolation, Sturges' bin count (5–20), one bin of size 0
          when all values are equal.
        """
        where, args = _where(filters)
        with self._reading() as conn:
            t = conn.execute(
                "SELECT count(*), sum(input_tokens), sum(cached_tokens), "
                "sum(cache_creation_tokens), sum(output_tokens), sum(reasoning_tokens), "
                f"sum(total_tokens), sum(failed), sum(cost_usd) FROM records {where}",
                args).fetchone()
            speeds = {
                "prompt_per_second": self._weighted(
                    conn, where, args, "input_tokens - coalesce(cached_tokens, 0)",
                    "prompt_per_second"),
                "tokens_per_second": self._weighted(conn, where, args, "output_tokens",
                                                    "tokens_per_second"),
                "observed_tokens_per_second": self._weighted(
                    conn, where, args, "output_tokens - 1", "observed_tokens_per_second"),
            }
            dists = {c: self._distribution(conn, filters, c) for c in DISTRIBUTIONS}
        return {
            "requests": t[0], "input_tokens": t[1], "cached_tokens": t[2],
            "cache_creation_tokens": t[3], "output_tokens": t[4], "reasoning_tokens": t[5],
            "total_tokens": t[6], "errors": t[7] or 0, "cost_usd": t[8],
            "avg_speeds": speeds, "distributions": dists,
        }

    @staticmethod
    def _weighted(conn: sqlite3.Connection, where: str, args: list[Any], tokens: str,
                  speed: str) -> float | None:
        cond = f"{speed} > 0 AND ({tokens}) > 0"
        full = f"{where} AND {cond}" if where else f"WHERE {cond}"
        n, secs = conn.execute(f"SELECT sum({tokens}), sum(({tokens}) / {speed}) FROM records "
                               f"{full}", args).fetchone()
        if not n or not secs:
            return None
        return n / secs

    @staticmethod
    def _distribution(conn: sqlite3.Connection, filters: Filters, column: str
                      ) -> dict[str, Any] | None:
        where, args = _where(filters, (f"{column} > 0",))
        n, lo, hi = conn.execute(f"SELECT count({column}), min({column}), max({column}) "
                                 f"FROM records {where}", args).fetchone()
        if not n:
            return None

        def at(i: int) -> float:
            return conn.execute(f"SELECT {column} FROM records {where} ORDER BY {column} "
                                f"LIMIT 1 OFFSET ?", [*args, i]).fetchone()[0]

        pct = {f"p{p}": percentile(at, n, p) for p in PERCENTILES}
        if lo == hi:
            hist = {"bins": [n], "min": lo, "max": hi, "bin_size": 0.0}
        else:
            k = sturges_bins(n)
            size = (hi - lo) / k
            bins = [0] * k
            for b, count in conn.execute(
                    f"SELECT min(CAST(({column} - ?) / ? AS INTEGER), ?) AS b, count(*) "
                    f"FROM records {where} GROUP BY b", [lo, size, k - 1, *args]):
                bins[max(0, int(b))] += count
            hist = {"bins": bins, "min": lo, "max": hi, "bin_size": size}
        return {"count": n, **pct, "histogram": hist}

    def sessions(self, filters: Filters = ALL, sort: str = "last_seen", order: str = "desc",
                 page: int = 1, limit: int = 25) -> dict[str, Any]:
        """A page of sessions (records with a ``session_id``), same shape as ``activity``.
        Rows: ``session_id, requests, input_tokens, cached_tokens, cache_creation_tokens,
        output_tokens, reasoning_tokens`` (sums; None when no record reports the count),
        ``cache_hit_ratio`` (cached ÷ input; None when either is unknown or input is 0),
        ``errors``, ``first_seen`` (earliest start) / ``last_seen`` (latest end) in RFC 3339,
        ``models`` / ``clients`` (sorted, distinct) and ``cost_usd`` (None when none priced).
        Sort keys: ``SESSION_SORT_KEYS``; ties by session id, unknown values last."""
        if not isinstance(sort, str) or sort not in SESSION_SORT_KEYS:
            raise ValueError(f"sort must be one of {', '.join(SESSION_SORT_KEYS)}, not {sort!r}")
        direction = _order(order)
        page = _int("page", page, 1)
        limit = _int("limit", limit, 1, MAX_LIMIT)
        where, args = _where(filters, ("session_id IS NOT NULL",))
        with self._reading() as conn:
            total = conn.execute(f"SELECT count(DISTINCT session_id) FROM records {where}",
                                 args).fetchone()[0]
            rows = self._session_rows(
                conn, where, args,
                f"ORDER BY {_order_by(_SESSION_AGGREGATES[sort], direction, 'session_id')} "
                f"LIMIT ? OFFSET ?",
                [limit, (page - 1) * limit])
        return {"data": rows, "page": page, "limit": limit, "total": total,
                "total_pages": -(-total // limit)}

    @staticmethod
    def _session_rows(conn: sqlite3.Connection, where: str, args: list[Any], tail: str,
                      tail_args: list[Any]) -> list[dict[str, Any]]:
        cur = conn.execute(f"SELECT {', '.join(_SESSION_COLUMNS)} FROM records {where} "
                           f"GROUP BY session_id {tail}", [*args, *tail_args])
        names = [d[0] for d in cur.description]
        out = []
        for row in cur.fetchall():
            d = dict(zip(names, row))
            d["errors"] = d["errors"] or 0
            if d["cached_tokens"] is None:
                d["cache_hit_ratio"] = None
            d["first_seen"] = rfc3339_ms(d["first_seen"]) if d["first_seen"] is not None \
                else None
            d["last_seen"] = rfc3339_ms(d["last_seen"]) if d["last_seen"] is not None else None
            d["models"] = sorted(m for m in orjson.loads(d["models"]) if m is not None)
            d["clients"] = sorted(c for c in orjson.loads(d["clients"]) if c is not None)
            out.append(d)
        return out

    def session(self, session_id: str, max_requests: int = 1000) -> dict[str, Any] | None:
        """The session's summary (as in ``sessions``, its count as ``request_count``) plus
        ``requests``: its newest ``max_requests`` records in id order (``requests_truncated``
        when it has more)."""
        max_requests = _int("max_requests", max_requests, 1)
        where, args = _where(Filters(session=session_id))
        with self._reading() as conn:
            rows = self._session_rows(conn, where, args, "", [])
            if not rows:
                return None
            recs = conn.execute(f"SELECT record FROM records {where} ORDER BY id DESC "
                                f"LIMIT ?", [*args, max_requests]).fetchall()
        out = rows[0]
        out["request_count"] = out["requests"]
        out["requests"] = [self._overlay(r[0]) for r in reversed(recs)]
        out["requests_truncated"] = out["request_count"] > len(recs)
        return out
