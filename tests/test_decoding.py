"""Content-Encoding decoders: any chunking gives the same bytes, the decoded size is bounded
(in memory too), and a stream cut short is reported."""

from __future__ import annotations

import random
import tracemalloc
import zlib

import brotli
import pytest
import zstandard

from aistats_engine.wire import decoding
from aistats_engine.wire.decoding import DecodedTooLarge, DecodeError, decode_body, decoder_for


def gzip(data: bytes, level: int = 6) -> bytes:
    c = zlib.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


def deflate_raw(data: bytes, level: int = 6) -> bytes:
    c = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


def br(data: bytes) -> bytes:
    return brotli.compress(data, quality=5)


def zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=19).compress(data)


# Content-Encoding → encoder. "gzip, br": gzip applied first, then br.
CODINGS = {
    "gzip": gzip,
    "deflate": lambda d: zlib.compress(d, 6),  # zlib-wrapped, as RFC 9110 says
    "deflate-raw": deflate_raw,  # what many servers send as "deflate"
    "br": br,
    "zstd": zstd,
    "gzip, br": lambda d: br(gzip(d)),
    "zstd, gzip": lambda d: gzip(zstd(d)),
}


def header(name: str) -> str:
    return "deflate" if name == "deflate-raw" else name


def text(n: int, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    words = [b"data:", b'{"delta":', b'"hello"', b"}", b"\n\n", b"tokens", b"usage", b" "]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words)
        if rng.random() < 0.05:
            out += rng.randbytes(8)
    return bytes(out[:n])


def feed_chunks(d, enc: bytes, cuts: list[int]) -> bytes:
    bounds = [0, *cuts, len(enc)]
    return b"".join(d.feed(enc[a:b]) for a, b in zip(bounds, bounds[1:]))


RAW = text(20_000)


@pytest.mark.parametrize("max_output", [None, 1 << 20, len(RAW)])
@pytest.mark.parametrize("name", list(CODINGS))
def test_round_trip_in_any_chunking(name, max_output):
    enc = CODINGS[name](RAW)
    rng = random.Random(5)
    chunkings = [[], list(range(1, len(enc)))]  # whole, byte by byte
    chunkings += [sorted(rng.sample(range(1, len(enc)), k=min(k, len(enc) - 1)))
                  for k in (1, 3, 20, 200) for _ in range(5)]
    for cuts in chunkings:
        d = decoder_for(header(name), max_output)
        assert feed_chunks(d, enc, cuts) == RAW
        d.finish()
    assert decode_body(enc, header(name), max_output) == RAW


@pytest.mark.parametrize("step", [1000, None])
@pytest.mark.parametrize("name", list(CODINGS))
def test_output_that_fills_a_step_is_not_held_back(name, step, monkeypatch):
    """zlib and brotli can stop on a full output buffer with every input byte taken and more
    output pending: it must come out with this chunk, not the next one (or never)."""
    if step:
        monkeypatch.setattr(decoding, "_STEP", step)  # many step boundaries to land on
    raw = bytes(3 * decoding._STEP + 123) + RAW[:500] + bytes(decoding._STEP)
    enc = CODINGS[name](raw)
    for cut in range(1, len(enc), 1 if step else 7):
        d = decoder_for(header(name), 16 << 20)
        first = d.feed(enc[:cut])
        assert first == decoder_for(header(name)).feed(enc[:cut]), f"cut at {cut}"
        assert first + d.feed(enc[cut:]) == raw, f"cut at {cut}"
        d.finish()


@pytest.mark.parametrize("name", list(CODINGS))
def test_bound_is_exact(name):
    enc = CODINGS[name](RAW)
    assert decode_body(enc, header(name), len(RAW)) == RAW
    for cuts in ([], list(range(7, len(enc), 7))):
        d = decoder_for(header(name), len(RAW) - 1)
        with pytest.raises(DecodedTooLarge, match=f"decoded body over {len(RAW) - 1} bytes"):
            feed_chunks(d, enc, cuts)


BOMB = 64 << 20  # zeros, compressed to a few kilobytes or less
LIMIT = 16 << 20


@pytest.fixture(scope="module")
def bombs():
    zeros = bytes(BOMB)
    out = {
        "gzip": gzip(zeros, 9),
        "deflate": zlib.compress(zeros, 9),
        "deflate-raw": deflate_raw(zeros, 9),
        "br": br(zeros),
        "zstd": zstd(zeros),  # 4 input bytes per 128 KiB block: zstd's worst ratio
        "gzip, br": br(gzip(zeros, 9)),  # the inner stage is the bomb
        "zstd, gzip": gzip(zstd(zeros)),
    }
    out["gzip, br (outer bomb)"] = br(gzip(zeros, 0))  # the outer stage expands: stored gzip
    return out


def _traced_peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


BOMBS = ["gzip", "deflate", "deflate-raw", "br", "zstd", "gzip, br", "zstd, gzip",
         "gzip, br (outer bomb)"]


