"""Drive the real addon class with in-memory mitmproxy flows (no proxy, no sockets)."""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import Iterable

from mitmproxy import http
from mitmproxy.addons import save
from mitmproxy.io import FlowReader, FlowWriter
from mitmproxy.test import taddons, tflow, tutils

import aistats  # addon/aistats.py (addon/ is on sys.path via conftest)

# Records are gathered before they are made (aistats.GATHER_S): a short gathering here keeps the
# unit tests quick; the gathering itself is tested in test_addon.py.
aistats.GATHER_S = 0.005


class Capture:
    """An output on the addon's bus that keeps what it is given (instead of a log file)."""

    def __init__(self, addon: aistats.AIStats) -> None:
        self.records: list[dict] = []
        self.events: list = []  # Finished events
        self.started_events: list = []
        addon.bus.replace("test-capture", self)

    def started(self, event) -> None:
        self.started_events.append(event)

    def finished(self, event) -> None:
        self.events.append(event)
        self.records.append(event.record.to_dict())

    def close(self, wait: bool = False) -> None:
        pass


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
    """Hooks in live order, inside a running event loop, so the addon's deferred work
    (``call_soon``: batched stream reading, publishing) runs as in mitmproxy: between chunks.
    Streams go through the installed callable chunk by chunk (with a fake clock); other bodies
    are set whole, as mitmproxy does before ``response``."""
    asyncio.run(_live(addon, f, status, headers, list(chunks), body, chunk_gap, error))
    return f


async def _live(addon: aistats.AIStats, f: http.HTTPFlow, status: int, headers: dict[str, str],
                chunks: list[bytes], body: bytes, chunk_gap: float, error: str | None) -> None:
    f.live = True
    t = f.request.timestamp_start
    addon.requestheaders(f)
    set_response(f, status, headers, t + 0.05)
    addon.responseheaders(f)
    clock = [t + 0.05]
    if callable(f.response.stream):
        orig = aistats.time.time
        try:
            aistats.time.time = lambda: clock[0]
            for c in chunks:
                clock[0] += chunk_gap
                assert f.response.stream(c) == c  # the traffic is sacred
                for _ in range(3):  # let scheduled drains run (each may schedule one more)
                    await asyncio.sleep(0)
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
    await asyncio.sleep(aistats.GATHER_S)  # records are made together, a little later
    for _ in range(200):  # (bounded) then in slices, one per loop turn
        if not addon._gathering:
            break
        await asyncio.sleep(0.001)
    f.live = False


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
    if f.response is not None:
        addon.responseheaders(f)
        addon.response(f)
    if f.error is not None:
        addon.error(f)


def new_addon(saved: bool = False, **options) -> tuple[aistats.AIStats, taddons.context, Capture]:
    """The addon in a test context. ``saved``: as under ``mitmdump -w`` (mitmproxy's save addon
    and its option, writing to the null device), where a stream's reading goes with its flow
    for a replay; without it, as under plain mitmdump, it waits for the record."""
    addon = aistats.AIStats()
    ctx = taddons.context(addon, *([save.Save()] if saved else []))
    ctx.__enter__()
    if saved:
        options = {"save_stream_file": os.devnull, **options}
    if options:
        ctx.configure(addon, **options)
    else:
        ctx.configure(addon)
    return addon, ctx, Capture(addon)
