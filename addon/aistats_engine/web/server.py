"""The aistats web endpoint: Prometheus scrapes, the JSON API, live events and the UI.

Tornado serves it from a thread of its own, on an asyncio loop of its own, so nothing here runs
on mitmproxy's event loop. Store queries, captures turned into conversations, metric rendering
and exports run on a small thread pool of the server's, so a long query does not hold up the
live event streams either.

* ``start()`` binds synchronously (``OSError`` if the address is in use; port 0 picks a free
  one, see ``.port``). ``stop()`` returns within about a second and releases the port.
* ``GET /metrics``: :func:`..outputs.exposition.render` of ``metrics()`` (404 when that is
  None, i.e. metrics are off). ``GET /healthz``: ``ok``. Both stay open when a token is set.
* ``GET /api/...``: see :data:`ROUTES` below and README; bad parameters give 400 with
  ``{"error": "<one line>"}``, an unknown id 404, no store (``store()`` None) 404.
* ``GET /`` and ``/static/*``: the UI (no build step, nothing from the network).
* With ``token`` set, ``/api/*`` and the UI need it: ``Authorization: Bearer <token>``, or
  ``?token=<token>``, which also sets an HttpOnly cookie (a keyed hash of the token, not the
  token) for the UI's later requests. Compared in constant time; never logged or echoed.
* Bound to a loopback address, the UI and API answer only requests whose ``Host`` is a loopback
  name (``localhost``, ``127.x.x.x``, ``[::1]``): a web page on another site cannot read
  captures through DNS rebinding.
* At most :data:`MAX_CONNECTIONS` connections at once (more get a 503 and are closed), at most
  :data:`MAX_EXPORTS` exports at once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import gzip
import hashlib
import hmac
import ipaddress
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
from tornado import httputil, iostream, netutil, web
from tornado.httpserver import HTTPServer

from ..outputs.exposition import render
from . import params
from .events import EventHub, inflight_rows

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_CONNECTIONS = 128
MAX_EXPORTS = 4
EXPORT_BATCH = 500
HEARTBEAT_SECONDS = 15.0
GZIP_MIN_BYTES = 16 << 10
WORKERS = 4

JSON_TYPE = "application/json; charset=utf-8"
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
         b"Content-Length: 21\r\nRetry-After: 1\r\nConnection: close\r\n\r\ntoo many connections\n")
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'")

DEFAULT_SESSION_SORT_KEYS = ("last_seen", "first_seen", "requests", "input_tokens",
                             "output_tokens", "cached_tokens", "errors", "session_id")


class WebServer:
    """Serve metrics, the API, events and the UI on ``http://host:port`` (see module doc)."""

    def __init__(
        self, host: str, port: int, *,
        metrics: Callable[[], Any | None],
        store: Callable[[], Any | None],
        hub: EventHub,
        inflight: Callable[[], list[dict[str, Any]]],
        token: str | None = None,
        max_export_rows: int = params.MAX_EXPORT_ROWS,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.host = host
        self._requested_port = port
        self.metrics = metrics
        self.store = store
        self.hub = hub
        self.inflight = inflight
        self._token = token.encode() if token else None
        self._cookie_value = (hmac.new(self._token, b"aistats-ui-cookie", hashlib.sha256)
                              .hexdigest().encode() if self._token else None)
        self.max_export_rows = max_export_rows
        self.max_connections = max_connections
        self.loopback_only = _is_loopback_host(host)
        self.exports = 0
        self._port: int | None = None
        self._sockets: list[socket.socket] = []
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: HTTPServer | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._error: BaseException | None = None

    # -- lifecycle -----------------------------------------------------------------------
    @property
    def port(self) -> int:
        """The bound port (the chosen one when started with port 0)."""
        return self._port if self._port is not None else self._requested_port

    @property
    def requested_port(self) -> int:
        """The port asked for (0: any)."""
        return self._requested_port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def token_required(self) -> bool:
        return self._token is not None

    def start(self) -> None:
        """Bind (``OSError`` when the address is in use) and start serving."""
        if self._thread is not None:
            raise RuntimeError("WebServer already started")
        sockets = netutil.bind_sockets(self._requested_port, address=self.host or None,
                                       backlog=128)
        self._sockets = sockets
        self._port = sockets[0].getsockname()[1]
        self._executor = ThreadPoolExecutor(WORKERS, thread_name_prefix=f"aistats-web:{self.port}")
        ready = threading.Event()
        self._error = None
        self._thread = threading.Thread(target=self._run, args=(ready,),
                                        name=f"aistats-web:{self.port}", daemon=True)
        self._thread.start()
        if not ready.wait(10) or self._error is not None:
            error = self._error
            self.stop()
            raise RuntimeError(f"web server did not start: {error!r}")

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            loop.run_until_complete(self._setup())
        except BaseException as e:
            self._error = e
            ready.set()
            loop.close()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            try:
                tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for t in tasks:
                    t.cancel()
                if tasks:
                    loop.run_until_complete(asyncio.wait(tasks, timeout=0.3))
            except Exception:
                pass
            loop.close()

    async def _setup(self) -> None:
        app = web.Application(_routes(), web_server=self, log_function=_log_request,
                              compress_response=False, static_hash_cache=False)
        server = _HTTPServer(app, idle_connection_timeout=60, body_timeout=10,
                             max_header_size=64 << 10, max_body_size=64 << 10)
        server.max_connections = self.max_connections
        server.add_sockets(self._sockets)
        self._server = server
        self.hub.attach(asyncio.get_running_loop(), self.inflight)

    def stop(self) -> None:
        """Stop serving and release the port; returns within about a second."""
        loop, thread, server = self._loop, self._thread, self._server
        if thread is None:
            return
        if loop is not None and not loop.is_closed() and thread.is_alive():
            try:
                fut = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
                fut.result(timeout=0.8)
            except Exception:
                pass
            try:
                loop.call_soon_threadsafe(loop.stop)
            except RuntimeError:
                pass
            thread.join(timeout=0.5)
        for s in self._sockets:  # in case the loop could not do it
            try:
                s.close()
            except OSError:
                pass
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._thread = self._loop = self._server = self._executor = None
        self._sockets = []
        del server

    async def _shutdown(self) -> None:
        server = self._server
        if server is not None:
            server.stop()  # closes the listening sockets: the port is free from here
        self.hub.detach(asyncio.get_running_loop())
        if server is not None:
            try:
                await asyncio.wait_for(server.close_all_connections(), 0.5)
            except (asyncio.TimeoutError, Exception):
                pass

    # -- used by the handlers ---------------------------------------------------------------
    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the server's thread pool."""
        assert self._executor is not None
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def token_ok(self, presented: str | None) -> bool:
        if self._token is None:
            return True
        if presented is None:
            return False
        return hmac.compare_digest(presented.encode("utf-8", "surrogateescape"), self._token)

    def cookie_ok(self, value: str | None) -> bool:
        if self._cookie_value is None or value is None:
            return False
        return hmac.compare_digest(value.encode("utf-8", "surrogateescape"), self._cookie_value)

    @property
    def cookie_name(self) -> str:
        # cookies are per host, not per port: two instances on one host keep theirs apart
        return f"aistats_auth_{self.port}"

    @property
    def cookie_value(self) -> str:
        assert self._cookie_value is not None
        return self._cookie_value.decode()


class _HTTPServer(HTTPServer):
    max_connections = MAX_CONNECTIONS

    def handle_stream(self, stream: iostream.IOStream, address: tuple) -> None:
        if len(self._connections) >= self.max_connections:
            try:
                stream.write(_BUSY).add_done_callback(lambda _f: stream.close())
            except iostream.StreamClosedError:
                pass
            return
        super().handle_stream(stream, address)


def _log_request(handler: web.RequestHandler) -> None:
    # the path only: a query string may carry the token
    log.debug("aistats web %s %s %d %.1fms", handler.request.method, handler.request.path,
              handler.get_status(), 1000.0 * handler.request.request_time())


def _is_loopback_host(host: str) -> bool:
    if host in ("localhost", "localhost.", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_name(host_header: str) -> str:
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    if h.count(":") == 1:
        return h.split(":", 1)[0]
    return h


# -- the store, reached through whatever module defines it ------------------------------------

def _store_attr(store: Any, name: str, default: Any = None) -> Any:
    value = getattr(store, name, None)
    if value is None:
        value = getattr(sys.modules.get(type(store).__module__), name, None)
    if value is None and default is None:
        try:
            from ..outputs import store as store_module  # type: ignore[attr-defined]
            value = getattr(store_module, name, None)
        except ImportError:
            value = None
    return value if value is not None else default


def _filters(store: Any, kwargs: dict[str, Any]) -> Any:
    cls = _store_attr(store, "Filters")
    if cls is None:
        raise RuntimeError("the store has no Filters")
    return cls(**kwargs)


def _sort_keys(store: Any) -> list[str]:
    return list(_store_attr(store, "SORT_KEYS", ("id",)))


def _session_sort_keys(store: Any) -> list[str]:
    return list(_store_attr(store, "SESSION_SORT_KEYS", DEFAULT_SESSION_SORT_KEYS))


def _status_classes(store: Any) -> tuple[str, ...]:
    known = set(_store_attr(store, "STATUS_CLASSES", params.STATUS_CLASSES))
    return tuple(c for c in params.STATUS_CLASSES if c in known) + tuple(
        sorted(known - set(params.STATUS_CLASSES)))


# -- handlers ---------------------------------------------------------------------------------

class _Base(web.RequestHandler):
    """Security headers, the token, the Host check, JSON replies."""

    protected = True  # the token and the Host check apply

    @property
    def ws(self) -> WebServer:
        return self.application.settings["web_server"]  # type: ignore[no-any-return]

    def set_default_headers(self) -> None:
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "no-referrer")
        self.set_header("X-Frame-Options", "DENY")
        self.set_header("Cache-Control", "no-store")
        self.clear_header("Server")

    def prepare(self) -> None:
        if not self.protected:
            return
        ws = self.ws
        if ws.loopback_only:
            name = _host_name(self.request.headers.get("Host", ""))
            if not (_is_loopback_host(name)):
                self.fail(403, "this endpoint answers loopback host names only "
                               "(open it as http://127.0.0.1:PORT or http://localhost:PORT)")
                return
        if not ws.token_required:
            return
        auth = self.request.headers.get("Authorization", "")
        scheme, _, value = auth.partition(" ")
        if auth and scheme.lower() == "bearer" and ws.token_ok(value.strip()):
            return
        query_token = self.request.query_arguments.get("token")
        if query_token:
            if ws.token_ok(query_token[-1].decode("utf-8", "surrogateescape")):
                self.set_cookie(ws.cookie_name, ws.cookie_value, path="/", httponly=True,
                                samesite="Strict")
                self.token_from_query = True
                return
        elif ws.cookie_ok(self.get_cookie(ws.cookie_name)):
            return
        self.fail(401, "this endpoint needs the API token (aistats_api_token): send "
                       "'Authorization: Bearer <token>', or open /?token=<token> once in the "
                       "browser")

    token_from_query = False

    def fail(self, status: int, message: str) -> None:
        if status == 401:
            self.set_header("WWW-Authenticate", 'Bearer realm="aistats"')
        self.send_json({"error": message}, status)

    def send_json(self, obj: Any, status: int = 200) -> None:
        self.send_bytes(_dumps(obj), status)

    def send_bytes(self, body: bytes, status: int = 200, ctype: str = JSON_TYPE) -> None:
        self.set_status(status)
        self.set_header("Content-Type", ctype)
        if len(body) >= GZIP_MIN_BYTES and "gzip" in self.request.headers.get(
                "Accept-Encoding", ""):
            body = gzip.compress(body, 5)
            self.set_header("Content-Encoding", "gzip")
            self.set_header("Vary", "Accept-Encoding")
        self.finish(body)

    async def json_from(self, fn: Callable[..., Any], *args: Any, status: int = 200) -> None:
        """``fn(*args)`` on the pool, serialized (and compressed) there too."""
        gz = "gzip" in self.request.headers.get("Accept-Encoding", "")

        def work() -> tuple[bytes, bool]:
            body = _dumps(fn(*args))
            if gz and len(body) >= GZIP_MIN_BYTES:
                return gzip.compress(body, 5), True
            return body, False

        try:
            body, zipped = await self.ws.run(work)
        except params.ParamError as e:
            self.fail(400, str(e))
            return
        except _NotFound as e:
            self.fail(404, str(e))
            return
        except ValueError as e:  # the store refusing a value
            self.fail(400, _one_line(str(e)) or "bad parameter")
            return
        self.set_status(status)
        self.set_header("Content-Type", JSON_TYPE)
        if zipped:
            self.set_header("Content-Encoding", "gzip")
            self.set_header("Vary", "Accept-Encoding")
        self.finish(body)

    def args(self) -> dict[str, list[str]]:
        return params.decode_args(self.request.query_arguments)

    def the_store(self) -> Any:
        store = self.ws.store()
        if store is None:
            raise _NotFound("the activity store is off")
        return store

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        self.set_header("Content-Type", JSON_TYPE)
        if exc is not None and isinstance(exc[1], params.ParamError):
            self.set_status(400)
            self.finish(_dumps({"error": str(exc[1])}))
            return
        if exc is not None and isinstance(exc[1], _NotFound):
            self.set_status(404)
            self.finish(_dumps({"error": str(exc[1])}))
            return
        status_code = self.get_status()
        reason = httputil.responses.get(status_code, "error")
        self.finish(_dumps({"error": f"{status_code} {reason}"}))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, (params.ParamError, _NotFound, web.HTTPError)):
            return
        log.warning("aistats web: %s failed: %s: %s", self.request.path, typ.__name__,
                    _one_line(str(value)))
        log.debug("aistats web: traceback", exc_info=(typ, value, tb))


