"""Captures: what is kept of a request and its response (llama-swap's rules and masks, our
redaction), and the byte-bounded FIFO cache that holds them compressed."""

from __future__ import annotations

import base64
import gzip
import random
import threading

import pytest

from aistats_engine.outputs.bus import Finished
from aistats_engine.outputs import captures
from aistats_engine.outputs.captures import (ALL_PARTS, CAPTURE_PARTS, LATER_OVERHEAD, CaptureCache,
                                             build_capture, capture_exists, compress, decompress,
                                             mask_for)
from aistats_engine.record.record import Record
from conftest import load_cases

MAX = 1 << 20
KEY = "plainkey-0123456789abcdef"  # no well-known shape: only the request says it is secret


def record(**kw) -> Record:
    base = dict(id=7, flow_id="f1", start_time="2026-01-01T00:00:00.000Z",
                end_time="2026-01-01T00:00:01.000Z", method="POST", scheme="http",
                host="127.0.0.1", port=8000, path="/v1/chat/completions", status=200,
                response_content_type="application/json")
    base.update(kw)
    return Record(**base)


def event(req_headers=(), resp_headers=(), req_body: bytes | None = b'{"model":"m"}',
          resp_body: bytes | None = b'{"ok":true}', query: str = "", req_enc=None,
          resp_enc=None, **kw) -> Finished:
    return Finished(record(**kw), 1.0, 2.0, tuple(req_headers), tuple(resp_headers), query,
                    req_body, req_enc, resp_body, resp_enc)


def b(pairs: dict[str, str] | list[tuple[str, str]]) -> tuple[tuple[bytes, bytes], ...]:
    items = pairs.items() if isinstance(pairs, dict) else pairs
    return tuple((k.encode(), v.encode()) for k, v in items)


# -- masks ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("path,expected", [
    ("/v1/chat/completions", ALL_PARTS),
    ("/v1/audio/speech", {"req_headers", "req_body", "resp_headers"}),
    ("/v1/images/generations", {"req_headers", "req_body", "resp_headers"}),
    ("/sdapi/v1/txt2img", {"req_headers", "req_body", "resp_headers"}),
    ("/v1/audio/voices", {"req_headers", "resp_headers", "resp_body"}),
    ("/v1/audio/transcriptions", {"req_headers", "resp_headers", "resp_body"}),
    ("/v1/audio/translations", {"req_headers", "resp_headers", "resp_body"}),
    ("/v1/images/edits", {"req_headers", "resp_headers"}),
    ("/sdapi/v1/img2img", {"req_headers", "resp_headers"}),
    ("/upstream/my-model/v1/audio/speech", {"req_headers", "req_body", "resp_headers"}),
    ("/upstream/sd/sdapi/v1/img2img", {"req_headers", "resp_headers"}),
    ("/v1/audio/transcriptions?x=1", {"req_headers", "resp_headers", "resp_body"}),
    ("/v1/images/edits/", {"req_headers", "resp_headers"}),
])
def test_mask_per_path(path, expected):
    assert mask_for(path, CAPTURE_PARTS) == frozenset(expected)


def test_mask_narrows_the_configured_parts_and_ignores_unknown_names():
    assert mask_for("/v1/chat/completions", {"resp_headers", "bogus"}) == {"resp_headers"}
    assert mask_for("/v1/audio/speech", {"resp_headers", "resp_body"}) == {"resp_headers"}
    assert mask_for("/v1/images/edits", ()) == frozenset()


