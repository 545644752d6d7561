"""llama-swap acceptance cases through the real addon class with in-memory flows, live and
replayed from a flow-file round trip (the end-to-end version is test_acceptance_e2e.py); the
``expect_capture`` parts through the addon's store and capture cache, each case with its
``config`` (``captures``, ``capture_mask``) as options."""

from __future__ import annotations

import pytest

from casekit import case_body, check_capture, check_expect, drop_ids
from conftest import load_cases
from flowkit import make_flow, new_addon, roundtrip, run_live, run_replay

CASES = load_cases("llama_swap_cases.json")


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_case_live_and_replay(case):
    config = case.get("config") or {}
    options = {}
    if config.get("captures") is False:
        options["aistats_captures_mb"] = "0"
    if "capture_mask" in config:
        options["aistats_capture_parts"] = ",".join(config["capture_mask"])
    req = case["request"]
    body = case_body(case)
    chunks = [body[i:i + 7] for i in range(0, len(body), 7)] or [b""]
    # Under plain mitmdump a stream's reading waits for its record; under -w it is made in
    # the response hook, to go with the flow: the same record either way.
    unsaved, flow_id = None, None
    for saved in (False, True):
        addon, ctx, cap = new_addon(saved=saved, **options)
        try:
            f = make_flow(req["method"], req["path"], req.get("headers", {}),
                          req["body"].encode())
            f.id = flow_id = flow_id or f.id
            run_live(addon, f, case["response"]["status"], case["response"]["headers"], chunks,
                     body)
            assert len(cap.records) == 1
            live = cap.records[0]
            assert check_expect(live, case["expect"]) == []
            if "expect_capture" in case:
                store = addon.bus.get("store")
                assert store.flush(5)
                assert check_capture(store, live["id"], case["expect_capture"]) == []
            if not saved:
                unsaved = drop_ids(live)
                continue
            assert drop_ids(live) == unsaved
            run_replay(addon, roundtrip(f))
            assert len(cap.records) == 2
            assert drop_ids(cap.records[1]) == drop_ids(live)
            # A stream's reading is kept with the flow and a replay takes it; read from the
            # body again (a flow saved by another tool, or by an older version), the record is
            # the same.
            replayed = roundtrip(f)
            if "aistats" in replayed.metadata:  # the chunk clock stays: only the reading goes
                replayed.metadata["aistats"]["parsed"] = None
            run_replay(addon, replayed)
            assert len(cap.records) == 3
            assert drop_ids(cap.records[2]) == drop_ids(live)
        finally:
            ctx.__exit__(None, None, None)