class _NotFound(Exception):
    pass


def _one_line(text: str) -> str:
    return " ".join(text.split())[:500]


def _dumps(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY,
                        default=_default)


def _default(obj: Any) -> Any:
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "replace")
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    return str(obj)


class _Api(_Base):
    """Every /api/* handler (a ParamError raised becomes 400, _NotFound 404)."""


class Metrics(_Base):
    protected = False

    async def get(self) -> None:
        registry = self.ws.metrics()
        if registry is None:
            self.set_status(404)
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            self.set_header("Cache-Control", "no-store")
            self.finish(b"metrics are off (aistats_metrics=false)\n")
            return
        try:
            body, ctype = await self.ws.run(render, registry, self.request.headers.get("Accept"))
        except Exception:
            log.exception("aistats: metrics collection failed")
            self.set_status(500)
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            self.finish(b"metrics collection failed\n")
            return
        self.set_header("Content-Type", ctype)
        self.finish(body)


class Healthz(_Base):
    protected = False

    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(b"ok\n")


class Meta(_Api):
    async def get(self) -> None:
        params.check_names(self.args(), ())
        store = self.ws.store()
        self.send_json({
            "store": store is not None,
            "metrics": self.ws.metrics() is not None,
            "sort_keys": _sort_keys(store) if store is not None else [],
            "session_sort_keys": _session_sort_keys(store) if store is not None else [],
            "status_classes": list(_status_classes(store)) if store is not None else [],
            "max_limit": params.MAX_LIMIT,
            "max_export_rows": self.ws.max_export_rows,
            "server_time": time.time(),
        })