# -- what a capture holds ------------------------------------------------------------------------
def test_secret_headers_redacted_first_value_and_original_spelling_kept():
    ev = event(req_headers=b([("Authorization", f"Bearer {KEY}"), ("X-Api-Key", "k" * 12),
                              ("Cookie", "sid=abcdefghijkl"), ("x-goog-api-key", "g" * 12),
                              ("Accept", "first"), ("accept", "second"),
                              ("Content-Type", "application/json")]),
               resp_headers=b([("Content-Type", "application/json"), ("Set-Cookie", "a=b"),
                               ("X-Request-Id", "r1")]))
    cap = build_capture(ev, ALL_PARTS, MAX)
    assert cap["req_headers"] == {"Authorization": "[REDACTED]", "X-Api-Key": "[REDACTED]",
                                  "Cookie": "[REDACTED]", "x-goog-api-key": "[REDACTED]",
                                  "Accept": "first", "Content-Type": "application/json"}
    assert cap["resp_headers"] == {"Content-Type": "application/json",
                                   "Set-Cookie": "[REDACTED]", "X-Request-Id": "r1"}
    assert cap["req_body"] == '{"model":"m"}' and cap["resp_body"] == '{"ok":true}'
    assert cap["req_body_base64"] is None and cap["resp_body_base64"] is None
    assert cap["id"] == 7 and cap["req_path"] == "/v1/chat/completions"
    assert cap["resp_content_type"] == "application/json" and cap["status"] == 200
    assert cap["omitted"] == []


def test_gzip_response_decoded_and_content_encoding_dropped():
    body = b'{"choices":[{"message":{"content":"hello"}}]}'
    ev = event(resp_headers=b([("Content-Type", "application/json"),
                               ("Content-Encoding", "gzip"), ("Vary", "x")]),
               resp_body=gzip.compress(body), resp_enc="gzip")
    cap = build_capture(ev, ALL_PARTS, MAX)
    assert cap["resp_body"] == body.decode()
    assert cap["resp_headers"] == {"Content-Type": "application/json", "Vary": "x"}


def test_gzip_request_decoded_and_its_content_encoding_dropped():
    body = b'{"model":"m","messages":[]}'
    ev = event(req_headers=b({"Content-Encoding": "gzip", "Content-Type": "application/json"}),
               req_body=gzip.compress(body), req_enc="gzip")
    cap = build_capture(ev, ALL_PARTS, MAX)
    assert cap["req_body"] == body.decode()
    assert cap["req_headers"] == {"Content-Type": "application/json"}


def test_undecodable_request_body_kept_as_sent_and_too_large_one_omitted():
    ev = event(req_headers=b({"Content-Encoding": "gzip"}), req_body=b"not gzip",
               req_enc="gzip")
    cap = build_capture(ev, ALL_PARTS, MAX)
    assert cap["req_body"] is None
    assert base64.b64decode(cap["req_body_base64"]) == b"not gzip"
    assert cap["req_headers"] == {"Content-Encoding": "gzip"}
    assert cap["omitted"] and cap["omitted"][0].startswith("req_body:")
    big = event(req_body=b"x" * 100, resp_body=b"ok")
    cap = build_capture(big, ALL_PARTS, 50)
    assert cap is not None and cap["req_body"] is None and cap["req_body_base64"] is None
    assert cap["omitted"] and "50" in cap["omitted"][0]


def test_parts_outside_the_mask_are_none_and_the_path_table_applies():
    ev = event(req_headers=b({"A": "1"}), resp_headers=b({"B": "2"}))
    cap = build_capture(ev, frozenset({"resp_headers"}), MAX)
    assert cap is not None
    assert (cap["req_headers"], cap["req_body"], cap["resp_body"]) == (None, None, None)
    assert cap["resp_headers"] == {"B": "2"}
    empty = build_capture(ev, frozenset(), MAX)
    assert empty is not None and all(empty[p] is None for p in CAPTURE_PARTS)
    speech = event(path="/v1/audio/speech", resp_body=b"\xff\xfbaudio",
                   req_headers=b({"A": "1"}), resp_headers=b({"Content-Type": "audio/mpeg"}))
    cap = build_capture(speech, mask_for("/v1/audio/speech", CAPTURE_PARTS), MAX)
    assert cap["req_body"] == '{"model":"m"}' and cap["resp_headers"] is not None
    assert cap["resp_body"] is None and cap["resp_body_base64"] is None


