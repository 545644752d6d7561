"""Record → metric observations, the label guard and the metrics HTTP endpoint."""

from __future__ import annotations

import json
import random
import re
import string
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_prometheus

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "addon"))

from aistats_engine.outputs.cardinality import OTHER, LabelGuard  # noqa: E402
from aistats_engine.outputs.metrics import (  # noqa: E402
    DURATION_BUCKETS,
    HIGRESS_PREFIX,
    SERVER_TTFT_BUCKETS,
    TOKEN_BUCKETS,
    Metrics,
    MetricsConfig,
)
from aistats_engine.outputs.exposition import render, wants_openmetrics  # noqa: E402
from aistats_engine.record.record import Record  # noqa: E402

ACCEPTANCE = Path(__file__).resolve().parents[2] / "shared" / "acceptance" / "higress_cases.json"
OM_ACCEPT = "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.2"

HOST = "api.example-llm.com"
BASE = {
    "gen_ai_operation_name": "chat",
    "gen_ai_provider_name": "openai",
    "gen_ai_request_model": "qwen-turbo",
    "gen_ai_response_model": "qwen-turbo",
    "server_address": HOST,
    "server_port": "443",
}
OK = {**BASE, "error_type": ""}


def rec(**kw: Any) -> Record:
    fields: dict[str, Any] = {
        "id": 42,
        "flow_id": "flow-1",
        "start_time": "2026-11-24T00:00:00.000Z",
        "end_time": "2026-11-24T00:00:01.000Z",
        "method": "POST",
        "scheme": "https",
        "host": HOST,
        "port": 443,
        "path": "/v1/chat/completions",
        "status": 200,
        "provider": "openai",
        "api": "chat_completions",
        "operation": "chat",
        "model": "qwen-turbo",
        "response_model": "qwen-turbo",
        "usage_source": "reported",
    }
    fields.update(kw)
    return Record(**fields)


def value(m: Metrics, name: str, labels: dict[str, str] | None = None) -> float | None:
    return m.registry.get_sample_value(name, labels or {})


def total(m: Metrics, name: str) -> float:
    """Sum of one sample name over all label sets."""
    return sum(s.value for f in m.registry.collect() for s in f.samples if s.name == name)


def series(m: Metrics, name: str) -> list[dict[str, str]]:
    return [s.labels for f in m.registry.collect() for s in f.samples if s.name == name]


def text(m: Metrics, accept: str | None = None) -> str:
    return render(m.registry, accept)[0].decode()


# -- OTel GenAI client metrics ------------------------------------------------------------------


def test_token_usage_observes_known_types_with_spec_buckets() -> None:
    m = Metrics()
    m.observe(rec(input_tokens=10, output_tokens=69))
    inp = {**BASE, "gen_ai_token_type": "input"}
    assert value(m, "gen_ai_client_token_usage_count", inp) == 1
    assert value(m, "gen_ai_client_token_usage_sum", inp) == 10
    assert value(m, "gen_ai_client_token_usage_bucket", {**inp, "le": "4.0"}) == 0
    assert value(m, "gen_ai_client_token_usage_bucket", {**inp, "le": "16.0"}) == 1
    out = {**BASE, "gen_ai_token_type": "output"}
    assert value(m, "gen_ai_client_token_usage_bucket", {**out, "le": "64.0"}) == 0
    assert value(m, "gen_ai_client_token_usage_bucket", {**out, "le": "256.0"}) == 1
    les = [s["le"] for s in series(m, "gen_ai_client_token_usage_bucket") if s["gen_ai_token_type"] == "input"]
    assert [float(x) for x in les[:-1]] == list(TOKEN_BUCKETS) and les[-1] == "+Inf"


def test_token_usage_never_invents_a_count() -> None:
    m = Metrics()
    m.observe(rec(input_tokens=None, output_tokens=0))
    types = {s["gen_ai_token_type"] for s in series(m, "gen_ai_client_token_usage_count")}
    assert types == {"output"}  # the parsed zero is known; the missing input is not observed
    assert value(m, "gen_ai_client_token_usage_bucket", {**BASE, "gen_ai_token_type": "output", "le": "1.0"}) == 1