class Activity(_Api):
    async def get(self) -> None:
        store = self.the_store()
        q = params.activity_query(self.args(), _sort_keys(store), "id", _status_classes(store))
        f = _filters(store, q.filters)
        await self.json_from(store.activity, f, q.sort, q.order, q.page, q.limit)


class Stats(_Api):
    async def get(self) -> None:
        store = self.the_store()
        f = _filters(store, params.filters_only(self.args(), _status_classes(store)))
        await self.json_from(store.stats, f)


class Sessions(_Api):
    async def get(self) -> None:
        store = self.the_store()
        q = params.activity_query(self.args(), _session_sort_keys(store), "last_seen",
                                  _status_classes(store))
        f = _filters(store, q.filters)
        await self.json_from(store.sessions, f, q.sort, q.order, q.page, q.limit)


class Session(_Api):
    async def get(self, session_id: str) -> None:
        params.check_names(self.args(), ())
        store = self.the_store()

        def one() -> Any:
            found = store.session(session_id)
            if found is None:
                raise _NotFound(f"session {params.show(session_id)} not found")
            return found

        await self.json_from(one)


class RecordById(_Api):
    async def get(self, raw_id: str) -> None:
        params.check_names(self.args(), ())
        rid = params.parse_id("record id", raw_id)
        store = self.the_store()

        def one() -> Any:
            rec = store.record(rid)
            if rec is None:
                raise _NotFound(f"record {rid} not found (never seen, or pruned)")
            return rec

        await self.json_from(one)


