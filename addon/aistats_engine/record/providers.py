"""Which provider a request went to: OTel ``gen_ai.provider.name``.

One backend, one provider name. The decision, first answer wins:

1. the user's own hosts (config ``aistats: providers: {"llm.internal:8080": "vllm"}``);
2. a known API host (:data:`_HOSTS`; regional variants such as
   ``us-central1-aiplatform.googleapis.com`` or ``bedrock-runtime.eu-west-1.amazonaws.com``);
3. what this response says about its server (a distinctive ``Server`` header such as llama.cpp's,
   or the body: llama.cpp ``timings``, vLLM ``metrics``), else what an earlier response from the
   same ``host:port`` said (:class:`UpstreamProviders`), so an error, an aborted stream or another
   API on that upstream keeps the same name;
4. what the path implies (``/v1/messages`` → ``anthropic``, ``/api/chat`` → ``ollama``), and
   Ollama's port 11434;
5. the wire format's fallback (``openai`` for OpenAI's formats on a loopback or unknown host).

Names are OTel's well-known values where OTel has one (``openai``, ``anthropic``, ``gcp.gemini``,
``gcp.vertex_ai``, ``gcp.gen_ai``, ``aws.bedrock``, ``azure.ai.openai``, ``azure.ai.inference``,
``cohere``, ``deepseek``, ``groq``, ``ibm.watsonx.ai``, ``mistral_ai``, ``perplexity``,
``x_ai``), else a short lower-case name of the service (``cerebras``, ``together``, …).
"""

from __future__ import annotations

import fnmatch
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..wire.format import Match

# Host → provider: the host itself or any subdomain of it (``eu.api.openai.com``,
# ``myres.openai.azure.com``). The most specific entry wins (the host is looked up label by
# label from the full name), so ``models.inference.ai.azure.com`` beats ``azure.com`` rules.
_HOSTS: dict[str, str] = {
    # OTel well-known providers
    "api.openai.com": "openai",
    "chatgpt.com": "openai",  # Codex signed in with ChatGPT: chatgpt.com/backend-api/codex
    "api.anthropic.com": "anthropic",
    "generativelanguage.googleapis.com": "gcp.gemini",
    "aiplatform.googleapis.com": "gcp.vertex_ai",  # also <region>-aiplatform.googleapis.com
    "googleapis.com": "gcp.gen_ai",  # another Google endpoint (cloudcode-pa: Gemini CLI)
    "openai.azure.com": "azure.ai.openai",
    "cognitiveservices.azure.com": "azure.ai.openai",
    "services.ai.azure.com": "azure.ai.inference",
    "models.ai.azure.com": "azure.ai.inference",
    "inference.ml.azure.com": "azure.ai.inference",
    "api.cohere.com": "cohere",
    "api.cohere.ai": "cohere",
    "api.deepseek.com": "deepseek",
    "api.groq.com": "groq",
    "ml.cloud.ibm.com": "ibm.watsonx.ai",  # us-south.ml.cloud.ibm.com, eu-de.…
    "api.mistral.ai": "mistral_ai",
    "codestral.mistral.ai": "mistral_ai",
    "api.perplexity.ai": "perplexity",
    "api.x.ai": "x_ai",
    # Others: a short lower-case name of the service
    "api.moonshot.ai": "moonshot_ai",
    "api.moonshot.cn": "moonshot_ai",
    "api.kimi.com": "moonshot_ai",
    "openrouter.ai": "openrouter",
    "dashscope.aliyuncs.com": "dashscope",
    "dashscope-intl.aliyuncs.com": "dashscope",
    "dashscope-us.aliyuncs.com": "dashscope",
    "api.cerebras.ai": "cerebras",
    "api.together.xyz": "together",
    "api.together.ai": "together",
    "api.fireworks.ai": "fireworks",
    "router.huggingface.co": "huggingface",
    "api-inference.huggingface.co": "huggingface",
    "endpoints.huggingface.cloud": "huggingface",
    "ollama.com": "ollama",
    "api.z.ai": "zai",
    "open.bigmodel.cn": "zhipu",
    "api.sambanova.ai": "sambanova",
    "api.deepinfra.com": "deepinfra",
    "api.studio.nebius.com": "nebius",
    "api.studio.nebius.ai": "nebius",
    "api.tokenfactory.nebius.com": "nebius",
    "api.novita.ai": "novita",
    "api.hyperbolic.xyz": "hyperbolic",
    "api.lambda.ai": "lambda",
    "api.lambdalabs.com": "lambda",
    "inference.baseten.co": "baseten",
    "api.baseten.co": "baseten",  # model-<id>.api.baseten.co
    "api.replicate.com": "replicate",
    "models.github.ai": "github_models",
    "models.inference.ai.azure.com": "github_models",
    "githubcopilot.com": "github_copilot",  # api., api.individual., api.business.…
    "integrate.api.nvidia.com": "nvidia_nim",
    "ai.api.nvidia.com": "nvidia_nim",
    "api.endpoints.anyscale.com": "anyscale",
    "api.voyageai.com": "voyage",
    "api.jina.ai": "jina",
    "api.minimax.io": "minimax",
    "api.minimaxi.com": "minimax",
    "api.minimax.chat": "minimax",
    "api.ai21.com": "ai21",
    "api.siliconflow.cn": "siliconflow",
    "api.siliconflow.com": "siliconflow",
    "ark.cn-beijing.volces.com": "volcengine",
    "ark.ap-southeast.bytepluses.com": "volcengine",
    "qianfan.baidubce.com": "qianfan",
    "api.hunyuan.cloud.tencent.com": "hunyuan",
    "api.stepfun.com": "stepfun",
    "api.arcee.ai": "arcee",
    "api.avian.io": "avian",
    "api.llama.com": "meta",
    "api.scaleway.ai": "scaleway",
    "oai.endpoints.kepler.ai.cloud.ovh.net": "ovhcloud",
    "api.venice.ai": "venice",
    "api.upstage.ai": "upstage",
    "api.featherless.ai": "featherless",
    "api.inceptionlabs.ai": "inception",
    "llm.chutes.ai": "chutes",
    "gateway.ai.cloudflare.com": "cloudflare",
    "api.cloudflare.com": "cloudflare",  # Workers AI: /client/v4/accounts/<id>/ai/…
    "cloud.databricks.com": "databricks",
    "azuredatabricks.net": "databricks",
    "gcp.databricks.com": "databricks",
    "modal.run": "modal",
}