def test_duration_bucket_placement_and_labels() -> None:
    m = Metrics()
    m.observe(rec(duration_ms=1234.0))
    assert value(m, "gen_ai_client_operation_duration_seconds_sum", OK) == pytest.approx(1.234)
    assert value(m, "gen_ai_client_operation_duration_seconds_bucket", {**OK, "le": "0.64"}) == 0
    assert value(m, "gen_ai_client_operation_duration_seconds_bucket", {**OK, "le": "1.28"}) == 1
    les = [s["le"] for s in series(m, "gen_ai_client_operation_duration_seconds_bucket")]
    assert [float(x) for x in les[:-1]] == list(DURATION_BUCKETS) and les[-1] == "+Inf"


def test_error_type_label() -> None:
    m = Metrics()
    m.observe(rec(status=429, error="Rate limit reached", error_type="429", response_model=None, duration_ms=10.0))
    m.observe(rec(status=None, error="boom", error_type=None, response_model=None, duration_ms=10.0))
    got = {s["error_type"] for s in series(m, "gen_ai_client_operation_duration_seconds_count")}
    assert got == {"429", "_OTHER"}
    labels = series(m, "gen_ai_client_operation_duration_seconds_count")[0]
    assert labels["gen_ai_response_model"] == ""  # unknown is the empty string


def test_time_to_first_chunk_only_for_streams_with_ttft() -> None:
    m = Metrics()
    m.observe(rec(stream=False, ttft_ms=100.0, duration_ms=200.0))
    m.observe(rec(stream=True, ttft_ms=None, duration_ms=200.0))
    assert total(m, "gen_ai_client_operation_time_to_first_chunk_seconds_count") == 0
    m.observe(rec(stream=True, ttft_ms=300.0, duration_ms=900.0))
    assert value(m, "gen_ai_client_operation_time_to_first_chunk_seconds_count", OK) == 1
    assert value(m, "gen_ai_client_operation_time_to_first_chunk_seconds_bucket", {**OK, "le": "0.16"}) == 0
    assert value(m, "gen_ai_client_operation_time_to_first_chunk_seconds_bucket", {**OK, "le": "0.32"}) == 1


def test_time_per_output_chunk_one_observation_per_gap() -> None:
    m = Metrics()
    m.observe(rec(stream=True, ttft_ms=100.0, duration_ms=1400.0, content_offsets_ms=[100.0, 105.0, 130.0, 1300.0]))
    name = "gen_ai_client_operation_time_per_output_chunk_seconds"
    assert value(m, f"{name}_count", OK) == 3
    assert value(m, f"{name}_sum", OK) == pytest.approx(0.005 + 0.025 + 1.17)
    cumulative = {le: value(m, f"{name}_bucket", {**OK, "le": le}) for le in ("0.01", "0.02", "0.04", "0.64", "1.28")}
    assert cumulative == {"0.01": 1, "0.02": 1, "0.04": 2, "0.64": 2, "1.28": 3}
    # The exemplar marks the largest gap's bucket.
    om = text(m, OM_ACCEPT)
    assert re.search(rf'{name}_bucket{{[^}}]*le="1.28"[^}}]*}} 3.0 # {{record_id="42"}} 1.17', om)
    assert not re.search(rf'{name}_bucket{{[^}}]*le="0.01"[^}}]*}} 1.0 #', om)


def test_time_per_output_chunk_needs_two_chunks_of_a_stream() -> None:
    m = Metrics()
    m.observe(rec(stream=True, ttft_ms=100.0, content_offsets_ms=[100.0]))
    m.observe(rec(stream=False, content_offsets_ms=[100.0, 200.0]))
    assert total(m, "gen_ai_client_operation_time_per_output_chunk_seconds_count") == 0


def test_server_trio_off_by_default() -> None:
    m = Metrics()
    m.observe(rec(stream=True, ttft_ms=500.0, duration_ms=2000.0, output_tokens=4))
    assert "gen_ai_server_" not in text(m)


def test_server_trio_when_enabled() -> None:
    m = Metrics(MetricsConfig(server_metrics=True))
    m.observe(rec(stream=True, ttft_ms=500.0, duration_ms=2000.0, output_tokens=4))
    assert value(m, "gen_ai_server_request_duration_seconds_sum", OK) == pytest.approx(2.0)
    assert value(m, "gen_ai_server_time_to_first_token_seconds_sum", OK) == pytest.approx(0.5)
    assert value(m, "gen_ai_server_time_per_output_token_seconds_sum", OK) == pytest.approx(0.5)  # 1.5 s / 3
    ttft_les = [s["le"] for s in series(m, "gen_ai_server_time_to_first_token_seconds_bucket")]
    assert [float(x) for x in ttft_les[:-1]] == list(SERVER_TTFT_BUCKETS)
    assert {"15.0", "20.0", "30.0", "45.0", "60.0"} <= set(ttft_les)