class Capture(_Api):
    async def get(self, raw_id: str) -> None:
        params.check_names(self.args(), ())
        cid = params.parse_id("capture id", raw_id)
        store = self.the_store()
        await self.json_from(capture_view, store, cid)


class Inflight(_Api):
    async def get(self) -> None:
        params.check_names(self.args(), ())
        try:
            rows = inflight_rows(self.ws.inflight)
        except Exception as e:
            log.debug("aistats: inflight() failed", exc_info=True)
            self.fail(500, f"in-flight requests unavailable: {type(e).__name__}")
            return
        self.send_json({"data": rows, "server_time": time.time()})


class Events(_Api):
    """Server-Sent Events: see events.py for the messages."""

    _client: Any = None

    async def get(self) -> None:
        params.check_names(self.args(), ())
        hub = self.ws.hub
        client = hub.connect()
        if client is None:
            self.set_header("Retry-After", "5")
            self.fail(503, f"too many event streams (at most {hub.max_clients})")
            return
        self._client = client
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")
        try:
            self.write(b"retry: 2000\n\n")
            await self.flush()
            last = time.monotonic()
            while not client.closed:
                batch = client.take()
                if batch:
                    self.write(b"".join(batch))
                    await self.flush()  # the next batch waits until the socket took this one
                    last = time.monotonic()
                    continue
                idle = HEARTBEAT_SECONDS - (time.monotonic() - last)
                if idle <= 0:
                    self.write(b": keep-alive\n\n")
                    await self.flush()
                    last = time.monotonic()
                    continue
                try:
                    await asyncio.wait_for(client.wake.wait(), idle)
                except asyncio.TimeoutError:
                    pass
        except iostream.StreamClosedError:
            pass
        finally:
            hub.disconnect(client)
        if not self._finished:
            try:
                self.finish()
            except Exception:
                pass

    def on_connection_close(self) -> None:
        if self._client is not None:
            self.ws.hub.disconnect(self._client)


