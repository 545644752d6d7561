"""Provider names (record/providers.py): host table, response signals, learned upstreams,
the user's own hosts, and the order they are applied in."""

from __future__ import annotations

import pytest

from aistats_engine.record.providers import (
    UpstreamProviders, decide_provider, parse_provider_hosts, provider_from_host,
    provider_from_response,
)
from aistats_engine.wire.formats import match_api

CHAT = match_api("POST", "/v1/chat/completions")
MESSAGES = match_api("POST", "/v1/messages")
OLLAMA_CHAT = match_api("POST", "/api/chat")
GEMINI = match_api("POST", "/v1/models/g:generateContent")


@pytest.mark.parametrize("host,provider", [
    ("api.openai.com", "openai"),
    ("API.OpenAI.com.", "openai"),
    ("eu.api.openai.com", "openai"),
    ("chatgpt.com", "openai"),
    ("api.anthropic.com", "anthropic"),
    ("generativelanguage.googleapis.com", "gcp.gemini"),
    ("aiplatform.googleapis.com", "gcp.vertex_ai"),
    ("us-central1-aiplatform.googleapis.com", "gcp.vertex_ai"),
    ("europe-west4-aiplatform.googleapis.com", "gcp.vertex_ai"),
    ("cloudcode-pa.googleapis.com", "gcp.gen_ai"),
    ("bedrock-runtime.us-east-1.amazonaws.com", "aws.bedrock"),
    ("bedrock-runtime.eu-central-1.amazonaws.com", "aws.bedrock"),
    ("bedrock-runtime-fips.us-gov-west-1.amazonaws.com", "aws.bedrock"),
    ("bedrock.us-west-2.amazonaws.com", "aws.bedrock"),
    ("vpce-0abc.bedrock-runtime.us-east-1.vpce.amazonaws.com", "aws.bedrock"),
    ("bedrock-mantle.us-east-1.api.aws", "aws.bedrock"),
    ("runtime.sagemaker.us-east-1.amazonaws.com", "aws.sagemaker"),
    ("myres.openai.azure.com", "azure.ai.openai"),
    ("myres.cognitiveservices.azure.com", "azure.ai.openai"),
    ("proj.services.ai.azure.com", "azure.ai.inference"),
    ("mistral-large-abc.eastus2.models.ai.azure.com", "azure.ai.inference"),
    ("models.inference.ai.azure.com", "github_models"),
    ("models.github.ai", "github_models"),
    ("api.githubcopilot.com", "github_copilot"),
    ("api.individual.githubcopilot.com", "github_copilot"),
    ("api.groq.com", "groq"),
    ("api.mistral.ai", "mistral_ai"),
    ("codestral.mistral.ai", "mistral_ai"),
    ("api.deepseek.com", "deepseek"),
    ("api.perplexity.ai", "perplexity"),
    ("api.x.ai", "x_ai"),
    ("api.cohere.com", "cohere"),
    ("api.cohere.ai", "cohere"),
    ("us-south.ml.cloud.ibm.com", "ibm.watsonx.ai"),
    ("api.moonshot.ai", "moonshot_ai"),
    ("openrouter.ai", "openrouter"),
    ("dashscope.aliyuncs.com", "dashscope"),
    ("dashscope-intl.aliyuncs.com", "dashscope"),
    ("api.cerebras.ai", "cerebras"),
    ("api.together.xyz", "together"),
    ("api.fireworks.ai", "fireworks"),
    ("router.huggingface.co", "huggingface"),
    ("xyz.us-east-1.aws.endpoints.huggingface.cloud", "huggingface"),
    ("ollama.com", "ollama"),
    ("api.z.ai", "zai"),
    ("open.bigmodel.cn", "zhipu"),
    ("api.sambanova.ai", "sambanova"),
    ("api.deepinfra.com", "deepinfra"),
    ("api.studio.nebius.com", "nebius"),
    ("api.novita.ai", "novita"),
    ("api.hyperbolic.xyz", "hyperbolic"),
    ("api.lambda.ai", "lambda"),
    ("inference.baseten.co", "baseten"),
    ("model-abc123.api.baseten.co", "baseten"),
    ("api.replicate.com", "replicate"),
    ("integrate.api.nvidia.com", "nvidia_nim"),
    ("api.endpoints.anyscale.com", "anyscale"),
    ("api.voyageai.com", "voyage"),
    ("api.jina.ai", "jina"),
])
def test_known_hosts(host, provider):
    assert provider_from_host(host) == provider


@pytest.mark.parametrize("host", [
    "127.0.0.1", "localhost", "::1", "s3.amazonaws.com", "example.com", "openai.com.evil.net",
    "notapi.openai.com.example", "fakeopenai.com",
])
def test_unknown_hosts(host):
    assert provider_from_host(host) is None


def test_lookalike_hosts_do_not_match():
    # a suffix match needs a dot boundary
    assert provider_from_host("evilapi.openai.com") is None
    assert provider_from_host("xapi.anthropic.com") is None


