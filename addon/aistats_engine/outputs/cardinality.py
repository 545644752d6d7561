"""Bound the number of distinct values a metric label can take.

Every distinct label value mints a new time series, and each series costs memory in this process
and in Prometheus for as long as it lives. Model names, hosts and consumers come from the traffic,
so a typo loop or a client inventing model names would grow both without bound (LiteLLM #12159,
PR #39136). The guard admits the first ``limit`` distinct values of each label *kind* and maps
every later newcomer to ``"other"``, counting it in ``aistats_label_overflow_total{label=kind}``.

Admission is first come, first served and never expires: a series, once admitted, keeps its name
for the life of the process, so dashboards do not flicker. Memory is O(sum of limits).

Default limits (:data:`DEFAULT_LIMITS`; any other kind gets ``default_limit`` = 100):

- ``model`` 100: requested and response model, Higress ``ai_model``
- ``server`` 50: ``host:port`` pairs (``server_address``/``server_port``, Higress ``ai_route``/``ai_cluster``)
- ``provider`` 30, ``operation`` 30, ``error_type`` 30
- ``consumer`` 100: the opt-in ``consumer`` label, Higress ``ai_consumer``
- ``parse_error_kind`` 20: ``aistats_parse_errors_total{kind}``

The empty string (unknown) and ``"other"`` itself are always allowed and not counted. Values
longer than ``max_length`` (default 128 characters) are cut before admission.

Per-kind limits still allow their product (models × servers × consumers …) as series, so the
metrics also bound the label tuples per family (``MetricsConfig.max_series``); a tuple folded
there is counted here too, as ``aistats_label_overflow_total{label="series"}``.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter

OTHER = "other"

DEFAULT_LIMITS: Mapping[str, int] = {
    "model": 100,
    "server": 50,
    "provider": 30,
    "operation": 30,
    "consumer": 100,
    "error_type": 30,
    "parse_error_kind": 20,
}
DEFAULT_LIMIT = 100
DEFAULT_MAX_LENGTH = 128


class LabelGuard:
    """Map raw label values to admitted values or ``"other"``; thread-safe."""

    def __init__(
        self,
        limits: Mapping[str, int] | None = None,
        default_limit: int = DEFAULT_LIMIT,
        max_length: int = DEFAULT_MAX_LENGTH,
        registry: CollectorRegistry | None = None,
    ) -> None:
        merged = dict(DEFAULT_LIMITS)
        merged.update(limits or {})
        for kind, limit in [*merged.items(), ("default", default_limit)]:
            if limit < 0:
                raise ValueError(f"label limit for {kind!r} must be >= 0, got {limit}")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self._limits = merged
        self._default_limit = default_limit
        self._max_length = max_length
        self._seen: dict[str, set[str]] = {}
        self._lock = threading.Lock()
        self._overflow_children: dict[str, Any] = {}
        self._overflow = Counter(
            "aistats_label_overflow",
            "Label values replaced by 'other' because the label already had its limit of "
            "distinct values (see the cardinality guard).",
            ["label"],
            registry=registry,
        )

    def limit(self, kind: str) -> int:
        return self._limits.get(kind, self._default_limit)

    def admitted(self, kind: str) -> int:
        """How many distinct values of ``kind`` have been admitted so far."""
        with self._lock:
            return len(self._seen.get(kind, ()))

    def __call__(self, kind: str, value: str | None) -> str:
        """The value to use for a label of ``kind``; ``None`` becomes ``""``."""
        if not value:
            return ""
        if len(value) > self._max_length:
            value = value[: self._max_length]
        if value == OTHER:
            return value
        # Admitted values never leave their set: the common case needs no lock (a set lookup is
        # atomic, and the set only grows).
        seen = self._seen.get(kind)
        if seen is not None and value in seen:
            return value
        with self._lock:
            seen = self._seen.get(kind)
            if seen is None:
                seen = self._seen[kind] = set()
            if value in seen:
                return value
            if len(seen) < self.limit(kind):
                seen.add(value)
                return value
        self.count_overflow(kind)
        return OTHER

    def count_overflow(self, kind: str) -> None:
        """Count one value of ``kind`` replaced by ``"other"`` (also used for ``"series"``)."""
        child = self._overflow_children.get(kind)
        if child is None:  # labels() validates on every call; the child is cached instead
            child = self._overflow_children.setdefault(kind, self._overflow.labels(kind))
        child.inc()