class Export(_Api):
    """``/api/export.jsonl`` and ``/api/export.md``: the current filter, streamed."""

    async def get(self, kind: str) -> None:
        store = self.the_store()
        q = params.export_query(self.args(), _sort_keys(store), self.ws.max_export_rows, "id",
                                _status_classes(store))
        f = _filters(store, q.filters)
        if self.ws.exports >= MAX_EXPORTS:
            self.set_header("Retry-After", "5")
            self.fail(503, f"too many exports at once (at most {MAX_EXPORTS})")
            return
        self.ws.exports += 1
        pool = ThreadPoolExecutor(1, thread_name_prefix="aistats-export")  # one cursor, one thread
        loop = asyncio.get_running_loop()
        rows: Iterator[dict[str, Any]] | None = None
        try:
            summary: dict[str, Any] | None = None
            if kind == "md":
                try:
                    summary = await loop.run_in_executor(
                        pool, lambda: _summarize(store.export(f, q.sort, q.order, q.limit)))
                except ValueError as e:
                    self.fail(400, _one_line(str(e)))
                    return
                if summary["max_id"] is not None:  # the same rows in the second pass
                    kw = dict(q.filters)
                    kw["max_id"] = min(summary["max_id"], kw["max_id"] or summary["max_id"])
                    f = _filters(store, kw)
            try:
                rows = await loop.run_in_executor(pool, store.export, f, q.sort, q.order, q.limit)
            except ValueError as e:
                self.fail(400, _one_line(str(e)))
                return
            stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
            if kind == "jsonl":
                self.set_header("Content-Type", "application/x-ndjson; charset=utf-8")
            else:
                self.set_header("Content-Type", "text/markdown; charset=utf-8")
            self.set_header("Content-Disposition",
                            f'attachment; filename="aistats-activity-{stamp}.{kind}"')
            self.set_header("X-Accel-Buffering", "no")
            if summary is not None:
                self.write(_markdown_head(summary, q, self.args()).encode())
            while True:
                batch = await loop.run_in_executor(pool, _take, rows, EXPORT_BATCH, kind)
                if not batch:
                    break
                self.write(batch)
                await self.flush()
            if summary is not None:
                self.write(b"\n_Exported by aistats._\n")
            self.finish()
        except iostream.StreamClosedError:
            pass
        finally:
            self.ws.exports -= 1
            if rows is not None and hasattr(rows, "close"):
                pool.submit(rows.close)
            pool.shutdown(wait=False)


