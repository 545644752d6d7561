"""The addon's metrics endpoint end to end, scraped directly (no Prometheus): a real mitmdump with
the addon, a loopback upstream, httpx and the openai SDK as clients.

* a busy metrics port stops mitmdump at start with one line naming the problem;
* ``aistats_metrics=false`` serves nothing;
* ``mitmdump -nr`` of a ``-w`` file (kept serving) exposes the same gen_ai_* and Higress values as
  the live run did;
* OpenMetrics exemplars carry the ``record_id`` of a record in the JSONL log, with its value;
* the Higress acceptance cases' counter increases and labels;
* 500 random model names stay within the label limit, the rest counted as overflow.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import re
import socket
import subprocess
import time
import urllib.error
import uuid
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics

from scrapekit import OPENMETRICS_ACCEPT, WAIT_S, samples, scrape, total, wait_records
from mitm import stop_process, ADDON, Mitmdump, build_args, free_port, port_open, start_mitmdump_expect_failure
from upstream import (
    JSON_HEADERS, SSE_HEADERS, Reply, Upstream, anthropic_messages_stream, openai_chat_json,
    openai_chat_stream, openai_responses_stream, openai_usage)

def metrics_url_in(output: str) -> str | None:
    m = re.search(r"aistats: metrics on (http://\S+/metrics)", output)
    return m.group(1) if m else None


class KeepServingReplay:
    """``mitmdump -n -r FILE --set keepserving=true -s addon/aistats.py`` in the background (it
    does not exit by itself); stopped by PID: SIGTERM, then SIGKILL after 10 s."""

    def __init__(self, tmp_path: Path, flow_file: Path, options: dict[str, str] | None = None) -> None:
        self.tmp_path = tmp_path
        self.args = build_args(tmp_path, ADDON, dict(options or {}),
                               ["-n", "-r", str(flow_file), "--set", "keepserving=true"])
        self.out_path = tmp_path / "replay-keepserving.out"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> KeepServingReplay:
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.out_path, "wb") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, cwd=self.tmp_path,
                                         process_group=0)
        return self

    def __exit__(self, *exc: object) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process(proc)

    def output(self) -> str:
        return self.out_path.read_text(errors="replace") if self.out_path.exists() else ""

    def metrics_url(self) -> str:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            url = metrics_url_in(self.output())
            if url:
                return url
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"replay exited with {self.proc.returncode}\n{self.output()}")
            time.sleep(0.05)
        raise AssertionError(f"no metrics endpoint logged within {WAIT_S} s\n{self.output()}")


# -- (a), (b): start-up ---------------------------------------------------------------------------

def test_busy_metrics_port_fails_start_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        rc, out = start_mitmdump_expect_failure(tmp_path, options={"aistats_metrics_port": str(port)})
    assert rc != 0, out
    assert "Traceback" not in out, out
    # mitmdump's own closing line ("Error logged during startup, exiting...") aside, one line
    # says what is wrong, where, and what to change.
    naming = [line for line in out.splitlines() if "in use" in line or "cannot" in line]
    assert len(naming) == 1, out
    assert f"127.0.0.1:{port}" in naming[0] and "metrics" in naming[0], naming[0]
    assert "aistats_metrics_port" in naming[0], naming[0]


def test_metrics_off_serves_nothing(tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "llm.jsonl"
    opts = {"aistats_metrics": "false", "aistats_ui": "false", "aistats_metrics_port": str(port),
            "aistats_log": str(log_path)}
    with Upstream() as up, Mitmdump(tmp_path, options=opts) as m:
        up.add("/v1/chat/completions", Reply(headers=JSON_HEADERS, chunks=[openai_chat_json("hi")]))
        r = httpx.post(up.url + "/v1/chat/completions", proxy=m.proxy_url, timeout=30,
                       json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200
        deadline = time.monotonic() + WAIT_S
        while not (log_path.exists() and log_path.read_text().strip()):
            assert time.monotonic() < deadline, "no record written"
            time.sleep(0.05)
        assert not port_open(port)
        out = m.output()
    assert "metrics on" not in out and metrics_url_in(out) is None, out


def test_metrics_off_with_the_ui_on_serves_no_metrics(tmp_path: Path) -> None:
    port = free_port()
    with Mitmdump(tmp_path, options={"aistats_metrics": "false",
                                     "aistats_metrics_port": str(port)}) as m:
        deadline = time.monotonic() + WAIT_S
        while "activity UI on" not in m.output():
            assert time.monotonic() < deadline, m.output()
            time.sleep(0.05)
        with pytest.raises(urllib.error.HTTPError) as e:
            scrape(f"http://127.0.0.1:{port}/metrics")
        assert e.value.code == 404
        assert "metrics on" not in m.output()


# -- (c), (d): a live run, its replay, exemplars ----------------------------------------------------

def _slow_stream() -> list[bytes]:
    """Role-only delta first, then three content events 60 ms apart, then finish + usage."""
    ev = openai_chat_stream(["", "Hel", "lo", " world"], usage=openai_usage(12, 40))
    return [ev[0], ev[1], ev[2], ev[3], b"".join(ev[4:])]


@pytest.fixture(scope="module")
def live_run(tmp_path_factory):
    """Five requests through a live mitmdump (-w); the endpoint's text and OpenMetrics scrapes."""
    tmp = tmp_path_factory.mktemp("metrics_live")
    log_path, flows = tmp / "llm.jsonl", tmp / "live.flow"
    with Upstream() as up, Mitmdump(tmp, options={"aistats_log": str(log_path)}, write_flows=flows) as m:
        up.add("chat-stream", Reply(headers=SSE_HEADERS, chunks=_slow_stream(), chunk_delay_s=0.06,
                                    first_delay_s=0.02))
        up.add("chat-json", Reply(headers=JSON_HEADERS, header_delay_s=0.03,
                                  chunks=[openai_chat_json("hello", usage=openai_usage(20, 9))]))
        up.add("messages", Reply(headers=SSE_HEADERS, chunk_delay_s=0.01,
                                 chunks=anthropic_messages_stream(["Hi", " there"], input_tokens=30,
                                                                  output_tokens=4)))
        up.add("responses", Reply(headers=SSE_HEADERS, chunk_delay_s=0.005,
                                  chunks=openai_responses_stream(["a", "b", "c"])))
        up.add("rate-limited", Reply(status=429, headers=JSON_HEADERS, chunks=[
            b'{"error": {"message": "Rate limit reached", "type": "rate_limit_error"}}']))
        chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        with httpx.Client(proxy=m.proxy_url, timeout=30) as client:
            def post(path: str, case: str, body: dict) -> httpx.Response:
                return client.post(up.url + path, json=body, headers={"x-aistats-case": case})

            assert post("/v1/chat/completions", "chat-stream",
                        {**chat, "stream": True, "stream_options": {"include_usage": True}}).status_code == 200
            assert post("/v1/messages", "messages",
                        {"model": "claude-sonnet-4-5", "max_tokens": 10, "stream": True,
                         "messages": [{"role": "user", "content": "hi"}]}).status_code == 200
            assert post("/v1/responses", "responses",
                        {"model": "gpt-4o-mini", "input": "hi", "stream": True}).status_code == 200
            assert post("/v1/chat/completions", "rate-limited", chat).status_code == 429
        sdk = openai.OpenAI(base_url=up.url + "/v1", api_key="k", max_retries=0,
                            http_client=openai.DefaultHttpx2Client(proxy=m.proxy_url))
        with sdk:
            done = sdk.chat.completions.create(model="gpt-4o-mini", messages=chat["messages"],
                                               extra_headers={"x-aistats-case": "chat-json"})
        assert done.choices[0].message.content == "hello"
        url = m.metrics_url()
        wait_records(url, 5)
        text = scrape(url)
        om = scrape(url, OPENMETRICS_ACCEPT)
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert len(records) == 5
    return {"tmp": tmp, "flows": flows, "text": text, "openmetrics": om, "records": records}


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def test_replay_serves_the_live_values(live_run) -> None:
    prefixes = ("gen_ai_", "route_upstream_")
    live = samples(live_run["text"], prefixes)
    assert total(live, "gen_ai_client_operation_time_per_output_chunk_seconds_count") > 0
    assert total(live, "route_upstream_model_consumer_metric_llm_failure_count") == 1
    assert total(live, "gen_ai_client_token_usage_sum", gen_ai_token_type="output") == 40 + 4 + 3 + 9
    assert total(live, "gen_ai_client_operation_time_to_first_chunk_seconds_count") == 3
    tmp = live_run["tmp"] / "replay"
    tmp.mkdir()
    with KeepServingReplay(tmp, live_run["flows"]) as rp:
        url = rp.metrics_url()
        wait_records(url, 5)
        replayed = samples(scrape(url), prefixes)
        assert rp.proc is not None and rp.proc.poll() is None, "keepserving: still running"
    assert sorted(replayed) == sorted(live)
    differ = {k: (live[k], replayed[k]) for k in live if not _close(live[k], replayed[k])}
    assert not differ, differ


