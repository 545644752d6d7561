"""The mitmproxy layer with in-memory flows: options, failure containment, bounds, failures
as records, replay metadata."""

from __future__ import annotations

import json

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons

import aistats
from casekit import drop_ids
from fixtures import ANTHROPIC, OPENAI_CHAT
from flowkit import Capture, make_flow, new_addon, roundtrip, run_live, run_replay

SSE = {"Content-Type": "text/event-stream"}
CHAT_REQ = b'{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}'


@pytest.fixture(params=[False, True], ids=["mitmdump", "mitmdump -w"])
def env(request):
    """The addon as under plain mitmdump, and as under ``-w`` (a stream's reading made in the
    response hook, to go with the flow)."""
    addon, ctx, cap = new_addon(saved=request.param)
    yield addon, cap
    ctx.__exit__(None, None, None)


@pytest.fixture
def saved_env():
    """As under ``mitmdump -w``: the flows saved, then replayed."""
    addon, ctx, cap = new_addon(saved=True)
    yield addon, cap
    ctx.__exit__(None, None, None)


def chat_flow(headers=None):
    return make_flow("POST", "/v1/chat/completions",
                     {"Content-Type": "application/json", **(headers or {})}, CHAT_REQ)


def chunks_of(body, n=13):
    return [body[i:i + n] for i in range(0, len(body), n)]


def test_stream_record_timings_and_metadata(env):
    addon, cap = env
    f = run_live(addon, chat_flow({"User-Agent": "OpenAI/Python 3.54.0", "X-Session-ID": "s1"}),
                 200, SSE, chunks_of(OPENAI_CHAT), OPENAI_CHAT, chunk_gap=0.01)
    rec = cap.records[0]
    assert rec["stream"] is True and rec["model"] == "gpt-4o-mini" and rec["provider"] == "openai"
    assert (rec["input_tokens"], rec["output_tokens"], rec["total_tokens"]) == (12, 3, 15)
    assert rec["ttfb_ms"] == pytest.approx(50.0)
    assert rec["ttft_ms"] is not None and rec["ttft_ms"] > rec["ttfb_ms"]
    assert rec["chunks"] == 2 and rec["decode_ms"] > 0
    assert rec["observed_tokens_per_second"] == pytest.approx(2 / (rec["decode_ms"] / 1000), rel=1e-3)
    assert (rec["client"], rec["session_id"], rec["chat_round"]) == ("openai-python", "s1", 1)
    assert f.response.raw_content == OPENAI_CHAT  # restored, so -w files are complete
    if not addon._keep_reading:  # plain mitmdump: read with the record, nothing kept
        assert "aistats" not in f.metadata
        return
    md = f.metadata["aistats"]
    json.dumps(md)  # plain types only
    assert md["timing"]["content_events"] == 2 and md["parsed"]["usage"][:2] == [12, 3]


def test_replay_identical_and_foreign_flow_has_null_stream_timings(saved_env):
    addon, cap = saved_env
    f = run_live(addon, chat_flow(), 200, SSE, chunks_of(OPENAI_CHAT), OPENAI_CHAT)
    g = roundtrip(f)
    run_replay(addon, g)
    assert drop_ids(cap.records[1]) == drop_ids(cap.records[0])
    g2 = roundtrip(f)
    g2.metadata.clear()
    run_replay(addon, g2)
    foreign = cap.records[2]
    assert (foreign["ttft_ms"], foreign["chunks"], foreign["decode_ms"]) == (None, None, None)
    assert foreign["output_tokens"] == 3 and foreign["duration_ms"] == cap.records[0]["duration_ms"]
    # The live reading is kept with the flow: a replay takes it, not the body, which is then
    # not read again (here it says something else, and the record still says the live reading).
    g3 = roundtrip(f)
    g3.response.raw_content = OPENAI_CHAT.replace(b'"completion_tokens": 3', b'"completion_tokens": 9')
    assert g3.response.raw_content != OPENAI_CHAT
    run_replay(addon, g3)
    assert drop_ids(cap.records[3]) == drop_ids(cap.records[0])