def _take(rows: Iterator[dict[str, Any]], n: int, kind: str) -> bytes:
    out = []
    for row in rows:
        if kind == "jsonl":
            out.append(_dumps(row) + b"\n")
        else:
            out.append(_markdown_row(row).encode())
        if len(out) >= n:
            break
    return b"".join(out)


# -- captures as a person reads them -----------------------------------------------------------

def _body_bytes(text: Any, b64: Any) -> bytes | None:
    if isinstance(text, str):
        return text.encode("utf-8")
    if isinstance(b64, str):
        try:
            return base64.b64decode(b64, validate=False)
        except (binascii.Error, ValueError):
            return None
    return None


def _conversation_of(api: str | None, capture: dict[str, Any]) -> tuple[Any, str | None]:
    """(conversation, None) or (None, why not)."""
    try:
        from .. import conversation as conv  # type: ignore[attr-defined]
    except ImportError:
        return None, "conversation rendering is not available"
    req = _body_bytes(capture.get("req_body"), capture.get("req_body_base64"))
    request_json: Any = None
    if req:
        try:
            request_json = orjson.loads(req)
        except orjson.JSONDecodeError:
            request_json = None
    resp = _body_bytes(capture.get("resp_body"), capture.get("resp_body_base64"))
    try:
        return conv.conversation(api, request_json, resp, capture.get("resp_content_type")), None
    except Exception as e:
        log.debug("aistats: conversation failed", exc_info=True)
        return None, f"could not read the exchange: {type(e).__name__}: {_one_line(str(e))[:200]}"


def _message_key(message: Any) -> bytes:
    return orjson.dumps(message, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS,
                        default=str)


def _previous_turn(store: Any, record: dict[str, Any], conv: Any) -> dict[str, Any] | None:
    """What changed since the previous request of the same session (its messages compared)."""
    sid = record.get("session_id")
    rid = record.get("id")
    if not sid or not isinstance(rid, int) or rid <= 1:
        return None
    page = store.activity(_filters(store, {"session": sid, "max_id": rid - 1}), "id", "desc", 1, 1)
    rows = page.get("data") or []
    if not rows:
        return {"previous_id": None}
    prev = rows[0]
    out: dict[str, Any] = {"previous_id": prev.get("id"),
                           "previous_has_capture": bool(prev.get("has_capture"))}
    if not prev.get("has_capture") or not isinstance(conv, dict):
        return out
    cap = store.capture(prev["id"])
    if cap is None:
        out["previous_has_capture"] = False
        return out
    pconv, _ = _conversation_of(prev.get("api"), cap)
    if not isinstance(pconv, dict):
        return out
    cur = [_message_key(m) for m in conv.get("messages") or []]
    old = [_message_key(m) for m in pconv.get("messages") or []]
    k = 0
    while k < len(cur) and k < len(old) and cur[k] == old[k]:
        k += 1
    out.update({
        "previous_messages": len(old),
        "common_prefix": k,
        "new_messages": len(cur) - k,
        "rewritten": k < len(old),  # earlier history changed (compaction, edits)
        "system_changed": _message_key(conv.get("system")) != _message_key(pconv.get("system")),
        "tools_changed": _message_key(conv.get("tools")) != _message_key(pconv.get("tools")),
    })
    # the previous answer, echoed back as the first message after the shared history
    presp = pconv.get("response") or {}
    if k == len(old) and k < len(cur):
        msg = (conv.get("messages") or [])[k]
        if isinstance(msg, dict) and msg.get("role") == "assistant" and (
                presp.get("text") or presp.get("tool_calls")):
            out["previous_answer_at"] = k
    return out


def capture_view(store: Any, cid: int) -> dict[str, Any]:
    capture = store.capture(cid)
    if capture is None:
        raise _NotFound(f"capture {cid} not found (never captured, or evicted)")
    out = dict(capture)
    record = store.record(cid)
    if hasattr(record, "to_dict"):
        record = record.to_dict()
    out["record"] = record
    api = record.get("api") if isinstance(record, dict) else None
    conv, why = _conversation_of(api, capture)
    out["conversation"] = conv
    if why:
        out["conversation_error"] = why
    if isinstance(record, dict):
        try:
            out["previous_turn"] = _previous_turn(store, record, conv)
        except Exception as e:
            log.debug("aistats: previous turn failed", exc_info=True)
            out["previous_turn"] = {"error": f"{type(e).__name__}"}
    return out


