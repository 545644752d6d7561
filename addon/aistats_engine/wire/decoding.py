"""Incremental Content-Encoding decoders (gzip, deflate — zlib or raw —, br, zstd).

Streamed bodies reach the addon as the raw encoded bytes (mitmproxy does not decode them), so
each chunk is decoded as it arrives. The same decoder decodes a whole stored body in one call,
which keeps live parsing and offline replay on one code path.

A few kilobytes of compressed input can expand to gigabytes, so a decoder takes one bound,
``max_output``, on its total decoded size and raises ``DecodedTooLarge`` once it would pass
it. Decoding goes in bounded steps, so little more than the bound is ever held in memory:

- gzip, deflate: exact, in steps of ``_STEP`` (zlib's ``max_length``);
- br, brotli >= 1.2: the bound plus under ``2 × _STEP`` (``output_buffer_limit`` stops the
  output buffer growing, in blocks). Older brotli cannot limit its output: the input goes in
  a byte at a time, and one byte can complete a whole meta-block, so the bound plus 16 MiB;
- zstd: the API has no output limit, so the input goes in slices sized from the bound: a
  zstd block decodes to at most 128 KiB and takes at least 4 bytes, so a slice of ``n`` bytes
  decodes to at most ``(n / 4 + 1) × 128 KiB``: the bound plus a quarter of it plus 640 KiB.

``finish()`` at the end of the body reports a compressed stream cut short, which would
otherwise read as a short but valid body.
"""

from __future__ import annotations

import zlib
from typing import Protocol

import brotli
import zstandard


class DecodeError(Exception):
    """The body does not match its Content-Encoding."""


class DecodedTooLarge(DecodeError):
    """The decoded body would pass ``max_output``: a decompression bomb, or just too big."""


class Decoder(Protocol):
    def feed(self, data: bytes) -> bytes:
        """The decoded bytes of the next piece of the body. Raises DecodeError; the decoder
        is not usable after that."""
        ...

    def finish(self) -> None:
        """At the end of the body: raises DecodeError if the encoded stream stopped early."""
        ...


def _too_large(limit: int | None) -> DecodedTooLarge:
    return DecodedTooLarge(f"decoded body over {limit} bytes")


_STEP = 256 << 10  # decoded bytes asked for per call when bounded (gzip, deflate, br)
_GZIP_WBITS = 16 + zlib.MAX_WBITS


class _Zlib:
    """gzip (restarting on concatenated members) and HTTP ``deflate``: zlib-wrapped (RFC 1950)
    per the spec, raw (RFC 1951) in practice too. Bytes after a deflate stream are ignored."""

    __slots__ = ("_name", "_d", "_head", "_limit", "_room")

    def __init__(self, name: str, max_output: int | None) -> None:
        self._name = name
        self._d: zlib._Decompress | None = None  # None until the first bytes arrive
        self._head = b""  # deflate: bytes kept until the 2-byte header tells zlib from raw
        self._limit = max_output
        self._room = max_output  # decoded bytes still allowed

    def _start(self, data: bytes) -> tuple[zlib._Decompress | None, bytes]:
        """A decompressor for a new stream beginning with ``data`` (deflate may need more)."""
        if self._name == "gzip":
            d = self._d = zlib.decompressobj(_GZIP_WBITS)
            return d, data
        data = self._head + data
        if len(data) < 2:
            self._head = data
            return None, b""
        cmf, flg = data[0], data[1]
        wrapped = (cmf & 0x0F) == 8 and (cmf << 8 | flg) % 31 == 0
        d = self._d = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
        self._head = b""
        return d, data

    def feed(self, data: bytes) -> bytes:
        d = self._d
        room = self._room
        try:
            if d is None or d.eof:
                if not data or (d is not None and self._name != "gzip"):
                    return b""  # nothing yet, or bytes after the end of a deflate stream
                d, data = self._start(data)
                if d is None:
                    return b""
            if room is None:
                out = d.decompress(data)
                if d.eof and d.unused_data:
                    out += self._members(d.unused_data)
                return out
            want = room + 1 if room < _STEP else _STEP
            out = d.decompress(data, want)
            if len(out) < want and not d.eof:  # the usual case: all taken, nothing pending
                self._room = room - len(out)
                return out
            return self._bounded(d, out, want)
        except zlib.error as e:
            raise DecodeError(f"{self._name}: {e}") from None

    def _members(self, data: bytes) -> bytes:
        """Unbounded: the gzip members that follow in ``data``."""
        out = []
        while data and self._name == "gzip":
            d = self._start(data)[0]
            assert d is not None
            out.append(d.decompress(data))
            if not d.eof:
                break
            data = d.unused_data
        return b"".join(out)

    def _bounded(self, d: zlib._Decompress, piece: bytes, want: int) -> bytes:
        """Go on from ``piece`` (``d.decompress(data, want)``) in steps of at most ``_STEP``,
        never asking more than one byte past the room left: that byte proves it too big."""
        room = self._room
        assert room is not None
        out = []
        while True:
            room -= len(piece)
            if room < 0:
                raise _too_large(self._limit)
            out.append(piece)
            if d.eof:
                data = d.unused_data
                if not data or self._name != "gzip":
                    break
                d = self._start(data)[0]
                assert d is not None
            elif len(piece) < want:
                break  # all input taken, nothing pending
            else:  # more may be pending even when all the input was taken
                data = d.unconsumed_tail
            want = min(room + 1, _STEP)
            piece = d.decompress(data, want)
        self._room = room
        return b"".join(out)

    def finish(self) -> None:
        if self._head or (self._d is not None and not self._d.eof):
            raise DecodeError(f"{self._name}: truncated stream")


