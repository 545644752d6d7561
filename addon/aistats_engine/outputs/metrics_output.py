"""Metrics as an output: the registry (``metrics.py``) fed by records. The endpoint that serves
it is the web server's (``web/server.py``), which asks for the current registry per scrape, so
a registry rebuilt at run time is served at once, under the same port."""

from __future__ import annotations

from collections.abc import Callable

from .bus import Finished, Started
from .metrics import Metrics, MetricsConfig


class MetricsOutput:
    def __init__(self, config: MetricsConfig, inflight: Callable[[], int],
                 overhead: Callable[[], float]) -> None:
        self.metrics = Metrics(config, inflight=inflight)
        self._overhead = overhead
        self._overhead_seen = overhead()

    def started(self, event: Started) -> None:
        pass

    def finished(self, event: Finished) -> None:
        self.metrics.observe(event.record)
        total = self._overhead()
        self.metrics.add_overhead(total - self._overhead_seen)
        self._overhead_seen = total

    def dropped(self, output: str, n: int) -> None:
        self.metrics.output_dropped(output, n)

    def close(self, wait: bool = False) -> None:
        pass