@pytest.mark.parametrize("server,hints,provider", [
    ("llama.cpp", (), "llama.cpp"),
    ("LLaMA.cpp", (), "llama.cpp"),
    ("llamafile/0.9.3", (), "llamafile"),
    ("ConcedoLlamaForKoboldServer", (), "koboldcpp"),
    ("uvicorn", (), None),  # vLLM, SGLang, LiteLLM, any FastAPI app: not distinctive
    ("cloudflare", (), None),
    ("", (), None),
    (None, (), None),
    (None, {"llama.cpp"}, "llama.cpp"),
    (None, {"vllm"}, "vllm"),
    ("uvicorn", ["vllm"], "vllm"),
    ("llamafile/0.9", {"llama.cpp"}, "llamafile"),  # the header names the server exactly
])
def test_provider_from_response(server, hints, provider):
    assert provider_from_response(server, hints) == provider


def test_server_header_beats_path_and_fallback():
    # llama.cpp serves /v1/messages too: the path's "anthropic" is not the backend
    assert decide_provider(MESSAGES, "127.0.0.1", 8080, set(),
                           server_header="llama.cpp") == "llama.cpp"
    assert decide_provider(CHAT, "gpu-box", 8080, (), server_header="llama.cpp") == "llama.cpp"
    assert decide_provider(CHAT, "gpu-box", 8000, (), server_header="uvicorn") == "openai"


def test_known_host_beats_response_signal():
    assert decide_provider(CHAT, "api.groq.com", 443, {"vllm"},
                           server_header="llama.cpp") == "groq"


def test_existing_behaviour_kept():
    assert decide_provider(CHAT, "api.openai.com", 443, set()) == "openai"
    assert decide_provider(CHAT, "x.openai.azure.com", 443, set()) == "azure.ai.openai"
    assert decide_provider(CHAT, "127.0.0.1", 8080, {"llama.cpp"}) == "llama.cpp"
    assert decide_provider(CHAT, "127.0.0.1", 8000, {"vllm"}) == "vllm"
    assert decide_provider(CHAT, "127.0.0.1", 8000, set()) == "openai"
    assert decide_provider(MESSAGES, "127.0.0.1", 1, set()) == "anthropic"
    assert decide_provider(OLLAMA_CHAT, "127.0.0.1", 11434, set()) == "ollama"
    assert decide_provider(CHAT, "127.0.0.1", 11434, set()) == "ollama"
    assert decide_provider(GEMINI, "us-central1-aiplatform.googleapis.com", 443,
                           set()) == "gcp.vertex_ai"
    assert decide_provider(GEMINI, "127.0.0.1", 1, set()) == "gcp.gemini"


# --- learned upstreams --------------------------------------------------------------------

def test_upstream_learns_from_a_response_and_keeps_the_name():
    ups = UpstreamProviders()
    # 1: a success whose body carried llama.cpp timings
    learned = ups.observe("10.0.0.5", 8080, None, {"llama.cpp"})
    assert learned == "llama.cpp"
    assert decide_provider(CHAT, "10.0.0.5", 8080, {"llama.cpp"}, learned=learned) == "llama.cpp"
    # 2: a later error / aborted stream on the same upstream: no signal, same name
    learned = ups.observe("10.0.0.5", 8080, None, ())
    assert learned == "llama.cpp"
    assert decide_provider(CHAT, "10.0.0.5", 8080, (), learned=learned) == "llama.cpp"
    # 3: another API on it (path implies anthropic): still the backend's name
    assert decide_provider(MESSAGES, "10.0.0.5", 8080, (),
                           learned=ups.observe("10.0.0.5", 8080, None)) == "llama.cpp"
    # another port of the same host is another upstream
    assert ups.observe("10.0.0.5", 8000, None) is None
    assert decide_provider(CHAT, "10.0.0.5", 8000, (), learned=None) == "openai"


def test_upstream_learns_from_server_header_and_case_insensitive_host():
    ups = UpstreamProviders()
    assert ups.observe("GPU-Box", 8080, "llama.cpp") == "llama.cpp"
    assert ups.get("gpu-box", 8080) == "llama.cpp"
    assert "gpu-box:8080" in ups


def test_fresh_signal_overrides_learned():
    ups = UpstreamProviders()
    ups.learn("h", 1, "vllm")
    assert ups.observe("h", 1, "llama.cpp") == "llama.cpp"  # the server was swapped
    assert ups.get("h", 1) == "llama.cpp"
    assert decide_provider(CHAT, "h", 1, {"vllm"}, learned="llama.cpp") == "vllm"