def test_exemplars_link_latency_to_the_record(live_run) -> None:
    by_id = {str(rec["id"]): rec for rec in live_run["records"]}
    families = {f.name: f for f in parse_openmetrics(live_run["openmetrics"])}
    checked = 0
    for family, field in (("gen_ai_client_operation_duration_seconds", "duration_ms"),
                          ("gen_ai_client_operation_time_to_first_chunk_seconds", "ttft_ms")):
        for s in families[family].samples:
            if not s.name.endswith("_bucket"):
                continue
            le = float(s.labels["le"])
            if s.exemplar is not None:
                rec = by_id[s.exemplar.labels["record_id"]]  # a record of the JSONL log
                assert s.exemplar.value == pytest.approx(rec[field] / 1000), (s, rec)
                assert s.exemplar.value <= le
                assert s.labels["gen_ai_request_model"] == (rec["model"] or "")
                checked += 1
    assert checked >= 2  # every duration observation left one; the TTFT ones too
    ttft_ids = {s.exemplar.labels["record_id"]
                for s in families["gen_ai_client_operation_time_to_first_chunk_seconds"].samples
                if s.exemplar is not None}
    stream = next(rec for rec in live_run["records"] if rec["path"] == "/v1/chat/completions"
                  and rec["stream"])
    assert str(stream["id"]) in ttft_ids
    # the token histogram too: the stream's output-token observation (alone in its bucket,
    # 16 < 40 <= 64, so no later record overwrote the bucket's exemplar) is its count
    for s in families["gen_ai_client_token_usage"].samples:
        if s.exemplar is not None and s.exemplar.labels["record_id"] == str(stream["id"]) \
                and s.labels["gen_ai_token_type"] == "output":
            assert s.exemplar.value == stream["output_tokens"] == 40
            break
    else:
        raise AssertionError("no output-token exemplar for the stream's record")