# br_limits_output=False: brotli < 1.2, without output_buffer_limit, the byte-at-a-time path.
@pytest.mark.parametrize(("name", "br_limits_output"),
                         [(n, True) for n in BOMBS] + [(n, False) for n in BOMBS if "br" in n])
def test_bomb_stops_at_the_bound_without_holding_much_more(name, br_limits_output, bombs,
                                                           monkeypatch):
    """Memory, not time: the traced peak stays near the bound whatever the expansion (before
    the bound existed, the gzip one peaked at 141 MiB for its 64 MiB)."""
    monkeypatch.setattr(decoding, "_BR_LIMITS_OUTPUT", br_limits_output and decoding._BR_LIMITS_OUTPUT)
    enc = bombs[name]
    coding = header(name.split(" (")[0])

    def whole():
        with pytest.raises(DecodedTooLarge, match=f"decoded body over {LIMIT} bytes"):
            decode_body(enc, coding, LIMIT)

    def chunked():
        d = decoder_for(coding, LIMIT)
        with pytest.raises(DecodedTooLarge):
            for i in range(0, len(enc), 1000):
                d.feed(enc[i:i + 1000])

    for run in (whole, chunked):
        peak = _traced_peak(run)
        assert peak < 2 * LIMIT, f"{run.__name__}: traced peak {peak / 2**20:.1f} MiB"


@pytest.mark.parametrize("name", list(CODINGS))
def test_truncated_stream_is_reported_by_finish(name):
    raw = RAW[:3000]
    enc = CODINGS[name](raw)
    for cut in range(1, len(enc)):
        d = decoder_for(header(name), 1 << 20)
        try:
            d.feed(enc[:cut])
            d.finish()
        except DecodeError as e:
            assert not isinstance(e, DecodedTooLarge)
        else:
            pytest.fail(f"{name} cut at {cut}/{len(enc)} not reported")
        with pytest.raises(DecodeError):
            decode_body(enc[:cut], header(name))
    d = decoder_for(header(name))
    d.feed(enc)
    d.finish()  # complete: no error


@pytest.mark.parametrize("name", list(CODINGS))
def test_empty_body_is_not_truncated(name):
    d = decoder_for(header(name), 100)
    d.finish()
    d = decoder_for(header(name), 100)
    assert d.feed(b"") == b""
    d.finish()


def test_truncation_messages_name_the_coding():
    for name in ("gzip", "deflate", "br", "zstd"):
        enc = CODINGS[name](RAW)
        with pytest.raises(DecodeError, match=f"^{name}: truncated stream$"):
            decode_body(enc[:-1], name)


def test_identity_never_raises():
    assert decoder_for(None) is None and decoder_for("") is None
    assert decoder_for("identity") is None and decoder_for(" Identity , identity") is None
    assert decode_body(b"x" * 100, None, max_output=10) == b"x" * 100
    assert decode_body(b"\x1f\x8b", "identity", max_output=0) == b"\x1f\x8b"


def test_unknown_coding_and_bad_bound():
    for ce in ("lzma", "gzip, compress", "br;q=1"):
        with pytest.raises(DecodeError, match="unsupported Content-Encoding"):
            decoder_for(ce)
    with pytest.raises(ValueError):
        decoder_for("gzip", -1)
    assert issubclass(DecodedTooLarge, DecodeError)


def test_corrupt_input_raises_decode_error():
    for name in ("gzip", "deflate", "br", "zstd"):
        enc = bytearray(CODINGS[name](RAW))
        enc[len(enc) // 2] ^= 0xFF
        enc[len(enc) // 2 + 1] ^= 0xFF
        with pytest.raises(DecodeError):
            decode_body(bytes(enc), name)
    with pytest.raises(DecodeError):
        decode_body(gzip(RAW) + b"garbage", "gzip")


def test_multi_member_gzip_and_multi_frame_zstd_decode_fully():
    a, b, c = RAW[:5000], RAW[5000:12000], RAW[12000:]
    skippable = b"\x50\x2a\x4d\x18" + (3).to_bytes(4, "little") + b"xyz"
    bodies = {"gzip": gzip(a) + gzip(b) + gzip(c),
              "zstd": zstd(a) + skippable + zstd(b) + zstd(c)}
    rng = random.Random(3)
    for name, enc in bodies.items():
        for max_output in (None, len(RAW)):
            assert decode_body(enc, name, max_output) == RAW
            for _ in range(20):
                cuts = sorted(rng.sample(range(1, len(enc)), k=10))
                d = decoder_for(name, max_output)
                assert feed_chunks(d, enc, cuts) == RAW
                d.finish()
        with pytest.raises(DecodedTooLarge):
            decode_body(enc, name, len(RAW) - 1)  # the bound spans members / frames
        with pytest.raises(DecodeError, match="truncated"):
            decode_body(enc[:-3], name)  # the last member / frame cut short


def test_deflate_ignores_bytes_after_its_stream():
    assert decode_body(zlib.compress(RAW) + b"junk", "deflate") == RAW
