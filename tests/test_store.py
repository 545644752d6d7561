"""The record store: writing off the event loop, bounds and pruning, restarts, outages, and the
read side (activity filters, sorting and paging; stats; sessions; captures; export)."""

from __future__ import annotations

import logging
import math
import random
import shutil
import sqlite3
import statistics
import threading
import time

import pytest

from aistats_engine.outputs import store as store_mod
from aistats_engine.outputs.bus import Finished
from aistats_engine.outputs.captures import CaptureCache
from aistats_engine.outputs.store import (SESSION_SORT_KEYS, SORT_KEYS, Filters, Store,
                                          percentile, sturges_bins)
from aistats_engine.record.record import Record, rfc3339_ms

T0 = 1_780_000_000.0  # epoch seconds: the test data's first start
WAIT = 5.0


def rec(id: int, **kw) -> Record:
    base = dict(id=id, flow_id=f"f{id}", start_time=rfc3339_ms(T0 + id),
                end_time=rfc3339_ms(T0 + id + 1), method="POST", scheme="http",
                host="127.0.0.1", port=8000, path="/v1/chat/completions", status=200,
                response_content_type="application/json")
    base.update(kw)
    return Record(**base)


def ev(r: Record, t_start: float | None = None, t_end: float | None = None,
       req_body: bytes | None = b'{"model":"m"}', resp_body: bytes | None = b'{"ok":1}',
       headers=((b"Authorization", b"Bearer sk-abcdefghijklmnopqrstuvwx"),)) -> Finished:
    ts = T0 + r.id if t_start is None else t_start
    return Finished(r, ts, ts + 1 if t_end is None else t_end, headers,
                    ((b"Content-Type", b"application/json"),), "", req_body, None, resp_body,
                    None)


def put(store: Store, *events: Finished) -> None:
    for e in events:
        store.finished(e)
    assert store.flush(WAIT)


@pytest.fixture
def stores():
    made: list[Store] = []
    yield made
    for s in made:
        s.close(wait=True, timeout=WAIT)


def make(stores: list, *args, **kw) -> Store:
    s = Store(*args, **kw)
    stores.append(s)
    return s


def ids(page: dict) -> list[int]:
    return [d["id"] for d in page["data"]]


def all_ids(s: Store, f: Filters = Filters(), **kw) -> list[int]:
    return ids(s.activity(f, limit=1000, **kw))


class Calls(list):
    def __call__(self, x) -> None:
        self.append(x)


# -- writing, bounds, pruning ----------------------------------------------------------------
def test_memory_store_keeps_the_newest_max_rows(stores):
    s = make(stores, max_rows=5)
    put(s, *(ev(rec(i)) for i in range(1, 13)))
    assert all_ids(s) == [12, 11, 10, 9, 8]
    assert s.next_id() == 13 and s.written == 12
    assert s.record(12)["id"] == 12 and s.record(3) is None


def test_record_json_is_the_logged_object(stores):
    s = make(stores)
    r = rec(1, model="m", input_tokens=3, attributes={"a": [1, {"b": "c"}]}, cost_usd=0.5)
    r.log_fields = {"top": "level"}
    put(s, ev(r))
    expected = r.to_dict()
    expected["has_capture"] = False
    assert s.record(1) == expected


def test_file_store_prunes_by_rows_and_by_age(tmp_path, stores):
    s = make(stores, tmp_path / "rows.db", max_rows=3)
    put(s, *(ev(rec(i)) for i in range(1, 6)))
    assert all_ids(s) == [5, 4, 3]
    now = time.time()
    a = make(stores, tmp_path / "age.db", max_rows=0, max_age_s=100)
    put(a, ev(rec(1), now - 1000, now - 999), ev(rec(2), now - 50, now - 40),
        ev(rec(3), now - 500, now - 101), ev(rec(4), now, now))
    assert all_ids(a) == [4, 2]
    # Everything aged out: the id high-water mark stays (no id twice), also after a restart.
    b = make(stores, tmp_path / "gone.db", max_rows=0, max_age_s=100)
    put(b, ev(rec(7), now - 1000, now - 999))
    assert all_ids(b) == [] and b.next_id() == 8
    b.close(wait=True)
    c = make(stores, tmp_path / "gone.db", max_rows=0, max_age_s=100)
    assert c.next_id() == 8