# Entries that also match with a region glued on by a dash: us-central1-aiplatform.googleapis.com.
_DASH_REGIONAL: tuple[tuple[str, str], ...] = (
    ("-aiplatform.googleapis.com", "gcp.vertex_ai"),
)

# AWS: any bedrock* label under amazonaws.com (bedrock-runtime.<region>,
# bedrock-runtime-fips.<region>, VPC endpoints …bedrock-runtime.<region>.vpce.amazonaws.com)
# or api.aws (bedrock-mantle.<region>).
_AWS_SUFFIXES = (".amazonaws.com", ".amazonaws.com.cn", ".api.aws")

# Distinctive ``Server`` header products (lower-case, before any ``/version``). Generic values
# say nothing: uvicorn (vLLM, SGLang, LiteLLM and every FastAPI app), cloudflare, envoy, nginx.
# Ollama (Go net/http) and TGI (axum) send no Server header of their own.
_SERVER_PRODUCTS: dict[str, str] = {
    "llama.cpp": "llama.cpp",  # httplib default header, on every response, errors included
    "llamafile": "llamafile",  # "llamafile/<version>"
    "concedollamaforkoboldserver": "koboldcpp",
}

_HOST_CACHE_MAX = 4096
_host_cache: dict[str, str | None] = {}


def _host_lookup(host: str) -> str | None:
    for suffix, provider in _DASH_REGIONAL:
        if host.endswith(suffix):
            return provider
    h = host
    while True:
        p = _HOSTS.get(h)
        if p is not None:
            return p
        dot = h.find(".")
        if dot < 0:
            break
        h = h[dot + 1:]
    if host.endswith(_AWS_SUFFIXES):
        labels = host.split(".")
        if any(lab.startswith("bedrock") for lab in labels):
            return "aws.bedrock"
        if any(lab.startswith("sagemaker") or lab == "runtime-sagemaker" for lab in labels):
            return "aws.sagemaker"
    return None


def normalize_host(host: str) -> str:
    """Lower case, no trailing dot, no IPv6 brackets."""
    h = host.strip().lower().rstrip(".")
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    return h


def provider_from_host(host: str) -> str | None:
    """The provider of a known API host, else None."""
    h = normalize_host(host)
    try:
        return _host_cache[h]
    except KeyError:
        pass
    p = _host_lookup(h)
    if len(_host_cache) >= _HOST_CACHE_MAX:
        _host_cache.clear()
    _host_cache[h] = p
    return p


def provider_from_server_header(server_header: str | None) -> str | None:
    if not server_header:
        return None
    words = server_header.split(None, 1)
    if not words:
        return None
    return _SERVER_PRODUCTS.get(words[0].split("/", 1)[0].lower())


def provider_from_response(server_header: str | None, hints: Iterable[str] = ()) -> str | None:
    """What the response itself says about its server: a distinctive ``Server`` header, else
    the body hints the readers collected (``llama.cpp`` for ``timings``, ``vllm`` for
    ``metrics``). None when it says nothing."""
    by_header = provider_from_server_header(server_header)
    if by_header is not None:
        return by_header
    if hints:
        if "llama.cpp" in hints:
            return "llama.cpp"
        if "vllm" in hints:
            return "vllm"
    return None


