"""A real Prometheus scrapes a real mitmdump + aistats while real clients stream through it.

Debian's ``prometheus`` binary (installed by ``scripts/setup-system.sh``, which
``scripts/setup.sh --test`` runs) is started on a free loopback port with a generated config:
scrape every second, one target = the addon's metrics endpoint on an ephemeral port, storage in
tmp_path. The official ``openai`` SDK and httpx stream chat completions from a loopback upstream
through mitmdump; then the test asks Prometheus' HTTP API (``/api/v1/query``, bounded polling)
and checks what a dashboard would show:

* ``sum(gen_ai_client_token_usage_sum{gen_ai_token_type="output"})`` = the output tokens the
  upstream reported;
* the time-to-first-chunk histogram puts streams whose first *content* event comes 0.5 s after a
  contentless first event (the role-only delta, sent at once) in the (0.32, 0.64] bucket, and a
  stream with immediate content below 0.32;
* Higress' README query for the average first-token latency returns the average of those streams'
  first-token times.

Skipped only when no ``prometheus`` binary is on PATH and none can be installed (not root, no
apt-get); under ``CI`` that is a failure instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import httpx
import openai
import pytest

from mitm import stop_process, REPO_ROOT, Mitmdump, free_port
from upstream import SSE_HEADERS, Reply, Upstream, openai_chat_stream, openai_usage

# Higress ai-statistics README (en), "Average latency of the first token in streaming requests",
# verbatim.
HIGRESS_AVG_FIRST_TOKEN = """irate(route_upstream_model_consumer_metric_llm_first_token_duration[2m])
/
irate(route_upstream_model_consumer_metric_llm_stream_duration_count[2m])"""

SLOW_S = 0.5  # the slow streams' gap between their first (contentless) event and the first content
WAIT_S = 20.0  # bound on every wait for Prometheus to see something
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # ignore *_proxy env vars


def _prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found:
        return found
    why = ""
    if os.geteuid() == 0 and shutil.which("apt-get"):
        try:
            done = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "setup-system.sh")],
                                  capture_output=True, text=True, timeout=600,
                                  stdin=subprocess.DEVNULL)
            why = f"scripts/setup-system.sh exited {done.returncode}: {done.stderr.strip()[-300:]}"
        except subprocess.TimeoutExpired:
            why = "scripts/setup-system.sh took over 600 s"
        found = shutil.which("prometheus")
        if found:
            return found
    else:
        why = "not root or no apt-get, so scripts/setup-system.sh cannot install it"
    reason = f"no prometheus binary on PATH and it is not installable here ({why})"
    if os.environ.get("CI"):
        pytest.fail(reason + "; CI must run this test (scripts/setup.sh --test installs it)")
    pytest.skip(reason)


class Prometheus:
    """A Prometheus server on 127.0.0.1:<free port> scraping ``target`` every second; stopped
    by PID (SIGTERM, then SIGKILL after 10 s)."""

    def __init__(self, binary: str, tmp_path: Path, target: str) -> None:
        self.dir = tmp_path / "prometheus"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = self.dir / "prometheus.yml"
        self.config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  scrape_timeout: 1s\n"
            "  evaluation_interval: 1s\n"
            "scrape_configs:\n"
            "  - job_name: aistats\n"
            "    metrics_path: /metrics\n"
            "    static_configs:\n"
            f"      - targets: ['{target}']\n"
        )
        self.log_path = self.dir / "prometheus.log"
        self.args = [
            binary, f"--config.file={self.config}", f"--storage.tsdb.path={self.dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn",
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Prometheus:
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.dir, env=env,
                                         process_group=0)
        deadline = time.monotonic() + WAIT_S
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {self.proc.returncode}\n{self.output()}")
            try:
                with _DIRECT.open(self.url + "/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"prometheus not ready after {WAIT_S} s\n{self.output()}")
            time.sleep(0.1)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process(proc)

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """``/api/v1/query``: the result list (vector or matrix)."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode(params)}"
        with _DIRECT.open(url, timeout=5) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def scalar(self, expr: str, at: float | None = None) -> float | None:
        """The value of a one-element instant vector, None when the vector is empty."""
        result = self.query(expr, at)
        if not result:
            return None
        assert len(result) == 1, result
        return float(result[0]["value"][1])

    def wait_for(self, expr: str, want: float) -> float:
        """Poll until ``expr`` evaluates to ``want`` (bounded: WAIT_S)."""
        deadline = time.monotonic() + WAIT_S
        got: float | None = None
        while time.monotonic() < deadline:
            got = self.scalar(expr)
            if got == want:
                return got
            time.sleep(0.2)
        raise AssertionError(f"{expr} = {got}, want {want} (after {WAIT_S} s)\n{self.output()[-2000:]}")


def _slow_stream(completion_tokens: int, prompt_tokens: int = 11) -> list[bytes]:
    """First chunk: the role-only delta (``content: ""``, no content); second chunk, SLOW_S later:
    all content events, the finish event, the usage event and ``[DONE]``."""
    events = openai_chat_stream(["", "Hello", " world"], usage=openai_usage(prompt_tokens, completion_tokens))
    assert b'"content":""' in events[0]
    return [events[0], b"".join(events[1:])]


# output tokens the upstream reports, per case
WARM_OUT, SDK_OUT, HTTPX_OUT = 2, 7, 13