def test_age_prune_on_restart(tmp_path, stores):
    path = tmp_path / "s.db"
    s = make(stores, path, max_rows=0)
    now = time.time()
    put(s, ev(rec(1), now - 1000, now - 999), ev(rec(2), now, now))
    assert s.close(wait=True)
    s2 = make(stores, path, max_rows=0, max_age_s=100)
    assert all_ids(s2) == [2]


def test_restart_keeps_rows_next_id_and_persisted_captures(tmp_path, stores):
    path = tmp_path / "sub" / "store.db"
    s = make(stores, path, captures=CaptureCache(1 << 20), persist_captures=True)
    assert s.next_id() == 1
    put(s, *(ev(rec(i)) for i in range(1, 5)))
    before = s.capture(2)
    assert before is not None and before["id"] == 2
    assert s.close(wait=True)

    cache = CaptureCache(1 << 20)
    s2 = make(stores, path, captures=cache, persist_captures=True)
    assert all_ids(s2) == [4, 3, 2, 1] and s2.next_id() == 5
    assert cache.ids() == [1, 2, 3, 4] and s2.capture(2) == before
    assert all(d["has_capture"] for d in s2.activity()["data"])
    put(s2, ev(rec(5)))
    assert s2.next_id() == 6
    assert s2.close(wait=True)

    # Persistence off: nothing read back, and what was on disk is forgotten.
    s3 = make(stores, path, captures=CaptureCache(1 << 20))
    assert s3.capture(2) is None and not any(d["has_capture"] for d in s3.activity()["data"])
    assert all_ids(s3) == [5, 4, 3, 2, 1]
    assert s3.close(wait=True)
    s4 = make(stores, path, captures=CaptureCache(1 << 20), persist_captures=True)
    assert s4.capture(2) is None


def test_captures_not_persisted_by_default(tmp_path, stores):
    path = tmp_path / "s.db"
    s = make(stores, path, captures=CaptureCache(1 << 20))
    put(s, ev(rec(1)))
    assert s.capture(1) is not None
    assert s.close(wait=True)
    s2 = make(stores, path, captures=CaptureCache(1 << 20), persist_captures=True)
    assert s2.capture(1) is None and all_ids(s2) == [1]


def test_persisted_captures_share_the_cache_byte_bound(tmp_path, stores):
    path = tmp_path / "s.db"
    cache = CaptureCache(30_000)
    s = make(stores, path, captures=cache, persist_captures=True)
    for i in range(1, 9):  # ~10 KB each that does not compress (random, base64 in the capture)
        put(s, ev(rec(i), resp_body=b"\xff" + random.Random(i).randbytes(7000)))
    held = cache.ids()
    assert 0 < len(held) < 8 and held == sorted(held) and held[-1] == 8 and cache.evicted
    with sqlite3.connect(path) as db:
        on_disk = db.execute("SELECT id, length(blob) FROM captures ORDER BY seq").fetchall()
    assert [i for i, _ in on_disk] == held and sum(n for _, n in on_disk) <= 30_000
    assert s.close(wait=True)
    smaller = CaptureCache(15_000)  # a smaller budget after the restart: the oldest go
    s2 = make(stores, path, captures=smaller, persist_captures=True)
    assert smaller.ids() == held[-len(smaller.ids()):] and smaller.bytes <= 15_000
    assert s2.capture(8) is not None


def test_captures_follow_their_records_out(stores):
    cache = CaptureCache(1 << 20)
    s = make(stores, max_rows=2, captures=cache)
    put(s, *(ev(rec(i)) for i in range(1, 5)))
    assert cache.ids() == [3, 4]


