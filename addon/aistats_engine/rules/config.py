"""The attribute-rule configuration file (``--set aistats_config=PATH``): Higress ai-statistics'
plugin configuration as is, YAML or JSON, plus aistats' own keys under ``aistats:``.

Everything is checked at load: an unknown key, a wrong type, a bad rule, a path that does not
parse, a key that is neither a built-in nor has a ``value_source`` (Higress ignores it silently;
we say so). Each problem is one line naming the file, the key (with its list index) and the
expected form. Paths are compiled here, once. Where Higress's README and code disagree, the code
wins on defaults (``value_length_limit`` 32000; an empty filter list means all), the README on
what plainly fails in the code (a built-in configured with only ``key`` works on streams too).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from ..record.cost import UserPrice, parse_prices
from ..record.providers import ProviderHost, parse_provider_hosts
from ..record.record import LOGGED_FIELDS
from ..settings import SettingsError
from .builtins import BUILTINS, CONTENT_BUILTINS, default_sources
from .paths import CompiledPath, PathError, compile_path

OPTION = "aistats_config"
FIXED_VALUE = "fixed_value"
REQUEST_HEADER = "request_header"
REQUEST_BODY = "request_body"
RESPONSE_HEADER = "response_header"
RESPONSE_BODY = "response_body"
RESPONSE_STREAMING_BODY = "response_streaming_body"
SOURCES = (FIXED_VALUE, REQUEST_HEADER, REQUEST_BODY, RESPONSE_HEADER, RESPONSE_BODY,
           RESPONSE_STREAMING_BODY)
BODY_SOURCES = frozenset({REQUEST_BODY, RESPONSE_BODY, RESPONSE_STREAMING_BODY})
RULES = ("first", "replace", "append")

DEFAULT_VALUE_LENGTH_LIMIT = 32_000
DEFAULT_ATTRIBUTES_LIMIT = 10 << 20  # use_default_attributes
DEFAULT_RESPONSE_ATTRIBUTES_LIMIT = 4000  # use_default_response_attributes
DEFAULT_ATTRIBUTE_SUFFIXES = ("/completions", "/messages")

_TOP_KEYS = ("attributes", "use_default_attributes", "use_default_response_attributes",
             "disable_openai_usage", "value_length_limit", "enable_path_suffixes",
             "enable_content_types", "session_id_header", "aistats")
_ATTRIBUTE_KEYS = ("key", "value_source", "value", "rule", "default_value", "apply_to_log",
                   "apply_to_span", "trace_span_key", "as_separate_log_field")
_OWN_KEYS = ("consumer_header", "session_headers", "prices", "providers")


class ConfigError(SettingsError):
    """``aistats_config: FILE: where: value is invalid; expected form`` (one line)."""

    def __init__(self, file: str, where: str, value: object, expected: str) -> None:
        ValueError.__init__(self, f"{OPTION}: {file}: {where}: {value!r} is invalid; "
                                  f"expected {expected}")


@dataclass(frozen=True, slots=True)
class Attribute:
    """One configured attribute, checked and compiled."""

    index: int
    key: str
    sources: tuple[str, ...]  # the configured source, or a built-in's default sources
    value: str
    path: CompiledPath | None  # body sources with a value
    rule: str | None
    default: Any
    to_log: bool
    to_span: bool
    span_key: str
    separate: bool
    builtin: bool
    content: bool  # carries message content (spans get it only on opt-in)


@dataclass(frozen=True, slots=True)
class RulesConfig:
    file: str
    attributes: tuple[Attribute, ...]
    value_length_limit: int
    path_suffixes: tuple[str, ...] | None  # None: aistats' own paths; (): every path
    content_types: tuple[str, ...]  # (): every content type
    disable_openai_usage: bool
    session_headers: tuple[str, ...]  # session_id_header first, then Higress's defaults
    consumer_header: str | None
    stamp: tuple[float, int]  # the file's mtime and size when read (reload check)
    prices: tuple[UserPrice, ...] = ()  # the user's own prices (record/cost.py)
    provider_hosts: tuple[ProviderHost, ...] = ()  # the user's names for hosts

    @property
    def builtins(self) -> frozenset[str]:
        return frozenset(a.key for a in self.attributes if a.builtin)

    def needs(self, source: str) -> bool:
        return any(source in a.sources for a in self.attributes)


# Higress's own default attribute sets (getDefaultAttributes / getDefaultResponseAttributes).
_DEFAULT_ATTRIBUTES: tuple[dict[str, Any], ...] = (
    {"key": "messages", "value_source": REQUEST_BODY, "value": "messages", "apply_to_log": True},
    {"key": "question", "apply_to_log": True},
    {"key": "system", "apply_to_log": True},
    {"key": "answer", "apply_to_log": True, "rule": "append"},
    {"key": "reasoning", "apply_to_log": True, "rule": "append"},
    {"key": "tool_calls", "apply_to_log": True},
    {"key": "reasoning_tokens", "apply_to_log": True},
    {"key": "cached_tokens", "apply_to_log": True},
    {"key": "input_token_details", "apply_to_log": True},
    {"key": "output_token_details", "apply_to_log": True},
)
_DEFAULT_RESPONSE_ATTRIBUTES = _DEFAULT_ATTRIBUTES[6:]
HIGRESS_SESSION_HEADERS = ("x-openclaw-session-key", "x-clawdbot-session-key",
                           "x-moltbot-session-key", "x-agent-session")


def stamp_of(path: str) -> tuple[float, int]:
    st = os.stat(path)
    return (st.st_mtime, st.st_size)


def load(path: str) -> RulesConfig:
    """Read and check the file; raises ConfigError (one line)."""
    try:
        stamp = stamp_of(path)
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(path, "file", path, f"a readable file ({e.strerror or e})") from None
    try:
        if path.lower().endswith(".json"):
            data = json.loads(raw)
        else:
            data = YAML(typ="safe", pure=True).load(raw)
    except (ValueError, YAMLError) as e:
        detail = " ".join(str(e).split())[:200]
        raise ConfigError(path, "file", os.path.basename(path),
                          f"valid YAML or JSON ({detail})") from None
    return parse(data if data is not None else {}, path, stamp)


def parse(data: object, file: str = "<config>", stamp: tuple[float, int] = (0.0, 0)
          ) -> RulesConfig:
    """Check a loaded configuration (a mapping); raises ConfigError."""
    c = _Checker(file)
    top = c.mapping(data, "top level", _TOP_KEYS)
    use_all = c.boolean(top, "use_default_attributes", "use_default_attributes")
    use_resp = c.boolean(top, "use_default_response_attributes", "use_default_response_attributes")
    if use_all:
        raw_attrs: list = list(_DEFAULT_ATTRIBUTES)
        limit = DEFAULT_ATTRIBUTES_LIMIT
    elif use_resp:
        raw_attrs, limit = list(_DEFAULT_RESPONSE_ATTRIBUTES), DEFAULT_RESPONSE_ATTRIBUTES_LIMIT
    else:
        raw_attrs = c.list_of(top, "attributes", "attributes")
        limit = DEFAULT_VALUE_LENGTH_LIMIT
    if "value_length_limit" in top:
        limit = c.integer(top["value_length_limit"], "value_length_limit", 1)
    attributes = tuple(c.attribute(a, i) for i, a in enumerate(raw_attrs))

    suffixes: tuple[str, ...] | None = None
    if "enable_path_suffixes" in top:
        items = c.strings(top, "enable_path_suffixes")
        suffixes = () if "*" in items else tuple(items)
    elif use_all or use_resp:
        suffixes = DEFAULT_ATTRIBUTE_SUFFIXES
    types = tuple(t.lower() for t in c.strings(top, "enable_content_types"))
    if "*" in types:
        types = ()

    session = ()
    if "session_id_header" in top:
        session = (c.header(top["session_id_header"], "session_id_header"),)
    own = c.mapping(top.get("aistats", {}), "aistats", _OWN_KEYS)
    consumer = c.header(own["consumer_header"], "aistats.consumer_header") \
        if "consumer_header" in own else None
    if "session_headers" in own:
        session += tuple(c.header(h, f"aistats.session_headers[{i}]")
                         for i, h in enumerate(c.list_of(own, "session_headers",
                                                         "aistats.session_headers")))
    try:
        prices = parse_prices(own.get("prices"), "aistats.prices")
        hosts = parse_provider_hosts(own.get("providers"), "aistats.providers")
    except ValueError as e:
        where, _, rest = str(e).partition(": ")
        raise ConfigError(file, where, "", rest) from None
    return RulesConfig(
        prices=prices, provider_hosts=hosts,
        file=file, attributes=attributes, value_length_limit=limit, path_suffixes=suffixes,
        content_types=types,
        disable_openai_usage=c.boolean(top, "disable_openai_usage", "disable_openai_usage"),
        session_headers=session + HIGRESS_SESSION_HEADERS, consumer_header=consumer, stamp=stamp)


class _Checker:
    """The checks, each raising a ConfigError that names the file and where."""

    def __init__(self, file: str) -> None:
        self.file = file

    def fail(self, where: str, value: object, expected: str) -> ConfigError:
        return ConfigError(self.file, where, value, expected)

    def mapping(self, v: object, where: str, allowed: tuple[str, ...]) -> dict:
        if not isinstance(v, dict):
            raise self.fail(where, v, "a mapping")
        for k in v:
            if k not in allowed:
                raise self.fail(f"{where} key {k}" if where != "top level" else str(k), k,
                                f"one of {', '.join(allowed)}")
        return v

    def list_of(self, d: dict, key: str, where: str) -> list:
        v = d.get(key, [])
        if v is None:
            return []
        if not isinstance(v, list):
            raise self.fail(where, v, "a list")
        return v

    def strings(self, d: dict, key: str) -> list[str]:
        items = self.list_of(d, key, key)
        for i, s in enumerate(items):
            if not isinstance(s, str) or not s:
                raise self.fail(f"{key}[{i}]", s, "a non-empty string")
        return items

    def boolean(self, d: dict, key: str, where: str) -> bool:
        v = d.get(key, False)
        if not isinstance(v, bool):
            raise self.fail(where, v, "true or false")
        return v

    def integer(self, v: object, where: str, minimum: int) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise self.fail(where, v, f"an integer >= {minimum}")
        return v

    def header(self, v: object, where: str) -> str:
        if not isinstance(v, str) or not v.strip() or any(ch in v for ch in " :\t\r\n"):
            raise self.fail(where, v, "an HTTP header name, e.g. x-session-id")
        return v.strip().lower()

    def attribute(self, raw: object, i: int) -> Attribute:
        at = f"attributes[{i}]"
        a = self.mapping(raw, at, _ATTRIBUTE_KEYS)
        key = a.get("key")
        if not isinstance(key, str) or not key:
            raise self.fail(f"{at}.key", key, "a non-empty string")
        builtin = key in BUILTINS
        source = a.get("value_source")
        if source is None:
            if not builtin:
                raise self.fail(f"{at}.value_source", None,
                                f"one of {', '.join(SOURCES)} (key {key!r} is not a built-in: "
                                f"{', '.join(sorted(BUILTINS))})")
            sources = default_sources(key)
        elif source not in SOURCES:
            raise self.fail(f"{at}.value_source", source, f"one of {', '.join(SOURCES)}")
        else:
            sources = (source,)
        value = a.get("value", "")
        if not isinstance(value, str):
            raise self.fail(f"{at}.value", value, "a string")
        if source is not None and not value and not builtin:
            raise self.fail(f"{at}.value", value, _value_form(source))
        path = None
        if value and source in BODY_SOURCES:
            try:
                path = compile_path(value)
            except PathError as e:
                raise self.fail(f"{at}.value", value,
                                f"a gjson path (choices.0.delta.content) or a JSONPath "
                                f"($.choices[0].delta.content): {e}") from None
        elif value and source in (REQUEST_HEADER, RESPONSE_HEADER):
            value = self.header(value, f"{at}.value")
        rule = a.get("rule")
        if rule is not None and rule not in RULES:
            raise self.fail(f"{at}.rule", rule, "first, replace or append")
        if rule is None and source == RESPONSE_STREAMING_BODY and not builtin:
            raise self.fail(f"{at}.rule", None,
                            "first, replace or append (how events of a stream combine)")
        default = a.get("default_value")
        if default is not None and not isinstance(default, (str, int, float, bool)):
            raise self.fail(f"{at}.default_value", default, "a string or a number")
        flags = {k: self.boolean(a, k, f"{at}.{k}")
                 for k in ("apply_to_log", "apply_to_span", "as_separate_log_field")}
        span_key = a.get("trace_span_key") or key
        if not isinstance(span_key, str):
            raise self.fail(f"{at}.trace_span_key", span_key, "a string")
        if flags["as_separate_log_field"] and (key in LOGGED_FIELDS or key == "schema"):
            raise self.fail(f"{at}.key", key,
                            "a key that is not a record key (as_separate_log_field writes it at "
                            "the record's top level)")
        return Attribute(
            index=i, key=key, sources=sources, value=value, path=path, rule=rule,
            default=default, to_log=flags["apply_to_log"], to_span=flags["apply_to_span"],
            span_key=span_key, separate=flags["as_separate_log_field"], builtin=builtin,
            content=key in CONTENT_BUILTINS)


def _value_form(source: str) -> str:
    if source == FIXED_VALUE:
        return "the fixed value, a non-empty string"
    if source in (REQUEST_HEADER, RESPONSE_HEADER):
        return "an HTTP header name"
    return "a gjson path (choices.0.delta.content) or a JSONPath ($.choices[0].delta.content)"