def test_exception_in_stream_never_drops_a_chunk(env, monkeypatch, caplog):
    addon, cap = env

    def boom(self, chunk, now):
        raise RuntimeError("engine bug")

    monkeypatch.setattr(aistats.StreamObserver, "feed", boom)
    f = run_live(addon, chat_flow(), 200, SSE, chunks_of(OPENAI_CHAT), OPENAI_CHAT)
    assert len(cap.records) == 1  # still a record, marked
    assert "internal error" in cap.records[0]["parse_error"]
    warnings = [r for r in caplog.records if "engine bug" in r.getMessage()]
    assert len(warnings) == 1 and f.id in warnings[0].getMessage()


def test_exception_in_a_hook_is_contained(env, monkeypatch, caplog):
    addon, cap = env
    monkeypatch.setattr(aistats, "build_record", lambda *a, **k: 1 / 0)
    run_live(addon, chat_flow(), 200, {"Content-Type": "application/json"}, [], b"{}")
    assert cap.records == []
    assert any("ZeroDivisionError" in r.getMessage() for r in caplog.records)


def test_capped_stream_is_marked_and_replays_from_metadata():
    addon, ctx, cap = new_addon(saved=True, aistats_max_body="100")
    try:
        f = run_live(addon, chat_flow(), 200, SSE, chunks_of(OPENAI_CHAT), OPENAI_CHAT)
        rec = cap.records[0]
        assert "not saved to the flow" in rec["parse_error"]
        assert rec["output_tokens"] == 3  # parsed incrementally all the same
        assert f.response.raw_content is None
        run_replay(addon, roundtrip(f))
        assert drop_ids(cap.records[1]) == drop_ids(rec)
    finally:
        ctx.__exit__(None, None, None)


def test_upstream_abort_keeps_usage_seen_so_far(saved_env):
    addon, cap = saved_env
    cut = ANTHROPIC[: ANTHROPIC.index(b"event: message_stop") + 12]  # mid-event
    f = make_flow("POST", "/v1/messages", {"Content-Type": "application/json"},
                  b'{"model":"claude-sonnet-4-5","stream":true,"messages":[{"role":"user","content":"x"}]}')
    f = run_live(addon, f, 200, SSE, chunks_of(cut), cut,
                 error="HTTP/1 protocol error: peer closed connection without sending complete message body (incomplete chunked read)")
    rec = cap.records[0]
    assert rec["error_type"] == "upstream_aborted" and "incomplete chunked read" in rec["error"]
    assert (rec["input_tokens"], rec["output_tokens"], rec["cached_tokens"]) == (112, 7, 100)
    assert rec["parse_error"] == "stream truncated"
    assert f.response.raw_content == cut
    run_replay(addon, roundtrip(f))
    assert len(cap.records) == 2  # replay fires response and error: still one record
    assert drop_ids(cap.records[1]) == drop_ids(rec)


def test_client_disconnect_and_unreachable(env):
    addon, cap = env
    run_live(addon, chat_flow(), 200, SSE, chunks_of(OPENAI_CHAT[:60]), b"", error="Client disconnected.")
    assert cap.records[0]["error_type"] == "client_disconnected"
    f = chat_flow()
    f.live = True
    addon.requestheaders(f)
    from mitmproxy.flow import Error
    f.error = Error("Server connection to ('127.0.0.1', 1) failed: Connection refused")
    addon.error(f)
    rec = cap.records[1]
    assert (rec["status"], rec["error_type"], rec["input_tokens"]) == (None, "upstream_unreachable", None)
    assert "Connection refused" in rec["error"]


def test_non_llm_traffic_gets_no_record(env):
    addon, cap = env
    f = make_flow("POST", "/upload", {}, b"x")
    run_live(addon, f, 200, SSE, [b"data: 1\n\n"], b"")
    assert cap.records == [] and not callable(f.response.stream)


def test_stream_error_event_in_200(env):
    addon, cap = env
    body = b'data: {"error":{"message":"quota exceeded","type":"insufficient_quota"}}\n\n'
    run_live(addon, chat_flow(), 200, SSE, [body], body)
    rec = cap.records[0]
    assert (rec["status"], rec["error"], rec["error_type"]) == (200, "quota exceeded", "insufficient_quota")


