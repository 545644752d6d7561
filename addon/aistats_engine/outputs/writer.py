"""What the outputs' writer threads (the log's and the store's) share: how they are stopped.
Each drains a queue on a daemon thread of its own and checks a stop flag between batches;
``WAKE`` in its queue makes an idle writer notice the flag at once."""

from __future__ import annotations

import logging
import queue
import threading

log = logging.getLogger(__name__)

WAKE = object()  # queued by stop_writer(); not a record


def stop_writer(stop: threading.Event, q: queue.Queue, thread: threading.Thread, wait: bool,
                timeout: float, what: str) -> bool:
    """Set the writer's stop flag and wake it; it writes what is queued, then exits. Returns at
    once unless ``wait`` (process exit), then waits at most ``timeout`` seconds. True when the
    writer has finished; a writer still busy then is reported as ``what``."""
    stop.set()
    try:
        q.put_nowait(WAKE)
    except queue.Full:
        pass  # a full queue: the writer checks the stop flag after each batch anyway
    if not wait:
        return not thread.is_alive()
    thread.join(max(0.0, timeout))
    if thread.is_alive():
        log.warning("aistats: %s not finished within %.1fs; %d queued record(s) may be lost",
                    what, timeout, q.qsize())
        return False
    return True