# -- the Markdown export ------------------------------------------------------------------------

def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _summarize(rows: Iterator[dict[str, Any]]) -> dict[str, Any]:
    """Totals and token-weighted speeds over the rows (first pass of the Markdown export)."""
    s: dict[str, Any] = {"rows": 0, "errors": 0, "input": 0, "cached": 0, "output": 0,
                         "reasoning": 0, "cost": 0.0, "cost_rows": 0, "duration_ms": 0.0,
                         "first": None, "last": None, "max_id": None,
                         "prefill_tok": 0.0, "prefill_s": 0.0, "decode_tok": 0.0,
                         "decode_s": 0.0, "obs_tok": 0.0, "obs_s": 0.0, "ttft": []}
    try:
        for r in rows:
            s["rows"] += 1
            rid = r.get("id")
            if isinstance(rid, int) and (s["max_id"] is None or rid > s["max_id"]):
                s["max_id"] = rid
            for key, name in (("start_time", "first"), ("end_time", "last")):
                t = r.get(key)
                if isinstance(t, str):
                    if name == "first" and (s["first"] is None or t < s["first"]):
                        s["first"] = t
                    if name == "last" and (s["last"] is None or t > s["last"]):
                        s["last"] = t
            status = r.get("status")
            if r.get("error") or not isinstance(status, int) or status >= 400:
                s["errors"] += 1
            inp, out, cached = _num(r.get("input_tokens")), _num(r.get("output_tokens")), \
                _num(r.get("cached_tokens"))
            s["input"] += inp or 0
            s["output"] += out or 0
            s["cached"] += cached or 0
            s["reasoning"] += _num(r.get("reasoning_tokens")) or 0
            if _num(r.get("cost_usd")) is not None:
                s["cost"] += r["cost_usd"]
                s["cost_rows"] += 1
            s["duration_ms"] += _num(r.get("duration_ms")) or 0
            pps = _num(r.get("prompt_per_second"))
            if pps and inp:
                new = max(inp - (cached or 0), 0)
                if new:
                    s["prefill_tok"] += new
                    s["prefill_s"] += new / pps
            for key, tok, sec in (("tokens_per_second", "decode_tok", "decode_s"),
                                  ("observed_tokens_per_second", "obs_tok", "obs_s")):
                v = _num(r.get(key))
                if v and out:
                    s[tok] += out
                    s[sec] += out / v
            ttft = _num(r.get("ttft_ms"))
            if ttft is not None and len(s["ttft"]) < 100_000:
                s["ttft"].append(ttft)
    finally:
        if hasattr(rows, "close"):
            rows.close()  # type: ignore[union-attr]
    return s


def _cell(v: Any) -> str:
    if v is None:
        return "–"
    text = str(v)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("\r", " ")


def _fmt(v: Any, digits: int = 1) -> str:
    n = _num(v)
    if n is None:
        return "–"
    if digits == 0:
        return f"{n:,.0f}"
    return f"{n:,.{digits}f}"


def _rate(tok: float, sec: float) -> str:
    return f"{tok / sec:,.1f} t/s" if sec > 0 else "–"


def _pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * p
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


_MD_COLUMNS = ("ID", "Start (UTC)", "Model", "Provider", "Client", "Session", "Status",
               "Cached", "Prompt", "Generated", "TTFT ms", "Prefill t/s", "Decode t/s",
               "Observed t/s", "Duration s", "Cost $", "Error")


