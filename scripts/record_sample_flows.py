"""Record flows/sample.flow (and the records it gave live, flows/sample.jsonl).

A real mitmdump with the addon and ``-w`` proxies a few provider exchanges from the loopback
fake upstream used by the tests; ``mitmdump -nr flows/sample.flow -s addon/aistats.py`` must
give the same records (tests/test_sample_flows.py checks it).

    .venv/bin/python scripts/record_sample_flows.py
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from mitm import Mitmdump  # noqa: E402
from upstream import (  # noqa: E402
    JSON_HEADERS, NDJSON_HEADERS, SSE_HEADERS, Reply, Upstream, anthropic_messages_stream,
    gemini_sse, ollama_chat_ndjson, openai_chat_stream, openai_usage)

EXCHANGES = [
    ("openai-stream", "/v1/chat/completions", {"model": "gpt-4o-mini", "stream": True,
                                               "stream_options": {"include_usage": True},
                                               "messages": [{"role": "user", "content": "hi"}]},
     Reply(headers=SSE_HEADERS, encoding="gzip", first_delay_s=0.15, chunk_delay_s=0.03,
           chunks=openai_chat_stream(["Hel", "lo", "!"], usage=openai_usage(12, 3, cached=8)))),
    ("anthropic-stream", "/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 64,
                                          "stream": True,
                                          "messages": [{"role": "user", "content": "hi"}]},
     Reply(headers=SSE_HEADERS, chunk_delay_s=0.03, chunks=anthropic_messages_stream(
         ["Bon", "jour"], input_tokens=9, output_tokens=4, cache_read=100))),
    ("gemini-stream", "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
     {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]},
     Reply(headers=SSE_HEADERS, chunk_delay_s=0.03,
           chunks=gemini_sse(["A", "B"], prompt_tokens=6, candidates_tokens=2, thoughts_tokens=3))),
    ("ollama-stream", "/api/chat", {"model": "llama3.2", "messages": [{"role": "user", "content": "x"}]},
     Reply(headers=NDJSON_HEADERS, chunk_delay_s=0.03, chunks=ollama_chat_ndjson(["a", "b"]))),
    ("rate-limited", "/v1/chat/completions", {"model": "gpt-4o", "messages": []},
     Reply(status=429, headers=JSON_HEADERS,
           chunks=[b'{"error":{"message":"Rate limit reached","type":"requests"}}'])),
    ("aborted", "/v1/chat/completions", {"model": "gpt-4o-mini", "stream": True},
     Reply(headers=SSE_HEADERS, abort_after=2, chunk_delay_s=0.03,
           chunks=openai_chat_stream(["x", "y", "z"], usage=openai_usage(4, 3)))),
]


def main() -> None:
    out_flow, out_log = ROOT / "flows" / "sample.flow", ROOT / "flows" / "sample.jsonl"
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        with Upstream() as up, Mitmdump(tmp, options={"aistats_log": str(tmp / "live.jsonl")},
                                        write_flows=tmp / "sample.flow") as m:
            with httpx.Client(proxy=m.proxy_url, timeout=30) as client:
                for key, path, body, reply in EXCHANGES:
                    up.add(key, reply)
                    try:
                        with client.stream("POST", up.url + path, json=body,
                                           headers={"x-aistats-case": key}) as r:
                            for _ in r.iter_raw():
                                pass
                    except httpx.HTTPError:
                        pass  # the aborted exchange
            time.sleep(1.5)  # the log is flushed within a second
        shutil.copy(tmp / "sample.flow", out_flow)
        shutil.copy(tmp / "live.jsonl", out_log)
    print(f"wrote {out_flow} and {out_log}")


if __name__ == "__main__":
    main()