def _brotli_limits_output() -> bool:
    try:
        brotli.Decompressor().process(b"", 1)  # output_buffer_limit, brotli >= 1.2
    except TypeError:
        return False
    return True


_BR_LIMITS_OUTPUT = _brotli_limits_output()


class _Brotli:
    __slots__ = ("_d", "_fed", "_limit", "_room")

    def __init__(self, max_output: int | None) -> None:
        self._d = brotli.Decompressor()
        self._fed = False
        self._limit = max_output
        self._room = max_output

    def feed(self, data: bytes) -> bytes:
        if data:
            self._fed = True
        room = self._room
        try:
            if room is None:
                return self._d.process(data)
            if not _BR_LIMITS_OUTPUT:
                return self._bytewise(data)
            want = room + 1 if room < _STEP else _STEP
            out = self._d.process(data, want)
            if len(out) < want:  # the usual case: all taken, nothing pending
                self._room = room - len(out)
                return out
            return self._drain(out, want)
        except brotli.error as e:
            raise DecodeError(f"br: {e}") from None

    def _drain(self, piece: bytes, want: int) -> bytes:
        """The output filled the buffer: more may be pending (with or without input left, which
        ``can_accept_more_data`` alone would miss), so ask again with no input until less comes."""
        room = self._room
        assert room is not None
        out = []
        while True:
            room -= len(piece)
            if room < 0:
                raise _too_large(self._limit)
            out.append(piece)
            if len(piece) < want:
                break
            want = min(room + 1, _STEP)
            piece = self._d.process(b"", want)
        self._room = room
        return b"".join(out)

    def _bytewise(self, data: bytes) -> bytes:
        """brotli < 1.2 cannot limit its output: feed a byte at a time, the smallest step."""
        process = self._d.process
        room = self._room
        assert room is not None
        out = []
        for i in range(len(data)):
            piece = process(data[i : i + 1])
            room -= len(piece)
            if room < 0:
                raise _too_large(self._limit)
            out.append(piece)
        self._room = room
        return b"".join(out)

    def finish(self) -> None:
        if self._fed and not self._d.is_finished():
            raise DecodeError("br: truncated stream")


_ZSTD_MIN_SLICE = 16  # input bytes per step at least, when bounded: 5 blocks, 640 KiB


