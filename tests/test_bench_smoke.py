"""Smoke test for scripts/bench.py: the benchmark runs end to end and reports every number.

Floor against floor (scripts/passthrough.py on both sides), so it needs no addon/aistats.py.
No timing assertions: this VM is far too noisy for them; the benchmark itself shows the noise.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "scripts" / "bench.py"
PASSTHROUGH = ROOT / "scripts" / "passthrough.py"

MEASURED = [
    "paced.cpu_us_per_event", "paced.lat_p50_ms", "paced.lat_p90_ms", "paced.lat_p99_ms",
    "paced.mitmdump_cpu_util", "unpaced.cpu_us_per_event", "unpaced.events_per_s",
    "json.cpu_us_per_request", "json.requests_per_s", "ttfb.ttfb_p50_ms", "ttfb.ttfb_p90_ms",
    "memory.kb_per_open_stream", "memory.rss_idle_mb",
]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--repeats", "1", "--addon", str(PASSTHROUGH),
         "--max-wait-quiet", "0", "--json", str(out)],
        capture_output=True, text=True, timeout=90, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "paced SSE: mitmdump CPU" in proc.stdout  # the human-readable table
    return json.loads(out.read_text())


@pytest.mark.timeout(100)
def test_summary_has_positive_numbers_for_both_sides(report: dict) -> None:
    summary = report["summary"]
    for key in MEASURED:
        entry = summary[key]
        for side in ("floor", "aistats"):
            spread = entry[side]
            for stat in ("median", "min", "max"):
                value = spread[stat]
                assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, side, stat)
            assert len(spread["values"]) == 1
        assert entry["ratio"] > 0, key
    for key in ("paced.lat_p50_ms", "paced.lat_p99_ms", "ttfb.ttfb_p50_ms"):
        assert isinstance(summary[key]["added"], float)


@pytest.mark.timeout(100)
def test_runs_alternate_and_count_the_work(report: dict) -> None:
    runs = report["runs"]
    assert [r["side"] for r in runs] == ["floor", "aistats"]
    cfg = report["config"]
    for run in runs:
        m = run["metrics"]
        assert run["log_problems"] == 0
        assert m["json"]["requests"] == cfg["json_clients"] * cfg["json_requests"]
        assert m["unpaced"]["events"] == cfg["unpaced_clients"] * cfg["unpaced_streams"] * (cfg["unpaced_events"] + 3)
        assert m["paced"]["events"] >= cfg["paced_clients"] * cfg["paced_streams"] * cfg["paced_events"]
        assert m["env"]["foreign_cores"] >= 0
    assert report["meta"]["repeats"] == 1 and report["meta"]["quick"] is True