def test_capture_built_and_overlaid_at_read_time(stores):
    cache = CaptureCache(1 << 20)
    s = make(stores, captures=cache, capture_parts=frozenset({"req_headers", "resp_body"}))
    put(s, ev(rec(1)), ev(rec(2), resp_body=b""))
    cap = s.capture(1)
    assert cap["req_headers"] == {"Authorization": "[REDACTED]"}
    assert cap["resp_body"] == '{"ok":1}' and cap["req_body"] is None
    assert s.capture(2) is None
    page = s.activity()
    assert [(d["id"], d["has_capture"]) for d in page["data"]] == [(2, False), (1, True)]
    cache.clear()  # evicted later: the views say so at once
    assert not s.record(1)["has_capture"] and s.capture(1) is None
    off = make(stores, captures=CaptureCache(0))
    put(off, ev(rec(1)))
    assert off.capture(1) is None and not off.record(1)["has_capture"]


def _block_writer(s: Store):
    """Hold the writer inside its next batch until ``release`` is set."""
    entered, release = threading.Event(), threading.Event()
    original = s._process

    def slow(batch):
        entered.set()
        assert release.wait(WAIT)
        original(batch)

    s._process = slow
    return entered, release


def test_queue_is_bounded_and_drops_are_counted(stores):
    drops = Calls()
    s = make(stores, max_queue=3, on_drop=drops)
    entered, release = _block_writer(s)
    s.finished(ev(rec(1)))
    assert entered.wait(WAIT)  # the writer holds record 1; the queue is empty
    for i in range(2, 7):
        s.finished(ev(rec(i)))  # 2, 3, 4 fill the queue; 5 and 6 are dropped
    assert drops == [1, 1] and s.dropped == 2
    release.set()
    assert s.flush(WAIT)
    assert all_ids(s) == [4, 3, 2, 1]
    assert s.next_id() == 7  # ids handed out stay taken


def test_queued_bodies_are_bounded(stores):
    s = make(stores, captures=CaptureCache(1 << 20), max_queue_bytes=200)
    entered, release = _block_writer(s)
    s.finished(ev(rec(1), resp_body=b"x" * 280))  # 293 bytes, over the bound alone: kept
    assert entered.wait(WAIT)  # held by the writer: still counted
    s.finished(ev(rec(2), resp_body=b"z" * 60))  # would pass 200: stored without capture
    release.set()
    assert s.flush(WAIT)
    entered.clear()
    release.clear()
    s.finished(ev(rec(3), resp_body=b"y" * 80))  # 93
    assert entered.wait(WAIT)
    s.finished(ev(rec(4), resp_body=b"y" * 80))  # 186: fits
    release.set()
    assert s.flush(WAIT)
    assert s.captures_skipped == 1
    assert [s.capture(i) is not None for i in (1, 2, 3, 4)] == [True, False, True, True]
    assert all_ids(s) == [4, 3, 2, 1]


def test_finished_after_close_is_dropped_not_raised(stores):
    drops = Calls()
    s = make(stores, on_drop=drops)
    assert s.close(wait=True)
    s.finished(ev(rec(1)))
    assert drops == [1] and s.record(1) is None


def test_broken_disk_reported_once_per_outage_and_traffic_goes_on(tmp_path, stores, caplog):
    caplog.set_level(logging.INFO, logger="aistats_engine.outputs.store")
    folder = tmp_path / "data"
    path = folder / "store.db"
    reports, drops = Calls(), Calls()
    s = make(stores, path, report=reports, on_drop=drops)
    put(s, ev(rec(1)))
    shutil.rmtree(folder)  # the disk goes away under the open database
    for i in range(2, 5):
        put(s, ev(rec(i)))  # a batch each: every one fails
    assert len(reports) == 1 and str(path) in reports[0] and "\n" not in reports[0]
    assert sum(drops) == 3 and s.dropped == 3
    folder.mkdir()
    put(s, ev(rec(5)))  # writable again: a new file
    assert s.record(5) is not None and len(reports) == 1
    assert any("writable again; 3 record(s) dropped" in r.getMessage() for r in caplog.records)
    shutil.rmtree(folder)
    put(s, ev(rec(6)))
    assert len(reports) == 2 and sum(drops) == 4  # a new outage, a new report


def test_connection_closed_under_the_writer_recovers(tmp_path, stores):
    reports, drops = Calls(), Calls()
    s = make(stores, tmp_path / "s.db", report=reports, on_drop=drops)
    put(s, ev(rec(1)))
    s._wconn.close()
    put(s, ev(rec(2)))
    assert len(reports) == 1 and drops == [1]
    put(s, ev(rec(3)))
    assert all_ids(s) == [3, 1] and len(reports) == 1