@pytest.mark.parametrize("option,value,fragment", [
    ("aistats_max_body", "0", "aistats_max_body: '0' is invalid; expected a size in bytes >= 1"),
    ("aistats_max_body", "lots", "aistats_max_body: 'lots' is invalid"),
    ("aistats_log_backups", "-1", "aistats_log_backups: '-1' is invalid; expected an integer 0-1000"),
    ("aistats_metrics_port", "abc", "aistats_metrics_port: 'abc' is invalid; expected an integer 0-65535"),
    ("aistats_session_headers", "x-ok,bad header", "expected HTTP header names"),
    ("aistats_metrics_ttft_buckets", "1,0.5", "expected increasing positive seconds"),
    ("aistats_store_rows", "0", "aistats_store_rows: '0' is invalid; expected an integer >= 1 "
                                "with the in-memory store"),
    ("aistats_log", "/proc/nonexistent/dir/x.jsonl", "aistats_log: '/proc/nonexistent/dir/x.jsonl' is invalid; expected a writable file path"),
])
def test_bad_options_are_one_line_errors(option, value, fragment, caplog):
    addon = aistats.AIStats()
    with taddons.context(addon) as tctx:
        # At start-up: one ERROR line (mitmdump then exits non-zero), no exception, no traceback.
        tctx.configure(addon, **{option: value})
        errors = [r for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and fragment in errors[0].getMessage()
        assert "\n" not in errors[0].getMessage() and errors[0].exc_info is None
        # At run time: the change is refused and rolled back.
        addon._running = True
        with pytest.raises(exceptions.OptionsError) as e:
            tctx.configure(addon, **{option: value})
        assert fragment in str(e.value)


def test_sizes_accept_units():
    addon, ctx, _ = new_addon(aistats_max_body="2MiB", aistats_log_max_bytes="1kb")
    try:
        assert (addon.settings.max_body, addon.settings.log_max_bytes) == (2 << 20, 1000)
    finally:
        ctx.__exit__(None, None, None)


def test_log_sink_writes_jsonl_and_rotates(tmp_path):
    from aistats_engine.outputs.logsink import JsonlSink
    path = tmp_path / "llm.jsonl"
    sink = JsonlSink(path, max_bytes=200, backups=2, flush_interval=0.05)
    for i in range(20):
        sink.write({"i": i, "pad": "x" * 40})
    sink.close(wait=True)
    lines = [json.loads(x) for p in (path.with_name("llm.jsonl.2"), path.with_name("llm.jsonl.1"), path)
             if p.exists() for x in p.read_text().splitlines()]
    assert [x["i"] for x in lines] == list(range(20))[-len(lines):]
    assert all(p.stat().st_size <= 200 for p in tmp_path.iterdir())
    assert not path.with_name("llm.jsonl.3").exists()


def test_disconnect_after_the_end_event_is_not_an_error(env):
    """SDKs close the connection once they read [DONE]; the exchange itself succeeded."""
    addon, cap = env
    run_live(addon, chat_flow(), 200, SSE, chunks_of(OPENAI_CHAT), b"", error="Client disconnected.")
    rec = cap.records[0]
    assert (rec["error"], rec["error_type"], rec["output_tokens"]) == (None, None, 3)


def test_long_replay_shows_progress_at_most_once_a_second(caplog, monkeypatch):
    import logging

    from flowkit import make_flow, run_replay, set_response
    addon, ctx, cap = new_addon()
    clock = [100.0]
    monkeypatch.setattr(aistats.time, "monotonic", lambda: clock[0])
    try:
        with caplog.at_level(logging.INFO, logger="aistats"):
            for i in range(10):
                clock[0] += 0.3  # ten flows over three seconds
                f = make_flow("POST", "/v1/chat/completions", {}, b'{"model":"m"}')
                set_response(f, 200, {"content-type": "application/json"}, clock[0])
                f.response.raw_content = b'{"choices":[]}'
                f.response.timestamp_end = clock[0]
                run_replay(addon, f)
            addon.done()
    finally:
        ctx.__exit__(None, None, None)
    progress = [m for m in caplog.messages if m.startswith("aistats: replay: ")]
    done = [m for m in caplog.messages if m.startswith("aistats: replay done: ")]
    assert len(progress) == 2  # at +1 s and +2 s, not per flow
    assert done == ["aistats: replay done: 10 flows read, 10 records written in 2.7 s (4 flows/s)"]


def test_replay_without_loop_turns_keeps_pending_records_bounded():
    """`mitmdump -nr` runs every flow of a file without yielding to the loop: the records
    waiting for a later loop turn stay bounded (made and published as they pile up), in order."""
    import asyncio

    from flowkit import set_response
    addon, ctx, cap = new_addon()
    most = [0]

    async def replay_all() -> None:
        for i in range(5 * aistats.MAX_PENDING):  # no await: the loop never turns
            f = make_flow("POST", "/v1/chat/completions", {}, b'{"model":"m%d"}' % i)
            set_response(f, 200, {"content-type": "application/json"}, 1.0)
            f.response.raw_content = b'{"choices":[]}'
            f.response.timestamp_end = 1.0
            run_replay(addon, f)
            most[0] = max(most[0], len(addon._unbuilt))
        published_before_turn = len(cap.records)
        for _ in range(3):
            await asyncio.sleep(0)
        assert published_before_turn >= 4 * aistats.MAX_PENDING

    try:
        asyncio.run(replay_all())
    finally:
        ctx.__exit__(None, None, None)
    assert most[0] < aistats.MAX_PENDING
    assert [r["model"] for r in cap.records] == ["m%d" % i for i in range(5 * aistats.MAX_PENDING)]
    assert [r["id"] for r in cap.records] == sorted(r["id"] for r in cap.records)


def test_live_records_gathered_then_made_in_slices_and_bounded(monkeypatch):
    """Live records wait up to GATHER_S for others; once MAX_PENDING wait they go at the next
    loop turn (in slices, not inside the hook that finished the last flow); past twice that,
    at once. Nothing is lost and the order is kept."""
    import asyncio

    from flowkit import set_response
    monkeypatch.setattr(aistats, "GATHER_S", 60.0)  # only the bound can start the work here
    addon, ctx, cap = new_addon()
    seen: dict[str, int] = {}

    def finish(i: int) -> None:
        f = make_flow("POST", "/v1/chat/completions", {}, b'{"model":"m%d"}' % i)
        f.live = True
        addon.requestheaders(f)
        set_response(f, 200, {"content-type": "application/json"}, 1.0)
        addon.responseheaders(f)
        f.response.raw_content = b'{"choices":[]}'
        f.response.timestamp_end = 1.0
        addon.response(f)

    async def run() -> None:
        for i in range(aistats.MAX_PENDING - 1):
            finish(i)
        await asyncio.sleep(0.01)
        seen["gathering"] = len(cap.records)  # waiting for the (long) gathering
        for i in range(aistats.MAX_PENDING - 1, 2 * aistats.MAX_PENDING - 1):
            finish(i)  # the bound is reached: no record made inside these hooks
        seen["in_hooks"] = len(cap.records)
        finish(2 * aistats.MAX_PENDING - 1)  # twice the bound: made at once
        seen["at_twice"] = len(cap.records)
        for i in range(2 * aistats.MAX_PENDING, 2 * aistats.MAX_PENDING + 5):
            finish(i)
        for _ in range(200):  # bounded: slices, one per loop turn
            if not addon._unbuilt:
                break
            await asyncio.sleep(0)
        seen["after_turns"] = len(cap.records)

    try:
        asyncio.run(run())
    finally:
        ctx.__exit__(None, None, None)
    n = 2 * aistats.MAX_PENDING + 5
    assert seen == {"gathering": 0, "in_hooks": 0, "at_twice": 2 * aistats.MAX_PENDING,
                    "after_turns": n}
    assert [r["model"] for r in cap.records] == ["m%d" % i for i in range(n)]


def test_request_read_off_the_response_headers_path_unless_the_rules_need_it(tmp_path):
    """Parsing a request body (a long conversation: up to a millisecond) is kept off the path of
    the response headers to the client: a live stream's request is read on the next loop turn
    (in-flight views show its model meanwhile); a whole body's, or a replayed flow's, with its
    record. Attribute rules read it in the hook: their request phase comes before the
    response's."""
    import asyncio

    from flowkit import set_response

    rules = tmp_path / "rules.yaml"
    rules.write_text("attributes:\n  - key: question\n    value_source: request_body\n"
                     "    value: messages.0.content\n")
    seen: dict[str, object] = {}

    async def hooks(addon: aistats.AIStats, live: bool, name: str, headers: dict) -> None:
        f = chat_flow()
        f.live = live
        addon.requestheaders(f)
        set_response(f, 200, headers, 1.0)
        addon.responseheaders(f)
        st = addon._flows[f.id]
        seen[name] = st.request_info.model if st.request_info else None
        await asyncio.sleep(0)
        seen[name + " next turn"] = st.request_info.model if st.request_info else None

    json_headers = {"Content-Type": "application/json"}
    for name, live, options, headers in (
            ("live", True, {}, SSE), ("replay", False, {}, SSE), ("whole", True, {}, json_headers),
            ("rules", True, {"aistats_config": str(rules)}, SSE)):
        addon, ctx, _ = new_addon(**options)
        try:
            asyncio.run(hooks(addon, live, name, headers))
        finally:
            ctx.__exit__(None, None, None)
    assert seen == {"live": None, "live next turn": "gpt-4o-mini",
                    "replay": None, "replay next turn": None,
                    "whole": None, "whole next turn": None,
                    "rules": "gpt-4o-mini", "rules next turn": "gpt-4o-mini"}


def test_a_finished_flow_is_not_held_while_its_record_waits(monkeypatch):
    """Records wait for others before they are made (GATHER_S); what waits holds the facts read,
    not the flow, which mitmproxy then frees as it would without aistats (a held flow's objects
    would be traversed by every garbage collection meanwhile)."""
    import asyncio
    import gc
    import weakref

    from flowkit import set_response
    monkeypatch.setattr(aistats, "GATHER_S", 60.0)
    addon, ctx, cap = new_addon()
    refs = []

    async def run() -> None:
        for stream in (True, False):
            f = chat_flow()
            f.live = True
            addon.requestheaders(f)
            set_response(f, 200, SSE if stream else {"Content-Type": "application/json"}, 1.0)
            addon.responseheaders(f)
            await asyncio.sleep(0)  # (the request is read on the next loop turn)
            if stream:
                for c in chunks_of(OPENAI_CHAT):
                    f.response.stream(c)
                    await asyncio.sleep(0)
            else:
                f.response.raw_content = json.dumps({"model": "gpt-4o-mini", "choices": []}).encode()
            f.response.timestamp_end = 1.1
            addon.response(f)
            refs.append(weakref.ref(f))
            del f
        await asyncio.sleep(0)

    try:
        asyncio.run(run())
        gc.collect()
        assert [r() for r in refs] == [None, None] and len(addon._unbuilt) == 2
        addon._finish_pending()
    finally:
        ctx.__exit__(None, None, None)
    assert [(r["model"], r["stream"], r["status"]) for r in cap.records] == [
        ("gpt-4o-mini", True, 200), ("gpt-4o-mini", False, 200)]
    assert cap.records[0]["output_tokens"] == 3


def test_a_streams_reading_goes_with_the_flow_only_where_flows_are_kept():
    """A flow file (``-w``: mitmproxy's save_stream_file) or a flow view (mitmweb, console: the
    ``view`` addon) keeps flows: a stream's reading is then made in its response hook and kept
    in flow.metadata, for a replay. Plain mitmdump makes it with the record instead, off the
    hook. The record is the same either way; the option may also be set at run time."""
    import os

    from mitmproxy.addons import save, view
    from mitmproxy.test import taddons

    records = []
    for extra, options, kept, later in (
            ([], {}, False, False),
            ([save.Save()], {"save_stream_file": os.devnull}, True, False),
            ([view.View()], {}, True, False),
            ([save.Save()], {}, False, True)):
        addon = aistats.AIStats()
        with taddons.context(*extra, addon) as ctx:  # (mitmweb adds its view first)
            ctx.configure(addon, **options)
            cap = Capture(addon)
            f = run_live(addon, chat_flow(), 200, SSE, chunks_of(OPENAI_CHAT), OPENAI_CHAT)
            assert ("aistats" in f.metadata) == kept, (extra, options)
            records.append({k: v for k, v in drop_ids(cap.records[0]).items() if k != "flow_id"})
            if later:  # -w set at run time (mitmweb, console)
                ctx.options.update(save_stream_file=os.devnull)
                g = run_live(addon, chat_flow(), 200, SSE, chunks_of(OPENAI_CHAT), OPENAI_CHAT)
                assert "aistats" in g.metadata
    assert all(r == records[0] for r in records)
