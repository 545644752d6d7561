"""Cost (record/cost.py): library prices with cache and reasoning, unknown models and usage,
the user's own prices, their config errors, and OTel provider names → library ids."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from decimal import Decimal

import genai_prices
import pytest
from genai_prices import Usage, calc_price
from genai_prices.data import providers as LIB_PROVIDERS

from aistats_engine.record.cost import (
    CONFIG, PROVIDER_IDS, UNKNOWN, Pricer, UserPrice, _KEYS, _Linear, parse_prices,
)

TS = datetime(2026, 11, 20, tzinfo=UTC).timestamp()
WHEN = datetime.fromtimestamp(TS, UTC)
SOURCE = f"genai-prices {genai_prices.__version__} (bundled data)"


@pytest.fixture(scope="module")
def pricer() -> Pricer:
    return Pricer()


def lib(model: str, provider_id: str, **usage: int) -> float:
    return float(calc_price(Usage(**usage), model, provider_id=provider_id,
                            genai_request_timestamp=WHEN).total_price)


def test_source_names_library_and_data(pricer):
    assert pricer.library_source == SOURCE
    assert SOURCE.startswith("genai-prices 0.")


def test_openai_cache_read_and_reasoning(pricer):
    # gpt-4o: $2.50 in, $1.25 cached in, $10 out per MTok; input 1000 includes 200 cached
    cost, source = pricer.price("openai", "gpt-4o", 1000, 300, 200, None, 100, TS)
    assert source == SOURCE
    assert cost == pytest.approx(800 * 2.5e-6 + 200 * 1.25e-6 + 300 * 10e-6)
    assert cost == lib("gpt-4o", "openai", input_tokens=1000, cache_read_tokens=200,
                       output_tokens=300, output_reasoning_tokens=100)


def test_anthropic_cache_reads_and_writes(pricer):
    # claude-sonnet-4: $3 in, $0.30 cache read, $3.75 cache write, $15 out per MTok.
    # Our input_tokens (OTel) = uncached 5000 + read 3000 + write 2000.
    cost, source = pricer.price("anthropic", "claude-sonnet-4-20250514", 10_000, 500, 3000,
                                2000, None, TS)
    assert source == SOURCE
    assert cost == pytest.approx(5000 * 3e-6 + 3000 * 0.3e-6 + 2000 * 3.75e-6 + 500 * 15e-6)
    assert cost == lib("claude-sonnet-4-20250514", "anthropic", input_tokens=10_000,
                       cache_read_tokens=3000, cache_write_tokens=2000, output_tokens=500)


def test_long_context_tier(pricer):
    # gemini-2.5-pro: above 200k input tokens every token costs the higher rate
    short, _ = pricer.price("gcp.gemini", "gemini-2.5-pro", 100_000, 1000, 0, 0, 0, TS)
    long_, _ = pricer.price("gcp.gemini", "gemini-2.5-pro", 300_000, 1000, 1000, 0, 0, TS)
    assert short == lib("gemini-2.5-pro", "google", input_tokens=100_000, output_tokens=1000)
    assert long_ == lib("gemini-2.5-pro", "google", input_tokens=300_000,
                        cache_read_tokens=1000, output_tokens=1000)
    assert long_ / 300_000 > short / 100_000  # dearer per token


def test_request_timestamp_selects_dated_prices(pricer):
    # claude-sonnet-4-6 had a 200k tier until 2026-03-13, flat after
    early = datetime(2026, 1, 1, tzinfo=UTC)
    late = datetime(2026, 6, 1, tzinfo=UTC)
    a, _ = pricer.price("anthropic", "claude-sonnet-4-6", 300_000, 10, 0, 0, 0, early.timestamp())
    b, _ = pricer.price("anthropic", "claude-sonnet-4-6", 300_000, 10, 0, 0, 0, late.timestamp())
    for cost, when in ((a, early), (b, late)):
        assert cost == float(calc_price(Usage(input_tokens=300_000, output_tokens=10),
                                        "claude-sonnet-4-6", provider_id="anthropic",
                                        genai_request_timestamp=when).total_price)
    assert a > b


def test_unknown_model_is_none_never_zero(pricer):
    assert pricer.price("openai", "no-such-model-xyz", 1000, 10, None, None, None, TS) == \
        (None, UNKNOWN)
    # local servers have no library price, even for a famous model name
    assert pricer.price("llama.cpp", "gpt-4o", 1000, 10, None, None, None, TS) == (None, UNKNOWN)
    assert pricer.price("vllm", "qwen3-8b", 1000, 10, None, None, None, TS) == (None, UNKNOWN)
    assert pricer.price("my-gateway", "gpt-4o", 1000, 10, None, None, None, TS) == \
        (None, UNKNOWN)
    assert pricer.price("openai", None, 1000, 10, None, None, None, TS) == (None, UNKNOWN)


def test_unknown_or_inconsistent_usage_is_none(pricer):
    assert pricer.price("openai", "gpt-4o", None, None, None, None, None, TS) == (None, UNKNOWN)
    assert pricer.price("openai", "gpt-4o", None, 10, None, None, None, TS) == (None, UNKNOWN)
    assert pricer.price("openai", "gpt-4o", 10, None, None, None, None, TS) == (None, UNKNOWN)
    # cache above input, reasoning above output: not a price
    assert pricer.price("openai", "gpt-4o", 10, 5, 20, None, None, TS) == (None, UNKNOWN)
    assert pricer.price("openai", "gpt-4o", 10, 5, None, None, 9, TS) == (None, UNKNOWN)
    assert pricer.price("openai", "gpt-4o", -1, 5, None, None, None, TS) == (None, UNKNOWN)


def test_zero_usage_is_a_real_zero(pricer):
    assert pricer.price("openai", "gpt-4o", 0, 0, 0, 0, 0, TS) == (0.0, SOURCE)


def test_embeddings_have_no_output_count(pricer):
    cost, source = pricer.price("openai", "text-embedding-3-small", 1000, None, None, None, None,
                                TS, operation="embeddings")
    assert source == SOURCE
    assert cost == lib("text-embedding-3-small", "openai", input_tokens=1000)


def test_fallback_model(pricer):
    # Azure: the request names a deployment, the response the model
    assert pricer.price("azure.ai.openai", "my-deployment", 1000, 10, None, None, None, TS) == \
        (None, UNKNOWN)
    cost, source = pricer.price("azure.ai.openai", "my-deployment", 1000, 10, None, None, None,
                                TS, fallback_model="gpt-4o-2024-11-20")
    assert source == SOURCE and cost == lib("gpt-4o", "azure", input_tokens=1000,
                                             output_tokens=10)


def test_no_provider_guesses_from_model_name(pricer):
    cost, source = pricer.price(None, "claude-3-5-haiku-latest", 1000, 100, None, None, None, TS)
    assert source == SOURCE
    assert cost == lib("claude-3-5-haiku-latest", "anthropic", input_tokens=1000,
                       output_tokens=100)


@pytest.mark.parametrize("otel,lib_id,model", [
    ("gcp.gemini", "google", "gemini-2.5-flash"),
    ("gcp.vertex_ai", "google", "gemini-2.0-flash-001"),
    ("gcp.vertex_ai", "google", "claude-sonnet-4@20250514"),  # Anthropic on Vertex
    ("aws.bedrock", "aws", "us.anthropic.claude-sonnet-4-20250514-v1:0"),
    ("aws.bedrock", "aws", "amazon.nova-pro-v1:0"),
    ("azure.ai.openai", "azure", "gpt-4o-2024-11-20"),
    ("mistral_ai", "mistral", "mistral-large-latest"),
    ("x_ai", "x-ai", "grok-3"),
    ("deepseek", "deepseek", "deepseek-chat"),
    ("groq", "groq", "llama-3.3-70b-versatile"),
    ("moonshot_ai", "moonshotai", "kimi-k2-0905-preview"),
    ("openrouter", "openrouter", "anthropic/claude-sonnet-4"),
])
def test_otel_provider_names_map_to_library_ids(pricer, otel, lib_id, model):
    assert PROVIDER_IDS[otel] == lib_id
    cost, source = pricer.price(otel, model, 2000, 100, None, None, None, TS)
    assert source == SOURCE, (otel, model)
    assert cost == lib(model, lib_id, input_tokens=2000, output_tokens=100)
    assert cost > 0


def test_every_mapped_provider_id_exists_in_the_library():
    ids = {p.id for p in LIB_PROVIDERS}
    assert set(PROVIDER_IDS.values()) <= ids


def _price_periods():
    for p in LIB_PROVIDERS:
        for m in p.models:
            if isinstance(m.prices, list):
                for c in m.prices:
                    yield p.id, m.id, c.prices
            else:
                yield p.id, m.id, m.prices


def test_linear_form_equals_the_library_for_every_bundled_price():
    """The fast path must give the library's own figure, for every model and price period,
    with cache, reasoning and audio/image parts, and at long-context tier boundaries."""
    # input, cache read, cache write, in audio, in image, cached audio, cached image,
    # output, reasoning, out audio, out image
    usages = [
        (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
        (1000, 200, 0, 0, 0, 0, 0, 300, 100, 0, 0),
        (10_000, 3000, 2000, 0, 0, 0, 0, 500, 0, 0, 0),
        (123_457, 100_000, 3457, 0, 0, 0, 0, 7777, 7000, 0, 0),
        (5000, 1000, 0, 800, 1200, 300, 200, 900, 100, 300, 400),
        (20, 0, 0, 20, 0, 0, 0, 50, 0, 50, 0),
    ]
    checked = 0
    for pid, mid, mp in _price_periods():
        lin = _Linear(mp)
        extra = []
        for st in lin.starts:
            for s in st:
                extra += [(s, 0, 0, 0, 0, 0, 0, 10, 0, 0, 0),
                          (s + 1, 1, 0, 0, 0, 0, 0, 10, 5, 0, 0),
                          (s + 2, 0, 1, 1, 0, 0, 0, 9, 0, 1, 0)]
        for counts in usages + extra:
            try:
                want = mp.calc_price(Usage(**{k: v for k, v in zip(_KEYS, counts) if v}))
            except Exception:
                continue
            coef = lin.coefficients(counts[0])
            if coef is None:
                continue
            fixed, marginal = coef
            got = fixed + sum((m * n for m, n in zip(marginal, counts)), Decimal(0))
            assert got == want["total_price"], (pid, mid, counts, got, want)
            checked += 1
    assert checked > 10_000


def test_audio_and_image_tokens_at_the_library_rates(pricer):
    # gpt-4o-realtime-preview prices audio input apart ($40 vs $5 text per MTok)
    cost, source = pricer.price("openai", "gpt-4o-realtime-preview", 1000, 500, 100, None, None,
                                TS, input_audio_tokens=600, cached_audio_tokens=100,
                                output_audio_tokens=400)
    assert source == SOURCE
    assert cost == lib("gpt-4o-realtime-preview", "openai", input_tokens=1000,
                       cache_read_tokens=100, input_audio_tokens=600, cache_audio_read_tokens=100,
                       output_tokens=500, output_audio_tokens=400)
    text_only, _ = pricer.price("openai", "gpt-4o-realtime-preview", 1000, 500, 100, None, None,
                                TS)
    assert cost > text_only
    cost, _ = pricer.price("openai", "gpt-image-1", 100, 4000, None, None, None, TS,
                           input_image_tokens=60)
    assert cost == lib("gpt-image-1", "openai", input_tokens=100, input_image_tokens=60,
                       output_tokens=4000)
    # a part above its total is not a price
    assert pricer.price("openai", "gpt-image-1", 100, 10, None, None, None, TS,
                        input_image_tokens=200) == (None, UNKNOWN)


# --- the user's own prices ----------------------------------------------------------------

RAW = [
    {"provider": "llama.cpp", "model": "qwen*", "input_per_mtok": 0.1, "output_per_mtok": 0.2,
     "cache_read_per_mtok": 0.01, "cache_write_per_mtok": 0.125},
    {"provider": "openai", "model": "gpt-4o*", "input_per_mtok": 1, "output_per_mtok": 2},
    {"provider": "vllm", "input_per_mtok": 0, "output_per_mtok": 0},
    {"model": "house-*", "input_per_mtok": 3, "output_per_mtok": 4, "reasoning_per_mtok": 40},
]


def test_user_prices_parse():
    prices = parse_prices(RAW, "aistats.prices")
    assert len(prices) == 4
    assert prices[0] == UserPrice("llama.cpp", "qwen*", 0.1, 0.2, 0.01, 0.125, None)
    assert prices[2].model == "*" and prices[3].provider == "*"
    assert parse_prices(None, "aistats.prices") == ()
    assert parse_prices([], "aistats.prices") == ()


def test_user_prices_by_glob_win_over_the_library():
    p = Pricer(parse_prices(RAW, "aistats.prices"))
    cost, source = p.price("llama.cpp", "Qwen3-30B-A3B", 10_000, 1000, 4000, 1000, None, TS)
    assert source == CONFIG
    assert cost == pytest.approx((5000 * 0.1 + 4000 * 0.01 + 1000 * 0.125 + 1000 * 0.2) / 1e6)
    # the library knows gpt-4o, the user's price wins
    cost, source = p.price("openai", "gpt-4o-mini", 1_000_000, 1_000_000, None, None, None, TS)
    assert (cost, source) == (3.0, CONFIG)
    # provider-only rule: everything on vllm is free, and 0 is a real price here
    assert p.price("vllm", "anything", 500, 500, None, None, None, TS) == (0.0, CONFIG)
    # model-only rule matches any provider, also none; reasoning priced apart
    cost, source = p.price(None, "house-7b", 1_000_000, 1_000_000, None, None, 500_000, TS)
    assert source == CONFIG and cost == pytest.approx(3 + 4 * 0.5 + 40 * 0.5)
    # cache priced at the input rate when not given
    cost, _ = p.price("openai", "gpt-4o", 1_000_000, 0, 500_000, None, None, TS)
    assert cost == pytest.approx(1.0)
    # no rule: the library still prices what it knows, and unknown stays unknown
    assert p.price("anthropic", "claude-sonnet-4-20250514", 1000, 10, None, None, None,
                   TS)[1] == SOURCE
    assert p.price("llama.cpp", "gemma-3", 1000, 10, None, None, None, TS) == (None, UNKNOWN)
    # user prices need usage too
    assert p.price("vllm", "x", None, None, None, None, None, TS) == (None, UNKNOWN)


def test_user_prices_first_match_wins():
    p = Pricer(parse_prices([{"model": "a*", "input_per_mtok": 1, "output_per_mtok": 1},
                             {"model": "ab*", "input_per_mtok": 9, "output_per_mtok": 9}], "p"))
    assert p.price("x", "abc", 1_000_000, 0, None, None, None, TS) == (1.0, CONFIG)


@pytest.mark.parametrize("raw,message", [
    ({"provider": "x"}, "aistats.prices: {'provider': 'x'} is invalid; expected a list"),
    (["x"], "aistats.prices[0]: 'x' is invalid; expected a mapping"),
    ([{"input_per_mtok": 1}], "aistats.prices[0].output_per_mtok: None is invalid; expected a "
                              "number >= 0"),
    ([{"input_per_mtok": 1, "output_per_mtok": -2}],
     "aistats.prices[0].output_per_mtok: -2 is invalid; expected a number >= 0"),
    ([{"input_per_mtok": "0.1", "output_per_mtok": 1}],
     "aistats.prices[0].input_per_mtok: '0.1' is invalid; expected a number >= 0"),
    ([{"input_per_mtok": True, "output_per_mtok": 1}],
     "aistats.prices[0].input_per_mtok: True is invalid"),
    ([{"input_per_mtok": float("nan"), "output_per_mtok": 1}],
     "aistats.prices[0].input_per_mtok: nan is invalid"),
    ([RAW[0], {"input_per_mtok": 1, "output_per_mtok": 1, "cache_read_per_mtok": None}],
     "aistats.prices[1].cache_read_per_mtok: None is invalid"),
    ([{"model": "", "input_per_mtok": 1, "output_per_mtok": 1}],
     "aistats.prices[0].model: '' is invalid; expected a non-empty name or glob"),
    ([{"provider": 3, "input_per_mtok": 1, "output_per_mtok": 1}],
     "aistats.prices[0].provider: 3 is invalid"),
    ([{"input_per_mtok": 1, "output_per_mtok": 1, "input_price": 2}],
     "aistats.prices[0].input_price: 2 is invalid; expected one of the keys provider, model, "
     "input_per_mtok"),
])
def test_bad_user_price_entries(raw, message):
    with pytest.raises(ValueError) as e:
        parse_prices(raw, "aistats.prices")
    text = str(e.value)
    assert text.startswith(message), text
    assert "\n" not in text


# --- cost per call ------------------------------------------------------------------------

def test_lookups_are_cached(monkeypatch):
    p = Pricer()
    calls = []
    real = p._find_library

    def counting(provider, model):
        calls.append((provider, model))
        return real(provider, model)

    monkeypatch.setattr(p, "_find_library", counting)
    for _ in range(5):
        p.price("openai", "gpt-4o", 10, 10, None, None, None, TS)
        p.price("llama.cpp", "qwen3", 10, 10, None, None, None, TS)  # unknown: cached too
    assert calls == [("openai", "gpt-4o"), ("llama.cpp", "qwen3")]


def test_cache_is_bounded():
    p = Pricer(cache_size=16)
    for i in range(100):
        p.price("openai", f"m{i}", 10, 10, None, None, None, TS)
    assert len(p._cache) <= 16


def test_hot_call_is_cheap(pricer):
    n = 2000
    for model, provider in (("gpt-4o", "openai"), ("gemini-2.5-pro", "gcp.gemini")):
        pricer.price(provider, model, 250_000, 300, 200, None, 100, TS)
        t = time.perf_counter()
        for _ in range(n):
            pricer.price(provider, model, 250_000, 300, 200, None, 100, TS)
        per_call_us = (time.perf_counter() - t) / n * 1e6
        assert per_call_us < 200, per_call_us  # ~2-3 µs measured; generous for slow CI


def test_decimal_exactness(pricer):
    cost, _ = pricer.price("openai", "gpt-4o", 3, 7, 1, None, None, TS)
    want = calc_price(Usage(input_tokens=3, output_tokens=7, cache_read_tokens=1), "gpt-4o",
                      provider_id="openai", genai_request_timestamp=WHEN).total_price
    assert Decimal(repr(cost)) == want or cost == float(want)


# --- price data: bundled unless the user opts in ------------------------------------------

def test_no_fetch_unless_opted_in(monkeypatch):
    events = []

    class FakeUpdater:
        def start(self, *, wait=False):
            events.append("start")

        def stop(self):
            events.append("stop")

    monkeypatch.setattr(genai_prices, "UpdatePrices", FakeUpdater)
    p = Pricer()
    p.price("openai", "gpt-4o", 10, 10, None, None, None, TS)
    p.close()
    assert events == []
    p = Pricer(allow_fetch=True)
    assert events == ["start"]
    p.close()
    p.close()
    assert events == ["start", "stop"]


def test_fetched_data_is_named_and_clears_the_cache():
    from genai_prices import data_snapshot

    p = Pricer()
    assert p.price("openai", "gpt-4o", 10, 10, None, None, None, TS)[1] == SOURCE
    fetched = data_snapshot.DataSnapshot(providers=list(LIB_PROVIDERS), from_auto_update=True,
                                         timestamp=datetime(2026, 11, 24, 10, 5, tzinfo=UTC))
    data_snapshot.set_custom_snapshot(fetched)
    try:
        cost, source = p.price("openai", "gpt-4o", 10, 10, None, None, None, TS)
        assert source == (f"genai-prices {genai_prices.__version__} "
                          "(data fetched 2026-11-24T10:05Z)")
        assert cost is not None and len(p._cache) == 1
    finally:
        data_snapshot.set_custom_snapshot(None)
    assert p.price("openai", "gpt-4o", 10, 10, None, None, None, TS)[1] == SOURCE
