"""Smoke test for scripts/bench.py: the benchmark runs end to end against the real addon
(addon/aistats.py on the measured side, scripts/passthrough.py as the floor), reports every
number, and proves the addon recorded every request it sent; a measured side that logs no
records makes it fail.

No timing assertions: this VM is far too noisy for them; the benchmark itself shows the noise.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "scripts" / "bench.py"
PASSTHROUGH = ROOT / "scripts" / "passthrough.py"
AISTATS = ROOT / "addon" / "aistats.py"

MEASURED = [
    "paced.cpu_us_per_event", "paced.lat_p50_ms", "paced.lat_p90_ms", "paced.lat_p99_ms",
    "paced.mitmdump_cpu_util", "unpaced.cpu_us_per_event", "unpaced.events_per_s",
    "json.cpu_us_per_request", "json.requests_per_s", "ttfb.ttfb_p50_ms", "ttfb.ttfb_p90_ms",
    "memory.kb_per_open_stream", "memory.rss_idle_mb",
]
QUICK = ["--quick", "--repeats", "1", "--max-wait-quiet", "0"]


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BENCH), *QUICK, *args],
                          capture_output=True, text=True, timeout=90, cwd=ROOT)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One quick run with the defaults: aistats measured against the floor."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = run_bench("--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "paced SSE: mitmdump CPU" in proc.stdout  # the human-readable table
    assert "records logged by the aistats side" in proc.stdout
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """scripts/bench.py as a module, for its argument parsing (scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location("bench_under_test", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.modules.pop(spec.name, None)
    return mod


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
    meta = report["meta"]
    assert meta["repeats"] == 1 and meta["quick"] is True
    assert Path(meta["addon"]).resolve() == AISTATS and meta["expect_records"] is True


@pytest.mark.timeout(100)
def test_measured_side_logged_one_record_per_request_sent(report: dict) -> None:
    floor, measured = report["runs"]
    cfg = report["config"]
    # at least the measured phases' requests (warmup comes on top); both sides get the same work
    at_least = (cfg["json_clients"] * cfg["json_requests"] + cfg["unpaced_clients"] * cfg["unpaced_streams"]
                + cfg["paced_clients"] * cfg["paced_streams"] + cfg["ttfb_requests"] + cfg["open_streams"])
    assert measured["requests_sent"] >= at_least
    assert measured["requests_sent"] == floor["requests_sent"]
    assert measured["requests_sent_by_mode"] == floor["requests_sent_by_mode"]
    assert "records" not in floor  # the floor writes no aistats log
    rec = measured["records"]
    assert rec["records"] == measured["requests_sent"]
    assert rec["sse"] == measured["requests_sent_by_mode"]["sse"]
    assert rec["json"] == measured["requests_sent_by_mode"]["json"]
    assert rec["with_usage"] == rec["records"]  # real records: every bench response has usage


@pytest.mark.timeout(100)
def test_fails_when_the_measured_addon_logs_no_records(tmp_path: Path) -> None:
    """A measured script other than the floor is checked by default; one that writes no
    aistats log (here the floor under another name) must fail the run, saying both numbers."""
    silent = tmp_path / "silent_addon.py"
    shutil.copy(PASSTHROUGH, silent)
    out = tmp_path / "bench.json"
    proc = run_bench("--addon", str(silent), "--json", str(out))
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if "records check failed" in ln]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert " logged 0 records for " in lines[0] and " requests sent " in lines[0], lines[0]
    assert not out.exists()  # no report for a run that did not measure the addon


def test_expect_records_defaults(bench: ModuleType) -> None:
    assert bench.parse_args([]).expect_records is True
    assert bench.parse_args(["--addon", str(PASSTHROUGH)]).expect_records is False  # floor vs floor
    assert bench.parse_args(["--addon", str(PASSTHROUGH), "--expect-records"]).expect_records is True
    assert bench.parse_args(["--no-expect-records"]).expect_records is False
    with pytest.raises(SystemExit):
        bench.parse_args(["--set", "aistats_log=x.jsonl"])  # bench chooses the log it counts


REPLAY_FLOWS = 50


@pytest.fixture(scope="module")
def everything_report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One quick run of the "everything on" variant (Higress rules, UI, store with captures,
    spans to the bench's loopback collector) with a small offline replay workload."""
    out = tmp_path_factory.mktemp("bench-everything") / "bench.json"
    proc = run_bench("--variant", "everything", "--replay", str(REPLAY_FLOWS), "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "variant everything:" in proc.stdout  # the table's header line names it
    assert "replay: wall clock s" in proc.stdout and "OTLP collector:" in proc.stdout
    return json.loads(out.read_text())


@pytest.mark.timeout(100)
def test_everything_variant_checks_records_and_exports_spans(everything_report: dict) -> None:
    meta = everything_report["meta"]
    assert meta["variant"] == "everything"
    sets = dict(kv.split("=", 1) for kv in meta["variant_sets"])
    assert Path(sets["aistats_config"]).resolve() == ROOT / "scripts" / "bench-higress.yaml"
    assert sets["aistats_otlp_endpoint"].startswith("http://127.0.0.1:")
    floor, measured = everything_report["runs"]
    assert (floor["side"], measured["side"]) == ("floor", "aistats")
    assert measured["log_problems"] == 0
    assert measured["records"]["records"] == measured["requests_sent"] > 0  # records check passed
    assert measured["otlp"]["requests"] >= 1 and measured["otlp"]["bytes"] > 0
    assert everything_report["otlp"]["requests"] >= 1
    assert everything_report["summary"]["paced.cpu_us_per_event"]["ratio"] > 0


@pytest.mark.timeout(100)
def test_replay_times_plain_mitmdump_against_aistats(everything_report: dict) -> None:
    rep = everything_report["replay"]
    assert rep["flows"] == REPLAY_FLOWS and rep["flow_file_bytes"] > 0 and rep["records_checked"]
    assert [r["side"] for r in rep["runs"]] == ["floor", "aistats"]
    floor, measured = rep["runs"]
    assert "records" not in floor
    assert measured["records"]["records"] == REPLAY_FLOWS
    assert measured["records"]["sse"] > 0 and measured["records"]["json"] > 0
    for key in ("wall_s", "cpu_s"):
        entry = rep["summary"][key]
        for side in ("floor", "aistats"):
            assert entry[side]["median"] > 0 and len(entry[side]["values"]) == 1
        assert entry["ratio"] > 0


def test_variant_and_replay_defaults(bench: ModuleType) -> None:
    a = bench.parse_args([])
    assert a.variant == "default" and a.replay == 0
    assert bench.variant_sets("default", None) == []
    with pytest.raises(SystemExit):
        bench.parse_args(["--variant", "nothing"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--replay", "-1"])