def test_bad_path_and_arguments_fail_at_construction(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError):
        Store(blocker / "store.db")
    with pytest.raises(ValueError):
        Store(max_rows=0)
    with pytest.raises(ValueError):
        Store(tmp_path / "a.db", max_age_s=0)


# -- activity: filters, sorting, paging -------------------------------------------------------
DATA = [
    dict(id=1, model="gpt-4o", response_model="gpt-4o-2024", provider="openai", status=200,
         session_id="s1", consumer="alice", client="codex", input_tokens=100, output_tokens=10,
         cached_tokens=20, total_tokens=110, ttft_ms=120.0, duration_ms=900.0,
         prompt_per_second=500.0, tokens_per_second=40.0, observed_tokens_per_second=35.0,
         cost_usd=0.01, api="chat_completions", operation="chat"),
    dict(id=2, model="claude", provider="anthropic", status=200, session_id="s1",
         consumer="bob", client="claude-code", input_tokens=300, output_tokens=30,
         total_tokens=330, duration_ms=1500.0, api="messages", operation="chat"),
    dict(id=3, model="claude", provider="anthropic", status=429, session_id="s2",
         consumer="alice", error="rate limited", error_type="429", duration_ms=50.0,
         api="messages", operation="chat"),
    dict(id=4, model=None, response_model="llama-3", provider="llama.cpp", status=200,
         client="codex", input_tokens=50, output_tokens=200, cached_tokens=0,
         total_tokens=250, ttft_ms=80.0, prompt_per_second=800.0, tokens_per_second=60.0,
         duration_ms=4000.0, cost_usd=0.0, api="chat_completions", operation="chat"),
    dict(id=5, model="gpt-4o", provider="openai", status=None, session_id="s2",
         error="connect failed", error_type="upstream_unreachable", duration_ms=10.0,
         api="chat_completions", operation="chat"),
    dict(id=6, model="gpt-4o", provider="openai", status=500, consumer="bob",
         error="500 Internal Server Error", error_type="500", duration_ms=20.0,
         api="responses", operation="chat", client="openai-python"),
    dict(id=7, model="gpt-4o", provider="openai", status=200, session_id="s3",
         input_tokens=100, output_tokens=10, total_tokens=110, ttft_ms=120.0,
         duration_ms=900.0, cost_usd=0.01, api="responses", operation="chat",
         client="openai-python"),
]
START = {1: T0 + 10, 2: T0 + 20, 3: T0 + 30, 4: T0 + 40, 5: T0 + 50, 6: T0 + 60, 7: T0 + 60}


@pytest.fixture
def loaded(stores):
    s = make(stores)
    put(s, *(ev(rec(**d), START[d["id"]], START[d["id"]] + 2) for d in DATA))
    return s


@pytest.mark.parametrize("f,expected", [
    (Filters(), [7, 6, 5, 4, 3, 2, 1]),
    (Filters(model=("gpt-4o",)), [7, 6, 5, 1]),
    (Filters(model=("llama-3",)), [4]),  # the response model matches too
    (Filters(model=("gpt-4o-2024", "claude")), [3, 2, 1]),
    (Filters(model="claude"), [3, 2]),  # a bare string is one value
    (Filters(provider=("anthropic", "llama.cpp")), [4, 3, 2]),
    (Filters(status_class=("2xx",)), [7, 4, 2, 1]),
    (Filters(status_class=("4xx", "5xx")), [6, 3]),
    (Filters(status_class=("none",)), [5]),
    (Filters(session="s1"), [2, 1]),
    (Filters(consumer="alice"), [3, 1]),
    (Filters(client="codex"), [4, 1]),
    (Filters(start=T0 + 20, end=T0 + 40), [4, 3, 2]),  # inclusive
    (Filters(start=T0 + 60), [7, 6]),
    (Filters(end=T0 + 10), [1]),
    (Filters(min_id=3, max_id=5), [5, 4, 3]),
    (Filters(model=("gpt-4o",), status_class=("2xx",), client="openai-python"), [7]),
    (Filters(session="nope"), []),
])
def test_activity_filters(loaded, f, expected):
    page = loaded.activity(f, limit=1000)
    assert ids(page) == expected and page["total"] == len(expected)