class _Zstd:
    """zstd, frame after frame: one decompressobj per frame, whose ``eof`` says the frame is
    complete (with ``read_across_frames=True`` it never does)."""

    __slots__ = ("_dctx", "_d", "_limit", "_room", "_slice")

    def __init__(self, max_output: int | None) -> None:
        self._dctx = zstandard.ZstdDecompressor()
        self._d: zstandard.ZstdDecompressionObj | None = None  # None between frames
        self._limit = max_output
        self._room = max_output
        # Input bytes per step: even the worst case (4 bytes → a 128 KiB block) decodes to at
        # most a quarter of the bound, plus 640 KiB.
        self._slice = max(_ZSTD_MIN_SLICE, (max_output or 0) >> 17)

    def feed(self, data: bytes) -> bytes:
        room = self._room
        try:
            if room is not None and len(data) > self._slice:
                return self._sliced(data)
            d = self._d
            if d is None:
                out = self._frames(data)
            else:  # the usual case, inside a frame: _decode inlined, this runs per chunk
                out = d.decompress(data)
                if d.eof:
                    self._d = None
                    if d.unused_data:
                        out += self._frames(d.unused_data)
        except zstandard.ZstdError as e:
            raise DecodeError(f"zstd: {e}") from None
        if room is not None:
            room -= len(out)
            if room < 0:
                raise _too_large(self._limit)
            self._room = room
        return out

    def _decode(self, data: bytes) -> bytes:
        d = self._d
        if d is None:
            return self._frames(data)
        out = d.decompress(data)  # the usual case: inside a frame
        if d.eof:
            self._d = None
            if d.unused_data:
                out += self._frames(d.unused_data)
        return out

    def _frames(self, data: bytes) -> bytes:
        """``data`` from the start of a frame on."""
        out = []
        while data:
            d = self._d = self._dctx.decompressobj()
            out.append(d.decompress(data))
            if not d.eof:
                break
            self._d = None
            data = d.unused_data
        return b"".join(out)

    def _sliced(self, data: bytes) -> bytes:
        room = self._room
        assert room is not None
        out = []
        step = self._slice
        for i in range(0, len(data), step):
            piece = self._decode(data[i : i + step])
            room -= len(piece)
            if room < 0:
                raise _too_large(self._limit)
            out.append(piece)
        self._room = room
        return b"".join(out)

    def finish(self) -> None:
        if self._d is not None:
            raise DecodeError("zstd: truncated stream")


def _make(coding: str, max_output: int | None) -> Decoder:
    if coding in ("gzip", "x-gzip"):
        return _Zlib("gzip", max_output)
    if coding == "deflate":
        return _Zlib("deflate", max_output)
    if coding == "br":
        return _Brotli(max_output)
    if coding == "zstd":
        return _Zstd(max_output)
    raise DecodeError(f"unsupported Content-Encoding {coding!r}")


def _inner_limit(max_output: int) -> int:
    """An inner stage's output is the next stage's compressed input, which for incompressible
    data is a little larger than what it decodes to (stored blocks): allow for that."""
    return max_output + (max_output >> 10) + 1024


class _Chain:
    """``Content-Encoding: gzip, br`` means gzip was applied first: decode in reverse order."""

    __slots__ = ("_decoders", "_limit")

    def __init__(self, decoders: list[Decoder], max_output: int | None) -> None:
        self._decoders = decoders
        self._limit = max_output

    def feed(self, data: bytes) -> bytes:
        try:
            for d in self._decoders:
                data = d.feed(data)
        except DecodedTooLarge:
            raise _too_large(self._limit) from None  # an inner stage's bound is looser
        return data

    def finish(self) -> None:
        for d in self._decoders:
            d.finish()


def decoder_for(content_encoding: str | None, max_output: int | None = None) -> Decoder | None:
    """A fresh decoder, None for identity; raises DecodeError for an unknown coding.

    ``feed`` raises DecodedTooLarge once the decoded total would pass ``max_output`` (None:
    no bound, for trusted input only)."""
    if not content_encoding:
        return None
    codings = [c.strip().lower() for c in content_encoding.split(",") if c.strip()]
    codings = [c for c in codings if c != "identity"]
    if not codings:
        return None
    if max_output is not None and max_output < 0:
        raise ValueError(f"max_output must be >= 0, not {max_output}")
    if len(codings) == 1:
        return _make(codings[0], max_output)
    inner = None if max_output is None else _inner_limit(max_output)
    order = codings[::-1]  # the last coding applied is decoded first
    decoders = [_make(c, inner) for c in order[:-1]] + [_make(order[-1], max_output)]
    return _Chain(decoders, max_output)


def decode_body(data: bytes, content_encoding: str | None, max_output: int | None = None) -> bytes:
    """Decode a whole body. Raises DecodeError, also for a truncated body, and DecodedTooLarge
    past ``max_output`` (an identity body is returned as it is: nothing to expand)."""
    d = decoder_for(content_encoding, max_output)
    if d is None:
        return data
    out = d.feed(data)
    d.finish()
    return out
