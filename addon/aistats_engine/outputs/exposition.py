"""The Prometheus exposition of a registry, as the web endpoint (``web/server.py``) serves it on
``GET /metrics``: OpenMetrics 1.0 (with exemplars) when the ``Accept`` header asks for
``application/openmetrics-text``, else the Prometheus text format 0.0.4. In 0.0.4 the
``*_created`` helper gauges are left out (Prometheus ignores them there and they double the
series count), and a family with ``prometheus_text_type = "counter"`` is declared ``counter``
under its own name — how Envoy exposes the Higress counters, which have no ``_total``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as openmetrics

OPENMETRICS = "application/openmetrics-text"


def wants_openmetrics(accept: str | None) -> bool:
    """True when the Accept header lists OpenMetrics with a non-zero quality."""
    for part in (accept or "").split(","):
        media, *params = (p.strip() for p in part.split(";"))
        if media.lower() != OPENMETRICS:
            continue
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    if float(value) <= 0:
                        break
                except ValueError:
                    break
        else:
            return True
    return False


class _Families:
    """Adapter: a list of metric families as a collector for ``generate_latest``."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def render(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """The exposition of ``registry`` for a scrape with this Accept header: (body, content type)."""
    if wants_openmetrics(accept):
        body: bytes = openmetrics.generate_latest(registry)  # type: ignore[no-untyped-call]
        return body, openmetrics.CONTENT_TYPE_LATEST
    return prometheus_text(registry), CONTENT_TYPE_PLAIN_0_0_4


def prometheus_text(registry: CollectorRegistry) -> bytes:
    """Prometheus text 0.0.4 (no exemplars), see the module docstring for the two adjustments."""
    out: list[bytes] = []
    for family in registry.collect():
        created = family.name + "_created"
        if any(s.name == created for s in family.samples):
            family = copy.copy(family)
            family.samples = [s for s in family.samples if s.name != created]
        text = generate_latest(_Families([family]))
        declared = getattr(family, "prometheus_text_type", None)
        if declared:
            text = text.replace(
                f"# TYPE {family.name} untyped\n".encode(),
                f"# TYPE {family.name} {declared}\n".encode(),
                1,
            )
        out.append(text)
    return b"".join(out)
