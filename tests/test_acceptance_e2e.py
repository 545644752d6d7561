"""Acceptance cases end to end: a real mitmdump with the addon, a loopback upstream serving each
case, httpx as the client; then ``mitmdump -nr`` of the ``-w`` flow file. Both runs must meet
every case's expectations and give identical records (ids aside).

llama_swap_cases.json: ``expect`` in full (the Higress cases, each with its own plugin
configuration, are in test_acceptance_higress.py)."""

from __future__ import annotations

import json

import httpx
import pytest

from casekit import case_chunks, check_expect, drop_ids
from conftest import load_cases
from mitm import Mitmdump, replay
from upstream import Reply, Upstream

CASES = load_cases("llama_swap_cases.json")


def run_cases(cases: list[dict], tmp) -> dict:
    """Every case through a live mitmdump (-w), then the flow file through mitmdump -nr."""
    live_log, replay_log, flows = tmp / "live.jsonl", tmp / "replay.jsonl", tmp / "cases.flow"
    client_got: dict[str, bytes] = {}
    with Upstream() as up, Mitmdump(tmp, options={"aistats_log": str(live_log)},
                                    write_flows=flows) as m:
        for case in cases:
            delay = case.get("simulate", {}).get("upstream_delay_ms", 0) / 1000
            up.add(case["name"], Reply(status=case["response"]["status"],
                                       headers=list(case["response"]["headers"].items()),
                                       chunks=case_chunks(case), header_delay_s=delay))
        with httpx.Client(proxy=m.proxy_url, timeout=30) as client:
            for case in cases:
                req = case["request"]
                headers = {**req.get("headers", {}), "x-aistats-case": case["name"]}
                with client.stream(req["method"], up.url + req["path"], headers=headers,
                                   content=req["body"].encode()) as r:
                    assert r.status_code == case["response"]["status"]
                    client_got[case["name"]] = b"".join(r.iter_raw())  # wire bytes, undecoded
        sent = dict(up.sent)
    for name, got in client_got.items():
        assert got == sent[name], f"{name}: the client did not get the upstream's bytes"
    live = [json.loads(x) for x in live_log.read_text().splitlines()]
    done = replay(tmp, flows, options={"aistats_log": str(replay_log)})
    assert done.returncode == 0, done.stdout + done.stderr
    replayed = [json.loads(x) for x in replay_log.read_text().splitlines()]
    return {"live": live, "replay": replayed}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_cases(CASES, tmp_path_factory.mktemp("acceptance"))


def test_one_record_per_case_live_and_replay(runs):
    assert len(runs["live"]) == len(CASES)
    assert len(runs["replay"]) == len(CASES)


@pytest.mark.parametrize("i", range(len(CASES)), ids=[c["name"] for c in CASES])
def test_case(runs, i):
    case = CASES[i]
    live, replayed = runs["live"][i], runs["replay"][i]
    assert live["path"] == case["request"]["path"]
    assert check_expect(live, case["expect"]) == [], "live"
    assert check_expect(replayed, case["expect"]) == [], "replay"
    assert drop_ids(replayed) == drop_ids(live)