# -- (f): label flood ------------------------------------------------------------------------------

HIGRESS_PREFIX = "route_upstream_model_consumer_metric_"
FLOOD = 500
LIMIT = 20
MODEL_LABELS = ("gen_ai_request_model", "gen_ai_response_model", "ai_model", "model")


def test_label_flood_is_bounded(tmp_path: Path) -> None:
    opts = {"aistats_metrics_label_limit": str(LIMIT), "aistats_print": "false"}
    reply = openai_chat_json("ok", model="gpt-4o-mini")  # one response model for every request
    models = [f"flood-{uuid.uuid4().hex[:12]}" for _ in range(FLOOD)]
    with Upstream() as up, Mitmdump(tmp_path, options=opts) as m, \
            httpx.Client(proxy=m.proxy_url, timeout=30,
                         limits=httpx.Limits(max_connections=8)) as client:
        up.add("/v1/chat/completions", Reply(headers=JSON_HEADERS, chunks=[reply]))

        def one(model: str) -> int:
            return client.post(up.url + "/v1/chat/completions",
                               json={"model": model, "messages": [{"role": "user", "content": "x"}]}).status_code

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(one, models, timeout=60))
        assert statuses == [200] * FLOOD
        url = m.metrics_url()
        smp = wait_records(url, FLOOD)

    assert total(smp, "aistats_requests_total") == FLOOD  # nothing lost, only relabelled
    values: dict[str, set[str]] = {}
    for (_, labels), _v in smp.items():
        for k, v in labels:
            if k in MODEL_LABELS:
                values.setdefault(k, set()).add(v)
    for label, seen in values.items():
        assert len(seen - {"", "other"}) <= LIMIT, (label, len(seen))
    assert "other" in values["gen_ai_request_model"] and "other" in values["model"]
    assert "gpt-4o-mini" in values["gen_ai_response_model"]
    # "model" admits LIMIT values: gpt-4o-mini (the response model) and the first LIMIT - 1
    # requested names; every later request's model is replaced once.
    assert total(smp, "aistats_label_overflow_total", label="model") == FLOOD - (LIMIT - 1)
    # Series stay bounded: at most LIMIT + 1 model values' worth, not FLOOD's.
    admitted = next(iter(values["gen_ai_request_model"] - {"", "other"}))
    per_model = sum(1 for (_, labels) in smp if (("gen_ai_request_model", admitted) in labels
                                                 or ("model", admitted) in labels))
    no_model = sum(1 for (_, labels) in smp if not any(k in MODEL_LABELS for k, _ in labels))
    higress = sum(1 for (name, _) in smp if name.startswith(HIGRESS_PREFIX))
    assert len(smp) <= (LIMIT + 1) * per_model + no_model + higress, len(smp)
    assert len(smp) < FLOOD * per_model / 10
