"""The addon's options: names, defaults, help, and parsing into one validated ``Settings``.

mitmproxy answers a value it cannot convert (``--set aistats_port=abc``, and as much
``--set aistats_print=maybe`` for a ``bool`` option) by silently not loading the script, so
every option is declared as a string and parsed here, where a bad value gets one line naming
the option, the value and the expected form.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .outputs.captures import CAPTURE_PARTS
from .outputs.logsink import DEFAULT_BACKUPS, DEFAULT_MAX_BYTES
from .outputs.metrics import DURATION_BUCKETS
from .observer import DEFAULT_MAX_BODY, DEFAULT_MAX_CHUNK_TIMES, DEFAULT_MAX_EVENT
from .record.builder import DEFAULT_CONSUMER_HEADER, DEFAULT_SESSION_HEADERS
from .rules import DEFAULT_MAX_ATTRIBUTE_BYTES

if TYPE_CHECKING:
    from .rules.config import RulesConfig

DEFAULT_MAX_INFLIGHT = 10_000
DEFAULT_STORE_ROWS = 1000
DEFAULT_CAPTURES_MB = 32
DEFAULT_METRICS_PORT = 9464
DEFAULT_LABEL_LIMIT = 100


class SettingsError(ValueError):
    """One line: ``<option>: <value> is invalid; expected <form>``."""

    def __init__(self, option: str, value: object, expected: str) -> None:
        super().__init__(f"{option}: {value!r} is invalid; expected {expected}")


@dataclass(frozen=True, slots=True)
class OptionSpec:
    name: str
    default: str
    help: str
    type: type = str  # always str: see the module docstring


OPTIONS: tuple[OptionSpec, ...] = (
    OptionSpec("aistats_log", "", "JSON Lines file: one record per LLM request (empty: off)."),
    OptionSpec("aistats_log_max_bytes", str(DEFAULT_MAX_BYTES),
               "Rotate the log before it passes this size (bytes, or 100MiB; 0: never)."),
    OptionSpec("aistats_log_backups", str(DEFAULT_BACKUPS), "Rotated log files kept."),
    OptionSpec("aistats_max_body", str(DEFAULT_MAX_BODY),
               "Per-flow bound on the body copy aistats keeps and parses (bytes, or 16MiB)."),
    OptionSpec("aistats_max_event", str(DEFAULT_MAX_EVENT),
               "Per-flow bound on one stream event; bigger events are skipped (bytes, or 4MiB)."),
    OptionSpec("aistats_max_chunk_times", str(DEFAULT_MAX_CHUNK_TIMES),
               "Per-flow bound on stored content-chunk timestamps."),
    OptionSpec("aistats_max_inflight", str(DEFAULT_MAX_INFLIGHT),
               "Bound on LLM requests tracked at once; beyond it the oldest is dropped."),
    OptionSpec("aistats_session_headers", ",".join(DEFAULT_SESSION_HEADERS),
               "Comma-separated request headers; the first present gives session_id."),
    OptionSpec("aistats_consumer_header", DEFAULT_CONSUMER_HEADER,
               "Request header giving consumer."),
    OptionSpec("aistats_print", "true", "Print a one-line summary per LLM request (true/false)."),
    OptionSpec("aistats_metrics", "true", "Serve Prometheus metrics (true/false)."),
    OptionSpec("aistats_metrics_host", "127.0.0.1", "Address the metrics endpoint binds to."),
    OptionSpec("aistats_metrics_port", str(DEFAULT_METRICS_PORT),
               "Port of the metrics endpoint (0: any free port, logged at start)."),
    OptionSpec("aistats_metrics_server_trio", "false",
               "Also export gen_ai_server_* histograms (Envoy AI Gateway dashboards; true/false)."),
    OptionSpec("aistats_metrics_label_limit", str(DEFAULT_LABEL_LIMIT),
               "Distinct values kept per metric label (models, consumers); more become 'other'."),
    OptionSpec("aistats_metrics_duration_buckets", "",
               "Seconds, comma-separated, for the duration and per-chunk histograms "
               "(empty: the OTel GenAI list 0.01 … 81.92)."),
    OptionSpec("aistats_metrics_ttft_buckets", "",
               "Seconds, comma-separated, for the time-to-first-chunk histogram "
               "(empty: 0.01 … 81.92)."),
    OptionSpec("aistats_config", "",
               "Attribute-rule configuration file, YAML or JSON: Higress ai-statistics' plugin "
               "configuration as is (empty: none). Reloaded when it changes."),
    OptionSpec("aistats_max_attribute_bytes", str(DEFAULT_MAX_ATTRIBUTE_BYTES),
               "Per-flow bound on text the rules append from a stream (bytes, or 1MiB)."),
    OptionSpec("aistats_higress_log", "",
               "Also write Higress's access-log form, one {\"ai_log\": \"...\"} per line "
               "(empty: off)."),
    OptionSpec("aistats_otlp_endpoint", "",
               "OTLP/HTTP endpoint for one span per request, e.g. http://127.0.0.1:4318 "
               "(empty: off; 'env': the OTEL_EXPORTER_OTLP_* variables)."),
    OptionSpec("aistats_span_content", "false",
               "Put message content (question, answer, ...) on spans (true/false)."),
    OptionSpec("aistats_ui", "true",
               "Serve the activity UI and its JSON API on the metrics endpoint (true/false)."),
    OptionSpec("aistats_api_token", "",
               "When set, every API and UI request must carry this token (empty: none)."),
    OptionSpec("aistats_store", "",
               "SQLite file keeping records (and captures) across restarts (empty: in memory)."),
    OptionSpec("aistats_store_rows", str(DEFAULT_STORE_ROWS),
               "Records kept in the store, newest first (0: no row bound, file store only)."),
    OptionSpec("aistats_store_max_age", "",
               "Age after which stored records are pruned: seconds or 30m, 12h, 7d (empty: none)."),
    OptionSpec("aistats_captures_mb", str(DEFAULT_CAPTURES_MB),
               "Bound on request/response captures (compressed, or the bodies of one not built "
               "yet), in MB (0: no captures)."),
    OptionSpec("aistats_capture_parts", ",".join(CAPTURE_PARTS),
               "What a capture keeps by default: any of req_headers, req_body, resp_headers, "
               "resp_body, comma-separated (binary audio/image endpoints keep less)."),
    OptionSpec("aistats_price_fetch", "false",
               "Fetch newer prices for genai-prices at run time (true/false; default: the "
               "snapshot bundled with the package, offline)."),
    OptionSpec("aistats_store_captures", "false",
               "With a file store, keep captures in it too, under the same bound (true/false)."),
)


@dataclass(frozen=True, slots=True)
class Settings:
    log_path: str
    log_max_bytes: int
    log_backups: int
    max_body: int
    max_event: int
    max_chunk_times: int
    max_inflight: int
    session_headers: tuple[str, ...]
    consumer_header: str
    print_summary: bool
    metrics: bool
    metrics_host: str
    metrics_port: int
    metrics_server_trio: bool
    metrics_label_limit: int
    duration_buckets: tuple[float, ...]
    ttft_buckets: tuple[float, ...]
    config_path: str = ""
    rules: RulesConfig | None = None
    max_attribute_bytes: int = DEFAULT_MAX_ATTRIBUTE_BYTES
    higress_log_path: str = ""
    otlp_endpoint: str = ""
    span_content: bool = False
    ui: bool = True
    api_token: str = ""
    store_path: str = ""
    store_rows: int = DEFAULT_STORE_ROWS
    store_max_age: float | None = None
    captures_bytes: int = DEFAULT_CAPTURES_MB << 20
    capture_parts: frozenset[str] = frozenset(CAPTURE_PARTS)
    store_captures: bool = False
    price_fetch: bool = False

    def describe(self) -> str:
        """The effective configuration, for the start-up log line."""
        return (f"log={self.log_path or 'off'} (rotate at {self.log_max_bytes} bytes, "
                f"{self.log_backups} backups) max_body={self.max_body} "
                f"max_event={self.max_event} max_chunk_times={self.max_chunk_times} "
                f"max_inflight={self.max_inflight} "
                f"session_headers={','.join(self.session_headers)} "
                f"consumer_header={self.consumer_header} "
                f"metrics={f'{self.metrics_host}:{self.metrics_port}' if self.metrics else 'off'} "
                f"label_limit={self.metrics_label_limit} server_trio={self.metrics_server_trio} "
                f"config={self.config_path or 'none'} "
                f"higress_log={self.higress_log_path or 'off'} "
                f"otlp={self.otlp_endpoint or 'off'} span_content={self.span_content} "
                f"ui={self.ui} api_token={'set' if self.api_token else 'none'} "
                f"store={self.store_path or 'memory'} store_rows={self.store_rows} "
                f"store_max_age={self.store_max_age or 'none'} "
                f"captures={self.captures_bytes >> 20}MB ({','.join(sorted(self.capture_parts))}) "
                f"store_captures={self.store_captures}")


_SIZE = re.compile(r"^\s*(\d+)\s*(|b|k|kb|kib|m|mb|mib|g|gb|gib)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6,
          "mib": 1 << 20, "g": 1 << 30, "gb": 10**9, "gib": 1 << 30}
_HEADER = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")


def _int(name: str, text: object, minimum: int, maximum: int | None = None) -> int:
    form = f"an integer >= {minimum}" if maximum is None else f"an integer {minimum}-{maximum}"
    try:
        value = int(str(text).strip())
    except ValueError:
        raise SettingsError(name, text, form) from None
    if value < minimum or (maximum is not None and value > maximum):
        raise SettingsError(name, text, form)
    return value


def _size(name: str, text: object, minimum: int) -> int:
    m = _SIZE.match(str(text))
    if not m:
        raise SettingsError(name, text, f"a size in bytes >= {minimum}, e.g. 1048576 or 16MiB")
    value = int(m.group(1)) * _UNITS[m.group(2).lower()]
    if value < minimum:
        raise SettingsError(name, text, f"a size in bytes >= {minimum}, e.g. 1048576 or 16MiB")
    return value


_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


def _bool(name: str, text: object) -> bool:
    word = str(text).strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise SettingsError(name, text, "true or false")


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(|s|m|h|d|w)\s*$", re.IGNORECASE)
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _duration(name: str, text: object) -> float | None:
    if not str(text).strip():
        return None
    m = _DURATION.match(str(text))
    if not m or float(m.group(1)) <= 0:
        raise SettingsError(name, text, "a positive duration: seconds, or 30m, 12h, 7d, 2w")
    return float(m.group(1)) * _SECONDS[m.group(2).lower()]


def _parts(name: str, text: object) -> frozenset[str]:
    parts = frozenset(s.strip() for s in str(text).split(",") if s.strip())
    if not parts <= set(CAPTURE_PARTS):
        raise SettingsError(name, text, f"any of {', '.join(CAPTURE_PARTS)}, comma-separated")
    return parts


def _headers(name: str, text: object, allow_empty: bool) -> tuple[str, ...]:
    names = tuple(h.strip().lower() for h in str(text).split(",") if h.strip())
    if (not names and not allow_empty) or not all(_HEADER.match(h) for h in names):
        raise SettingsError(name, text, "HTTP header names separated by commas, e.g. x-session-id")
    return names


def _buckets(name: str, text: object, default: tuple[float, ...]) -> tuple[float, ...]:
    if not str(text).strip():
        return default
    form = "increasing positive seconds separated by commas, e.g. 0.1,0.5,1,5,30,60"
    try:
        values = tuple(float(x) for x in str(text).split(","))
    except ValueError:
        raise SettingsError(name, text, form) from None
    if (not all(math.isfinite(b) for b in values) or values[0] <= 0
            or any(b <= a for a, b in zip(values, values[1:]))):
        raise SettingsError(name, text, form)
    return values


def parse(values: Mapping[str, object]) -> Settings:
    """Validate raw option values (as mitmproxy holds them); raises SettingsError."""
    v = values
    consumer = _headers("aistats_consumer_header", v["aistats_consumer_header"], False)
    if len(consumer) != 1:
        raise SettingsError("aistats_consumer_header", v["aistats_consumer_header"],
                            "one HTTP header name, e.g. x-mse-consumer")
    host = str(v["aistats_metrics_host"]).strip()
    if not host:
        raise SettingsError("aistats_metrics_host", host, "an address such as 127.0.0.1")
    config_path = str(v["aistats_config"]).strip()
    rules = None
    if config_path:
        from .rules import config  # lazy: the rules import this module's SettingsError
        rules = config.load(os.path.expanduser(config_path))
    store_path = str(v["aistats_store"]).strip()
    store_rows = _int("aistats_store_rows", v["aistats_store_rows"], 0)
    if store_rows == 0 and not store_path:
        raise SettingsError("aistats_store_rows", v["aistats_store_rows"],
                            "an integer >= 1 with the in-memory store (0, no row bound, needs "
                            "a file store: aistats_store)")
    otlp = str(v["aistats_otlp_endpoint"]).strip()
    if otlp and otlp != "env" and not re.match(r"^https?://[^/\s]+", otlp):
        raise SettingsError("aistats_otlp_endpoint", otlp,
                            "an http(s) URL such as http://127.0.0.1:4318, or env")
    return Settings(
        log_path=str(v["aistats_log"]).strip(),
        log_max_bytes=_size("aistats_log_max_bytes", v["aistats_log_max_bytes"], 0),
        log_backups=_int("aistats_log_backups", v["aistats_log_backups"], 0, 1000),
        max_body=_size("aistats_max_body", v["aistats_max_body"], 1),
        max_event=_size("aistats_max_event", v["aistats_max_event"], 1),
        max_chunk_times=_int("aistats_max_chunk_times", v["aistats_max_chunk_times"], 0),
        max_inflight=_int("aistats_max_inflight", v["aistats_max_inflight"], 1),
        session_headers=_headers("aistats_session_headers", v["aistats_session_headers"], True),
        consumer_header=consumer[0],
        print_summary=_bool("aistats_print", v["aistats_print"]),
        metrics=_bool("aistats_metrics", v["aistats_metrics"]),
        metrics_host=host,
        metrics_port=_int("aistats_metrics_port", v["aistats_metrics_port"], 0, 65535),
        metrics_server_trio=_bool("aistats_metrics_server_trio", v["aistats_metrics_server_trio"]),
        metrics_label_limit=_int("aistats_metrics_label_limit",
                                 v["aistats_metrics_label_limit"], 1),
        duration_buckets=_buckets("aistats_metrics_duration_buckets",
                                  v["aistats_metrics_duration_buckets"], DURATION_BUCKETS),
        ttft_buckets=_buckets("aistats_metrics_ttft_buckets", v["aistats_metrics_ttft_buckets"],
                              DURATION_BUCKETS),
        config_path=config_path,
        rules=rules,
        max_attribute_bytes=_size("aistats_max_attribute_bytes",
                                  v["aistats_max_attribute_bytes"], 1),
        higress_log_path=str(v["aistats_higress_log"]).strip(),
        otlp_endpoint=otlp,
        span_content=_bool("aistats_span_content", v["aistats_span_content"]),
        ui=_bool("aistats_ui", v["aistats_ui"]),
        api_token=str(v["aistats_api_token"]).strip(),
        store_path=store_path,
        store_rows=store_rows,
        store_max_age=_duration("aistats_store_max_age", v["aistats_store_max_age"]),
        captures_bytes=_int("aistats_captures_mb", v["aistats_captures_mb"], 0, 1 << 20) << 20,
        capture_parts=_parts("aistats_capture_parts", v["aistats_capture_parts"]),
        store_captures=_bool("aistats_store_captures", v["aistats_store_captures"]),
        price_fetch=_bool("aistats_price_fetch", v["aistats_price_fetch"]),
    )
