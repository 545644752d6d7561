"""Metrics as an output: the registry (``metrics.py``) fed by records, and the endpoint
(``metrics_server.py``) serving it.

Rebuilt at run time when a metrics option changes. The endpoint is handed over when its address
did not change (the new registry is swapped in under it, so the port is never released and a
scraper never sees a gap), else the new endpoint is bound before the old one is stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client.metrics_core import Metric

from .bus import Finished, Started
from .metrics import Metrics, MetricsConfig
from .metrics_server import MetricsServer


class RegistrySlot:
    """What the endpoint serves: whichever registry is current (swappable under a live port)."""

    def __init__(self, target: object) -> None:
        self.target = target

    def collect(self) -> Iterable[Metric]:
        return self.target.collect()  # type: ignore[attr-defined, no-any-return]


class MetricsOutput:
    def __init__(self, config: MetricsConfig, inflight: Callable[[], int],
                 overhead: Callable[[], float]) -> None:
        self.metrics = Metrics(config, inflight=inflight)
        self._overhead = overhead
        self._overhead_seen = overhead()
        self.server: MetricsServer | None = None
        self._slot: RegistrySlot | None = None

    def serve(self, host: str, port: int, previous: MetricsOutput | None = None) -> None:
        """Serve on host:port, taking over ``previous``'s endpoint when it is the same address.
        Raises OSError when the address cannot be bound (the caller reports it)."""
        old = previous.server if previous is not None else None
        if old is not None and previous is not None and previous._slot is not None and \
                old.host == host and port in (0, old.port):
            previous._slot.target = self.metrics.registry
            self.server, self._slot = old, previous._slot
            previous.server = previous._slot = None
            return
        slot = RegistrySlot(self.metrics.registry)
        server = MetricsServer(slot, host=host, port=port)  # type: ignore[arg-type]
        server.start()
        self.server, self._slot = server, slot

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
        if self.server is not None:
            self.server.stop()
            self.server = self._slot = None
