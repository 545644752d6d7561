"""Token usage and server speeds: one reader per provider's usage shape, the stream merge rule,
and the final resolution (contract: shared/spec/usage.md).

Counts have OTel meaning: input includes cache reads and writes, output includes reasoning.
A field the provider did not report stays None. A count that is reported but cannot be a token
count (negative, fractional, absurdly large, not a number) also becomes None, and the usage is
marked ``invalid`` so the record says so in ``parse_error`` instead of passing the value on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# More tokens than any request can use (10 billion): such a count is a bug or an attack.
MAX_TOKENS = 10_000_000_000


@dataclass(slots=True)
class Usage:
    input: int | None = None
    output: int | None = None
    cached: int | None = None
    cache_creation: int | None = None
    reasoning: int | None = None
    invalid: bool = False  # some reported count was not a valid token count
    # Merging only (not part of the result): the input count outside cache reads and writes,
    # for the shapes whose input total is a sum of parts (Anthropic, Bedrock) — ``summed``;
    # ``whole``: this usage replaces every earlier one whole (Gemini ``usageMetadata``).
    input_uncached: int | None = None
    summed: bool = False
    whole: bool = False

    def merge(self, new: Usage) -> None:
        """The one stream merge rule: input/output are replaced by a later value only when it is
        greater than 0 (or nothing was known yet); cache and reasoning counts whenever reported.
        An input that is a sum of parts is summed again from the merged parts (a later explicit
        ``cache_read_input_tokens: 0`` lowers the total with the cached count). A ``whole`` usage
        (Gemini: the last ``usageMetadata`` wins) replaces everything."""
        if new.whole:
            invalid = self.invalid | new.invalid
            (self.input, self.output, self.cached, self.cache_creation, self.reasoning,
             self.input_uncached, self.summed, self.whole) = (
                new.input, new.output, new.cached, new.cache_creation, new.reasoning,
                new.input_uncached, new.summed, True)
            self.invalid = invalid
            return
        if new.summed and self.summed:
            base = new.input_uncached
            if base is not None and (base > 0 or self.input_uncached is None):
                self.input_uncached = base
            if new.cached is not None:
                self.cached = new.cached
            if new.cache_creation is not None:
                self.cache_creation = new.cache_creation
            parts = [p for p in (self.input_uncached, self.cached, self.cache_creation)
                     if p is not None]
            if parts:
                self.input = sum(parts)
            if new.output is not None and (new.output > 0 or self.output is None):
                self.output = new.output
            if new.reasoning is not None:
                self.reasoning = new.reasoning
            self.invalid |= new.invalid
            return
        if new.input is not None and (new.input > 0 or self.input is None):
            self.input = new.input
        if new.output is not None and (new.output > 0 or self.output is None):
            self.output = new.output
        if new.cached is not None:
            self.cached = new.cached
        if new.cache_creation is not None:
            self.cache_creation = new.cache_creation
        if new.reasoning is not None:
            self.reasoning = new.reasoning
        self.invalid |= new.invalid


class _Counts:
    """Reads token counts from one usage object, remembering whether any was invalid."""

    __slots__ = ("invalid",)

    def __init__(self) -> None:
        self.invalid = False

    def __call__(self, v: Any) -> int | None:
        if v is None:
            return None
        if v.__class__ is int and 0 <= v <= MAX_TOKENS:
            return v
        if v.__class__ is float and v.is_integer() and 0 <= v <= MAX_TOKENS:
            return int(v)
        self.invalid = True
        return None

    def sum(self, *parts: int | None) -> int | None:
        """Sum of the known parts; None when none is known (an absent part counts 0)."""
        known = [p for p in parts if p is not None]
        return sum(known) if known else None

    def usage(self, **counts: Any) -> Usage:
        return Usage(invalid=self.invalid, **counts)


def _num(v: Any) -> float | None:
    """A finite, non-negative number (speeds, durations), else None."""
    if v.__class__ not in (int, float) or not math.isfinite(v) or v < 0:
        return None
    return float(v)


def _sub(d: Any, key: str) -> dict:
    v = d.get(key) if isinstance(d, dict) else None
    return v if isinstance(v, dict) else {}


# -- one reader per usage shape ---------------------------------------------------------------

def openai_usage(u: dict) -> Usage:
    """OpenAI chat / completions / embeddings (``prompt_tokens``; DeepSeek's cache-hit count)."""
    c = _Counts()
    cached = c(_sub(u, "prompt_tokens_details").get("cached_tokens"))
    if cached is None:
        cached = c(u.get("prompt_cache_hit_tokens"))
    return c.usage(input=c(u.get("prompt_tokens")), output=c(u.get("completion_tokens")),
                   cached=cached,
                   reasoning=c(_sub(u, "completion_tokens_details").get("reasoning_tokens")))


def responses_usage(u: dict) -> Usage:
    """OpenAI Responses (``input_tokens`` with ``*_details``)."""
    c = _Counts()
    return c.usage(input=c(u.get("input_tokens")), output=c(u.get("output_tokens")),
                   cached=c(_sub(u, "input_tokens_details").get("cached_tokens")),
                   reasoning=c(_sub(u, "output_tokens_details").get("reasoning_tokens")))


def _summed(c: _Counts, base: int | None, read: int | None, written: int | None,
            output: int | None) -> Usage:
    """A usage whose input total is uncached input + cache reads + cache writes."""
    return c.usage(input=c.sum(base, read, written), output=output, cached=read,
                   cache_creation=written, input_uncached=base, summed=True)


def anthropic_usage(u: dict) -> Usage:
    """Anthropic messages: cache reads and writes are outside ``input_tokens``; add them."""
    c = _Counts()
    return _summed(c, c(u.get("input_tokens")), c(u.get("cache_read_input_tokens")),
                   c(u.get("cache_creation_input_tokens")), c(u.get("output_tokens")))


def bedrock_usage(u: dict) -> Usage:
    """Bedrock Converse: cache reads and writes are outside ``inputTokens``; add them."""
    c = _Counts()
    return _summed(c, c(u.get("inputTokens")), c(u.get("cacheReadInputTokens")),
                   c(u.get("cacheWriteInputTokens")), c(u.get("outputTokens")))


def bedrock_invocation_metrics(m: dict) -> Usage:
    """Bedrock InvokeModel streams: ``amazon-bedrock-invocationMetrics`` on the last chunk."""
    c = _Counts()
    return _summed(c, c(m.get("inputTokenCount")), c(m.get("cacheReadInputTokenCount")),
                   c(m.get("cacheWriteInputTokenCount")), c(m.get("outputTokenCount")))


_GEMINI_COUNTS = ("promptTokenCount", "candidatesTokenCount", "thoughtsTokenCount",
                  "totalTokenCount")


def gemini_usage(m: dict) -> Usage | None:
    """Gemini ``usageMetadata`` (the last one wins whole): input is prompt + tool-use prompt;
    output is candidates + thoughts, an absent ``candidatesTokenCount`` counting 0 (a thinking
    model whose whole output is thoughts, or a last chunk that drops it). ``totalTokenCount`` is
    used only then: output = total − input when that is at least the thoughts (the candidates
    the chunk did not count); with candidates reported, the parts are kept as they are."""
    if not any(k in m for k in _GEMINI_COUNTS):
        return None
    c = _Counts()
    thoughts = c(m.get("thoughtsTokenCount"))
    candidates = c(m.get("candidatesTokenCount"))
    inp = c.sum(c(m.get("promptTokenCount")), c(m.get("toolUsePromptTokenCount")))
    output = c.sum(candidates, thoughts)
    if candidates is None:
        total = c(m.get("totalTokenCount"))
        if total is not None and inp is not None and total - inp >= (thoughts or 0):
            output = total - inp
    return c.usage(input=inp, output=output, cached=c(m.get("cachedContentTokenCount")),
                   reasoning=thoughts, whole=True)


def _statistics_sum(c: _Counts, items: Any, key: str, inner: str | None) -> int | None:
    """Sum of ``[inner.]statistics.<key>`` over embedding items; None when none reports it."""
    if isinstance(items, dict):
        items = [items]
    total = None
    if isinstance(items, list):
        for it in items:
            e = it.get(inner) if inner and isinstance(it, dict) else it
            n = c(_sub(e, "statistics").get(key))
            if n is not None:
                total = (total or 0) + n
    return total


def gemini_embed_usage(obj: dict) -> Usage | None:
    """Gemini / Vertex ``embedContent`` and ``batchEmbedContents``: input tokens from
    ``usageMetadata.promptTokenCount`` when reported (Vertex), else the sum of the embeddings'
    ``statistics.tokenCount``; an embedding has no output count."""
    c = _Counts()
    m = obj.get("usageMetadata")
    if isinstance(m, dict) and "promptTokenCount" in m:
        return c.usage(input=c(m.get("promptTokenCount")))
    items = obj.get("embeddings") if "embeddings" in obj else obj.get("embedding")
    n = _statistics_sum(c, items, "tokenCount", None)
    return c.usage(input=n) if n is not None or c.invalid else None


def vertex_predict_usage(obj: dict) -> Usage | None:
    """Vertex ``predict`` on an embedding model: the sum of
    ``predictions[].embeddings.statistics.token_count``."""
    c = _Counts()
    n = _statistics_sum(c, obj.get("predictions"), "token_count", "embeddings")
    return c.usage(input=n) if n is not None or c.invalid else None


def cohere_usage(u: dict) -> Usage:
    """Cohere v2 (``usage`` of chat, ``meta`` of embed): ``tokens`` counts, else
    ``billed_units``, field by field."""
    c = _Counts()
    tokens, billed = _sub(u, "tokens"), _sub(u, "billed_units")

    def pick(key: str) -> int | None:
        v = c(tokens.get(key))
        return v if v is not None else c(billed.get(key))

    return c.usage(input=pick("input_tokens"), output=pick("output_tokens"))


# Where a token-counting endpoint puts its count: Anthropic and OpenAI ``input_tokens``,
# Gemini ``totalTokens``, Bedrock ``inputTokens``.
_COUNTED_KEYS = ("input_tokens", "totalTokens", "inputTokens")


def read_counted(obj: Any) -> tuple[int | None, bool]:
    """The count a token-counting endpoint answered, and whether it was reported but invalid."""
    if not isinstance(obj, dict):
        return None, False
    c = _Counts()
    for key in _COUNTED_KEYS:
        if key in obj:
            return c(obj[key]), c.invalid
    return None, False


def ollama_usage(obj: dict) -> Usage:
    """Ollama's final object: ``prompt_eval_count`` / ``eval_count`` at the top level."""
    c = _Counts()
    return c.usage(input=c(obj.get("prompt_eval_count")), output=c(obj.get("eval_count")))


def _from_usage_object(u: dict, anthropic: bool) -> Usage | None:
    if u.get("tokens").__class__ is dict or u.get("billed_units").__class__ is dict:
        return cohere_usage(u)
    if "prompt_tokens" in u or "completion_tokens" in u:
        return openai_usage(u)
    if "input_tokens" in u or "output_tokens" in u:
        if anthropic or "cache_read_input_tokens" in u or "cache_creation_input_tokens" in u:
            return anthropic_usage(u)
        return responses_usage(u)
    if "inputTokens" in u or "outputTokens" in u:
        return bedrock_usage(u)
    return None


def read_usage(obj: dict, anthropic: bool = False) -> Usage | None:
    """Usage reported in one JSON object (a whole body or one stream event), whatever its shape,
    or None. ``anthropic``: an ``input_tokens`` shape is Anthropic's (cache added to input)."""
    u = obj.get("usage")
    if isinstance(u, dict):
        found = _from_usage_object(u, anthropic)
        if found is not None:
            return found
    for outer in ("response", "message"):  # Responses events, Anthropic message_start
        inner = obj.get(outer)
        if isinstance(inner, dict) and isinstance(inner.get("usage"), dict):
            found = _from_usage_object(inner["usage"], anthropic)
            if found is not None:
                return found
    m = obj.get("usageMetadata")
    if isinstance(m, dict):
        return gemini_usage(m)
    if "prompt_eval_count" in obj or "eval_count" in obj:
        return ollama_usage(obj)
    g = obj.get("x_groq")  # Groq streams: usage inside x_groq when there is no top-level one
    if isinstance(g, dict) and isinstance(g.get("usage"), dict):
        return _from_usage_object(g["usage"], anthropic)
    return None


@dataclass(slots=True)
class ServerStats:
    """What the server said about its own speed: llama.cpp ``timings``, vLLM ``metrics``,
    Ollama durations. Each source's last object wins whole."""

    timings: dict | None = None
    metrics: dict | None = None
    ollama: dict | None = None

    def take(self, obj: dict) -> set[str]:
        """Keep the server blocks of one object; returns provider hints it revealed."""
        hints: set[str] = set()
        t = obj.get("timings")
        if isinstance(t, dict) and t:
            self.timings = t
            hints.add("llama.cpp")
        m = obj.get("metrics")
        if isinstance(m, dict) and ("mean_itl_ms" in m or "time_to_first_token_ms" in m
                                    or "speculative_decoding" in m):
            self.metrics = m
            hints.add("vllm")
        if "eval_duration" in obj or "prompt_eval_duration" in obj or "total_duration" in obj:
            self.ollama = obj
        return hints


@dataclass(slots=True)
class Speeds:
    """What the server reported about its own speed (never estimated here)."""

    prompt_per_second: float | None = None
    tokens_per_second: float | None = None
    server_duration_ms: float | None = None
    draft_tokens: int | None = None
    draft_accepted_tokens: int | None = None


def resolve(usage: Usage | None, stats: ServerStats) -> tuple[Usage, str, Speeds]:
    """Final counts, their source (``reported`` | ``server_timings`` | ``missing``) and speeds.
    Reported usage gives the counts; timings give speeds (and counts only when no usage)."""
    c = _Counts()
    t = stats.timings or {}
    if usage is not None:
        source = "reported"
        if usage.cached is None:
            usage.cached = c(t.get("cache_n"))
    elif t and ("prompt_n" in t or "predicted_n" in t):
        cache_n = c(t.get("cache_n"))
        usage = Usage(input=c.sum(c(t.get("prompt_n")), cache_n), output=c(t.get("predicted_n")),
                      cached=cache_n)
        source = "server_timings"
    else:
        usage, source = Usage(), "missing"
    out = Speeds()
    if t:
        out.prompt_per_second = _num(t.get("prompt_per_second"))
        out.tokens_per_second = _num(t.get("predicted_per_second"))
        pm, gm = _num(t.get("prompt_ms")), _num(t.get("predicted_ms"))
        if pm is not None and gm is not None:
            out.server_duration_ms = pm + gm
        dn, da = c(t.get("draft_n")), c(t.get("draft_n_accepted"))
        if dn is not None and da is not None:
            out.draft_tokens, out.draft_accepted_tokens = dn, da
    m = stats.metrics
    if m:
        ttft = _num(m.get("time_to_first_token_ms"))
        if ttft and usage.input is not None:
            out.prompt_per_second = max(usage.input - (usage.cached or 0), 0) / (ttft / 1000)
        itl = _num(m.get("mean_itl_ms"))
        if itl:
            out.tokens_per_second = 1000 / itl
        sd = _sub(m, "speculative_decoding")
        dn, da = c(sd.get("num_draft_tokens")), c(sd.get("num_accepted_draft_tokens"))
        if dn is not None and da is not None:
            out.draft_tokens, out.draft_accepted_tokens = dn, da
    o = stats.ollama
    if o:
        ped, ed = _num(o.get("prompt_eval_duration")), _num(o.get("eval_duration"))
        pc, ec = c(o.get("prompt_eval_count")), c(o.get("eval_count"))
        if ped and pc is not None:
            out.prompt_per_second = pc / (ped / 1e9)
        if ed and ec is not None:
            out.tokens_per_second = ec / (ed / 1e9)
        total = _num(o.get("total_duration"))
        if total is not None:
            out.server_duration_ms = total / 1e6
    usage.invalid |= c.invalid
    return usage, source, out