def test_server_trio_skips_tpot_for_one_token_and_failures() -> None:
    m = Metrics(MetricsConfig(server_metrics=True))
    m.observe(rec(stream=True, ttft_ms=500.0, duration_ms=2000.0, output_tokens=1))
    assert total(m, "gen_ai_server_time_per_output_token_seconds_count") == 0
    assert total(m, "gen_ai_server_time_to_first_token_seconds_count") == 1
    m.observe(rec(stream=True, ttft_ms=500.0, duration_ms=900.0, output_tokens=9,
                  error="aborted", error_type="upstream_aborted"))
    assert total(m, "gen_ai_server_time_to_first_token_seconds_count") == 1  # successful responses only
    assert value(m, "gen_ai_server_request_duration_seconds_count", {**BASE, "error_type": "upstream_aborted"}) == 1


def test_consumer_label_is_opt_in() -> None:
    plain = Metrics()
    plain.observe(rec(consumer="alice", duration_ms=5.0))
    assert all("consumer" not in s for s in series(plain, "gen_ai_client_operation_duration_seconds_count"))
    m = Metrics(MetricsConfig(consumer_label=True))
    m.observe(rec(consumer="alice", duration_ms=5.0, input_tokens=1))
    assert value(m, "gen_ai_client_operation_duration_seconds_count", {**OK, "consumer": "alice"}) == 1
    assert value(m, "aistats_requests_total",
                 {"provider": "openai", "model": "qwen-turbo", "consumer": "alice", "status_class": "2xx"}) == 1


