"""The activity UI in a real browser, against a real mitmdump running the addon.

Debian's chromium (``/usr/bin/chromium``, installed with apt-get when missing; the test is
skipped only when it cannot be installed at all) is driven by the ``playwright`` package; no
browser is ever downloaded. A request sent through the proxy by the official openai SDK (an
OpenAI stream with a tool call, from a loopback upstream) must show up in the open page without
a reload, first in flight and then in the table; its capture must show the assembled answer and
the tool call; the sessions page must list its session. The API key given to the SDK (and the
API token) must appear nowhere: not in the page's HTML or text, not in any API response the page
loaded, not in the live events. Screenshots are saved in the test's tmp folder.

Everything listens on 127.0.0.1; every wait is bounded; chromium is stopped by the playwright
driver and, should a process outlive it, by its PID.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from mitm import Mitmdump
from upstream import SSE_HEADERS, Reply, Upstream

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-proxy-server"]
API_KEY = "sk-ui-test-SECRET-9f8e7d6c5b4a3210"
TOKEN = "ui-api-token-5e1f0c9b7a"
SESSION = "ui-session-1"
MODEL = "ui-model"
ANSWER = "Let me look that up."
TOOL_ARGS = '{"city": "Paris", "unit": "celsius"}'
WAIT_MS = 15_000


def _install_chromium() -> str | None:
    """None when chromium is there (installed now if need be), else why it cannot be."""
    if os.access(CHROMIUM, os.X_OK):
        return None
    if shutil.which("apt-get") is None:
        return "no /usr/bin/chromium and no apt-get to install Debian's chromium"
    sudo: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None or subprocess.run(
                ["sudo", "-n", "true"], capture_output=True, timeout=10).returncode != 0:
            return "no /usr/bin/chromium, and installing it needs root (apt-get install chromium)"
        sudo = ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run([*sudo, "apt-get", "update", "-qq"], env=env, capture_output=True,
                       timeout=600, check=True)
        subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends",
                        "chromium"], env=env, capture_output=True, timeout=900, check=True)
    except (subprocess.SubprocessError, OSError) as e:
        out = getattr(e, "stderr", b"") or b""
        return f"chromium could not be installed with apt-get: {e} {out[-300:]!r}"
    return None if os.access(CHROMIUM, os.X_OK) else "apt-get ran but /usr/bin/chromium is missing"


@pytest.fixture(scope="module")
def chromium() -> str:
    why = _install_chromium()
    if why is not None:
        pytest.skip(why)
    return CHROMIUM


def tool_call_stream() -> list[bytes]:
    """OpenAI Chat Completions SSE: text, one tool call in two pieces, usage with cache hits."""
    def chunk(choices: list, **extra: object) -> bytes:
        obj = {"id": "chatcmpl-ui", "object": "chat.completion.chunk", "created": 1_700_000_000,
               "model": MODEL, "choices": choices, **extra}
        return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()

    def delta(d: dict, finish: str | None = None) -> bytes:
        return chunk([{"index": 0, "delta": d, "finish_reason": finish}])

    half = len(TOOL_ARGS) // 2
    return [
        delta({"role": "assistant", "content": ""}),
        delta({"content": "Let me "}),
        delta({"content": "look that up."}),
        delta({"tool_calls": [{"index": 0, "id": "call_ui1", "type": "function",
                               "function": {"name": "get_weather",
                                            "arguments": TOOL_ARGS[:half]}}]}),
        delta({"tool_calls": [{"index": 0, "function": {"arguments": TOOL_ARGS[half:]}}]}),
        delta({}, "tool_calls"),
        chunk([], usage={"prompt_tokens": 812, "completion_tokens": 23, "total_tokens": 835,
                         "prompt_tokens_details": {"cached_tokens": 768}}),
        b"data: [DONE]\n\n",
    ]


def _pids_using(marker: str) -> list[int]:
    """Processes whose command line names ``marker`` (chromium's own profile folder)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if marker in (d / "cmdline").read_bytes().decode("utf-8", "replace"):
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


def _stop_leftovers(marker: str) -> None:
    deadline = time.monotonic() + 5
    while _pids_using(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in _pids_using(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class EventTap(threading.Thread):
    """The live events as a browser gets them, kept to look for secrets."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.text = ""
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            with httpx.stream("GET", self.url, headers={"Authorization": f"Bearer {TOKEN}"},
                              timeout=httpx.Timeout(5, read=2)) as r:
                for piece in r.iter_text():
                    self.text += piece
                    if self.stop.is_set():
                        return
        except httpx.HTTPError:
            pass


def wait_for_api(base: str, m: Mitmdump) -> None:
    """The addon serves /api/activity on its metrics endpoint (bounded wait)."""
    deadline = time.monotonic() + 30
    last = None
    while time.monotonic() < deadline:
        try:
            last = httpx.get(base + "/api/activity", headers={"Authorization": f"Bearer {TOKEN}"},
                             timeout=2)
            if last.status_code == 200:
                return
        except httpx.HTTPError as e:
            last = e
        time.sleep(0.2)
    raise AssertionError(f"the addon does not serve /api/activity: {last!r}\n{m.output()[-2000:]}")


def test_activity_capture_and_sessions_in_a_browser(tmp_path, chromium):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: .venv/bin/pip install -e '.[test]' "
                    "(never `playwright install`: the test uses Debian's chromium)")
    with Upstream() as up:
        up.add("ui-tool", Reply(headers=SSE_HEADERS, chunks=tool_call_stream(), first_delay_s=1.5,
                                chunk_delay_s=0.05))
        with Mitmdump(tmp_path, options={"aistats_api_token": TOKEN}) as m:
            base = m.metrics_url().removesuffix("/metrics")
            wait_for_api(base, m)
            tap = EventTap(base + "/api/events")
            tap.start()
            profile = tmp_path / "chromium-profile"
            try:
                with sync_playwright() as p:
                    ctx = p.chromium.launch_persistent_context(
                        str(profile), executable_path=chromium, headless=True,
                        args=CHROMIUM_ARGS, viewport={"width": 1500, "height": 1000})
                    try:
                        _drive(ctx, base, up, m, tmp_path)
                    finally:
                        ctx.close()
            finally:
                _stop_leftovers(str(profile))
                tap.stop.set()
                tap.join(5)
            events = tap.text
            assert "event: record" in events and f'"model":"{MODEL}"' in events
            assert API_KEY not in events and TOKEN not in events
            log = m.output()
            assert API_KEY not in log and TOKEN not in log


def _drive(ctx, base: str, up: Upstream, m: Mitmdump, tmp_path: Path) -> None:
    page = ctx.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}")
            if msg.type == "error" else None)
    loaded: dict[str, bytes] = {}  # every API response the page got (the stream aside)

    def keep(resp) -> None:
        url = resp.url
        if url.startswith(base + "/api/") and "/api/events" not in url:
            try:
                loaded[url] = resp.body()
            except Exception as e:  # noqa: BLE001 - recorded, checked below
                problems.append(f"could not read {url}: {e}")
    page.on("response", keep)
    navigations: list[str] = []
    page.on("framenavigated", lambda f: navigations.append(f.url) if f == page.main_frame else None)

    # The token once in the address: a cookie is set, and the address bar loses the token.
    page.goto(base + f"/?token={TOKEN}")
    page.wait_for_selector("#activity", timeout=WAIT_MS)
    assert TOKEN not in page.url
    page.wait_for_selector("#live.on", timeout=WAIT_MS)  # the event stream is open
    page.evaluate("window.__aistatsNoReload = 1")
    navs_before = len(navigations)
    assert page.locator("#activity-rows tr[data-id]").count() == 0

    # A request through the proxy, from the official SDK, while the page is open.
    result: dict[str, object] = {}

    def send() -> None:
        client = openai.OpenAI(
            base_url=up.url + "/v1", api_key=API_KEY, max_retries=0, timeout=30,
            default_headers={"x-aistats-case": "ui-tool", "x-session-id": SESSION},
            http_client=openai.DefaultHttpx2Client(proxy=m.proxy_url))
        try:
            text, calls = "", []
            for ev in client.chat.completions.create(
                    model=MODEL, stream=True, stream_options={"include_usage": True},
                    messages=[{"role": "system", "content": "You answer with tools."},
                              {"role": "user", "content": "What is the weather in Paris?"}],
                    tools=[{"type": "function", "function": {
                        "name": "get_weather", "description": "Current weather for a city",
                        "parameters": {"type": "object",
                                       "properties": {"city": {"type": "string"}}}}}]):
                if ev.choices and ev.choices[0].delta.content:
                    text += ev.choices[0].delta.content
                if ev.choices and ev.choices[0].delta.tool_calls:
                    calls.append(ev.choices[0].delta.tool_calls[0])
            result["text"], result["calls"] = text, calls
        except Exception as e:  # noqa: BLE001 - reported by the test thread
            result["error"] = e
        finally:
            client.close()

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    # in flight first (the upstream waits 1.5 s before its first chunk), with a moving clock
    live_row = page.locator("#inflight tbody tr[data-id]").filter(has_text=SESSION)
    live_row.wait_for(timeout=WAIT_MS)
    assert "/v1/chat/completions" in live_row.inner_text()
    page.screenshot(path=str(tmp_path / "inflight.png"), full_page=True)
    sender.join(30)
    assert not sender.is_alive(), "the SDK request did not finish"
    assert "error" not in result, result.get("error")
    assert result["text"] == ANSWER
    # then in the table, without a reload
    row = page.locator("#activity-rows tr[data-id]").filter(has_text=MODEL).first
    row.wait_for(timeout=WAIT_MS)
    rec_id = row.get_attribute("data-id")
    assert rec_id and rec_id.isdigit()
    page.locator(f'#activity-rows tr[data-id="{rec_id}"] a.capture-link').wait_for(
        timeout=WAIT_MS)  # the capture flag arrives with the refetch that follows the event
    row = page.locator(f'#activity-rows tr[data-id="{rec_id}"]')
    cells = row.inner_text()
    assert "200" in cells and "812" in cells and "768" in cells and "23" in cells, cells
    page.wait_for_selector("#inflight-none", state="visible", timeout=WAIT_MS)  # gone again
    assert page.evaluate("window.__aistatsNoReload") == 1
    assert len(navigations) == navs_before, navigations
    cards = page.inner_text("#cards")
    assert "Requests" in cards and "1" in cards
    page.screenshot(path=str(tmp_path / "activity.png"), full_page=True)
    _no_secret(page, loaded)

    # The capture: the exchange as a person reads it.
    row.locator("a.capture-link").click()
    page.wait_for_selector("#answer", timeout=WAIT_MS)
    assert page.url.endswith(f"#/capture/{rec_id}")
    answer = page.inner_text("#answer")
    assert ANSWER in answer and "get_weather" in answer and "Paris" in answer, answer
    assert "tool_calls" in answer  # the finish reason
    convo = page.inner_text(".conversation")
    assert "What is the weather in Paris?" in convo and "System prompt" in convo
    assert "Tools (1): get_weather" in convo
    summary = page.inner_text("#record-summary")
    assert MODEL in summary and SESSION in summary and "768" in summary
    page.screenshot(path=str(tmp_path / "capture.png"), full_page=True)
    page.click(".tabs button[data-tab=headers]")
    headers = page.inner_text("#main")
    assert "[REDACTED]" in headers
    page.click(".tabs button[data-tab=request]")
    page.wait_for_selector(".codebox pre", timeout=WAIT_MS)
    assert "get_weather" in page.inner_text(".codebox pre")
    _no_secret(page, loaded)

    # Sessions: the list, then the session's timeline.
    page.click("header nav a[data-nav=sessions]")
    srow = page.locator(f'#session-rows tr[data-session="{SESSION}"]')
    srow.wait_for(timeout=WAIT_MS)
    assert "94.6%" in srow.inner_text() or "94.5%" in srow.inner_text()  # 768 / 812 cached
    page.screenshot(path=str(tmp_path / "sessions.png"), full_page=True)
    srow.locator("a.session-link").click()
    page.wait_for_selector("#timeline svg rect.hit", timeout=WAIT_MS)
    assert page.locator("#timeline rect.hit").count() == 1
    assert page.locator(f'#activity-rows tr[data-id="{rec_id}"]').count() == 1
    page.screenshot(path=str(tmp_path / "session.png"), full_page=True)
    _no_secret(page, loaded)

    assert not problems, problems
    assert {u.split("?")[0].removeprefix(base) for u in loaded} >= {
        "/api/meta", "/api/activity", "/api/stats", f"/api/captures/{rec_id}", "/api/sessions",
        f"/api/sessions/{SESSION}"}


def _no_secret(page, loaded: dict[str, bytes]) -> None:
    html = page.content()
    text = page.inner_text("body")
    for secret in (API_KEY, TOKEN):
        assert secret not in html and secret not in text, f"{secret[:6]}… in the page"
        for url, body in loaded.items():
            assert secret.encode() not in body, f"{secret[:6]}… in {url}"
    for c in page.context.cookies():
        assert TOKEN not in c["value"] and API_KEY not in c["value"]