@pytest.mark.parametrize("kw", [
    dict(status=400, resp_body=b'{"error":{"message":"bad"}}', error="bad", error_type="400"),
    dict(status=503, resp_body=b"", error="503 Service Unavailable", error_type="503"),
    dict(status=200, error="stream cut", error_type="upstream_aborted"),
    dict(status=None, resp_body=None, error="connect failed", error_type="upstream_unreachable"),
])
def test_failures_keep_request_and_response_headers_only(kw):
    has_response = kw["status"] is not None
    ev = event(req_headers=b({"Content-Type": "application/json"}),
               resp_headers=b({"Content-Type": "application/json"}) if has_response else (),
               **kw)
    cap = build_capture(ev, ALL_PARTS, MAX)
    assert cap is not None
    assert cap["req_headers"] == {"Content-Type": "application/json"}
    assert cap["req_body"] == '{"model":"m"}'
    assert cap["resp_body"] is None and cap["resp_body_base64"] is None
    if has_response:
        assert cap["resp_headers"] == {"Content-Type": "application/json"}
    else:
        assert cap["resp_headers"] is None and cap["status"] is None


@pytest.mark.parametrize("kw", [
    dict(resp_body=b""),  # empty 2xx
    dict(resp_body=gzip.compress(b""), resp_enc="gzip"),  # decodes to nothing
    dict(resp_body=None),  # 2xx body the proxy did not keep
    dict(resp_body=b"this is not gzip data", resp_enc="gzip"),  # decompression failure
    dict(resp_body=gzip.compress(b"x" * 5000), resp_enc="gzip"),  # decodes past max_body
    dict(resp_body=b"x" * 5000),  # over max_body as it is
    dict(status=204, resp_body=b""),
])
def test_no_capture_for_an_empty_or_undecodable_2xx_body(kw):
    assert build_capture(event(**kw), ALL_PARTS, 4096) is None


def test_undecodable_2xx_body_gives_no_capture_even_when_the_mask_leaves_it_out():
    ev = event(resp_body=b"nope", resp_enc="gzip")
    assert build_capture(ev, frozenset({"req_headers"}), MAX) is None
    assert build_capture(event(resp_body=b"x" * 10), frozenset({"req_headers"}), 5) is not None


def test_invalid_json_2xx_is_captured_as_text():
    cap = build_capture(event(resp_body=b"not valid json"), ALL_PARTS, MAX)
    assert cap["resp_body"] == "not valid json"


def test_request_secrets_echoed_anywhere_are_redacted():
    echo = f'{{"error":{{"message":"Incorrect API key provided: {KEY}; query key qk-9876543210"}}}}'
    ev = event(req_headers=b({"Authorization": f"Bearer {KEY}",
                              "Content-Type": "application/json"}),
               resp_headers=b({"X-Echo": f"got {KEY}", "Content-Type": "application/json"}),
               req_body=f'{{"model":"m","note":"{KEY}"}}'.encode(), resp_body=echo.encode(),
               query="key=qk-9876543210&alt=sse", status=401, error="x", error_type="401")
    cap = build_capture(ev, ALL_PARTS, MAX)
    assert KEY not in str(cap) and "qk-9876543210" not in str(cap)
    assert cap["req_path"] == "/v1/chat/completions?key=[REDACTED]&alt=sse"
    assert cap["resp_headers"]["X-Echo"] == "got [REDACTED]"
    assert cap["req_body"] == '{"model":"m","note":"[REDACTED]"}'
    ok = event(req_headers=b({"x-api-key": KEY}), resp_body=echo.encode())
    cap = build_capture(ok, ALL_PARTS, MAX)
    assert KEY not in cap["resp_body"] and "[REDACTED]" in cap["resp_body"]
    assert "qk-9876543210" in cap["resp_body"]  # not a secret of this request, nor a key shape


