"""Captures: what a request and its response carried, kept (compressed, byte-bounded) for the UI.

A capture is one JSON object per record id (``build_capture``)::

    {"id", "req_path", "method", "status", "resp_content_type",
     "req_headers", "req_body", "req_body_base64",
     "resp_headers", "resp_body", "resp_body_base64", "omitted"}

* Headers: a ``{name: value}`` map, the first value per name under the spelling of its first
  occurrence; credential headers (``redact.SECRET_HEADERS``) read ``[REDACTED]``.
  ``Content-Encoding`` is left out of the response headers, because the stored body is the
  decoded one (and out of the request headers when a decoded request body is stored).
* Bodies: decoded (at most ``max_body`` bytes); stored as text in ``*_body`` when valid UTF-8,
  else base64 in ``*_body_base64`` (the other key is then None). A request body that does not
  match its Content-Encoding is kept as it was sent (base64, header kept); one over ``max_body``
  is left out and named in ``omitted``.
* Secrets: every secret value the request carried (credential headers, ``key=``-style query
  parameters; ``redact.secrets_of``), plus response cookies, is replaced wherever it appears in
  the stored headers, path and bodies, so a key an upstream echoes in an error body never shows;
  headers also lose well-known key shapes (``redact.Redactor``); bodies are not scanned for
  shapes (a prompt's own text stays as sent, and the scan would cost more than the rest of the
  capture). Otherwise bodies stay as sent.
* Parts outside the mask (``mask_for``: the configured parts, narrowed per path so big binary
  payloads stay out of memory) are None. A capture is stored even when the mask is empty.
* When (llama-swap's rules): a 2xx with a non-empty body that decodes is captured whole, invalid
  JSON included; a non-2xx, or a request that failed (no response, or the flow ended with a
  transport error), keeps the request and the response headers only; an empty 2xx body, one
  that cannot be decoded, or one the proxy did not keep (a stream over ``aistats_max_body``)
  gives no capture (None).

``CaptureCache`` keeps captures zstd-compressed (``compress``: a JSON head and the raw text
bodies), bounded by total compressed bytes, evicting the oldest inserted first; see its
docstring.
"""

from __future__ import annotations

import base64
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import orjson
import zstandard

from ..record import redact
from ..record.record import Record
from ..wire.decoding import DecodedTooLarge, DecodeError
from .bus import Finished

log = logging.getLogger(__name__)

CAPTURE_PARTS = ("req_headers", "req_body", "resp_headers", "resp_body")
ALL_PARTS = frozenset(CAPTURE_PARTS)

_REQ_AND_RESP_HEADERS = frozenset({"req_headers", "req_body", "resp_headers"})
_NO_UPLOAD = frozenset({"req_headers", "resp_headers", "resp_body"})
_HEADERS_ONLY = frozenset({"req_headers", "resp_headers"})

# Path suffix → the parts kept (llama-swap's captureFieldsByPath). Matched on the end of the
# path, so ``/upstream/<model>/v1/audio/speech`` and prefixed gateways match too.
PATH_MASKS: tuple[tuple[str, frozenset[str]], ...] = (
    ("/v1/audio/speech", _REQ_AND_RESP_HEADERS),  # audio out
    ("/v1/images/generations", _REQ_AND_RESP_HEADERS),  # images out
    ("/sdapi/v1/txt2img", _REQ_AND_RESP_HEADERS),
    ("/v1/audio/voices", _NO_UPLOAD),
    ("/v1/audio/transcriptions", _NO_UPLOAD),  # audio in
    ("/v1/audio/translations", _NO_UPLOAD),
    ("/v1/images/edits", _HEADERS_ONLY),  # images in and out
    ("/sdapi/v1/img2img", _HEADERS_ONLY),
)

# Record error types that mean the exchange itself failed (record/builder.classify_failure).
FAILURE_TYPES = frozenset({"client_disconnected", "timeout", "upstream_aborted",
                           "upstream_protocol_error", "upstream_unreachable"})

ZSTD_LEVEL = 1  # LLM bodies come out about as small as at level 3 (often smaller), in 0.85x the time


def mask_for(path: str, default_parts: Iterable[str]) -> frozenset[str]:
    """The parts to capture for ``path``: ``default_parts`` (the configured mask), narrowed by
    the per-path table for endpoints that carry big binary payloads."""
    parts = frozenset(default_parts) & ALL_PARTS
    p = path.partition("?")[0].rstrip("/")
    for suffix, allowed in PATH_MASKS:
        if p.endswith(suffix):
            return parts & allowed
    return parts


