"""Incremental Content-Encoding decoders (gzip, deflate — zlib or raw —, br, zstd).

Streamed bodies reach the addon as the raw encoded bytes (mitmproxy does not decode them), so
each chunk is decoded as it arrives. The same decoder decodes a whole stored body in one call,
which keeps live parsing and offline replay on one code path.
"""

from __future__ import annotations

import zlib
from typing import Protocol

import brotli
import zstandard


class DecodeError(Exception):
    """The body does not match its Content-Encoding."""


class Decoder(Protocol):
    def feed(self, data: bytes) -> bytes: ...


class _Identity:
    def feed(self, data: bytes) -> bytes:
        return data


class _Gzip:
    """gzip, restarting on concatenated members."""

    def __init__(self) -> None:
        self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)

    def feed(self, data: bytes) -> bytes:
        out = []
        try:
            while data:
                out.append(self._d.decompress(data))
                if not self._d.eof:
                    break
                data = self._d.unused_data
                self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        except zlib.error as e:
            raise DecodeError(f"gzip: {e}") from None
        return b"".join(out)


class _Deflate:
    """HTTP ``deflate``: zlib-wrapped (RFC 1950) per the spec, raw (RFC 1951) in practice too."""

    def __init__(self) -> None:
        self._d: zlib._Decompress | None = None
        self._head = b""

    def feed(self, data: bytes) -> bytes:
        if self._d is None:
            self._head += data
            if len(self._head) < 2:
                return b""
            cmf, flg = self._head[0], self._head[1]
            wrapped = (cmf & 0x0F) == 8 and (cmf << 8 | flg) % 31 == 0
            self._d = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
            data, self._head = self._head, b""
        try:
            return self._d.decompress(data)
        except zlib.error as e:
            raise DecodeError(f"deflate: {e}") from None


class _Brotli:
    def __init__(self) -> None:
        self._d = brotli.Decompressor()

    def feed(self, data: bytes) -> bytes:
        try:
            return self._d.process(data)
        except brotli.error as e:
            raise DecodeError(f"br: {e}") from None


class _Zstd:
    def __init__(self) -> None:
        self._d = zstandard.ZstdDecompressor().decompressobj(read_across_frames=True)

    def feed(self, data: bytes) -> bytes:
        try:
            return self._d.decompress(data)
        except zstandard.ZstdError as e:
            raise DecodeError(f"zstd: {e}") from None


_DECODERS: dict[str, type] = {
    "identity": _Identity,
    "gzip": _Gzip,
    "x-gzip": _Gzip,
    "deflate": _Deflate,
    "br": _Brotli,
    "zstd": _Zstd,
}


class _Chain:
    """``Content-Encoding: gzip, br`` means gzip was applied first: decode in reverse order."""

    def __init__(self, decoders: list[Decoder]) -> None:
        self._decoders = decoders

    def feed(self, data: bytes) -> bytes:
        for d in self._decoders:
            data = d.feed(data)
        return data


def decoder_for(content_encoding: str | None) -> Decoder | None:
    """A fresh decoder, None for identity; raises DecodeError for an unknown coding."""
    if not content_encoding:
        return None
    codings = [c.strip().lower() for c in content_encoding.split(",") if c.strip()]
    codings = [c for c in codings if c != "identity"]
    if not codings:
        return None
    for c in codings:
        if c not in _DECODERS:
            raise DecodeError(f"unsupported Content-Encoding {c!r}")
    decoders = [_DECODERS[c]() for c in reversed(codings)]
    return decoders[0] if len(decoders) == 1 else _Chain(decoders)


def decode_body(data: bytes, content_encoding: str | None) -> bytes:
    """Decode a whole body; raises DecodeError."""
    d = decoder_for(content_encoding)
    return d.feed(data) if d is not None else data
