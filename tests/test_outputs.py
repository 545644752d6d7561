"""The output seam: each output alone, the bus, and run-time reconfiguration of the addon."""

from __future__ import annotations

import json
import logging
import time

import pytest
from mitmproxy import exceptions

from aistats_engine.outputs.bus import Bus, Finished, Started
from aistats_engine.outputs.metrics import MetricsConfig
from aistats_engine.outputs.metrics_output import MetricsOutput
from aistats_engine.outputs.jsonl_output import JsonlOutput
from aistats_engine.outputs.summary import SummaryLine
from aistats_engine.record.record import Record
from fixtures import OPENAI_CHAT
from flowkit import make_flow, new_addon, run_live


def _record(**kw) -> Record:
    base = dict(id=7, flow_id="f1", start_time="2026-01-01T00:00:00.000Z",
                end_time="2026-01-01T00:00:01.000Z", method="POST", scheme="http",
                host="127.0.0.1", port=8000, path="/v1/chat/completions", status=200,
                provider="openai", api="chat_completions", operation="chat", model="m",
                input_tokens=3, output_tokens=2, total_tokens=5, duration_ms=1000.0)
    base.update(kw)
    return Record(**base)


def _finished(**kw) -> Finished:
    return Finished(_record(**kw), 1.0, 2.0,
                    ((b"Authorization", b"Bearer sk-secret-abcdefghijklmnop"), (b"Accept", b"*/*"),
                     (b"accept", b"second")), ((b"Content-Type", b"text/event-stream"),))


class _Recorder:
    def __init__(self, log: list, name: str, fail: bool = False) -> None:
        self.log, self.name, self.fail = log, name, fail

    def started(self, event: Started) -> None:
        self.log.append((self.name, "started"))

    def finished(self, event: Finished) -> None:
        if self.fail:
            raise RuntimeError("boom")
        self.log.append((self.name, "finished", event.record.id))

    def close(self, wait: bool = False) -> None:
        self.log.append((self.name, "close", wait))


def test_bus_isolates_a_failing_output_and_replaces_new_before_old():
    seen: list = []
    reports: list = []
    bus = Bus(lambda out, where, exc: reports.append((out, where, type(exc).__name__)))
    bus.replace("a", _Recorder(seen, "a", fail=True))
    bus.replace("b", _Recorder(seen, "b"))
    bus.finished(_finished())
    assert seen == [("b", "finished", 7)] and reports == [("a", "f1", "RuntimeError")]
    new = _Recorder(seen, "b2")
    bus.replace("b", new)
    assert bus.get("b") is new and seen[-1] == ("b", "close", False)
    bus.replace("b", None)
    assert "b" not in bus and seen[-1] == ("b2", "close", False)
    counted: list = []
    bus.on_dropped(lambda out, n: counted.append((out, n)))
    bus.dropped("log", 3)
    assert counted == [("log", 3)]


def test_finished_event_headers_are_redacted_first_values():
    ev = _finished()
    assert ev.request_headers() == [("authorization", "[REDACTED]"), ("accept", "*/*")]
    assert ev.response_headers() == [("content-type", "text/event-stream")]


def test_record_log_output_alone(tmp_path):
    out = JsonlOutput(str(tmp_path / "r.jsonl"), 0, 0)
    out.finished(_finished())
    out.close(wait=True)
    line = json.loads((tmp_path / "r.jsonl").read_text())
    assert (line["schema"], line["id"], line["input_tokens"]) == ("aistats.record/1", 7, 3)
    assert "parse_error_kinds" not in line and "content_offsets_ms" not in line


def test_summary_line_output_alone(caplog):
    with caplog.at_level(logging.INFO, logger="aistats"):
        SummaryLine().finished(_finished(error="bad", error_type="401", status=401))
    assert caplog.messages == ["aistats: #7 openai chat m 401 in=3 out=2 1000ms error=401: bad"]


def test_metrics_output_alone():
    inflight = [2]
    a = MetricsOutput(MetricsConfig(), inflight=lambda: inflight[0], overhead=lambda: 0.5)
    a.finished(_finished())
    a.dropped("log", 4)
    text = _collect(a.metrics)
    assert 'aistats_requests_total{model="m",provider="openai",status_class="2xx"} 1.0' in text
    assert "aistats_requests_in_flight 2.0" in text
    assert 'aistats_output_dropped_records_total{output="log"} 4.0' in text


def test_refused_log_path_change_keeps_the_old_log_working(tmp_path):
    log1 = tmp_path / "one.jsonl"
    addon, ctx, _ = new_addon(aistats_log=str(log1), aistats_metrics="false")
    addon._running = True  # a change at run time
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(exceptions.OptionsError, match="aistats_log"):
        ctx.configure(addon, aistats_log=str(blocked / "sub" / "x.jsonl"))
    f = make_flow("POST", "/v1/chat/completions", {"content-type": "application/json"},
                  b'{"model":"m","stream":true}')
    run_live(addon, f, 200, {"content-type": "text/event-stream"}, [OPENAI_CHAT], OPENAI_CHAT)
    addon.done()
    assert [json.loads(x)["model"] for x in log1.read_text().splitlines()] == ["m"]


def test_metrics_change_with_a_request_in_flight_keeps_the_gauge_right():
    addon, ctx, _ = new_addon()
    f = make_flow("POST", "/v1/chat/completions", {}, b'{"model":"m"}')
    f.live = True
    addon.requestheaders(f)
    ctx.configure(addon, aistats_metrics_label_limit="50")  # rebuilds the metrics output
    metrics = addon.bus.get("metrics").metrics
    text = _collect(metrics)
    assert "aistats_requests_in_flight 1.0" in text
    addon.error(_with_error(f))
    assert "aistats_requests_in_flight 0.0" in _collect(metrics)


def test_closing_a_slow_log_never_blocks_reconfiguration(tmp_path, monkeypatch):
    addon, ctx, _ = new_addon(aistats_log=str(tmp_path / "a.jsonl"), aistats_metrics="false")
    sink = addon.bus.get("log").sink
    monkeypatch.setattr(sink, "_flush", lambda *a, **k: time.sleep(2))
    t0 = time.perf_counter()
    ctx.configure(addon, aistats_log=str(tmp_path / "b.jsonl"))
    assert time.perf_counter() - t0 < 0.5
    assert addon.bus.get("log").sink.path.name == "b.jsonl"
    addon.done()


def _with_error(f):
    from mitmproxy.flow import Error
    f.error = Error("Client disconnected.")
    f.error.timestamp = f.request.timestamp_start + 1
    return f


def _collect(metrics) -> str:
    from prometheus_client import generate_latest
    return generate_latest(metrics.registry).decode()