def test_prometheus_scrapes_the_addon(tmp_path: Path) -> None:
    binary = _prometheus_binary()
    log_path = tmp_path / "llm.jsonl"
    with Upstream() as up, Mitmdump(tmp_path, options={"aistats_log": str(log_path)}) as m:
        up.add("warm", Reply(headers=SSE_HEADERS, stream=True,
                             chunks=[b"".join(openai_chat_stream(["Hi"], usage=openai_usage(3, WARM_OUT)))]))
        up.add("slow-sdk", Reply(headers=SSE_HEADERS, chunks=_slow_stream(SDK_OUT), chunk_delay_s=SLOW_S))
        up.add("slow-httpx", Reply(headers=SSE_HEADERS, chunks=_slow_stream(HTTPX_OUT), chunk_delay_s=SLOW_S))
        target = urllib.parse.urlsplit(m.metrics_url()).netloc
        with Prometheus(binary, tmp_path, target) as prom:
            prom.wait_for('up{job="aistats"}', 1)

            body = {"model": "gpt-4o-mini", "stream": True, "stream_options": {"include_usage": True},
                    "messages": [{"role": "user", "content": "hi"}]}
            with httpx.Client(proxy=m.proxy_url, timeout=30) as client:
                r = client.post(up.url + "/v1/chat/completions", json=body, headers={"x-aistats-case": "warm"})
                assert r.status_code == 200 and b"[DONE]" in r.content
                # The Higress series exists with one stream before the slow ones: irate needs a
                # sample before their increase.
                prom.wait_for("sum(route_upstream_model_consumer_metric_llm_stream_duration_count)", 1)

                sdk_texts: list[str] = []
                errors: list[BaseException] = []

                def sdk_stream() -> None:
                    try:
                        sdk = openai.OpenAI(base_url=up.url + "/v1", api_key="k", max_retries=0,
                                            http_client=openai.DefaultHttpx2Client(proxy=m.proxy_url))
                        with sdk:
                            stream = sdk.chat.completions.create(
                                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                stream=True, stream_options={"include_usage": True},
                                extra_headers={"x-aistats-case": "slow-sdk"})
                            sdk_texts.append("".join(c.choices[0].delta.content or ""
                                                     for c in stream if c.choices))
                    except BaseException as e:  # reported below, on the main thread
                        errors.append(e)

                threads = [threading.Thread(target=sdk_stream) for _ in range(2)]
                for t in threads:
                    t.start()
                r = client.post(up.url + "/v1/chat/completions", json=body,
                                headers={"x-aistats-case": "slow-httpx"})
                for t in threads:
                    t.join(timeout=30)
                assert not any(t.is_alive() for t in threads), "SDK stream did not finish in 30 s"
                assert not errors, errors
                assert r.status_code == 200 and b"[DONE]" in r.content
                assert sdk_texts == ["Hello world", "Hello world"]

            n = 4
            prom.wait_for("sum(route_upstream_model_consumer_metric_llm_stream_duration_count)", n)
            want_out = WARM_OUT + 2 * SDK_OUT + HTTPX_OUT
            got_out = prom.wait_for('sum(gen_ai_client_token_usage_sum{gen_ai_token_type="output"})', want_out)

            records = [json.loads(line) for line in log_path.read_text().splitlines()]
            assert len(records) == n
            assert sum(rec["output_tokens"] for rec in records) == got_out == want_out
            slow = [rec for rec in records if rec["output_tokens"] != WARM_OUT]
            assert len(slow) == 3
            for rec in slow:  # TTFT = first content event, not first byte
                assert SLOW_S * 1000 <= rec["ttft_ms"] < 640, rec
                assert rec["ttfb_ms"] < 320, rec

            # Time to first chunk: bucket counts straight from the histogram series.
            buckets: dict[float, float] = {}
            for series in prom.query("gen_ai_client_operation_time_to_first_chunk_seconds_bucket"):
                le = float(series["metric"]["le"])
                buckets[le] = buckets.get(le, 0.0) + float(series["value"][1])
            assert buckets[0.32] == 1, buckets  # the warm stream only
            assert buckets[0.64] == n, buckets  # + the three slow ones
            assert buckets[float("inf")] == n, buckets
            p90 = prom.scalar("histogram_quantile(0.9, sum by (le) "
                              "(gen_ai_client_operation_time_to_first_chunk_seconds_bucket))")
            assert p90 is not None and 0.32 < p90 <= 0.64, p90

            # Higress' average first-token latency, evaluated at the scrape that saw the slow
            # streams' increase (irate: the last two samples up to that time).
            samples = prom.query("route_upstream_model_consumer_metric_llm_stream_duration_count[2m]")
            assert len(samples) == 1, samples  # one label set: same route, cluster, model, consumer
            values = [(float(ts), float(v)) for ts, v in samples[0]["values"]]
            i = next(i for i, (_, v) in enumerate(values) if v == n)
            at, before = values[i][0], values[i - 1][1]
            assert i > 0 and before >= 1, values  # the warm stream came in an earlier scrape
            avg = prom.scalar(HIGRESS_AVG_FIRST_TOKEN, at=at)
            assert avg is not None
            firsts = sorted(round(rec["ttft_ms"]) for rec in slow)  # Higress counts integer ms
            assert firsts[0] <= avg <= firsts[-1], (avg, firsts)
            if before == 1:  # all three slow streams between the same two scrapes
                assert avg == pytest.approx(sum(firsts) / 3), (avg, firsts)
