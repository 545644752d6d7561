"""flows/sample.flow (recorded live by scripts/record_sample_flows.py) replays with
``mitmdump -nr`` to the records the live run wrote (flows/sample.jsonl), timings included.
Keys added to the record later are allowed; every recorded key must keep its value."""

from __future__ import annotations

import json

from conftest import ROOT
from mitm import replay


def test_sample_flow_replays_to_the_live_records(tmp_path):
    live = [json.loads(x) for x in (ROOT / "flows" / "sample.jsonl").read_text().splitlines()]
    done = replay(tmp_path, ROOT / "flows" / "sample.flow",
                  options={"aistats_log": str(tmp_path / "r.jsonl"), "aistats_metrics": "false"})
    assert done.returncode == 0, done.stdout + done.stderr
    replayed = {r["flow_id"]: r for r in map(json.loads, (tmp_path / "r.jsonl").read_text().splitlines())}
    assert len(replayed) == len(live) == 6
    for rec in live:
        got = replayed[rec["flow_id"]]
        assert {k: got.get(k) for k in rec if k != "id"} == {k: v for k, v in rec.items() if k != "id"}
    kinds = {r["model"]: r for r in live}
    assert kinds["gpt-4o-mini"]["stream"] and kinds["gpt-4o"]["error_type"] == "429"


def test_offline_replay_makes_no_ui_metrics_or_memory_store_and_says_so(tmp_path):
    """``mitmdump -nr`` exits when the file is read: nothing could look at the UI, the API,
    /metrics or an in-memory store, so with the defaults (all on) none is made, and the start-up
    says so; the records are the same."""
    done = replay(tmp_path, ROOT / "flows" / "sample.flow",
                  options={"aistats_log": str(tmp_path / "r.jsonl")})
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "aistats: offline replay: no UI, API, /metrics or in-memory store" in out
    assert "metrics on http" not in out and "activity UI on" not in out
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 6


def test_offline_run_is_only_a_file_read_without_server_or_keepserving():
    from types import SimpleNamespace as Opts

    from aistats import _offline_run

    assert _offline_run(Opts(rfile="x.flow", server=False, keepserving=False))
    assert not _offline_run(Opts(rfile="x.flow", server=False, keepserving=True))
    assert not _offline_run(Opts(rfile="x.flow", server=True, keepserving=False))  # live too
    assert not _offline_run(Opts(rfile=None, server=False, keepserving=False))
    assert not _offline_run(Opts(rfile="x.flow", server=False))  # mitmweb: keeps serving
