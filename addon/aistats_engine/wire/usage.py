"""Token usage and server speeds, read from each wire format (contract: shared/spec/usage.md).

Counts have OTel meaning: input includes cache reads and writes, output includes reasoning.
A field the provider did not report stays None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ANTHROPIC_APIS = frozenset({"messages", "count_tokens"})


@dataclass(slots=True)
class Usage:
    input: int | None = None
    output: int | None = None
    cached: int | None = None
    cache_creation: int | None = None
    reasoning: int | None = None

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


def _int(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return None


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def _sub(d: Any, key: str) -> dict:
    v = d.get(key) if isinstance(d, dict) else None
    return v if isinstance(v, dict) else {}


def _sum(*parts: int | None) -> int | None:
    """Sum of the known parts; None when the first (the base count) is unknown."""
    if parts[0] is None:
        return None
    return sum(p for p in parts if p is not None)


def _from_usage_object(u: dict, api: str | None) -> Usage | None:
    if "prompt_tokens" in u or "completion_tokens" in u:  # OpenAI chat/completions/embeddings
        cached = _int(_sub(u, "prompt_tokens_details").get("cached_tokens"))
        if cached is None:
            cached = _int(u.get("prompt_cache_hit_tokens"))  # DeepSeek
        return Usage(
            input=_int(u.get("prompt_tokens")),
            output=_int(u.get("completion_tokens")),
            cached=cached,
            reasoning=_int(_sub(u, "completion_tokens_details").get("reasoning_tokens")),
        )
    if "input_tokens" in u or "output_tokens" in u:
        if api in ANTHROPIC_APIS or "cache_read_input_tokens" in u or "cache_creation_input_tokens" in u:
            read = _int(u.get("cache_read_input_tokens"))
            created = _int(u.get("cache_creation_input_tokens"))
            return Usage(
                input=_sum(_int(u.get("input_tokens")), read, created),
                output=_int(u.get("output_tokens")),
                cached=read,
                cache_creation=created,
            )
        return Usage(  # OpenAI Responses
            input=_int(u.get("input_tokens")),
            output=_int(u.get("output_tokens")),
            cached=_int(_sub(u, "input_tokens_details").get("cached_tokens")),
            reasoning=_int(_sub(u, "output_tokens_details").get("reasoning_tokens")),
        )
    if "inputTokens" in u or "outputTokens" in u:  # Bedrock Converse: cache excluded from input
        read = _int(u.get("cacheReadInputTokens"))
        written = _int(u.get("cacheWriteInputTokens"))
        return Usage(
            input=_sum(_int(u.get("inputTokens")), read, written),
            output=_int(u.get("outputTokens")),
            cached=read,
            cache_creation=written,
        )
    return None


def _from_gemini(m: dict) -> Usage | None:
    if "promptTokenCount" not in m and "candidatesTokenCount" not in m:
        return None
    thoughts = _int(m.get("thoughtsTokenCount"))
    return Usage(
        input=_sum(_int(m.get("promptTokenCount")), _int(m.get("toolUsePromptTokenCount"))),
        output=_sum(_int(m.get("candidatesTokenCount")), thoughts),
        cached=_int(m.get("cachedContentTokenCount")),
        reasoning=thoughts,
    )


def read_usage(obj: dict, api: str | None) -> Usage | None:
    """Usage reported in one JSON object (a whole body or one stream event), or None."""
    u = obj.get("usage")
    if isinstance(u, dict):
        found = _from_usage_object(u, api)
        if found is not None:
            return found
    for outer in ("response", "message"):  # Responses events, Anthropic message_start
        inner = obj.get(outer)
        if isinstance(inner, dict) and isinstance(inner.get("usage"), dict):
            found = _from_usage_object(inner["usage"], api)
            if found is not None:
                return found
    m = obj.get("usageMetadata")
    if isinstance(m, dict):
        return _from_gemini(m)
    if "prompt_eval_count" in obj or "eval_count" in obj:  # Ollama final object
        return Usage(input=_int(obj.get("prompt_eval_count")), output=_int(obj.get("eval_count")))
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
class Resolved:
    """Final counts and speeds for the record."""

    usage: Usage
    source: str  # reported | server_timings | missing
    prompt_per_second: float | None = None
    tokens_per_second: float | None = None
    server_duration_ms: float | None = None
    draft_tokens: int | None = None
    draft_accepted_tokens: int | None = None


def resolve(usage: Usage | None, stats: ServerStats) -> Resolved:
    """Reported usage gives the counts; timings give speeds (and counts only when no usage)."""
    t = stats.timings or {}
    if usage is not None:
        out = Resolved(Usage(usage.input, usage.output, usage.cached, usage.cache_creation,
                             usage.reasoning), "reported")
        if out.usage.cached is None and _int(t.get("cache_n")) is not None:
            out.usage.cached = _int(t.get("cache_n"))
    elif t and ("prompt_n" in t or "predicted_n" in t):
        cache_n = _int(t.get("cache_n"))
        out = Resolved(Usage(input=_sum(_int(t.get("prompt_n")), cache_n),
                             output=_int(t.get("predicted_n")), cached=cache_n), "server_timings")
    else:
        out = Resolved(Usage(), "missing")
    if t:
        out.prompt_per_second = _num(t.get("prompt_per_second"))
        out.tokens_per_second = _num(t.get("predicted_per_second"))
        pm, gm = _num(t.get("prompt_ms")), _num(t.get("predicted_ms"))
        if pm is not None and gm is not None:
            out.server_duration_ms = pm + gm
        dn, da = _int(t.get("draft_n")), _int(t.get("draft_n_accepted"))
        if dn is not None and da is not None:
            out.draft_tokens, out.draft_accepted_tokens = dn, da
    m = stats.metrics
    if m:
        ttft = _num(m.get("time_to_first_token_ms"))
        if ttft and ttft > 0 and out.usage.input is not None:
            out.prompt_per_second = (out.usage.input - (out.usage.cached or 0)) / (ttft / 1000)
        itl = _num(m.get("mean_itl_ms"))
        if itl and itl > 0:
            out.tokens_per_second = 1000 / itl
        sd = _sub(m, "speculative_decoding")
        dn, da = _int(sd.get("num_draft_tokens")), _int(sd.get("num_accepted_draft_tokens"))
        if dn is not None and da is not None:
            out.draft_tokens, out.draft_accepted_tokens = dn, da
    o = stats.ollama
    if o:
        ped, ed = _num(o.get("prompt_eval_duration")), _num(o.get("eval_duration"))
        pc, ec = _int(o.get("prompt_eval_count")), _int(o.get("eval_count"))
        if ped and pc is not None:
            out.prompt_per_second = pc / (ped / 1e9)
        if ed and ec is not None:
            out.tokens_per_second = ec / (ed / 1e9)
        total = _num(o.get("total_duration"))
        if total is not None:
            out.server_duration_ms = total / 1e6
    return out
