"""The span output: one OTLP span per record, checked at a loopback OTLP/HTTP receiver.

Every test stops what it starts: the output is closed (and its threads joined with
``wait_closed``), the receiver leaves its ``with`` block."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from aistats_engine.outputs.bus import Finished
from aistats_engine.outputs.spans import SpanOutput, derived_trace_id, traces_url
from aistats_engine.record.record import Record
from otlp_receiver import OtlpReceiver

T0 = 1_767_225_600.25  # epoch seconds
T1 = T0 + 1.5

PARENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN = "b7ad6b7169203331"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith("OTEL_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def _record(**kw) -> Record:
    base = dict(id=7, flow_id="3b6f1d8e-flow", start_time="2026-01-01T00:00:00.250Z",
                end_time="2026-01-01T00:00:01.750Z", method="POST", scheme="https",
                host="api.openai.com", port=443, path="/v1/chat/completions", status=200,
                provider="openai", api="chat_completions", operation="chat", model="gpt-4o")
    base.update(kw)
    return Record(**base)


def _finished(record: Record | None = None, headers: tuple = (), t0: float = T0,
              t1: float = T1) -> Finished:
    return Finished(record if record is not None else _record(), t0, t1, headers)


def _ns(t: float) -> int:
    return int(round(t * 1e9))


@contextmanager
def _output(url: str | None, **kw) -> Iterator[SpanOutput]:
    kw.setdefault("schedule_delay_ms", 50)
    kw.setdefault("export_timeout_s", 2.0)
    out = SpanOutput(url, **kw)
    try:
        yield out
    finally:
        out.close(wait=True, timeout=5)
        assert out.wait_closed(10)


def _one_span(rec: Record, headers: tuple = (), **kw):
    with OtlpReceiver() as rx, _output(rx.url, **kw) as out:
        out.finished(_finished(rec, headers))
        spans = rx.wait_spans(1, timeout=10)
        assert len(spans) == 1, spans
        assert out.dropped == 0
    return spans[0]


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# -- what a span carries -------------------------------------------------------------------------

def test_span_name_kind_times_and_every_attribute():
    rec = _record(response_model="gpt-4o-2024-08-06", chat_id="chatcmpl-123",
                  finish_reason="stop", input_tokens=120, output_tokens=40, cached_tokens=100,
                  cache_creation_tokens=12, reasoning_tokens=8, total_tokens=160, stream=True,
                  ttft_ms=250.0, session_id="sess-1", consumer="team-a",
                  span_attributes={"user_tier": "gold", "retries": 2, "ratio": 0.5,
                                   "flag": True})
    sp = _one_span(rec)
    assert sp.name == "chat gpt-4o"
    assert sp.kind == "CLIENT"
    assert (sp.start_ns, sp.end_ns) == (_ns(T0), _ns(T1))
    assert sp.status_code == "UNSET" and sp.status_message == ""
    assert sp.parent_span_id == ""
    assert sp.attributes == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o",
        "gen_ai.request.stream": True,
        "gen_ai.response.model": "gpt-4o-2024-08-06",
        "gen_ai.response.id": "chatcmpl-123",
        "gen_ai.response.finish_reasons": ["stop"],
        "gen_ai.usage.input_tokens": 120,
        "gen_ai.usage.output_tokens": 40,
        "gen_ai.usage.cache_read.input_tokens": 100,
        "gen_ai.usage.cache_write.input_tokens": 12,
        "gen_ai.usage.reasoning.output_tokens": 8,
        "gen_ai.response.time_to_first_chunk": 0.25,
        "server.address": "api.openai.com",
        "server.port": 443,
        "http.response.status_code": 200,
        "aistats.record_id": 7,
        "aistats.session_id": "sess-1",
        "aistats.consumer": "team-a",
        "user_tier": "gold", "retries": 2, "ratio": 0.5, "flag": True,
    }
    assert sp.resource["service.name"] == "aistats"
    assert sp.scope == "aistats"


def test_unknown_values_are_left_out_and_the_name_is_the_operation_alone():
    rec = Record(id=1, flow_id="f", start_time="s", end_time="e", method="POST", scheme="http",
                 host="127.0.0.1", port=8080, path="/x", operation="embeddings")
    sp = _one_span(rec)
    assert sp.name == "embeddings"
    assert sp.attributes == {"gen_ai.operation.name": "embeddings",
                             "server.address": "127.0.0.1", "server.port": 8080,
                             "aistats.record_id": 1}
    # no operation known either: the HTTP method names the span
    sp = _one_span(Record(id=2, flow_id="g", start_time="s", end_time="e", method="POST",
                          scheme="http", host="h", port=1, path="/x", model="m"))
    assert sp.name == "POST m"
    assert "gen_ai.operation.name" not in sp.attributes


def test_a_failed_record_has_status_error_and_error_type():
    rec = _record(status=429, error="Rate limit reached for gpt-4o", error_type="429")
    sp = _one_span(rec)
    assert sp.status_code == "ERROR"
    assert sp.status_message == "Rate limit reached for gpt-4o"
    assert sp.attributes["error.type"] == "429"
    assert sp.attributes["http.response.status_code"] == 429
    # no answer at all: no status code, error.type says why
    sp = _one_span(_record(status=None, error="connection refused",
                           error_type="upstream_unreachable"))
    assert sp.status_code == "ERROR"
    assert sp.attributes["error.type"] == "upstream_unreachable"
    assert "http.response.status_code" not in sp.attributes


def test_a_successful_record_has_no_error_type():
    sp = _one_span(_record())
    assert "error.type" not in sp.attributes and sp.status_code == "UNSET"


def test_lists_and_objects_become_json_text_and_odd_values_stay_exportable():
    rec = _record(span_attributes={
        "tags": ["a", "b"], "mixed": [1, "x", None], "obj": {"k": [1, 2], "ü": "é"},
        "huge": 1 << 70, "surrogate": "bad \ud800 text", "none": None})
    sp = _one_span(rec)
    a = sp.attributes
    assert json.loads(a["tags"]) == ["a", "b"]
    assert json.loads(a["mixed"]) == [1, "x", None]
    assert json.loads(a["obj"]) == {"k": [1, 2], "ü": "é"}
    assert a["huge"] == str(1 << 70)
    assert a["surrogate"].startswith("bad ") and a["surrogate"].endswith(" text")
    assert "none" not in a


def test_message_content_goes_on_spans_only_when_the_user_opts_in():
    content = {"question": "What is 2+2?", "system": "Be brief.", "answer": "4",
               "reasoning": "add", "tool_calls": [{"name": "calc", "arguments": "{}"}]}
    # the content keys may or may not also be among span_attributes: never without opt-in
    rec = _record(span_attributes={"user_tier": "gold", **content},
                  span_content_attributes=content)
    sp = _one_span(rec)
    assert sp.attributes["user_tier"] == "gold"
    assert not set(content) & set(sp.attributes)

    rec = _record(span_attributes={"user_tier": "gold"}, span_content_attributes=content)
    assert not set(content) & set(_one_span(rec).attributes)

    sp = _one_span(rec, include_content=True)
    a = sp.attributes
    assert a["user_tier"] == "gold"
    assert (a["question"], a["system"], a["answer"], a["reasoning"]) == \
        ("What is 2+2?", "Be brief.", "4", "add")
    assert json.loads(a["tool_calls"]) == [{"name": "calc", "arguments": "{}"}]


# -- trace context -------------------------------------------------------------------------------

def test_traceparent_makes_the_span_a_child_of_the_callers_span():
    headers = ((b"Content-Type", b"application/json"),
               (b"TraceParent", f"00-{PARENT_TRACE}-{PARENT_SPAN}-01".encode()),
               (b"tracestate", b"vendor=abc"), (b"TRACESTATE", b"other=1"))
    sp = _one_span(_record(), headers)
    assert sp.trace_id == PARENT_TRACE
    assert sp.parent_span_id == PARENT_SPAN
    assert sp.span_id not in ("", PARENT_SPAN)
    assert sp.trace_state == "vendor=abc,other=1"


def test_an_invalid_traceparent_is_ignored():
    rec = _record()
    sp = _one_span(rec, ((b"traceparent", b"00-not-a-trace-01"),))
    assert sp.parent_span_id == ""
    assert sp.trace_id == f"{derived_trace_id(rec):032x}"


def test_a_caller_that_does_not_sample_gets_no_span_and_no_drop():
    headers = ((b"traceparent", f"00-{PARENT_TRACE}-{PARENT_SPAN}-00".encode()),)
    with OtlpReceiver() as rx, _output(rx.url) as out:
        out.finished(_finished(_record(id=1), headers))
        out.finished(_finished(_record(id=2, flow_id="other")))
        spans = rx.wait_spans(1, timeout=10)
        time.sleep(0.2)  # a second span would have been in the same batch
        assert [s.attributes["aistats.record_id"] for s in rx.spans] == [2]
        assert out.dropped == 0
    assert len(spans) == 1


def test_replaying_a_record_exports_the_same_span_but_for_its_span_id():
    rec = _record(chat_id="chatcmpl-1", input_tokens=3, span_attributes={"k": ["v"]})
    first, second = _one_span(rec), _one_span(rec)
    assert first.trace_id == second.trace_id == f"{derived_trace_id(rec):032x}"
    assert first.span_id != second.span_id
    for a, b in ((first.name, second.name), (first.attributes, second.attributes),
                 ((first.start_ns, first.end_ns), (second.start_ns, second.end_ns)),
                 (first.parent_span_id, second.parent_span_id)):
        assert a == b
    # with a caller's traceparent too
    headers = ((b"traceparent", f"00-{PARENT_TRACE}-{PARENT_SPAN}-01".encode()),)
    a, b = _one_span(rec, headers), _one_span(rec, headers)
    assert (a.trace_id, a.parent_span_id) == (b.trace_id, b.parent_span_id) == \
        (PARENT_TRACE, PARENT_SPAN)
    # another flow, another trace
    assert derived_trace_id(_record(flow_id="another")) != derived_trace_id(rec)


# -- endpoint and OTel variables -----------------------------------------------------------------

def test_endpoint_may_be_a_base_url_or_the_traces_url():
    assert traces_url("http://collector:4318") == "http://collector:4318/v1/traces"
    assert traces_url("http://collector:4318/") == "http://collector:4318/v1/traces"
    assert traces_url("https://c:4318/v1/traces") == "https://c:4318/v1/traces"
    assert traces_url("http://h/api/public/otel") == "http://h/api/public/otel/v1/traces"
    for bad in ("collector:4318", "ftp://h/", "http:///v1/traces"):
        with pytest.raises(ValueError):
            traces_url(bad)
    with OtlpReceiver() as rx:
        for url in (rx.base_url, rx.base_url + "/", rx.url):
            with _output(url) as out:
                out.finished(_finished())
                assert out.endpoint == rx.url
        assert len(rx.wait_spans(3, timeout=10)) == 3


def test_no_endpoint_uses_the_otel_variables(monkeypatch: pytest.MonkeyPatch):
    with OtlpReceiver() as rx:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", rx.base_url)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=acme")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip")
        monkeypatch.setenv("OTEL_SERVICE_NAME", "my-proxy")
        monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
        with _output(None) as out:
            assert out.endpoint == rx.url
            out.finished(_finished())
            spans = rx.wait_spans(1, timeout=10)
        assert spans and spans[0].name == "chat gpt-4o"
        assert rx.encodings == ["gzip"]
        assert rx.headers[0]["x-tenant"] == "acme"
        assert spans[0].resource["service.name"] == "my-proxy"
        assert spans[0].resource["deployment.environment"] == "test"
        # the signal-specific variable is used as it is
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", rx.url)
        with _output(None, service_name="ignored-when-env-names-one") as out:
            assert out.endpoint == rx.url
            out.finished(_finished())
            assert len(rx.wait_spans(2, timeout=10)) == 2


def test_the_global_tracer_provider_is_left_alone():
    from opentelemetry import trace
    before = trace.get_tracer_provider()
    with OtlpReceiver() as rx, _output(rx.url) as out:
        out.finished(_finished())
        rx.wait_spans(1, timeout=10)
    assert trace.get_tracer_provider() is before


# -- a broken collector never holds up traffic ---------------------------------------------------

N = 10_000


def _flood(out: SpanOutput) -> float:
    t = time.monotonic()
    for i in range(N):
        out.finished(_finished(_record(id=i + 1, flow_id=f"f{i}")))
    return time.monotonic() - t


@pytest.mark.parametrize("collector", ["dead", "hanging", "failing"])
def test_a_broken_collector_costs_no_time_and_every_lost_span_is_counted(collector, caplog):
    caplog.set_level(logging.INFO)
    drops: list[int] = []
    with OtlpReceiver(mode={"hanging": "hang", "failing": "fail"}.get(collector, "ok")) as rx:
        url = f"http://127.0.0.1:{_closed_port()}" if collector == "dead" else rx.url
        out = SpanOutput(url, max_queue=512, export_timeout_s=0.5, schedule_delay_ms=50,
                         on_drop=drops.append)
        try:
            assert _flood(out) < 5.0  # bounded, generous: the point is that nothing waits
            # the queue holds at most max_queue spans: the rest were dropped at once
            assert sum(drops) >= N - 512 - 512  # minus one batch possibly in the exporter
            t = time.monotonic()
            out.close(wait=True, timeout=1.0)
            assert time.monotonic() - t < 3.0
        finally:
            out.close()
            assert out.wait_closed(10)
        assert out.exported == 0
        assert out.dropped == sum(drops) == N
    ours = [r for r in caplog.records if r.name == "aistats_engine.outputs.spans"
            and r.levelno >= logging.WARNING]
    assert len(ours) == 1, [r.getMessage() for r in ours]
    why = {"dead": "Connection refused", "hanging": "timed out", "failing": "HTTP 503"}[collector]
    assert why in ours[0].getMessage()
    sdk = [r for r in caplog.records if r.name.startswith("opentelemetry")
           and r.levelno >= logging.WARNING]
    assert not sdk, [r.getMessage() for r in sdk]


def test_close_without_wait_returns_at_once_even_when_the_collector_hangs():
    drops: list[int] = []
    with OtlpReceiver(mode="hang") as rx:
        out = SpanOutput(rx.url, export_timeout_s=1.0, schedule_delay_ms=50, on_drop=drops.append)
        for i in range(100):
            out.finished(_finished(_record(id=i + 1)))
        assert rx.wait_requests(1, timeout=10) >= 1  # an export is hanging now
        t = time.monotonic()
        out.close()
        assert time.monotonic() - t < 0.5
        out.close()  # twice is fine
        out.finished(_finished())  # after close: counted, not raised
        assert out.wait_closed(15)
    assert out.dropped == sum(drops) == 101


def test_outage_then_recovery_one_warning_one_info(caplog):
    caplog.set_level(logging.INFO)
    with OtlpReceiver(mode="fail") as rx, \
            _output(rx.url, export_timeout_s=0.5) as out:
        for i in range(5):
            out.finished(_finished(_record(id=i + 1)))
        deadline = time.monotonic() + 10
        while out.dropped < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        for i in range(5, 10):  # still failing: no more lines
            out.finished(_finished(_record(id=i + 1)))
        deadline = time.monotonic() + 10
        while out.dropped < 10 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert out.dropped == 10
        rx.mode = "ok"
        out.finished(_finished(_record(id=11)))
        spans = rx.wait_spans(1, timeout=10)
        assert [s.attributes["aistats.record_id"] for s in spans] == [11]
        deadline = time.monotonic() + 5
        while out.exported < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
    lines = [(r.levelno, r.getMessage()) for r in caplog.records
             if r.name == "aistats_engine.outputs.spans"]
    assert [lv for lv, _ in lines] == [logging.WARNING, logging.INFO], lines
    assert "HTTP 503" in lines[0][1]
    assert "recovered" in lines[1][1] and "10 spans" in lines[1][1]
    assert not [r for r in caplog.records if r.name.startswith("opentelemetry")
                and r.levelno >= logging.WARNING]


def test_a_healthy_collector_gets_everything_and_close_waits_for_it():
    with OtlpReceiver() as rx:
        drops: list[int] = []
        out = SpanOutput(rx.url, schedule_delay_ms=1000, on_drop=drops.append)
        for i in range(1500):
            out.finished(_finished(_record(id=i + 1, flow_id=f"f{i}")))
        out.close(wait=True)  # flushes what the schedule had not sent yet
        assert out.wait_closed(10)
        assert out.exported == 1500 and out.dropped == 0 and not drops
        ids = sorted(s.attributes["aistats.record_id"] for s in rx.spans)
        assert ids == list(range(1, 1501))
