"""Live events for the UI: an output on the bus that feeds Server-Sent Events.

The bus calls ``started`` and ``finished`` on mitmproxy's thread. Those calls only append a
reference to a bounded hand-off queue and, when the queue was empty, wake the web server's loop
once (``loop.call_soon_threadsafe``); the record is turned into JSON there, never on the proxy's
loop. When no browser is connected they return at once.

Each connected client has its own bounded queue (:attr:`EventHub.max_queue` messages and
:attr:`EventHub.max_queue_bytes` bytes). The web handler writes what is queued and waits for the
socket to take it before writing more, so a slow or stalled browser holds at most one queue and
one batch in memory. When its queue overflows, the queue is dropped and replaced by a single
``event: resync`` message: the UI then refetches what it shows. The same happens to every client
when the hand-off queue overflows (the web loop fell behind).

Messages (``event:`` name, ``data:`` one JSON object):

* ``record``: the new record, as the activity rows carry it (``Record.to_dict()`` with
  ``has_capture``).
* ``inflight``: ``{"op": "upsert", "request": {...}}`` when a request starts,
  ``{"op": "remove", "id": flow_id, "record_id": n}`` when its record is written, and every
  ``snapshot_interval`` seconds while clients are connected ``{"op": "snapshot", "requests":
  [...]}`` from ``inflight()`` (so elapsed time and bytes move). A snapshot supersedes the
  in-flight messages queued before it, which are dropped.
* ``resync``: ``{}``, see above.
* ``hello``: ``{"server_time": epoch}``, first on every connection.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson

from ..outputs.bus import Finished, Started

log = logging.getLogger(__name__)

MAX_QUEUE = 500
MAX_QUEUE_BYTES = 8 << 20
MAX_PENDING = 10_000
SNAPSHOT_INTERVAL = 1.0
MAX_CLIENTS = 64

RESYNC = b"event: resync\ndata: {}\n\n"


def sse(event: str, data: Any) -> bytes:
    """One SSE message: ``event: <name>`` and the JSON on one ``data:`` line."""
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(
        data, option=orjson.OPT_NON_STR_KEYS, default=str) + b"\n\n"


def record_row(record: Any) -> dict[str, Any]:
    """A record as the activity rows carry it."""
    row = record.to_dict()
    row["has_capture"] = bool(getattr(record, "has_capture", False))
    return row


def started_row(event: Started) -> dict[str, Any]:
    return {
        "id": event.flow_id, "method": event.method, "host": event.host, "path": event.path,
        "model": event.model, "client": getattr(event, "client", None),
        "session_id": getattr(event, "session_id", None), "started": event.t_start,
        "elapsed_ms": max(0.0, (time.time() - event.t_start) * 1000.0), "bytes": 0,
    }


def inflight_rows(inflight: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """``inflight()``, tried twice: it reads the proxy's state from another thread, and a
    dict changed under it raises RuntimeError."""
    try:
        return list(inflight())
    except RuntimeError:
        return list(inflight())


class Client:
    """One connected browser: its queue, lives on the loop of the server it connected to."""

    __slots__ = ("queue", "queued_bytes", "wake", "closed", "resyncs", "sent", "dropped",
                 "connected_at", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.queue: deque[tuple[str, bytes]] = deque()
        self.queued_bytes = 0
        self.wake = asyncio.Event()
        self.closed = False
        self.resyncs = 0  # times the queue overflowed
        self.dropped = 0  # messages dropped by overflows
        self.sent = 0
        self.connected_at = time.time()
        self.loop = loop

    def take(self) -> list[bytes]:
        """Everything queued, oldest first (the queue is emptied)."""
        out = [m for _, m in self.queue]
        self.queue.clear()
        self.queued_bytes = 0
        self.wake.clear()
        self.sent += len(out)
        return out

    def close(self) -> None:
        self.closed = True
        self.wake.set()


class EventHub:
    """The bus output behind ``/api/events``; see the module docstring.

    ``started``/``finished``/``close`` may be called from any thread. ``attach``, ``connect``,
    ``disconnect`` and ``detach`` are the web server's, on its own loop. While a server is being
    replaced, two may be attached: events go to the newest one's clients.
    """

    def __init__(self, inflight: Callable[[], list[dict[str, Any]]] | None = None, *,
                 max_queue: int = MAX_QUEUE, max_queue_bytes: int = MAX_QUEUE_BYTES,
                 max_pending: int = MAX_PENDING, snapshot_interval: float = SNAPSHOT_INTERVAL,
                 max_clients: int = MAX_CLIENTS) -> None:
        if max_queue < 2 or max_pending < 1 or max_clients < 1 or not snapshot_interval > 0:
            raise ValueError("EventHub bounds must be positive (max_queue >= 2)")
        self.max_queue = max_queue
        self.max_queue_bytes = max_queue_bytes
        self.max_pending = max_pending
        self.snapshot_interval = snapshot_interval
        self.max_clients = max_clients
        self._inflight = inflight  # for the snapshots; the server's when None
        self._lock = threading.Lock()
        self._pending: deque[tuple[str, Any]] = deque()
        self._overflowed = False  # the hand-off queue overflowed since the last drain
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None  # the newest server's
        self._clients: dict[asyncio.AbstractEventLoop, set[Client]] = {}
        self._ticks: dict[asyncio.AbstractEventLoop, asyncio.TimerHandle] = {}
        self._nclients = 0  # read without the lock on the proxy's thread
        self._closed = False
        self.resyncs = 0  # overflows, all clients together
        self.records_sent = 0

    # -- bus side (any thread) -----------------------------------------------------------
    def started(self, event: Started) -> None:
        if self._nclients:
            self._hand_off("started", event)

    def finished(self, event: Finished) -> None:
        if self._nclients:
            self._hand_off("finished", event.record)  # not the event: its bodies can go

    def close(self, wait: bool = False) -> None:
        """No more events; connected streams are ended (browsers reconnect by themselves)."""
        self._closed = True
        for loop in list(self._clients):
            if not loop.is_closed():
                try:
                    loop.call_soon_threadsafe(self._end, loop)
                except RuntimeError:
                    pass

    def _hand_off(self, kind: str, item: Any) -> None:
        loop = self._loop
        if loop is None or self._closed:
            return
        with self._lock:
            if len(self._pending) >= self.max_pending:
                self._pending.clear()
                self._overflowed = True
            self._pending.append((kind, item))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: the server stopped
            with self._lock:
                self._scheduled = False
                self._pending.clear()

    # -- web side (a web server's loop) ----------------------------------------------------
    def attach(self, loop: asyncio.AbstractEventLoop,
               inflight: Callable[[], list[dict[str, Any]]] | None = None) -> None:
        """Called by a web server on its loop when it starts (``inflight``: used when the hub
        was built without one). Events go to the clients of the server attached last."""
        with self._lock:
            self._loop = loop
            self._scheduled = False
            self._pending.clear()
        self._closed = False
        if self._inflight is None:
            self._inflight = inflight

    def detach(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Called by a web server on its loop when it stops: its clients are ended."""
        loop = loop or asyncio.get_running_loop()
        self._end(loop)
        with self._lock:
            if self._loop is loop:
                self._loop = None
                self._pending.clear()
                self._scheduled = False

    @property
    def clients(self) -> int:
        return self._nclients

    def client_stats(self) -> list[dict[str, Any]]:
        return [{"queued": len(c.queue), "queued_bytes": c.queued_bytes, "resyncs": c.resyncs,
                 "dropped": c.dropped, "sent": c.sent}
                for group in list(self._clients.values()) for c in list(group)]

    def connect(self) -> Client | None:
        """A new client (on the running loop) with the hello and an in-flight snapshot queued;
        None when there are too many or the hub is closed."""
        if self._nclients >= self.max_clients or self._closed:
            return None
        loop = asyncio.get_running_loop()
        client = Client(loop)
        self._clients.setdefault(loop, set()).add(client)
        self._count()
        self._push(client, "hello", sse("hello", {"server_time": time.time()}))
        snap = self._snapshot_message()
        if snap is not None:
            self._push(client, "inflight", snap)
        if loop not in self._ticks:
            self._ticks[loop] = loop.call_later(self.snapshot_interval, self._tick, loop)
        return client

    def disconnect(self, client: Client) -> None:
        client.close()
        group = self._clients.get(client.loop)
        if group is not None:
            group.discard(client)
            if not group:
                del self._clients[client.loop]
                handle = self._ticks.pop(client.loop, None)
                if handle is not None:
                    handle.cancel()
        self._count()

    def _count(self) -> None:
        self._nclients = sum(len(g) for g in self._clients.values())

    def _end(self, loop: asyncio.AbstractEventLoop) -> None:
        for c in list(self._clients.get(loop, ())):
            self.disconnect(c)

    def _drain(self) -> None:
        with self._lock:
            items = list(self._pending)
            self._pending.clear()
            overflowed, self._overflowed = self._overflowed, False
            self._scheduled = False
            loop = self._loop
        clients = list(self._clients.get(loop, ())) if loop is not None else []
        if overflowed:
            for c in clients:
                self._resync(c)
        if not clients:
            return
        for kind, item in items:
            try:
                if kind == "started":
                    msgs = [("inflight", sse("inflight", {"op": "upsert",
                                                          "request": started_row(item)}))]
                else:
                    msgs = [("inflight", sse("inflight", {"op": "remove", "id": item.flow_id,
                                                          "record_id": item.id})),
                            ("record", sse("record", record_row(item)))]
                    self.records_sent += 1
            except Exception:  # one bad record must not stop the others
                log.exception("aistats: event for the UI failed")
                continue
            for c in clients:
                for k, m in msgs:
                    self._push(c, k, m)

    def _push(self, client: Client, kind: str, message: bytes) -> None:
        if client.closed:
            return
        if (len(client.queue) >= self.max_queue
                or client.queued_bytes + len(message) > self.max_queue_bytes):
            self._resync(client)
        client.queue.append((kind, message))
        client.queued_bytes += len(message)
        client.wake.set()

    def _resync(self, client: Client) -> None:
        """Drop what the client has queued; one resync message takes its place."""
        client.dropped += sum(1 for k, _ in client.queue if k != "resync")
        client.queue.clear()
        client.queue.append(("resync", RESYNC))
        client.queued_bytes = len(RESYNC)
        client.resyncs += 1
        self.resyncs += 1
        client.wake.set()

    def _snapshot_message(self) -> bytes | None:
        if self._inflight is None:
            return None
        try:
            requests = inflight_rows(self._inflight)
        except Exception:
            log.debug("aistats: in-flight snapshot failed", exc_info=True)
            return None
        return sse("inflight", {"op": "snapshot", "requests": requests})

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self._ticks.pop(loop, None)
        clients = list(self._clients.get(loop, ()))
        if not clients:
            return
        snap = self._snapshot_message()
        if snap is not None:
            for c in clients:
                # the snapshot supersedes the in-flight messages still queued
                if any(k == "inflight" for k, _ in c.queue):
                    kept = [(k, m) for k, m in c.queue if k != "inflight"]
                    c.queue.clear()
                    c.queue.extend(kept)
                    c.queued_bytes = sum(len(m) for _, m in kept)
                self._push(c, "inflight", snap)
        self._ticks[loop] = loop.call_later(self.snapshot_interval, self._tick, loop)