def _markdown_head(s: dict[str, Any], q: params.Query, args: dict[str, list[str]]) -> str:
    shown = {k: v for k, v in args.items() if k not in params.ALWAYS_ALLOWED}
    filt = "; ".join(f"{k}={', '.join(v)}" for k, v in sorted(shown.items())) or "none"
    cost = f"${s['cost']:,.4f} ({s['cost_rows']} priced)" if s["cost_rows"] else "unknown"
    lines = [
        "# aistats activity export", "",
        f"Filter: {_cell(filt)}  ",
        f"Sorted by {q.sort} {q.order}; at most {q.limit:,} rows.", "",
        "| Summary | Value |", "|---|---|",
        f"| Time range (UTC) | {_cell(s['first'])} → {_cell(s['last'])} |",
        f"| Requests | {s['rows']:,} |",
        f"| Errors | {s['errors']:,} |",
        f"| Prompt tokens (all) | {s['input']:,.0f} |",
        f"| Cached tokens | {s['cached']:,.0f}"
        + (f" ({100 * s['cached'] / s['input']:.1f}% of prompt)" if s["input"] else "") + " |",
        f"| Generated tokens | {s['output']:,.0f} |",
        f"| Reasoning tokens | {s['reasoning']:,.0f} |",
        f"| Total request time | {s['duration_ms'] / 1000:,.2f} s |",
        f"| Prefill speed (server, token-weighted) | {_rate(s['prefill_tok'], s['prefill_s'])} |",
        f"| Decode speed (server, token-weighted) | {_rate(s['decode_tok'], s['decode_s'])} |",
        f"| Decode speed (observed, token-weighted) | {_rate(s['obs_tok'], s['obs_s'])} |",
        f"| TTFT p50 / p95 / p99 | {_fmt(_pct(s['ttft'], .5), 0)} / "
        f"{_fmt(_pct(s['ttft'], .95), 0)} / {_fmt(_pct(s['ttft'], .99), 0)} ms |",
        f"| Cost | {cost} |",
        "",
        "| " + " | ".join(_MD_COLUMNS) + " |",
        "|" + "|".join("---:" if c in ("ID", "Cached", "Prompt", "Generated", "TTFT ms",
                                       "Prefill t/s", "Decode t/s", "Observed t/s",
                                       "Duration s", "Cost $") else "---"
                       for c in _MD_COLUMNS) + "|",
    ]
    return "\n".join(lines) + "\n"


def _markdown_row(r: dict[str, Any]) -> str:
    dur = _num(r.get("duration_ms"))
    start = r.get("start_time")
    cost = _num(r.get("cost_usd"))
    cells = [
        _cell(r.get("id")), _cell(start.replace("T", " ").rstrip("Z") if isinstance(start, str)
                                  else None),
        _cell(r.get("model")), _cell(r.get("provider")), _cell(r.get("client")),
        _cell(r.get("session_id")),
        _cell(r.get("status") if r.get("status") is not None else r.get("error_type")),
        _fmt(r.get("cached_tokens"), 0), _fmt(r.get("input_tokens"), 0),
        _fmt(r.get("output_tokens"), 0), _fmt(r.get("ttft_ms"), 0),
        _fmt(r.get("prompt_per_second")), _fmt(r.get("tokens_per_second")),
        _fmt(r.get("observed_tokens_per_second")),
        _fmt(dur / 1000 if dur is not None else None, 2),
        f"{cost:.6f}" if cost is not None else "–",
        _cell((r.get("error") or "")[:120] or None),
    ]
    return "| " + " | ".join(cells) + " |\n"


# -- the UI ---------------------------------------------------------------------------------

class Index(_Base):
    def get(self) -> None:
        if self.token_from_query:  # the cookie is set: take the token out of the address bar
            self.redirect("/", status=303)
            return
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Content-Security-Policy", _CSP)
        self.set_header("Cache-Control", "no-cache")
        self.finish((STATIC_DIR / "index.html").read_bytes())


class Static(_Base, web.StaticFileHandler):
    def set_default_headers(self) -> None:
        _Base.set_default_headers(self)
        self.set_header("Content-Security-Policy", _CSP)

    def set_extra_headers(self, path: str) -> None:
        self.set_header("Cache-Control", "no-cache")

    def prepare(self) -> None:
        _Base.prepare(self)


class NotFound(_Base):
    protected = False

    def prepare(self) -> None:
        self.fail(404, f"no such endpoint: {params.show(self.request.path)}")


def _routes() -> list[Any]:
    return [
        (r"/metrics", Metrics),
        (r"/healthz", Healthz),
        (r"/api/meta", Meta),
        (r"/api/activity", Activity),
        (r"/api/stats", Stats),
        (r"/api/sessions", Sessions),
        (r"/api/sessions/(.+)", Session),
        (r"/api/records/([^/]*)", RecordById),
        (r"/api/captures/([^/]*)", Capture),
        (r"/api/inflight", Inflight),
        (r"/api/events", Events),
        (r"/api/export\.(jsonl|md)", Export),
        (r"/", Index),
        (r"/static/(.*)", Static, {"path": str(STATIC_DIR)}),
        (r".*", NotFound),
    ]


ROUTES = tuple(r[0] for r in _routes())