def test_config_rejects_unsorted_buckets() -> None:
    with pytest.raises(ValueError, match="duration_buckets"):
        MetricsConfig(duration_buckets=[1.0, 0.5])
    with pytest.raises(ValueError, match="token_buckets"):
        MetricsConfig(token_buckets=[])
    cfg = MetricsConfig(duration_buckets=[0.1, 1, 10])
    assert cfg.duration_buckets == (0.1, 1.0, 10.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", ["duration_buckets", "server_tpot_buckets", "time_per_output_chunk_buckets"])
def test_config_rejects_non_finite_buckets(name: str, bad: float) -> None:
    with pytest.raises(ValueError, match=f"{name} must contain finite numbers"):
        MetricsConfig(**{name: [0.1, bad, 10.0]})
    with pytest.raises(ValueError, match=name):
        MetricsConfig(**{name: [0.1, 1.0, bad]})


def test_config_rejects_bad_max_series() -> None:
    with pytest.raises(ValueError, match="max_series"):
        MetricsConfig(max_series=0)


# -- Higress-compatible counters ------------------------------------------------------------------

# Records as the addon would build them for the acceptance cases whose metric expectations do not
# depend on plugin configuration (their config is empty, or only sets log attributes / the
# x-mse-consumer header). A new case with metric expectations must be added here.
HIGRESS_CASE_RECORDS: dict[str, dict[str, Any]] = {
    "empty_config_openai_nonstream": dict(
        stream=False, input_tokens=10, output_tokens=69, total_tokens=79, duration_ms=52.0,
        ttfb_ms=50.0, chat_id="chatcmpl-9", chat_round=1,
    ),
    "fixed_value_and_request_header": dict(
        stream=False, input_tokens=10, output_tokens=69, total_tokens=79, duration_ms=52.0,
        consumer="alice", attributes={"env": "prod", "consumer": "alice"},
    ),
    "streaming_append_answer": dict(
        stream=True, input_tokens=5, output_tokens=3, total_tokens=8, duration_ms=40.0, ttft_ms=12.0,
        content_offsets_ms=[12.0, 15.0, 18.0], attributes={"answer": "Hello world"},
    ),
    "failure_counted_with_request_model": dict(
        status=429, model="qwen-max", response_model=None, error="Rate limit reached", error_type="429",
        input_tokens=None, duration_ms=8.0, usage_source="missing",
    ),
}


def _metric_cases() -> list[dict[str, Any]]:
    cases = json.loads(ACCEPTANCE.read_text())
    return [c for c in cases if "higress_counters" in c["expect"] or "higress_labels" in c["expect"]]


@pytest.mark.parametrize("case", _metric_cases(), ids=lambda c: c["name"])
def test_higress_acceptance_case(case: dict[str, Any]) -> None:
    assert case["name"] in HIGRESS_CASE_RECORDS, "build the record for this new case by hand"
    record = rec(**HIGRESS_CASE_RECORDS[case["name"]])
    for key, want in case["expect"].get("record", {}).items():
        got = getattr(record, key)
        if key == "attributes":
            assert {k: got.get(k) for k in want} == want
        else:
            assert got == want, key  # the hand-built record agrees with the case
    m = Metrics()
    m.observe(record)
    for name, want in case["expect"].get("higress_counters", {}).items():
        assert total(m, HIGRESS_PREFIX + name) == want, name
    for f in m.registry.collect():
        if f.name.startswith(HIGRESS_PREFIX):
            for s in f.samples:
                assert s.labels.items() >= case["expect"].get("higress_labels", {}).items()
                assert s.labels["ai_route"] == HOST and s.labels["ai_cluster"] == f"{HOST}:443"


def test_higress_names_have_no_total_suffix_and_are_counters_in_0_0_4() -> None:
    m = Metrics()
    m.observe(rec(input_tokens=1, output_tokens=1, total_tokens=2, duration_ms=1.0))
    prom, om = text(m), text(m, OM_ACCEPT)
    assert not re.search(rf"{HIGRESS_PREFIX}\w+_total", prom + om)
    readme = ["input_token", "output_token", "llm_service_duration", "llm_duration_count",
              "llm_first_token_duration", "llm_stream_duration_count"]
    for name in readme + ["total_token", "llm_failure_count"]:
        assert f"# TYPE {HIGRESS_PREFIX}{name} counter\n" in prom
        assert f"# TYPE {HIGRESS_PREFIX}{name} unknown\n" in om  # OpenMetrics counters need _total
        assert re.search(rf'^{HIGRESS_PREFIX}{name}{{ai_cluster="[^"]+",ai_consumer="none",ai_model="qwen-turbo",'
                         rf'ai_route="{HOST}"}} ', prom, re.MULTILINE)


def test_higress_durations_are_summed_milliseconds() -> None:
    m = Metrics()
    m.observe(rec(duration_ms=1000.4))
    m.observe(rec(duration_ms=2000.6, stream=True, ttft_ms=300.2, content_offsets_ms=[300.2]))
    assert total(m, HIGRESS_PREFIX + "llm_service_duration") == 3001
    assert total(m, HIGRESS_PREFIX + "llm_duration_count") == 2
    assert total(m, HIGRESS_PREFIX + "llm_first_token_duration") == 300
    assert total(m, HIGRESS_PREFIX + "llm_stream_duration_count") == 1


def test_higress_stream_count_needs_a_first_token() -> None:
    m = Metrics()
    m.observe(rec(stream=True, ttft_ms=None, duration_ms=100.0))
    assert total(m, HIGRESS_PREFIX + "llm_stream_duration_count") == 0
    assert total(m, HIGRESS_PREFIX + "llm_first_token_duration") == 0
    assert total(m, HIGRESS_PREFIX + "llm_duration_count") == 1


def test_higress_zero_or_unknown_tokens_are_not_added() -> None:
    m = Metrics()
    m.observe(rec(input_tokens=0, output_tokens=None, total_tokens=None, duration_ms=1.0))
    for name in ("input_token", "output_token", "total_token"):
        assert total(m, HIGRESS_PREFIX + name) == 0


def test_higress_failures_and_model_label() -> None:
    m = Metrics()
    # a failure without a response model is labelled with the requested model
    m.observe(rec(model="qwen-max", response_model=None, status=500, error="x", error_type="500"))
    # an aborted stream (no status class problem) is a failure too
    m.observe(rec(model="qwen-max", response_model=None, error="gone", error_type="client_disconnected"))
    # the response model wins when there is one (Higress: usage model, else request model)
    m.observe(rec(model="gpt-4o", response_model="gpt-4o-2024-08-06", input_tokens=3))
    m.observe(rec(model=None, response_model=None, duration_ms=1.0))
    fails = {s["ai_model"]: s for s in series(m, HIGRESS_PREFIX + "llm_failure_count")}
    assert value(m, HIGRESS_PREFIX + "llm_failure_count",
                 {"ai_route": HOST, "ai_cluster": f"{HOST}:443", "ai_model": "qwen-max", "ai_consumer": "none"}) == 2
    assert set(fails) == {"qwen-max", "gpt-4o-2024-08-06", "unknown"}
    assert value(m, HIGRESS_PREFIX + "input_token",
                 {"ai_route": HOST, "ai_cluster": f"{HOST}:443", "ai_model": "gpt-4o-2024-08-06",
                  "ai_consumer": "none"}) == 3


def test_higress_can_be_disabled() -> None:
    m = Metrics(MetricsConfig(higress_metrics=False))
    m.observe(rec(duration_ms=1.0))
    assert HIGRESS_PREFIX not in text(m)


# -- own counters -----------------------------------------------------------------------------------


def test_requests_by_status_class() -> None:
    m = Metrics()
    for status in (200, 201, 429, 503, None):
        m.observe(rec(status=status))
    got = {s["status_class"]: v for s, v in
           ((s.labels, s.value) for f in m.registry.collect() for s in f.samples if s.name == "aistats_requests_total")}
    assert got == {"2xx": 2, "4xx": 1, "5xx": 1, "none": 1}


def test_tokens_by_type_only_known() -> None:
    m = Metrics()
    m.observe(rec(input_tokens=112, output_tokens=40, cached_tokens=100, cache_creation_tokens=0, reasoning_tokens=None))
    got = {s["type"] for s in series(m, "aistats_tokens_total")}
    assert got == {"input", "output", "cached", "cache_creation"}
    assert value(m, "aistats_tokens_total", {"provider": "openai", "model": "qwen-turbo", "type": "cached"}) == 100
    assert "do not sum" in text(m)


def test_records_parse_errors_cost_in_flight_overhead() -> None:
    flights = [0]
    m = Metrics(inflight=lambda: flights[0])
    m.observe(rec(parse_error="response decompression failed: Error -3; invalid JSON",
                  parse_error_kinds=("decompression", "invalid_json"), cost_usd=0.25))
    m.observe(rec(parse_error="invalid JSON", parse_error_kinds=("invalid_json",), usage_source="missing",
                  cost_usd=None))
    m.parse_error("truncated")
    assert value(m, "aistats_records_total", {"usage_source": "reported"}) == 1
    assert value(m, "aistats_records_total", {"usage_source": "missing"}) == 1
    assert value(m, "aistats_parse_errors_total", {"kind": "decompression"}) == 1
    assert value(m, "aistats_parse_errors_total", {"kind": "invalid_json"}) == 2
    assert value(m, "aistats_parse_errors_total", {"kind": "truncated"}) == 1
    assert total(m, "aistats_cost_usd_total") == pytest.approx(0.25)
    assert value(m, "aistats_requests_in_flight") == 0
    flights[0] = 3  # read at scrape time, from whoever owns the count
    assert value(m, "aistats_requests_in_flight") == 3
    assert value(Metrics(), "aistats_requests_in_flight") == 0
    assert value(m, "aistats_overhead_seconds_total") == 0  # present before the first hook
    m.add_overhead(0.002)
    m.add_overhead(0.003)
    assert value(m, "aistats_overhead_seconds_total") == pytest.approx(0.005)


def test_parse_errors_come_from_the_kinds_once_per_kind() -> None:
    m = Metrics()
    m.observe(rec(parse_error="bad; bad again; cut", parse_error_kinds=("invalid_json", "invalid_json", "truncated")))
    m.observe(rec(parse_error="free text: not split any more"))  # no kinds: nothing to count
    got = {s["kind"]: v for s, v in ((s.labels, s.value) for f in m.registry.collect() for s in f.samples
                                       if s.name == "aistats_parse_errors_total")}
    assert got == {"invalid_json": 1, "truncated": 1}


def test_parse_error_kind_label_is_guarded() -> None:
    m = Metrics(MetricsConfig(label_limits={"parse_error_kind": 1}))
    m.observe(rec(parse_error="x", parse_error_kinds=("invalid_json", "truncated")))
    assert {s["kind"] for s in series(m, "aistats_parse_errors_total")} == {"invalid_json", OTHER}
    assert value(m, "aistats_label_overflow_total", {"label": "parse_error_kind"}) == 1


def test_output_dropped_counts_and_is_thread_safe() -> None:
    m = Metrics()
    assert series(m, "aistats_output_dropped_records_total") == []  # declared, no series yet
    assert "# TYPE aistats_output_dropped_records_total counter" in text(m)
    m.output_dropped("log", 2)
    m.output_dropped("log", 0)  # nothing lost, nothing counted

    def drop() -> None:
        for _ in range(1_000):
            m.output_dropped("log", 1)
            m.output_dropped("otlp", 1)

    threads = [threading.Thread(target=drop) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(500):  # the event loop keeps observing meanwhile
        m.observe(rec(id=i, duration_ms=1.0))
    for t in threads:
        t.join()
    assert value(m, "aistats_output_dropped_records_total", {"output": "log"}) == 4_002
    assert value(m, "aistats_output_dropped_records_total", {"output": "otlp"}) == 4_000
    assert "Records an output could not keep" in text(m)


def test_custom_collector_has_no_created_samples() -> None:
    """Every series but the guard's overflow counter comes from the custom collector, which
    emits no _created samples (Prometheus does not need them)."""
    m = Metrics()
    m.observe(rec(duration_ms=10.0, input_tokens=1, stream=True, ttft_ms=1.0, content_offsets_ms=[1.0, 2.0]))
    m.guard("model", "x")
    om = text(m, OM_ACCEPT)
    assert "# TYPE gen_ai_client_operation_duration_seconds histogram" in om
    created = [line for line in om.splitlines() if "_created" in line]
    assert created == [] or all(line.startswith(("aistats_label_overflow", "# ")) for line in created)


# -- cardinality guard ---------------------------------------------------------------------------------


def test_guard_caps_and_counts_overflow() -> None:
    reg = CollectorRegistry()
    g = LabelGuard({"model": 2}, registry=reg)
    assert [g("model", v) for v in ("a", "b", "a", "c", "d")] == ["a", "b", "a", OTHER, OTHER]
    assert g("model", None) == "" and g("model", "") == "" and g("model", OTHER) == OTHER
    assert g("server", "c") == "c"  # kinds are independent
    assert g.admitted("model") == 2
    assert reg.get_sample_value("aistats_label_overflow_total", {"label": "model"}) == 2
    assert len(g("other_kind", "x" * 1000)) == 128


def test_random_model_flood_is_bounded() -> None:
    rnd = random.Random(7)

    def flood(m: Metrics, n: int) -> None:
        for i in range(n):
            name = "".join(rnd.choices(string.ascii_lowercase, k=12))
            m.observe(rec(id=i, model=name, response_model=name + "-x", input_tokens=5, output_tokens=5,
                          total_tokens=10, duration_ms=100.0, stream=True, ttft_ms=10.0,
                          content_offsets_ms=[10.0, 20.0], consumer=name))

    def sample_count(m: Metrics) -> int:
        return sum(len(f.samples) for f in m.registry.collect())

    m = Metrics()
    flood(m, 1_000)
    after_1k = sample_count(m)
    flood(m, 9_000)
    assert sample_count(m) == after_1k  # no new series once every label is at its cap
    assert m.guard.admitted("model") == 100
    assert m.guard.admitted("consumer") == 100
    assert len(series(m, "gen_ai_client_operation_duration_seconds_count")) <= 101
    assert total(m, "aistats_label_overflow_total") > 9_900
    assert {s["gen_ai_request_model"] for s in series(m, "gen_ai_client_operation_duration_seconds_count")} >= {OTHER}


# -- exemplars and formats ---------------------------------------------------------------------------


def test_exemplars_only_in_openmetrics() -> None:
    m = Metrics()
    m.observe(rec(id=42, stream=True, duration_ms=500.0, ttft_ms=100.0, content_offsets_ms=[100.0, 150.0],
                  input_tokens=3, output_tokens=2, total_tokens=5))
    om = text(m, OM_ACCEPT)
    prom = text(m)
    assert re.search(r'gen_ai_client_operation_duration_seconds_bucket\{[^}]*le="0.64"[^}]*\} 1.0 '
                     r'# \{record_id="42"\} 0.5', om)
    assert 'record_id="42"' in om.split("gen_ai_client_operation_time_to_first_chunk_seconds_bucket", 1)[1]
    assert "record_id" not in prom
    assert om.endswith("# EOF\n")
    # both outputs parse
    assert {f.name for f in parse_openmetrics(om)} >= {"gen_ai_client_operation_duration_seconds",
                                                       HIGRESS_PREFIX + "llm_duration_count"}
    assert {f.name for f in parse_prometheus(prom)} >= {"gen_ai_client_token_usage", HIGRESS_PREFIX + "input_token"}
    assert "_created" not in prom


def test_exemplars_can_be_disabled() -> None:
    m = Metrics(MetricsConfig(exemplars=False))
    m.observe(rec(duration_ms=500.0))
    assert "record_id" not in text(m, OM_ACCEPT)


def test_content_negotiation_rules() -> None:
    assert wants_openmetrics("application/openmetrics-text; version=1.0.0")
    assert wants_openmetrics(OM_ACCEPT)
    prometheus_default = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
                          "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
    assert wants_openmetrics(prometheus_default)
    assert not wants_openmetrics("application/openmetrics-text;q=0, text/plain")
    assert not wants_openmetrics("text/plain;version=0.0.4")
    assert not wants_openmetrics(None)


def test_observe_while_scraping_from_another_thread() -> None:
    m = Metrics()
    errors: list[BaseException] = []
    done = threading.Event()

    def scrape() -> None:
        try:
            while not done.is_set():
                list(parse_openmetrics(text(m, OM_ACCEPT)))
                text(m)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=scrape)
    t.start()
    try:
        for i in range(2_000):
            m.observe(rec(id=i, model=f"m{i % 150}", duration_ms=10.0, stream=True, ttft_ms=1.0,
                          content_offsets_ms=[1.0, 2.0, 3.0], input_tokens=1, output_tokens=1, total_tokens=2))
    finally:
        done.set()
        t.join()
    assert not errors
    assert total(m, "aistats_records_total") == 2_000
    assert total(m, HIGRESS_PREFIX + "llm_duration_count") == 2_000


# -- exposition (served by web/server.py) --------------------------------------------------------------


def test_exposition_formats() -> None:
    m = Metrics()
    m.observe(rec(duration_ms=250.0, input_tokens=1, output_tokens=2, total_tokens=3))
    body, ctype = render(m.registry, None)
    assert ctype.startswith("text/plain; version=0.0.4")
    text = body.decode()
    assert "gen_ai_client_operation_duration_seconds_bucket" in text and "record_id" not in text
    body, ctype = render(m.registry, OM_ACCEPT)
    assert ctype.startswith("application/openmetrics-text; version=1.0.0")
    assert 'record_id="42"' in body.decode() and body.decode().endswith("# EOF\n")


def _reference(values: list[float], buckets: tuple[float, ...]) -> dict[str, float]:
    """prometheus_client's own Histogram as the oracle for bucket placement."""
    from prometheus_client import Histogram

    reg = CollectorRegistry()
    h = Histogram("h", "", buckets=buckets, registry=reg)
    for v in values:
        h.observe(v)
    return {s.name[1:] + s.labels.get("le", ""): s.value for f in reg.collect() for s in f.samples
            if not s.name.endswith("_created")}  # "_bucket0.01", ..., "_count", "_sum"


def _ours(m: Metrics, name: str, labels: dict[str, str]) -> dict[str, float]:
    return {s.name[len(name) :] + s.labels.get("le", ""): s.value for f in m.registry.collect()
            for s in f.samples if f.name == name and s.labels.items() >= labels.items()}


def test_bulk_chunk_observation_matches_one_by_one() -> None:
    """Per-chunk gaps are bucketed in bulk; the histogram must equal one observe() per gap,
    boundary values included."""
    rng = random.Random(3)
    gaps_ms = [b * 1000 for b in DURATION_BUCKETS] + [rng.uniform(0, 200_000) for _ in range(500)] + [0.0]
    rng.shuffle(gaps_ms)
    offsets = [0.0]
    for g in gaps_ms:
        offsets.append(offsets[-1] + g)
    offsets.insert(100, offsets[99] - 5.0)  # a clock step back: a negative gap counts as 0
    m = Metrics()
    m.observe(rec(stream=True, ttft_ms=0.0, content_offsets_ms=offsets))
    name = "gen_ai_client_operation_time_per_output_chunk_seconds"
    got = _ours(m, name, OK)
    want = _reference([max(b - a, 0.0) / 1000.0 for a, b in zip(offsets, offsets[1:])], DURATION_BUCKETS)
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert abs(got[k] - v) < 1e-6 * max(1.0, abs(v)), k
    # exactly one exemplar, on the largest gap's bucket
    om = text(m, OM_ACCEPT)
    assert len(re.findall(rf"^{name}_bucket.* # ", om, re.MULTILINE)) == 1
    largest = max(b - a for a, b in zip(offsets, offsets[1:])) / 1000.0
    assert re.search(rf'^{name}_bucket{{[^}}]*le="\+Inf"[^}}]*}} \S+ # {{record_id="42"}} {largest}', om, re.MULTILINE)


def test_single_observations_match_prometheus_client() -> None:
    """Bucket i counts values <= bound i, cumulative, with _count and _sum, as Histogram does."""
    rng = random.Random(5)
    values = list(DURATION_BUCKETS) + [rng.uniform(0, 100) for _ in range(300)] + [0.0, 1e9]
    m = Metrics(MetricsConfig(higress_metrics=False))
    for i, v in enumerate(values):
        m.observe(rec(id=i, duration_ms=v * 1000.0))
    got = _ours(m, "gen_ai_client_operation_duration_seconds", OK)
    want = _reference([v * 1000.0 / 1000.0 for v in values], DURATION_BUCKETS)
    assert len(got) == len(want) == len(DURATION_BUCKETS) + 3
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k] == pytest.approx(v), k