# --- the user's own hosts -------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ProviderHost:
    """One ``aistats: providers:`` entry: a host (glob, case-insensitive), an optional port,
    and the provider name to report for it."""

    host: str  # normalized: lower case, no brackets; may contain * ? [..]
    port: int | None  # None: any port
    provider: str
    _re: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    def matches(self, host: str, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self._re is None:
            return self.host == host
        return self._re.fullmatch(host) is not None


def _is_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def _split_host_port(key: str) -> tuple[str, str | None]:
    """``host``, ``host:port``, ``[v6]``, ``[v6]:port``; a bare IPv6 address has no port."""
    if key.startswith("["):
        end = key.find("]")
        if end < 0:
            return key, None
        rest = key[end + 1:]
        return key[1:end], (rest[1:] if rest.startswith(":") else (rest or None))
    if key.count(":") == 1:
        host, _, port = key.partition(":")
        return host, port
    return key, None


_HOSTS_EXPECTED = ('a mapping of "host[:port]" (glob allowed, e.g. "*.example.com") '
                   'to a provider name, e.g. {"llm.internal:8080": "vllm"}')


def parse_provider_hosts(raw: object, where: str) -> tuple[ProviderHost, ...]:
    """The config's ``providers`` mapping → rules for :func:`decide_provider`.

    ``None`` or empty → ``()``. Exact hosts are tried before globs and a rule with a port
    before one without; otherwise config order. A bad entry raises
    ``ValueError("<where>.<key>: <value> is invalid; expected …")``.
    """
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: {raw!r} is invalid; expected {_HOSTS_EXPECTED}")
    rules: list[ProviderHost] = []
    for key, value in raw.items():
        if not isinstance(key, str) or not key.strip():
            raise ValueError(f"{where}: key {key!r} is invalid; expected {_HOSTS_EXPECTED}")
        host_s, port_s = _split_host_port(key.strip())
        host = normalize_host(host_s)
        if not host or any(c in key for c in "/ \t@"):
            raise ValueError(f"{where}.{key}: host {key.strip()!r} is invalid; expected "
                             "host[:port] without scheme or path, glob allowed "
                             "(e.g. *.example.com)")
        port: int | None = None
        if port_s is not None and port_s != "*":
            if not port_s.isdigit() or not 0 < int(port_s) < 65536:
                raise ValueError(f"{where}.{key}: port {port_s!r} is invalid; expected a port "
                                 "number 1-65535 (or no port for any)")
            port = int(port_s)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{where}.{key}: {value!r} is invalid; expected a provider name "
                             'such as "vllm" or "llama.cpp"')
        rx = re.compile(fnmatch.translate(host)) if _is_glob(host) else None
        rules.append(ProviderHost(host, port, value.strip(), rx))
    rules.sort(key=lambda r: (r._re is not None, r.port is None))  # stable: config order kept
    return tuple(rules)


def provider_from_user_hosts(user_hosts: Iterable[ProviderHost], host: str, port: int
                             ) -> str | None:
    if not user_hosts:
        return None
    h = normalize_host(host)
    for rule in user_hosts:
        if rule.matches(h, port):
            return rule.provider
    return None


# --- what earlier responses taught ----------------------------------------------------------

DEFAULT_UPSTREAMS = 1000


class UpstreamProviders:
    """``host:port`` → the provider an earlier response from it revealed (Server header or body
    hints), least recently used dropped beyond ``max_entries``. Used from the event loop only
    (not thread-safe)."""

    __slots__ = ("max_entries", "_map")

    def __init__(self, max_entries: int = DEFAULT_UPSTREAMS) -> None:
        self.max_entries = max(1, max_entries)
        self._map: OrderedDict[str, str] = OrderedDict()

    @staticmethod
    def key(host: str, port: int) -> str:
        return f"{normalize_host(host)}:{port}"

    def get(self, host: str, port: int) -> str | None:
        k = self.key(host, port)
        p = self._map.get(k)
        if p is not None:
            self._map.move_to_end(k)
        return p

    def learn(self, host: str, port: int, provider: str) -> None:
        k = self.key(host, port)
        self._map[k] = provider
        self._map.move_to_end(k)
        while len(self._map) > self.max_entries:
            self._map.popitem(last=False)

    def observe(self, host: str, port: int, server_header: str | None,
                hints: Iterable[str] = ()) -> str | None:
        """Learn from this response's signal if it has one; return the provider known for
        this upstream (this response's signal, else an earlier one's), for ``learned=``."""
        signal = provider_from_response(server_header, hints)
        if signal is not None:
            self.learn(host, port, signal)
            return signal
        return self.get(host, port)

    def __len__(self) -> int:
        return len(self._map)

    def __contains__(self, host_port: object) -> bool:
        return host_port in self._map


# --- the decision ---------------------------------------------------------------------------

OLLAMA_PORT = 11434


def decide_provider(match: Match, host: str, port: int, response_hints: Iterable[str], *,
                    server_header: str | None = None,
                    user_hosts: Iterable[ProviderHost] = (),
                    learned: str | None = None) -> str | None:
    """The record's ``provider`` (see the module docstring for the order)."""
    if user_hosts:
        by_user = provider_from_user_hosts(user_hosts, host, port)
        if by_user is not None:
            return by_user
    by_host = provider_from_host(host)
    if by_host is not None:
        return by_host
    by_response = provider_from_response(server_header, response_hints)
    if by_response is not None:
        return by_response
    if learned:
        return learned
    if match.provider:
        return match.provider
    if port == OLLAMA_PORT:
        return "ollama"
    return match.fmt.fallback_provider
