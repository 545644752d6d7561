"""llama-swap acceptance cases through the real addon class with in-memory flows, live and
replayed from a flow-file round trip (the end-to-end version is test_acceptance_e2e.py)."""

from __future__ import annotations

import pytest

from casekit import case_body, check_expect, drop_ids
from conftest import load_cases
from flowkit import make_flow, new_addon, roundtrip, run_live, run_replay

CASES = load_cases("llama_swap_cases.json")


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_case_live_and_replay(case):
    addon, ctx, cap = new_addon()
    try:
        req = case["request"]
        f = make_flow(req["method"], req["path"], req.get("headers", {}), req["body"].encode())
        body = case_body(case)
        chunks = [body[i:i + 7] for i in range(0, len(body), 7)] or [b""]
        run_live(addon, f, case["response"]["status"], case["response"]["headers"], chunks, body)
        assert len(cap.records) == 1
        live = cap.records[0]
        assert check_expect(live, case["expect"]) == []
        run_replay(addon, roundtrip(f))
        assert len(cap.records) == 2
        assert drop_ids(cap.records[1]) == drop_ids(live)
    finally:
        ctx.__exit__(None, None, None)
