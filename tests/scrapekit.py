"""Scraping the addon's metrics endpoint in end-to-end tests (Prometheus text 0.0.4)."""

from __future__ import annotations

import re
import time
import urllib.request

OPENMETRICS_ACCEPT = "application/openmetrics-text; version=1.0.0; charset=utf-8"
WAIT_S = 15.0  # bound on every wait for a record to reach the metrics

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# -- scraping ------------------------------------------------------------------------------------

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # ignore *_proxy env vars


def scrape(url: str, accept: str | None = None) -> str:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with _DIRECT.open(req, timeout=5) as r:
        assert r.status == 200
        return r.read().decode()


_SAMPLE = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+-?\d+)?$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)",?')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def samples(text: str, prefixes: tuple[str, ...] = ("",)) -> Samples:
    """Prometheus 0.0.4 text → {(sample name as exposed, sorted labels): value}, for names with
    one of ``prefixes``. (prometheus_client's parser would rename the Higress counters, which
    have no ``_total``, to ``..._total``; Prometheus itself keeps the exposed names.)"""
    out: Samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name, labels, value = m.groups()
        if not name.startswith(prefixes):
            continue
        pairs = tuple(sorted(
            (k, re.sub(r"\\[\\\"n]", lambda e: _UNESCAPE[e.group()], v))
            for k, v in _LABEL.findall(labels or "")))
        key = (name, pairs)
        assert key not in out, f"duplicate series {key}"
        out[key] = float(value)
    return out


def total(smp: Samples, name: str, **labels: str) -> float:
    """Sum of the samples named ``name`` whose labels include ``labels``."""
    return sum(v for (n, lbl), v in smp.items()
               if n == name and all(dict(lbl).get(k) == want for k, want in labels.items()))


def wait_records(url: str, n: float) -> Samples:
    """Scrape until ``aistats_records_total`` sums to ``n`` (bounded), then once more: one
    scrape reads the families one after another, so the one that saw the last record may have
    read another family (e.g. the label-overflow counter) before that record was counted."""
    deadline = time.monotonic() + WAIT_S
    got = -1.0
    while time.monotonic() < deadline:
        smp = samples(scrape(url))
        got = total(smp, "aistats_records_total")
        if got == n:
            return samples(scrape(url))
        assert got < n, f"aistats_records_total = {got}, more than {n}"
        time.sleep(0.05)
    raise AssertionError(f"aistats_records_total = {got}, want {n} (after {WAIT_S} s)")