def _sort_value(d: dict, key: str):
    if key == "time":
        return START[d["id"]]
    if key == "end_time":
        return START[d["id"]] + 2
    if key == "status_class":
        return f"{d['status'] // 100}xx" if d.get("status") is not None else "none"
    return d.get(key)


@pytest.mark.parametrize("order", ["asc", "desc"])
@pytest.mark.parametrize("key", SORT_KEYS)
def test_every_sort_key_both_orders_nulls_last_ties_by_id(loaded, key, order):
    rows = [dict(d) for d in DATA]
    known = [d for d in rows if _sort_value(d, key) is not None]
    unknown = [d for d in rows if _sort_value(d, key) is None]
    rev = order == "desc"
    expected = (sorted(known, key=lambda d: (_sort_value(d, key), d["id"]), reverse=rev)
                + sorted(unknown, key=lambda d: d["id"], reverse=rev))
    assert all_ids(loaded, sort=key, order=order) == [d["id"] for d in expected]


def test_paging_math_and_stable_pages(loaded):
    pages = [loaded.activity(sort="model", order="asc", page=p, limit=3) for p in (1, 2, 3, 4)]
    assert [(p["page"], p["limit"], p["total"], p["total_pages"]) for p in pages] == [
        (1, 3, 7, 3), (2, 3, 7, 3), (3, 3, 7, 3), (4, 3, 7, 3)]
    assert [len(p["data"]) for p in pages] == [3, 3, 1, 0]
    seen = [i for p in pages for i in ids(p)]
    assert seen == all_ids(loaded, sort="model", order="asc") and len(set(seen)) == 7
    assert loaded.activity(limit=7)["total_pages"] == 1
    assert loaded.activity(limit=1)["total_pages"] == 7
    empty = loaded.activity(Filters(session="nope"))
    assert (empty["total"], empty["total_pages"], empty["data"]) == (0, 0, [])
    assert loaded.activity(page="2", limit="5")["page"] == 2


@pytest.mark.parametrize("kw", [
    dict(sort="nope"), dict(sort="record"), dict(order="up"), dict(order=None), dict(page=0),
    dict(page=-1), dict(page="x"), dict(page=True), dict(page=1.5), dict(limit=0),
    dict(limit=1001), dict(f=Filters(status_class=("6xx",))), dict(f=Filters(min_id="3")),
    dict(f=Filters(start="yesterday")), dict(f=Filters(model=(1,))),
])
def test_bad_parameters_raise_one_line_value_errors(loaded, kw):
    f = kw.pop("f", Filters())
    with pytest.raises(ValueError) as e:
        loaded.activity(f, **kw)
    assert "\n" not in str(e.value)


def test_bad_parameters_elsewhere(loaded):
    with pytest.raises(ValueError):
        loaded.export(sort="nope")  # at the call, not at the first next()
    with pytest.raises(ValueError):
        loaded.sessions(sort="model")
    with pytest.raises(ValueError):
        loaded.sessions(limit=5000)
    with pytest.raises(ValueError):
        loaded.stats(Filters(status_class=("2XX",)))


def test_export_streams_in_chunks_with_a_cap(loaded, monkeypatch):
    monkeypatch.setattr(store_mod, "EXPORT_CHUNK", 2)
    assert [d["id"] for d in loaded.export()] == [7, 6, 5, 4, 3, 2, 1]
    assert [d["id"] for d in loaded.export(sort="time", order="asc", max_rows=3)] == [1, 2, 3]
    assert [d["id"] for d in loaded.export(Filters(model=("claude",)))] == [3, 2]
    it = loaded.export(order="asc")
    first = next(it)
    put(loaded, ev(rec(8)))  # stored after the export began: left out
    assert [first["id"], *(d["id"] for d in it)] == [1, 2, 3, 4, 5, 6, 7]
    assert all("has_capture" in d for d in loaded.export())