def test_upstreams_are_bounded_lru():
    ups = UpstreamProviders(max_entries=3)
    for i in range(3):
        ups.learn(f"h{i}", 80, "vllm")
    assert ups.get("h0", 80) == "vllm"  # h0 is now the most recent
    ups.learn("h3", 80, "llama.cpp")  # evicts h1, the least recently used
    assert len(ups) == 3
    assert ups.get("h1", 80) is None
    assert ups.get("h0", 80) == "vllm" and ups.get("h3", 80) == "llama.cpp"
    big = UpstreamProviders()
    for i in range(5000):
        big.learn(f"10.0.{i // 256}.{i % 256}", 8080, "vllm")
    assert len(big) == 1000


# --- the user's own hosts -----------------------------------------------------------------

def test_user_hosts_parse_and_match():
    rules = parse_provider_hosts({"llm.internal:8080": "vllm", "*.example.com": "my-gateway",
                                  "[::1]:9000": "sglang", "10.1.2.3": "tgi",
                                  "gpu-*:*": "llama.cpp"}, "aistats.providers")
    assert decide_provider(CHAT, "llm.internal", 8080, (), user_hosts=rules) == "vllm"
    assert decide_provider(CHAT, "LLM.internal", 8080, (), user_hosts=rules) == "vllm"
    assert decide_provider(CHAT, "llm.internal", 9090, (), user_hosts=rules) == "openai"
    assert decide_provider(CHAT, "a.b.example.com", 443, (), user_hosts=rules) == "my-gateway"
    assert decide_provider(CHAT, "example.com", 443, (), user_hosts=rules) == "openai"
    assert decide_provider(CHAT, "::1", 9000, (), user_hosts=rules) == "sglang"
    assert decide_provider(CHAT, "[::1]", 9000, (), user_hosts=rules) == "sglang"
    assert decide_provider(CHAT, "10.1.2.3", 1, (), user_hosts=rules) == "tgi"
    assert decide_provider(CHAT, "gpu-7", 5000, (), user_hosts=rules) == "llama.cpp"


def test_user_hosts_win_over_everything():
    rules = parse_provider_hosts({"api.openai.com": "corp-proxy",
                                  "box:8080": "mine"}, "aistats.providers")
    assert decide_provider(CHAT, "api.openai.com", 443, (), user_hosts=rules) == "corp-proxy"
    assert decide_provider(CHAT, "box", 8080, {"llama.cpp"}, server_header="llama.cpp",
                           user_hosts=rules, learned="vllm") == "mine"


def test_user_hosts_exact_before_glob_and_port_before_any():
    rules = parse_provider_hosts({"*.lan": "glob", "a.lan": "exact-any-port",
                                  "a.lan:8080": "exact-port"}, "p")
    assert decide_provider(CHAT, "a.lan", 8080, (), user_hosts=rules) == "exact-port"
    assert decide_provider(CHAT, "a.lan", 80, (), user_hosts=rules) == "exact-any-port"
    assert decide_provider(CHAT, "b.lan", 80, (), user_hosts=rules) == "glob"


def test_user_hosts_empty():
    assert parse_provider_hosts(None, "p") == ()
    assert parse_provider_hosts({}, "p") == ()


@pytest.mark.parametrize("raw,message", [
    (["x"], "aistats.providers: ['x'] is invalid; expected a mapping"),
    ({"h:99999": "x"}, "aistats.providers.h:99999: port '99999' is invalid; expected a port"),
    ({"h:abc": "x"}, "aistats.providers.h:abc: port 'abc' is invalid"),
    ({"h": ""}, "aistats.providers.h: '' is invalid; expected a provider name"),
    ({"h": 3}, "aistats.providers.h: 3 is invalid; expected a provider name"),
    ({"": "x"}, "aistats.providers: key '' is invalid"),
    ({"http://h/x": "x"}, "aistats.providers.http://h/x: host"),
])
def test_user_hosts_bad_entries(raw, message):
    with pytest.raises(ValueError) as e:
        parse_provider_hosts(raw, "aistats.providers")
    text = str(e.value)
    assert text.startswith(message), text
    assert "\n" not in text


# --- precedence, end to end ----------------------------------------------------------------

def test_precedence_chain():
    """user config > known host > response signal / learned > path > port > format fallback"""
    user = parse_provider_hosts({"api.groq.com": "mine"}, "p")
    assert decide_provider(CHAT, "api.groq.com", 443, {"vllm"}, server_header="llama.cpp",
                           user_hosts=user, learned="x") == "mine"
    assert decide_provider(CHAT, "api.groq.com", 443, {"vllm"}, server_header="llama.cpp",
                           learned="x") == "groq"
    assert decide_provider(MESSAGES, "h", 1, {"vllm"}, server_header="llama.cpp",
                           learned="x") == "llama.cpp"
    assert decide_provider(MESSAGES, "h", 1, {"vllm"}, learned="x") == "vllm"
    assert decide_provider(MESSAGES, "h", 11434, (), learned="x") == "x"
    assert decide_provider(MESSAGES, "h", 11434, ()) == "anthropic"
    assert decide_provider(CHAT, "h", 11434, ()) == "ollama"
    assert decide_provider(CHAT, "h", 1, ()) == "openai"