def _text_or_b64(body: bytes, secrets: tuple[bytes, ...]) -> tuple[bytes | None, str | None]:
    """(UTF-8 text, None) or (None, base64), the request's secrets replaced. The text stays
    bytes until it is read back: replacing a secret's UTF-8 bytes in valid UTF-8 is replacing
    the secret in the text, and a blob holding the bytes raw needs no JSON escaping."""
    body = _scrub(body, secrets)
    if not body.isascii():
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            return None, base64.b64encode(body).decode("ascii")
    return body, None


def _header_map(pairs: list[tuple[str, str]], red: redact.Redactor,
                drop: frozenset[str] = frozenset()) -> dict[str, str]:
    kept = [(k, v) for k, v in pairs if k.lower() not in drop] if drop else pairs
    return dict(zip([k for k, _ in kept], red.many([v for _, v in kept])))


_SET_COOKIE = frozenset({b"set-cookie"})  # a response's own secrets


def build_capture(event: Finished, parts: frozenset[str], max_body: int) -> dict[str, Any] | None:
    """The capture of one finished request, or None when there is none to keep (module doc)."""
    cap = _capture(event, parts, max_body)
    if cap is not None:
        for key in _TEXT_BODIES:
            if cap[key] is not None:
                cap[key] = cap[key].decode("utf-8")
    return cap


def capture_blob(event: Finished, parts: frozenset[str], max_body: int) -> bytes | None:
    """``compress(build_capture(...))``, without turning the bodies into text and back.
    CPU work proportional to the bodies: call it off the event loop."""
    cap = _capture(event, parts, max_body)
    return None if cap is None else compress(cap)


def _whole_exchange(rec: Record) -> bool:
    """A 2xx that did not fail: captured with its response body (the module doc's "when")."""
    status = rec.status
    return status is not None and 200 <= status < 300 and rec.error_type not in FAILURE_TYPES


def capture_exists(event: Finished, parts: frozenset[str], max_body: int) -> bool | None:
    """Whether ``build_capture`` gives a capture, told without building it; None when only
    decoding the response body could tell (an encoded body)."""
    if not _whole_exchange(event.record):
        return True
    raw = event.response_raw
    if not raw:
        return False
    if event.response_encoding:
        return None
    return "resp_body" not in parts or len(raw) <= max_body


def _capture(event: Finished, parts: frozenset[str], max_body: int) -> dict[str, Any] | None:
    """``build_capture`` with the text bodies still UTF-8 bytes."""
    rec = event.record
    status = rec.status
    resp_body: bytes | None = None
    if _whole_exchange(rec):
        if not event.response_raw:
            return None  # empty, or not kept by the proxy
        if "resp_body" in parts or event.response_encoding:
            try:
                resp_body = event.response_body(max_body)
            except DecodeError:  # DecodedTooLarge included
                return None
            if not resp_body:
                return None
        if "resp_body" not in parts:
            resp_body = None

    secret_pairs = (redact.credential_pairs(event.request_fields)
                    + redact.credential_pairs(event.response_fields, _SET_COOKIE))
    secrets = redact.secrets_of(secret_pairs, event.query)
    red = redact.Redactor(secrets)
    secret_bytes = tuple(s.encode("utf-8") for s in secrets)

    query = event.redacted_query()
    out: dict[str, Any] = {
        "id": rec.id,
        "req_path": red(rec.path + ("?" + query if query else "")),
        "method": rec.method,
        "status": status,
        "resp_content_type": rec.response_content_type,
        "req_headers": None,
        "req_body": None,
        "req_body_base64": None,
        "resp_headers": None,
        "resp_body": None,
        "resp_body_base64": None,
        "omitted": [],
    }
    req_decoded = False
    if "req_body" in parts and event.request_raw is not None:
        try:
            body = event.request_body(max_body)
            req_decoded = bool(event.request_encoding)
        except DecodedTooLarge as e:
            body = None
            out["omitted"].append(f"req_body: {e}")
        except DecodeError:
            body = event.request_raw  # as sent; its Content-Encoding header stays
            out["req_body_base64"] = base64.b64encode(_scrub(body, secret_bytes)).decode("ascii")
            out["omitted"].append("req_body: does not match its Content-Encoding; kept as sent")
            body = None
        if body is not None:
            out["req_body"], out["req_body_base64"] = _text_or_b64(body, secret_bytes)
    if "req_headers" in parts:
        drop = frozenset({"content-encoding"}) if req_decoded else frozenset()
        out["req_headers"] = _header_map(event.request_headers(lower=False), red, drop)
    if "resp_headers" in parts and (status is not None or event.response_fields):
        out["resp_headers"] = _header_map(event.response_headers(lower=False), red,
                                          frozenset({"content-encoding"}))
    if resp_body is not None:
        out["resp_body"], out["resp_body_base64"] = _text_or_b64(resp_body, secret_bytes)
    return out