def test_bodies_lose_the_request_secrets_and_headers_lose_key_shapes_too():
    """Bodies are scanned for the request's own secrets only (an echo); a key shape a prompt
    happens to contain stays, as sent: scanning every body for shapes would cost more than
    the rest of the capture. Headers, short, are scanned for both."""
    shape = "sk-" + "A" * 30
    ev = event(req_headers=b({"Authorization": f"Bearer {KEY}", "X-Note": shape}),
               resp_body=f'{{"echo":"{KEY}","text":"{shape}"}}'.encode())
    cap = build_capture(ev, ALL_PARTS, MAX)
    assert cap["resp_body"] == f'{{"echo":"[REDACTED]","text":"{shape}"}}'
    assert cap["req_headers"]["X-Note"] == "[REDACTED]"


def test_binary_body_stored_as_base64_with_secrets_scrubbed():
    png = b"\x89PNG\r\n\x1a\n\x00\xff" + KEY.encode() + b"\x00\xfe"
    ev = event(req_headers=b({"Authorization": f"Bearer {KEY}"}), resp_body=png,
               response_content_type="image/png")
    cap = build_capture(ev, ALL_PARTS, MAX)
    assert cap["resp_body"] is None
    raw = base64.b64decode(cap["resp_body_base64"])
    assert raw == b"\x89PNG\r\n\x1a\n\x00\xff[REDACTED]\x00\xfe"
    assert cap["resp_content_type"] == "image/png"


# -- the llama-swap acceptance cases' capture expectations --------------------------------------
def _case_event(case: dict) -> Finished:
    req, resp = case["request"], case["response"]
    body = resp["body"].encode()
    enc = resp.get("encoding")
    if enc == "gzip":
        body = gzip.compress(body)
    status = resp["status"]
    ok = 200 <= status < 300
    resp_enc = enc or {k.lower(): v for k, v in resp["headers"].items()}.get("content-encoding")
    return Finished(record(path=req["path"], status=status,
                           error=None if ok else "e", error_type=None if ok else str(status)),
                    1.0, 2.0, b(req["headers"]), b(resp["headers"]), "",
                    req["body"].encode(), None, body, resp_enc)


CAPTURE_CASES = [c for c in load_cases("llama_swap_cases.json") if "expect_capture" in c]


@pytest.mark.parametrize("case", CAPTURE_CASES, ids=[c["name"] for c in CAPTURE_CASES])
def test_acceptance_capture_expectations(case):
    exp = case["expect_capture"]
    cfg = case.get("config") or {}
    parts = frozenset(cfg.get("capture_mask", CAPTURE_PARTS))
    cache = CaptureCache(0 if cfg.get("captures") is False else 1 << 20)
    ev = _case_event(case)
    cap = build_capture(ev, mask_for(ev.record.path, parts), 16 << 20)
    stored = cap is not None and cache.put(ev.record.id, cap)
    expected = exp.get("has_capture", exp.get("has_capture_if_enabled"))
    assert stored is expected and cache.has(ev.record.id) is expected
    want = exp.get("capture")
    if not want:
        return
    got = cache.get(ev.record.id)
    for key, value in want.items():
        if key.endswith("_include"):
            part = got[key.removesuffix("_include")]
            assert {k: part.get(k) for k in value} == value, key
        else:
            assert got[key] == value, key


# -- the cache -----------------------------------------------------------------------------------
def test_cache_byte_bound_fifo_eviction_refusal_and_replace():
    c = CaptureCache(100)
    assert c.put_blob(1, b"a" * 40) == (True, [])
    assert c.put_blob(2, b"b" * 40) == (True, [])
    assert c.put_blob(3, b"c" * 40) == (True, [1])  # oldest inserted goes
    assert (c.ids(), c.bytes, c.count, c.evicted) == ([2, 3], 80, 2, 1)
    assert c.put_blob(4, b"d" * 101) == (False, [])  # larger than the whole cache
    assert (c.refused, c.ids(), c.bytes) == (1, [2, 3], 80)
    assert c.put_blob(2, b"B" * 10) == (True, [])  # replaced, moved to the end
    assert (c.ids(), c.bytes) == ([3, 2], 50)
    assert c.put_blob(5, b"e" * 60) == (True, [3])  # eviction follows insertion order
    assert (c.ids(), c.bytes) == ([2, 5], 70)
    c.get_blob(2)  # reads do not refresh (FIFO, not LRU)
    assert c.put_blob(6, b"f" * 40) == (True, [2]) and c.ids() == [5, 6]  # 60 + 40 fits
    assert c.put_blob(6, b"g" * 200) == (False, [6])  # refused re-put drops the stale one
    assert (c.ids(), c.bytes, c.refused) == ([5], 60, 2)
    c.discard([5])
    assert c.put_blob(7, b"h" * 100) == (True, [])  # exactly the budget fits


