#!/usr/bin/env python3
"""Soak: a few thousand LLM requests through mitmdump with the store, captures and UI on, to
check that the store, the capture cache and the process stay within their stated bounds.

    .venv/bin/python scripts/soak.py --requests 3000 --json soak.json

A loopback upstream answers OpenAI chat requests (a streamed answer with a tool call, or a JSON
body; every request carries a growing conversation, as agents send); the client sends them
through mitmdump with ``aistats_store_rows``, ``aistats_captures_mb`` set small so the bounds are
reached. Read while it runs: mitmdump's resident memory (/proc), the API's row count and the
capture bytes it reports. Prints a table and exits non-zero when a bound is broken. Not a
test (no timing assertion anywhere): figures for the README.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ADDON = ROOT / "addon" / "aistats.py"
MITMDUMP = Path(sys.executable).parent / "mitmdump"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


class Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
        n = len(body.get("messages", []))
        if body.get("stream"):
            chunks = [sse({"id": f"c{n}", "model": "soak-model", "choices": [
                {"index": 0, "delta": {"content": f"part {i} "}}]}) for i in range(20)]
            chunks.append(sse({"id": f"c{n}", "choices": [{"index": 0, "delta": {"tool_calls": [
                {"index": 0, "id": "call_1", "type": "function",
                 "function": {"name": "lookup", "arguments": '{"q": "x"}'}}]}}]}))
            chunks.append(sse({"id": f"c{n}", "choices": [], "usage": {
                "prompt_tokens": 100 * n, "completion_tokens": 21,
                "prompt_tokens_details": {"cached_tokens": 90 * n}}}))
            chunks.append(b"data: [DONE]\n\n")
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for c in chunks:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(c), c))
            self.wfile.write(b"0\r\n\r\n")
        else:
            out = json.dumps({"id": f"c{n}", "model": "soak-model", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "ok " * 50},
                 "finish_reason": "stop"}], "usage": {"prompt_tokens": 100 * n,
                                                      "completion_tokens": 50}}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def get_json(url: str) -> dict:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as r:
        return json.loads(r.read())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--store-rows", type=int, default=500)
    ap.add_argument("--captures-mb", type=int, default=2)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    random.seed(1)

    up = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    up.daemon_threads = True
    threading.Thread(target=up.serve_forever, daemon=True).start()
    up_url = f"http://127.0.0.1:{up.server_address[1]}"
    work = Path(tempfile.mkdtemp(prefix="aistats-soak-"))
    proxy, web = free_port(), free_port()
    cmd = [str(MITMDUMP), "-q", "--listen-host", "127.0.0.1", "--listen-port", str(proxy),
           "-s", str(ADDON), "--set", f"confdir={work / 'conf'}",
           "--set", f"aistats_metrics_port={web}", "--set", f"aistats_store_rows={a.store_rows}",
           "--set", f"aistats_captures_mb={a.captures_mb}"]
    proc = subprocess.Popen(cmd, stdout=open(work / "mitmdump.log", "wb"),
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    api = f"http://127.0.0.1:{web}/api"
    samples: list[tuple[int, int]] = []
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                get_json(api + "/activity?limit=1")
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit(f"mitmdump did not serve {api}: see {work}/mitmdump.log")
                time.sleep(0.2)
        messages: list[dict] = []
        t0 = time.monotonic()
        for i in range(a.requests):
            # random text: captures must not compress to nothing, or the bound is never reached
            text = f"turn {i} " + random.randbytes(150).hex()
            messages = (messages + [{"role": "user", "content": text}])[-40:]
            conn = http.client.HTTPConnection("127.0.0.1", proxy, timeout=30)
            body = json.dumps({"model": "soak-model", "stream": i % 2 == 0, "messages": messages})
            conn.request("POST", up_url + "/v1/chat/completions", body=body,
                         headers={"content-type": "application/json",
                                  "authorization": "Bearer sk-soak-0123456789abcdef",
                                  "x-session-id": f"s{i // 50}"})
            conn.getresponse().read()
            conn.close()
            if i % 250 == 0 or i == a.requests - 1:
                samples.append((i + 1, rss_kb(proc.pid)))
        elapsed = time.monotonic() - t0
        time.sleep(1.5)
        page = get_json(api + "/activity?limit=1000")
        stats = get_json(api + "/stats")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        up.shutdown()
    rows = page["total"]
    captured = sum(1 for r in page["data"] if r.get("has_capture"))
    rss = [kb for _, kb in samples]
    second_half = rss[len(rss) // 2:]
    report = {
        "requests": a.requests, "seconds": round(elapsed, 1), "store_rows_bound": a.store_rows,
        "store_rows": rows, "captures_mb_bound": a.captures_mb, "captured_in_newest_page": captured,
        "stats_requests": stats.get("requests"), "rss_kb": samples,
        "rss_growth_second_half_kb": max(second_half) - min(second_half) if second_half else 0,
    }
    print(f"{a.requests} requests in {elapsed:.1f} s through mitmdump + aistats (store rows "
          f"bound {a.store_rows}, captures {a.captures_mb} MB)")
    print(f"store rows: {rows} (bound {a.store_rows}); captures held for {captured} of the "
          f"newest {len(page['data'])} records")
    print("RSS MB after N requests: " + ", ".join(f"{n}: {kb / 1024:.1f}" for n, kb in samples))
    if a.json:
        a.json.write_text(json.dumps(report, indent=2))
    broken = rows > a.store_rows or rows == 0
    if broken:
        print(f"soak: store holds {rows} rows, bound {a.store_rows}", file=sys.stderr)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
