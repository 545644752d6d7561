"""Higress acceptance cases (higress_cases.json, and higress_test_cases.json written from
Higress's own unit tests), each with its own plugin configuration given to aistats as is:
through the addon class with in-memory flows, and end to end through a live mitmdump and
``mitmdump -nr`` of its flow file. Records (attributes included), ``no_record`` and the Higress
counters' increase per case must all hold, live and replayed alike."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from casekit import case_body, case_chunks, check_record, drop_ids
from conftest import load_cases
from flowkit import make_flow, new_addon, roundtrip, run_live, run_replay
from mitm import Mitmdump, replay
from scrapekit import samples, scrape, wait_records
from upstream import Reply, Upstream

from aistats_engine.outputs.exposition import prometheus_text

CASES = load_cases("higress_cases.json") + load_cases("higress_test_cases.json")
IDS = [c["name"] for c in CASES]
HIGRESS = "route_upstream_model_consumer_metric_"


def write_config(case: dict, directory: Path) -> Path:
    path = directory / f"{case['name']}.yaml"
    path.write_text(json.dumps(case.get("config") or {}))  # JSON is YAML: read as YAML
    return path


def increase(before: dict, after: dict) -> tuple[dict[str, float], list[dict]]:
    """Higress counter increase per name (summed over label sets) and the label sets that moved."""
    inc: dict[str, float] = {}
    moved = []
    for (name, labels), v in after.items():
        if not name.startswith(HIGRESS):
            continue
        d = v - before.get((name, labels), 0.0)
        inc[name[len(HIGRESS):]] = inc.get(name[len(HIGRESS):], 0.0) + d
        if d:
            moved.append(dict(labels))
    return inc, moved


def check_counters(case: dict, inc: dict[str, float], moved: list[dict]) -> list[str]:
    problems = [f"{name}: +{inc.get(name, 0.0)}, want +{want}"
                for name, want in case["expect"].get("higress_counters", {}).items()
                if inc.get(name, 0.0) != want]
    for labels in moved:
        for key, want in case["expect"].get("higress_labels", {}).items():
            if labels.get(key) != want:
                problems.append(f"label {key}: {labels.get(key)!r}, want {want!r}")
    if case["expect"].get("higress_labels") and not moved:
        problems.append("no Higress series moved")
    return problems


# -- the addon class, in memory ---------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_engine_live_and_replay(case, tmp_path):
    addon, ctx, cap = new_addon(saved=True, aistats_config=str(write_config(case, tmp_path)))
    try:
        req = case["request"]
        f = make_flow(req["method"], req["path"], req.get("headers", {}), req["body"].encode(),
                      host=req.get("host", "127.0.0.1"))
        body = case_body(case)
        chunks = [body[i:i + 11] for i in range(0, len(body), 11)] or [b""]
        metrics = addon.bus.get("metrics").metrics
        before = samples(prometheus_text(metrics.registry).decode())
        run_live(addon, f, case["response"]["status"], case["response"]["headers"], chunks, body)
        after = samples(prometheus_text(metrics.registry).decode())
        if case["expect"].get("no_record"):
            assert cap.records == [] and increase(before, after)[0] == {}
            return
        assert len(cap.records) == 1
        assert check_record(cap.records[0], case["expect"]["record"]) == []
        assert check_counters(case, *increase(before, after)) == []
        run_replay(addon, roundtrip(f))
        assert drop_ids(cap.records[1]) == drop_ids(cap.records[0])
    finally:
        ctx.__exit__(None, None, None)


# -- end to end: live mitmdump, then its flow file replayed --------------------------------------

@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """Cases grouped by configuration; one mitmdump per group. Per case: the record (or none)
    and the counters' increase, live; then the group's records replayed."""
    tmp = tmp_path_factory.mktemp("higress-e2e")
    groups: dict[str, list[dict]] = {}
    for case in CASES:
        groups.setdefault(json.dumps(case.get("config") or {}, sort_keys=True), []).append(case)
    out: dict[str, dict] = {}
    with Upstream() as up:
        for case in CASES:
            up.add(case["name"], Reply(status=case["response"]["status"],
                                       headers=list(case["response"]["headers"].items()),
                                       chunks=case_chunks(case)))
        for g, cases in enumerate(groups.values()):
            gdir = tmp / f"group{g}"
            gdir.mkdir()
            config = write_config(cases[0], gdir)
            log, flows = gdir / "live.jsonl", gdir / "cases.flow"
            opts = {"aistats_config": str(config), "aistats_log": str(log)}
            with Mitmdump(gdir, options=opts, write_flows=flows) as m, \
                    httpx.Client(proxy=m.proxy_url, timeout=30) as client:
                url = m.metrics_url()
                before, n = samples(scrape(url)), 0
                for case in cases:
                    req = case["request"]
                    r = client.request(req["method"], up.url + req["path"],
                                       content=req["body"].encode(),
                                       headers={**req.get("headers", {}),
                                                "x-aistats-case": case["name"]})
                    assert r.status_code == case["response"]["status"]
                    n += 0 if case["expect"].get("no_record") else 1
                    after = wait_records(url, n)
                    out[case["name"]] = {"counters": increase(before, after)}
                    before = after
            live = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
            done = replay(gdir, flows, options={**opts, "aistats_log": str(gdir / "replay.jsonl")})
            assert done.returncode == 0, done.stdout + done.stderr
            rlog = gdir / "replay.jsonl"
            replayed = [json.loads(x) for x in rlog.read_text().splitlines()] if rlog.exists() else []
            assert len(live) == len(replayed) == n
            with_record = [c for c in cases if not c["expect"].get("no_record")]
            for case, rec, rep in zip(with_record, live, replayed):
                out[case["name"]].update(record=rec, replayed=rep)
    return out


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_e2e_live_and_replay(e2e, case):
    got = e2e[case["name"]]
    if case["expect"].get("no_record"):
        assert "record" not in got and got["counters"][0] == {}
        return
    assert check_record(got["record"], case["expect"]["record"]) == [], "live"
    assert check_counters(case, *got["counters"]) == []
    assert drop_ids(got["replayed"]) == drop_ids(got["record"]), "replay"