# -- stats ----------------------------------------------------------------------------------------
def test_stats_totals_and_token_weighted_speeds(loaded):
    st = loaded.stats()
    assert st["requests"] == 7 and st["errors"] == 3
    assert st["input_tokens"] == 550 and st["output_tokens"] == 250
    assert st["cached_tokens"] == 20 and st["total_tokens"] == 800
    assert st["cache_creation_tokens"] is None  # nobody reported it
    assert st["cost_usd"] == pytest.approx(0.02)
    sp = st["avg_speeds"]
    # prefill: (100-20) tokens at 500/s = 0.16 s; 50 at 800/s = 0.0625 s
    assert sp["prompt_per_second"] == pytest.approx(130 / (0.16 + 0.0625))
    # decode: 10 at 40/s = 0.25 s; 200 at 60/s = 3.333 s
    assert sp["tokens_per_second"] == pytest.approx(210 / (0.25 + 200 / 60))
    # observed: (10-1) at 35/s
    assert sp["observed_tokens_per_second"] == pytest.approx(35.0)
    none = loaded.stats(Filters(model=("claude",)))
    assert none["requests"] == 2 and none["cost_usd"] is None and none["errors"] == 1
    assert all(v is None for v in none["avg_speeds"].values())
    assert all(v is None for v in none["distributions"].values())
    empty = loaded.stats(Filters(session="nope"))
    assert empty["requests"] == 0 and empty["input_tokens"] is None and empty["errors"] == 0


def test_stats_percentiles_and_histogram_on_known_data(stores):
    s = make(stores)
    put(s, *(ev(rec(i, ttft_ms=float(10 * i), tokens_per_second=25.0)) for i in range(1, 6)))
    put(s, ev(rec(6)))  # no values: not counted
    d = s.stats()["distributions"]
    t = d["ttft_ms"]
    assert t["count"] == 5 and t["p50"] == 30.0
    assert t["p95"] == pytest.approx(48.0) and t["p99"] == pytest.approx(49.6)
    assert t["histogram"] == {"bins": [1, 1, 1, 1, 1], "min": 10.0, "max": 50.0,
                              "bin_size": 8.0}
    same = d["tokens_per_second"]  # all equal: one bin of size 0
    assert same["histogram"] == {"bins": [5], "min": 25.0, "max": 25.0, "bin_size": 0.0}
    assert same["p50"] == same["p99"] == 25.0
    assert d["prompt_per_second"] is None and d["observed_tokens_per_second"] is None


def test_stats_distribution_matches_reference_on_random_data(stores):
    rnd = random.Random(7)
    values = [round(rnd.lognormvariate(3, 1), 3) for _ in range(300)]
    s = make(stores)
    put(s, *(ev(rec(i + 1, prompt_per_second=v)) for i, v in enumerate(values)))
    d = s.stats()["distributions"]["prompt_per_second"]
    q = statistics.quantiles(values, n=100, method="inclusive")
    assert d["p50"] == pytest.approx(q[49]) and d["p95"] == pytest.approx(q[94])
    assert d["p99"] == pytest.approx(q[98])
    h = d["histogram"]
    assert len(h["bins"]) == sturges_bins(300) == 10 and sum(h["bins"]) == 300
    assert h["min"] == min(values) and h["max"] == max(values)
    assert h["bin_size"] == pytest.approx((max(values) - min(values)) / 10)
    for k, count in enumerate(h["bins"]):
        lo = h["min"] + k * h["bin_size"]
        hi = lo + h["bin_size"]
        inside = [v for v in values if lo <= v < hi or (k == 9 and v == h["max"])]
        assert abs(len(inside) - count) <= 1  # a value on a boundary may round either way


def test_sturges_and_percentile_helpers():
    assert [sturges_bins(n) for n in (1, 2, 16, 17, 1000, 10**7)] == [5, 5, 5, 6, 11, 20]
    vals = [1.0, 2.0, 4.0, 8.0]
    assert percentile(vals.__getitem__, 4, 50) == 3.0
    assert percentile(vals.__getitem__, 4, 100) == 8.0
    assert percentile([5.0].__getitem__, 1, 99) == 5.0
    assert math.isclose(percentile(vals.__getitem__, 4, 95), 4 + 4 * 0.85)


