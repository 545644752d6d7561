"""JsonlSink: writes, rotation, reopening after the file or its directory goes away, drops counted
and reported, a writer that survives failures, and a close() that never blocks the event loop."""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading
import time
from pathlib import Path

import pytest

from aistats_engine.outputs.logsink import JsonlSink

LOGGER = "aistats_engine.outputs.logsink"
FAST = 0.05  # flush_interval for tests


def wait_for(cond, timeout: float = 5.0) -> bool:
    """Poll ``cond`` until true or ``timeout``; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return True
        if time.monotonic() >= deadline:
            return bool(cond())
        time.sleep(0.01)


def lines(path: Path) -> list[dict]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(x) for x in text.splitlines()]


def tags(path: Path) -> list:
    return [x.get("t") for x in lines(path)]


class Drops:
    """on_drop callback that records what it is told."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, n: int) -> None:
        self.calls.append(n)

    @property
    def total(self) -> int:
        return sum(self.calls)


def warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


@pytest.fixture
def sinks():
    """Sinks made by a test; closed (waiting) at the end so no thread outlives it."""
    made: list[JsonlSink] = []
    yield made
    for s in made:
        s.close(wait=True, timeout=5.0)


def blocker(sink: JsonlSink, monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Make the sink's writes block until ``release`` is set (bounded); ``entered`` is set when
    the writer thread is inside a write."""
    entered, release = threading.Event(), threading.Event()
    real = sink._raw_write

    def slow(data):
        entered.set()
        release.wait(10)
        return real(data)

    monkeypatch.setattr(sink, "_raw_write", slow)
    return entered, release


def test_writes_and_flushes_without_close(tmp_path, sinks):
    path = tmp_path / "sub" / "llm.jsonl"  # parent created at construction
    sink = JsonlSink(path, flush_interval=FAST)
    sinks.append(sink)
    for i in range(50):
        sink.write({"t": i, "s": "héllo"})
    assert wait_for(lambda: tags(path) == list(range(50)))
    assert lines(path)[0]["s"] == "héllo"
    assert wait_for(lambda: sink.written == 50)
    assert sink.dropped == 0


def test_unwritable_path_raises_at_construction(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError):
        JsonlSink(tmp_path / "file" / "llm.jsonl")  # parent is a file
    with pytest.raises(OSError):
        JsonlSink(tmp_path)  # a directory


@pytest.mark.parametrize("backups", [2, 0])
def test_rotation(tmp_path, sinks, backups):
    path = tmp_path / "llm.jsonl"
    sink = JsonlSink(path, max_bytes=200, backups=backups, flush_interval=FAST)
    sinks.append(sink)
    for i in range(20):
        sink.write({"t": i, "pad": "x" * 40})
    assert sink.close(wait=True, timeout=5.0)
    files = [path.with_name(f"llm.jsonl.{i}") for i in range(backups, 0, -1)] + [path]
    got = [t for p in files for t in tags(p)]
    assert all(p.exists() for p in files)
    assert got == list(range(20))[-len(got):]  # the newest records, in order
    assert len(got) >= 3 * (backups + 1) - 2  # each file held several
    assert all(p.stat().st_size <= 200 for p in tmp_path.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in files)
    assert sink.written == 20


def test_no_rotation_when_max_bytes_is_zero(tmp_path, sinks):
    path = tmp_path / "llm.jsonl"
    sink = JsonlSink(path, max_bytes=0, flush_interval=FAST)
    sinks.append(sink)
    for i in range(100):
        sink.write({"t": i, "pad": "x" * 40})
    assert sink.close(wait=True)
    assert tags(path) == list(range(100))
    assert [p.name for p in tmp_path.iterdir()] == ["llm.jsonl"]


def test_deleted_file_is_reopened(tmp_path, sinks, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    path = tmp_path / "llm.jsonl"
    drops = Drops()
    sink = JsonlSink(path, flush_interval=FAST, on_drop=drops)
    sinks.append(sink)
    sink.write({"t": "before"})
    assert wait_for(lambda: tags(path) == ["before"])
    path.unlink()
    sink.write({"t": "after"})
    assert wait_for(lambda: tags(path) == ["after"])
    assert (sink.dropped, drops.total) == (0, 0)
    assert not warnings(caplog)


def test_moved_file_is_reopened(tmp_path, sinks):
    """External rotation (logrotate's rename): later records go to a new file at ``path``."""
    path = tmp_path / "llm.jsonl"
    sink = JsonlSink(path, flush_interval=FAST)
    sinks.append(sink)
    sink.write({"t": 1})
    assert wait_for(lambda: tags(path) == [1])
    path.rename(tmp_path / "old.jsonl")
    sink.write({"t": 2})
    assert wait_for(lambda: tags(path) == [2])
    assert tags(tmp_path / "old.jsonl") == [1]


def test_replaced_file_is_reopened(tmp_path, sinks):
    """logrotate's ``create``: rename, then a new file at ``path`` (which still exists, so only
    comparing device and inode notices)."""
    path = tmp_path / "llm.jsonl"
    sink = JsonlSink(path, flush_interval=FAST)
    sinks.append(sink)
    sink.write({"t": 1})
    assert wait_for(lambda: tags(path) == [1])
    path.rename(tmp_path / "old.jsonl")
    path.write_text(json.dumps({"t": "other"}) + "\n")
    sink.write({"t": 2})
    assert wait_for(lambda: tags(path) == ["other", 2])
    assert tags(tmp_path / "old.jsonl") == [1]


def test_directory_deleted_drops_counts_warns_once_then_resumes(tmp_path, sinks, caplog,
                                                                 monkeypatch):
    caplog.set_level(logging.INFO, logger=LOGGER)
    d = tmp_path / "logs"
    path = d / "llm.jsonl"
    drops = Drops()
    sink = JsonlSink(path, flush_interval=FAST, on_drop=drops)
    monkeypatch.setattr(sink, "_check_interval", 0.2)  # retry sooner: a faster test
    sinks.append(sink)
    sink.write({"t": "a"})
    assert wait_for(lambda: tags(path) == ["a"])

    shutil.rmtree(d)
    for i in range(3):
        sink.write({"t": f"b{i}"})
    assert wait_for(lambda: drops.total == 3)
    time.sleep(0.3)  # past a retry: the outage goes on, still one warning
    for i in range(2):
        sink.write({"t": f"c{i}"})
    assert wait_for(lambda: drops.total == 5)
    assert sink.dropped == 5
    assert not d.exists()  # the sink does not re-create the directory itself
    warned = warnings(caplog)
    assert len(warned) == 1, [r.getMessage() for r in warned]
    assert warned[0].getMessage().startswith("aistats: ")
    assert str(path) in warned[0].getMessage()

    d.mkdir()
    sent = 0
    deadline = time.monotonic() + 5
    while not any(str(t).startswith("d") for t in tags(path)) and time.monotonic() < deadline:
        sink.write({"t": f"d{sent}"})
        sent += 1
        time.sleep(0.05)
    written_d = [t for t in tags(path) if t.startswith("d")]
    assert written_d, "logging did not resume after the directory came back"
    assert sink.close(wait=True)
    written_d = tags(path)
    assert all(t.startswith("d") for t in written_d)
    assert len(written_d) + (sink.dropped - 5) == sent  # every record is written or counted
    assert drops.total == sink.dropped
    resumed = [r.getMessage() for r in caplog.records
               if r.name == LOGGER and "resumed" in r.getMessage()]
    assert len(resumed) == 1
    assert resumed[0].startswith("aistats: ")
    assert int(re.search(r"(\d+) record", resumed[0]).group(1)) == sink.dropped
    assert len(warnings(caplog)) == 1


def test_close_returns_at_once_with_a_blocked_writer(tmp_path, monkeypatch, sinks):
    path = tmp_path / "llm.jsonl"
    sink = JsonlSink(path, flush_interval=FAST, max_queue=2)
    entered, release = blocker(sink, monkeypatch)
    sinks.append(sink)
    try:
        sink.write({"t": 0})
        assert entered.wait(5)
        for i in range(1, 5):  # fill the queue: close() must not wait for room either
            sink.write({"t": i})
        t0 = time.monotonic()
        assert sink.close() is False
        assert time.monotonic() - t0 < 0.5
        t0 = time.monotonic()
        assert sink.close(wait=True, timeout=0.2) is False  # bounded by its timeout
        assert time.monotonic() - t0 < 1.0
    finally:
        release.set()
    assert sink.close(wait=True, timeout=5.0)
    assert tags(path) == [0, 1, 2]  # what was queued before close is still written
    assert sink.dropped == 2


def test_close_wait_writes_everything_queued(tmp_path, sinks):
    path = tmp_path / "llm.jsonl"
    sink = JsonlSink(path, flush_interval=10.0)  # no timed flush helps
    sinks.append(sink)
    for i in range(2000):
        sink.write({"t": i})
    assert sink.close(wait=True, timeout=5.0)
    assert tags(path) == list(range(2000))
    assert (sink.written, sink.dropped) == (2000, 0)
    assert not sink._thread.is_alive()


def test_close_without_wait_still_drains_and_ends_the_thread(tmp_path, sinks):
    path = tmp_path / "llm.jsonl"
    drops = Drops()
    sink = JsonlSink(path, flush_interval=FAST, on_drop=drops)
    sinks.append(sink)
    for i in range(500):
        sink.write({"t": i})
    sink.close()
    assert wait_for(lambda: not sink._thread.is_alive())
    assert tags(path) == list(range(500))
    sink.write({"t": "late"})  # after close: counted, not silently lost
    assert (sink.dropped, drops.total) == (1, 1)


def test_rebuilt_sink_while_the_old_one_finishes(tmp_path, monkeypatch, sinks):
    path = tmp_path / "llm.jsonl"
    old = JsonlSink(path, flush_interval=FAST)
    entered, release = blocker(old, monkeypatch)
    sinks.append(old)
    try:
        old.write({"t": "old0"})
        assert entered.wait(5)
        old.write({"t": "old1"})
        old.close()  # returns while the old writer is stuck
        new = JsonlSink(path, flush_interval=FAST)
        sinks.append(new)
        new.write({"t": "new0"})
        assert wait_for(lambda: "new0" in tags(path))
    finally:
        release.set()
    assert old.close(wait=True, timeout=5.0)
    new.write({"t": "new1"})
    assert new.close(wait=True, timeout=5.0)
    assert sorted(tags(path)) == ["new0", "new1", "old0", "old1"]


def test_write_failure_does_not_kill_the_writer(tmp_path, monkeypatch, sinks, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    path = tmp_path / "llm.jsonl"
    drops = Drops()
    sink = JsonlSink(path, flush_interval=FAST, on_drop=drops)
    sinks.append(sink)
    real = sink._raw_write
    failed = []

    def once(data):
        if not failed:
            failed.append(1)
            raise ValueError("write to closed file")
        return real(data)

    monkeypatch.setattr(sink, "_raw_write", once)
    sink.write({"t": "lost"})
    assert wait_for(lambda: drops.total == 1)
    sink.write({"t": "kept"})
    assert wait_for(lambda: tags(path) == ["kept"])
    assert sink._thread.is_alive()
    assert (sink.dropped, sink.written) == (1, 1)
    assert len(warnings(caplog)) == 1
    assert warnings(caplog)[0].getMessage().startswith("aistats: ")
    assert any("resumed" in r.getMessage() and "1 record" in r.getMessage()
               for r in caplog.records)


def test_partial_write_failure_keeps_lines_parseable(tmp_path, monkeypatch, sinks):
    """A write cut short mid-line (disk full) must not glue the next record onto the fragment."""
    path = tmp_path / "llm.jsonl"
    sink = JsonlSink(path, flush_interval=FAST)
    sinks.append(sink)
    real = sink._raw_write
    state = {"n": 0}

    def short(data):
        state["n"] += 1
        if state["n"] == 1:
            return real(data[:5])
        if state["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(data)

    monkeypatch.setattr(sink, "_raw_write", short)
    sink.write({"t": "cut"})
    assert wait_for(lambda: sink.dropped == 1)
    sink.write({"t": "next"})
    assert sink.close(wait=True)
    text = path.read_text().splitlines()
    assert len(text) == 2 and json.loads(text[1]) == {"t": "next"}


def test_writer_survives_a_failing_on_drop_and_an_unexpected_error(tmp_path, monkeypatch, sinks,
                                                                   caplog):
    path = tmp_path / "llm.jsonl"

    def bad(n):
        raise RuntimeError("metric broke")

    sink = JsonlSink(path, flush_interval=FAST, on_drop=bad)
    monkeypatch.setattr(sink, "_check_interval", 0.05)
    sinks.append(sink)
    real = sink._add
    calls = []

    def add(line, now):
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("bug")
        return real(line, now)

    monkeypatch.setattr(sink, "_add", add)
    sink.write({"t": 1})
    assert wait_for(lambda: sink.dropped == 1)
    sink.write({"t": 2})
    assert wait_for(lambda: tags(path) == [2])
    assert sink._thread.is_alive()

    real_flush = sink._flush
    flushes = []

    def flush(now, force=False):  # a bug that escapes the loop: the thread restarts it
        flushes.append(1)
        if len(flushes) == 1:
            raise RuntimeError("bug in flush")
        return real_flush(now, force)

    caplog.set_level(logging.INFO, logger=LOGGER)
    monkeypatch.setattr(sink, "_flush", flush)
    sink.write({"t": 3})
    assert wait_for(lambda: 3 in tags(path))
    assert sink._thread.is_alive()
    assert any("restarting" in r.getMessage() for r in warnings(caplog))


def test_queue_full_drops_are_counted_and_warned(tmp_path, monkeypatch, sinks, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    path = tmp_path / "llm.jsonl"
    drops = Drops()
    sink = JsonlSink(path, flush_interval=FAST, max_queue=3, on_drop=drops)
    entered, release = blocker(sink, monkeypatch)
    sinks.append(sink)
    try:
        sink.write({"t": 0})
        assert entered.wait(5)  # the writer holds record 0; the queue is empty
        for i in range(1, 10):
            sink.write({"t": i})
        assert (sink.dropped, drops.total, drops.calls) == (6, 6, [1] * 6)
        full = [r.getMessage() for r in warnings(caplog)]
        assert len(full) == 1 and "queue full" in full[0] and full[0].startswith("aistats: ")
    finally:
        release.set()
    assert sink.close(wait=True)
    assert tags(path) == [0, 1, 2, 3]


def test_zero_max_queue_is_still_bounded(tmp_path, sinks):
    sink = JsonlSink(tmp_path / "llm.jsonl", max_queue=0)
    sinks.append(sink)
    assert sink._q.maxsize >= 1