def test_cache_roundtrip_has_discard_and_off():
    c = CaptureCache(1 << 20)
    cap = {"id": 1, "req_body": "x" * 10_000, "resp_body": None}
    assert c.put(1, cap) and c.has(1) and not c.has(2)
    assert c.get(1) == cap and c.get(2) is None
    assert c.bytes == len(c.get_blob(1)) < 10_000  # held compressed
    assert decompress(compress(cap)) == cap
    c.put(2, {"id": 2}), c.put(3, {"id": 3})
    assert c.discard_below(3) == [1, 2] and c.ids() == [3]
    assert c.discard([3, 9]) == [3] and c.bytes == 0
    off = CaptureCache(0)
    assert not off.enabled and off.put(1, cap) is False and off.put_blob(1, b"x") == (False, [])
    assert (off.count, off.refused) == (0, 0)
    with pytest.raises(ValueError):
        CaptureCache(-1)


def test_cache_thread_safety_keeps_its_accounting():
    c = CaptureCache(20_000)
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rnd = random.Random(seed)
        try:
            for i in range(400):
                cid = rnd.randrange(300)
                r = rnd.random()
                if r < 0.4:
                    c.put_blob(cid, bytes(rnd.randrange(1, 3000)))
                elif r < 0.7:  # waiting captures, compressed when the cache is over
                    c.put_later(cid, event(id=cid, resp_body=bytes(rnd.randrange(1, 3000))),
                                ALL_PARTS, MAX)
                elif r < 0.75:
                    c.discard_below(rnd.randrange(300))
                else:
                    c.get_blob(cid), c.has(cid), c.ids()
        except BaseException as e:  # pragma: no cover - the test fails on it
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors and not any(t.is_alive() for t in threads)
    ids = c.ids()
    assert len(ids) == len(set(ids)) == c.count
    assert c.bytes == sum(captures._weight(c._items[i]) for i in ids) <= c.max_bytes
    assert c.evicted > 0


# -- captures whose building waits (CaptureCache.put_later) ---------------------------------------
def _corpus() -> list[Finished]:
    """Every kind of event the tests above capture, and the acceptance cases'."""
    evs = [event(**kw) for kw in (
        dict(), dict(resp_body=b""), dict(resp_body=None), dict(resp_body=b"x" * 5000),
        dict(resp_body=b"x" * 10), dict(resp_body=b"not valid json"), dict(status=204, resp_body=b""),
        dict(resp_body=b"nope", resp_enc="gzip"), dict(resp_body=gzip.compress(b""), resp_enc="gzip"),
        dict(resp_body=gzip.compress(b'{"a":1}'), resp_enc="gzip"),
        dict(resp_body=b"\x89PNG\r\n\x1a\n\x00\xff" + KEY.encode(), response_content_type="image/png",
             req_headers=b({"Authorization": f"Bearer {KEY}"})),
        dict(status=400, resp_body=b'{"error":{"message":"bad"}}', error="bad", error_type="400"),
        dict(status=503, resp_body=b"", error="503", error_type="503"),
        dict(status=200, error="stream cut", error_type="upstream_aborted"),
        dict(status=None, resp_body=None, error="connect failed", error_type="upstream_unreachable"),
        dict(req_headers=b({"Content-Encoding": "gzip"}), req_body=b"not gzip", req_enc="gzip"),
        dict(req_body=b"x" * 100, resp_body=b"ok"),
        dict(req_headers=b({"Authorization": f"Bearer {KEY}", "X-Note": "sk-" + "A" * 30}),
             resp_headers=b({"X-Echo": f"got {KEY}", "Set-Cookie": "a=b"}),
             resp_body=f'{{"echo":"{KEY}"}}'.encode(), query="key=qk-9876543210&alt=sse"),
        dict(path="/v1/audio/speech", resp_body=b"\xff\xfbaudio"),
    )]
    return evs + [_case_event(c) for c in CAPTURE_CASES]