# -- sessions ------------------------------------------------------------------------------------
def test_sessions_summaries(loaded):
    page = loaded.sessions(limit=10)
    assert [r["session_id"] for r in page["data"]] == ["s3", "s2", "s1"]  # last_seen desc
    assert (page["total"], page["total_pages"]) == (3, 1)
    s1 = page["data"][2]
    assert s1 == {
        "session_id": "s1", "requests": 2, "input_tokens": 400, "cached_tokens": 20,
        "cache_creation_tokens": None, "output_tokens": 40, "reasoning_tokens": None,
        "cache_hit_ratio": pytest.approx(0.05), "errors": 0,
        "first_seen": rfc3339_ms(T0 + 10), "last_seen": rfc3339_ms(T0 + 22),
        "models": ["claude", "gpt-4o"], "clients": ["claude-code", "codex"],
        "cost_usd": pytest.approx(0.01)}
    s2 = page["data"][1]
    assert s2["errors"] == 2 and s2["input_tokens"] is None and s2["cache_hit_ratio"] is None
    assert s2["cost_usd"] is None and s2["clients"] == []
    s3 = page["data"][0]
    assert s3["cache_hit_ratio"] is None  # input known, cached unknown
    only = loaded.sessions(Filters(model=("claude",)))
    assert [(r["session_id"], r["requests"]) for r in only["data"]] == [("s2", 1), ("s1", 1)]
    second = loaded.sessions(page=2, limit=2)
    assert [r["session_id"] for r in second["data"]] == ["s1"] and second["total_pages"] == 2


@pytest.mark.parametrize("order", ["asc", "desc"])
@pytest.mark.parametrize("key", SESSION_SORT_KEYS)
def test_sessions_every_sort_key(loaded, key, order):
    rows = loaded.sessions(sort=key, order=order, limit=10)["data"]
    assert len(rows) == 3
    known = [(r[key], r["session_id"]) for r in rows if r[key] is not None]
    assert known == sorted(known, reverse=order == "desc")
    assert [r[key] for r in rows if r[key] is None] == [r[key] for r in rows[len(known):]]


def test_session_detail(loaded):
    d = loaded.session("s1")
    assert d["session_id"] == "s1" and d["request_count"] == 2
    assert [r["id"] for r in d["requests"]] == [1, 2] and not d["requests_truncated"]
    assert d["requests"][0]["model"] == "gpt-4o" and "has_capture" in d["requests"][0]
    cut = loaded.session("s2", max_requests=1)
    assert [r["id"] for r in cut["requests"]] == [5] and cut["requests_truncated"]
    assert loaded.session("nope") is None


# -- concurrency ----------------------------------------------------------------------------------
def test_reads_from_another_thread_while_writing(tmp_path, stores):
    for s in (make(stores), make(stores, tmp_path / "c.db", max_rows=0)):
        errors: list[BaseException] = []
        done = threading.Event()

        def reader(s=s):
            try:
                while not done.is_set():
                    s.activity(limit=50), s.stats(), s.sessions()
            except BaseException as e:  # pragma: no cover - the test fails on it
                errors.append(e)

        t = threading.Thread(target=reader)
        t.start()
        for i in range(1, 301):
            s.finished(ev(rec(i, session_id=f"s{i % 7}", ttft_ms=float(i))))
        assert s.flush(WAIT)
        done.set()
        t.join(WAIT)
        assert not errors and not t.is_alive()
        assert s.activity()["total"] == 300


def test_reads_see_every_record_finished_before_them_without_waiting_for_a_batch(stores,
                                                                                  monkeypatch):
    """The writer gathers records for up to COALESCE_S (fewer transactions); a read does not
    wait for that: it has the writer write what is queued first, so it sees it."""
    monkeypatch.setattr(store_mod, "COALESCE_S", 60.0)  # only the catch-up can explain a hit
    s = make(stores, None, captures=CaptureCache(1 << 20))
    put(s, ev(rec(1)))
    s.finished(ev(rec(2)))  # queued; the writer is now gathering a batch
    assert s.record(2) is not None
    s.finished(ev(rec(3)))
    assert s.capture(3) is not None
    s.finished(ev(rec(4)))
    assert [r["id"] for r in s.activity()["data"]] == [4, 3, 2, 1]