def _scrub(body: bytes, secrets: tuple[bytes, ...]) -> bytes:
    for s in secrets:
        if s in body:
            body = body.replace(s, redact.REDACTED.encode())
    return body


_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    c = getattr(_local, "c", None)
    if c is None:
        c = _local.c = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "d", None)
    if d is None:
        d = _local.d = zstandard.ZstdDecompressor()
    return d


_TEXT_BODIES = ("req_body", "resp_body")
_BLOB_MAGIC = b"aistats-capture-2\n"  # then the JSON head's length (4 bytes), head, text bodies


def compress(capture: dict[str, Any]) -> bytes:
    """A capture as stored, zstd-compressed (thread-safe; one compressor per thread): a JSON
    head, then the text bodies as raw UTF-8 (their lengths in the head's ``_raw``), which
    spares escaping and validating them again."""
    head = dict(capture)
    raw: dict[str, int] = {}
    bodies = []
    for key in _TEXT_BODIES:
        body = head.get(key)
        if body is not None:
            body = body.encode("utf-8") if isinstance(body, str) else body
            head[key] = None
            raw[key] = len(body)
            bodies.append(body)
    head["_raw"] = raw
    text = orjson.dumps(head)
    blob = _compressor().compress(b"".join((_BLOB_MAGIC, len(text).to_bytes(4, "big"), text,
                                            *bodies)))
    # python-zstandard allocates its output for the worst case (about the input's size) and
    # keeps that allocation behind the shorter result: a copy holds only the compressed bytes,
    # which is what the cache's bound counts.
    return bytes(memoryview(blob))


def decompress(blob: bytes) -> dict[str, Any]:
    """The capture dict (text bodies as str); blobs kept by earlier versions (plain orjson)
    read as they were written."""
    data = _decompressor().decompress(blob)
    if not data.startswith(_BLOB_MAGIC):
        return orjson.loads(data)
    at = len(_BLOB_MAGIC)
    size = int.from_bytes(data[at:at + 4], "big")
    at += 4
    cap = orjson.loads(data[at:at + size])
    at += size
    for key, n in cap.pop("_raw").items():
        cap[key] = data[at:at + n].decode("utf-8")
        at += n
    return cap


# What a capture waiting to be built weighs beyond its bodies and headers: the record, its
# JSON, the objects holding them.
LATER_OVERHEAD = 4096


class _Later:
    """A capture not built yet: the finished request it comes from (its bodies held, not
    copied) and its mask. Building it later gives what building it now would: the inputs are
    immutable and the building is a pure function of them."""

    __slots__ = ("event", "parts", "max_body", "size")

    def __init__(self, event: Finished, parts: frozenset[str], max_body: int) -> None:
        self.event, self.parts, self.max_body = event, parts, max_body
        self.size = (event.body_bytes
                     + sum(len(k) + len(v) for fields in (event.request_fields,
                                                          event.response_fields)
                           for k, v in fields)
                     + LATER_OVERHEAD)

    def blob(self) -> bytes | None:
        return _built(capture_blob, self)

    def capture(self) -> dict[str, Any] | None:
        return _built(build_capture, self)


_bug_reported = False


def _built(build: Callable[[Finished, frozenset[str], int], Any], later: _Later) -> Any:
    """``build(event, parts, max_body)``; a bug in it means no capture (reported once)."""
    global _bug_reported
    try:
        return build(later.event, later.parts, later.max_body)
    except Exception:
        if not _bug_reported:
            _bug_reported = True
            log.exception("aistats: building the capture of record %s failed",
                          later.event.record.id)
        return None


def _weight(item: bytes | _Later) -> int:
    return item.size if isinstance(item, _Later) else len(item)