# -- series bound -------------------------------------------------------------------------------------


def test_series_bound_folds_new_label_tuples_into_other() -> None:
    cfg = MetricsConfig(max_series=3, label_limits={"model": 1000, "consumer": 1000})
    m = Metrics(cfg)
    for i in range(10):
        m.observe(rec(id=i, model=f"m{i}", response_model=f"m{i}", input_tokens=1, output_tokens=2,
                      total_tokens=3, duration_ms=100.0, consumer=f"c{i}"))
    duration = series(m, "gen_ai_client_operation_duration_seconds_count")
    assert len(duration) == 4  # three admitted, one folded
    folded = {k: OTHER for k in OK}
    assert value(m, "gen_ai_client_operation_duration_seconds_count", folded) == 7
    # fixed-vocabulary labels survive the fold: input and output tokens stay apart
    tokens = series(m, "gen_ai_client_token_usage_count")
    assert {(s["gen_ai_request_model"], s["gen_ai_token_type"]) for s in tokens} == {
        ("m0", "input"), ("m0", "output"), ("m1", "input"), (OTHER, "input"), (OTHER, "output")}
    assert value(m, "gen_ai_client_token_usage_sum",
                 {**{k: OTHER for k in BASE}, "gen_ai_token_type": "output"}) == 9 * 2  # m1..m9
    # Higress and own counters are bounded too
    higress = series(m, HIGRESS_PREFIX + "llm_duration_count")
    assert len(higress) == 4 and {"ai_route": OTHER, "ai_cluster": OTHER, "ai_model": OTHER,
                                  "ai_consumer": OTHER} in higress
    assert len(series(m, "aistats_cost_usd_total")) == 0
    assert {s["model"] for s in series(m, "aistats_requests_total")} == {"m0", "m1", "m2", OTHER}
    types = {s["type"] for s in series(m, "aistats_tokens_total") if s["model"] == OTHER}
    assert types == {"input", "output"}
    assert value(m, "aistats_label_overflow_total", {"label": "series"}) > 0
    assert value(m, "aistats_label_overflow_total", {"label": "model"}) is None  # the guard admitted all
    # admitted series keep counting under their own labels
    m.observe(rec(id=99, model="m0", response_model="m0", duration_ms=100.0, consumer="c0"))
    assert value(m, "gen_ai_client_operation_duration_seconds_count", {**OK, "gen_ai_request_model": "m0",
                                                                       "gen_ai_response_model": "m0"}) == 2


def test_series_bound_default_keeps_the_flood_test_numbers() -> None:
    assert MetricsConfig().max_series == 10_000