@pytest.mark.parametrize("max_body", [5, 50, 4096, MAX])
def test_a_waiting_capture_reads_as_one_built_at_once(max_body):
    """capture_exists tells what build_capture would (or None), and a capture read while it
    waits, or once compressed, is the one built at once."""
    told = 0
    for i, ev in enumerate(_corpus()):
        for parts in (ALL_PARTS, frozenset({"req_headers"}), mask_for(ev.record.path, ALL_PARTS),
                      frozenset()):
            now = build_capture(ev, parts, max_body)
            exists = capture_exists(ev, parts, max_body)
            if exists is None:
                assert ev.response_encoding
                continue
            told += 1
            assert exists is (now is not None), (i, parts)
            if not exists:
                continue
            c = CaptureCache(1 << 20)
            assert c.put_later(i, ev, parts, max_body) == (True, []) and c.has(i)
            assert c.get(i) == now and decompress(c.get_blob(i)) == now
    assert told > 50


def test_waiting_captures_compress_oldest_first_then_the_oldest_go(monkeypatch):
    built: list[int] = []
    real = captures.capture_blob

    def spy(ev, parts, max_body):
        built.append(ev.record.id)
        return real(ev, parts, max_body)

    monkeypatch.setattr(captures, "capture_blob", spy)
    body = b'{"text":"' + b"abc " * 1000 + b'"}'  # ~4 KB that compresses well
    evs = {i: event(id=i, resp_body=body) for i in range(1, 8)}
    weight = len(body) + len(b'{"model":"m"}') + LATER_OVERHEAD  # (no headers)
    c = CaptureCache(3 * weight + 1000)  # three waiting, and room for one compressed
    for i in (1, 2, 3):
        assert c.put_later(i, evs[i], ALL_PARTS, MAX) == (True, [])
    assert built == [] and c.bytes == 3 * weight
    assert c.put_later(4, evs[4], ALL_PARTS, MAX) == (True, [])  # over: the oldest waiting shrinks
    assert built == [1] and c.bytes <= c.max_bytes and c.ids() == [1, 2, 3, 4]
    assert c.get(1) == build_capture(evs[1], ALL_PARTS, MAX)  # compressed in place
    assert c.discard_below(3) == [1, 2] and built == [1]  # 2 leaves unbuilt
    small = CaptureCache(weight - 1)  # one waiting capture weighs more: compressed at once
    assert small.put_later(5, evs[5], ALL_PARTS, MAX) == (True, []) and built == [1, 5]
    assert small.bytes == len(small.get_blob(5)) < weight
    blobs = CaptureCache(2 * weight)  # nothing waits: the oldest go
    for i in (1, 2, 3):
        blobs.put_blob(i, b"x" * (weight - 10))
    assert blobs.ids() == [2, 3] and blobs.evicted == 1
    assert blobs.put_later(6, evs[6], ALL_PARTS, MAX) == (True, [2])  # compressed first; still over
    assert blobs.ids() == [3, 6] and built == [1, 5, 6]
    assert c.bytes == sum(captures._weight(c._items[i]) for i in c.ids())


def test_a_blob_holds_no_more_memory_than_its_length():
    """The cache's bound counts ``len(blob)``: the blob must not keep the compressor's worst-case
    output allocation (the input's size) behind a short result."""
    import tracemalloc

    cap = {"id": 1, "req_body": "the same words again " * 5000, "resp_body": None}
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        blobs = [compress(cap) for _ in range(20)]
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    held = sum(s.size_diff for s in after.compare_to(before, "lineno")) / len(blobs)
    assert len(blobs[0]) < 2000 and held < len(blobs[0]) + 1024, (len(blobs[0]), held)
    assert decompress(blobs[0]) == cap
