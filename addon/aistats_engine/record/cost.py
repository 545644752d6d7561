"""Cost of one request: ``cost_usd`` and ``cost_source`` (record.md).

Prices come from the user's own table (config ``aistats: prices:``, ``cost_source: "config"``),
else from the ``genai-prices`` package's bundled price database (``cost_source:
"genai-prices <version> (bundled data)"``; its data ships with each release and has no separate
version or date). Nothing is fetched at run time unless the user opts in (``allow_fetch``: the
package's ``UpdatePrices`` background thread, hourly; the source then says ``data fetched
<time>``). A model without a known price, or unknown usage, gives ``(None, "unknown")``,
never 0.

Usage meaning: our records follow OTel, ``input_tokens`` includes cache reads and cache writes
and ``output_tokens`` includes reasoning. genai-prices (0.2.x) means the same: its
``input_tokens`` is the total and ``cache_read_tokens`` / ``cache_write_tokens`` are parts of it
(it prices ``input − cache`` at the input rate), and ``output_reasoning_tokens`` is a part of
``output_tokens``. So the counts pass through unchanged.

Cost per call: the (provider, model) → price entry lookup is cached (a miss in the library
scans every model of a provider, ~50 µs; an unknown model is cached as unknown). Within one
long-context band the library's price is a linear function of the token counts, so its
coefficients are taken once per price period and band from the library's own ``calc_price``
and applied in exact Decimal arithmetic: the same figure as the library's (checked in the tests
against every bundled model), ~2-3 µs per call instead of ~50 µs.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

# OTel / aistats provider name → genai-prices provider id. A provider not named here (local
# servers: llama.cpp, vllm, ollama, …; a user's own name) has no library price.
PROVIDER_IDS: dict[str, str] = {
    "openai": "openai",
    "anthropic": "anthropic",
    "gcp.gemini": "google",
    "gcp.vertex_ai": "google",
    "gcp.gen_ai": "google",
    "aws.bedrock": "aws",
    "azure.ai.openai": "azure",
    "azure.ai.inference": "azure",
    "cohere": "cohere",
    "deepseek": "deepseek",
    "groq": "groq",
    "mistral_ai": "mistral",
    "perplexity": "perplexity",
    "x_ai": "x-ai",
    "moonshot_ai": "moonshotai",
    "openrouter": "openrouter",
    "cerebras": "cerebras",
    "together": "together",
    "fireworks": "fireworks",
    "novita": "novita",
    "baseten": "baseten",
    "voyage": "voyageai",
    "zai": "zai",
    "zhipu": "zhipuai",
    "minimax": "minimax",
    "github_copilot": "github-copilot",
    "cloudflare": "cloudflare",
    "databricks": "databricks",
    "modal": "modal",
    "ovhcloud": "ovhcloud",
    "arcee": "arcee",
    "avian": "avian",
    "meta": "meta",
}

UNKNOWN = "unknown"
CONFIG = "config"

_PRICE_KEYS = ("input_per_mtok", "output_per_mtok", "cache_read_per_mtok",
               "cache_write_per_mtok", "reasoning_per_mtok")
_ENTRY_KEYS = ("provider", "model") + _PRICE_KEYS
_NO_OUTPUT_OPERATIONS = frozenset({"embeddings"})  # usage has no output count


@dataclass(frozen=True, slots=True)
class UserPrice:
    """One ``aistats: prices:`` entry, USD per million tokens.

    ``provider`` and ``model`` are case-insensitive globs (``*`` when omitted; an omitted or
    ``*`` provider also matches a record without one). Cache reads and writes cost the input
    rate and reasoning the output rate unless given.
    """

    provider: str = "*"
    model: str = "*"
    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0
    cache_read_per_mtok: float | None = None
    cache_write_per_mtok: float | None = None
    reasoning_per_mtok: float | None = None
    _provider_re: re.Pattern[str] | None = field(default=None, compare=False, repr=False)
    _model_re: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    def matches(self, provider: str | None, model: str) -> bool:
        """``provider``/``model`` lower-case."""
        if self.provider != "*":
            if provider is None:
                return False
            prx = self._provider_re or re.compile(fnmatch.translate(self.provider.lower()))
            if prx.fullmatch(provider) is None:
                return False
        if self.model != "*":
            mrx = self._model_re or re.compile(fnmatch.translate(self.model.lower()))
            if mrx.fullmatch(model) is None:
                return False
        return True


def _number(v: object) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    f = float(v)
    if not math.isfinite(f) or f < 0:
        return None
    return f


def parse_prices(raw: object, where: str) -> tuple[UserPrice, ...]:
    """The config's ``prices`` list → :class:`UserPrice` entries, in config order (the first
    matching entry prices a record). ``None`` → ``()``. A bad entry raises
    ``ValueError("<where>[i].<key>: <value> is invalid; expected …")``."""
    if raw is None:
        return ()
    if not isinstance(raw, (list, tuple)):
        raise ValueError(f"{where}: {raw!r} is invalid; expected a list of price entries "
                         "such as {provider: llama.cpp, model: 'qwen*', input_per_mtok: 0.1, "
                         "output_per_mtok: 0.2}")
    out: list[UserPrice] = []
    for i, entry in enumerate(raw):
        at = f"{where}[{i}]"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{at}: {entry!r} is invalid; expected a mapping with "
                             "input_per_mtok and output_per_mtok (and optional provider, model, "
                             "cache_read_per_mtok, cache_write_per_mtok, reasoning_per_mtok)")
        for key in entry:
            if key not in _ENTRY_KEYS:
                raise ValueError(f"{at}.{key}: {entry[key]!r} is invalid; expected one of the "
                                 f"keys {', '.join(_ENTRY_KEYS)}")
        globs: dict[str, str] = {}
        for key in ("provider", "model"):
            v = entry.get(key, "*")
            if not isinstance(v, str) or not v.strip():
                raise ValueError(f"{at}.{key}: {v!r} is invalid; expected a non-empty name or "
                                 "glob such as 'qwen*'")
            globs[key] = v.strip()
        prices: dict[str, float | None] = {}
        for key in _PRICE_KEYS:
            required = key in ("input_per_mtok", "output_per_mtok")
            if key not in entry and not required:
                prices[key] = None
                continue
            v = entry.get(key)
            f = _number(v)
            if f is None:
                raise ValueError(f"{at}.{key}: {v!r} is invalid; expected a number >= 0 "
                                 "(USD per million tokens)")
            prices[key] = f
        p, m = globs["provider"], globs["model"]
        out.append(UserPrice(
            provider=p, model=m,
            input_per_mtok=prices["input_per_mtok"] or 0.0,
            output_per_mtok=prices["output_per_mtok"] or 0.0,
            cache_read_per_mtok=prices["cache_read_per_mtok"],
            cache_write_per_mtok=prices["cache_write_per_mtok"],
            reasoning_per_mtok=prices["reasoning_per_mtok"],
            _provider_re=None if p == "*" else re.compile(fnmatch.translate(p.lower())),
            _model_re=None if m == "*" else re.compile(fnmatch.translate(m.lower())),
        ))
    return tuple(out)


# --- price entries --------------------------------------------------------------------------

# The library usage keys we pass, in the order of a counts vector, and a consistent base
# usage to measure each key's marginal price from (cache and modality parts nested in their
# totals; the input total is set per long-context band).
_KEYS = ("input_tokens", "cache_read_tokens", "cache_write_tokens", "input_audio_tokens",
         "input_image_tokens", "cache_audio_read_tokens", "cache_image_read_tokens",
         "output_tokens", "output_reasoning_tokens", "output_audio_tokens",
         "output_image_tokens")
_BASE = (0, 3, 1, 2, 2, 1, 1, 4, 1, 1, 1)  # input_tokens: per band
_MIN_INPUT = 8  # the base's input total stays consistent with one more of any input part


class _UserEntry:
    __slots__ = ("rates",)

    def __init__(self, up: UserPrice) -> None:
        per = 1_000_000
        i, o = up.input_per_mtok, up.output_per_mtok
        cr = up.cache_read_per_mtok if up.cache_read_per_mtok is not None else i
        cw = up.cache_write_per_mtok if up.cache_write_per_mtok is not None else i
        r = up.reasoning_per_mtok if up.reasoning_per_mtok is not None else o
        # (uncached input, cache read, cache write, non-reasoning output, reasoning) per token
        self.rates = tuple(Decimal(repr(x)) / per for x in (i, cr, cw, o, r))


class _LibEntry:
    """A genai-prices model with its provider, and the linear form of its price periods."""

    __slots__ = ("provider", "model", "_linear")

    def __init__(self, provider: Any, model: Any) -> None:
        self.provider = provider
        self.model = model
        # id(ModelPrice) → its _Linear; a model has a few dated price periods
        self._linear: dict[int, _Linear] = {}

    def linear(self, model_price: Any) -> _Linear:
        lin = self._linear.get(id(model_price))
        if lin is None or lin.model_price is not model_price:
            if len(self._linear) > 16:
                self._linear.clear()
            lin = self._linear[id(model_price)] = _Linear(model_price)
        return lin


class _Linear:
    """One ModelPrice as ``fixed + Σ rate × count`` per long-context band.

    Within one band (the tiers the input total selects, as the library selects them: the
    highest tier whose start the total exceeds, for every tiered price) the library's price is a
    linear function of the raw counts (each priced part is a count minus its priced
    sub-parts). Each count's marginal price is measured once per band with the library's own
    ``calc_price`` from a consistent base usage inside the band, in exact Decimal arithmetic.
    """

    __slots__ = ("model_price", "starts", "bands")

    def __init__(self, model_price: Any) -> None:
        from genai_prices.types import TieredPrices

        self.model_price = model_price
        self.starts = tuple(tuple(t.start for t in v.tiers) for v in vars(model_price).values()
                            if isinstance(v, TieredPrices))
        self.bands: dict[tuple[int, ...], tuple[Decimal, tuple[Decimal, ...]] | None] = {}

    def coefficients(self, total_input: int) -> tuple[Decimal, tuple[Decimal, ...]] | None:
        """``(fixed, marginal price per count in _KEYS order)`` for this input total; None when
        the band is too narrow to measure or the library cannot price the base usage."""
        key = tuple(sum(1 for s in st if total_input > s) for st in self.starts)
        try:
            return self.bands[key]
        except KeyError:
            pass
        low, high = -1, math.inf
        for st, k in zip(self.starts, key, strict=True):
            if k:
                low = max(low, st[k - 1])
            if k < len(st):
                high = min(high, st[k])
        t0 = max(low + 1, _MIN_INPUT)
        coef = None
        if t0 + 1 <= high:
            try:
                coef = _band_coefficients(self.model_price, t0)
            except Exception:
                coef = None
        if len(self.bands) > 64:
            self.bands.clear()
        self.bands[key] = coef
        return coef


def _band_coefficients(model_price: Any, t0: int) -> tuple[Decimal, tuple[Decimal, ...]]:
    from genai_prices import Usage

    def cost(counts: tuple[int, ...]) -> Decimal:
        usage = Usage(**{k: v for k, v in zip(_KEYS, counts, strict=True) if v})
        return model_price.calc_price(usage)["total_price"]

    base = (t0,) + _BASE[1:]
    at_base = cost(base)
    marginal = []
    for i in range(len(_KEYS)):
        plus = list(base)
        plus[i] += 1
        marginal.append(cost(tuple(plus)) - at_base)
    fixed = at_base - sum((m * b for m, b in zip(marginal, base, strict=True)), Decimal(0))
    return fixed, tuple(marginal)


def _consistent(c: tuple[int, ...]) -> bool:
    """Every part within its total (the library refuses the rest)."""
    inp, cr, cw, ia, ii, cra, cri, out, rs, oa, oi = c
    return (min(c) >= 0 and cra <= cr and cri <= cr and cra + cri <= cr and cra <= ia
            and cri <= ii and inp - cr - cw - (ia - cra) - (ii - cri) >= 0
            and out - rs - oa - oi >= 0)


_MISS = object()


class Pricer:
    """Prices one record. Cheap in the hot case (a cached price entry); see the module
    docstring. Not thread-safe (used from mitmproxy's event loop)."""

    def __init__(self, user_prices: tuple[UserPrice, ...] = (), allow_fetch: bool = False,
                 cache_size: int = 1024) -> None:
        import genai_prices
        from genai_prices import data_snapshot

        self.user_prices = tuple(user_prices)
        self.cache_size = max(16, cache_size)
        self._version = genai_prices.__version__
        self._data_snapshot = data_snapshot
        self._snapshot: Any = None
        self._source = UNKNOWN
        self._cache: dict[tuple[str | None, str], Any] = {}
        self._updater: Any = None
        self._sync_snapshot()  # loads the bundled data now, not on the first request
        if allow_fetch:
            self._updater = genai_prices.UpdatePrices()
            self._updater.start()

    def close(self) -> None:
        """Stop the opt-in background price updates, if running."""
        if self._updater is not None:
            self._updater.stop()
            self._updater = None

    @property
    def library_source(self) -> str:
        """``cost_source`` of a library price with the data in use now."""
        self._sync_snapshot()
        return self._source

    def _sync_snapshot(self) -> Any:
        snap = self._data_snapshot.get_snapshot()
        if snap is not self._snapshot:
            self._snapshot = snap
            self._cache.clear()
            if getattr(snap, "from_auto_update", False):
                ts = snap.timestamp.astimezone(UTC).strftime("%Y-%m-%dT%H:%MZ")
                self._source = f"genai-prices {self._version} (data fetched {ts})"
            else:
                self._source = f"genai-prices {self._version} (bundled data)"
        return snap

    # -- lookups --

    def _entry(self, provider: str | None, model: str) -> Any:
        key = (provider, model)
        e = self._cache.get(key, _MISS)
        if e is _MISS:
            e = self._find(provider, model)
            if len(self._cache) >= self.cache_size:
                del self._cache[next(iter(self._cache))]
            self._cache[key] = e
        return e

    def _find(self, provider: str | None, model: str) -> Any:
        prov_l = provider.lower() if provider else None
        model_l = model.lower()
        for up in self.user_prices:
            if up.matches(prov_l, model_l):
                return _UserEntry(up)
        try:
            return self._find_library(prov_l, model_l)
        except Exception:  # odd data: no price rather than a failed record
            return None

    def _find_library(self, provider: str | None, model: str) -> _LibEntry | None:
        from genai_prices.data_snapshot import find_provider_by_id

        providers = self._snapshot.providers
        lib_provider = None
        if provider is not None:
            pid = PROVIDER_IDS.get(provider)
            if pid is None:
                # the library's own id, spelled exactly (e.g. a user host named "openrouter")
                pid = next((p.id for p in providers if p.id == provider), None)
            if pid is None:
                return None
            lib_provider = find_provider_by_id(providers, pid)
        else:
            # no provider known: the library's guess from the model name (claude → anthropic)
            lib_provider = next((p for p in providers if p.model_match is not None
                                 and p.model_match.is_match(model)), None)
        if lib_provider is None:
            return None
        found = lib_provider.find_model(model, all_providers=providers)
        return _LibEntry(lib_provider, found) if found is not None else None

    # -- pricing --

    def price(self, provider: str | None, model: str | None, input_tokens: int | None,
              output_tokens: int | None, cached_tokens: int | None,
              cache_creation_tokens: int | None, reasoning_tokens: int | None,
              timestamp: float | None = None, *, fallback_model: str | None = None,
              operation: str | None = None,
              input_audio_tokens: int | None = None, input_image_tokens: int | None = None,
              cached_audio_tokens: int | None = None, cached_image_tokens: int | None = None,
              output_audio_tokens: int | None = None, output_image_tokens: int | None = None,
              ) -> tuple[float | None, str]:
        """``(cost_usd, cost_source)``; ``(None, "unknown")`` when the model has no price or the
        usage is unknown or inconsistent (a part above its total).

        Token counts in OTel meaning: input includes cache reads and writes, output includes
        reasoning; the audio/image counts are parts of input/output (cached ones parts of the
        cached count), priced at the library's modality rates where it has them, else as text.
        ``timestamp``: request start (epoch seconds) for dated prices; None → now.
        ``fallback_model``: tried when ``model`` has no price (pass the requested model when
        ``model`` is the response's). ``operation``: ``embeddings`` prices a missing output
        count as 0.
        """
        if input_tokens is None:
            return None, UNKNOWN
        if output_tokens is None:
            if operation not in _NO_OUTPUT_OPERATIONS:
                return None, UNKNOWN
            output_tokens = 0
        counts = (input_tokens, cached_tokens or 0, cache_creation_tokens or 0,
                  input_audio_tokens or 0, input_image_tokens or 0, cached_audio_tokens or 0,
                  cached_image_tokens or 0, output_tokens, reasoning_tokens or 0,
                  output_audio_tokens or 0, output_image_tokens or 0)
        if not _consistent(counts):
            return None, UNKNOWN

        self._sync_snapshot()
        entry = None
        for m in (model, fallback_model):
            if m:
                entry = self._entry(provider, m)
                if entry is not None:
                    break
        if entry is None:
            return None, UNKNOWN

        if isinstance(entry, _UserEntry):
            a, b, c, d, e = entry.rates
            cr, cw, rs = counts[1], counts[2], counts[8]
            total = (a * (input_tokens - cr - cw) + b * cr + c * cw
                     + d * (output_tokens - rs) + e * rs)
            return float(total), CONFIG

        try:
            when = (datetime.fromtimestamp(timestamp, UTC) if timestamp is not None
                    else datetime.now(UTC))
            model_price = entry.model.get_prices(when)
            coef = entry.linear(model_price).coefficients(input_tokens)
            if coef is not None:
                total, marginal = coef
                for m_, n in zip(marginal, counts, strict=True):
                    if n:
                        total += m_ * n
            else:
                from genai_prices import Usage

                usage = Usage(**{k: v for k, v in zip(_KEYS, counts, strict=True) if v})
                total = entry.model.calc_price(usage, entry.provider,
                                               genai_request_timestamp=when).total_price
        except Exception:  # a price the library cannot compute: unknown, never a guess
            return None, UNKNOWN
        return float(total), self._source
