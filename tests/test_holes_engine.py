"""Holes found under bad input, faults and hostile bodies, each driven through the engine (the
end-to-end counterparts are in test_hostile_e2e.py)."""

from __future__ import annotations

import gzip
import json
import zlib

import pytest

from aistats_engine import settings
from aistats_engine.observer import StreamObserver, parse_body
from aistats_engine.record import redact
from aistats_engine.record.builder import classify_failure
from aistats_engine.wire.formats import by_api
from aistats_engine.wire.framing import SSEFramer
from aistats_engine.wire.reader import read_request
from aistats_engine.wire.usage import MAX_TOKENS


def _defaults(**over: str) -> dict:
    values = {s.name: s.default for s in settings.OPTIONS}
    values.update(over)
    return values


@pytest.mark.parametrize("option", ["aistats_print", "aistats_metrics", "aistats_metrics_server_trio"])
def test_every_boolean_option_is_parsed_with_a_one_line_error(option):
    with pytest.raises(settings.SettingsError) as e:
        settings.parse(_defaults(**{option: "maybe"}))
    assert str(e.value) == f"{option}: 'maybe' is invalid; expected true or false"
    for word, want in (("TRUE", True), ("off", False), ("1", True), ("no", False)):
        assert getattr(settings.parse(_defaults(**{option: word})),
                       {"aistats_print": "print_summary", "aistats_metrics": "metrics",
                        "aistats_metrics_server_trio": "metrics_server_trio"}[option]) is want


def test_every_option_is_declared_as_text():
    # mitmproxy silently drops a script whose typed option fails to convert (issue #8013)
    assert {s.type for s in settings.OPTIONS} == {str}


@pytest.mark.parametrize("value", ["nan", "0.1,nan,1", "0.1,inf", "-inf,1"])
def test_non_finite_bucket_boundaries_are_refused(value):
    with pytest.raises(settings.SettingsError, match="aistats_metrics_duration_buckets"):
        settings.parse(_defaults(aistats_metrics_duration_buckets=value))


@pytest.mark.parametrize("usage", [
    {"prompt_tokens": -5, "completion_tokens": 3},
    {"prompt_tokens": 1.5, "completion_tokens": 3},
    {"prompt_tokens": MAX_TOKENS + 1, "completion_tokens": 3},
    {"prompt_tokens": "12", "completion_tokens": 3},
    {"prompt_tokens": 2 ** 70, "completion_tokens": 3},
])
def test_invalid_usage_counts_become_null_and_are_marked(usage):
    body = json.dumps({"id": "c", "choices": [], "usage": usage}).encode()
    p = parse_body("chat_completions", body, None)
    assert p.usage.input is None and p.usage.output == 3
    assert [pr.kind for pr in p.problems] == ["invalid_usage"]


def test_invalid_server_speeds_are_dropped():
    body = (b'{"content": "x", "timings": {"prompt_n": 3, "predicted_n": 2, '
            b'"prompt_per_second": -1, "predicted_ms": -3, "prompt_ms": 5}}')
    p = parse_body("completions", body, None)
    assert p.speeds.prompt_per_second is None and p.speeds.server_duration_ms is None
    assert (p.usage.input, p.usage.output) == (3, 2)


def test_request_body_decoding_is_bounded_and_marked():
    bomb = gzip.compress(b"{" + b" " * (4 << 20) + b"}")
    info = read_request(bomb, "gzip", max_body=1 << 20)
    assert info.problem is not None and info.problem.kind == "invalid_request"
    assert "over" in info.problem.detail
    assert read_request(b"x" * 100, None, max_body=10).problem.detail == \
        "request body over 10 bytes, not read"
    ok = read_request(gzip.compress(b'{"model":"m","messages":[{"role":"user"}]}'), "gzip")
    assert (ok.model, ok.chat_round, ok.problem) == ("m", 1, None)


def test_whole_response_decoding_is_bounded():
    bomb = zlib.compress(b"0" * (8 << 20))
    p = parse_body("chat_completions", bomb, "deflate", max_body=1 << 20)
    assert [pr.kind for pr in p.problems] == ["decoded_too_large"]


