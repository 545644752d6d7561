"""Drive the real addon class with in-memory mitmproxy flows (no proxy, no sockets)."""

from __future__ import annotations

import io
from collections.abc import Iterable

from mitmproxy import http
from mitmproxy.io import FlowReader, FlowWriter
from mitmproxy.test import taddons, tflow, tutils

import aistats  # addon/aistats.py (addon/ is on sys.path via conftest)


class Capture:
    """Collects records the addon emits, instead of a log file."""

    def __init__(self, addon: aistats.AIStats) -> None:
        self.records: list[dict] = []
        orig = addon._emit

        def emit(rec):  # keep the real emit (summary line, sink) and collect the dict
            orig(rec)
            self.records.append(rec.to_dict())

        addon._emit = emit  # type: ignore[method-assign]


def make_flow(method: str, path: str, req_headers: dict[str, str], req_body: bytes,
              host: str = "127.0.0.1", port: int = 8000, t0: float = 1_700_000_000.0) -> http.HTTPFlow:
    req = tutils.treq(method=method.encode(), path=path.encode(), host=host, port=port,
                      headers=http.Headers(**{}), content=b"")
    req.headers = http.Headers([(k.encode(), v.encode()) for k, v in req_headers.items()])
    req.raw_content = req_body
    req.timestamp_start, req.timestamp_end = t0, t0 + 0.001
    f = tflow.tflow(req=req)
    f.response = None
    return f


def set_response(f: http.HTTPFlow, status: int, headers: dict[str, str], t: float) -> None:
    resp = tutils.tresp(status_code=status, content=None)
    resp.headers = http.Headers([(k.encode(), v.encode()) for k, v in headers.items()])
    resp.raw_content = None
    resp.timestamp_start, resp.timestamp_end = t, None
    f.response = resp


def run_live(addon: aistats.AIStats, f: http.HTTPFlow, status: int, headers: dict[str, str],
             chunks: Iterable[bytes], body: bytes, chunk_gap: float = 0.01,
             error: str | None = None) -> http.HTTPFlow:
    """Hooks in live order. Streams go through the installed callable chunk by chunk (with a
    fake clock); other bodies are set whole, as mitmproxy does before ``response``."""
    f.live = True
    t = f.request.timestamp_start
    addon.requestheaders(f)
    addon.request(f)
    set_response(f, status, headers, t + 0.05)
    addon.responseheaders(f)
    clock = [t + 0.05]
    if callable(f.response.stream):
        orig = aistats.time.time
        aistats_time = lambda: clock[0]  # noqa: E731
        try:
            aistats.time.time = aistats_time
            for c in chunks:
                clock[0] += chunk_gap
                assert f.response.stream(c) == c  # the traffic is sacred
        finally:
            aistats.time.time = orig
    else:
        f.response.raw_content = body
        clock[0] += chunk_gap
    if error:
        from mitmproxy.flow import Error
        f.error = Error(error)
        f.error.timestamp = clock[0] + 0.001
        addon.error(f)
    else:
        f.response.timestamp_end = clock[0] + 0.001
        addon.response(f)
    f.live = False
    return f


def roundtrip(f: http.HTTPFlow) -> http.HTTPFlow:
    """Write and read back through mitmproxy's flow file format."""
    buf = io.BytesIO()
    FlowWriter(buf).add(f)
    buf.seek(0)
    return next(iter(FlowReader(buf).stream()))


def run_replay(addon: aistats.AIStats, f: http.HTTPFlow) -> None:
    """The offline hook sequence of ``mitmdump -nr`` (eventsequence order)."""
    f.live = False
    addon.requestheaders(f)
    addon.request(f)
    if f.response is not None:
        addon.responseheaders(f)
        addon.response(f)
    if f.error is not None:
        addon.error(f)


def new_addon(**options) -> tuple[aistats.AIStats, taddons.context, Capture]:
    addon = aistats.AIStats()
    ctx = taddons.context(addon)
    ctx.__enter__()
    if options:
        ctx.configure(addon, **options)
    else:
        ctx.configure(addon)
    return addon, ctx, Capture(addon)
