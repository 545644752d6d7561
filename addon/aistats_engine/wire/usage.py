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

    def merge(self, new: Usage) -> None:
        """The one stream merge rule: input/output are replaced by a later value only when it is
        greater than 0 (or nothing was known yet); cache and reasoning counts whenever reported."""
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

    def usage(self, **counts: int | None) -> Usage:
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


def anthropic_usage(u: dict) -> Usage:
    """Anthropic messages: cache reads and writes are outside ``input_tokens``; add them."""
    c = _Counts()
    read, created = c(u.get("cache_read_input_tokens")), c(u.get("cache_creation_input_tokens"))
    return c.usage(input=c.sum(c(u.get("input_tokens")), read, created),
                   output=c(u.get("output_tokens")), cached=read, cache_creation=created)


def bedrock_usage(u: dict) -> Usage:
    """Bedrock Converse: cache reads and writes are outside ``inputTokens``; add them."""
    c = _Counts()
    read, written = c(u.get("cacheReadInputTokens")), c(u.get("cacheWriteInputTokens"))
    return c.usage(input=c.sum(c(u.get("inputTokens")), read, written),
                   output=c(u.get("outputTokens")), cached=read, cache_creation=written)


def bedrock_invocation_metrics(m: dict) -> Usage:
    """Bedrock InvokeModel streams: ``amazon-bedrock-invocationMetrics`` on the last chunk."""
    c = _Counts()
    read, written = c(m.get("cacheReadInputTokenCount")), c(m.get("cacheWriteInputTokenCount"))
    return c.usage(input=c.sum(c(m.get("inputTokenCount")), read, written),
                   output=c(m.get("outputTokenCount")), cached=read, cache_creation=written)


def gemini_usage(m: dict) -> Usage | None:
    """Gemini ``usageMetadata``: output is candidates + thoughts, input adds tool-use prompt."""
    if "promptTokenCount" not in m and "candidatesTokenCount" not in m:
        return None
    c = _Counts()
    thoughts = c(m.get("thoughtsTokenCount"))
    return c.usage(input=c.sum(c(m.get("promptTokenCount")), c(m.get("toolUsePromptTokenCount"))),
                   output=c.sum(c(m.get("candidatesTokenCount")), thoughts),
                   cached=c(m.get("cachedContentTokenCount")), reasoning=thoughts)


def ollama_usage(obj: dict) -> Usage:
    """Ollama's final object: ``prompt_eval_count`` / ``eval_count`` at the top level."""
    c = _Counts()
    return c.usage(input=c(obj.get("prompt_eval_count")), output=c(obj.get("eval_count")))


def _from_usage_object(u: dict, anthropic: bool) -> Usage | None:
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