@pytest.mark.parametrize("coding,data", [
    ("gzip", gzip.compress(b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n' * 50)[:-12]),
])
def test_truncated_compressed_stream_is_marked(coding, data):
    obs = StreamObserver(by_api("chat_completions"), SSEFramer(), coding, 0.0)
    obs.feed(data, 0.1)
    assert "decompression" in [pr.kind for pr in obs.finish(complete=True).problems]


def test_garbage_status_line_is_a_protocol_error_not_unreachable():
    assert classify_failure("Cannot parse HTTP response: Bad HTTP response line: b'xx'", False) \
        == "upstream_protocol_error"
    assert classify_failure("unexpected server response: b'garbage'", False) == \
        "upstream_protocol_error"
    assert classify_failure("[Errno 111] Connect call failed ('127.0.0.1', 1)", False) == \
        "upstream_unreachable"
    assert classify_failure("HTTP/1 protocol error: peer closed connection", True) == \
        "upstream_aborted"


def test_redaction_of_every_route_and_key_shapes():
    key, goog, cookie, q = "sk-live-1234567890abcdefXYZ", "AIzaSyA1234567890abcdefghijklmnopqrstu", \
        "sessiontoken-abcdef123456", "querykey-0987654321zyx"
    secrets = redact.secrets_of([("Authorization", f"Bearer {key}"), ("x-goog-api-key", goog),
                                 ("Cookie", f"sid={cookie}; theme=dark"), ("x-other", "visible")],
                                f"alt=sse&key={q}")
    r = redact.Redactor(secrets)
    text = f"bad key {key}, {goog}, {cookie}, {q}; theme=dark visible"
    out = r(text)
    for s in (key, goog, cookie, q):
        assert s not in out
    assert "visible" in out and "theme=dark" in out
    # Shapes the request did not carry are caught too.
    assert redact.shapes("Incorrect API key provided: sk-proj-abcdefghijklmnop1234") == \
        "Incorrect API key provided: [REDACTED]"
    from aistats_engine.outputs.bus import first_values
    assert first_values(((b"X-Api-Key", b"k"), (b"Accept", b"a"), (b"x-api-key", b"2")), lower=False,
                        redacted=True) == [("X-Api-Key", "[REDACTED]"), ("Accept", "a")]
    assert redact.query("alt=sse&key=abc&x=1") == "alt=sse&key=[REDACTED]&x=1"


def test_record_redaction_reaches_every_text_field_through_the_joined_search():
    """``Redactor.record`` searches the text fields together first; a secret or key shape in any
    one field, at its very start or end, must still be replaced in that field alone."""
    from aistats_engine.record.record import Record

    key, shape = "sk-own-request-key-123456", "AIzaSyB1234567890abcdefghijklmnopqrstu"
    red = redact.Redactor((key,))
    for name in redact._TEXT_FIELDS:
        for value in (key, f"x {key}", shape, f"{shape} y", f"Bearer {key[3:]}"):
            rec = Record(id=1, flow_id="f", start_time="s", end_time="e", method="POST",
                         scheme="https", host="h", port=443, path="/v1/chat/completions",
                         model="gpt-4o")
            setattr(rec, name, value)
            red.record(rec)
            assert getattr(rec, name) == red(value) != value, (name, value)
            if name != "model":
                assert rec.model == "gpt-4o"  # the other fields are left as they were
    clean = Record(id=1, flow_id="f", start_time="s", end_time="e", method="POST",
                   scheme="https", host="h", port=443, path="/v1/x", error="plain words",
                   user_agent="sdk/1.0")
    red.record(clean)
    assert (clean.path, clean.error, clean.user_agent) == ("/v1/x", "plain words", "sdk/1.0")


def test_key_shapes_pattern_equals_its_plain_form():
    """The shapes pattern starts with a lookahead on the first letters (speed); it must
    replace exactly what the plain alternation replaces."""
    import random
    import re

    plain = re.compile(
        r"\bsk-[A-Za-z0-9_\-]{16,}|\bAIza[0-9A-Za-z_\-]{30,}|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"
        r"|\bgsk_[A-Za-z0-9]{20,}|\bxai-[A-Za-z0-9]{20,}|\bhf_[A-Za-z0-9]{20,}"
        r"|\bgh[pousr]_[A-Za-z0-9]{30,}|\b[Bb]earer\s+[A-Za-z0-9._~+/\-]{12,}=*")
    rng = random.Random(3)
    pieces = ["sk-", "AIza", "AKIA", "ASIA", "gsk_", "xai-", "hf_", "ghp_", "gho_", "Bearer ",
              "bearer  ", "x", "_", "-", " ", "=", "/", "é", "0123456789ABCDEF", "abcdefghij"]
    for _ in range(20000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 14)))
        assert redact.shapes(text) == plain.sub(redact.REDACTED, text), text
