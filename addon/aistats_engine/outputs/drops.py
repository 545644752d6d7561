"""Records an output could not keep (queue full, disk gone, write failed): counted from any
thread and handed to ``on_drop`` (the caller's metric). A failing callback is reported once and
never reaches the output that dropped."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Drops:
    __slots__ = ("count", "_on_drop", "_owner", "_lock", "_reported")

    def __init__(self, on_drop: Callable[[int], None] | None, owner: str) -> None:
        self.count = 0
        self._on_drop = on_drop
        self._owner = owner  # "log", "store": named in the one report of a failing callback
        self._lock = threading.Lock()
        self._reported = False

    def __call__(self, n: int) -> None:
        if n <= 0:
            return
        with self._lock:
            self.count += n
        if self._on_drop is not None:
            try:
                self._on_drop(n)
            except Exception:
                if not self._reported:
                    self._reported = True
                    log.warning("aistats: %s on_drop callback failed", self._owner, exc_info=True)
