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