class CaptureCache:
    """Captures by record id, bounded by their total size.

    * ``max_bytes`` = 0 turns captures off: every put is refused (not counted).
    * A capture is kept compressed (``put_blob``), or its building waits (``put_later``) and it
      weighs the bodies it holds: most captures leave with their record (``discard_below``)
      without anyone reading them, and building one costs more than the rest of a record's
      work. One is built when read, and compressed in place, the oldest waiting first, when
      the cache goes over ``max_bytes``; only when none waits is the oldest item evicted.
    * An item larger than ``max_bytes`` (a waiting one: once compressed) is refused and counted
      in ``refused``; otherwise the oldest *inserted* items are evicted until it fits (counted in
      ``evicted``). Reads do not refresh an item (FIFO, not LRU). Re-putting an id replaces it
      and moves it to the end.
    * Thread-safe: reading runs outside the lock, on the caller's thread (the web API's);
      compressing a waiting capture runs under it, on the writer's.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"capture cache size must be >= 0, not {max_bytes}")
        self.max_bytes = max_bytes
        self.refused = 0
        self.evicted = 0
        self._items: OrderedDict[int, bytes | _Later] = OrderedDict()
        self._waiting: OrderedDict[int, None] = OrderedDict()  # ids of _Later items, oldest first
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @property
    def bytes(self) -> int:
        return self._bytes

    @property
    def count(self) -> int:
        return len(self._items)

    def put(self, id: int, capture: dict[str, Any]) -> bool:
        """Compress and keep ``capture`` under ``id``; False when refused."""
        if not self.max_bytes:
            return False
        return self.put_blob(id, compress(capture))[0]

    def put_blob(self, id: int, blob: bytes) -> tuple[bool, list[int]]:
        """Keep an already compressed capture. Returns (stored, ids no longer held because of
        this put: evicted ones, and ``id`` itself when it was held and the new item is refused)."""
        if not self.max_bytes:
            return False, []
        with self._lock:
            return self._put(id, blob)

    def put_later(self, id: int, event: Finished, parts: frozenset[str],
                  max_body: int) -> tuple[bool, list[int]]:
        """``put_blob`` of the capture of ``event``, built when it is read or must shrink. Only
        for an event ``capture_exists`` says has one (True, not None): ``has`` then tells."""
        if not self.max_bytes:
            return False, []
        later = _Later(event, parts, max_body)
        item = later if later.size <= self.max_bytes else later.blob()  # too big to wait
        with self._lock:
            if item is None:
                return False, self._remove(id)
            return self._put(id, item)

    def _put(self, id: int, item: bytes | _Later) -> tuple[bool, list[int]]:
        """(Under the lock.) A re-put id first leaves; a refused one stays gone."""
        was_held = self._remove(id)
        size = _weight(item)
        if size > self.max_bytes:
            self.refused += 1
            return False, was_held
        self._items[id] = item
        self._bytes += size
        if isinstance(item, _Later):
            self._waiting[id] = None
        return True, self._fit()

    def _fit(self) -> list[int]:
        """Compress waiting captures, then evict the oldest items, until the bound holds."""
        removed: list[int] = []
        items = self._items
        while self._bytes > self.max_bytes and self._waiting:
            cid, _ = self._waiting.popitem(last=False)
            later = items[cid]
            assert isinstance(later, _Later)
            blob = later.blob()
            self._bytes -= later.size
            if blob is None:
                del items[cid]
                removed.append(cid)
            else:
                items[cid] = blob
                self._bytes += len(blob)
        while self._bytes > self.max_bytes:
            gone, item = items.popitem(last=False)
            self._waiting.pop(gone, None)
            self._bytes -= _weight(item)
            self.evicted += 1
            removed.append(gone)
        return removed

    def _remove(self, id: int) -> list[int]:
        """Forget ``id`` (under the lock); [id] when it was held."""
        item = self._items.pop(id, None)
        if item is None:
            return []
        self._bytes -= _weight(item)
        self._waiting.pop(id, None)
        return [id]

    def get(self, id: int) -> dict[str, Any] | None:
        with self._lock:
            item = self._items.get(id)
        if item is None:
            return None
        return item.capture() if isinstance(item, _Later) else decompress(item)

    def get_blob(self, id: int) -> bytes | None:
        with self._lock:
            item = self._items.get(id)
        return item.blob() if isinstance(item, _Later) else item

    def has(self, id: int) -> bool:
        with self._lock:
            return id in self._items

    def ids(self) -> list[int]:
        """Held ids, oldest inserted first."""
        with self._lock:
            return list(self._items)

    def discard(self, ids: Iterable[int]) -> list[int]:
        """Forget these ids (their records are gone); returns those that were held."""
        gone = []
        with self._lock:
            for i in ids:
                gone += self._remove(i)
        return gone

    def discard_below(self, min_id: int) -> list[int]:
        """Forget the ids below ``min_id`` from the oldest inserted on, up to the first that is
        not (ids are inserted in increasing order, so that is all of them); returns them."""
        gone = []
        with self._lock:
            items = self._items
            while items:
                i = next(iter(items))
                if i >= min_id:
                    break
                gone += self._remove(i)
        return gone

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._waiting.clear()
            self._bytes = 0
